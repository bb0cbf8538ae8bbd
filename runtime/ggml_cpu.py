"""llama.cpp's CPU backend variants: load the best one that is proven to run on this machine.

A llama.cpp built with ``GGML_BACKEND_DL`` and ``GGML_CPU_ALL_VARIANTS`` ships its CPU backend
as one library per x86 (or Arm) feature level: ``libggml-cpu-x64.so`` ... ``-zen4.so``,
``-sapphirerapids.so``. ggml ranks them by CPUID alone, and CPUID is not proof: a virtual
machine can advertise AMX and still fault on its tile instructions, so the best-ranked variant
dies with SIGILL on the first quantized matrix product. This module:

1. ranks the variants by ggml's own score, in a child process;
2. probes them best first, in a child process (``ggml_cpu_probe.py`` beside this file):
   quantized matrix products (every weight type llama.cpp's quantizer writes, at 1 and 32 rows)
   through every buffer type llama.cpp would put weights in with that variant (the default one
   and the variant's extra ones: AMX, repacked), each checked against numpy;
3. keeps the first variant that passes, records why the better-ranked ones were skipped, caches
   the verdict per machine (CPU, kernel, libraries), and loads that variant into the process's
   ggml registry.

The module depends on nothing but the standard library (numpy in the probe child, which
llama-cpp-python requires anyway) and imports nothing of edgekd, so the same two files also
ship inside the llama-cpp-python wheel edgekd's Makefile builds
(:mod:`edgekd.runtime.llama_wheel`: ``llama_cpp/_cpu_variant.py`` and
``_cpu_variant_probe.py``, run by ``import llama_cpp``). Plain llama-cpp-python, its server and
every program built on it then work in edgekd's environment with no further step.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

PROBE_VERSION = 1
PROBE_TIMEOUT_S = 120
# which library names hold ggml's backend registry (ggml_backend_load), in the order tried
REGISTRY_NAMES = ("libggml.so.0", "libggml.so", "libggml.dylib", "ggml.dll")

SELECTED: dict | None = None  # what load() chose in this process (also in the cache file)


class NoUsableVariant(RuntimeError):
    """No CPU variant of this llama.cpp build passes the probe on this machine."""


def variant_name(path: str | Path) -> str:
    """``zen4`` for ``.../libggml-cpu-zen4.so``."""
    return re.sub(r"^(lib)?ggml-cpu-", "", Path(path).name).split(".")[0]


def variant_libraries(lib_dir: str | Path) -> list[Path]:
    """The CPU variant libraries in ``lib_dir``: empty for a build whose CPU backend is linked
    in (no ``GGML_BACKEND_DL``)."""
    lib = Path(lib_dir)
    return sorted(lib.glob("libggml-cpu-*.so")) + sorted(lib.glob("ggml-cpu-*.dll"))


def other_backends(lib_dir: str | Path) -> list[Path]:
    """The build's backends other than the CPU (``libggml-cuda.so``, ``libggml-vulkan.so``, ...):
    neither the CPU variants nor ggml's own libraries."""
    lib = Path(lib_dir)
    found = sorted(lib.glob("libggml-*.so")) + sorted(lib.glob("ggml-*.dll"))
    name = re.compile(r"^(lib)?ggml-(base|cpu)\b")
    return [p for p in found if not name.match(p.name)]


def registry_library(lib_dir: str | Path) -> Path:
    """The ggml library of ``lib_dir`` that holds the backend registry."""
    for name in REGISTRY_NAMES:
        if (Path(lib_dir) / name).is_file():
            return Path(lib_dir) / name
    raise NoUsableVariant(f"no ggml library ({', '.join(REGISTRY_NAMES)}) in {lib_dir}")


