"""``edgekd demo``: the offline end-to-end run on CPU, stage by stage.

Each stage writes one directory under the demo's working directory, atomically, so a re-run
reuses every finished stage and redoes only what is missing or was interrupted.

Stages: data (easy-vqa in LLaVA format, colour and shape questions) -> initial teacher and
student checkpoints (tiny SigLIP + Qwen2 models sharing one tokenizer trained on the data) ->
teacher trained with sft -> students distilled with switch-kd and, for reference, trained with
sft -> accuracy of each on the test split -> the switch-kd student exported to ONNX (fp32,
int8) and GGUF (f16, Q8_0, Q4_K_M), each proving parity with PyTorch -> ``edgekd bench`` of
every student and artifact against the teacher (latency, memory, accuracy, agreement).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekd.export import ExportConfig, export
from edgekd.io import atomic_write_json
from edgekd.profiles import load_recipe
from edgekd.runtime.bench import BenchConfig, run_bench
from edgekd.runtime.report import print_table

TEACHER_SIZE, STUDENT_SIZE = "small", "tiny"
# The setting of docs/results.md (seed 0): easy-vqa's open-ended questions, where a tiny model
# cannot answer from the question text alone; a teacher trained long, students trained briefly.
QUESTION_TYPES = ("color", "shape")
RECIPE = "easyvqa-cpu"  # batch, learning rate, loss settings and the students' 300 steps
TEACHER_STEPS = 2000  # the teacher trains longer than the recipe's students
STUDENT_STEPS: int | None = None  # None: the recipe's max_steps
BATCH: int | None = None  # None: the recipe's batch
EVAL_LIMIT = 600
EXPORTS = (
    ("onnx", "fp32"),
    ("onnx", "int8"),
    ("gguf", "f16"),
    ("gguf", "q8_0"),
    ("gguf", "q4_k_m"),
)
BENCH_LIMIT, BENCH_RUNS, BENCH_TOKENS = EVAL_LIMIT, 10, 16
EXPORT_EVAL_LIMIT = 100  # questions for the accuracy delta of the quantized exports
BENCH_ISOLATE = True  # each benched model in its own process (its own peak memory)


@dataclass
class Stage:
    name: str
    output: Path
    run: Callable[[Path], object]
    description: str


def _train(
    root: Path,
    method: str,
    student: Path,
    teacher: Path | None,
    steps: int | None,
    console: Console,
) -> Callable[[Path], object]:
    def stage(out: Path) -> object:
        from edgekd.distill.run import DistillJob, has_checkpoint, run

        # every run trains its vision tower (sft too), so that only the objective differs
        overrides: dict[str, object] = {"training.train_vision_tower": True}
        if steps is not None:
            overrides["training.max_steps"] = steps
        if BATCH is not None:
            overrides["training.global_batch_size"] = BATCH
            overrides["training.per_device_batch_size"] = BATCH
        job = DistillJob(
            output=out,
            recipe=RECIPE,
            method=method,
            student=str(student),
            teacher=str(teacher) if teacher else None,
            data=_split(root, "train"),
            overrides=overrides,
            save_steps=100,
            logging_steps=50,
            device="cpu",
            resume=has_checkpoint(out),
            overwrite=True,
        )
        return run(job, console=console)

    return stage


def demo_stages(root: Path, console: Console) -> list[Stage]:
    """The demo's stages in order; each ``run`` writes its ``output`` atomically."""
    from edgekd.data import write_easy_vqa
    from edgekd.models.factory import create_checkpoint

    data = root / "data" / "easy-vqa"
    t_init, s_init = root / "models" / "teacher-init", root / "models" / "student-init"
    teacher = root / "runs" / "teacher"
    steps = STUDENT_STEPS or load_recipe(RECIPE).training.max_steps
    return [
        Stage("data", data, lambda out: write_easy_vqa(out), "easy-vqa as LLaVA-format JSON"),
        Stage(
            "teacher-init",
            t_init,
            lambda out: create_checkpoint(TEACHER_SIZE, out, seed=0, corpus=data / "train.json"),
            f"'{TEACHER_SIZE}' VLM with a tokenizer trained on the data",
        ),
        Stage(
            "student-init",
            s_init,
            lambda out: create_checkpoint(STUDENT_SIZE, out, seed=0, tokenizer_from=t_init),
            f"'{STUDENT_SIZE}' VLM sharing the teacher's tokenizer",
        ),
        Stage(
            "teacher",
            teacher / "model",
            _stage_dir(_train(root, "sft", t_init, None, TEACHER_STEPS, console)),
            f"sft, {TEACHER_STEPS} steps",
        ),
        Stage(
            "student-switch-kd",
            root / "runs" / "switch-kd" / "model",
            _stage_dir(
                _train(root, "switch-kd", s_init, teacher / "model", STUDENT_STEPS, console)
            ),
            f"switch-kd from the teacher, {steps} steps",
        ),
        Stage(
            "student-sft",
            root / "runs" / "sft" / "model",
            _stage_dir(_train(root, "sft", s_init, None, STUDENT_STEPS, console)),
            f"sft (reference), {steps} steps",
        ),
        Stage(
            "accuracy",
            root / "report" / "accuracy.json",
            lambda out: _accuracy(root, out),
            f"greedy exact match on {EVAL_LIMIT} test questions",
        ),
        *(
            Stage(
                f"export-{target}-{precision}",
                root / "artifacts" / f"{target}-{precision}",
                _export(root, target, precision),
                f"switch-kd student -> {target} {precision}, parity with PyTorch checked",
            )
            for target, precision in EXPORTS
        ),
        Stage(
            "bench",
            root / "report" / "bench",
            lambda out: _bench(root, out, console),
            f"latency, memory and accuracy on {BENCH_LIMIT} test questions, against the teacher",
        ),
    ]


