"""Held-out accuracy of ONNX and GGUF exports of a trained student, next to PyTorch's.

For one trained checkpoint (default: the ``switch-kd`` seed-0 ``tiny`` student of
``benchmarks/distill_methods.py``) exports ONNX fp32 / int8 / int4 and GGUF f32 / q8_0 / q4_k_m,
each through :func:`edgekd.export.export` (so each artifact passes the exporter's parity checks,
or its :class:`~edgekd.export.ParityError` is recorded with the numbers), into a temporary
directory. Then, on the first ``--eval-limit`` held-out samples:

* PyTorch: :func:`edgekd.evaluate.evaluate` (batched greedy decoding, fp32);
* each artifact: its runtime backend (``OnnxRuntimeBackend`` / ``LlamaCppBackend``), one
  greedy ``generate(image, question)`` per sample, scored like :func:`edgekd.evaluate.score`;
* agreement: the fraction of samples whose answer text is identical to PyTorch's.

Targets (``ARTIFACTS``): a largest accuracy (normalised match) drop in points per quantized
artifact; fp32 ONNX and f32 GGUF answers identical to PyTorch on every sample.

    python benchmarks/bench_export_accuracy.py --out benchmarks/results/export_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

BENCH = Path("runs/bench-distill/easy-vqa")
DEFAULT_CHECKPOINT = BENCH / "color-shape/runs/switch-kd-seed0/model"
DEFAULT_DATA = BENCH / "data/test.color-shape.json"
# (name, target, precision, label, max accuracy drop in points (None: answers must be
# identical), export options). The int8 vision encoder (vision_precision=int8) is measured
# beside an fp32 language model, so its drop is its own, and with the int8 one (both budgets).
INT8_VISION = {"vision_precision": "int8"}
ARTIFACTS = (
    ("onnx:fp32", "onnx", "fp32", "ONNX fp32", None, {}),
    ("onnx:int8", "onnx", "int8", "ONNX int8", 1.0, {}),
    ("onnx:int4", "onnx", "int4", "ONNX int4", 2.0, {}),
    ("onnx:fp32+vision-int8", "onnx", "fp32", "ONNX fp32, vision int8", 1.0, INT8_VISION),
    ("onnx:int8+vision-int8", "onnx", "int8", "ONNX int8, vision int8", 2.0, INT8_VISION),
    ("gguf:f32", "gguf", "f32", "GGUF f32", None, {}),
    ("gguf:q8_0", "gguf", "q8_0", "GGUF Q8_0", 1.0, {}),
    ("gguf:q4_k_m", "gguf", "q4_k_m", "GGUF Q4_K_M", 2.0, {}),
)


def held_out(data: Path, limit: int) -> list[dict]:
    """Per sample: id, image path (relative), question (without ``<image>``), reference, type."""
    from edgekd.data import load_llava_json

    rows = []
    for s in load_llava_json(data)[:limit]:
        turns = s["conversations"]
        last = max(k for k, t in enumerate(turns) if t["from"] in ("gpt", "assistant"))
        question = turns[last - 1]["value"].replace("<image>", "").strip()
        rows.append(
            {
                "id": s["id"],
                "image": s.get("image"),
                "question": question,
                "reference": s.get("answer", turns[last]["value"]),
                "question_type": s.get("question_type", "all"),
            }
        )
    return rows


def max_length(vlm) -> int:
    """Prompt truncation length of the PyTorch reference and its margins: the model's context."""
    from edgekd.models.dims import TextDims

    return TextDims.from_config(vlm.config.text_config).context


