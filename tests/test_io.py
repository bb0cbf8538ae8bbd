"""Filesystem helpers: full disks named as such, umask honoured, local paths never hub ids."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from edgekd import io
from edgekd.errors import DataError, DiskFullError


def test_full_disk_errors_become_one_disk_full_error(tmp_path, monkeypatch):
    enospc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    full = io.disk_full(enospc, tmp_path)
    assert isinstance(full, DiskFullError) and full.errno == errno.ENOSPC
    assert "disk is full" in str(full) and str(tmp_path) in str(full)
    rust = RuntimeError("Error while serializing: I/O error: No space left (os error 28)")
    assert isinstance(io.disk_full(rust, tmp_path), DiskFullError)
    # torch's serializer gives no errno: the free space left decides
    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 5 vs 4")
    assert io.disk_full(torch_style, tmp_path) is None  # this disk has room: a real error
    monkeypatch.setattr(io, "_free_bytes", lambda path: 4096)
    assert isinstance(io.disk_full(torch_style, tmp_path), DiskFullError)
    assert io.disk_full(OSError(errno.EIO, "I/O error"), tmp_path) is None


def test_writing_reraises_other_errors_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with io.writing(tmp_path):
            raise KeyError("a bug")
    with pytest.raises(DiskFullError, match="disk is full"):
        with io.writing(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_write_honours_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        io.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode


@pytest.mark.parametrize(
    "text,local",
    [
        ("./student", True),
        ("../student", True),
        ("/abs/student", True),
        ("~/student", True),
        ("runs/student/model", True),
        ("student/", True),
        ("Qwen/Qwen2-0.5B", False),
    ],
)
def test_paths_written_as_paths_are_local(text, local):
    assert io.looks_local(text) is local
    assert io.is_hub_id(text) is (not local)


def test_a_local_folder_name_makes_org_slash_name_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert io.is_hub_id("runs/typo")
    (tmp_path / "runs").mkdir()
    assert not io.is_hub_id("runs/typo")  # runs/ is here: a typo, not a hub id
    assert not io.is_hub_id("student")  # a bare name is a folder here, not a hub model


@pytest.mark.parametrize(
    "name,reason",
    [("a\0b.png", "null byte"), ("x" * 300 + ".png", "too long"), ("loop.png", "loop")],
)
def test_names_the_system_cannot_open_are_data_errors(tmp_path, name, reason):
    os.symlink("loop.png", tmp_path / "loop.png")
    with pytest.raises(DataError, match=f"cannot be opened: .*{reason}"):
        io.safe_join(tmp_path, name)
