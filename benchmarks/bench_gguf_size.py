"""GGUF sizes of the shape-faithful 0.5B student's language model at Q8_0 and Q4_K_M.

Builds ``qwen2-0.5b-siglip-so400m`` with random weights (seed 0), saves it as a checkpoint in a
temporary directory and loads it back, writes its language model as an f32 GGUF with
``edgekd.export.gguf_write`` (vocabulary padded to the rows of the embedding table), quantizes it
with ``llama_cpp.llama_model_quantize``, reads the tensor types back, and checks:

* size targets: ``TARGETS_MB`` per precision (MB = 10^6 bytes);
* every weight matrix is quantized (no F32/F16 matrix left), the tied output matrix
  (``token_embd.weight``, which llama.cpp reuses as the output head) included.

Heavy: a multi-gigabyte checkpoint and f32 GGUF on disk and in memory, minutes on 2 cores
(measured in ``docs/performance.md``). The vision tower is not part of this measurement, so
no edgekd artifact is written: only the language-model file (the 0.5B GGUF artifacts,
mmproj included, are exported and timed whole in ``bench_runtime_speed.py``).

    python benchmarks/bench_gguf_size.py --out benchmarks/results/gguf_size.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

TARGETS_MB = {"q8_0": 530.0, "q4_k_m": 400.0}
PRESET = "qwen2-0.5b-siglip-so400m"


def measure(work: Path, precision: str, f32: Path, threads: int | None) -> dict:
    from edgekd.export import gguf_write as g

    dst = work / f"model-{precision}.gguf"
    start = time.perf_counter()
    g.quantize(f32, dst, precision, threads)
    seconds = time.perf_counter() - start
    report = g.quant_report(g.tensor_table(dst), precision)
    size = dst.stat().st_size
    tied = "output.weight" not in report["tensor_types"]
    row = {
        "bytes": size,
        "MB": size / 1e6,
        "MiB": size / 2**20,
        "target_MB": TARGETS_MB[precision],
        "meets_target": size / 1e6 <= TARGETS_MB[precision],
        "quantize_s": seconds,
        "type_counts": report["type_counts"],
        "fallbacks": report["fallbacks"]["count"],
        "fallback_rows": sorted({t["row_size"] for t in report["fallbacks"]["tensors"].values()}),
        "unquantized_matrices": report["unquantized_matrices"],
        "tied_output": tied,
        "output_matrix_type": report["tensor_types"][
            "token_embd.weight" if tied else "output.weight"
        ],
    }
    row["all_matrices_quantized"] = not row["unquantized_matrices"]
    dst.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_size.json"))
    ap.add_argument("--threads", type=int, default=None, help="quantization threads")
    ap.add_argument("--workdir", type=Path, default=None, help="temp space (default: system)")
    args = ap.parse_args()

    from edgekd.envinfo import snapshot
    from edgekd.export import gguf_write as g
    from edgekd.models import VLM
    from edgekd.models.factory import create_checkpoint

    results: dict = {"preset": PRESET, "seed": 0, "targets_MB": TARGETS_MB, "precisions": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        results["parameters"] = create_checkpoint(PRESET, work / "ckpt", seed=0)
        vlm = VLM.from_pretrained(work / "ckpt")
        results["checkpoint_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        f32 = work / "model-f32.gguf"
        g.write_lm(vlm, f32, "f32")
        results["f32_gguf"] = {"bytes": f32.stat().st_size, "write_s": time.perf_counter() - t0}
        results["vocab"] = {"tokenizer": len(vlm.tokenizer), "gguf": vlm.vocab_size}
        del vlm
        for precision in TARGETS_MB:
            results["precisions"][precision] = measure(work, precision, f32, args.threads)
    results["environment"] = snapshot({"quantize_threads": args.threads})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{PRESET} language model, f32 GGUF {results['f32_gguf']['bytes'] / 1e6:.1f} MB")
    print(
        f"{'precision':<9} {'MB':>8} {'MiB':>8} {'target':>7} {'ok':>3} {'fallbacks':>9} "
        f"{'all quantized':>13} {'output type':>11}"
    )
    for p, r in results["precisions"].items():
        print(
            f"{p:<9} {r['MB']:8.1f} {r['MiB']:8.1f} {r['target_MB']:7.0f} "
            f"{'✓' if r['meets_target'] else '✗':>3} {r['fallbacks']:9d} "
            f"{str(r['all_matrices_quantized']):>13} {r['output_matrix_type']:>11}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
