"""Packaging: the wheel maps the stage folders into edgekd and carries the YAML profiles."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_stage_packages_and_profiles(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("edgekd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "edgekd/cli/__init__.py",
        "edgekd/distill/__init__.py",
        "edgekd/export/__init__.py",
        "edgekd/runtime/__init__.py",
        "edgekd/profiles/__init__.py",
        "edgekd/models/vlm.py",
        "edgekd/data/llava.py",
    ):
        assert module in names, module
    shipped = {
        Path(n).name for n in names if n.startswith("edgekd/profiles/") and n.endswith(".yaml")
    }
    in_repo = {p.name for p in (ROOT / "profiles").rglob("*.yaml")}
    assert in_repo and shipped == in_repo
