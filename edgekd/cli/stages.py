"""The stage commands: ``distill``, ``export``, ``bench``, ``plan`` and ``demo``. Each parses its
options, calls one library function and hands the result to :mod:`edgekd.cli.tables`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekd import targets
from edgekd.cli.app import Overwrite, app, console, parse_sets
from edgekd.cli.tables import print_export, print_inference_plan, print_train_plan
from edgekd.distill import methods
from edgekd.errors import OptionError

# The distill options that set one recipe key each, named once: their help is the key's
# description in the recipe schema, their bounds and defaults are the schema's (checked when
# the recipe is validated), and a test keeps their types the schema's.
RECIPE_FLAGS = {
    "max_steps": "training.max_steps",
    "lr": "training.learning_rate",
    "global_batch_size": "training.global_batch_size",
    "per_device_batch_size": "training.per_device_batch_size",
    "max_length": "training.max_length",
    "seed": "training.seed",
    "bf16": "training.bf16",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "vision_tower_init": "training.vision_tower_init",
    "w_ce": "loss.w_ce",
    "w_align": "loss.w_align",
    "w_vsd": "loss.w_vsd",
    "temperature": "loss.temperature",
    "top_n": "loss.top_n",
    "k_min": "loss.k_min",
    "k_max": "loss.k_max",
    "t2_scale": "loss.t2_scale",
    "distill_special_tokens": "loss.distill_special_tokens",
    "logit_loss": "loss.logit_loss",
}


def _recipe_help(flag: str) -> str:
    from edgekd.profiles import recipe_field

    key = RECIPE_FLAGS[flag]
    return f"{recipe_field(key).description} ({key}; default: the recipe's)"


@app.command()
def distill(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Run directory (model/, checkpoints/, logs).")
    ],
    recipe: Annotated[str, typer.Option(help="Recipe name or YAML file.")] = "easyvqa-cpu",
    teacher: Annotated[str | None, typer.Option(help="Teacher checkpoint dir or hub id.")] = None,
    student: Annotated[
        str | None,
        typer.Option(help="Student checkpoint dir or hub id, or tiny:SIZE for a fresh tiny model."),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="LLaVA-format training JSON.")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Image root (default: the JSON's folder).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help=f"{methods.help_text()} (default: the recipe's)."),
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help=_recipe_help("max_steps"))] = None,
    lr: Annotated[float | None, typer.Option(help=_recipe_help("lr"))] = None,
    global_batch_size: Annotated[
        int | None, typer.Option(help=_recipe_help("global_batch_size"))
    ] = None,
    per_device_batch_size: Annotated[
        int | None, typer.Option(help=_recipe_help("per_device_batch_size"))
    ] = None,
    max_length: Annotated[int | None, typer.Option(help=_recipe_help("max_length"))] = None,
    seed: Annotated[int | None, typer.Option(help=_recipe_help("seed"))] = None,
    w_ce: Annotated[float | None, typer.Option(help=_recipe_help("w_ce"))] = None,
    w_align: Annotated[float | None, typer.Option(help=_recipe_help("w_align"))] = None,
    w_vsd: Annotated[float | None, typer.Option(help=_recipe_help("w_vsd"))] = None,
    temperature: Annotated[float | None, typer.Option(help=_recipe_help("temperature"))] = None,
    top_n: Annotated[int | None, typer.Option(help=_recipe_help("top_n"))] = None,
    k_min: Annotated[int | None, typer.Option(help=_recipe_help("k_min"))] = None,
    k_max: Annotated[int | None, typer.Option(help=_recipe_help("k_max"))] = None,
    t2_scale: Annotated[
        bool | None,
        typer.Option("--t2-scale/--no-t2-scale", help=_recipe_help("t2_scale")),
    ] = None,
    distill_special_tokens: Annotated[
        bool | None,
        typer.Option(
            "--distill-special-tokens/--no-distill-special-tokens",
            help=_recipe_help("distill_special_tokens"),
        ),
    ] = None,
    logit_loss: Annotated[str | None, typer.Option(help=_recipe_help("logit_loss"))] = None,
    vision_tower_init: Annotated[
        str | None, typer.Option(help=_recipe_help("vision_tower_init"))
    ] = None,
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help=_recipe_help("bf16"))
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help=_recipe_help("gradient_checkpointing"),
        ),
    ] = None,
    vsd_adapter: Annotated[
        str,
        typer.Option(
            help="none (the paper) or linear: a learned map for vision towers of other widths."
        ),
    ] = "none",
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    logging_steps: Annotated[int, typer.Option(help="Log every N steps.")] = 10,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Any recipe key, e.g. --set training.warmup_ratio=0.1 (repeatable)."
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint.")
    ] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Distil a teacher VLM into a student with Switch-KD (or a baseline method).

    Multi-GPU: launch this command with torchrun or accelerate launch; the recipe's
    distributed.strategy (ddp, fsdp, deepspeed-zero3) configures the parallelism.
    """
    from edgekd.distill.run import DistillJob, leave_launched_process, run

    given = locals()
    overrides = {key: given[flag] for flag, key in RECIPE_FLAGS.items() if given[flag] is not None}
    overrides.update(parse_sets(set_ or []))
    job = DistillJob(
        output=output,
        recipe=recipe,
        teacher=teacher,
        student=student,
        data=data,
        images=images,
        method=method,
        overrides=overrides,
        vsd_adapter=vsd_adapter,
        resume=resume,
        overwrite=overwrite,
        save_steps=save_steps,
        logging_steps=logging_steps,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    summary = run(job, console=console)
    console.print(
        f"[green]✓[/green] {summary['method']}: {summary['global_step']} steps, "
        f"student saved to {summary['model']}"
    )
    leave_launched_process()  # under torchrun/accelerate: no teardown abort after the save


@app.command()
def export(
    checkpoint: Annotated[
        str, typer.Argument(help="Checkpoint dir (or distill run dir) or hub id.")
    ],
    target: Annotated[str, typer.Option(help=f"One of: {', '.join(targets.names())}.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact directory.")],
    precision: Annotated[
        str | None,
        typer.Option(help=f"{targets.help_text()}. Default: the target's first."),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="Device profile: TensorRT shapes, and the precision when --precision is not "
            "given (the profile's preferred_precision, where the target has it)."
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(help="LLaVA JSON for the accuracy delta of quantized variants."),
    ] = None,
    eval_limit: Annotated[int, typer.Option(min=1, help="Eval samples used.")] = 200,
    parity_prompts: Annotated[int, typer.Option(help="Prompts for greedy agreement.")] = 4,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", help="Target option KEY=VALUE, e.g. int4_block_size=64 (repeatable)."
        ),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Export a student to ONNX, TensorRT or GGUF, with parity checks against PyTorch."""
    from edgekd.export import ExportConfig, get_exporter
    from edgekd.export import export as run_export

    exporter = get_exporter(target)
    if precision is None and profile is not None:
        from edgekd.profiles import load_device_profile

        preferred = load_device_profile(profile).preferred_precision
        precision = targets.get(target).precision_for(preferred)
        if precision is not None:
            console.print(f"precision {precision}: {profile}'s preferred ({preferred})")
    config = ExportConfig(
        checkpoint=checkpoint,
        target=target,
        precision=precision or exporter.precisions[0],
        output=output,
        profile=profile,
        overwrite=overwrite,
        n_parity_prompts=parity_prompts,
        eval_data=eval_data,
        eval_limit=eval_limit,
        options=parse_sets(option or [], "--option", "int4_block_size=64"),
    )
    with console.status(f"exporting {checkpoint} to {target} ({config.precision}) ..."):
        manifest = run_export(config)
    print_export(manifest, target, config.precision, output, console)


@app.command()
def bench(
    model: Annotated[
        list[str],
        typer.Option(help="Artifact dir (edgekd export) or checkpoint; repeat for each variant."),
    ],
    data: Annotated[Path, typer.Option(help="LLaVA-format eval JSON (single-turn questions).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report directory.")] = Path(
        "bench"
    ),
    teacher: Annotated[
        str | None, typer.Option(help="Teacher checkpoint: accuracy and answers to compare.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or jetson.")] = "cpu",
    profile: Annotated[
        str | None, typer.Option(help="Device profile (default on jetson: the detected board).")
    ] = None,
    power_mode: Annotated[
        str | None, typer.Option(help="Power mode for the roofline (jetson: nvpmodel's).")
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder of the eval images (default: the JSON's).")
    ] = None,
    runs: Annotated[int, typer.Option(help="Timed runs per model.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 3,
    speed_tokens: Annotated[int, typer.Option(help="Tokens decoded per timed run.")] = 32,
    limit: Annotated[int, typer.Option(help="Eval questions answered per model.")] = 200,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit.")] = 16,
    context: Annotated[int, typer.Option(help="KV-cache tokens in the memory-fit check.")] = 2048,
    threads: Annotated[int | None, typer.Option(help="CPU threads per runtime.")] = None,
    ort_provider: Annotated[
        str, typer.Option(help="onnxruntime on cuda/jetson: cuda or tensorrt (TensorRT EP).")
    ] = "cuda",
    name: Annotated[
        list[str] | None, typer.Option(help="Label per --model, in order (default: dir names).")
    ] = None,
    isolate: Annotated[
        bool, typer.Option(help="Each model in its own process (its own peak memory).")
    ] = True,
    overwrite: Overwrite = False,
) -> None:
    """Benchmark models: latency, memory, power and accuracy against the teacher."""
    from edgekd.runtime.bench import BenchConfig, run_bench

    config = BenchConfig(
        models=model,
        data=data,
        output=output,
        teacher=teacher,
        device=device,
        profile=profile,
        power_mode=power_mode,
        image_root=image_root,
        runs=runs,
        warmup=warmup,
        speed_tokens=speed_tokens,
        limit=limit,
        max_new_tokens=max_new_tokens,
        context=context,
        threads=threads,
        ort_provider=ort_provider,
        names=name or [],
        isolate=isolate,
        overwrite=overwrite,
    )
    run_bench(config, console=console)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Working directory of the demo.")] = Path(
        "runs/demo"
    ),
) -> None:
    """Run the offline end-to-end demo on CPU (finished stages are reused)."""
    from edgekd.cli.demo import run_demo

    run_demo(output, console=console)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was typed on the command line (not its default). By name: typer
    may carry its own copy of click's ParameterSource enum."""
    return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"


TRAIN_PANEL = "Distillation run (with --train)"
INFERENCE_PANEL = "Inference (without --train)"
TRAIN_ONLY = ("recipe", "teacher", "student", "strategy", "gpus", "seq_len", "precision",
              "gradient_checkpointing")  # fmt: skip
INFERENCE_ONLY = ("model", "context", "power_mode")


@app.command("plan")
def plan_command(
    ctx: typer.Context,
    profile: Annotated[str, typer.Option(help="Device profile name or YAML file.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Preset (qwen2-0.5b-siglip-so400m), checkpoint dir or hub id.",
            rich_help_panel=INFERENCE_PANEL,
        ),
    ] = None,
    context: Annotated[
        int,
        typer.Option(
            help="Tokens held in the KV cache per sequence.", rich_help_panel=INFERENCE_PANEL
        ),
    ] = 2048,
    batch: Annotated[
        int | None,
        typer.Option(help="Sequences decoded together (--train: per GPU; default: the recipe's)."),
    ] = None,
    power_mode: Annotated[
        str | None,
        typer.Option(
            help="nvpmodel mode (default: the profile's).", rich_help_panel=INFERENCE_PANEL
        ),
    ] = None,
    train: Annotated[
        bool, typer.Option("--train", help="Plan a distillation run instead of inference.")
    ] = False,
    recipe: Annotated[
        str, typer.Option(help="Recipe name or YAML file.", rich_help_panel=TRAIN_PANEL)
    ] = "tinyllava-3b-to-0.5b",
    teacher: Annotated[
        str | None,
        typer.Option(
            help="Teacher preset or checkpoint (default: the recipe's).",
            rich_help_panel=TRAIN_PANEL,
        ),
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="Student preset or checkpoint (default: the recipe's).",
            rich_help_panel=TRAIN_PANEL,
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="none, ddp, fsdp, deepspeed-zero3.", rich_help_panel=TRAIN_PANEL),
    ] = None,
    gpus: Annotated[
        int | None, typer.Option(help="Processes, one per GPU.", rich_help_panel=TRAIN_PANEL)
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per sequence.", rich_help_panel=TRAIN_PANEL)
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="fp32, bf16-mixed (GPU default), bf16.", rich_help_panel=TRAIN_PANEL),
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations (default: the recipe's).",
            rich_help_panel=TRAIN_PANEL,
        ),
    ] = None,
) -> None:
    """Will a model fit a device, and how fast can it decode? With --train: will a
    distillation run fit its GPUs, and how fast can a step be? (memory parts, roofline)"""
    stray = [
        "--" + name.replace("_", "-")
        for name in (INFERENCE_ONLY if train else TRAIN_ONLY)
        if _given(ctx, name)
    ]
    if stray:
        plan_of = (
            "an inference plan: leave out --train" if train else "a training plan: add --train"
        )
        verb = "applies" if len(stray) == 1 else "apply"
        raise OptionError(f"{', '.join(stray)} only {verb} to {plan_of}")
    from edgekd.profiles import load_device_profile

    device = load_device_profile(profile)  # a bad name fails before torch is imported
    if train:
        _plan_train(device, recipe, teacher, student, strategy, gpus, batch, seq_len,
                    precision, gradient_checkpointing)  # fmt: skip
        return
    if model is None:
        raise OptionError("--model is needed (or --train to plan a distillation run)")
    _plan_inference(device, model, context, batch or 1, power_mode)


def _plan_train(device, recipe_name, teacher, student, strategy, gpus, batch, seq_len,
                precision, checkpointing) -> None:  # fmt: skip
    from edgekd.plan.training import plan_train, setup_from_recipe
    from edgekd.profiles import load_recipe

    recipe = load_recipe(recipe_name)
    teacher = teacher or recipe.teacher
    student = student or recipe.student
    for flag, value in (("--teacher", teacher), ("--student", student)):
        if value and "REPLACE" in value:
            raise OptionError(
                f"recipe '{recipe.name}' has a placeholder {flag[2:]} ('{value}'); pass {flag} "
                "with a preset (edgekd models list) or a checkpoint"
            )
    setup = setup_from_recipe(
        recipe, device, strategy=strategy, processes=gpus, batch=batch, seq_len=seq_len,
        precision=precision, gradient_checkpointing=checkpointing,
    )  # fmt: skip
    result = plan_train(teacher, student, device, setup)
    print_train_plan(recipe.name, result, console)


def _plan_inference(device, model: str, context: int, batch: int, power_mode) -> None:
    from edgekd.plan.inference import plan

    result = plan(model, device, context=context, batch=batch, power_mode=power_mode)
    print_inference_plan(result, context, batch, console)
