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
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--eval-limit", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy machine)")
    ap.add_argument(
        "--question-types",
        nargs="+",
        default=["color", "shape"],
        help="train and test on these question types only ('all' for every type)",
    )
    ap.add_argument("--work", type=Path, default=Path("runs/bench-distill"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_methods.json"))
    ap.add_argument("--report", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--report-only", action="store_true", help="rewrite --report from --out")
    return ap.parse_args()


def data_dir(args) -> Path:
    return args.work / args.dataset / "data"


def split_file(args, split: str) -> Path:
    """The split's JSON, restricted to ``--question-types`` (written once next to the full one)."""
    from edgekd.data import subset_by_type

    full = data_dir(args) / f"{split}.json"
    return full if args.question_types == ["all"] else subset_by_type(full, args.question_types)


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
    from edgekd.distill.run import DistillJob, has_checkpoint, run

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
        data=split_file(args, "train"),
        overrides=overrides,
        resume=has_checkpoint(out),  # a run cut short continues
        overwrite=True,  # a leftover without a checkpoint is started over
        save_steps=250,
        logging_steps=50,
        device="cpu",
    )
    run(job, console=quiet)
    return out / "model"


def accuracy(args, model: Path, work: Path, limit: int) -> dict:
    from edgekd.evaluate import evaluate
    from edgekd.models import VLM

    cache = model.parent / "eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    result = evaluate(
        VLM.from_pretrained(model),
        split_file(args, "test"),
        data_dir(args),
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
    if args.report_only:
        args.report.write_text(markdown(args, json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    console, quiet = Console(), Console(file=open(os.devnull, "w"))
    tag = "all" if args.question_types == ["all"] else "-".join(args.question_types)
    work = args.work / args.dataset / tag  # runs and initial weights of this configuration
    if not (data_dir(args) / "train.json").exists():
        DATASETS[args.dataset](data_dir(args))
    meta = json.loads((data_dir(args) / "meta.json").read_text())
    start = time.perf_counter()
    t_init = work / "init" / "teacher"
    if not t_init.exists():
        create_checkpoint(args.teacher_size, t_init, seed=0, corpus=data_dir(args) / "train.json")
    teacher = train(args, work, "sft", t_init, None, 0, args.teacher_steps, quiet)
    results = {"teacher": accuracy(args, teacher, work, args.eval_limit), "students": {}}
    console.print(f"teacher ({args.teacher_size}): {results['teacher']['exact_match']:.3f}")
    for seed in args.seeds:
        s_init = work / "init" / f"student-seed{seed}"
        if not s_init.exists():
            create_checkpoint(args.student_size, s_init, seed=seed, tokenizer_from=t_init)
        for method in args.methods:
            model = train(args, work, method, s_init, teacher, seed, args.student_steps, quiet)
            acc = accuracy(args, model, work, args.eval_limit)
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


NOTES = """\
**Reading.** The ordering is what these runs gave, not a claim about large models: three seeds,
a high seed-to-seed spread (the students are trained for few steps, which is what leaves them a
gap to the teacher), and one task. Most of the difference comes from colour questions, which the
teacher answers almost perfectly; on shape questions the teacher itself is weak and no student
moves far from the majority answer. Why colour and shape only: on all of easy-vqa, 74% of the
questions are yes/no and tiny models first learn to answer them from the question text alone. In
a run on every type (`--question-types all --teacher-steps 2500 --student-steps 500 --lr 2e-3`)
the teacher and an sft student (seed 0) both answered 82.6% of yes/no questions, the teacher
reached only 36% on colour (student 14%, majority 12%), and overall the teacher (68.3%) was not
above the student (69.0%): no gap to distil."""


def _paired(students: dict, method: str) -> str:
    seeds = [s for s in students[method] if s in students.get("sft", {})]
    wins = sum(
        students[method][s]["exact_match"] > students["sft"][s]["exact_match"] for s in seeds
    )
    return f"{method} above sft on {wins}/{len(seeds)} seeds"


def markdown(args, report: dict) -> str:
    """docs/results.md from a report: the protocol, the table, per-seed numbers, the command."""
    types, teacher, summary = report["question_types"], report["teacher"], report["summary"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    sft = summary.get("sft", {}).get("overall", (float("nan"), 0))[0]
    lines = [
        "# Switch-KD against its baselines on a built-in task",
        "",
        f"**Task.** `{args.dataset}`, question types {', '.join(types)} (train and test splits "
        f"restricted to them); accuracy is greedy-decoded exact match on the first "
        f"{args.eval_limit} test questions. **Teacher:** `{args.teacher_size}` "
        f"(SigLIP 64d x2 + Qwen2 128d x4) trained with `sft` for {args.teacher_steps} steps. "
        f"**Students:** `{args.student_size}` (SigLIP 64d x2 + Qwen2 64d x2), {args.student_steps} "
        f"steps each at batch {args.batch} and LR {args.lr}, from the same initialisation for "
        f"every method within a seed (seed = initialisation = data order), the vision tower "
        f"trained by every method so that only the loss differs. Seeds: "
        f"{', '.join(map(str, args.seeds))}; mean ± std over seeds, in percent.",
        "",
        "| model | overall | " + " | ".join(types) + " | overall vs sft |",
        "|---|---|" + "---|" * len(types) + "---|",
        f"| teacher | {pct(teacher['exact_match'])} | "
        + " | ".join(pct(teacher["per_type"][t]["exact_match"]) for t in types)
        + f" | {100 * (teacher['exact_match'] - sft):+.1f} |",
    ]
    for method, row in summary.items():
        cells = [row["overall"]] + [row[t] for t in types]
        lines.append(
            f"| {method} | "
            + " | ".join(f"{pct(m)} ± {pct(s)}" for m, s in cells)
            + f" | {100 * (row['overall'][0] - sft):+.1f} |"
        )
    seeds = sorted({seed for per_seed in report["students"].values() for seed in per_seed})
    lines += [
        "",
        "Overall accuracy per seed:",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for method, per_seed in report["students"].items():
        lines.append(
            f"| {method} | "
            + " | ".join(pct(per_seed[s]["exact_match"]) if s in per_seed else "-" for s in seeds)
            + " |"
        )
    lines += [
        "",
        "Paired comparison with `sft` (same seed, same initialisation): "
        + "; ".join(_paired(report["students"], m) for m in summary if m != "sft")
        + ".",
    ]
    lines += ["", NOTES]
    base = {k: v for k, v in (report.get("majority_baseline") or {}).items() if k in types}
    if base:
        lines += [
            "",
            "Majority answer of the train split, scored on test: "
            + ", ".join(f"{k} {pct(v)}" for k, v in sorted(base.items()))
            + ".",
        ]
    lines += [
        "",
        f"Regenerate (about {report['wall_s'] / 60:.0f} min on 2 CPU cores; finished "
        "runs under `runs/bench-distill` are reused):",
        "",
        "```bash",
        "python benchmarks/distill_methods.py",
        "```",
        "",
        f"Raw numbers, per-type counts and the environment: `{args.out}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