def loaded_variant() -> str | None:
    """The CPU variant this process's llama.cpp runs (``zen4``), read from the libraries it
    has mapped; ``builtin`` for a build with its CPU backend linked in; ``None`` before
    ``llama_cpp`` is imported (or where the mapped libraries cannot be read)."""
    llama = sys.modules.get("llama_cpp.llama_cpp")
    if llama is None:
        return None
    if not variant_libraries(Path(llama._lib._name).resolve().parent):
        return "builtin"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = sorted(set(re.findall(r"ggml-cpu-([A-Za-z0-9_.]+)\.(?:so|dll)", maps)))
    return ",".join(found) or None


def selection() -> dict | None:
    """The selection behind this process's variant (:func:`select`), from whichever copy of
    this module loaded it: the wheel's (``import llama_cpp``) or edgekd's."""
    for name in ("llama_cpp._cpu_variant", __name__):
        found = getattr(sys.modules.get(name), "SELECTED", None)
        if found:
            return found
    return None


# -------------------------------------------------------------------------------- the parent


def load(ggml: ctypes.CDLL, cache_dir: str | Path | None = None) -> dict | None:
    """Load the best CPU variant that passes the probe into ``ggml``'s registry, once.

    ``ggml`` is a handle whose symbols resolve to the ggml that llama.cpp uses (libllama's
    handle: ``llama_cpp.llama_cpp._lib``); the variants are looked for beside it. Returns the
    selection (:func:`select`), or ``None`` for a build with its CPU backend linked in or a
    registry that already holds a backend. Raises :class:`NoUsableVariant`.
    """
    global SELECTED
    # ggml["name"]: function pointers of our own, whatever signatures others set on the handle
    reg_count = ggml["ggml_backend_reg_count"]
    reg_count.restype = ctypes.c_size_t
    if reg_count() > 0:
        return SELECTED
    lib_dir = Path(ggml._name).resolve().parent
    libraries = variant_libraries(lib_dir)
    if not libraries:
        return None
    selection = select(libraries, registry_library(lib_dir), cache_dir)
    backend_load = ggml["ggml_backend_load"]
    backend_load.restype, backend_load.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    with _quiet(ggml):  # no "load_backend: loaded CPU backend from ..." on every import
        if not backend_load(str(selection["library"]).encode()):
            raise NoUsableVariant(f"llama.cpp could not load {selection['library']}")
        # llama.cpp looks for its other backends only while none is registered: load them too
        for other in other_backends(lib_dir):
            backend_load(str(other).encode())
    SELECTED = selection
    return selection


def select(
    libraries: list[Path], registry: Path, cache_dir: str | Path | None = None
) -> dict:
    """The best variant of ``libraries`` that passes the probe: from the cache when this
    machine and these libraries were probed before, else probed now (children of this process,
    one per crash) and cached.

    Returns ``{"variant", "library", "variants": {name: verdict}, "checks", "probe_s",
    "cached"}``; ``variants`` says, for each library, ``passed the probe``, why it was skipped (the
    signal or the wrong result of its probe, or the CPU's missing features) or that a
    better-ranked variant was chosen first.
    """
    libraries = [Path(p) for p in libraries]
    cache = _cache_file(libraries, registry, cache_dir)
    found = _read_cache(cache, libraries)
    if found is not None:
        return {**found, "cached": True}
    with _lock(cache):
        found = _read_cache(cache, libraries)  # another process probed while this one waited
        if found is not None:
            return {**found, "cached": True}
        started = time.perf_counter()
        selection = probe_variants(libraries, registry)
        selection["probe_s"] = round(time.perf_counter() - started, 3)
        if not selection["interrupted"]:  # a verdict after an interruption is not kept
            _write_cache(cache, selection)
    return {**selection, "cached": False}


