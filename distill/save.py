"""What a distillation run writes besides its checkpoints: the student as a standard
checkpoint (gathered under FSDP / ZeRO-3, the adapter apart) and the resolved configuration."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file, save_file

from edgekd.distill.setup import DistillJob
from edgekd.io import writing
from edgekd.outputs import build_dir


def job_dict(job: DistillJob) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in asdict(job).items()
        if k != "callbacks"
    }


def save_student(trainer, out: Path, config_yaml: str) -> None:
    """Save the student (gathered under FSDP / ZeRO-3) as ``out``, atomically, adapter apart."""
    staging = out.with_name(f".{out.name}.saving")
    with writing(out):
        trainer.save_model(str(staging))  # every rank takes part in gathering the weights
    if trainer.args.should_save:
        with build_dir(out, overwrite=True) as tmp:  # the run's lock is held
            for item in staging.iterdir():
                shutil.move(str(item), tmp / item.name)
            _split_adapter(tmp)
            (tmp / "edgekd_distill.yaml").write_text(config_yaml)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()


def _split_adapter(folder: Path) -> None:
    """Move ``vsd_adapter.*`` tensors out of the student's weights into their own file."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        adapter = {k: v for k, v in tensors.items() if k.startswith("vsd_adapter.")}
        if adapter:
            save_file(
                {k: v for k, v in tensors.items() if k not in adapter},
                shard,
                metadata={"format": "pt"},
            )
            save_file(adapter, folder / "vsd_adapter.safetensors", metadata={"format": "pt"})


def config_yaml(recipe, job: DistillJob, to_yaml) -> str:
    return to_yaml(recipe) + yaml.safe_dump({"job": job_dict(job)}, sort_keys=False)
