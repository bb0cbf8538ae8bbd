"""``edgekd distill``: set up teacher, student and data from a recipe, train, save.

Phases: resolve the recipe (file + CLI overrides, validated at once) -> training arguments
(before the models, so DeepSpeed ZeRO-3 can partition them at load) -> load and check the
models -> data -> train (or resume) -> save the student as a standard checkpoint.

Output directory::

    OUTPUT/
      model/              the distilled student: safetensors + processor + edgekd_distill.yaml
      checkpoints/        checkpoint-N folders (complete or absent, never half-written)
      config.yaml         the resolved recipe and job
      training_log.json   every logged step (loss parts, k_t / k_s, lr, tokens/s)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from edgekd.distill import methods
from edgekd.distill.objective import Objective
from edgekd.distill.resume import (
    check_checkpoint_files,
    check_resume_config,
    check_resume_shapes,
)
from edgekd.distill.switch import build_adapter
from edgekd.distill.trainer import STAGING, DistillError
from edgekd.errors import ModelError, OptionError
from edgekd.io import atomic_write_text, writing
from edgekd.outputs import build_dir, swap_in

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
    from edgekd.profiles import load_recipe

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


def has_checkpoint(output: str | Path) -> bool:
    """Whether a run directory holds a complete checkpoint to ``--resume`` from."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = Path(output) / "checkpoints"
    return ckpt_dir.is_dir() and get_last_checkpoint(str(ckpt_dir)) is not None


EXISTS_HINT = "pass --overwrite to replace it or --resume to continue its training"


def check_job(job: DistillJob) -> None:
    """Refuse job settings out of range (all at once, naming the CLI option)."""
    from edgekd.distill.switch import ADAPTERS

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
    from edgekd.models.checkpoint import resolve_checkpoint

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
    from edgekd.outputs import DataRoot

    root = recipe.data.image_root
    return [
        recipe.teacher,
        recipe.student,
        recipe.data.dataset,
        DataRoot(root) if root else None,
        job.recipe,
    ]


def prepare_output(job: DistillJob, out: Path, replacing: bool) -> tuple[Path, str | None]:
    """Where this run writes, and the checkpoint to resume from (or None).

    A resumed or a new run writes into ``out`` itself (its checkpoints can be resumed after a
    crash); a run replacing an old one (``--overwrite``) builds beside it and is swapped in
    when it has finished, so the old run survives any failure.
    """
    ckpt_dir = out / "checkpoints"
    if job.resume:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if last is None:
            raise DistillError(
                f"--resume: no checkpoint in '{ckpt_dir}' (the run stopped before its first); "
                "start again without --resume, with --overwrite to replace what it left"
            )
        if _is_main_process():  # a save cut short by a crash; rank 0 owns the run folder
            shutil.rmtree(ckpt_dir / STAGING, ignore_errors=True)
        return out, last
    if replacing:
        return out.with_name(f".{out.name}.tmp-distill"), None  # one name for every rank
    return out, None


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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


def load_models(recipe, job: DistillJob, device: str):
    """Teacher (None for sft) and student as ``VLM``s, checked for compatibility."""
    from edgekd.models import VLM, check_compatible

    dtype = "bfloat16" if recipe.training.bf16 and device == "cuda" else "float32"
    teacher = None
    shared_tower = recipe.training.vision_tower_init == "teacher"
    teacher_logits = methods.get(recipe.method).reads_teacher_logits
    if recipe.reads_teacher:
        if recipe.teacher.startswith("tiny:"):
            raise ModelError(
                f"teacher '{recipe.teacher}' would be an untrained model; train a "
                "teacher with --method sft first and pass its directory as --teacher"
            )
        teacher = VLM.from_pretrained(
            recipe.teacher, dtype=dtype, device=device, trust_remote_code=job.trust_remote_code
        )
    student = _load_student(recipe, job, teacher, device)
    if teacher is not None:
        if teacher_logits:  # sft reads the teacher's tower, not its text side
            check_compatible(teacher, student)
        check_same_preprocessing(teacher, student)
    if shared_tower:
        share_vision_tower(teacher, student)
    if not teacher_logits:
        teacher = None  # read for its vision tower only
    return teacher, student


def share_vision_tower(teacher, student) -> None:
    """Start the student's vision tower as a copy of the teacher's (``vision_tower_init``).

    In the paper both models start from one pretrained SigLIP, so the visual switch begins with
    student features the teacher's projector was trained on. Under ZeRO-3 the partitioned
    parameters are gathered for the copy.

    Raises:
        ModelError: the towers differ in a parameter's name or shape (both are named).
    """
    from contextlib import nullcontext

    src = dict(teacher.vision_tower.named_parameters())
    dst = dict(student.vision_tower.named_parameters())

    def shape(p: torch.Tensor) -> tuple[int, ...]:
        return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape apart

    for name in sorted(set(src) | set(dst)):
        s_shape = shape(dst[name]) if name in dst else "absent"
        t_shape = shape(src[name]) if name in src else "absent"
        if s_shape != t_shape:
            raise ModelError(
                f"--vision-tower-init teacher: student vision tower parameter '{name}' is "
                f"{s_shape}, the teacher's is {t_shape}; it needs the same tower shape (use "
                "--vision-tower-init student to keep the student's own tower)"
            )
    gathered = nullcontext()
    if any(hasattr(p, "ds_tensor") for p in (*src.values(), *dst.values())):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(
            [*src.values(), *dst.values()], modifier_rank=0
        )
    with gathered, torch.no_grad():
        for name, param in dst.items():
            param.copy_(src[name].to(param.dtype))