def probe_variants(libraries: list[Path], registry: Path) -> dict:
    """Probe ``libraries`` best-ranked first in child processes; a child that dies takes the
    variant it was probing with it and the next child goes on without it."""
    verdicts: dict[str, str] = {}
    remaining = [str(p) for p in libraries]
    interrupted: set[str] = set()  # probed again once after a death that was not a crash
    while remaining:
        events, died, crash, stderr = _run_child(registry, remaining)
        current = check = None  # the library (and product) the child was on when it stopped
        for event in events:
            if "probing" in event:
                current, check = event["probing"], None
            elif "check" in event:
                check = event["check"]
            elif "scores" in event:
                current = None
                for path, score in event["scores"].items():
                    if score <= 0:
                        verdicts[variant_name(path)] = "skipped: this CPU lacks its features"
            elif "failed" in event:
                verdicts[variant_name(event["failed"])] = f"skipped: {event['why']}"
                remaining.remove(event["failed"])
                current = None
            elif "passed" in event:
                chosen = event["passed"]
                unprobed = "not probed: a better-ranked variant passed"
                for path in libraries:
                    verdicts.setdefault(variant_name(path), unprobed)
                verdicts[variant_name(chosen)] = "passed the probe"
                return {
                    "variant": variant_name(chosen),
                    "library": chosen,
                    "variants": {variant_name(p): verdicts[variant_name(p)] for p in libraries},
                    "checks": event["checks"],
                    "interrupted": sorted(variant_name(p) for p in interrupted),
                }
        if died is None:  # the child went through every remaining variant: none passed
            break
        if current is None or died.startswith("exit status"):
            # it stopped outside any variant, or on an error of its own: no verdict on one
            raise NoUsableVariant(f"the llama.cpp CPU probe failed ({died}): {stderr}")
        if not crash and current not in interrupted:
            interrupted.add(current)  # killed from outside, or slow: once more
            continue
        where = ""
        if check:  # type/buffer/rows
            where = " ({} weights in {}, rows {})".format(*check.split("/"))
        verdicts[variant_name(current)] = f"skipped: {died} in the probe{where}"
        remaining.remove(current)
    reasons = "; ".join(f"{name}: {why}" for name, why in verdicts.items())
    raise NoUsableVariant(f"no llama.cpp CPU variant runs on this machine ({reasons})")


# How a probe child dies when its variant cannot run here (a fault of the code it ran): the
# POSIX signals, and Windows' exception codes as exit statuses. Any other death (SIGKILL from
# the OOM killer, SIGTERM, a timeout) says nothing about the variant: it is probed again.
CRASH_SIGNALS = ("SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGABRT", "SIGSYS")
WINDOWS_CRASHES = {
    0xC000001D: "STATUS_ILLEGAL_INSTRUCTION",
    0xC0000096: "STATUS_PRIVILEGED_INSTRUCTION",
    0xC0000005: "STATUS_ACCESS_VIOLATION",
}


def probe_script() -> Path:
    """The probe the children run: this file's ``_probe`` sibling (``ggml_cpu_probe.py`` in
    edgekd, ``_cpu_variant_probe.py`` in llama-cpp-python)."""
    here = Path(__file__).resolve()
    return here.with_name(f"{here.stem}_probe.py")


def _run_child(registry: Path, candidates: list[str]) -> tuple[list[dict], str | None, bool, str]:
    """One probe child over ``candidates``: its events, how it died (None: exit 0), whether
    that death was a crash, and the last line it wrote to stderr."""
    if not sys.executable or getattr(sys, "frozen", False):
        raise NoUsableVariant(
            "cannot probe llama.cpp's CPU variants: this process has no Python executable to "
            "run the probe with"
        )
    # -c with the working directory taken off sys.path (where a numpy.py or json.py may be);
    # the environment, user site and PYTHONPATH stay the parent's. run_path keeps sys.path.
    boot = "import sys\nif sys.path and sys.path[0] in ('', '.'):\n    del sys.path[0]\n"
    boot += f"import runpy\nsys.argv[0] = {str(probe_script())!r}\n"
    boot += "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    cmd = [sys.executable, "-c", boot, "probe", str(registry), *candidates]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=PROBE_TIMEOUT_S
        )
        stdout, stderr, code = out.stdout, out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        stderr, code = "", f"no answer within {PROBE_TIMEOUT_S} s"
    except OSError as e:
        raise NoUsableVariant(f"cannot start the llama.cpp CPU probe: {e}") from None
    events = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):  # a library may print to stdout too
                events.append(json.loads(line))
    crash = False
    if isinstance(code, str):
        died = code
    elif code < 0:
        try:
            died = f"{signal.Signals(-code).name} ({signal.strsignal(-code)})"
        except ValueError:  # a real-time signal
            died = f"signal {-code}"
        crash = died.split(" ")[0] in CRASH_SIGNALS
    elif code in WINDOWS_CRASHES:
        died, crash = WINDOWS_CRASHES[code], True
    elif code:
        died = f"exit status {code}"
    else:
        died = None
    last = (stderr.strip().splitlines() or [""])[-1]
    return events, died, crash, last


