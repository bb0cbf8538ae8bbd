"""A run killed with SIGKILL after a checkpoint resumes from it and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest


def _cli(output, data, student, *extra):
    return [
        sys.executable,
        "-m",
        "edgekd",
        "distill",
        "--method",
        "sft",
        "--student",
        str(student),
        "--data",
        str(data),
        "--output",
        str(output),
        "--max-steps",
        "300",
        "--global-batch-size",
        "4",
        "--per-device-batch-size",
        "4",
        "--max-length",
        "64",
        "--save-steps",
        "5",
        "--logging-steps",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume(tmp_path, distill_data, student_ckpt):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cli(out, distill_data, student_ckpt),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    ckpts = out / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpts.is_dir() and any(p.name == "checkpoint-10" for p in ckpts.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, (
        "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()
    saved = sorted(
        int(p.name.split("-")[1]) for p in ckpts.iterdir() if p.name.startswith("checkpoint-")
    )
    assert saved and saved[-1] >= 10 and saved[-1] < 300
    for step in saved:  # every visible checkpoint is complete
        folder = ckpts / f"checkpoint-{step}"
        for name in ("model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt"):
            assert (folder / name).exists(), f"{folder.name} lacks {name}"
    last = saved[-1]

    resumed = subprocess.run(
        _cli(out, distill_data, student_ckpt, "--resume"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["global_step"] == 300
    steps = [h["step"] for h in log["log_history"] if "loss" in h]
    assert steps == sorted(set(steps)), "the log repeats or skips back"
    assert steps[-1] == 300 and last + 1 in steps
    state = json.loads((ckpts / "checkpoint-300" / "trainer_state.json").read_text())
    assert state["global_step"] == 300
    assert (out / "model" / "model.safetensors").exists()


# ---- bad input and faults through the CLI (in this process): one line, nothing lost ----------
def _args(output, data, student, *extra):
    return _cli(output, data, student, *extra)[3:]  # without "python -m edgekd"


def _short(output, data, student, *extra):
    steps = ("--max-steps", "3", "--save-steps", "2")
    return [*_args(output, data, student, *extra), *steps]


@pytest.fixture
def finished_run(tmp_path, distill_data, student_ckpt, cli):
    """A finished 3-step sft run (checkpoint-2 and the model) and a snapshot of its files."""
    from fault_helpers import snapshot

    out = tmp_path / "run"
    assert cli(*_short(out, distill_data, student_ckpt)).code == 0
    return out, snapshot(out)


def _corrupt_copy(data, root):
    import shutil

    copy = root / "bad-data"
    shutil.copytree(data.parent, copy)
    (copy / "images" / "5.png").write_text("not an image")
    return copy / data.name


def test_overwrite_keeps_the_old_run_when_the_new_job_is_bad(
    finished_run, tmp_path, distill_data, student_ckpt, cli
):
    from fault_helpers import leftovers, snapshot

    out, before = finished_run
    typo = cli(*_short(out, distill_data, tmp_path / "studnet", "--overwrite"))
    typo.one_line_error("studnet", "not found")
    bad = _corrupt_copy(distill_data, tmp_path)
    whole_epoch = ("--max-steps", "8")  # 28 samples, 4 a step: the bad image is reached
    cli(*_short(out, bad, student_ckpt, "--overwrite"), *whole_epoch).one_line_error(
        "sample 's5'", "5.png"
    )
    assert snapshot(out) == before and leftovers(out) == []
    assert cli(*_short(out, distill_data, student_ckpt, "--overwrite", "--seed", "7")).code == 0
    assert snapshot(out) != before and leftovers(out) == []


def test_failed_new_run_leaves_no_output(tmp_path, distill_data, student_ckpt, cli):
    from fault_helpers import leftovers

    out = tmp_path / "fresh"
    bad = _corrupt_copy(distill_data, tmp_path)
    no_checkpoint = ("--max-steps", "8", "--save-steps", "100")
    cli(*_short(out, bad, student_ckpt), *no_checkpoint).one_line_error("5.png")
    assert not out.exists() and leftovers(out) == []  # nothing it wrote could be resumed


def test_resume_with_another_job_is_refused_before_writing(
    finished_run, distill_data, student_ckpt, teacher_ckpt, cli
):
    from fault_helpers import snapshot

    out, before = finished_run
    other = cli(*_short(out, distill_data, teacher_ckpt, "--resume", "--max-steps", "5"))
    other.one_line_error("--resume", "student", str(teacher_ckpt), str(student_ckpt))
    lr = cli(*_short(out, distill_data, student_ckpt, "--resume", "--lr", "0.5"))
    lr.one_line_error("--resume", "training.learning_rate 0.5")
    assert snapshot(out) == before  # config.yaml included
    (out / "config.yaml").unlink()  # without it, the checkpoint's shapes still decide
    shapes = cli(*_short(out, distill_data, teacher_ckpt, "--resume", "--max-steps", "5"))
    shapes.one_line_error("checkpoint-3", "text_config.hidden_size 64", "student has 128")
    assert not (out / "config.yaml").exists()


def test_resume_of_the_same_job_may_train_longer(finished_run, distill_data, student_ckpt, cli):
    out, _ = finished_run
    assert cli(*_short(out, distill_data, student_ckpt, "--resume"), "--max-steps", "4").code == 0
    assert json.loads((out / "training_log.json").read_text())["global_step"] == 4


def test_working_directory_with_the_inputs_is_never_the_output(
    tmp_path, distill_data, student_ckpt, cli, monkeypatch
):
    import shutil

    from fault_helpers import snapshot

    work = tmp_path / "work"
    shutil.copytree(distill_data.parent, work / "data")
    shutil.copytree(student_ckpt, work / "student")
    monkeypatch.chdir(work)
    before = snapshot(work)
    dot = cli(*_short(".", "data/train.json", "student", "--overwrite"))
    dot.one_line_error("output '.'", "working directory")
    data = cli(*_short("data", "data/train.json", "student", "--overwrite"))
    data.one_line_error("output 'data' contains the input")
    assert snapshot(work) == before


def test_a_second_run_on_the_same_output_is_refused(tmp_path, distill_data, student_ckpt, cli):
    from edgekd.outputs import output_lock

    out = tmp_path / "run"
    with output_lock(out):
        cli(*_short(out, distill_data, student_ckpt)).one_line_error(str(out), "another edgekd run")
    assert not out.exists()


def test_full_disk_during_a_checkpoint_says_so(
    tmp_path, distill_data, student_ckpt, cli, monkeypatch
):
    from transformers import Trainer

    from edgekd import io

    def serializer_fails(self, output_dir):  # torch's message when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(Trainer, "_save_rng_state", serializer_fails)
    monkeypatch.setattr(io, "_free_bytes", lambda path: 0)
    out = tmp_path / "run"
    cli(*_short(out, distill_data, student_ckpt)).one_line_error("disk is full", "checkpoints")
    assert not out.exists()  # no checkpoint was completed: nothing to resume from


def test_full_file_system_during_training_says_so(tmp_path, distill_data, student_ckpt, cli):
    import shutil
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(full)])
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = full / "run"
        cli(*_short(out, distill_data, student_ckpt)).one_line_error(str(out), "disk is full")
        assert os.listdir(full) == []
    finally:
        subprocess.run(["umount", str(full)])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_from_a_cut_checkpoint_names_the_file(
    finished_run, distill_data, student_ckpt, cli, name
):
    out, _ = finished_run
    last = out / "checkpoints" / "checkpoint-3"
    (last / name).write_bytes((last / name).read_bytes()[:-30])
    before = (out / "config.yaml").read_bytes()
    resumed = cli(*_short(out, distill_data, student_ckpt, "--resume", "--max-steps", "5"))
    resumed.one_line_error(str(last / name), "truncated or corrupt", f"remove '{last}'")
    assert (out / "config.yaml").read_bytes() == before