def _load_student(recipe, job: DistillJob, teacher, device: str):
    from edgekd.models import VLM, build_vlm
    from edgekd.models.factory import corpus_texts
    from edgekd.models.tokenizer import train_tokenizer

    spec = recipe.student
    if not spec.startswith("tiny:"):
        return VLM.from_pretrained(
            spec, dtype="float32", device=device, trust_remote_code=job.trust_remote_code
        )
    tokenizer = (
        teacher.tokenizer
        if teacher is not None
        else train_tokenizer(corpus_texts(resolve_dataset(recipe.data.dataset)))
    )
    vlm = build_vlm(spec.split(":", 1)[1], tokenizer=tokenizer, seed=recipe.training.seed)
    vlm.model.to(device)
    return vlm


def check_same_preprocessing(teacher, student) -> None:
    """Both models see the same pixels, so their image preprocessing must agree."""
    t_ip, s_ip = teacher.processor.image_processor, student.processor.image_processor
    t_steps, s_steps = preprocessing_steps(t_ip), preprocessing_steps(s_ip)
    for key, tv in t_steps.items():
        sv = s_steps[key]
        if tv != sv:
            raise ModelError(
                f"teacher image preprocessing {key}={tv} != student {key}={sv}; "
                "the visual switch needs both models to see the same pixels"
            )


def preprocessing_steps(image_processor) -> dict[str, Any]:
    """What decides an image processor's pixels, whatever its class (absent steps are off)."""
    steps = {
        key: getattr(image_processor, key, None)
        for key in ("size", "image_mean", "image_std", "rescale_factor", "resample")
    }
    steps["do_pad"] = bool(getattr(image_processor, "do_pad", False))  # pad to a square first
    crop = bool(getattr(image_processor, "do_center_crop", False))
    steps["crop_size"] = getattr(image_processor, "crop_size", None) if crop else None
    return steps


def load_data(recipe, job: DistillJob, processor, console: Console):
    """The training dataset; stops when no sample keeps an answer token after truncation."""
    from edgekd.data import LlavaDataset

    path = resolve_dataset(recipe.data.dataset, console)
    root = Path(recipe.data.image_root) if recipe.data.image_root else path.parent
    dataset = LlavaDataset(path, root, processor, recipe.training.max_length)
    stats = dataset.stats()
    if stats["n_no_answer_tokens"] == stats["n_samples"]:
        raise DistillError(
            f"every sample has zero answer tokens after truncation to max_length "
            f"{recipe.training.max_length} (longest sample: {stats['max_length_seen']} tokens); "
            "raise training.max_length"
        )
    console.print(
        f"data: {stats['n_samples']} samples, mean {stats['mean_length']:.0f} tokens, "
        f"{stats['n_truncated']} truncated, {stats['n_no_answer_tokens']} without "
        f"answer tokens (max_length {recipe.training.max_length})"
    )
    return dataset


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


def run(job: DistillJob, console: Console | None = None) -> dict[str, Any]:
    """Train a student as ``job`` says; returns a summary (paths, steps, last logged values).

    Everything is checked before the output is touched: the job, the recipe, the parallelism,
    the sources, then (under the output's lock, :func:`edgekd.outputs.output_guard`) the models,
    the data and, on ``--resume``, that the job is the run's own.
    """
    from edgekd.outputs import output_guard
    from edgekd.profiles import profile_to_dict

    console = console or Console()
    job.output = Path(job.output)
    check_job(job)
    recipe = resolve_recipe(job)
    device = pick_device(job.device)
    check_strategy(recipe, device)
    check_sources(recipe)
    main = _is_main_process()
    if not main:  # one report per run: progress, data summary and notes come from rank 0
        console = Console(quiet=True)
    # before the models (ZeRO-3 partitions them at load); it also sets up the processes. Its
    # output_dir is set once the guard has decided where this run writes.
    args = training_arguments(job, recipe, device)
    state = args.distributed_state
    with output_guard(
        job.output,
        overwrite=job.overwrite,
        reuse=job.resume,
        inputs=inputs_of(recipe, job),
        lock=main,  # the main process holds the lock for every rank
        hint=EXISTS_HINT,
    ) as guard:
        state.wait_for_everyone()  # the main process has locked the output and cleaned up
        work, resume_from = prepare_output(job, guard.path, guard.replacing)
        if resume_from is not None:
            check_resume_config(profile_to_dict(recipe), _job_dict(job), guard.path)
            check_checkpoint_files(resume_from)
        state.wait_for_everyone()  # every rank has decided where to write before anyone writes
        args.output_dir = str(work / "checkpoints")
        existed = work.exists()
        fresh = resume_from is None and (not existed or not any(work.iterdir()))
        try:
            summary = _train(job, recipe, args, device, work, resume_from, guard.path, console)
        except BaseException:
            # keep a run that can be resumed; remove one that left nothing to resume from
            if main and (work != guard.path or (fresh and not has_checkpoint(work))):
                _discard(work, keep_dir=existed)
            raise
        if main and work != guard.path:
            swap_in(work, guard.path, overwrite=True)
    end_processes()
    return summary