def first_token_margins(vlm, data: Path, images: Path, ids: set[str]) -> dict[str, float]:
    """PyTorch's top-1 minus top-2 logit at the first answer token, for samples ``ids``."""
    import torch

    from edgekd.data import LlavaDataset, load_llava_json
    from edgekd.evaluate import prompts_and_references

    samples = [s for s in load_llava_json(data) if s["id"] in ids]
    if not samples:
        return {}
    dataset = LlavaDataset(samples, images, vlm.processor, max_length(vlm))
    margins = {}
    for r in prompts_and_references(dataset):
        pixels = dataset.load_pixels(r["index"])
        kwargs = {} if pixels is None else {"pixel_values": pixels[None]}
        with torch.no_grad():
            logits = vlm.model(input_ids=torch.tensor([r["input_ids"]]), **kwargs).logits[0, -1]
        top = logits.topk(2).values
        margins[r["id"]] = float(top[0] - top[1])
    return margins


def run_backend(backend, samples, images: Path, max_new_tokens: int) -> tuple[list[dict], float]:
    """Greedy answers of one backend for every sample; (rows, seconds)."""
    from PIL import Image

    rows, t0 = [], time.perf_counter()
    for s in samples:
        image = None
        if s["image"]:
            with Image.open(images / s["image"]) as im:
                image = im.convert("RGB")
        gen = backend.generate(image, s["question"], max_new_tokens)
        rows.append({**s, "prediction": gen.text, "token_ids": gen.token_ids})
    return rows, time.perf_counter() - t0


