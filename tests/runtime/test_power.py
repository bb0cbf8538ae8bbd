"""Power meters: tegrastats lines of each Jetson generation, a live tegrastats process (a
stand-in script printing real lines), NVML and RAPL through fakes, energy integration."""

from __future__ import annotations

import os
import sys
import time
import types

import pytest

from edgekd.runtime.base import BackendError
from edgekd.runtime.power import (
    NvmlMeter,
    PowerTrace,
    RaplMeter,
    TegrastatsMeter,
    parse_tegrastats,
    power_meter,
)

ORIN_NANO = (
    "11-27-2026 15:30:00 RAM 2345/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,2%@729,0%@729,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] "
    "cpu@45.5C soc2@44.2C VDD_IN 4932mW/4932mW VDD_CPU_GPU_CV 495mW/495mW VDD_SOC 1436mW/1436mW"
)
AGX_ORIN = (
    "RAM 5120/62780MB (lfb 1x4MB) SWAP 0/31390MB CPU [3%@1190,off] GR3D_FREQ 0% "
    "VDD_GPU_SOC 3191mW/3191mW VDD_CPU_CV 797mW/797mW VIN_SYS_5V0 4342mW/4342mW "
    "VDDQ_VDD2_1V8AO 705mW/705mW"
)
XAVIER_NX = (
    "RAM 1543/7860MB (lfb 1x4MB) SWAP 0/3930MB CPU [2%@1190,1%@1190] EMC_FREQ 0% "
    "GR3D_FREQ 0% AO@40C GPU@40.5C POM_5V_IN 2939/2939 POM_5V_GPU 0/0 POM_5V_CPU 384/384"
)


def test_parse_input_rail_or_sum_of_rails():
    assert parse_tegrastats(ORIN_NANO) == (4.932, ["VDD_IN"], 2345.0)
    assert parse_tegrastats(XAVIER_NX) == (2.939, ["POM_5V_IN"], 1543.0)
    watts, rails, ram = parse_tegrastats(AGX_ORIN)  # no input rail: the sum of every rail
    assert watts == pytest.approx((3191 + 797 + 4342 + 705) / 1e3) and ram == 5120.0
    assert rails == ["VDDQ_VDD2_1V8AO", "VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]
    assert parse_tegrastats("RAM 10/20MB SWAP 0/1MB") == (None, [], 10.0)


def test_energy_integrates_samples():
    flat = PowerTrace("x", [(0.0, 5.0), (1.0, 5.0), (2.0, 5.0)])
    assert flat.energy_j(0.0, 2.0) == pytest.approx(10.0)
    assert flat.mean_w(0.5, 1.5) == pytest.approx(5.0)
    ramp = PowerTrace("x", [(0.0, 0.0), (2.0, 4.0)])  # 2 W/s
    assert ramp.energy_j(0.0, 2.0) == pytest.approx(4.0)
    assert ramp.energy_j(1.0, 2.0) == pytest.approx(3.0)  # (2 + 4) / 2 x 1
    assert ramp.energy_j(3.0, 4.0) == pytest.approx(4.0)  # held at the last sample
    assert PowerTrace("x").energy_j(0, 1) is None


@pytest.fixture
def fake_tegrastats(tmp_path, monkeypatch):
    """A `tegrastats` on PATH that prints an Orin Nano line every --interval ms, 4 W then 8 W."""
    script = tmp_path / "bin" / "tegrastats"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "ms = int(sys.argv[sys.argv.index('--interval') + 1])\n"
        f"line = {ORIN_NANO!r}\n"
        "for i in range(100000):\n"
        "    w = 4000 if i < 5 else 8000\n"
        "    print(line.replace('VDD_IN 4932mW/4932mW', f'VDD_IN {w}mW/{w}mW'), flush=True)\n"
        "    time.sleep(ms / 1000)\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return script


def test_tegrastats_meter_reads_a_live_process(fake_tegrastats):
    meter = TegrastatsMeter(interval_ms=20)
    meter.start()
    time.sleep(0.5)
    trace = meter.stop()
    assert meter._proc.poll() is not None  # the child is gone
    watts = [w for _, w in trace.samples]
    assert len(watts) >= 8 and watts[0] == 4.0 and watts[-1] == 8.0
    assert trace.rails == ["VDD_IN"] and trace.peak_memory_mb == 2345.0
    t0, t1 = trace.samples[0][0], trace.samples[-1][0]
    assert 4.0 < trace.mean_w(t0, t1) < 8.0


def test_jetson_without_tegrastats_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError, match="'tegrastats' not found.*bind-mount"):
        power_meter("jetson")


def test_rapl_meter_reads_energy_counters(tmp_path):
    pkg = tmp_path / "intel-rapl:0"
    (tmp_path / "intel-rapl:0:0").mkdir(parents=True)  # a sub-domain: not counted twice
    pkg.mkdir()
    (pkg / "max_energy_range_uj").write_text("1000000000\n")
    (pkg / "energy_uj").write_text("999000000\n")
    meter = RaplMeter(root=tmp_path, interval_s=10)
    assert [d.name for d in meter.domains] == ["intel-rapl:0"]
    meter.start()
    time.sleep(0.2)
    (pkg / "energy_uj").write_text("1000000\n")  # wrapped: +2 J
    trace = meter.stop()
    t, watts = trace.samples[-1]
    assert watts == pytest.approx(2.0 / 0.2, rel=0.3)


def test_cpu_without_rapl_reports_why(monkeypatch, tmp_path):
    import edgekd.runtime.power as power

    monkeypatch.setattr(power.RaplMeter.__init__, "__defaults__", (tmp_path, 0.05))
    meter, why = power_meter("cpu")
    assert meter is None and "RAPL" in why


def test_nvml_meter_samples_power_and_memory(monkeypatch):
    class NVMLError(Exception):
        pass

    calls = {"n": 0}

    def power(handle):
        calls["n"] += 1
        return 150_000 + 1000 * calls["n"]  # mW

    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetPowerUsage=power,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = NvmlMeter(interval_s=0.01)
    meter.start()
    time.sleep(0.1)
    trace = meter.stop()
    assert trace.source == "nvml" and trace.peak_memory_mb == 3072
    assert len(trace.samples) >= 3 and trace.samples[0][1] == pytest.approx(151.0)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(BackendError, match="nvidia-ml-py"):
        NvmlMeter()
