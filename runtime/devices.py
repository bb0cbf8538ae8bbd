"""Which NVIDIA Jetson this host is, read from files so that tests run on any machine.

A Jetson announces itself in two files (FACTS.md, Jetson)::

    /etc/nv_tegra_release    "# R36 (release), REVISION: 4.3, GCID: ..."  -> L4T 36.4.3
    /proc/device-tree/model  "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit\\0"

The L4T release maps to a JetPack release through NVIDIA's published table (:data:`JETPACK`),
the board maps to a shipped device profile through the profiles' ``jetson.module`` strings, and
the power state (``nvpmodel -q``, whether ``jetson_clocks`` pinned the clocks) is recorded with
every result. Commands go through an injectable runner so that tests need no board::

    >>> from pathlib import Path
    >>> detect_jetson(Path("/nonexistent")) is None
    True
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekd.runtime.base import BackendError

Runner = Callable[[Sequence[str]], "str | None"]
"""Runs a command and returns its stdout, or None when it is missing or fails."""

# L4T (Jetson Linux) release -> JetPack release, from NVIDIA's JetPack archive and release notes.
JETPACK: dict[tuple[int, int, int], str] = {
    (32, 6, 1): "4.6",
    (32, 7, 1): "4.6.1",
    (32, 7, 2): "4.6.2",
    (32, 7, 3): "4.6.3",
    (32, 7, 4): "4.6.4",
    (32, 7, 5): "4.6.5",
    (32, 7, 6): "4.6.6",
    (34, 1, 0): "5.0 DP",
    (34, 1, 1): "5.0.1 DP",
    (35, 1, 0): "5.0.2",
    (35, 2, 1): "5.1",
    (35, 3, 1): "5.1.1",
    (35, 4, 1): "5.1.2",
    (35, 5, 0): "5.1.3",
    (35, 6, 0): "5.1.4",
    (35, 6, 1): "5.1.5",
    (36, 2, 0): "6.0 DP",
    (36, 3, 0): "6.0",
    (36, 4, 0): "6.1",
    (36, 4, 3): "6.2",
    (36, 4, 4): "6.2.1",
    (38, 2, 0): "7.0",
}

NOT_JETSON = (
    "--device jetson: this host is not an NVIDIA Jetson (no /etc/nv_tegra_release); "
    "run on the board or use --device cpu|cuda"
)

_RELEASE = re.compile(r"#\s*R(\d+)\s*\(\w+\),\s*REVISION:\s*(\d+)(?:\.(\d+))?")
_POWER_MODE = re.compile(r"NV Power Mode:\s*(\S+)")
_SIZE_IN_MODEL = re.compile(r"\b(\d+)\s*GB\b", re.IGNORECASE)
# A board whose memory is under this share of the profile's memory_gb is a smaller variant
# (Orin Nano 4GB reports ~3.6 GiB, the 8GB ~7.4 GiB; AGX Orin 32GB vs 64GB; Orin NX 8GB vs 16GB).
_MEMORY_SHARE = 0.75


@dataclass(frozen=True)
class JetsonBoard:
    """What a Jetson host is and how it is clocked; ``to_dict`` goes into every result.

    Attributes:
        model: The board, from ``/proc/device-tree/model``.
        l4t: Jetson Linux release, e.g. ``36.4.3`` (None when the release file is unreadable).
        jetpack: JetPack release of ``l4t`` (:func:`jetpack_for`), None when not in the table.
        profile: Name of the shipped device profile of this board, None when none matches.
        memory_gb: Physical memory seen by Linux (``/proc/meminfo``), in GB; None if unreadable.
        power_mode: ``nvpmodel -q`` mode name, e.g. ``MAXN_SUPER`` (None when nvpmodel fails).
        power_mode_id: ``nvpmodel -q`` mode id.
        jetson_clocks: True when clocks are pinned at their maximum, None when unknown.
    """

    model: str
    l4t: str | None
    jetpack: str | None
    profile: str | None
    memory_gb: float | None = None
    power_mode: str | None = None
    power_mode_id: int | None = None
    jetson_clocks: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_command(cmd: Sequence[str]) -> str | None:
    """The default runner: stdout of ``cmd``, or None if it is missing, fails or hangs."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def detect_jetson(
    root: Path = Path("/"), runner: Runner | None = run_command
) -> JetsonBoard | None:
    """Detect a Jetson from the files under ``root``; None on any other host.

    Args:
        root: Filesystem root to read (``/`` on a board; a fixture folder in tests).
        runner: Runs ``nvpmodel -q`` and ``jetson_clocks --show``; None skips both (the power
            fields stay None). ``jetson_clocks --show`` needs root: when it fails the CPU and GPU
            frequency files under ``root/sys`` are read instead.
    """
    release = root / "etc" / "nv_tegra_release"
    if not release.is_file():
        return None
    l4t = parse_l4t(release.read_text(encoding="utf-8", errors="replace"))
    model_file = root / "proc" / "device-tree" / "model"
    model = _read_model(model_file) if model_file.is_file() else "unknown Jetson"
    memory_gb = _memory_gb(root / "proc" / "meminfo")
    mode, mode_id = parse_nvpmodel(runner(["nvpmodel", "-q"]) or "") if runner else (None, None)
    clocks = None
    if runner is not None:
        clocks = parse_jetson_clocks(runner(["jetson_clocks", "--show"]) or "")
        clocks = _clocks_from_files(root) if clocks is None else clocks
    return JetsonBoard(
        model=model,
        l4t=l4t,
        jetpack=jetpack_for(l4t) if l4t else None,
        profile=match_profile(model, memory_gb),
        memory_gb=memory_gb,
        power_mode=mode,
        power_mode_id=mode_id,
        jetson_clocks=clocks,
    )


