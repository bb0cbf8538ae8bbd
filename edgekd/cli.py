"""The ``edgekd`` command line: a thin Typer shell over the library API.

Each command parses its options, calls one library function and renders the result. Heavy
imports (torch, transformers, onnxruntime, llama_cpp, tensorrt) happen inside the commands so
that ``edgekd --help`` answers at once.

:func:`main` is the error boundary: user errors (:class:`edgekd.errors.EdgeKDError`, malformed
options, outputs on a full, read-only or forbidden file system) print as one line on stderr with
exit code 2; ``--debug`` (or ``EDGEKD_DEBUG=1``) adds the traceback. Any other exception is a bug
and shows its traceback. SIGTERM unwinds like an error, so temporary outputs are removed.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from edgekd import targets
from edgekd.distill import methods
from edgekd.errors import EdgeKDError, OptionError

try:  # typer 0.2x ships its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors

app = typer.Typer(
    name="edgekd",
    help="Distil vision-language models (Switch-KD), export them to ONNX / TensorRT / GGUF, "
    "and benchmark them on GPUs and Jetson devices.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Write built-in datasets in LLaVA format.", no_args_is_help=True)
convert_app = typer.Typer(
    help="Convert other checkpoint layouts to transformers' Llava.", no_args_is_help=True
)
profiles_app = typer.Typer(help="List and show device and recipe profiles.", no_args_is_help=True)
models_app = typer.Typer(
    help="Create tiny or shape-faithful models and inspect checkpoints.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(convert_app, name="convert")
app.add_typer(profiles_app, name="profiles")
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
DEBUG_ENV = "EDGEKD_DEBUG"
_debug = {"on": False}  # --debug of this invocation (the environment is left as it was)


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show the traceback of errors (or set {DEBUG_ENV}=1)."),
    ] = False,
) -> None:
    _debug["on"] = debug


# ---- stages ---------------------------------------------------------------------------------
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
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    global_batch_size: Annotated[
        int | None, typer.Option(help="Samples per optimizer step.")
    ] = None,
    per_device_batch_size: Annotated[int | None, typer.Option(help="Samples per forward.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per sample.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (data order, fresh weights).")] = None,
    w_ce: Annotated[float | None, typer.Option(help="Weight of CE.")] = None,
    w_align: Annotated[float | None, typer.Option(help="Weight of L_Align.")] = None,
    w_vsd: Annotated[float | None, typer.Option(help="Weight of L_VSD (switch-kd).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Distillation temperature.")] = None,
    top_n: Annotated[int | None, typer.Option(help="Kneedle window (top-N logits).")] = None,
    k_min: Annotated[int | None, typer.Option(help="Smallest dynamic k.")] = None,
    k_max: Annotated[int | None, typer.Option(help="Largest dynamic k.")] = None,
    t2_scale: Annotated[
        bool | None,
        typer.Option("--t2-scale/--no-t2-scale", help="Scale bild/dbild/switch-kd terms by T^2."),
    ] = None,
    distill_special_tokens: Annotated[
        bool | None,
        typer.Option(
            "--distill-special-tokens/--no-distill-special-tokens",
            help="Distil at end-of-turn and other special-token targets too (CE always does).",
        ),
    ] = None,
    logit_loss: Annotated[
        str | None, typer.Option(help="switch-kd's logit loss: dbild (the paper) or kd.")
    ] = None,
    vision_tower_init: Annotated[
        str | None,
        typer.Option(help="student (its own tower) or teacher (a copy of the teacher's tower)."),
    ] = None,
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (GPU).")
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing")
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
    from edgekd.distill.run import DistillJob, run

    flags = {
        "training.max_steps": max_steps,
        "training.learning_rate": lr,
        "training.global_batch_size": global_batch_size,
        "training.per_device_batch_size": per_device_batch_size,
        "training.max_length": max_length,
        "training.seed": seed,
        "training.bf16": bf16,
        "training.gradient_checkpointing": gradient_checkpointing,
        "loss.w_ce": w_ce,
        "loss.w_align": w_align,
        "loss.w_vsd": w_vsd,
        "loss.temperature": temperature,
        "loss.top_n": top_n,
        "loss.k_min": k_min,
        "loss.k_max": k_max,
        "loss.t2_scale": t2_scale,
        "loss.distill_special_tokens": distill_special_tokens,
        "loss.logit_loss": logit_loss,
        "training.vision_tower_init": vision_tower_init,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(_parse_sets(set_ or []))
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


def _parse_sets(
    items: list[str], option: str = "--set", example: str = "training.max_steps=100"
) -> dict[str, object]:
    """``KEY=VALUE`` options as a dict, each value read as YAML (``100``, ``true``, ``[1, 2]``)."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not all(part.strip() for part in key.split(".")):
            raise OptionError(f"{option} '{item}': expected KEY=VALUE, e.g. {option} {example}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise OptionError(
                f"{option} '{item}': the value is not valid YAML ({problem}); quote a plain "
                f"string, e.g. {option} {key}='\"...\"'"
            ) from None
    return out


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
    profile: Annotated[str | None, typer.Option(help="Device profile (TensorRT shapes).")] = None,
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
        options=_parse_sets(option or [], "--option", "int4_block_size=64"),
    )
    with console.status(f"exporting {checkpoint} to {target} ({config.precision}) ..."):
        manifest = run_export(config)
    for line in parity_lines(manifest.get("parity", {})):
        console.print(line, highlight=False)
    size = sum(f["bytes"] for f in manifest["files"].values())
    console.print(
        f"[green]✓[/green] {target} {config.precision}: {len(manifest['files'])} files, "
        f"{size / 1e6:.1f} MB -> {output}"
    )


