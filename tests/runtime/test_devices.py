"""Jetson detection from fixture file trees: release, board, profile, power state."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekd.runtime.base import BackendError
from edgekd.runtime.devices import (
    NOT_JETSON,
    detect_jetson,
    jetpack_for,
    parse_jetson_clocks,
    parse_nvpmodel,
    require_jetson,
)

BOARDS = Path(__file__).parent / "fixtures" / "jetson"

NVPMODEL_NANO = "NV Power Mode: MAXN_SUPER\n2\n"
CLOCKS_ON = """SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano Developer Kit
Online CPUs: 0-5
cpu0: Online=1 Governor=schedutil MinFreq=1728000 MaxFreq=1728000 CurrentFreq=1728000 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=1728000 MaxFreq=1728000 CurrentFreq=1728000 IdleStates: WFI=0 c7=0
GPU MinFreq=1020000000 MaxFreq=1020000000 CurrentFreq=1020000000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
NV Power Mode: MAXN_SUPER
"""  # noqa: E501
CLOCKS_OFF = CLOCKS_ON.replace("MinFreq=1728000", "MinFreq=729600").replace(
    "GPU MinFreq=1020000000", "GPU MinFreq=306000000"
)


def fake_runner(outputs: dict[str, str | None]):
    calls = []

    def run(cmd):
        calls.append(list(cmd))
        return outputs.get(cmd[0])

    run.calls = calls
    return run


@pytest.mark.parametrize(
    "board, l4t, jetpack, profile",
    [
        ("orin-nano-8gb", "36.4.3", "6.2", "jetson-orin-nano-8gb"),
        ("orin-nx-16gb", "36.4.0", "6.1", "jetson-orin-nx-16gb"),
        ("agx-orin-64gb", "35.4.1", "5.1.2", "jetson-agx-orin-64gb"),
    ],
)
def test_detect_jetson_fixture_boards(board, l4t, jetpack, profile):
    info = detect_jetson(BOARDS / board, runner=None)
    assert (info.l4t, info.jetpack, info.profile) == (l4t, jetpack, profile)
    assert "\0" not in info.model and "Orin" in info.model
    assert info.power_mode is None and info.jetson_clocks is None


def test_detect_jetson_x86_host_is_none_and_require_fails_in_one_line():
    assert detect_jetson(BOARDS / "x86-host", runner=None) is None
    with pytest.raises(BackendError) as exc:
        require_jetson(BOARDS / "x86-host", runner=None)
    assert str(exc.value) == NOT_JETSON and "\n" not in NOT_JETSON
    assert "--device cpu|cuda" in NOT_JETSON


@pytest.mark.parametrize(
    "l4t, jetpack",
    [
        ("36.4.3", "6.2"),
        ("36.4.4", "6.2.1"),
        ("36.4.0", "6.1"),
        ("36.4.1", "6.1"),  # unlisted patch: nearest earlier of the same line
        ("36.3.0", "6.0"),
        ("35.6.0", "5.1.4"),
        ("35.2.1", "5.1"),
        ("32.7.4", "4.6.4"),
        ("37.0.0", None),
        ("garbage", None),
    ],
)
def test_jetpack_for_published_releases(l4t, jetpack):
    assert jetpack_for(l4t) == jetpack


def test_detect_records_nvpmodel_and_jetson_clocks_through_runner():
    run = fake_runner({"nvpmodel": NVPMODEL_NANO, "jetson_clocks": CLOCKS_ON})
    info = detect_jetson(BOARDS / "orin-nano-8gb", runner=run)
    assert (info.power_mode, info.power_mode_id, info.jetson_clocks) == ("MAXN_SUPER", 2, True)
    assert ["nvpmodel", "-q"] in run.calls and ["jetson_clocks", "--show"] in run.calls
    assert info.to_dict()["power_mode"] == "MAXN_SUPER"


def test_parsers_of_command_output():
    assert parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Power Mode: 15W\n0\n") == ("15W", 0)
    assert parse_nvpmodel("") == (None, None)
    assert parse_jetson_clocks(CLOCKS_ON) is True
    assert parse_jetson_clocks(CLOCKS_OFF) is False
    assert parse_jetson_clocks("permission denied") is None


def test_jetson_clocks_falls_back_to_frequency_files(tmp_path):
    root = tmp_path / "board"
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0, GCID: 1\n")
    for n, lo in ((0, 1728000), (1, 729600)):
        freq = root / f"sys/devices/system/cpu/cpu{n}/cpufreq"
        freq.mkdir(parents=True)
        (freq / "scaling_min_freq").write_text(f"{lo}\n")
        (freq / "scaling_max_freq").write_text("1728000\n")
    run = fake_runner({"nvpmodel": None, "jetson_clocks": None})  # not root: both fail
    info = detect_jetson(root, runner=run)
    assert info.jetson_clocks is False and info.power_mode is None
    (root / "sys/devices/system/cpu/cpu1/cpufreq/scaling_min_freq").write_text("1728000\n")
    assert detect_jetson(root, runner=run).jetson_clocks is True
    assert (info.model, info.profile, info.jetpack) == ("unknown Jetson", None, "6.1")


def test_smaller_memory_variant_gets_no_profile(tmp_path):
    root = tmp_path / "nano4gb"
    for rel in ("etc", "proc/device-tree"):
        (root / rel).mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 1\n")
    (root / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    (root / "proc/meminfo").write_text("MemTotal:        3722792 kB\n")
    assert detect_jetson(root, runner=None).profile is None
    (root / "proc/meminfo").unlink()  # memory unknown: the module string decides
    assert detect_jetson(root, runner=None).profile == "jetson-orin-nano-8gb"