def require_jetson(root: Path = Path("/"), runner: Runner | None = run_command) -> JetsonBoard:
    """:func:`detect_jetson`, raising a one-line :class:`BackendError` on a non-Jetson host."""
    info = detect_jetson(root, runner)
    if info is None:
        raise BackendError(NOT_JETSON)
    return info


def parse_l4t(text: str) -> str | None:
    """``"# R36 (release), REVISION: 4.0, ..."`` -> ``"36.4.0"``; None if it does not parse."""
    m = _RELEASE.search(text)
    if m is None:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def jetpack_for(l4t: str) -> str | None:
    """The JetPack release of an L4T release (``36.4.3`` -> ``6.2``).

    A patch release missing from :data:`JETPACK` takes the nearest earlier one of the same
    ``major.minor`` (``36.4.1`` -> ``6.1``): NVIDIA ships such updates over apt within a JetPack.
    """
    try:
        version = tuple(int(p) for p in l4t.split("."))
    except ValueError:
        return None
    if len(version) != 3:
        return None
    same_line = [v for v in JETPACK if v[:2] == version[:2] and v <= version]
    return JETPACK[max(same_line)] if same_line else None


def match_profile(model: str, memory_gb: float | None = None) -> str | None:
    """The shipped device profile whose ``jetson.module`` names this board (longest match wins).

    The module strings are compared without the ``NVIDIA`` prefix (JetPack 5 boards write
    "Jetson AGX Orin Developer Kit"). One module string covers several memory sizes, so a board
    whose memory (from ``/proc/meminfo``, or a size written in the model string) is well below
    the profile's ``memory_gb`` gets None: edgekd ships no profile for it.
    """
    from edgekd.profiles import list_profiles, load_device_profile

    board = _norm(model)
    best = None
    for name in list_profiles("device"):
        profile = load_device_profile(name)
        if profile.jetson is None:
            continue
        module = _norm(profile.jetson.module)
        if re.search(rf"\b{re.escape(module)}\b", board) and (
            best is None or len(module) > len(_norm(best.jetson.module))
        ):
            best = profile
    if best is None:
        return None
    sizes = [float(s) for s in _SIZE_IN_MODEL.findall(model)]
    if sizes and best.memory_gb not in sizes:
        return None
    if memory_gb is not None and memory_gb < _MEMORY_SHARE * best.memory_gb:
        return None
    return best.name


def parse_nvpmodel(text: str) -> tuple[str | None, int | None]:
    """``nvpmodel -q`` output (``"NV Power Mode: 15W\\n0\\n"``) -> ``("15W", 0)``."""
    m = _POWER_MODE.search(text)
    if m is None:
        return None, None
    following = text[m.end() :].split()
    mode_id = int(following[0]) if following and following[0].isdigit() else None
    return m.group(1), mode_id


def parse_jetson_clocks(text: str) -> bool | None:
    """Whether ``jetson_clocks --show`` reports pinned clocks; None if it shows no clocks.

    ``jetson_clocks`` sets each CPU's and the GPU's minimum frequency to its maximum, so the
    clocks are pinned when ``MinFreq == MaxFreq`` on every CPU and GPU line.
    """
    pairs = re.findall(r"^(?:cpu\d+|GPU)\b.*?MinFreq=(\d+)\s+MaxFreq=(\d+)", text, re.MULTILINE)
    if not pairs:
        return None
    return all(lo == hi for lo, hi in pairs)


def _clocks_from_files(root: Path) -> bool | None:
    """The files ``jetson_clocks`` writes: CPU ``scaling_min_freq`` and GPU devfreq ``min_freq``."""
    pairs = []
    for cpu in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        pairs.append((cpu / "scaling_min_freq", cpu / "scaling_max_freq"))
    for dev in sorted((root / "sys/class/devfreq").glob("*")):
        if any(key in dev.name for key in ("gpu", "ga10b", "gv11b", "gp10b")):
            pairs.append((dev / "min_freq", dev / "max_freq"))
    values = [(_read_int(lo), _read_int(hi)) for lo, hi in pairs]
    values = [(lo, hi) for lo, hi in values if lo is not None and hi is not None]
    return all(lo == hi for lo, hi in values) if values else None


def _read_model(path: Path) -> str:
    return path.read_bytes().split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def _memory_gb(meminfo: Path) -> float | None:
    if not meminfo.is_file():
        return None
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo.read_text(encoding="utf-8"), re.MULTILINE)
    return int(m.group(1)) * 1024 / 1e9 if m else None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None


def _norm(text: str) -> str:
    text = " ".join(text.split()).lower()
    return text.removeprefix("nvidia ").strip()
