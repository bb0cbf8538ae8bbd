"""Does Switch-KD help? Train a teacher per task, then students with every method, and compare.

One command regenerates ``docs/results.md`` and its JSON:

    python benchmarks/distill_methods.py            # both tasks, 5 seeds, 2 runs at a time

Protocol, per task (``--datasets``): a ``--teacher-size`` model is trained with ``sft`` on the
train split. For each seed a ``--student-size`` model is initialised once (seed = init seed =
data-order seed) and every row below trains that same initialisation for the same steps, batch,
learning rate and trainable parameters (the student vision tower is trained by every method),
so within a seed only the objective differs. By default the student's vision tower starts as a
copy of the teacher's trained tower (``training.vision_tower_init: teacher``), as both towers
start from one pretrained SigLIP in the paper; the ``random tower`` rows keep the student's own
random tower. Accuracy is greedy-decoded exact match on the first ``--eval-limit`` test
questions, the same questions for every run.

Statistics: for each row, the paired difference to ``sft`` and to ``kd`` (same seed, same
initialisation, same data order, same test questions) with a two-sided 95% Student-t interval
over seeds; a difference is called significant when its interval excludes 0. Finished runs are
reused on re-runs (``--work``), so a cut-short study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from rich.console import Console

from edgekd.envinfo import snapshot

# row name -> (method, recipe overrides). The dbild row is also switch-kd without L_VSD: with
# w_vsd = 0 switch-kd's objective is CE + DBiLD, the dbild objective, so it is not run twice.
ROWS: dict[str, tuple[str, dict]] = {
    "sft": ("sft", {}),
    "kd": ("kd", {}),
    "rkl": ("rkl", {}),
    "bild": ("bild", {}),
    "dbild": ("dbild", {}),
    "switch-kd": ("switch-kd", {}),
    "switch-kd, kd in place of DBiLD": ("switch-kd", {"loss.logit_loss": "kd"}),
    "dbild, no T^2 scale": ("dbild", {"loss.t2_scale": False}),
    "dbild, end-of-turn distilled": ("dbild", {"loss.distill_special_tokens": True}),
    "sft, random tower": ("sft", {"training.vision_tower_init": "student"}),
    "switch-kd, random tower": ("switch-kd", {"training.vision_tower_init": "student"}),
}
# each ablation against the row it changes one thing of (paired, like vs sft / vs kd)
BASE_ROW = {
    "dbild": "switch-kd",  # L_VSD removed
    "switch-kd, kd in place of DBiLD": "switch-kd",
    "dbild, no T^2 scale": "dbild",
    "dbild, end-of-turn distilled": "dbild",
    "sft, random tower": "sft",
    "switch-kd, random tower": "switch-kd",
}
SHARED_TOWER = {"training.vision_tower_init": "teacher"}  # unless a row says otherwise
ALIASES = {"dbild": "= switch-kd without L_VSD"}  # w_vsd = 0 is the dbild objective
# the loss-setting ablations run on the first task only (they choose defaults, not methods)
LOSS_ABLATIONS = ("dbild, no T^2 scale", "dbild, end-of-turn distilled")
# question types and teacher steps per task: easy-vqa's yes/no questions carry no gap to distil;
# fashion-grid's teacher needs longer (at 2000 steps it scored 38%, near its majority answers)
TASKS = {
    "easy-vqa": {"types": ["color", "shape"], "teacher_steps": 2000},
    "fashion-grid": {"types": ["all"], "teacher_steps": 5000},
}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--teacher-size", default="small")
    ap.add_argument("--student-size", default="tiny")
    ap.add_argument("--teacher-steps", type=int, help="for every task (default: per task)")
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--teachers-only", action="store_true", help="train and score the teachers")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-distill"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_methods.json"))
    ap.add_argument("--report", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--report-only", action="store_true", help="rewrite --report from --out")
    return ap.parse_args()


# ---- one task's files ------------------------------------------------------------------------
def task_dirs(work: Path, dataset: str) -> tuple[Path, Path]:
    """(data folder, run folder) of a task."""
    types = TASKS[dataset]["types"]
    tag = "all" if types == ["all"] else "-".join(types)
    return work / dataset / "data", work / dataset / tag


def split_file(work: Path, dataset: str, split: str) -> Path:
    """The split's JSON, restricted to the task's question types (written once beside it)."""
    from edgekd.data import subset_by_type

    data, _ = task_dirs(work, dataset)
    full = data / f"{split}.json"
    types = TASKS[dataset]["types"]
    return full if types == ["all"] else subset_by_type(full, types)


def prepare_task(args, dataset: str) -> None:
    """The task's data and the teacher's initial weights (before any parallel run)."""
    from edgekd.data import DATASETS
    from edgekd.models.factory import create_checkpoint

    data, runs = task_dirs(args.work, dataset)
    if not (data / "train.json").exists():
        DATASETS[dataset](data)
    for split in ("train", "test"):
        split_file(args.work, dataset, split)
    t_init = runs / "init" / "teacher"
    if not t_init.exists():
        create_checkpoint(args.teacher_size, t_init, seed=0, corpus=data / "train.json")


# ---- runs (each in a worker process) ---------------------------------------------------------
def run_one(spec: dict) -> dict:
    """Train (or reuse) one model and score it; returns its accuracy, wall time and last log."""
    import torch

    from edgekd.distill.run import DistillJob, has_checkpoint, run
    from edgekd.evaluate import evaluate
    from edgekd.models import VLM

    torch.set_num_threads(1)
    out = Path(spec["out"])
    cache = out / "eval.json"
    if cache.exists():
        return json.loads(cache.read_text())
    start = time.perf_counter()
    job = DistillJob(
        output=out,
        recipe="easyvqa-cpu",
        method=spec["method"],
        teacher=spec["teacher"],
        student=spec["student"],
        data=Path(spec["train"]),
        overrides=spec["overrides"],
        resume=has_checkpoint(out),  # a run cut short continues
        overwrite=True,  # a leftover without a checkpoint is started over
        save_steps=250,
        logging_steps=25,
        device="cpu",
    )
    summary = run(job, console=Console(quiet=True))
    train_s = time.perf_counter() - start
    result = evaluate(
        VLM.from_pretrained(out / "model"),
        spec["test"],
        Path(spec["test"]).parent,
        limit=spec["eval_limit"],
        batch_size=64,
        max_new_tokens=6,
    )
    result.pop("predictions")
    result["train_s"] = round(train_s, 1)
    result["last_log"] = summary["last_log"]
    cache.write_text(json.dumps(result, indent=2))
    return result


def base_overrides(args, seed: int, steps: int) -> dict:
    return {
        "training.max_steps": steps,
        "training.global_batch_size": args.batch,
        "training.per_device_batch_size": args.batch,
        "training.learning_rate": args.lr,
        "training.seed": seed,
        "training.train_vision_tower": True,
    }


def teacher_steps(args, dataset: str) -> int:
    return args.teacher_steps or TASKS[dataset]["teacher_steps"]


def teacher_spec(args, dataset: str) -> dict:
    _, runs = task_dirs(args.work, dataset)
    steps = teacher_steps(args, dataset)
    return {
        "out": str(runs / f"teacher-{steps}"),
        "method": "sft",
        "teacher": None,
        "student": str(runs / "init" / "teacher"),
        "train": str(split_file(args.work, dataset, "train")),
        "test": str(split_file(args.work, dataset, "test")),
        "overrides": base_overrides(args, 0, steps),
        "eval_limit": args.eval_limit,
    }


def student_specs(args, dataset: str, first: bool) -> list[tuple[str, int, dict]]:
    from edgekd.models.factory import create_checkpoint

    _, runs = task_dirs(args.work, dataset)
    teacher = teacher_spec(args, dataset)
    specs = []
    for seed in args.seeds:
        s_init = runs / "init" / f"student-seed{seed}"
        if not s_init.exists():
            tokenizer = runs / "init" / "teacher"
            create_checkpoint(args.student_size, s_init, seed=seed, tokenizer_from=tokenizer)
        for row in args.rows:
            if row in LOSS_ABLATIONS and not first:
                continue
            method, changes = ROWS[row]
            slug = row.replace(", ", "-").replace(" ", "-").replace("^", "")
            overrides = {**base_overrides(args, seed, args.student_steps), **SHARED_TOWER}
            overrides.update(changes)
            spec = {
                **teacher,
                "out": str(runs / "runs" / f"{slug}-seed{seed}"),
                "method": method,
                "teacher": str(Path(teacher["out"]) / "model"),
                "student": str(s_init),
                "overrides": overrides,
            }
            specs.append((row, seed, spec))
    return specs


def main() -> None:
    args = parse_args()
    if args.report_only:  # the statistics again from the stored runs, then the report
        report = json.loads(args.out.read_text())
        for dataset, task in report["tasks"].items():
            report["tasks"][dataset] = summarise(args, dataset, task["teacher"], task["students"])
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.report.write_text(markdown(report))
        return
    console = Console()
    start = time.perf_counter()
    for dataset in args.datasets:
        prepare_task(args, dataset)
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn"))
    results: dict = {d: {} for d in args.datasets}
    with pool:
        # every teacher first; each task's students queue once their teacher is done
        teacher_runs = {d: pool.submit(run_one, teacher_spec(args, d)) for d in args.datasets}
        teachers, futures = {}, []
        for i, dataset in enumerate(args.datasets):
            teachers[dataset] = teacher_runs[dataset].result()
            console.print(f"{dataset} teacher: {teachers[dataset]['exact_match']:.3f}")
            if not args.teachers_only:
                futures += [
                    (dataset, row, seed, pool.submit(run_one, spec))
                    for row, seed, spec in student_specs(args, dataset, first=i == 0)
                ]
        for dataset, row, seed, future in futures:
            acc = future.result()
            results[dataset].setdefault(row, {})[str(seed)] = acc
            console.print(f"{dataset} seed {seed} {row:32s} {acc['exact_match']:.3f}")
    if args.teachers_only:
        return
    report = {
        "benchmark": "distill_methods",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": {row: {"method": ROWS[row][0], "overrides": ROWS[row][1]} for row in args.rows},
        "tasks": {d: summarise(args, d, teachers[d], results[d]) for d in args.datasets},
        "wall_s": round(time.perf_counter() - start, 1),
        "env": snapshot(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown(report))
    console.print(f"wrote {args.out} and {args.report}")


# ---- statistics ------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(df: int) -> float:
    """Two-sided 95% Student-t quantile (the next smaller tabulated df: a wider interval)."""
    return T975[max(d for d in T975 if d <= df)] if df >= 1 else math.inf


def paired(a: dict, b: dict) -> dict:
    """Mean of a - b over the seeds both have, its 95% t interval, wins of a."""
    seeds = sorted(set(a) & set(b), key=int)
    diffs = [a[s]["exact_match"] - b[s]["exact_match"] for s in seeds]
    n = len(diffs)
    mean = statistics.mean(diffs) if diffs else math.nan
    half = t_quantile(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.inf
    return {
        "n": n,
        "mean": mean,
        "ci95": [mean - half, mean + half],
        "significant": n > 1 and (mean - half > 0 or mean + half < 0),
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "diffs": diffs,
    }


def summarise(args, dataset: str, teacher: dict, runs: dict) -> dict:
    data, _ = task_dirs(args.work, dataset)
    meta = json.loads((data / "meta.json").read_text())
    types = sorted(teacher["per_type"])
    table = {}
    for row, per_seed in runs.items():
        accs = list(per_seed.values())
        entry = {
            "overall": mean_std([r["exact_match"] for r in accs]),
            "per_type": {
                t: mean_std([r["per_type"][t]["exact_match"] for r in accs]) for t in types
            },
            "train_s": statistics.mean(r.get("train_s", math.nan) for r in accs),
            "n_seeds": len(accs),
        }
        for ref in ("sft", "kd"):
            if ref in runs and row != ref:
                entry[f"vs_{ref}"] = paired(per_seed, runs[ref])
        base = BASE_ROW.get(row)
        if base in runs:
            entry["vs_base"] = {"row": base, **paired(per_seed, runs[base])}
        table[row] = entry
    majority = meta.get("majority_baseline_test", {})
    baseline = {t: v["accuracy"] for t, v in majority.get("per_type", {}).items()}
    return {
        "question_types": types,
        "n_eval": teacher["n"] if "n" in teacher else args.eval_limit,
        "teacher": teacher,
        "students": runs,
        "summary": table,
        "majority_baseline": baseline,
    }


# ---- the report ------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _diff(p: dict | None) -> str:
    if not p:
        return ""
    lo, hi = p["ci95"]
    mark = " **\\***" if p["significant"] else ""
    return f"{100 * p['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


def _base(entry: dict) -> str:
    test = entry.get("vs_base")
    return f"{_diff(test)} vs *{test['row']}*" if test else ""


def majority_overall(task: dict) -> float | None:
    """The majority answers' accuracy on the scored questions (per type, weighted by count)."""
    base, per_type = task["majority_baseline"], task["teacher"]["per_type"]
    if not all(t in base for t in per_type):
        return None
    n = sum(v["n"] for v in per_type.values())
    return sum(base[t] * v["n"] for t, v in per_type.items()) / n


