"""llama.cpp's CPU backend: the variant for this CPU is loaded and recorded.

The Makefile builds llama-cpp-python with every x86 CPU variant as a loadable library
(``GGML_BACKEND_DL`` + ``GGML_CPU_ALL_VARIANTS``); edgekd loads the best one from the package's
``lib/`` before any model, and benchmark snapshots name it. A llama-cpp-python with its CPU
backend linked in (a plain ``pip install``) reports ``builtin``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (the gguf extra)")


def test_the_loaded_cpu_variant_is_one_of_the_shipped_ones_and_is_recorded():
    from edgekd.envinfo import snapshot
    from edgekd.runtime.llamacpp import cpu_variant, cpu_variants, import_llama_cpp

    llama_cpp = import_llama_cpp()
    shipped = {p.name.split("ggml-cpu-", 1)[1].split(".")[0] for p in cpu_variants(llama_cpp)}
    variant = cpu_variant()
    if shipped:
        assert variant in shipped  # exactly one variant, the best scoring, is mapped
    else:
        assert variant == "builtin"
    recorded = snapshot()["llama_cpp"]
    assert recorded["cpu_variant"] == variant
    assert recorded["system_info"].startswith("CPU :")


def test_a_model_loads_in_a_fresh_process(gguf_f32_artifact):
    """The variant is loaded before llama.cpp's first model, in a process that imports nothing
    else first (the registry starts empty in a GGML_BACKEND_DL build)."""
    code = (
        "import llama_cpp\n"
        "from edgekd.runtime.llamacpp import LlamaCppBackend, cpu_variant, cpu_variants\n"
        f"b = LlamaCppBackend({str(gguf_f32_artifact)!r}, n_threads=1)\n"
        "g = b.generate(None, 'Say yes.', max_new_tokens=2)\n"
        "names = [p.name.split('ggml-cpu-', 1)[1].split('.')[0] for p in cpu_variants(llama_cpp)]\n"
        "print(cpu_variant(), ','.join(names) or 'builtin', len(g.token_ids))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    variant, shipped, tokens = out.stdout.split()[-3:]
    assert variant in shipped.split(",") and int(tokens) >= 1