def end_processes() -> None:
    """Shut a distributed run's process group down once every rank is done with it.

    A process that exits with its gloo group alive can abort in interpreter finalisation
    (the group's worker threads still hold tensors): a finished run's rank dies with SIGABRT
    and the launcher reports the job as failed. accelerate's state is reset with it, so a
    later run in the same processes sets its group up again. Nothing to do in one process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from accelerate.state import AcceleratorState

    dist.barrier()
    dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)


def _discard(work: Path, keep_dir: bool) -> None:
    """Remove what a failed run wrote (it left no checkpoint to resume from)."""
    shutil.rmtree(work, ignore_errors=True)
    if keep_dir:
        work.mkdir()


def _train(job, recipe, args, device, work, resume_from, out: Path, console) -> dict[str, Any]:
    """Load, check, train into ``work`` and save the student; the summary names ``out``."""
    from transformers.trainer_callback import PrinterCallback

    from edgekd.data import LlavaCollator
    from edgekd.distill.callbacks import JsonLogCallback, RichProgressCallback
    from edgekd.distill.trainer import DistillTrainer, wrap_classes
    from edgekd.outputs import DataRoot, check_inputs
    from edgekd.profiles import profile_to_yaml

    with args.main_process_first(desc="built-in dataset"):  # one rank writes the cache
        resolve_dataset(recipe.data.dataset, console)
    teacher, student = load_models(recipe, job, device)
    objective = build_objective(recipe, student.tokenizer)
    if objective.uses_switch:
        adapter = build_adapter(student, teacher, job.vsd_adapter)
        if adapter is not None:
            student.model.add_module("vsd_adapter", adapter)
    if resume_from is not None:
        check_resume_shapes(student, resume_from)
    student.vision_tower.requires_grad_(bool(recipe.training.train_vision_tower))
    unused = set(student.unused_vision_parameters())  # past the feature layer: never a gradient
    for name, param in student.model.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    dataset = load_data(recipe, job, student.processor, console)
    roots = {str(p.parent) for p in dataset.image_paths if p is not None}
    check_inputs(job.output, [DataRoot(r) for r in sorted(roots)])
    if args.fsdp_plugin_args is not None and recipe.distributed.strategy == "fsdp":
        # the student's own classes (the teacher is sharded apart, by its own classes)
        args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = ",".join(
            wrap_classes(student.model)
        )
    config_yaml = _config_yaml(recipe, job, profile_to_yaml)
    if args.should_save:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "config.yaml", config_yaml)
    trainer = DistillTrainer(
        model=student.model,
        teacher_model=teacher.model if teacher is not None else None,
        objective=objective,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaCollator(student.tokenizer.pad_token_id),
        processing_class=student.processor,
        callbacks=[
            RichProgressCallback(console),
            JsonLogCallback(work / "training_log.json"),
            *job.callbacks,
        ],
    )
    check_parallelism(trainer, recipe.distributed.strategy, device)
    trainer.resumable = work == out  # a run built beside an old one is discarded on failure
    trainer.remove_callback(PrinterCallback)
    result = trainer.train(resume_from_checkpoint=resume_from)
    save_student(trainer, work / "model", config_yaml)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "output": str(job.output),
        "model": str(job.output / "model"),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "last_log": logs[-1] if logs else {},
        "method": recipe.method,
    }


def build_objective(recipe, tokenizer) -> Objective:
    """The recipe's objective; special tokens left out of distillation unless it says not."""
    loss = recipe.loss.model_dump()
    distill_special = loss.pop("distill_special_tokens")
    exclude = frozenset() if distill_special else special_token_ids(tokenizer)
    return Objective(method=recipe.method, exclude_ids=exclude, **loss)


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (EOS, end-of-turn, padding, added special ones)."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return frozenset(int(i) for i in ids if i is not None)


def _job_dict(job: DistillJob) -> dict[str, Any]:
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
    from safetensors.torch import load_file, save_file

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


def _config_yaml(recipe, job: DistillJob, to_yaml) -> str:
    import yaml

    return to_yaml(recipe) + yaml.safe_dump({"job": _job_dict(job)}, sort_keys=False)
