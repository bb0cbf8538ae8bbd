"""``edgekd distill``'s set-up: the job, the recipe it resolves to, and every check made before
the output is touched (options, parallelism, sources, device), then the training arguments."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from edgekd.distill import methods
from edgekd.distill.switch import ADAPTERS
from edgekd.distill.trainer import DistillError
from edgekd.errors import OptionError
from edgekd.models.checkpoint import resolve_checkpoint
from edgekd.outputs import DataRoot
from edgekd.profiles import load_recipe

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DistillJob:
    """What ``edgekd distill`` was asked to do; recipe values are overridden by the set fields."""

    output: Path
    recipe: str = "easyvqa-cpu"
    teacher: str | None = None
    student: str | None = None
    data: Path | None = None
    images: Path | None = None
    method: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    vsd_adapter: str = "none"
    resume: bool = False
    overwrite: bool = False
    save_steps: int = 50
    logging_steps: int = 10
    save_total_limit: int = 2
    device: str = "auto"
    trust_remote_code: bool = False
    callbacks: list[Any] = field(default_factory=list)  # extra TrainerCallbacks (library use)


def resolve_recipe(job: DistillJob):
    """The recipe with the job's overrides applied, validated once (all problems in one error)."""
    overrides = dict(job.overrides)
    if job.method:
        overrides["method"] = job.method
        known = methods.METHODS.get(job.method)  # an unknown one: the recipe's check says so
        for key in known.unused_weights if known else ():
            overrides[f"loss.{key}"] = 0.0  # weights the recipe set for its own method
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if world > 1:
        overrides.setdefault("distributed.num_processes", world)
        if load_recipe(job.recipe).distributed.strategy == "none":
            overrides.setdefault("distributed.strategy", "ddp")
    for key, value in (
        ("teacher", job.teacher),
        ("student", job.student),
        ("data.dataset", job.data),
        ("data.image_root", job.images),
    ):
        if value is not None:
            overrides[key] = str(value)
    return load_recipe(job.recipe, overrides=overrides)


def check_job(job: DistillJob) -> None:
    """Refuse job settings out of range (all at once, naming the CLI option)."""
    problems = [
        f"{flag} must be at least 1 (got {value})"
        for flag, value in (
            ("--save-steps", job.save_steps),
            ("--logging-steps", job.logging_steps),
            ("save_total_limit", job.save_total_limit),
        )
        if value is not None and value < 1
    ]
    if job.vsd_adapter not in ADAPTERS:
        valid = ", ".join(ADAPTERS)
        problems.append(f"--vsd-adapter '{job.vsd_adapter}' is unknown; valid: {valid}")
    if problems:
        raise OptionError("; ".join(problems))


def check_strategy(recipe, device: str) -> None:
    """The recipe's parallelism must be possible here: its package, its devices, its launcher."""
    dist, world = recipe.distributed, int(os.environ.get("WORLD_SIZE", "1"))
    problems = []
    if dist.strategy == "deepspeed-zero3" and importlib.util.find_spec("deepspeed") is None:
        problems.append(
            "distributed.strategy deepspeed-zero3 needs the deepspeed package: "
            "pip install deepspeed"
        )
    if dist.strategy == "fsdp" and world < 2:
        problems.append(
            "distributed.strategy fsdp shards the models over several processes but this is one: "
            "launch one per CUDA GPU (torchrun --nproc_per_node N -m edgekd distill ...), or use "
            "distributed.strategy none"
        )
    if dist.num_processes > world:
        problems.append(
            f"distributed.num_processes is {dist.num_processes} but "
            f"{'this is one process' if world == 1 else f'{world} processes were launched'}; "
            f"launch one per device: torchrun --nproc_per_node {dist.num_processes} -m edgekd "
            f"distill ... (or accelerate launch), or set distributed.num_processes={world}"
        )
    if problems:
        raise DistillError("; ".join(problems))


def check_parallelism(trainer, strategy: str, device: str) -> None:
    """The trainer really runs the recipe's strategy (accelerate would fall back to plain DDP).

    accelerate enables FSDP only on accelerators (GPUs): on CPU an FSDP config trains every rank
    with the whole model, which would make the recipe's memory plan a fiction.
    """
    active = {
        "fsdp": trainer.is_fsdp_enabled,
        "deepspeed-zero3": trainer.is_deepspeed_enabled,
    }.get(strategy, True)
    if not active:
        raise DistillError(
            f"distributed.strategy {strategy} is not active on {device}: accelerate would train "
            "a whole model on every process (plain DDP); use CUDA GPUs, or distributed.strategy "
            "ddp here"
        )