# ----------------------------------------------------------------------------- cache and logs


def _cache_file(libraries: list[Path], registry: Path, cache_dir) -> Path | None:
    """One verdict per machine and build: the CPU (model and flags), the machine (host name and
    machine id), the kernel (which grants AMX and AVX-512 state) and the libraries (path, size,
    mtime)."""
    cpu = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        wanted = re.compile(r"(model name|flags|Features)\b")
        cpu = "\n".join(sorted({line for line in text.splitlines() if wanted.match(line)}))
    files = []
    for path in [*libraries, registry]:
        st = Path(path).stat()
        files.append(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    machine = platform.node()  # machines sharing a home may share CPUID, not the hypervisor
    with contextlib.suppress(OSError):
        machine += Path("/etc/machine-id").read_text().strip()
    key = [PROBE_VERSION, cpu, machine, platform.release(), sys.platform, sorted(files)]
    key = json.dumps(key)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    try:
        base = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (RuntimeError, KeyError):  # no home directory: probe every time
        return None
    return Path(base) / ("" if cache_dir else "edgekd") / "llama-cpu-variant" / f"{digest}.json"


def _read_cache(path: Path | None, libraries: list[Path]) -> dict | None:
    """The cached selection, if it names one of ``libraries`` (a cache file is never trusted
    to name a library to load that is not a variant of this build)."""
    try:
        found = json.loads(path.read_text()) if path else None
    except (OSError, ValueError):
        return None
    names = {str(p) for p in libraries}
    ok = isinstance(found, dict) and found.get("library") in names and "variants" in found
    return found if ok else None


def _write_cache(path: Path | None, selection: dict) -> None:
    """Best effort: a machine whose cache cannot be written probes again next time."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(selection, indent=1))
        os.replace(tmp, path)


@contextlib.contextmanager
def _lock(cache: Path | None, wait_s: float = 2 * PROBE_TIMEOUT_S):
    """Processes starting together (test workers, a server's workers) probe once: the others
    wait for the verdict, at most ``wait_s``; where files cannot be locked, each probes."""
    handle = None
    try:
        import fcntl

        cache.parent.mkdir(parents=True, exist_ok=True)
        handle = open(cache.with_suffix(".lock"), "w")  # noqa: SIM115
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break  # a stuck holder: probe without the lock
                time.sleep(0.05)
    except (ImportError, OSError, AttributeError):
        pass  # no fcntl (Windows), no cache, or a file system without locks
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


_LOG = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_SILENT = _LOG(lambda level, text, user_data: None)


@contextlib.contextmanager
def _quiet(ggml):
    """ggml's log silenced, then given back to whoever had it (llama-cpp-python's logger)."""
    callback, user_data = ctypes.c_void_p(), ctypes.c_void_p()
    log_get, log_set = ggml["ggml_log_get"], ggml["ggml_log_set"]
    log_get.restype, log_set.restype = None, None
    log_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    log_get(ctypes.byref(callback), ctypes.byref(user_data))
    log_set(ctypes.cast(_SILENT, ctypes.c_void_p), None)
    try:
        yield
    finally:
        log_set(callback, user_data)


def main(argv: list[str]) -> int:
    if argv[:1] == ["select"] and len(argv) == 2:
        libs = variant_libraries(argv[1])
        print(json.dumps(select(libs, registry_library(argv[1])), indent=1))
        return 0
    print("usage: ggml_cpu.py select LIB_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
