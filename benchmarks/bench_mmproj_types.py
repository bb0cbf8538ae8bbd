"""clip.cpp's vision encoder (a gguf artifact's ``mmproj.gguf``) per type of its linear layers.

An artifact's mmproj is rewritten with its attention, MLP and projector matrices (rows that are
whole 32-blocks) as f32, f16, bf16 or Q8_0, every other tensor as it was; each type then encodes
one image ``--runs`` times after ``--warmup`` in its own fresh process (edgekd's llama.cpp
backend, ``--threads``), rounds rotating the order. Reported: per type the median encode ms over
rounds, the file size, and the cosine of its visual rows against the f32 file's.

    python benchmarks/bench_mmproj_types.py runs/real-model/artifacts/switch-kd-seed0-gguf-q4_0 \\
        --out benchmarks/results/mmproj_types.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TYPES = ("f32", "f16", "bf16", "q8_0")
CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from edgekd.runtime.llamacpp import LlamaCppBackend
folder = Path(sys.argv[1])
runs, warmup, threads = (int(a) for a in sys.argv[2:5])
pre = json.loads((folder / "manifest.json").read_text())["preprocessing"]
backend = LlamaCppBackend(folder, n_threads=threads, verify=False, preprocessing=pre)
h, w = backend.session.image_size
image = np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
for _ in range(warmup):
    backend.session.encode_image(image)
ms = []
for _ in range(runs):
    t = time.perf_counter()
    rows, _ = backend.session.encode_image(image)
    ms.append((time.perf_counter() - t) * 1e3)
np.save(folder / "rows.npy", rows)
print(json.dumps({"ms": ms}))
"""


def rewrite(src: Path, dst: Path, kind: str) -> int:
    """``src``'s mmproj with its linear layers as ``kind``; returns how many were converted."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), "clip")
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub)
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    converted = 0
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        a = np.ascontiguousarray(dequantize(t.data, t.tensor_type).reshape(shape), np.float32)
        linear = a.ndim == 2 and ("attn_" in t.name or "ffn_" in t.name or t.name.startswith("mm."))
        if linear and a.shape[-1] % 32 == 0:
            converted += 1
            if kind in qtype:
                writer.add_tensor(t.name, quantize(a, qtype[kind]), raw_dtype=qtype[kind])
            else:
                writer.add_tensor(t.name, a.astype(np.float16 if kind == "f16" else np.float32))
        else:  # as it was (norms, biases, embeddings, the patch convolution)
            keep = t.tensor_type == gguf.GGMLQuantizationType.F16
            writer.add_tensor(t.name, a.astype(np.float16) if keep else a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return converted


def main() -> None:
    from edgekd.envinfo import snapshot

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path, help="a gguf artifact directory (edgekd export)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mmproj_types.json"))
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    ms: dict[str, list[float]] = {k: [] for k in TYPES}
    found: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgekd-mmproj-") as tmp:
        for kind in TYPES:
            folder = Path(tmp) / kind
            shutil.copytree(args.artifact, folder)
            n = rewrite(args.artifact / "mmproj.gguf", folder / "mmproj.gguf", kind)
            found[kind] = {"linear_layers": n, "bytes": (folder / "mmproj.gguf").stat().st_size}
        for r in range(args.rounds):
            for kind in TYPES[r % len(TYPES) :] + TYPES[: r % len(TYPES)]:  # rotated
                run = subprocess.run(
                    [sys.executable, "-c", CHILD, str(Path(tmp) / kind), str(args.runs),
                     str(args.warmup), str(args.threads)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                ms[kind].append(statistics.median(json.loads(run.stdout.splitlines()[-1])["ms"]))
        ref = np.load(Path(tmp) / "f32" / "rows.npy")
        for kind in TYPES:
            rows = np.load(Path(tmp) / kind / "rows.npy")
            norms = np.linalg.norm(rows, axis=-1) * np.linalg.norm(ref, axis=-1)
            cos = (rows * ref).sum(-1) / norms
            found[kind].update(
                encode_ms_median=statistics.median(ms[kind]),
                encode_ms_rounds=ms[kind],
                rows_cosine_min_vs_f32=float(cos.min()),
            )
    out = {
        "what": "clip.cpp vision encode per mmproj linear-layer type, one process per type",
        "command": " ".join(["python", *sys.argv]),
        "artifact": str(args.artifact),
        "settings": {k: v for k, v in vars(args).items() if k not in ("artifact", "out")},
        "types": found,
        "environment": snapshot(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    for kind, r in found.items():
        print(f"{kind}: {r['encode_ms_median']:.1f} ms, {r['bytes'] / 1e6:.1f} MB, "
              f"cosine {r['rows_cosine_min_vs_f32']:.7f}")  # fmt: skip


if __name__ == "__main__":
    main()
