"""Time and memory of the distillation losses, forward + backward, on CPU fp32.

Each case runs in a fresh spawned process so its peak memory is its own: the peak resident set
size (``ru_maxrss``) minus the value right after the two input logit tensors were allocated, so
the inputs (2 x positions x vocab x 4 bytes) are the baseline and not counted. The student
logits are leaves that require grad (standing in for model outputs); the teacher's do not.

Example::

    python benchmarks/bench_losses.py --positions 2048 --vocab 151936 --repeats 3 \
        --out benchmarks/results/losses.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from queue import Empty

# Targets of the DBiLD loss, relative to plain full-vocabulary forward KL.
TARGET_TIME_RATIO = 0.5
TARGET_MEM_RATIO = 0.25
CASES = ["kl_naive", "kl", "bild_naive", "bild", "dbild"]
DESCRIPTION = {
    "kl_naive": "full-vocab forward KL, plain autograd, unchunked (T=1)",
    "kl": "edgekd forward_kl (chunked, fused gradient, T=1, chunk {chunk})",
    "bild_naive": "plain unchunked top-8 BiLD, as in the BiLD reference code",
    "bild": "edgekd bild (its defaults: k={k}, T={t:g}, chunk {chunk})",
    "dbild": "edgekd dbild (its defaults: top_n={top_n}, k in [{k_min}, {k_max}], T={t:g}, "
    "chunk {chunk})",
}


def _described(case: str) -> str:
    """The case's description, with the settings the edgekd losses default to (the recipe's)."""
    from edgekd.distill import losses
    from edgekd.profiles.schema import LossConfig

    d = LossConfig()
    return DESCRIPTION[case].format(
        k=losses.BILD_K, t=d.temperature, chunk=d.chunk_size, top_n=d.top_n, k_min=d.k_min,
        k_max=d.k_max,
    )  # fmt: skip


def naive_kl(student, teacher, mask, temperature: float = 1.0):
    """Full-vocabulary forward KL the way it is usually written: dense, one shot."""
    import torch.nn.functional as F

    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def naive_bild(student, teacher, mask, k: int = 8, temperature: float = 3.0):
    """Unchunked top-k BiLD after github.com/fpcsong/BiLD ``distil_losses/BILD.py``."""
    import torch
    import torch.nn.functional as F

    i, j = torch.triu_indices(k, k, offset=1)

    def part(index):
        xs = student.gather(-1, index) / temperature
        xt = teacher.gather(-1, index) / temperature
        ds, dt_ = xs[..., i] - xs[..., j], xt[..., i] - xt[..., j]
        return F.kl_div(ds.log_softmax(-1), dt_.log_softmax(-1), log_target=True,
                        reduction="none").sum(-1)  # fmt: skip

    with torch.no_grad():
        led_t = teacher.topk(k, dim=-1).indices
        led_s = student.topk(k, dim=-1).indices
    return ((part(led_t) + part(led_s)) * mask).sum() / mask.sum()


def _loss_fn(case: str):
    from edgekd.distill import losses

    return {
        "kl_naive": naive_kl,
        "kl": lambda s, t, m: losses.forward_kl(s, t, m).loss,
        "bild_naive": naive_bild,
        "bild": lambda s, t, m: losses.bild(s, t, m).loss,
        "dbild": lambda s, t, m: losses.dbild(s, t, m).loss,
    }[case]


def _maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _worker(case: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    import torch

    from edgekd.runtime.bench_measure import percentiles

    torch.set_num_threads(args.threads)
    fn = _loss_fn(case)
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(1, args.positions, args.vocab, generator=gen).requires_grad_()
    teacher = torch.randn(1, args.positions, args.vocab, generator=gen).mul_(2)  # no temporary
    mask = torch.ones(1, args.positions, dtype=torch.bool)
    baseline = _maxrss_bytes()
    times, loss = [], float("nan")
    for _ in range(args.warmup + args.repeats):
        student.grad = None
        start = time.perf_counter()
        out = fn(student, teacher, mask)
        out.backward()
        times.append(time.perf_counter() - start)
        loss = out.item()
        del out
    timed = percentiles(times[args.warmup :])
    queue.put({
        "case": case,
        "description": _described(case),
        "loss": loss,
        "warmup_s": times[: args.warmup],
        "times_s": times[args.warmup :],
        "median_s": timed["p50"],
        "p90_s": timed["p90"],
        "min_s": timed["min"],
        "peak_extra_bytes": _maxrss_bytes() - baseline,
    })  # fmt: skip


def _environment(args: argparse.Namespace) -> dict:
    """edgekd's environment snapshot (versions, machine, commit, date) and this run's settings."""
    from edgekd.envinfo import snapshot

    return snapshot({
        "threads": args.threads,
        "processor": platform.processor(),
        "positions": args.positions,
        "vocab": args.vocab,
        "dtype": "float32",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "loadavg_1m_start": args.loadavg_start,
        "loadavg_1m_end": os.getloadavg()[0],
        "memory_metric": "ru_maxrss minus ru_maxrss after input allocation, fresh process per case",
    })  # fmt: skip


def _result_of(proc, queue, case: str) -> dict:
    """The worker's result; a worker that dies first (its traceback above) ends the run."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            if not proc.is_alive():
                raise SystemExit(f"{case}: the worker exited with code {proc.exitcode}") from None


def _ratios(results: dict) -> dict:
    out = {}
    for ref in ("kl_naive", "kl"):
        if "dbild" in results and ref in results:
            d, r = results["dbild"], results[ref]
            out[f"dbild/{ref}"] = {
                "time": d["median_s"] / r["median_s"],
                "peak_memory": d["peak_extra_bytes"] / max(r["peak_extra_bytes"], 1),
            }
    if "dbild/kl_naive" in out:
        ratio = out["dbild/kl_naive"]
        out["targets"] = {
            "time_ratio_max": TARGET_TIME_RATIO,
            "peak_memory_ratio_max": TARGET_MEM_RATIO,
            "time_met": ratio["time"] <= TARGET_TIME_RATIO,
            "peak_memory_met": ratio["peak_memory"] <= TARGET_MEM_RATIO,
        }
    return out


def _table(results: dict, ratios: dict) -> str:
    lines = [f"{'case':<11} {'median s':>9} {'p90 s':>6} {'peak +GB':>9}  description"]
    for case, r in results.items():
        lines.append(f"{case:<11} {r['median_s']:>9.2f} {r['p90_s']:>6.2f} "
                     f"{r['peak_extra_bytes'] / 1e9:>9.2f}  {r['description']}")  # fmt: skip
    for name, ratio in ratios.items():
        if name != "targets":
            lines.append(
                f"{name}: time x{ratio['time']:.2f}, peak memory x{ratio['peak_memory']:.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run every case in its own process, write the JSON report and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--positions", type=int, default=2048, help="supervised positions")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size V")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/losses.json"))
    args = parser.parse_args(argv)
    # Other processes on the machine skew the timings badly (each op waits for its slowest
    # thread), so the load is recorded with the results.
    args.loadavg_start = os.getloadavg()[0]

    ctx = mp.get_context("spawn")
    results = {}
    for case in args.cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(case, args, queue))
        proc.start()
        results[case] = _result_of(proc, queue, case)
        proc.join()
        print(f"{case}: {results[case]['median_s']:.2f} s, "
              f"+{results[case]['peak_extra_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
    ratios = _ratios(results)
    report = {"environment": _environment(args), "results": results, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(results, ratios))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
