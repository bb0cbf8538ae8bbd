"""Trainer callbacks: a rich progress bar with the loss parts, and the JSON training log."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from edgekd.io import atomic_write_json

_SHOWN = (
    ("loss", "loss", ".3f"),
    ("ce", "ce", ".3f"),
    ("align", "align", ".3f"),
    ("vsd", "vsd", ".3f"),
    ("k_t", "k_t", ".1f"),
    ("k_s", "k_s", ".1f"),
    ("k_at_min", "k=min", ".0%"),
    ("k_at_max", "k=max", ".0%"),
    ("learning_rate", "lr", ".1e"),
    ("tokens_per_s", "tok/s", ".0f"),
)


def format_log(logs: dict[str, float]) -> str:
    """One dense line: loss parts, mean k per side and its shares at the clamp's bounds,
    learning rate and throughput."""
    return "  ".join(f"{label} {logs[key]:{fmt}}" for key, label, fmt in _SHOWN if key in logs)


class RichProgressCallback(TrainerCallback):
    """A progress bar over optimizer steps whose text is the latest log line (main process only)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]distill[/bold]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "steps", total=state.max_steps, completed=state.global_step
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs and "loss" in logs:
            width = len(str(state.max_steps))
            self.progress.console.print(
                f"step {state.global_step:>{width}}/{state.max_steps}  {format_log(logs)}",
                highlight=False,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class JsonLogCallback(TrainerCallback):
    """Writes the whole log history (restored on resume) to a JSON file after every log."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            atomic_write_json(
                self.path,
                {
                    "global_step": state.global_step,
                    "max_steps": state.max_steps,
                    "log_history": state.log_history,
                },
            )
