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