def parity_lines(parity: dict) -> list[str]:
    """A ✓/✗ line per parity check of a manifest's parity report, with its numbers."""
    lines = []
    for name, check in parity.get("checks", {}).items():
        mark = "[green]✓[/green]" if check.get("pass") else "[red]✗[/red]"
        numbers = ", ".join(
            f"{k} {_fmt(v)}"
            for k, v in check.items()
            if k != "pass" and isinstance(v, (int, float, bool, str))
        )
        lines.append(f"  {mark} {name}: {numbers}")
    return lines


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


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
    from edgekd.demo import run_demo

    run_demo(output, console=console)


@app.command("plan")
def plan_command(
    profile: Annotated[str, typer.Option(help="Device profile name or YAML file.")],
    model: Annotated[
        str | None,
        typer.Option(help="Preset (qwen2-0.5b-siglip-so400m), checkpoint dir or hub id."),
    ] = None,
    context: Annotated[int, typer.Option(help="Tokens held in the KV cache per sequence.")] = 2048,
    batch: Annotated[
        int | None,
        typer.Option(help="Sequences decoded together (--train: per GPU; default: the recipe's)."),
    ] = None,
    power_mode: Annotated[
        str | None, typer.Option(help="nvpmodel mode (default: the profile's).")
    ] = None,
    train: Annotated[
        bool, typer.Option("--train", help="Plan a distillation run instead of inference.")
    ] = False,
    recipe: Annotated[str, typer.Option(help="--train: recipe name or YAML file.")] = (
        "tinyllava-3b-to-0.5b"
    ),
    teacher: Annotated[
        str | None, typer.Option(help="--train: teacher preset or checkpoint (default: recipe's).")
    ] = None,
    student: Annotated[
        str | None, typer.Option(help="--train: student preset or checkpoint (default: recipe's).")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="--train: none, ddp, fsdp, deepspeed-zero3.")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="--train: processes, one per GPU.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="--train: tokens per sequence.")] = None,
    precision: Annotated[
        str | None, typer.Option(help="--train: fp32, bf16-mixed (GPU default), bf16.")
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="--train: recompute activations (default: the recipe's).",
        ),
    ] = None,
) -> None:
    """Will a model fit a device, and how fast can it decode? With --train: will a
    distillation run fit its GPUs, and how fast can a step be? (memory parts, roofline)"""
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
    from rich.table import Table

    from edgekd.distill.plan import GB, plan_train, setup_from_recipe
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
    s = result.setup
    console.print(
        f"{recipe.name}: {result.teacher} -> {result.student} on {s.processes} x "
        f"{result.profile}, {s.strategy}, {s.precision}, batch {s.batch} x {s.seq_len} tokens, "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}",
        highlight=False,
    )
    table = Table()
    table.add_column("per process", no_wrap=True)
    table.add_column("GB", justify="right")
    for part, value in result.parts.items():
        table.add_row(part, f"{value / GB:.2f}")
    colour = "green" if result.fits else "red"
    peak = f"[bold]{result.peak_bytes / GB:.2f}[/bold]"
    table.add_row(f"[bold]peak ({result.peak_phase})[/bold]", peak)
    table.add_row("usable", f"{result.usable_bytes / GB:.2f}")
    console.print(table)
    console.print(f"[{colour}]{result.verdict}[/{colour}]", highlight=False)
    seconds = result.step_seconds
    flops = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in result.step_flops.items())
    if seconds is None:
        console.print(f"step: {flops} TFLOP; the profile lists no peak to bound its time")
    else:
        console.print(
            f"step roofline: {seconds:.2f} s per micro-step at {result.peak_tflops:g} TFLOP/s "
            f"({flops} TFLOP); communication not included"
        )