def measure(vlm, args, work: Path, samples, reference, spec):
    from edgekd import artifact
    from edgekd.evaluate import score
    from edgekd.export import ExportConfig, ParityError, export
    from edgekd.runtime import load_backend

    name, target, precision, label, max_drop, extra = spec
    out = work / name.replace(":", "-").replace("+", "-")
    options = {"n_threads": args.threads} if target == "gguf" else {}
    options.update(extra)
    config = ExportConfig(
        str(args.checkpoint),
        target,
        precision,
        out,
        n_parity_prompts=args.n_parity_prompts,
        max_new_tokens=args.max_new_tokens,
        eval_data=args.eval_data,
        eval_limit=args.export_eval_limit,
        options=options,
    )
    row: dict = {
        "label": label,
        "target": target,
        "precision": precision,
        "options": extra,
        "max_drop": max_drop,
    }
    t0 = time.perf_counter()
    try:
        manifest = export(config)
    except ParityError as e:
        row.update(export_s=time.perf_counter() - t0, parity_passed=False, parity_error=str(e))
        print(f"{label}: parity check failed: {e}", flush=True)
        return row
    row.update(export_s=time.perf_counter() - t0, parity_passed=True, parity=manifest["parity"])
    row["artifact_bytes"] = artifact.load(out).bytes  # every file its manifest lists

    backend = load_backend(out, device="cpu", threads=args.threads)
    try:
        rows, seconds = run_backend(backend, samples, args.images, args.max_new_tokens)
    finally:
        if hasattr(backend, "close"):
            backend.close()
    got = score(rows)
    ref_pred = {p["id"]: p["prediction"] for p in reference["predictions"]}
    same = [r["prediction"] == ref_pred[r["id"]] for r in rows]
    pts = 100.0
    row.update(
        n=got["n"],
        eval_s=seconds,
        ms_per_sample=1e3 * seconds / max(len(rows), 1),
        normalized_match=got["normalized_match"],
        exact_match=got["exact_match"],
        per_type=got["per_type"],
        delta_points=pts * (got["normalized_match"] - reference["normalized_match"]),
        exact_delta_points=pts * (got["exact_match"] - reference["exact_match"]),
        agreement=sum(same) / max(len(same), 1),
        disagreements=[
            {"id": r["id"], "pytorch": ref_pred[r["id"]], "artifact": r["prediction"]}
            for r, s in zip(rows, same)
            if not s
        ],
    )
    margins = first_token_margins(
        vlm, args.eval_data, args.images, {d["id"] for d in row["disagreements"]}
    )
    for d in row["disagreements"]:
        d["pytorch_first_token_margin"] = margins.get(d["id"])
    if max_drop is None:
        row["target_desc"] = "identical to PyTorch on every sample"
        row["meets_target"] = all(same)
    else:
        row["target_desc"] = f"drop <= {max_drop:g} pt"
        row["meets_target"] = -row["delta_points"] <= max_drop + 1e-9
    print(
        f"{label}: acc {pts * got['normalized_match']:.1f} (delta {row['delta_points']:+.1f} pt), "
        f"agreement {pts * row['agreement']:.1f}%, {row['ms_per_sample']:.1f} ms/sample",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--eval-data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--images", type=Path, default=None, help="image root (default: data dir)")
    ap.add_argument("--eval-limit", type=int, default=600)
    ap.add_argument(
        "--export-eval-limit",
        type=int,
        default=200,
        help="samples for the exporters' own accuracy check during export (parity)",
    )
    ap.add_argument("--n-parity-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch / onnxruntime / llama.cpp")
    ap.add_argument("--torch-batch-size", type=int, default=32)
    ap.add_argument(
        "--artifacts",
        nargs="+",
        default=[a[0] for a in ARTIFACTS],
        choices=[a[0] for a in ARTIFACTS],
    )
    ap.add_argument("--workdir", type=Path, default=None, help="temp space (default: system)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/export_accuracy.json"))
    args = ap.parse_args()
    args.images = args.images or args.eval_data.parent

    import torch

    from edgekd.envinfo import snapshot
    from edgekd.evaluate import evaluate
    from edgekd.models import VLM

    torch.set_num_threads(args.threads)
    samples = held_out(args.eval_data, args.eval_limit)
    vlm = VLM.from_pretrained(str(args.checkpoint), dtype="float32")
    t0 = time.perf_counter()
    reference = evaluate(
        vlm,
        args.eval_data,
        args.images,
        limit=args.eval_limit,
        batch_size=args.torch_batch_size,
        max_new_tokens=args.max_new_tokens,
        max_length=max_length(vlm),
    )
    torch_s = time.perf_counter() - t0
    print(
        f"PyTorch fp32: acc {100 * reference['normalized_match']:.1f} "
        f"(exact {100 * reference['exact_match']:.1f}) on {reference['n']} samples, "
        f"{torch_s:.1f} s",
        flush=True,
    )
    results: dict = {
        "checkpoint": str(args.checkpoint),
        "eval_data": str(args.eval_data),
        "eval_limit": args.eval_limit,
        "export_eval_limit": args.export_eval_limit,
        "max_new_tokens": args.max_new_tokens,
        "metric": "normalized_match (edgekd.evaluate.score); exact_match also recorded",
        "pytorch": {
            "n": reference["n"],
            "normalized_match": reference["normalized_match"],
            "exact_match": reference["exact_match"],
            "per_type": reference["per_type"],
            "batch_size": args.torch_batch_size,
            "eval_s": torch_s,
        },
        "artifacts": {},
    }
    chosen = [a for a in ARTIFACTS if a[0] in args.artifacts]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for spec in chosen:
            results["artifacts"][spec[0]] = measure(vlm, args, Path(tmp), samples, reference, spec)
    results["environment"] = snapshot({"threads": args.threads})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    ref = 100 * reference["normalized_match"]
    print(f"\n{'artifact':<22} {'acc %':>6} {'delta':>6} {'agree %':>8} {'target':>38} {'met':>4}")
    print(f"{'PyTorch fp32':<22} {ref:6.1f} {'':>6} {'':>8}")
    for r in results["artifacts"].values():
        if not r["parity_passed"]:
            print(f"{r['label']:<22} parity failed: {r['parity_error'][:80]}")
            continue
        print(
            f"{r['label']:<22} {100 * r['normalized_match']:6.1f} {r['delta_points']:+6.1f} "
            f"{100 * r['agreement']:8.1f} {r['target_desc']:>38} "
            f"{'yes' if r['meets_target'] else 'NO':>4}"
        )


if __name__ == "__main__":
    main()
