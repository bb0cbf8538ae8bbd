"""Does Switch-KD help? Train a teacher, then students with every method, and compare.

One command regenerates ``docs/results.md`` and its JSON:

    python benchmarks/distill_methods.py --dataset easy-vqa --seeds 0 1 2

Protocol: a ``--teacher-size`` model is trained with ``sft`` on the task's train split. For each
seed a ``--student-size`` model is initialised once (seed = init seed = data-order seed) and
trained from that same initialisation with each method for the same number of steps, batch,
learning rate and trainable parameters (the student vision tower is trained by every method, so
the comparison isolates the loss). Accuracy is greedy-decoded exact match on the test split,
overall and per question type, mean +- std over seeds. Finished runs are reused on re-runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from rich.console import Console

from edgekd.envinfo import snapshot

METHODS = ("sft", "kd", "bild", "dbild", "switch-kd")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="easy-vqa", choices=("easy-vqa", "fashion-grid"))
    ap.add_argument("--teacher-size", default="small")
    ap.add_argument("--student-size", default="tiny")
    ap.add_argument("--teacher-steps", type=int, default=2500)
    ap.add_argument("--student-steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--eval-limit", type=int, default=600)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-distill"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_methods.json"))
    ap.add_argument("--report", type=Path, default=Path("docs/results.md"))
    return ap.parse_args()


def train(
    args,
    work: Path,
    method: str,
    student: Path,
    teacher: Path | None,
    seed: int,
    steps: int,
    quiet: Console,
) -> Path:
    from edgekd.distill.run import DistillJob, run

    out = work / "runs" / f"{method}-seed{seed}" if teacher else work / "teacher"
    if (out / "model" / "model.safetensors").exists():
        return out / "model"
    overrides = {
        "training.max_steps": steps,
        "training.global_batch_size": args.batch,
        "training.per_device_batch_size": args.batch,
        "training.learning_rate": args.lr,
        "training.seed": seed,
        "training.train_vision_tower": True,
    }
    job = DistillJob(
        output=out,
        recipe="easyvqa-cpu",
        method=method,
        teacher=str(teacher) if teacher else None,
        student=str(student),
        data=work / "data" / "train.json",
        overrides=overrides,
        overwrite=True,
        save_steps=10 * steps,
        logging_steps=50,
        device="cpu",
    )
    run(job, console=quiet)
    return out / "model"


def accuracy(model: Path, work: Path, limit: int) -> dict:
    from edgekd.evaluate import evaluate
    from edgekd.models import VLM

    cache = model.parent / "eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    result = evaluate(
        VLM.from_pretrained(model),
        work / "data" / "test.json",
        limit=limit,
        batch_size=64,
        max_new_tokens=6,
    )
    result.pop("predictions")
    cache.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    import torch

    from edgekd.data import DATASETS
    from edgekd.models.factory import create_checkpoint

    args = parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    console, quiet = Console(), Console(file=open(os.devnull, "w"))
    work = args.work / args.dataset
    if not (work / "data" / "train.json").exists():
        DATASETS[args.dataset](work / "data")
    meta = json.loads((work / "data" / "meta.json").read_text())
    start = time.perf_counter()
    t_init = work / "init" / "teacher"
    if not t_init.exists():
        create_checkpoint(args.teacher_size, t_init, seed=0, corpus=work / "data" / "train.json")
    teacher = train(args, work, "sft", t_init, None, 0, args.teacher_steps, quiet)
    results = {"teacher": accuracy(teacher, work, args.eval_limit), "students": {}}
    console.print(f"teacher ({args.teacher_size}): {results['teacher']['exact_match']:.3f}")
    for seed in args.seeds:
        s_init = work / "init" / f"student-seed{seed}"
        if not s_init.exists():
            create_checkpoint(args.student_size, s_init, seed=seed, tokenizer_from=t_init)
        for method in args.methods:
            model = train(args, work, method, s_init, teacher, seed, args.student_steps, quiet)
            acc = accuracy(model, work, args.eval_limit)
            results["students"].setdefault(method, {})[str(seed)] = acc
            console.print(f"seed {seed} {method:10s} {acc['exact_match']:.3f}")
    report = summarise(args, meta, results, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown(args, report))
    console.print(f"wrote {args.out} and {args.report}")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(args, meta: dict, results: dict, seconds: float) -> dict:
    types = sorted(results["teacher"]["per_type"])
    table = {}
    for method, per_seed in results["students"].items():
        runs = list(per_seed.values())
        row = {"overall": _mean_std([r["exact_match"] for r in runs]), "n_seeds": len(runs)}
        for t in types:
            row[t] = _mean_std([r["per_type"][t]["exact_match"] for r in runs])
        table[method] = row
    majority = meta.get("majority_baseline_test", {})
    baseline = {t: v["accuracy"] for t, v in majority.get("per_type", {}).items()}
    if "overall" in majority:
        baseline["overall"] = majority["overall"]
    return {
        "benchmark": "distill_methods",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "majority_baseline": baseline,
        "teacher": results["teacher"],
        "students": results["students"],
        "summary": table,
        "question_types": types,
        "wall_s": round(seconds, 1),
        "env": snapshot(),
    }


def markdown(args, report: dict) -> str:
    types = report["question_types"]
    teacher = report["teacher"]
    lines = [
        "# Switch-KD against its baselines on a built-in task",
        "",
        f"Task: `{args.dataset}` (test split, first {args.eval_limit} questions, greedy exact "
        f"match). Teacher: `{args.teacher_size}` trained with sft for {args.teacher_steps} steps. "
        f"Students: `{args.student_size}`, {args.student_steps} steps each, batch {args.batch}, "
        f"LR {args.lr}, same initialisation per seed, vision tower trained by every method; "
        f"seeds {', '.join(map(str, args.seeds))}. Mean ± std over seeds, in percent.",
        "",
        "| model | overall | " + " | ".join(types) + " |",
        "|---|---|" + "---|" * len(types),
        f"| teacher | {100 * teacher['exact_match']:.1f} | "
        + " | ".join(f"{100 * teacher['per_type'][t]['exact_match']:.1f}" for t in types)
        + " |",
    ]
    for method, row in report["summary"].items():
        cells = [row["overall"]] + [row[t] for t in types]
        lines.append(
            f"| {method} | " + " | ".join(f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in cells) + " |"
        )
    base = report.get("majority_baseline")
    if base:
        lines += [
            "",
            "Majority-answer baseline per type (test): "
            + ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(base.items()))
            + ".",
        ]
    lines += [
        "",
        f"Regenerate (about {report['wall_s'] / 60:.0f} min on 2 CPU cores):",
        "",
        "```bash",
        "python "
        + " ".join(
            [
                "benchmarks/distill_methods.py",
                "--dataset",
                args.dataset,
                "--seeds",
                *map(str, args.seeds),
            ]
        ),
        "```",
        "",
        f"Raw numbers and environment: `{args.out}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
