"""One rank of a 2-process distillation run on CPU (gloo), for tests/distill/test_distributed.py.

Usage: python -m torch.distributed.run ... dist_worker.py FIELDS_JSON OUT_DIR

Runs ``edgekd.distill.run.run`` with the job ``FIELDS_JSON`` and writes ``OUT_DIR/rankN.json``:
the logged losses and how the student and the teacher are placed on this rank (wrapper, local
and full parameter counts, ZeRO bucket sizes).

Two test-only adjustments, both to run on a 2-core CPU machine what runs on GPUs:
* accelerate enables FSDP only on accelerators; on CPU it would train plain DDP. The patch
  keeps its FSDP plugin active on CPU (FSDP2 ``fully_shard`` itself runs on CPU with gloo).
* DeepSpeed compiles a shared-memory all-reduce op on its first CPU start (about a minute, not
  needed with gloo); it is switched off.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def keep_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # every AcceleratorState() resets it
            self.fsdp_plugin = plugin

    state.AcceleratorState.__init__ = init


def no_deepspeed_shm_op() -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def placement(module: torch.nn.Module) -> dict:
    """How ``module``'s parameters live on this rank: wrapper, local and full element counts."""
    from torch.distributed.fsdp import FSDPModule

    local = full = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: a partition of ds_numel elements
            local, full = local + p.ds_tensor.numel(), full + p.ds_numel
        elif hasattr(p, "to_local"):  # FSDP2: a DTensor shard
            local, full = local + p.to_local().numel(), full + p.numel()
        else:
            local, full = local + p.numel(), full + p.numel()
    if isinstance(module, FSDPModule):
        kind = "fsdp2"
    elif any(hasattr(p, "ds_tensor") for p in module.parameters()):
        kind = "zero3"
    else:
        kind = "replicated"
    return {"kind": kind, "class": type(module).__name__, "local": local, "full": full}


def describe(trainer) -> dict:
    teacher = trainer.teacher
    info = {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "step": trainer.state.global_step,
        "student": placement(trainer.model),
        "teacher": placement(getattr(teacher, "module", teacher)) if teacher is not None else None,
        "teacher_class": type(teacher).__name__ if teacher is not None else None,
    }
    zero = getattr(getattr(teacher, "_config", None), "zero_config", None)
    if zero is not None:
        info["teacher_zero"] = {
            "stage": int(zero.stage),
            "reduce_bucket_size": int(zero.reduce_bucket_size),
            "prefetch_bucket_size": int(zero.prefetch_bucket_size),
            "param_persistence_threshold": int(zero.param_persistence_threshold),
        }
    return info


def main() -> None:
    from edgekd.distill import trainer as trainer_module
    from edgekd.distill.run import DistillJob, leave_launched_process, run

    fields, out = json.loads(sys.argv[1]), sys.argv[2]
    strategy = fields.get("overrides", {}).get("distributed.strategy")
    if strategy == "fsdp":
        keep_fsdp_on_cpu()
    if strategy == "deepspeed-zero3":
        no_deepspeed_shm_op()

    trainers = []
    original = trainer_module.DistillTrainer.train

    def train(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        trainers.append(self)
        return result

    trainer_module.DistillTrainer.train = train
    record = {"world": int(os.environ["WORLD_SIZE"])}
    run(DistillJob(**fields))
    record["first"] = describe(trainers[-1])
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(record, f)
    leave_launched_process()  # as `edgekd distill` ends a launched process


if __name__ == "__main__":
    main()
