"""``edgekd demo``: the offline end-to-end run on CPU, stage by stage.

Each stage writes one directory under the demo's working directory, atomically, so a re-run
reuses every finished stage and redoes only what is missing or was interrupted.

Stages: data (easy-vqa in LLaVA format) -> initial teacher and student checkpoints (tiny
SigLIP + Qwen2 models sharing one tokenizer trained on the data). Distillation, export and
benchmarking join the demo as those stages land.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

TEACHER_SIZE, STUDENT_SIZE = "small", "tiny"


@dataclass
class Stage:
    name: str
    output: Path
    run: Callable[[Path], object]
    description: str


def demo_stages(root: Path) -> list[Stage]:
    """The demo's stages in order; each ``run`` writes its ``output`` atomically."""
    from edgekd.data import write_easy_vqa
    from edgekd.models.factory import create_checkpoint

    data = root / "data" / "easy-vqa"
    teacher_init, student_init = root / "models" / "teacher-init", root / "models" / "student-init"
    return [
        Stage(
            "data", data, lambda out: write_easy_vqa(out), "easy-vqa as LLaVA-format JSON + images"
        ),
        Stage(
            "teacher-init",
            teacher_init,
            lambda out: create_checkpoint(TEACHER_SIZE, out, seed=0, corpus=data / "train.json"),
            f"'{TEACHER_SIZE}' VLM with a tokenizer trained on the data",
        ),
        Stage(
            "student-init",
            student_init,
            lambda out: create_checkpoint(STUDENT_SIZE, out, seed=0, tokenizer_from=teacher_init),
            f"'{STUDENT_SIZE}' VLM sharing the teacher's tokenizer",
        ),
    ]


def run_demo(root: str | Path, console: Console | None = None) -> list[dict]:
    """Run (or resume) every demo stage under ``root`` and return one summary row per stage."""
    console = console or Console()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    stages = demo_stages(root)
    for i, stage in enumerate(stages, 1):
        label = f"[{i}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            console.print(f"{label}: [dim]reused[/dim] {stage.output}")
            rows.append(
                {
                    "stage": stage.name,
                    "status": "reused",
                    "seconds": 0.0,
                    "output": str(stage.output),
                }
            )
            continue
        start = time.perf_counter()
        with console.status(f"{label}: {stage.description} ..."):
            stage.run(stage.output)
        seconds = time.perf_counter() - start
        console.print(f"{label}: [green]done[/green] in {seconds:.1f}s -> {stage.output}")
        rows.append(
            {
                "stage": stage.name,
                "status": "done",
                "seconds": round(seconds, 1),
                "output": str(stage.output),
            }
        )
    table = Table(title="edgekd demo")
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["stage"], row["status"], f"{row['seconds']:.1f}", row["output"])
    console.print(table)
    console.print("Next stages (distill, export, bench) join the demo as they land in edgekd.")
    return rows
