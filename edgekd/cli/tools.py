"""The tool commands: ``data``, ``convert``, ``models`` and ``profiles``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekd.cli.app import Overwrite, console, convert_app, data_app, models_app, profiles_app
from edgekd.cli.tables import (
    print_assembled,
    print_converted,
    print_dataset,
    print_model,
    print_profiles,
    print_pruned,
)
from edgekd.errors import OptionError


# ---- data -------------------------------------------------------------------------------
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
    print_dataset(out, meta, console)


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
    print_dataset(out, meta, console)


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
    print_converted(src, path, lambda m: m["image_processor"], console)


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
    print_converted(src, path, lambda m: f"vision tower {m['vision_tower']}", console)


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


def _indices(text: str | None, option: str) -> list[int] | None:
    """``"0,3,6"`` -> ``[0, 3, 6]``; OptionError (one line) for anything else."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OptionError(f"{option} '{text}': comma-separated layer indices, e.g. 0,3,6") from None


@models_app.command("prune")
def models_prune(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint directory or hub id (the teacher).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output checkpoint directory.")],
    keep_layers: Annotated[
        str | None, typer.Option(help="Decoder layers to keep, e.g. 0,3,6,9 (0-based).")
    ] = None,
    layers: Annotated[
        int | None, typer.Option(help="How many decoder layers to keep, evenly spaced.")
    ] = None,
    keep_vision_layers: Annotated[
        str | None, typer.Option(help="Vision tower layers to keep (default: all).")
    ] = None,
    vision_layers: Annotated[
        int | None, typer.Option(help="How many vision layers to keep, evenly spaced.")
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Cut a student from a checkpoint by keeping some of its layers (depth pruning); the
    tokenizer, processor, embeddings, head and projector are kept as they are."""
    from edgekd.models.prune import prune

    record = prune(
        ckpt,
        output,
        keep_layers=_indices(keep_layers, "--keep-layers"),
        layers=layers,
        keep_vision_layers=_indices(keep_vision_layers, "--keep-vision-layers"),
        vision_layers=vision_layers,
        overwrite=overwrite,
    )
    print_pruned(ckpt, output, record, console)


@models_app.command("assemble")
def models_assemble(
    vision: Annotated[
        str, typer.Option(help="Vision tower: a SigLIP, CLIP or DINOv2 checkpoint dir or hub id.")
    ],
    language: Annotated[
        str, typer.Option(help="Language model: a causal LM checkpoint dir, hub id or .gguf file.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output checkpoint directory.")],
    projector: Annotated[str, typer.Option(help="Projector (new weights).")] = "mlp2x_gelu",
    image_size: Annotated[
        int | None, typer.Option(help="Input resolution, a multiple of the patch size.")
    ] = None,
    select: Annotated[
        str, typer.Option(help="default: drop the tower's first token; full: keep all.")
    ] = "default",
    feature_layer: Annotated[
        int, typer.Option(help="The tower's hidden_states index the projector reads.")
    ] = -2,
    seed: Annotated[int, typer.Option(help="Seeds the projector's initialisation.")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Build a LLaVA-style VLM from a pretrained vision tower and language model, with a new
    projector (train it next: edgekd distill --method sft --set
    training.train_language_model=false)."""
    from edgekd.models.assemble import assemble

    record = assemble(
        vision,
        language,
        output,
        projector=projector,
        image_size=image_size,
        select=select,
        feature_layer=feature_layer,
        seed=seed,
        overwrite=overwrite,
    )
    print_assembled(output, record, console)


@models_app.command("info")
def models_info(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint directory or hub id.")],
) -> None:
    """Show a checkpoint's shapes, parameter counts and tokenizer."""
    from edgekd.models import VLM, count_parameters

    vlm = VLM.from_pretrained(ckpt)
    print_model(ckpt, vlm, count_parameters(vlm), console)


@profiles_app.command("list")
def profiles_list() -> None:
    """List the built-in device and recipe profiles."""
    from edgekd.profiles import list_profiles, load_device_profile, load_recipe

    devices = {name: load_device_profile(name) for name in list_profiles("device")}
    recipes = {name: load_recipe(name) for name in list_profiles("recipe")}
    print_profiles(devices, recipes, console)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="Profile name or YAML path.")]) -> None:
    """Print one profile (device or recipe) as validated YAML."""
    from edgekd.profiles import show_profile

    typer.echo(show_profile(name), nl=False)  # plain YAML: pipeable into a file
