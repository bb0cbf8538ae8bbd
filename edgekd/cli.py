"""The ``edgekd`` command line: a thin Typer shell over the library API.

Each command parses its options, calls one library function and renders the result. Heavy
imports (torch, transformers, onnxruntime, llama_cpp, tensorrt) happen inside the commands so
that ``edgekd --help`` answers at once. User errors (:class:`edgekd.errors.EdgeKDError`) print
as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from edgekd.errors import EdgeKDError

app = typer.Typer(
    name="edgekd",
    help="Distil vision-language models (Switch-KD), export them to ONNX / TensorRT / GGUF, "
    "and benchmark them on GPUs and Jetson devices.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Write built-in datasets in LLaVA format.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert other checkpoint layouts to transformers' Llava.",
                          no_args_is_help=True)
profiles_app = typer.Typer(help="List and show device and recipe profiles.", no_args_is_help=True)
models_app = typer.Typer(help="Create tiny or shape-faithful models and inspect checkpoints.",
                         no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(convert_app, name="convert")
app.add_typer(profiles_app, name="profiles")
app.add_typer(models_app, name="models")

console = Console()
err_console = Console(stderr=True)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]


def _not_landed(command: str, what: str) -> None:
    raise EdgeKDError(f"'edgekd {command}' ({what}) is not available in edgekd {_version()} yet")


def _version() -> str:
    from edgekd import __version__

    return __version__


# ---- stages ---------------------------------------------------------------------------------
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def distill() -> None:
    """Distil a teacher VLM into a student with Switch-KD (or a baseline method)."""
    _not_landed("distill", "Switch-KD distillation")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export() -> None:
    """Export a student to ONNX, TensorRT or GGUF, with parity checks against PyTorch."""
    _not_landed("export", "ONNX / TensorRT / GGUF export")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench() -> None:
    """Benchmark exported models: latency, memory, energy and accuracy against the teacher."""
    _not_landed("bench", "benchmarks on CPU, GPU and Jetson")


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Working directory of the demo.")] = Path("runs/demo"),
) -> None:
    """Run the offline end-to-end demo on CPU (finished stages are reused)."""
    from edgekd.demo import run_demo

    run_demo(output, console=console)


# ---- data -----------------------------------------------------------------------------------
@data_app.command("easy-vqa")
def data_easy_vqa(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    limit_train: Annotated[Optional[int], typer.Option(help="Keep the first N train questions.")] = None,
    limit_test: Annotated[Optional[int], typer.Option(help="Keep the first N test questions.")] = None,
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
    source: Annotated[Optional[Path], typer.Option(help="Fashion-MNIST IDX folder.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Write 2x2 Fashion-MNIST grids with position, count and category questions."""
    from edgekd.data import write_fashion_grid

    meta = write_fashion_grid(out, n_train=n_train, n_test=n_test, seed=seed, source=source,
                              overwrite=overwrite)
    _print_dataset_summary(out, meta)


def _print_dataset_summary(out: Path, meta: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{out}")
    table.add_column("split")
    table.add_column("samples", justify="right")
    for split in ("train", "test"):
        key = f"n_{split}"
        if key in meta:
            table.add_row(split, str(meta[key]))
    console.print(table)


# ---- convert --------------------------------------------------------------------------------
@convert_app.command("tinyllava")
def convert_tinyllava(
    src: Annotated[Path, typer.Argument(help="TinyLLaVA Factory checkpoint directory.")],
    out: Annotated[Path, typer.Argument(help="Output directory (transformers Llava).")],
    overwrite: Overwrite = False,
) -> None:
    """Convert a TinyLLaVA Factory checkpoint to a transformers LlavaForConditionalGeneration."""
    from edgekd.models.tinyllava import convert_tinyllava as convert

    path = convert(src, out, overwrite=overwrite)
    console.print(f"[green]✓[/green] converted {src} -> {path}")


# ---- models ---------------------------------------------------------------------------------
@models_app.command("create")
def models_create(
    size: Annotated[str, typer.Argument(help="tiny, small, base, or a preset such as "
                                             "qwen2-0.5b-siglip-so400m.")],
    out: Annotated[Path, typer.Argument(help="Output checkpoint directory.")],
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="Take the tokenizer of this checkpoint (teacher and student must share one).")] = None,
    corpus: Annotated[Optional[Path], typer.Option(
        help="LLaVA JSON whose text trains the tokenizer (when no --tokenizer).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Create a randomly initialised VLM of a named size and save it as a checkpoint."""
    from edgekd.models.factory import create_checkpoint

    info = create_checkpoint(size, out, seed=seed, tokenizer_from=tokenizer, corpus=corpus,
                             overwrite=overwrite)
    console.print(f"[green]✓[/green] {size} -> {out} ({info['total'] / 1e6:.2f}M parameters)")


@models_app.command("info")
def models_info(ckpt: Annotated[str, typer.Argument(help="Checkpoint directory or hub id.")]) -> None:
    """Show a checkpoint's shapes, parameter counts and tokenizer."""
    from rich.table import Table

    from edgekd.models import VLM, count_parameters

    vlm = VLM.from_pretrained(ckpt)
    table = Table(title=ckpt, show_header=False)
    for key, value in count_parameters(vlm).items():
        table.add_row(f"params.{key}", f"{value:,}")
    cfg = vlm.config
    table.add_row("vision", f"{cfg.vision_config.model_type} {cfg.vision_config.hidden_size}d "
                  f"x{cfg.vision_config.num_hidden_layers}, {cfg.vision_config.image_size}px")
    table.add_row("text", f"{cfg.text_config.model_type} {cfg.text_config.hidden_size}d "
                  f"x{cfg.text_config.num_hidden_layers}, vocab {vlm.vocab_size}")
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
        devices.add_row(name, p.kind, f"{p.memory_gb:g}", f"{p.memory_bandwidth_gbps:g}",
                        "-" if fp16 is None else f"{fp16:g}", p.preferred_target)
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


def main() -> None:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    try:
        app()
    except EdgeKDError as e:
        err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/bold red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
