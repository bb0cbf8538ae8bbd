"""The test command itself: a test process that dies or hangs fails the run quickly.

``make test`` runs pytest with the options below (read from the Makefile, so this follows any
change to them) on two throwaway suites laid out like edgekd's: an ``xdist_group`` beside
ordinary tests. pytest-xdist 3.8's loadgroup scheduler can wait forever for a worker that
replaced a crashed one; ``--max-worker-restart=0`` ends the run at the first death instead, and
pyproject's per-test timeout (``timeout_method = thread``) turns a hang into such a death.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("xdist", reason="needs pytest-xdist (the dev extra)")
pytest.importorskip("pytest_timeout", reason="needs pytest-timeout (the dev extra)")

ROOT = Path(__file__).resolve().parents[1]

GROUPED = """
import pytest

@pytest.mark.xdist_group("distributed")
def test_grouped_1():
    pass

@pytest.mark.xdist_group("distributed")
def test_grouped_2():
    pass
"""
ORDINARY = "".join(f"def test_ordinary_{i}():\n    pass\n\n" for i in range(12))
CRASH = "import os, signal\n\ndef test_dies():\n    os.kill(os.getpid(), signal.SIGILL)\n"
HANG = "import time\n\ndef test_hangs():\n    time.sleep(600)\n"


def _make_test_args() -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    command = re.search(r"-m pytest (.*)", recipe).group(1)
    return shlex.split(command)


def _run_suite(tmp_path: Path, bad: str, extra: list[str]):
    for name, text in {"test_a.py": GROUPED, "test_b.py": bad, "test_c.py": ORDINARY}.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not edgekd's config or conftest
    started = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", *_make_test_args(), "-p", "no:cacheprovider", *extra]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    return out, time.monotonic() - started


def test_a_worker_that_dies_fails_the_run_at_once(tmp_path):
    out, seconds = _run_suite(tmp_path, CRASH, [])
    assert out.returncode != 0, out.stdout[-2000:]
    assert "crashed while running 'test_b.py::test_dies'" in out.stdout, out.stdout[-2000:]
    assert seconds < 120


def test_a_hanging_test_is_stopped_by_the_per_test_timeout(tmp_path):
    pyproject = (ROOT / "pyproject.toml").read_text()
    limit = int(re.search(r"^timeout = (\d+)$", pyproject, re.M).group(1))
    method = re.search(r'^timeout_method = "(\w+)"$', pyproject, re.M).group(1)
    assert 0 < limit <= 600 and method == "thread"  # thread: a hang in native code too
    out, seconds = _run_suite(tmp_path, HANG, ["-o", "timeout=3", "-o", f"timeout_method={method}"])
    assert out.returncode != 0, out.stdout[-2000:]
    # the worker was ended by the timeout: the test would sleep for 600 s
    assert "crashed while running 'test_b.py::test_hangs'" in out.stdout, out.stdout[-2000:]
    assert seconds < 120
