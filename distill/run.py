"""``edgekd distill``: set up teacher, student and data from a recipe, train, save.

One run is one :class:`DistillRun`, whose phases read in order and each alone:

1. :meth:`~DistillRun.setup`: the job and the recipe (file + CLI overrides, validated at once),
   the device, the parallelism and the sources checked, then the training arguments (before
   the models, so DeepSpeed ZeRO-3 can partition them at load);
2. the output guard decides where the run writes (:meth:`~DistillRun.run`);
3. :meth:`~DistillRun.load_models`: teacher and student, checked for compatibility, the
   objective and the parts of the student that train;
4. :meth:`~DistillRun.load_data`: the training set, checked against the output;
5. :meth:`~DistillRun.train` (or resume) and :meth:`~DistillRun.save` the student as a
   standard checkpoint.

Output directory::

    OUTPUT/
      model/              the distilled student: safetensors + processor + edgekd_distill.yaml
      checkpoints/        checkpoint-N folders (complete or absent, never half-written)
      config.yaml         the resolved recipe and job
      training_log.json   every logged step (loss parts, k_t / k_s, lr, tokens/s)
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from transformers.trainer_utils import get_last_checkpoint

from edgekd.distill.callbacks import JsonLogCallback, RichProgressCallback
from edgekd.distill.objective import Objective
from edgekd.distill.pair import load_models
from edgekd.distill.resume import (
    check_checkpoint_files,
    check_resume_config,
    check_resume_shapes,
)
from edgekd.distill.save import config_yaml, job_dict, save_student
from edgekd.distill.setup import (  # noqa: F401 - DistillJob: the run's API
    DistillJob,
    check_job,
    check_parallelism,
    check_sources,
    check_strategy,
    inputs_of,
    pick_device,
    resolve_dataset,
    resolve_recipe,
    training_arguments,
)
from edgekd.distill.switch import build_adapter
from edgekd.distill.trainer import STAGING, DistillError, DistillTrainer, wrap_classes
from edgekd.io import atomic_write_text
from edgekd.outputs import DataRoot, check_inputs, output_guard, swap_in
from edgekd.profiles import profile_to_dict, profile_to_yaml

EXISTS_HINT = "pass --overwrite to replace it or --resume to continue its training"


def run(job: DistillJob, console: Console | None = None) -> dict[str, Any]:
    """Train a student as ``job`` says; returns a summary (paths, steps, last logged values).

    Everything is checked before the output is touched: the job, the recipe, the parallelism,
    the sources, then (under the output's lock, :func:`edgekd.outputs.output_guard`) the models,
    the data and, on ``--resume``, that the job is the run's own.
    """
    return DistillRun(job, console).run()


class DistillRun:
    """One distillation run and its state, phase by phase (see the module docstring)."""

    def __init__(self, job: DistillJob, console: Console | None = None):
        self.job = job
        self.job.output = Path(job.output)
        self.console = console or Console()
        self.main = _is_main_process()
        self.recipe = self.device = self.args = None
        self.teacher = self.student = self.objective = self.dataset = None
        self.work: Path | None = None  # where this run writes (beside the output when replacing)
        self.out: Path | None = None  # the output itself
        self.resume_from: str | None = None

    # ---- phases --------------------------------------------------------------------------------
    def setup(self) -> None:
        """The job, the recipe, the device, the parallelism and the sources checked; the
        training arguments (they also set up the processes)."""
        check_job(self.job)
        self.recipe = resolve_recipe(self.job)
        self.device = pick_device(self.job.device)
        check_strategy(self.recipe, self.device)
        check_sources(self.recipe)
        if not self.main:  # one report per run: progress, data summary and notes from rank 0
            self.console = Console(quiet=True)
        # before the models (ZeRO-3 partitions them at load); its output_dir is set once the
        # guard has decided where this run writes
        self.args = training_arguments(self.job, self.recipe, self.device)

    def load_models(self) -> None:
        """Teacher and student (checked), the objective, the switch's adapter, and which of
        the student's parameters train."""
        recipe = self.recipe
        with self.args.main_process_first(desc="built-in dataset"):  # one rank writes the cache
            resolve_dataset(recipe.data.dataset, self.console)
        self.teacher, self.student = load_models(recipe, self.job, self.device)
        self.objective = build_objective(recipe, self.student.tokenizer)
        if self.objective.uses_switch:
            adapter = build_adapter(self.student, self.teacher, self.job.vsd_adapter)
            if adapter is not None:
                self.student.model.add_module("vsd_adapter", adapter)
        if self.resume_from is not None:
            check_resume_shapes(self.student, self.resume_from)
        self.student.vision_tower.requires_grad_(bool(recipe.training.train_vision_tower))
        if not recipe.training.train_language_model:  # the projector alone (LLaVA's stage 1)
            self.student.language_model.requires_grad_(False)
            self.student.lm_head.requires_grad_(False)
        unused = set(self.student.unused_vision_parameters())  # past the feature layer
        for name, param in self.student.model.named_parameters():
            if name in unused:
                param.requires_grad_(False)

    def load_data(self) -> None:
        """The training set; its images checked against the output."""
        self.dataset = load_data(self.recipe, self.student.processor, self.console)
        roots = {str(p.parent) for p in self.dataset.image_paths if p is not None}
        check_inputs(self.job.output, [DataRoot(r) for r in sorted(roots)])

    def train(self):
        """Train (or resume) into ``work``; returns the trainer and its result."""
        from transformers.trainer_callback import PrinterCallback

        from edgekd.data import LlavaCollator

        recipe, args, work = self.recipe, self.args, self.work
        if args.fsdp_plugin_args is not None and recipe.distributed.strategy == "fsdp":
            # the student's own classes (the teacher is sharded apart, by its own classes)
            args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = ",".join(
                wrap_classes(self.student.model)
            )
        if args.should_save:
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_text(work / "config.yaml", self.config_yaml)
        trainer = DistillTrainer(
            model=self.student.model,
            teacher_model=self.teacher.model if self.teacher is not None else None,
            objective=self.objective,
            args=args,
            train_dataset=self.dataset,
            data_collator=LlavaCollator(self.student.tokenizer.pad_token_id),
            processing_class=self.student.processor,
            callbacks=[
                RichProgressCallback(self.console),
                JsonLogCallback(work / "training_log.json"),
                *self.job.callbacks,
            ],
        )
        check_parallelism(trainer, recipe.distributed.strategy, self.device)
        trainer.resumable = work == self.out  # a run built beside an old one: discarded
        trainer.remove_callback(PrinterCallback)
        try:
            return trainer, trainer.train(resume_from_checkpoint=self.resume_from)
        finally:
            if trainer.capture is not None:  # the student keeps no hook of the run's
                trainer.capture.remove()

    def save(self, trainer, result) -> dict[str, Any]:
        """The student as ``work/model``; the run's summary (naming the output)."""
        save_student(trainer, self.work / "model", self.config_yaml)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        return {
            "output": str(self.job.output),
            "model": str(self.job.output / "model"),
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "first_log": logs[0] if logs else {},
            "last_log": logs[-1] if logs else {},
            "method": self.recipe.method,
        }

    @property
    def config_yaml(self) -> str:
        return config_yaml(self.recipe, self.job, profile_to_yaml)

    # ---- the whole run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Every phase, under the output guard; a failed run that cannot be resumed leaves
        nothing behind, a run replacing an old one is swapped in only when it has finished."""
        self.setup()
        job, state = self.job, self.args.distributed_state
        with output_guard(
            job.output,
            overwrite=job.overwrite,
            reuse=job.resume,
            inputs=inputs_of(self.recipe, job),
            lock=self.main,  # the main process holds the lock for every rank
            hint=EXISTS_HINT,
        ) as guard:
            state.wait_for_everyone()  # the main process has locked the output and cleaned up
            self.out = guard.path
            self.work, self.resume_from = prepare_output(job, guard.path, guard.replacing)
            if self.resume_from is not None:
                check_resume_config(profile_to_dict(self.recipe), job_dict(job), guard.path)
                check_checkpoint_files(self.resume_from)
            state.wait_for_everyone()  # every rank knows where to write before anyone writes
            self.args.output_dir = str(self.work / "checkpoints")
            existed = self.work.exists()
            fresh = self.resume_from is None and (not existed or not any(self.work.iterdir()))
            try:
                self.load_models()
                self.load_data()
                summary = self.save(*self.train())
            except BaseException:
                # keep a run that can be resumed; remove one that left nothing to resume from
                if self.main and (
                    self.work != guard.path or (fresh and not has_checkpoint(self.work))
                ):
                    _discard(self.work, keep_dir=existed)
                raise
            if self.main and self.work != guard.path:
                swap_in(self.work, guard.path, overwrite=True)
        end_processes()
        return summary


# ---- the phases' pieces ------------------------------------------------------------------------
def has_checkpoint(output: str | Path) -> bool:
    """Whether a run directory holds a complete checkpoint to ``--resume`` from."""
    ckpt_dir = Path(output) / "checkpoints"
    return ckpt_dir.is_dir() and get_last_checkpoint(str(ckpt_dir)) is not None


def prepare_output(job: DistillJob, out: Path, replacing: bool) -> tuple[Path, str | None]:
    """Where this run writes, and the checkpoint to resume from (or None).

    A resumed or a new run writes into ``out`` itself (its checkpoints can be resumed after a
    crash); a run replacing an old one (``--overwrite``) builds beside it and is swapped in
    when it has finished, so the old run survives any failure.
    """
    ckpt_dir = out / "checkpoints"
    if job.resume:
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


def load_data(recipe, processor, console: Console):
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


def leave_launched_process(code: int = 0) -> None:
    """End a process that torchrun or accelerate launched, once its run is saved and its
    process group shut down (:func:`end_processes`), without interpreter finalisation.

    Library threads (gloo's, DeepSpeed's) can still abort the interpreter's teardown with
    "terminate called without an active exception": measured on the ZeRO-3 run resumed under
    ``accelerate launch`` (tests/distill/test_distributed.py), where both ranks had written
    their results 0.14 s before rank 1 died with SIGABRT, in about one full test run of three.
    The launcher then reports a finished, saved run as failed. Output streams and log handlers
    are flushed first; nothing happens in a process that was not launched (no ``WORLD_SIZE``
    above 1).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _discard(work: Path, keep_dir: bool) -> None:
    """Remove what a failed run wrote (it left no checkpoint to resume from)."""
    shutil.rmtree(work, ignore_errors=True)
    if keep_dir:
        work.mkdir()


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
