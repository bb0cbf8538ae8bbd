"""llama.cpp's CPU backend: the best variant that a probe proves runs here is loaded and recorded.

The Makefile builds llama-cpp-python with every x86 CPU variant as a loadable library
(``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS``) and installs it with edgekd's loader
(``runtime/ggml_cpu.py``) run by ``import llama_cpp``: variants are probed best-ranked first in
child processes (quantized matrix products through every weight buffer type, AMX included),
one that crashes or computes wrong numbers is skipped, and the verdict is cached. A
llama-cpp-python with its CPU backend linked in (a plain ``pip install``) reports ``builtin``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (the gguf extra)")

from edgekd.runtime import ggml_cpu  # noqa: E402

# A CPU variant that ranks above every real one and dies as an unsupported instruction does:
# ud2, the x86 trap behind "invalid opcode" (SIGILL), when ggml initialises it.
CRASHING_VARIANT = r"""
int ggml_backend_score(void) { return 1 << 30; }
void * ggml_backend_init(void) { __builtin_trap(); return 0; }
"""
# One killed from outside while it is probed (the OOM killer's SIGKILL): no fault of its own.
KILLED_VARIANT = r"""
#include <signal.h>
int ggml_backend_score(void) { return 1 << 30; }
void * ggml_backend_init(void) { raise(SIGKILL); return 0; }
"""


def _build_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.llama_cpp._lib._name).resolve().parent


def _variants() -> list[Path]:
    found = ggml_cpu.variant_libraries(_build_dir())
    if not found:
        pytest.skip("llama-cpp-python has its CPU backend linked in (no GGML_BACKEND_DL)")
    return found


def _compile(source: str, lib: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler to build the simulated variant")
    c = lib.with_suffix(".c")
    c.write_text(source)
    subprocess.run([cc, "-shared", "-fPIC", "-O0", str(c), "-o", str(lib)], check=True)
    return lib


@pytest.fixture
def crashing_variant(tmp_path) -> Path:
    return _compile(CRASHING_VARIANT, tmp_path / "libggml-cpu-crashy.so")


def test_a_crashing_variant_is_skipped_and_the_next_best_is_loaded(crashing_variant, tmp_path):
    real = _variants()
    registry = ggml_cpu.registry_library(_build_dir())
    libraries = [crashing_variant, *real]

    first = ggml_cpu.select(libraries, registry, cache_dir=tmp_path / "cache")
    assert first["cached"] is False and first["variant"] != "crashy"
    assert first["variants"]["crashy"].startswith("skipped: SIGILL"), first["variants"]
    assert first["variants"][first["variant"]] == "passed the probe"
    # the fallback is the variant the real ranking chooses without the crashing one
    alone = ggml_cpu.select(real, registry, cache_dir=tmp_path / "cache-real")
    assert first["variant"] == alone["variant"]
    assert any(c.startswith("q8_0/") for c in first["checks"])

    again = ggml_cpu.select(libraries, registry, cache_dir=tmp_path / "cache")
    assert again["cached"] is True  # probed once per machine and build
    assert {k: again[k] for k in ("variant", "variants")} == {
        k: first[k] for k in ("variant", "variants")
    }


def test_a_variant_killed_from_outside_is_probed_again_and_the_verdict_not_kept(tmp_path):
    real = _variants()
    registry = ggml_cpu.registry_library(_build_dir())
    killed = _compile(KILLED_VARIANT, tmp_path / "libggml-cpu-killed.so")
    first = ggml_cpu.select([killed, *real], registry, cache_dir=tmp_path / "cache")
    assert first["variants"]["killed"].startswith("skipped: SIGKILL"), first["variants"]
    assert first["interrupted"] == ["killed"]  # probed twice before it was skipped
    again = ggml_cpu.select([killed, *real], registry, cache_dir=tmp_path / "cache")
    assert again["cached"] is False and again["variant"] == first["variant"]


def test_a_file_that_is_no_library_is_skipped_with_the_loader_s_reason(tmp_path):
    real = _variants()
    registry = ggml_cpu.registry_library(_build_dir())
    bogus = tmp_path / "libggml-cpu-bogus.so"
    bogus.write_text("not a shared library")
    chosen = ggml_cpu.select([bogus, *real], registry, cache_dir=tmp_path / "cache")
    assert chosen["variants"]["bogus"].startswith("skipped: cannot be loaded"), chosen["variants"]
    assert chosen["variant"] == ggml_cpu.select(real, registry, tmp_path / "real")["variant"]


def test_no_runnable_variant_is_one_clear_error(crashing_variant, tmp_path):
    _variants()
    registry = ggml_cpu.registry_library(_build_dir())
    with pytest.raises(ggml_cpu.NoUsableVariant, match=r"crashy: skipped: SIGILL"):
        ggml_cpu.select([crashing_variant], registry, cache_dir=tmp_path)


def test_the_loaded_variant_passes_the_probe_and_is_recorded():
    from edgekd.envinfo import snapshot
    from edgekd.runtime.llamacpp import import_llama_cpp

    import_llama_cpp()
    variant = ggml_cpu.loaded_variant()
    real = ggml_cpu.variant_libraries(_build_dir())
    recorded = snapshot()["llama_cpp"]
    assert recorded["cpu_variant"] == variant
    assert recorded["system_info"].startswith("CPU :")
    if not real:
        assert variant == "builtin"
        return
    chosen = ggml_cpu.selection()
    assert chosen["variant"] == variant  # exactly one variant, the one selected, is mapped
    assert chosen["variants"][variant] == "passed the probe"
    assert recorded["cpu_variants"] == chosen["variants"]
    # the probe of that library alone, run afresh, passes: every quantized type it checks
    library = next(p for p in real if ggml_cpu.variant_name(p) == variant)
    fresh = ggml_cpu.probe_variants([library], ggml_cpu.registry_library(_build_dir()))
    assert fresh["variant"] == variant
    types = {c.split("/")[0] for c in fresh["checks"]}
    assert {"f16", "q8_0", "q4_0", "q4_k", "q6_k", "bf16"} <= types


PLAIN = r"""
import json, sys
import llama_cpp

