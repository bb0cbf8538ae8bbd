"""Cost of one switch-kd step: where it goes, before and after the supervised-logits cut (CPU).

A switch-kd step = student forward/backward (CE + L_Align) + teacher no-grad forward +
switch-route forward/backward (student features -> teacher projector -> teacher LM -> L_VSD).
The parts are measured apart; the fused step must take at most ``TARGET_RATIO`` times their
sum. The steps (switch-kd and kd, through the trainer's own ``distill_step``) are measured side
by side with logits at every position (before) and at the supervised positions only (after,
the default): the language-model heads then run on the answer rows alone. Each sample has
``--answer-len`` supervised tokens, as an easy-vqa answer and its end-of-turn token do.
Timings: medians, p90 and minimum of ``--repeats`` runs after ``--warmup``, interleaved.

    python benchmarks/bench_switch_step.py --out benchmarks/results/switch_step.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgekd.distill.objective import Objective, supervised_positions
from edgekd.distill.switch import FeatureCapture, TeacherRoutes
from edgekd.distill.trainer import distill_step
from edgekd.envinfo import snapshot
from edgekd.models import build_vlm, train_tokenizer
from edgekd.models.vlm import VLM
from edgekd.runtime.bench_measure import percentiles

TARGET_RATIO = 1.10  # fused switch-kd step over the sum of its parts


def make_batch(vlm, batch: int, text_len: int, answer_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_img = vlm.num_image_tokens()
    ids = torch.randint(10, len(vlm.tokenizer), (batch, n_img + text_len), generator=g)
    ids[:, :n_img] = vlm.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -answer_len:] = ids[:, -answer_len:]
    size = vlm.config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "has_image": torch.ones(batch, dtype=torch.bool),
    }


def timed_together(fns: dict, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Each function's timings, the functions interleaved round by round (the same drift)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, values in times.items():
        summary = percentiles(values)
        out[name] = {"median_s": summary["p50"], "min_s": summary["min"], "p90_s": summary["p90"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="base")
    ap.add_argument("--student", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=48)
    ap.add_argument("--answer-len", type=int, default=2)
    ap.add_argument(
        "--vocab", type=int, help="resize both models' vocabularies (151936: Qwen2's logit width)"
    )
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/switch_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = train_tokenizer()
    teacher = build_vlm(args.teacher, tokenizer=tok, seed=0)
    student = build_vlm(args.student, tokenizer=tok, seed=1)
    if args.vocab:  # new rows are random; the batch's ids stay within the tokenizer's
        for vlm in (teacher, student):
            vlm.model.resize_token_embeddings(args.vocab, mean_resizing=False)
    student.model.train()
    b = make_batch(student, args.batch, args.text_len, args.answer_len)
    routes = TeacherRoutes(teacher.model)
    skd, kd = Objective("switch-kd", top_n=64, k_max=16), Objective("kd")
    capture = FeatureCapture(student.model)
    ids, mask, pv, has = b["input_ids"], b["attention_mask"], b["pixel_values"], b["has_image"]
    s_feats = student.vision_features(pv).detach()

    keep = supervised_positions(b["labels"])
    t_logits = routes(ids, mask, pv, has, None, keep=keep).logits

    def student_part():  # student forward/backward with CE + L_Align on given teacher logits
        student.model.zero_grad(set_to_none=True)
        out = student.model(
            input_ids=ids, attention_mask=mask, pixel_values=pv, logits_to_keep=keep
        )
        capture.pop()
        objective = Objective("dbild", top_n=64, k_max=16)
        loss, _ = objective(out.logits, b["labels"], t_logits, positions=keep)
        loss.backward()

    def teacher_part():
        with torch.no_grad():
            routes(ids, mask, pv, has, None, keep=keep)

    def switch_part():  # student features -> teacher projector/LM -> L_VSD, backward to features
        feats = s_feats.clone().requires_grad_(True)
        v = VLM(routes.teacher, processor=None)
        embeds = v.embed(ids)
        z_v = v.language_logits(v.merge(embeds, v.project(feats), ids), mask, keep=keep)
        m = b["labels"][:, keep + 1] != -100
        skd.distill(z_v, t_logits, m).loss.backward()

    def step(objective: Objective, every_position: bool):
        cap = capture if objective.uses_switch else None  # as the trainer builds it

        def run():
            student.model.zero_grad(set_to_none=True)
            loss, _, _ = distill_step(student.model, routes, cap, objective, b, every_position)
            loss.backward()
            capture.pop()  # the hook saw this step's features; none are carried over

        return run

    results = timed_together(
        {
            "student_fwd_bwd": student_part,
            "teacher_no_grad_fwd": teacher_part,
            "switch_route_fwd_bwd": switch_part,
            "switch_kd_step": step(skd, False),
            "kd_step": step(kd, False),
            "switch_kd_step_every_position": step(skd, True),
            "kd_step_every_position": step(kd, True),
        },
        args.repeats,
        args.warmup,
    )

    def med(name: str) -> float:
        return results[name]["median_s"]

    parts = sum(
        results[k]["median_s"]
        for k in ("student_fwd_bwd", "teacher_no_grad_fwd", "switch_route_fwd_bwd")
    )
    report = {
        "benchmark": "switch_step",
        "config": vars(args) | {"out": str(args.out)},
        "results": results,
        "sum_of_parts_s": parts,
        "ratio_step_to_parts": results["switch_kd_step"]["median_s"] / parts,
        "ratio_switch_kd_to_kd": med("switch_kd_step") / med("kd_step"),
        "ratio_switch_kd_to_kd_every_position": med("switch_kd_step_every_position")
        / med("kd_step_every_position"),
        "speedup_switch_kd_step": med("switch_kd_step_every_position") / med("switch_kd_step"),
        "speedup_kd_step": med("kd_step_every_position") / med("kd_step"),
        "supervised_positions": int(keep.numel()),
        "positions": int(ids.shape[1]),
        "vocab": int(student.model.get_output_embeddings().weight.shape[0]),
        "switch_route_share_of_step": med("switch_route_fwd_bwd") / med("switch_kd_step"),
        "target_ratio_step_to_parts": TARGET_RATIO,
        "env": snapshot(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:24s} {r['median_s'] * 1e3:8.1f} ms")
    print(f"{'sum of parts':24s} {parts * 1e3:8.1f} ms")
    print(
        f"switch-kd step / parts = {report['ratio_step_to_parts']:.3f} "
        f"(target <= {TARGET_RATIO:.2f}); switch-kd / kd = "
        f"{report['ratio_switch_kd_to_kd']:.2f} (every position: "
        f"{report['ratio_switch_kd_to_kd_every_position']:.2f}); supervised logits speed up "
        f"switch-kd {report['speedup_switch_kd_step']:.2f}x, kd {report['speedup_kd_step']:.2f}x"
    )


if __name__ == "__main__":
    main()