def check_sources(recipe) -> None:
    """Teacher, student and dataset exist (a typo'd path fails now, not after loading a model)."""
    from edgekd.data import DATASETS

    for spec in (recipe.teacher if recipe.reads_teacher else None, recipe.student):
        if spec and not spec.startswith("tiny:"):
            resolve_checkpoint(spec)
    data = recipe.data.dataset
    if data not in DATASETS and not Path(data).expanduser().exists():
        raise DistillError(
            f"training data '{data}' is neither a file nor a built-in dataset "
            f"({', '.join(DATASETS)}); pass --data TRAIN.json"
        )


def inputs_of(recipe, job: DistillJob) -> list[str | None]:
    """What the run reads, for the output guard (names that are not paths are skipped)."""
    root = recipe.data.image_root
    return [
        recipe.teacher,
        recipe.student,
        recipe.data.dataset,
        DataRoot(root) if root else None,
        job.recipe,
    ]


DEVICES = ("auto", "cpu", "cuda")


def pick_device(requested: str) -> str:
    """``cuda`` or ``cpu`` for ``--device`` (``auto``: a GPU when one is visible)."""
    if requested not in DEVICES:
        raise DistillError(f"--device '{requested}' is unknown; valid: {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DistillError("--device cuda: no CUDA GPU is visible; use --device cpu")
    return requested


def resolve_dataset(dataset: str, console: Console | None = None) -> Path:
    """A training JSON path; a built-in name (``easy-vqa``) is written once to the cache."""
    from edgekd.data import DATASETS

    path = Path(dataset).expanduser()
    if path.is_dir() and (path / "train.json").is_file():
        return path / "train.json"
    if path.is_file():
        return path
    if dataset in DATASETS:
        cache = Path(os.environ.get("EDGEKD_CACHE", Path.home() / ".cache" / "edgekd"))
        folder = cache / "data" / dataset
        if not (folder / "train.json").is_file():
            if console is not None:
                console.print(f"data: writing built-in dataset '{dataset}' to {folder}")
            DATASETS[dataset](folder, overwrite=folder.exists())
        return folder / "train.json"
    raise DistillError(
        f"training data '{dataset}' is neither a file nor a built-in dataset "
        f"({', '.join(DATASETS)}); pass --data TRAIN.json"
    )


def training_arguments(job: DistillJob, recipe, device: str):
    """``TrainingArguments`` from the recipe (strategy, batch arithmetic, schedule)."""
    from transformers import TrainingArguments

    t, strategy = recipe.training, recipe.distributed.strategy
    kwargs: dict[str, Any] = {}
    if strategy == "deepspeed-zero3":
        init_deepspeed_processes(device)
    if strategy == "deepspeed-zero3" and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true":
        kwargs["deepspeed"] = str(CONFIG_DIR / "deepspeed_zero3.json")
    if strategy == "fsdp":
        kwargs["fsdp"] = "full_shard auto_wrap"
        kwargs["fsdp_config"] = str(CONFIG_DIR / "fsdp.json")
    return TrainingArguments(
        output_dir=str(job.output / "checkpoints"),
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps or -1,
        bf16=t.bf16 and device == "cuda",
        activation_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=job.logging_steps,
        logging_first_step=True,
        save_steps=job.save_steps,
        save_total_limit=job.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        # a micro-batch without an image leaves the vision tower unused (transformers turns
        # the search off under gradient checkpointing; non-reentrant checkpointing allows it)
        ddp_find_unused_parameters=True,
        ddp_backend="gloo"
        if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1
        else None,
        **kwargs,
    )


def init_deepspeed_processes(device: str) -> None:
    """Join DeepSpeed's process group before ``TrainingArguments`` (any launcher, any device).

    ``accelerate launch`` does this itself; under ``torchrun`` on CPU accelerate skips it, and
    DeepSpeed then counts one process: ZeRO-3's ``from_pretrained`` fails its batch-size check
    (``train_batch_size 8 != 4 * 1 * 1``). Idempotent: an initialised group is kept.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