src, dst = sys.argv[1], sys.argv[2]
# Q8_0: the weight type whose matrix products take llama.cpp's AMX path where AMX is built
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) == 0
llm = llama_cpp.Llama(model_path=dst, n_ctx=256, n_threads=2, verbose=False)
out = llm.create_completion("Is the shape red?", max_tokens=4, temperature=0.0)
print(json.dumps({
    "tokens": out["usage"]["completion_tokens"],
    "edgekd": sorted(m for m in sys.modules if m.split(".")[0] == "edgekd"),
    "maps": open("/proc/self/maps").read().count("ggml-cpu-"),
}))
"""


def test_plain_llama_cpp_python_runs_an_exported_artifact(gguf_f32_artifact, tmp_path):
    """``llama_cpp.Llama(...)`` as its documentation shows, in a fresh interpreter that never
    imports edgekd, on an artifact edgekd exported (quantized to Q8_0 by llama.cpp itself)."""
    out = subprocess.run(
        [sys.executable, "-c", PLAIN, str(gguf_f32_artifact / "model.gguf"),
         str(tmp_path / "q8_0.gguf")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["edgekd"] == []
    assert result["tokens"] >= 1
    if ggml_cpu.variant_libraries(_build_dir()):
        assert result["maps"] >= 1  # a CPU variant was loaded by import llama_cpp alone


def test_the_patched_wheel_loads_its_variant_on_import_and_records_every_file(tmp_path):
    """patch_wheel on a minimal llama-cpp-python wheel: the loader and the import hook added,
    RECORD rewritten with each file's real hash and size (pip checks them), and patching twice
    changes nothing."""
    import base64
    import hashlib
    import zipfile

    src = tmp_path / "in" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    src.parent.mkdir()
    record = "llama_cpp_python-0.3.36.dist-info/RECORD"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("llama_cpp/__init__.py", "from .llama_cpp import *\n")
        z.writestr("llama_cpp/lib/libggml-cpu-x64.so", b"\x7fELF")
        z.writestr(record, "stale\n")
    from edgekd.runtime.llama_wheel import patch_wheel

    once = patch_wheel(src, tmp_path / "once")
    twice = patch_wheel(once, tmp_path / "twice")
    for wheel in (once, twice):
        with zipfile.ZipFile(wheel) as z:
            init = z.read("llama_cpp/__init__.py").decode()
            assert init.count("_cpu_variant.load(") == 1 and init.startswith("from .llama_cpp")
            assert z.read("llama_cpp/_cpu_variant.py") == Path(ggml_cpu.__file__).read_bytes()
            assert z.read("llama_cpp/_cpu_variant_probe.py") == ggml_cpu.probe_script().read_bytes()
            rows = [r.split(",") for r in z.read(record).decode().splitlines()]
            assert {r[0] for r in rows} == set(z.namelist())
            for name, digest, size in rows:
                if name == record:
                    assert digest == size == ""
                    continue
                data = z.read(name)
                want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                assert (digest, int(size)) == (f"sha256={want.decode()}", len(data))
