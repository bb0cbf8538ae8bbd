"""The llama.cpp source edgekd compiles: the release sdist with the llava graph's class-token fix.

That the compiled library has the fix is measured elsewhere (``gguf_probe``, in
tests/export/test_family.py); these check the patch step the Makefile runs.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgekd.runtime.llama_source import FIX, GRAPH, patch_graph, prepare

SCRIPT = Path(__file__).parents[2] / "runtime" / "llama_source.py"
GRAPH_TEXT = f"""    ggml_tensor * inp = build_inp();

    // concat class_embeddings and patch_embeddings
    if (model.class_embedding) {{
        {FIX[0]}
    }}
"""


def _sdist(path: Path, graph: str) -> Path:
    """A stand-in sdist: the release's top folder with the llava graph and one other file."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in ((GRAPH, graph), ("pyproject.toml", "[project]\nname = 'x'\n")):
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_class_embedding_is_concatenated_first():
    fixed = patch_graph(GRAPH_TEXT)
    assert FIX[1] in fixed and FIX[0] not in fixed
    assert fixed.replace(FIX[1], FIX[0]) == GRAPH_TEXT  # nothing else changes


@pytest.mark.parametrize(
    "text,message",
    [
        ("int main() {}\n", "found 0 times"),
        (GRAPH_TEXT + GRAPH_TEXT, "found 2 times"),
        (GRAPH_TEXT.replace(FIX[0], FIX[1]), "already fixed"),
    ],
)
def test_another_graph_is_refused_not_patched_blindly(text, message):
    with pytest.raises(ValueError, match=message):
        patch_graph(text)


def test_prepare_unpacks_and_fixes_the_sdist(tmp_path):
    root = prepare(_sdist(tmp_path / "src.tar.gz", GRAPH_TEXT), tmp_path / "out")
    assert root == tmp_path / "out" / "llama_cpp_python-0.3.36"
    assert FIX[1] in (root / GRAPH).read_text()
    assert (root / "pyproject.toml").exists()


def test_the_makefiles_command_fails_in_one_line(tmp_path):
    sdist = _sdist(tmp_path / "src.tar.gz", "no graph here\n")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(sdist), str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "found 0 times" in run.stderr
    ok = subprocess.run(
        [sys.executable, str(SCRIPT), str(_sdist(tmp_path / "ok.tar.gz", GRAPH_TEXT)),
         str(tmp_path / "ok")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(ok.stdout.strip()) == tmp_path / "ok" / "llama_cpp_python-0.3.36"