def _plan_inference(device, model: str, context: int, batch: int, power_mode) -> None:
    from rich.table import Table

    from edgekd.runtime.plan import GB, plan

    result = plan(model, device, context=context, batch=batch, power_mode=power_mode)
    mode = f", {result.power_mode}" if result.power_mode else ""
    table = Table(
        title=f"{result.model} on {result.profile}{mode}: context {context}, batch {batch}; "
        f"usable {result.usable_gb:.2f} of {result.memory_gb:g} GB, {result.bandwidth_gbps:g} GB/s"
    )
    table.add_column("precision", no_wrap=True)
    for col in ("weights", "KV", "act.", "total", "fits", "margin", "tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("bound")
    for row in result.rows:
        colour = "green" if row.fits else "red"
        table.add_row(
            row.precision,
            f"{row.weights / GB:.2f}",
            f"{row.kv_bytes / GB:.3f}",
            f"{row.activation_bytes / GB:.3f}",
            f"{row.total_bytes / GB:.2f}",
            f"[{colour}]{'yes' if row.fits else 'no'}[/{colour}]",
            f"{row.margin_gb:+.2f}",
            f"{row.decode_tok_s:,.1f}",
            row.bound,
        )
    console.print(table)
    for row in result.rows:
        if not row.fits:
            console.print(f"[red]✗[/red] {row.precision}: {row.verdict}", highlight=False)
    console.print(
        "sizes in GB (1e9 bytes); tok/s: decode roofline, an upper bound (bandwidth / bytes "
        "read per token, or peak compute)"
    )


# ---- data -----------------------------------------------------------------------------------
@data_app.command("easy-vqa")
def data_easy_vqa(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    limit_train: Annotated[
        int | None, typer.Option(help="Keep the first N train questions.")
    ] = None,
    limit_test: Annotated[int | None, typer.Option(help="Keep the first N test questions.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Write the easy-vqa dataset (PyPI package) as LLaVA-format train/test splits."""
    from edgekd.data import write_easy_vqa

    meta = write_easy_vqa(out, overwrite=overwrite, limit_train=limit_train, limit_test=limit_test)
    _print_dataset_summary(out, meta)


@data_app.command("fashion-grid")
def data_fashion_grid(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    n_train: Annotated[int, typer.Option(help="Training grids.")] = 4000,
    n_test: Annotated[int, typer.Option(help="Test grids.")] = 500,
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same data).")] = 0,
    source: Annotated[Path | None, typer.Option(help="Fashion-MNIST IDX folder.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Write 2x2 Fashion-MNIST grids with position, count and category questions."""
    from edgekd.data import write_fashion_grid

    meta = write_fashion_grid(
        out, n_train=n_train, n_test=n_test, seed=seed, source=source, overwrite=overwrite
    )
    _print_dataset_summary(out, meta)


def _print_dataset_summary(out: Path, meta: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{out}")
    table.add_column("split")
    table.add_column("samples", justify="right")
    table.add_column("images", justify="right")
    table.add_column("per type")
    for split, info in meta.get("splits", {}).items():
        per_type = ", ".join(f"{k} {v}" for k, v in info.get("per_type", {}).items())
        table.add_row(split, str(info["n_samples"]), str(info.get("n_images", "")), per_type)
    console.print(table)


# ---- convert --------------------------------------------------------------------------------
ConvertOut = Annotated[Path, typer.Argument(help="Output directory (transformers Llava).")]
ConvertDtype = Annotated[
    str,
    typer.Option(
        help="dtype of the written weights: float32, float16, bfloat16, or auto (the "
        "source's: the published fp16/bf16 size instead of twice it)."
    ),
]


@convert_app.command("tinyllava")
def convert_tinyllava(
    src: Annotated[
        str,
        typer.Argument(
            help="TinyLLaVA Factory checkpoint: a local directory or a hub id "
            "(Zhang199/TinyLLaVA-Qwen2-0.5B-SigLIP)."
        ),
    ],
    out: ConvertOut,
    dtype: ConvertDtype = "float32",
    overwrite: Overwrite = False,
) -> None:
    """Convert a TinyLLaVA Factory checkpoint to a transformers LlavaForConditionalGeneration."""
    from edgekd.models.tinyllava import convert_tinyllava as convert

    path = convert(src, out, overwrite=overwrite, dtype=dtype)
    _print_converted(src, path, lambda m: m["image_processor"])


@convert_app.command("llava15")
def convert_llava15(
    src: Annotated[
        str,
        typer.Argument(
            help="Original LLaVA-1.5 checkpoint (LlavaLlamaForCausalLM): a local directory or "
            "a hub id (liuhaotian/llava-v1.5-7b)."
        ),
    ],
    out: ConvertOut,
    vision_tower: Annotated[
        str | None,
        typer.Option(
            help="CLIP checkpoint (directory or hub id) for a source without the tower's "
            "weights; default: the source's mm_vision_tower."
        ),
    ] = None,
    dtype: ConvertDtype = "float32",
    overwrite: Overwrite = False,
) -> None:
    """Convert an original LLaVA-1.5 checkpoint to a transformers LlavaForConditionalGeneration."""
    from edgekd.models.llava15 import convert_llava15 as convert

    path = convert(src, out, vision_tower=vision_tower, overwrite=overwrite, dtype=dtype)
    _print_converted(src, path, lambda m: f"vision tower {m['vision_tower']}")


def _print_converted(src: str, path: Path, detail) -> None:
    """The one-line summary of a conversion, from its ``edgekd_convert.json``."""
    import json

    from edgekd.models.tinyllava import MANIFEST

    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    console.print(
        f"[green]✓[/green] converted {src} -> {path} ({manifest['dtype']}, "
        f"{manifest['image_token']['token']} id {manifest['image_token']['id']}, "
        f"{detail(manifest)})"
    )


# ---- models ---------------------------------------------------------------------------------
@models_app.command("create")
def models_create(
    size: Annotated[
        str, typer.Argument(help="tiny, small, base, or a preset such as qwen2-0.5b-siglip-so400m.")
    ],
    out: Annotated[Path, typer.Argument(help="Output checkpoint directory.")],
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="Take the tokenizer of this checkpoint (teacher and student must share one)."
        ),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(help="LLaVA JSON whose text trains the tokenizer (when no --tokenizer)."),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Create a randomly initialised VLM of a named size and save it as a checkpoint."""
    from edgekd.models.factory import create_checkpoint

    info = create_checkpoint(
        size, out, seed=seed, tokenizer_from=tokenizer, corpus=corpus, overwrite=overwrite
    )
    console.print(f"[green]✓[/green] {size} -> {out} ({info['total'] / 1e6:.2f}M parameters)")


@models_app.command("info")
def models_info(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint directory or hub id.")],
) -> None:
    """Show a checkpoint's shapes, parameter counts and tokenizer."""
    from rich.table import Table

    from edgekd.models import VLM, count_parameters

    vlm = VLM.from_pretrained(ckpt)
    table = Table(title=ckpt, show_header=False)
    for key, value in count_parameters(vlm).items():
        table.add_row(f"params.{key}", f"{value:,}")
    cfg = vlm.config
    table.add_row(
        "vision",
        f"{cfg.vision_config.model_type} {cfg.vision_config.hidden_size}d "
        f"x{cfg.vision_config.num_hidden_layers}, {cfg.vision_config.image_size}px",
    )
    table.add_row(
        "text",
        f"{cfg.text_config.model_type} {cfg.text_config.hidden_size}d "
        f"x{cfg.text_config.num_hidden_layers}, vocab {vlm.vocab_size}",
    )
    table.add_row("visual tokens / image", str(vlm.num_image_tokens()))
    table.add_row("image token id", str(vlm.image_token_id))
    table.add_row("tokenizer fingerprint", vlm.fingerprint())
    console.print(table)


# ---- profiles -------------------------------------------------------------------------------
@profiles_app.command("list")
def profiles_list() -> None:
    """List the built-in device and recipe profiles."""
    from rich.table import Table

    from edgekd.profiles import list_profiles, load_device_profile, load_recipe

    devices = Table(title="device profiles")
    devices.add_column("name", no_wrap=True)
    for col in ("kind", "memory GB", "GB/s", "fp16 TFLOP/s", "target"):
        devices.add_column(col, justify="right" if col[0].isupper() or "/" in col else "left")
    for name in list_profiles("device"):
        p = load_device_profile(name)
        fp16 = p.peak_tflops.get("fp16")
        devices.add_row(
            name,
            p.kind,
            f"{p.memory_gb:g}",
            f"{p.memory_bandwidth_gbps:g}",
            "-" if fp16 is None else f"{fp16:g}",
            p.preferred_target,
        )
    console.print(devices)
    recipes = Table(title="recipe profiles")
    recipes.add_column("name", no_wrap=True)
    for col in ("method", "strategy", "description"):
        recipes.add_column(col)
    for name in list_profiles("recipe"):
        r = load_recipe(name)
        recipes.add_row(name, r.method, r.distributed.strategy, r.description)
    console.print(recipes)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="Profile name or YAML path.")]) -> None:
    """Print one profile (device or recipe) as validated YAML."""
    from edgekd.profiles import show_profile

    typer.echo(show_profile(name), nl=False)  # plain YAML: pipeable into a file


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that context managers remove temporary outputs."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


# Errors of the machine, not of edgekd: a full disk, a read-only or forbidden file system.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def error_line(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (a traceback)."""
    if isinstance(exc, click_errors.ClickException):
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        return exc.format_message() + where
    if isinstance(exc, EdgeKDError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        from edgekd.io import disk_full

        path = exc.filename or "a file"
        full = disk_full(exc, path)
        return str(full) if full is not None else f"cannot access '{path}': {exc.strerror}"
    return None


def main() -> None:
    """Entry point: run the app; user errors become one line and exit code 2 (see the module)."""
    # edgekd draws its own progress (rich); the libraries' tqdm bars and info logs are noise here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    signal.signal(signal.SIGTERM, _terminate)
    _debug["on"] = False
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError:
        sys.exit(2)  # the help has been printed
    except Terminated:
        err_console.print("[bold red]terminated[/bold red] (SIGTERM); temporary outputs removed")
        sys.exit(143)
    except typer.Abort:
        err_console.print("[bold red]aborted[/bold red]")
        sys.exit(1)
    except Exception as e:
        line = error_line(e)
        if line is None:
            raise  # a bug: its traceback shows where it comes from
        if _debug["on"] or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exception(e)
        text = " ".join(part.strip() for part in line.splitlines() if part.strip())
        err_console.print(
            f"[bold red]error:[/bold red] {escape(text)}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
