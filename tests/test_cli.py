"""The CLI: fast help, every stage listed, user errors as one line with a non-zero exit."""

from __future__ import annotations

import re
import subprocess
import sys


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgekd", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    commands = (
        "distill",
        "export",
        "bench",
        "plan",
        "data",
        "convert",
        "profiles",
        "demo",
        "models",
    )
    # names in the commands table (a line "│ NAME  description"), not anywhere in the text
    listed = set(re.findall(r"^│ ([a-z][a-z-]*)\s", result.stdout, flags=re.MULTILINE))
    for command in commands:
        assert command in listed, result.stdout


def test_cli_import_stays_light():
    # `edgekd --help` must not pay for torch/transformers: heavy imports live inside commands.
    code = "import sys, edgekd.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_profile_lists_valid_ones():
    assert_one_line_error(
        run_cli("profiles", "show", "jetson-xavier"), "jetson-xavier", "jetson-orin-nano-8gb"
    )


def test_profiles_list_and_show():
    listed = run_cli("profiles", "list")
    assert listed.returncode == 0, listed.stderr
    for name in ("jetson-agx-orin-64gb", "cpu-x86_64", "tinyllava-3b-to-0.5b", "easyvqa-cpu"):
        assert name in listed.stdout
    shown = run_cli("profiles", "show", "jetson-orin-nano-8gb")
    assert shown.returncode == 0, shown.stderr
    assert "memory_bandwidth_gbps" in shown.stdout


def test_models_create_and_info(tmp_path):
    out = tmp_path / "tiny"
    created = run_cli("models", "create", "tiny", str(out))
    assert created.returncode == 0, created.stderr
    assert (out / "model.safetensors").exists()
    info = run_cli("models", "info", str(out))
    assert info.returncode == 0, info.stderr
    assert "visual tokens" in info.stdout
    again = run_cli("models", "create", "tiny", str(out))
    assert_one_line_error(again, str(out), "--overwrite")


def test_models_create_unknown_size():
    assert_one_line_error(
        run_cli("models", "create", "huge", "/tmp/never-written"),
        "unknown model size 'huge'",
        "tiny, small, base",
    )


def test_existing_data_output_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    assert_one_line_error(run_cli("data", "easy-vqa", str(tmp_path)), "--overwrite")
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