def _export(root: Path, target: str, precision: str) -> Callable[[Path], object]:
    def stage(out: Path) -> object:
        config = ExportConfig(
            checkpoint=str(root / "runs" / "switch-kd" / "model"),
            target=target,
            precision=precision,
            output=out,
            n_parity_prompts=4,
            eval_data=_split(root, "test") if precision not in ("fp32", "f16") else None,
            eval_limit=EXPORT_EVAL_LIMIT,
        )
        return export(config)

    return stage


def _bench(root: Path, out: Path, console: Console) -> object:
    models = {
        "switch-kd (torch)": root / "runs" / "switch-kd" / "model",
        "sft (torch)": root / "runs" / "sft" / "model",
        **{f"switch-kd {t} {p}": root / "artifacts" / f"{t}-{p}" for t, p in EXPORTS},
    }
    config = BenchConfig(
        models=[str(m) for m in models.values()],
        names=list(models),
        teacher=str(root / "runs" / "teacher" / "model"),
        data=_split(root, "test"),
        output=out,
        device="cpu",
        threads=min(2, os.cpu_count() or 1),
        runs=BENCH_RUNS,
        warmup=2,
        speed_tokens=BENCH_TOKENS,
        limit=BENCH_LIMIT,
        max_new_tokens=6,
        isolate=BENCH_ISOLATE,
    )
    return run_bench(config, console=console, show_table=False)  # printed at the end


def _split(root: Path, split: str) -> Path:
    from edgekd.data import subset_by_type

    return subset_by_type(root / "data" / "easy-vqa" / f"{split}.json", QUESTION_TYPES)


def _stage_dir(train: Callable[[Path], object]) -> Callable[[Path], object]:
    """A training stage's output is ``RUN/model``: train into ``RUN``."""
    return lambda model_dir: train(model_dir.parent)


def _accuracy(root: Path, out: Path) -> dict:
    from edgekd.evaluate import evaluate
    from edgekd.models import VLM  # torch

    test = _split(root, "test")
    models = {
        "teacher": root / "runs" / "teacher" / "model",
        "switch-kd student": root / "runs" / "switch-kd" / "model",
        "sft student": root / "runs" / "sft" / "model",
    }
    results = {}
    for name, path in models.items():
        r = evaluate(
            VLM.from_pretrained(path), test, limit=EVAL_LIMIT, batch_size=64, max_new_tokens=6
        )
        r.pop("predictions")
        results[name] = r
    atomic_write_json(out, results)
    return results


def run_demo(root: str | Path, console: Console | None = None) -> list[dict]:
    """Run (or resume) every demo stage under ``root`` and return one summary row per stage."""
    import torch

    console = console or Console()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    stages = demo_stages(root, console)
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
        console.print(f"{label}: {stage.description} ...")
        start = time.perf_counter()
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
    _print_tables(root, rows, console)
    return rows


def _print_tables(root: Path, rows: list[dict], console: Console) -> None:
    table = Table(title="edgekd demo: stages")
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["stage"], row["status"], f"{row['seconds']:.1f}", row["output"])
    console.print(table)
    report = root / "report" / "accuracy.json"
    results = json.loads(report.read_text())
    types = sorted(next(iter(results.values()))["per_type"])
    acc = Table(title="accuracy on easy-vqa colour/shape test questions (greedy exact match, %)")
    for col in ("model", "overall", *types):
        acc.add_column(col, justify="left" if col == "model" else "right")
    for name, r in results.items():
        acc.add_row(
            name,
            f"{100 * r['exact_match']:.1f}",
            *(f"{100 * r['per_type'][t]['exact_match']:.1f}" for t in types),
        )
    console.print(acc)
    bench = root / "report" / "bench"
    if (bench / "bench.json").is_file():
        print_table(json.loads((bench / "bench.json").read_text()), console)
        console.print(f"accuracy: {report}")
        console.print(f"report: {bench / 'bench.md'} (bench.json, bench.png)")
    else:
        console.print(f"report: {report}")