def reading(task: dict) -> list[str]:
    """Plain-language lines from the statistics: what the runs can and cannot tell apart."""
    summary, teacher = task["summary"], task["teacher"]["exact_match"]
    name = lambda rows: ", ".join(f"*{r}*" for r in rows)  # noqa: E731
    best = max(summary, key=lambda r: summary[r]["overall"][0])
    lines = [
        f"- The best row, *{best}*, is {100 * (teacher - summary[best]['overall'][0]):.1f} "
        f"points below the teacher ({_pct(teacher)})."
    ]
    majority = majority_overall(task)
    if majority is not None:
        near = [r for r, e in summary.items() if e["overall"][0] - majority <= 0.01]
        if near:
            lines.append(
                f"- {name(near)}: at most 1 point above the majority answers "
                f"({_pct(majority)}); these students answer little beyond them, so their "
                "differences say little about the methods."
            )
    for ref in ("sft", "kd"):
        tests = {r: e[f"vs_{ref}"] for r, e in summary.items() if f"vs_{ref}" in e}
        above = [r for r, t in tests.items() if t["significant"] and t["mean"] > 0]
        below = [r for r, t in tests.items() if t["significant"] and t["mean"] < 0]
        tied = [r for r in tests if r not in above + below]
        parts = []
        if above:
            parts.append("significantly above it: " + name(above))
        if below:
            parts.append("significantly below it: " + name(below))
        if tied:
            parts.append("not shown different: " + name(tied))
        lines.append(f"- Against *{ref}*: " + "; ".join(parts) + ".")
    for row, e in summary.items():
        test = e.get("vs_base")
        if test:
            verdict = (
                ("significantly above" if test["mean"] > 0 else "significantly below")
                if test["significant"]
                else "not shown different from"
            )
            lines.append(
                f"- *{row}* is {verdict} *{test['row']}* "
                f"({100 * test['mean']:+.1f} points; higher on {test['wins']} of {test['n']} "
                f"seeds, tied on {test.get('ties', 0)})."
            )
    return lines


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        "# Switch-KD against its baselines on two built-in tasks",
        "",
        f"**Protocol.** Per task a teacher (`{cfg['teacher_size']}`: SigLIP 64d x2 + Qwen2 "
        "128d x4) is trained with `sft` (easy-vqa 2000 steps, fashion-grid 5000). Students "
        f"(`{cfg['student_size']}`: the same SigLIP 64d x2 + Qwen2 64d x2) train "
        f"{cfg['student_steps']} steps at batch {cfg['batch']} and LR {cfg['lr']}; within a "
        "seed every row starts from the same initialisation and sees the same data order, and "
        "every row trains the vision tower, so only the objective differs. Unless a row says "
        "*random tower*, the student's vision tower starts as a copy of the teacher's trained "
        "tower (`--vision-tower-init teacher`), as both start from one pretrained SigLIP in the "
        "paper; here that tower was trained by the teacher's sft on the same task, so every "
        "such row, sft included, starts with task-trained vision features. "
        f"Seeds {', '.join(map(str, cfg['seeds']))}. Accuracy: greedy exact match on "
        f"the first {cfg['eval_limit']} test questions (the same for every run), in percent, "
        "mean ± std over seeds. Loss defaults: T = 3 with the T² scale, k in [3, 16] in a "
        "window of 64, end-of-turn and other special tokens left out of the distillation terms "
        "(CE keeps them).",
        "",
        "**Statistics.** *vs sft* and *vs kd* are paired differences over seeds (same seed, "
        "same initialisation, same test questions), mean and two-sided 95% Student-t interval "
        f"over {len(cfg['seeds'])} seeds; *vs its base row* compares an ablation with the row "
        "it changes one thing of. **\\*** marks an interval that excludes 0, with no "
        "correction for the many comparisons made (at 95% about one in twenty true ties is "
        "marked by chance). With "
        "five seeds a difference must be large against its seed-to-seed spread to show; "
        "an unmarked row is *not shown different*, not shown equal.",
    ]
    for dataset, task in report["tasks"].items():
        types, summary, teacher = task["question_types"], task["summary"], task["teacher"]
        lines += [
            "",
            f"## {dataset} ({', '.join(types)})",
            "",
            "| model | overall | " + " | ".join(types) + " | vs sft | vs kd | vs its base row |",
            "|---|---|" + "---|" * len(types) + "---|---|---|",
            f"| teacher | {_pct(teacher['exact_match'])} | "
            + " | ".join(_pct(teacher["per_type"][t]["exact_match"]) for t in types)
            + " | | | |",
        ]
        for row, e in summary.items():
            label = row + (f" ({ALIASES[row]})" if row in ALIASES else "")
            cells = [e["overall"], *(e["per_type"][t] for t in types)]
            lines.append(
                f"| {label} | "
                + " | ".join(f"{_pct(m)} ± {_pct(s)}" for m, s in cells)
                + f" | {_diff(e.get('vs_sft'))} | {_diff(e.get('vs_kd'))} | {_base(e)} |"
            )
        seeds = sorted({s for per in task["students"].values() for s in per}, key=int)
        lines += [
            "",
            "Overall accuracy per seed, and the mean training time of a run (1 thread):",
            "",
            "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | train s |",
            "|---|" + "---|" * len(seeds) + "---|",
        ]
        for row, per in task["students"].items():
            lines.append(
                f"| {row} | "
                + " | ".join(_pct(per[s]["exact_match"]) if s in per else "-" for s in seeds)
                + f" | {summary[row]['train_s']:.0f} |"
            )
        base = {k: v for k, v in task["majority_baseline"].items() if k in types}
        if base:
            lines += [
                "",
                "Majority answer of the train split, scored on test: "
                + ", ".join(f"{k} {_pct(v)}" for k, v in sorted(base.items()))
                + ".",
            ]
        lines += ["", "**Reading.**", "", *reading(task)]
    lines += [
        "",
        "## Regenerate",
        "",
        f"About {report['wall_s'] / 60:.0f} min on 2 CPU cores (two runs at a time, one thread "
        "each; finished runs under `runs/bench-distill` are reused):",
        "",
        "```bash",
        "python benchmarks/distill_methods.py",
        "```",
        "",
        f"Raw numbers, per-type counts and the environment: `{cfg['out']}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
