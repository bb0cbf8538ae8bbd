"""Cost of one switch-kd step against the sum of its parts, and against a kd step (CPU).

A switch-kd step = student forward/backward (CE + L_Align) + teacher no-grad forward +
switch-route forward/backward (student features -> teacher projector -> teacher LM -> L_VSD).
Target: the fused step takes at most ``TARGET_RATIO`` times the sum of the parts measured
separately. Timings: medians, p90 and minimum of ``--repeats`` runs after ``--warmup``.

    python benchmarks/bench_switch_step.py --out benchmarks/results/switch_step.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgekd.distill.objective import Objective
from edgekd.distill.switch import FeatureCapture, TeacherRoutes
from edgekd.envinfo import snapshot
from edgekd.models import build_vlm, train_tokenizer
from edgekd.runtime.bench import percentiles

TARGET_RATIO = 1.10  # fused switch-kd step over the sum of its parts


def make_batch(vlm, batch: int, text_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_img = vlm.num_image_tokens()
    ids = torch.randint(10, len(vlm.tokenizer), (batch, n_img + text_len), generator=g)
    ids[:, :n_img] = vlm.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -text_len // 2 :] = ids[:, -text_len // 2 :]
    size = vlm.config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
        "has_image": torch.ones(batch, dtype=torch.bool),
    }


def timed(fn, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    summary = percentiles(times)
    return {"median_s": summary["p50"], "min_s": summary["min"], "p90_s": summary["p90"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="base")
    ap.add_argument("--student", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/switch_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = train_tokenizer()
    teacher = build_vlm(args.teacher, tokenizer=tok, seed=0)
    student = build_vlm(args.student, tokenizer=tok, seed=1)
    student.model.train()
    b = make_batch(student, args.batch, args.text_len)
    routes = TeacherRoutes(teacher.model)
    skd, kd = Objective("switch-kd", top_n=64, k_max=16), Objective("kd")
    capture = FeatureCapture(student.model)
    ids, mask, pv, has = b["input_ids"], b["attention_mask"], b["pixel_values"], b["has_image"]
    t_logits = routes(ids, mask, pv, has, None).logits
    s_feats = student.vision_features(pv).detach()

    def student_part():  # student forward/backward with CE + L_Align on given teacher logits
        student.model.zero_grad(set_to_none=True)
        out = student.model(input_ids=ids, attention_mask=mask, pixel_values=pv)
        capture.pop()
        loss, _ = Objective("dbild", top_n=64, k_max=16)(out.logits, b["labels"], t_logits)
        loss.backward()

    def teacher_part():
        with torch.no_grad():
            routes(ids, mask, pv, has, None)

    def switch_part():  # student features -> teacher projector/LM -> L_VSD, backward to features
        feats = s_feats.clone().requires_grad_(True)
        vlm = routes.teacher
        from edgekd.models.vlm import VLM

        v = VLM(vlm, processor=None)
        embeds = v.embed(ids)
        z_v = v.language_logits(v.merge(embeds, v.project(feats), ids), mask)
        m = b["labels"][:, 1:] != -100
        skd.distill(z_v[:, :-1], t_logits[:, :-1], m).loss.backward()

    def step(objective: Objective):
        def run():
            student.model.zero_grad(set_to_none=True)
            out = student.model(input_ids=ids, attention_mask=mask, pixel_values=pv)
            feats = capture.pop()
            t = routes(ids, mask, pv, has, feats if objective.uses_switch else None)
            loss, _ = objective(out.logits, b["labels"], t.logits, t.switch_logits, has)
            loss.backward()

        return run

    results = {
        name: timed(fn, args.repeats, args.warmup)
        for name, fn in (
            ("student_fwd_bwd", student_part),
            ("teacher_no_grad_fwd", teacher_part),
            ("switch_route_fwd_bwd", switch_part),
            ("switch_kd_step", step(skd)),
            ("kd_step", step(kd)),
        )
    }
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
        "ratio_switch_kd_to_kd": results["switch_kd_step"]["median_s"]
        / results["kd_step"]["median_s"],
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
        f"(target <= {TARGET_RATIO:.2f}); "
        f"switch-kd / kd = {report['ratio_switch_kd_to_kd']:.2f}"
    )


if __name__ == "__main__":
    main()
