"""``DistillTrainer``: transformers' ``Trainer`` with a frozen teacher and the Switch-KD objective.

Subclassing ``Trainer`` (as TRL's GKDTrainer does) keeps everything distributed standard:
launch with ``torchrun`` or ``accelerate launch`` and the student is wrapped by DDP, FSDP2 or
DeepSpeed ZeRO-3 as ``TrainingArguments`` say. The teacher is placed to match:

* none / DDP: moved to the device, frozen, never wrapped (it has nothing to synchronise);
* FSDP: sharded with FSDP2's ``fully_shard`` per layer (:func:`_fsdp_teacher`);
  ``accelerator.prepare_model(..., evaluation_mode=True)`` would leave it whole on every rank;
* ZeRO-3: its own DeepSpeed engine with the trainer's ZeRO config minus the optimizer, bucket
  sizes filled from the teacher's width (:func:`zero_buckets`), so its parameters are
  partitioned like the student's (stage 3) or replicated (stages 0-2).

With gradient checkpointing the teacher's decoder layers are recomputed in the switch route's
backward too (:class:`TeacherRoutes`, ``checkpoint_switch``).

Phases of one step (:meth:`compute_loss`): student forward (its projector's input captured as
the vision features) -> teacher forward, both routes in one call -> the objective. Checkpoints
are written to a staging folder and renamed, so a ``checkpoint-N`` folder is always complete.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections import defaultdict, deque

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from edgekd.distill.objective import Objective, supervised_positions
from edgekd.distill.switch import FeatureCapture, TeacherRoutes
from edgekd.errors import EdgeKDError
from edgekd.io import honour_umask, writing

STAGING = ".staging"


class DistillError(EdgeKDError, RuntimeError):
    """Training cannot go on (a non-finite loss, a bad dataset); the message says what to do."""


class DistillTrainer(Trainer):
    """Train a student VLM with ``objective``; the teacher (if any) stays frozen.

    Args:
        model: The student ``LlavaForConditionalGeneration`` (an optional ``vsd_adapter``
            submodule maps its vision features to the teacher's width).
        teacher_model: The teacher ``LlavaForConditionalGeneration``; None for sft.
        objective: The method and its loss settings.
        **kwargs: Passed to ``Trainer`` (args, train_dataset, data_collator, processing_class, ...).
    """

    def __init__(self, model, teacher_model=None, *, objective: Objective, **kwargs):
        super().__init__(model=model, **kwargs)
        # compute_loss returns a per-micro-batch mean: let Trainer divide by accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.objective = objective
        if objective.needs_teacher and teacher_model is None:
            raise DistillError(f"method '{objective.method}' needs a teacher; pass --teacher")
        self.capture = (
            FeatureCapture(model, getattr(model, "vsd_adapter", None))
            if objective.uses_switch
            else None
        )
        self.teacher = (
            self._place_teacher(teacher_model, getattr(model.config, "image_token_id", None))
            if objective.needs_teacher
            else None
        )
        self.resumable = True  # False: a failed run is discarded (it was replacing an old one)
        self._stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._tokens = 0
        self._clock = time.perf_counter()

    # ---- setup ----------------------------------------------------------------------------
    def _place_teacher(self, teacher_model, student_image_token_id: int | None) -> torch.nn.Module:
        # the teacher reads the student's input ids, its own image token in place of the student's
        routes = TeacherRoutes(
            teacher_model,
            input_image_token_id=student_image_token_id,
            checkpoint_switch=bool(self.args.activation_checkpointing)
            and self.objective.uses_switch,
        )
        if self.is_deepspeed_enabled:
            return _deepspeed_teacher(routes, self.accelerator)
        if self.is_fsdp_enabled:
            return _fsdp_teacher(routes.to(self.args.device), self.accelerator)
        return routes.to(self.args.device)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # with several processes every micro-batch holds an image (the same order under every
        # strategy); FSDP and ZeRO-3 cannot train without it, DDP can
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        has_image = [p is not None for p in getattr(dataset, "image_paths", ())]
        if sampler is None or self.args.world_size < 2 or not has_image or all(has_image):
            return sampler
        try:
            return ImageInEveryBatch(
                has_image, self.args.per_device_train_batch_size, seed=self.args.data_seed or 0
            )
        except DistillError:
            if sharded:
                raise
            return sampler

    # ---- the loss step --------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, stats, out = distill_step(model, self.teacher, self.capture, self.objective, inputs)
        self._stop_if_not_finite(loss)
        for key, value in stats.items():
            self._stats[key].append(value)
        self._tokens = self._tokens + inputs["attention_mask"].sum()  # read at log time
        return (loss, out) if return_outputs else loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        # the one device sync a step pays: a non-finite loss must stop at the step it appears
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.args.world_size > 1:  # every rank must stop together, or the others hang
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            step = self.state.global_step + 1
            if not self.resumable:
                raise DistillError(
                    f"the loss is not finite at step {step}; this run is discarded and the "
                    "output it was replacing is kept; lower the learning rate and run again"
                )
            last = (
                get_last_checkpoint(self.args.output_dir)
                if os.path.isdir(self.args.output_dir)
                else None
            )
            if last is None:
                raise DistillError(
                    f"the loss is not finite at step {step}, before the first checkpoint; "
                    "lower the learning rate and run again"
                )
            raise DistillError(
                f"the loss is not finite at step {step}; last good checkpoint: {last}; lower "
                "the learning rate and resume with --resume"
            )

    # ---- logging --------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats:  # a training log: add the loss parts and throughput
            for key, values in self._stats.items():
                logs[key] = round(torch.stack(values).float().mean().item(), 4)
            tokens = torch.as_tensor(self._tokens, device=self.args.device).float().reshape(1)
            if self.args.world_size > 1:
                tokens = self.accelerator.reduce(tokens, reduction="sum")
            now = time.perf_counter()
            logs["tokens_per_s"] = round(tokens.item() / max(now - self._clock, 1e-9), 1)
            self._stats.clear()
            self._tokens, self._clock = 0, now
        super().log(logs, start_time)

    # ---- checkpoints ----------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # a state dict gathered from shards (FSDP2, ZeRO-3) holds one copy per name of a tied
        # weight; save each tied parameter once, as an unsharded model would
        if state_dict:
            state_dict = drop_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict=state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` under a staging folder, then rename it into place."""
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, STAGING)
        name = f"checkpoint-{self.state.global_step}"
        self.args.output_dir = staging
        try:
            with writing(staging):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            honour_umask(final)  # serializers write some files 0600
            shutil.rmtree(staging, ignore_errors=True)
            _rotate(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()


class ImageInEveryBatch(torch.utils.data.Sampler):
    """A shuffled order in which every run of ``batch`` indices has an image.

    Under FSDP and ZeRO-3 every rank must run the same modules in each step (their parameters
    are gathered collectively): a rank whose micro-batch is all text would skip the vision
    towers and the switch route and leave the others waiting. Each run of ``batch`` indices
    takes its samples in the shuffled order, except that one image is reserved for each run.
    """

    def __init__(self, has_image: list[bool], batch: int, seed: int = 0):
        n_image, n = sum(has_image), len(has_image)
        batches = -(-n // batch)
        if batch < 2 or n_image < batches:
            raise DistillError(
                f"FSDP and ZeRO-3 need an image in every micro-batch, but {n - n_image} of {n} "
                f"samples are text-only and training.per_device_batch_size is {batch} "
                f"({batches} micro-batches for {n_image} images); raise per_device_batch_size, "
                "leave out text-only samples, or use distributed.strategy ddp"
            )
        self.has_image, self.batch, self.seed, self.epoch = has_image, batch, seed, 0

    def __len__(self) -> int:
        return len(self.has_image)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):

        # the same order on every rank: seeded by the run's data seed and the epoch
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.has_image), generator=g).tolist()
        images = deque(i for i in order if self.has_image[i])
        texts = deque(i for i in order if not self.has_image[i])
        rank = {idx: pos for pos, idx in enumerate(order)}
        out: list[int] = []
        runs = -(-len(order) // self.batch)
        for r in range(runs):
            size = min(self.batch, len(order) - r * self.batch)
            run = [images.popleft()]  # one image per run, reserved in order
            later_runs = runs - r - 1
            while len(run) < size:
                spare = len(images) > later_runs  # an image no later run needs
                take_image = spare and (not texts or rank[images[0]] < rank[texts[0]])
                run.append(images.popleft() if take_image or not texts else texts.popleft())
            out.extend(sorted(run, key=rank.__getitem__))  # the shuffled order within a run
        return iter(out)


def distill_step(model, teacher, capture, objective: Objective, inputs, every_position=False):
    """One micro-batch: the student's forward, the teacher's routes, the objective.

    Logits are computed only where a loss reads them, the positions whose next token is
    supervised (:func:`supervised_positions`), in the student and in both teacher routes: the
    language-model heads run on those rows alone and the switch route's backward starts from
    their gradients. The loss and its gradients are those of full logits
    (``every_position=True``, kept to prove it).

    ``capture`` is the student's :class:`FeatureCapture` when the objective uses the switch,
    else None.

    Returns:
        (loss, stats, student output).
    """
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    pixels, has_image = inputs.get("pixel_values"), inputs.get("has_image")
    keep = None if every_position else supervised_positions(inputs["labels"])
    out = model(
        input_ids=ids,
        attention_mask=attn,
        pixel_values=pixels,
        logits_to_keep=0 if keep is None else keep,  # 0: every position
    )
    features = capture.pop() if capture is not None else None  # None: no switch route
    teacher_logits = switch_logits = None
    if teacher is not None:
        t = teacher(ids, attn, pixels, has_image, features, keep=keep)
        teacher_logits, switch_logits = t.logits, t.switch_logits
    loss, stats = objective(
        out.logits, inputs["labels"], teacher_logits, switch_logits, has_image, positions=keep
    )
    return loss, stats, out


def drop_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """``state_dict`` without the second and later names of parameters the model ties together.

    The first name is the one ``model.named_parameters()`` yields (e.g. the input embeddings
    are kept, ``lm_head.weight`` dropped), as ``save_pretrained`` does for an unsharded model.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    copies = {name for group in names.values() for name in group[1:]}
    return {k: v for k, v in state_dict.items() if k not in copies}


def _rotate(run_dir: str, limit: int | None) -> None:
    """Keep the newest ``limit`` checkpoints (by step)."""
    if not limit:
        return
    steps = sorted(
        int(d.split("-")[1])
        for d in os.listdir(run_dir)
        if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
    )
    for step in steps[:-limit]:
        shutil.rmtree(os.path.join(run_dir, f"checkpoint-{step}"), ignore_errors=True)


def wrap_classes(*models: torch.nn.Module) -> list[str]:
    """The layer classes FSDP shards one by one: each model's ``_no_split_modules`` it contains.

    A LLaVA model lists the no-split classes of every sub-model type it could hold (a SigLIP
    vision tower lists ``SiglipTextEmbeddings`` too), and accelerate refuses a name the model
    lacks: keep the classes really present (e.g. ``Qwen2DecoderLayer``, ``SiglipEncoderLayer``).
    """
    present = {type(m).__name__ for model in models for m in model.modules()}
    wanted = {
        name for model in models for name in (getattr(model, "_no_split_modules", None) or ())
    }
    return sorted(wanted & present)


def _fsdp_teacher(routes: TeacherRoutes, accelerator) -> torch.nn.Module:
    """The frozen teacher sharded with FSDP2 (``fully_shard``), layer by layer like the student.

    Each layer's parameters are gathered for its forward and freed after it (and gathered again
    in the switch route's backward), so a rank holds 1/world of the teacher between layers.
    ``accelerator.prepare_model(..., evaluation_mode=True)`` would leave it whole on every rank.
    """
    from torch.distributed.fsdp import fully_shard

    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise DistillError('the FSDP teacher needs FSDP2: set "version": 2 in the fsdp config')
    names = set(wrap_classes(routes.teacher))
    for module in routes.teacher.modules():
        if type(module).__name__ in names:
            fully_shard(module, reshard_after_forward=True)
    fully_shard(routes, reshard_after_forward=True)
    return routes


def zero_buckets(config: dict, hidden_size: int) -> dict:
    """``config`` with its ``"auto"`` ZeRO bucket sizes filled from a model's hidden size.

    transformers fills these keys for the student only when training starts (from the student's
    width), after the teacher's engine is built; DeepSpeed would silently drop the ``"auto"``
    strings and use its own defaults. Same rule as transformers, with the teacher's width ``h``:
    ``reduce_bucket_size = h^2``, ``stage3_prefetch_bucket_size = 0.9 h^2``,
    ``stage3_param_persistence_threshold = 10 h``.
    """
    config = copy.deepcopy(config)
    zero = config.setdefault("zero_optimization", {})
    rules = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in rules.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    return config


def _deepspeed_teacher(routes: TeacherRoutes, accelerator) -> torch.nn.Module:
    """A DeepSpeed inference engine for the teacher with the trainer's ZeRO settings.

    ZeRO-3 partitions the teacher's parameters over the ranks like the student's; they are
    gathered for the forward and the switch route's backward, and up to
    ``stage3_max_live_parameters`` stay gathered between uses (both routes reuse every layer).
    Stages 0-2 replicate it (nothing to partition without an optimizer).
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if config.get("zero_optimization", {}).get("stage") == 3:
        text = routes.teacher.config.get_text_config()
        config = zero_buckets(config, int(text.hidden_size))
    else:
        config["zero_optimization"] = {"stage": 0}  # small teachers: replicate, no partitioning
    engine, *_ = deepspeed.initialize(model=routes, config=config)
    engine.eval()
    return engine
