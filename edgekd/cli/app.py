"""The command line's shared pieces: the Typer apps, the consoles, and options that several
commands read the same way."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from edgekd.errors import OptionError

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
DEBUG = {"on": False}  # --debug of this invocation (the environment is left as it was)


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Show the traceback of errors (or set {DEBUG_ENV}=1)."),
    ] = False,
) -> None:
    DEBUG["on"] = debug


def parse_sets(
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
