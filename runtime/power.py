"""Power meters for ``edgekd bench``: tegrastats on Jetson, NVML on NVIDIA GPUs, RAPL on CPUs.

A meter samples power in a background thread between ``start()`` and ``stop()``; the
:class:`PowerTrace` it returns integrates energy over any time window of ``time.perf_counter``::

    meter = power_meter("jetson")          # None where no sensor is readable
    meter.start()
    t0 = time.perf_counter(); ...run...; t1 = time.perf_counter()
    trace = meter.stop()
    trace.energy_j(t0, t1)                 # trapezoid over the samples: sum (P_i + P_i+1)/2 dt
    trace.mean_w(t0, t1)                   # energy / (t1 - t0)

What each meter measures:

* ``TegrastatsMeter``: the board's input rail (``VDD_IN`` on Orin Nano/NX, ``POM_5V_IN`` on
  Xavier and Nano), else the sum of every rail tegrastats prints (AGX Orin has no input rail);
  also the peak of ``RAM used`` (CPU and GPU share it on Jetson).
* ``NvmlMeter``: the GPU board power (``nvmlDeviceGetPowerUsage``) and peak device memory used.
* ``RaplMeter``: the CPU packages' energy counters under ``/sys/class/powercap`` (often root-only).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgekd.runtime.base import BackendError

# "VDD_IN 4932mW/4932mW" (Orin) or "POM_5V_IN 2939/2939" (Xavier, Nano): current/average
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*[A-Z0-9]) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
TEGRASTATS_HINT = (
    "run on the Jetson itself, or in a container bind-mount it "
    "(-v /usr/bin/tegrastats:/usr/bin/tegrastats:ro, see docs/docker.md)"
)


@dataclass
class PowerTrace:
    """Power samples ``(perf_counter seconds, watts)`` and what the meter read."""

    source: str
    samples: list[tuple[float, float]] = field(default_factory=list)
    peak_memory_mb: float | None = None  # RAM used (Jetson) or GPU memory used (NVML)
    rails: list[str] = field(default_factory=list)

    def energy_j(self, t0: float, t1: float) -> float | None:
        """Joules between ``t0`` and ``t1``: trapezoids over the samples, power held constant
        before the first and after the last sample; None with no sample."""
        if not self.samples or t1 <= t0:
            return None
        pts = sorted(self.samples)
        times = [t0] + [t for t, _ in pts if t0 < t < t1] + [t1]
        return sum(
            (self._at(pts, a) + self._at(pts, b)) / 2 * (b - a)
            for a, b in zip(times, times[1:], strict=False)
        )

    def mean_w(self, t0: float, t1: float) -> float | None:
        e = self.energy_j(t0, t1)
        return None if e is None else e / (t1 - t0)

    @staticmethod
    def _at(pts: list[tuple[float, float]], t: float) -> float:
        """Power at ``t``, linearly interpolated between samples."""
        if t <= pts[0][0]:
            return pts[0][1]
        for (ta, pa), (tb, pb) in zip(pts, pts[1:], strict=False):
            if ta <= t <= tb:
                return pa if tb == ta else pa + (pb - pa) * (t - ta) / (tb - ta)
        return pts[-1][1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rails": self.rails,
            "samples": len(self.samples),
            "peak_memory_mb": self.peak_memory_mb,
        }


class PowerMeter(Protocol):
    source: str

    def start(self) -> None: ...

    def stop(self) -> PowerTrace: ...


def parse_tegrastats(line: str) -> tuple[float | None, list[str], float | None]:
    """``(watts, rails used, RAM used MB)`` of one tegrastats line (None when absent)."""
    rails = {name: int(cur) for name, cur, _ in _RAIL.findall(line)}
    ram = _RAM.search(line)
    ram_mb = float(ram.group(1)) if ram else None
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name] / 1e3, [name], ram_mb
    if not rails:
        return None, [], ram_mb
    return sum(rails.values()) / 1e3, sorted(rails), ram_mb


class TegrastatsMeter:
    """Jetson board power from ``tegrastats --interval MS`` (a child process, read per line)."""

    source = "tegrastats"

    def __init__(self, interval_ms: int = 100, executable: str = "tegrastats") -> None:
        path = shutil.which(executable)
        if path is None:
            raise BackendError(
                f"'{executable}' not found, so power cannot be read; " + TEGRASTATS_HINT
            )
        self.cmd = [path, "--interval", str(int(interval_ms))]
        self.trace = PowerTrace(self.source)
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.trace = PowerTrace(self.source)
        self._proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.perf_counter()
            watts, rails, ram = parse_tegrastats(line)
            if watts is not None:
                self.trace.samples.append((now, watts))
                self.trace.rails = rails
            if ram is not None:
                self.trace.peak_memory_mb = max(self.trace.peak_memory_mb or 0.0, ram)

    def stop(self) -> PowerTrace:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self.trace


class _Sampler:
    """A thread calling ``read() -> (watts | None, memory_mb | None)`` every interval."""

    source = "sampler"
    rails: tuple[str, ...] = ()

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.trace = PowerTrace(self.source, rails=list(self.rails))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> tuple[float | None, float | None]:
        raise NotImplementedError

    def start(self) -> None:
        self.trace = PowerTrace(self.source, rails=list(self.rails))
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        watts, memory = self.read()
        if watts is not None:
            self.trace.samples.append((time.perf_counter(), watts))
        if memory is not None:
            self.trace.peak_memory_mb = max(self.trace.peak_memory_mb or 0.0, memory)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> PowerTrace:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample()
        return self.trace


class NvmlMeter(_Sampler):
    """GPU board power and device memory in use, through NVML (``nvidia-ml-py``)."""

    source = "nvml"
    rails = ("board power",)

    def __init__(self, index: int = 0, interval_s: float = 0.05) -> None:
        super().__init__(interval_s)
        try:
            import pynvml
        except ImportError:
            raise BackendError(
                "GPU power needs NVML's Python bindings: pip install nvidia-ml-py"
            ) from None
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as e:
            raise BackendError(f"NVML cannot open GPU {index}: {e}") from None
        self._nvml = pynvml

    def read(self) -> tuple[float | None, float | None]:
        nv = self._nvml
        try:
            watts = nv.nvmlDeviceGetPowerUsage(self._handle) / 1e3
        except nv.NVMLError:
            watts = None
        used = nv.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
        return watts, used


class RaplMeter(_Sampler):
    """CPU package power from the RAPL energy counters (``/sys/class/powercap/intel-rapl:N``)."""

    source = "rapl"

    def __init__(self, root: Path = Path("/sys/class/powercap"), interval_s: float = 0.05):
        super().__init__(interval_s)
        self.domains = sorted(p for p in root.glob("intel-rapl:*") if ":" not in p.name[11:])
        if not self.domains:
            raise BackendError(f"no RAPL energy counters under {root}")
        try:
            self._ranges = [int((d / "max_energy_range_uj").read_text()) for d in self.domains]
            self._last = self._energy()
        except (OSError, ValueError) as e:
            raise BackendError(f"RAPL counters are not readable ({e}); run as root") from None
        self._last_t = time.perf_counter()

    def _energy(self) -> list[int]:
        return [int((d / "energy_uj").read_text()) for d in self.domains]

    def read(self) -> tuple[float | None, float | None]:
        now, t = self._energy(), time.perf_counter()
        dt = t - self._last_t
        delta = sum((b - a) % r for a, b, r in zip(self._last, now, self._ranges, strict=True))
        self._last, self._last_t = now, t
        return (delta / 1e6 / dt if dt > 1e-3 else None), None


def power_meter(device: str) -> tuple[PowerMeter | None, str]:
    """The meter for ``device`` (``cpu``, ``cuda``, ``jetson``) and, when none, why not.

    On Jetson a missing tegrastats is an error (power is what a Jetson bench is for); on a GPU
    or a CPU host power is measured when a sensor is readable and reported as absent otherwise.
    """
    if device == "jetson":
        return TegrastatsMeter(), ""
    try:
        return (NvmlMeter() if device == "cuda" else RaplMeter()), ""
    except BackendError as e:
        return None, str(e)
