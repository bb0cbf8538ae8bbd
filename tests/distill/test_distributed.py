"""Two processes on CPU (torchrun, gloo): the ranks agree, and the saved checkpoint loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from transformers import TrainerCallback
    from edgekd.distill.run import DistillJob, run

    class Record(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            digest = hashlib.sha256()
            for name, p in sorted(model.named_parameters()):
                digest.update(p.detach().cpu().numpy().tobytes())
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            rank = int(os.environ["RANK"])
            out = os.path.join(sys.argv[2], f"rank{rank}.json")
            with open(out, "w") as f:
                json.dump({"losses": losses, "params": digest.hexdigest(),
                           "world": int(os.environ["WORLD_SIZE"]), "step": state.global_step}, f)

    fields = json.loads(sys.argv[1])
    run(DistillJob(**fields, callbacks=[Record()]))
""")


@pytest.mark.slow
def test_two_process_ddp_ranks_agree(tmp_path, teacher_ckpt, student_ckpt, distill_data):
    from distill_helpers import FAST

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    overrides = {**FAST, "training.global_batch_size": 8, "training.per_device_batch_size": 4}
    fields = {
        "output": str(out),
        "recipe": "easyvqa-cpu",
        "method": "switch-kd",
        "teacher": str(teacher_ckpt),
        "student": str(student_ckpt),
        "data": str(distill_data),
        "overrides": overrides,
        "device": "cpu",
        "logging_steps": 1,
        "save_steps": 2,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            json.dumps(fields),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3
    assert ranks[0]["params"] == ranks[1]["params"], "DDP replicas diverged"
    config = (out / "config.yaml").read_text()
    assert "strategy: ddp" in config and "num_processes: 2" in config
    from edgekd.models import VLM

    VLM.from_pretrained(out / "model")
    VLM.from_pretrained(out / "checkpoints" / "checkpoint-2")
