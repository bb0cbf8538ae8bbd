"""The output guard: checks before work, one writer per output, leftovers cleaned, safe swaps."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from fault_helpers import leftovers, snapshot

from edgekd.errors import OutputError, OutputExistsError
from edgekd.outputs import DataRoot, check_output, lock_path, output_guard, output_lock


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_and_under_a_file_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(OutputError, match=r"'.*notes\.txt' is an existing file"):
        check_output(f, overwrite=True)
    with pytest.raises(OutputError, match=r"lies under '.*notes\.txt', which is a file"):
        check_output(f / "sub" / "out")
    assert f.read_text() == "mine"


def test_working_directory_and_its_parents_refused(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(OutputError, match="working directory"):
            check_output(out, overwrite=True)


@pytest.mark.parametrize(
    "out,message",
    [
        ("model", "is the input"),  # equal
        (".", "contains the input"),  # around (the run dir holds the model)
        ("model/onnx", "lies inside the input"),  # inside
    ],
)
def test_output_overlapping_an_input_names_both(tmp_path, out, message):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    before = snapshot(run)
    target = run / out
    with pytest.raises(OutputError, match=message) as e:
        check_output(target, overwrite=True, inputs=[run / "model", None, "org/hub-id"])
    assert str(target) in str(e.value) and str(run / "model") in str(e.value)
    assert snapshot(run) == before


def test_a_link_as_output_is_refused(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="is a symbolic link"):
        check_output(tmp_path / "dangling", overwrite=True)
    assert (tmp_path / "dangling").is_symlink() and not (tmp_path / "nowhere").exists()


def test_an_output_may_lie_inside_a_data_root_but_not_replace_it(tmp_path):
    """Images are read by name: a report under the eval set's folder is fine."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(b"png")
    inputs = [DataRoot(str(tmp_path)), DataRoot(str(tmp_path / "images"))]
    check_output(tmp_path / "report", overwrite=False, inputs=inputs)
    for out, message in ((tmp_path / "images", "is the input"), (tmp_path, "is the input")):
        with pytest.raises(OutputError, match=message):
            check_output(out, overwrite=True, inputs=inputs)
    with pytest.raises(OutputError, match="lies inside the input"):  # a model folder: refused
        check_output(tmp_path / "report", overwrite=False, inputs=[str(tmp_path)])


def test_existing_output_needs_overwrite_and_empty_dir_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output(tmp_path / "full")
    assert check_output(tmp_path / "full", reuse=True) == tmp_path / "full"


def test_build_failure_keeps_the_old_output_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ZeroDivisionError):
        with output_guard(out, overwrite=True) as guard, guard.build() as tmp:
            (tmp / "new.txt").write_text("half")
            raise ZeroDivisionError("a bug in the writer")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old" and leftovers(out) == []
    with output_guard(out, overwrite=True) as guard, guard.build() as tmp:
        (tmp / "new.txt").write_text("whole")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and leftovers(out) == []


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom edgekd.outputs import output_lock\n"
            "with output_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n"
            "    time.sleep(60)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"another edgekd run \(pid {holder.pid}\)"):
            with output_guard(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_guard(out) as guard, guard.build() as tmp:  # the dead holder's lock is free
        (tmp / "x").write_text("x")
    assert not lock_path(out).exists()


def test_lock_in_this_process_also_excludes(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        assert lock_path(out).read_text().strip() == str(os.getpid())
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
            with output_lock(out):
                pass
    assert not lock_path(out).exists()


def test_leftovers_of_killed_runs_are_cleaned_and_a_cut_swap_restored(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.tmp-abc123").mkdir()
    (tmp_path / ".out.tmp-abc123" / "half.onnx").write_text("x")
    (tmp_path / ".out.old-4242").mkdir()  # killed between the two renames of a swap
    (tmp_path / ".out.old-4242" / "previous.txt").write_text("previous")
    (tmp_path / ".other.tmp-1").mkdir()  # another output's: not ours to touch
    with output_guard(out, overwrite=True):
        assert (out / "previous.txt").read_text() == "previous"
        assert leftovers(out) == [".out.lock"]
    assert (tmp_path / ".other.tmp-1").is_dir() and leftovers(out) == []


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_swapped_output_honours_the_umask(tmp_path, mask, file_mode, dir_mode):
    import tempfile

    old = os.umask(mask)
    try:
        with output_guard(tmp_path / "out") as guard, guard.build() as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)  # private 0600, like some serializers write
            os.close(fd)
            os.mkdir(tmp / "sub", 0o700)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert _mode(out) == dir_mode and _mode(out / "sub") == dir_mode
    assert _mode(out / os.path.basename(name)) == file_mode


@pytest.mark.parametrize(
    "name,message",
    [("x" * 250, "is 250 bytes"), ("a\0b", "cannot be used: embedded null byte")],
)
def test_names_the_system_or_the_guard_cannot_use(tmp_path, name, message):
    with pytest.raises(OutputError, match=message):
        check_output(tmp_path / name)
    assert list(tmp_path.iterdir()) == []
