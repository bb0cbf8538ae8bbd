"""llama-cpp-python's source, as edgekd compiles it: the release sdist with one fix to clip.

llama.cpp's llava graph (``tools/mtmd/models/llava.cpp``, llama.cpp since PR #13321, every
llama-cpp-python release up to 0.3.36) appends a tower's class embedding *after* its patches,
while the position rows it adds and the rows it keeps afterwards both assume the class
embedding comes first (llama.cpp issue #25814). A CLIP or DINOv2 tower run by it emits patches
2..N and the class token where the model has patches 1..N. The fix (upstream PR #25844) swaps
the operands of that one concatenation; :data:`FIX` is that line, before and after.

:func:`prepare` unpacks the sdist and applies it, failing loudly when the line is not found
exactly once (another release: re-check the graph, then update :data:`FIX`). Whether the
llama.cpp a program loads has the fix is measured, not assumed:
``edgekd.export.gguf_probe.class_token_order`` runs a tiny class-token mmproj through it.
Standard library only: the Makefile runs it before edgekd is installed.

    python runtime/llama_source.py SDIST OUT_DIR    # prints the patched source directory
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

GRAPH = "vendor/llama.cpp/tools/mtmd/models/llava.cpp"
FIX = (
    "inp = ggml_concat(ctx0, inp, model.class_embedding, 1);",
    "inp = ggml_concat(ctx0, model.class_embedding, inp, 1);",
)


def patch_graph(text: str) -> str:
    """``text`` of llava.cpp with the class embedding concatenated before the patches."""
    before, after = FIX
    if text.count(before) != 1:
        found = "already fixed" if after in text else f"found {text.count(before)} times"
        raise ValueError(f"{GRAPH}: expected the line {before!r} once ({found})")
    return text.replace(before, after)


def prepare(sdist: str | Path, out_dir: str | Path) -> Path:
    """Unpack ``sdist`` into ``out_dir`` and fix its llava graph; returns the source tree."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(out_dir, filter="data")
        root = out_dir / tar.getnames()[0].split("/")[0]
    graph = root / GRAPH
    graph.write_text(patch_graph(graph.read_text()))
    return root


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python runtime/llama_source.py SDIST OUT_DIR")
    try:
        print(prepare(sys.argv[1], sys.argv[2]))
    except (OSError, ValueError, tarfile.TarError) as err:
        sys.exit(f"error: {err}")
