"""ONNX sizes of the shape-faithful 0.5B student's language part at int8 and int4.

Builds ``qwen2-0.5b-siglip-so400m`` with random weights (seed 0), saves it as a checkpoint in a
temporary directory and loads it back, runs the onnx exporter (``torch.onnx`` trace of the three
graphs, then the int8 / int4 passes) and measures the language part: ``embed_tokens.onnx`` +
``decoder_model_merged.onnx`` (with any ``.data`` files) and, with tied embeddings, the int8
table both reference (``shared_embedding.data``, counted once); the vision encoder excluded.
Checks:

* size targets: ``TARGETS_MB`` per precision (MB = 10^6 bytes; embedding table at 8 bits);
* no float weight matrix over ``FLOAT_MATRIX_MIN`` elements is left in the decoder or the
  embedding graph, the lm_head (int8: the shared tied table) included.

Parity is skipped by default (this measures sizes; the exporter phases run without the driver,
so no manifest is written); ``--parity`` runs the full :func:`edgekd.export.export` instead,
which validates against PyTorch (much slower: SigLIP-so400m at full resolution in both).

Heavy: a multi-gigabyte checkpoint on disk and in memory, minutes per precision on 2 cores
(measured in ``docs/performance.md``).

    python benchmarks/bench_export_size.py --out benchmarks/results/export_size.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from edgekd import targets

TARGETS_MB = {"int8": 640.0, "int4": 460.0}
PRESET = "qwen2-0.5b-siglip-so400m"
LANGUAGE_FILES = (targets.ONNX_EMBED, targets.ONNX_DECODER)
# With tied embeddings the int8 table is one file both graphs reference: counted once.
SHARED_FILES = (targets.ONNX_SHARED_DATA,)
FLOAT_MATRIX_MIN = 100_000  # elements: a float weight this large left unquantized fails the check


def sizes(out: Path) -> dict:
    """Bytes per file and of the language part (embeddings + decoder, data files included,
    the shared tied table once)."""
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    language = sum(b for name, b in files.items() if name.startswith(LANGUAGE_FILES + SHARED_FILES))
    vision = sum(b for name, b in files.items() if name.startswith(targets.ONNX_VISION))
    return {"files": files, "language_bytes": language, "vision_bytes": vision}


def measure(vlm, ckpt: Path, work: Path, precision: str, block: int, parity: bool) -> dict:
    from edgekd.export import ExportConfig, export, get_exporter
    from edgekd.export import onnx_graph as g

    out = work / f"onnx-{precision}"
    options = {"int4_block_size": block} if precision == "int4" else {}
    config = ExportConfig(str(ckpt), "onnx", precision, out, options=options)
    start = time.perf_counter()
    if parity:
        manifest = export(config)
        components, checks = manifest["components"], manifest["parity"]["checks"]
    else:
        exporter = get_exporter("onnx")
        exporter.check(vlm, config)
        out.mkdir()
        components, checks = exporter.export(vlm, config, out), None
    seconds = time.perf_counter() - start
    row = {**sizes(out), "export_s": seconds, "options": options, "parity": checks}
    row["language_MB"] = row["language_bytes"] / 1e6
    row["language_MiB"] = row["language_bytes"] / 2**20
    row["target_MB"] = TARGETS_MB[precision]
    row["meets_target"] = row["language_MB"] <= TARGETS_MB[precision]
    left = {f: g.float_weights(g.load(out / f), FLOAT_MATRIX_MIN) for f in LANGUAGE_FILES}
    row["float_matrices_over_1e5"] = {f: [[n, list(d)] for n, d in v] for f, v in left.items()}
    row["all_matrices_quantized"] = not any(left.values())
    row["components"] = components
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/export_size.json"))
    ap.add_argument("--precisions", nargs="+", default=list(TARGETS_MB), choices=list(TARGETS_MB))
    ap.add_argument("--int4-block-size", type=int, default=32)
    ap.add_argument("--parity", action="store_true", help="validate against PyTorch (slow)")
    ap.add_argument("--workdir", type=Path, default=None, help="temp space (default: system)")
    args = ap.parse_args()

    from edgekd.envinfo import snapshot
    from edgekd.models import VLM
    from edgekd.models.factory import create_checkpoint

    results: dict = {"preset": PRESET, "seed": 0, "targets_MB": TARGETS_MB, "precisions": {}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        results["parameters"] = create_checkpoint(PRESET, work / "ckpt", seed=0)
        vlm = VLM.from_pretrained(work / "ckpt")
        results["checkpoint_s"] = time.perf_counter() - t0
        lm = results["parameters"]["language_model"]
        results["fp32_language_bytes_tied"] = 4 * lm  # the checkpoint's own (tied) size
        for precision in args.precisions:
            row = measure(vlm, work / "ckpt", work, precision, args.int4_block_size, args.parity)
            results["precisions"][precision] = row
    results["environment"] = snapshot({"parity": args.parity})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"{PRESET} language part (embed_tokens + decoder), fp32 tied "
        f"{results['fp32_language_bytes_tied'] / 1e6:.0f} MB"
    )
    print(
        f"{'precision':<9} {'MB':>8} {'MiB':>8} {'target':>7} {'ok':>3} {'all quantized':>13} "
        f"{'vision MB':>9} {'export s':>8}"
    )
    for p, r in results["precisions"].items():
        print(
            f"{p:<9} {r['language_MB']:8.1f} {r['language_MiB']:8.1f} {r['target_MB']:7.0f} "
            f"{'✓' if r['meets_target'] else '✗':>3} {str(r['all_matrices_quantized']):>13} "
            f"{r['vision_bytes'] / 1e6:9.1f} {r['export_s']:8.0f}"
        )


if __name__ == "__main__":
    main()
