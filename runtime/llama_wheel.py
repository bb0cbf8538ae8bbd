"""llama-cpp-python's wheel, as edgekd installs it: the compiled wheel plus the CPU-variant loader.

A llama.cpp built with ``GGML_BACKEND_DL`` registers no CPU backend by itself, so plain
``llama_cpp.Llama(...)`` fails with "Failed to load model from file" until someone loads one.
The Makefile compiles the wheel once per machine and installs a copy made here: ``ggml_cpu.py``
and ``ggml_cpu_probe.py`` (beside this file) as ``llama_cpp/_cpu_variant.py`` and
``_cpu_variant_probe.py``, and :data:`INIT_HOOK` at the end of
``llama_cpp/__init__.py``, so ``import llama_cpp`` loads the best CPU variant that passes the
probe, for every program that uses llama-cpp-python (its server, LangChain, LlamaIndex), edgekd
or not. Standard library only: the Makefile runs it before edgekd is installed.

    python runtime/llama_wheel.py WHEEL OUT_DIR
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

# the loader and the probe its children run, under the names the loader finds its probe by
FILES = {
    "llama_cpp/_cpu_variant.py": Path(__file__).with_name("ggml_cpu.py"),
    "llama_cpp/_cpu_variant_probe.py": Path(__file__).with_name("ggml_cpu_probe.py"),
}
INIT_HOOK = """
# Added by edgekd's build: this llama.cpp ships its CPU backend as one library per CPU
# feature level (GGML_BACKEND_DL); load the best one that a probe proves runs on this machine.
from . import _cpu_variant as _cpu_variant
from .llama_cpp import _lib as _cpu_variant_lib

_cpu_variant.load(_cpu_variant_lib)
del _cpu_variant_lib
"""


def patch_wheel(source: str | Path, out_dir: str | Path) -> Path:
    """A copy of llama-cpp-python's wheel ``source`` in ``out_dir`` that loads its CPU variant
    on ``import llama_cpp`` (the loader added, the hook appended once, RECORD rewritten with
    every file's hash and size, as pip checks them)."""
    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        names = zin.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        files = {n: zin.read(n) for n in names if n != record}
        if "llama_cpp/_cpu_variant.py" not in files:
            files["llama_cpp/__init__.py"] += INIT_HOOK.encode()
        files.update({name: path.read_bytes() for name, path in FILES.items()})
        rows = []
        for name, data in files.items():
            info = zin.getinfo(name) if name in names else zipfile.ZipInfo(name)
            if name not in names:
                info.external_attr = 0o644 << 16
            zout.writestr(info, data, zipfile.ZIP_DEFLATED)
            if not name.endswith("/"):
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                rows.append((name, f"sha256={digest.decode()}", len(data)))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([*rows, (record, "", "")])
        zout.writestr(zin.getinfo(record), text.getvalue())
    os.replace(tmp, target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python runtime/llama_wheel.py WHEEL OUT_DIR")
    print(patch_wheel(sys.argv[1], sys.argv[2]))
