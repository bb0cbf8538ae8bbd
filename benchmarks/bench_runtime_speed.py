"""Decode, vision and whole-answer speed of the 0.5B student's artifacts on CPU, side by side.

Builds ``qwen2-0.5b-siglip-so400m`` with random weights (seed 0) as a checkpoint, exports it with
edgekd, and times every variant in one process with the same thread count (``--threads``):

* decode: PyTorch eager fp32 (:class:`~edgekd.runtime.torch.TorchBackend`), ONNX fp32 / int8 /
  int4 (:class:`~edgekd.runtime.onnxruntime.OnnxRuntimeBackend`) and GGUF f32 / f16 / Q8_0 /
  Q4_K_M (:class:`~edgekd.runtime.llamacpp.LlamaCppBackend`), each ``generate(None, prompt,
  max_new_tokens=N, ignore_eos=True)`` on the same text prompt, so every variant decodes the
  same N tokens at the same context, in two contexts: ``text`` (a one-line question) and
  ``image-length`` (filler text as long as one image's visual tokens before it, so the KV
  cache is as long as in a VLM answer). Per context ``--rounds`` rounds, the variant order
  rotated each round (drift favours none), one warm-up generation each first; medians of
  ``decode_tokens_per_s``. Right before and after each generation the read bandwidth is
  measured (:func:`edgekd.plan.roofline.measure_bandwidth`, ``--bandwidth-repeats`` passes,
  the best kept), so each sample has its own roofline ``max(before, after) / bytes read per
  token``; the roofline fraction is the median of ``tok/s / roofline`` (and, stricter, the
  median tok/s over the run's best bandwidth is reported too).
* vision: SigLIP-so400m + projector at the preset's image size, PyTorch eager fp32 against the
  fp32 artifact's ``vision_encoder.onnx`` at each onnxruntime graph optimisation level (the
  session options :class:`OnnxRuntimeBackend` uses), the opset-18 one, and the same graph
  through edgekd's int8 pass (``onnx_graph.quantize_int8``, made here; the exporter's
  ``vision_precision=int8`` runs the same pass), with the parity of the visual tokens against
  PyTorch (:func:`edgekd.export.parity.compare`).
* prefill: the ``image-length`` prompt (801 tokens) through every variant, one token
  generated, each GGUF at several llama.cpp batch sizes (``PREFILL_BATCHES``), against the
  compute roofline: the prompt's FLOPs (:func:`edgekd.plan.roofline.prefill_flops`) at this
  machine's GEMM throughput at the model's shape, in the arithmetic the variant computes in
  (fp32 or int8), measured before and after the rounds (:func:`prefill`).
* image: one answer about an image through each artifact's whole path (vision, prefill with
  the visual tokens, ``--image-tokens`` decoded), PyTorch eager fp32 beside it, with vision
  ms, prefill ms (and its roofline), TTFT, decode tok/s and the whole answer's time
  (:func:`image_answers`). ``onnx-int8-vision-int8`` is the int8 artifact exported with
  ``vision_precision=int8`` (its accuracy check runs on a few easy-vqa questions).

ONNX artifacts go through :func:`edgekd.export.export` (with its parity checks; a parity miss
is recorded with its numbers, see :func:`export_unproven`) at opset ``CPU_OPSET`` (attention as
one ONNX ``Attention`` op over the kv heads; see :mod:`edgekd.export.onnx`), and again at the
exporter's default opset 18 (``onnx-*-opset18``, for comparison). GGUF artifacts too go through
``export`` (``model.gguf`` + ``mmproj.gguf``, with the gguf parity checks): the preset drops the
first visual token (``vision_feature_select_strategy: default``, as TinyLLaVA), which edgekd's
llama.cpp backend does after clip's encoder (the exact path, see :mod:`edgekd.export.gguf`).

Heavy: a multi-gigabyte checkpoint and artifacts on disk and in memory, and a long first run
(the exports); the measured sizes and times are in ``docs/performance.md``. ``--workdir``
keeps the checkpoint and artifacts for later runs (and reuses them); by default they live in a
temporary directory removed at the end. ``--only`` runs some stages (and ``--contexts`` some
decode contexts) and merges them into an existing ``--out``.

    flock /tmp/edgekd-cpu.lock python benchmarks/bench_runtime_speed.py \\
        --workdir /tmp/edgekd-runtime-speed --out benchmarks/results/runtime_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgekd import artifact, targets
from edgekd.errors import EdgeKDError

PRESET = "qwen2-0.5b-siglip-so400m"
ONNX_PRECISIONS = ("fp32", "int8", "int4")
GGUF_PRECISIONS = ("f32", "f16", "q8_0", "q4_k_m")
# ONNX variant -> (precision, export options). The judged artifacts use opset 23 (attention as
# one ONNX Attention op over the kv heads, see edgekd.export.onnx); the exporter's default
# opset 18 is measured next to them to show where its time goes.
CPU_OPSET = 23
ONNX_VARIANTS = {
    **{f"onnx-{p}": (p, {"opset": CPU_OPSET}) for p in ONNX_PRECISIONS},
    **{f"onnx-{p}-opset18": (p, {}) for p in ONNX_PRECISIONS},
}
GGUF_VARIANTS = {f"gguf-{p}": p for p in GGUF_PRECISIONS}
# decode tok/s over PyTorch eager fp32: the targets, and what careful hand exports of the same
# shape reached on this kind of machine (the reference the targets were set from)
RATIO_TARGETS = {"onnx-int8": 5.0, "onnx-int4": 6.0, "gguf-q8_0": 5.5, "gguf-q4_k_m": 5.5}
HAND_EXPORT_RATIOS = {"onnx-int8": 5.4, "onnx-int4": 6.6, "gguf-q8_0": 5.9, "gguf-q4_k_m": 5.9}
ROOFLINE_TARGET = 0.70  # of the bandwidth roofline, for the fp32 and f16 artifacts
ROOFLINE_VARIANTS = ("onnx-fp32", "gguf-f32", "gguf-f16")
VISION_TARGET = 1.3  # vision encode speed over PyTorch eager fp32
PROMPT = "Describe a busy street market early in the morning, with as much detail as you can."
FILLER = (
    "The stalls open before sunrise and the traders unload crates of fruit, bread, fish, "
    "flowers, spices, cloth and tools while the first buyers walk slowly between the rows."
)
CONTEXTS = ("text", "image-length")
STAGES = ("export", "decode", "vision", "prefill", "image")
WARMUP_TOKENS = 8  # tokens of each variant's warm-up generation
IMAGE_VARIANTS = (
    "pytorch-fp32", "onnx-fp32", "onnx-int8", "onnx-int8-vision-int8", "onnx-int4",
    "gguf-f16", "gguf-q8_0", "gguf-q4_k_m",
)  # fmt: skip
IMAGE_QUESTION = "What is in the image? Describe the shapes and their colours."
# the int8 decoder with the int8 vision encoder (export option vision_precision=int8, which
# needs an eval set: a few easy-vqa questions at the preset's image size, made in --workdir)
VISION_INT8_VARIANT = (
    "onnx-int8-vision-int8",
    "int8",
    {"opset": CPU_OPSET, "vision_precision": "int8"},
)
VISION_INT8_EVAL = 8  # eval questions the export measures the int8 vision encoder on
# prefill: llama.cpp's prompt batch sizes (n_batch, n_ubatch) measured side by side; the
# first is the backend's old default, the edgekd default (N_BATCH, N_UBATCH) is among them
PREFILL_BATCHES = ((512, 512), (2048, 256), (2048, 512), (2048, 1024))
PREFILL_VARIANTS = (
    "pytorch-fp32", "onnx-fp32", "onnx-int8", "onnx-int4", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m",
)  # fmt: skip
# measured beside them when --workdir holds it: the int8 artifact exported before the decoder
# took logits_index (every prompt position through the lm_head), for the before/after
PREFILL_BEFORE = ("onnx-int8-all-logits",)
# targets of the whole answer and of prefill (over PyTorch eager fp32, or the GEMM roofline)
ANSWER_TARGET = 5.0  # best artifact's end-to-end 16-token answer speed-up
GGUF_PREFILL_TARGET = 2.0  # GGUF prefill speed-up at the image length
ONNX_PREFILL_ROOFLINE_TARGET = 1.5  # ONNX prefill ms within this factor of the GEMM roofline


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` rotated by ``r``: each round starts with another variant (drift favours none)."""
    return names[r % len(names) :] + names[: r % len(names)]


# ---- artifacts ---------------------------------------------------------------------------------
def prepare(work: Path, threads: int, log) -> dict:
    """Checkpoint and artifacts under ``work`` (kept ones are reused); what was built, how."""
    from edgekd.export import ExportConfig, ParityError, export
    from edgekd.models.factory import create_checkpoint

    info: dict = {"checkpoint": str(work / "ckpt"), "artifacts": {}}
    if not (work / "ckpt" / "config.json").exists():
        t0 = time.perf_counter()
        info["parameters"] = create_checkpoint(PRESET, work / "ckpt", seed=0)
        info["checkpoint_s"] = time.perf_counter() - t0
        log(f"checkpoint {info['checkpoint_s']:.0f} s")
    name, p, options = VISION_INT8_VARIANT
    variants = {
        **{n: ("onnx", p, o) for n, (p, o) in ONNX_VARIANTS.items()},
        **{n: ("gguf", p, {}) for n, p in GGUF_VARIANTS.items()},
        name: ("onnx", p, options),
    }
    for name, (target, p, options) in variants.items():
        out = work / name
        if reusable(out, log):
            continue
        t0 = time.perf_counter()
        eval_data = vision_eval_set(work) if options.get("vision_precision") else None
        config = ExportConfig(
            str(work / "ckpt"),
            target,
            p,
            out,
            overwrite=out.exists(),  # only a directory reusable() refused
            n_parity_prompts=2,
            options=options,
            eval_data=eval_data,
            eval_limit=VISION_INT8_EVAL,
        )
        try:
            parity = export(config)["parity"]
        except ParityError as e:
            parity = export_unproven(config, e)
        row = {"export_s": time.perf_counter() - t0, "parity_passed": parity["passed"]}
        if not parity["passed"]:
            row["parity_error"] = parity["error"]
        info["artifacts"][name] = row
        log(f"{name}: {row['export_s']:.0f} s, parity passed: {parity['passed']}")
    for name in variants:
        info["artifacts"].setdefault(name, {"reused": "built by an earlier run in --workdir"})
    info["parity"] = {}  # of every artifact measured, built now or kept from an earlier run
    for name in variants:
        info["parity"][name] = parity_row(artifact.load(work / name))
    return info


def vision_eval_set(work: Path) -> Path:
    """A few easy-vqa test questions (LLaVA JSON + images) for the int8 vision export."""
    from edgekd.data.easyvqa import write_easy_vqa

    root = work / "easy-vqa-eval"
    if not (root / "test.json").exists():
        write_easy_vqa(root, limit_train=1, limit_test=VISION_INT8_EVAL, overwrite=True)
    return root / "test.json"


def reusable(out: Path, log) -> bool:
    """``out`` holds an artifact this edgekd reads (one of an older format is re-exported)."""
    if not out.exists():
        return False
    try:
        artifact.load(out)
    except artifact.ArtifactError as e:
        log(f"re-exporting {out.name}: {e}")
        return False
    return True


def parity_row(loaded: artifact.Artifact) -> dict:
    """Passed, options, error, and the numbers of the checks a decode or vision row refers to."""
    parity = loaded.parity
    row = {"passed": parity["passed"], "options": loaded.options}
    if "error" in parity:
        row["error"] = parity["error"]
    checks = parity.get("checks", {})
    for check in ("vision", "logits", "kv_cache", "text_logits"):
        if check in checks:
            c = checks[check]
            row[check] = {k: c[k] for k in ("cosine_min", "max_abs") if k in c}
    if "greedy" in checks:
        row["greedy_prompts_exact"] = checks["greedy"]["prompts_exact"]
    if "stock_llama_cpp" in parity:  # every clip row fed, as stock llama.cpp tools do
        row["stock_llama_cpp"] = parity["stock_llama_cpp"]
    if loaded.target == "onnx":  # graphs exported before logits_index run the head everywhere
        from edgekd.runtime.onnxruntime import read_onnx_config

        inputs = read_onnx_config(loaded.root)["decoder"]["inputs"]
        row["lm_head_positions"] = "asked (logits_index)" if "logits_index" in inputs else "all"
    return row


def export_unproven(config, error) -> dict:
    """The export again, its parity failure recorded in the manifest instead of raised.

    On random weights the int4 logits can miss the exporter's cosine floor (a random model's
    near-flat logits are mostly quantization noise); the speed is measured all the same, and
    the failure is reported with its numbers (the parity report the error carries).
    """
    from edgekd.export import get_exporter
    from edgekd.models import VLM
    from edgekd.outputs import guarded_dir

    vlm = VLM.from_pretrained(config.checkpoint, dtype="float32")
    exporter = get_exporter(config.target)
    exporter.check(vlm, config)
    parity = {**(error.report or {"passed": False}), "error": str(error)}
    with guarded_dir(config.output, overwrite=config.overwrite) as tmp:
        components = exporter.export(vlm, config, tmp)
        artifact.write(
            tmp,
            target=config.target,
            precision=config.precision,
            checkpoint=config.checkpoint,
            components=components,
            vlm=vlm,
            parity=parity,
            options=config.options,
        )
    return parity


# ---- decode ------------------------------------------------------------------------------------
def open_pytorch(work: Path, log):
    """The checkpoint on PyTorch eager fp32, its vision tower dropped (decode runs text only)."""
    from edgekd.runtime.torch import TorchBackend

    t0 = time.perf_counter()
    backend = TorchBackend(work / "ckpt", device="cpu", dtype="float32")
    backend.vlm.model.model.vision_tower = None  # text-only decode: its memory back
    log(f"loaded pytorch-fp32 ({time.perf_counter() - t0:.0f} s)")
    return backend


def open_decoders(work: Path, threads: int, n_ctx: int, log) -> dict:
    """The ONNX and GGUF decode variants, loaded once (the ONNX vision parts dropped, the GGUF
    mmproj kept: decode runs text only); the GGUF contexts ``n_ctx`` tokens long."""
    import resource

    from edgekd.runtime import load_backend

    backends = {}
    for name in ONNX_VARIANTS:
        t0 = time.perf_counter()
        b = load_backend(work / name, device="cpu", threads=threads)
        b.vision = None  # text-only decode
        backends[name] = b
        log(f"loaded {name} ({time.perf_counter() - t0:.0f} s)")
    from edgekd.runtime.llamacpp import LlamaCppBackend

    for name in GGUF_VARIANTS:  # the mmproj stays loaded (libmtmd); decode runs text only
        t0 = time.perf_counter()
        backends[name] = LlamaCppBackend(work / name, n_threads=threads, n_ctx=n_ctx)
        log(f"loaded {name} ({time.perf_counter() - t0:.0f} s)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    log(f"peak RSS after loading: {rss:.1f} GB")
    return backends


def variant_dir(work: Path, name: str) -> Path:
    return work / "ckpt" if name.startswith("pytorch") else work / name


def decode_prompts(tokenizer, visual_tokens: int) -> dict[str, str]:
    """``text``: one question; ``image-length``: the question after filler text as long as the
    visual tokens of one image (so the KV cache is as long as with an image, and every variant
    decodes the same tokens; the ``image`` stage answers about a real image)."""
    words = FILLER.split()
    filler: list[str] = []
    while len(tokenizer(" ".join(filler), add_special_tokens=False)["input_ids"]) < visual_tokens:
        filler.extend(words[len(filler) % len(words) :][:8])
    return {"text": PROMPT, "image-length": " ".join(filler) + "\n" + PROMPT}


def decode(work: Path, args, log) -> dict:
    """Per context: interleaved rounds, the bandwidth measured around each generation;
    medians, ratios to PyTorch, roofline fractions."""
    from edgekd.plan.roofline import measure_bandwidth
    from edgekd.runtime.prompt import encode_prompt

    pytorch = open_pytorch(work, log)
    visual = artifact.load(work / "onnx-fp32").preprocessing["image_tokens_per_image"]
    prompts = decode_prompts(pytorch.processor.tokenizer, visual)
    prompts = {k: v for k, v in prompts.items() if k in args.contexts}
    # the GGUF sessions hold the longest prompt and the most tokens generated after it
    longest = max(encode_prompt(pytorch.processor, None, p)[0].shape[1] for p in prompts.values())
    n_ctx = longest + max(args.tokens, WARMUP_TOKENS)
    backends = {"pytorch-fp32": pytorch, **open_decoders(work, args.threads, n_ctx, log)}
    names = list(backends)
    for name in names:  # warm-up: first-call allocations, page-in of mapped weights
        for prompt in prompts.values():
            backends[name].generate(None, prompt, max_new_tokens=WARMUP_TOKENS, ignore_eos=True)
    contexts = {}
    for context, prompt in prompts.items():
        samples: dict[str, list[dict]] = {n: [] for n in names}
        bandwidth: list[dict] = []
        for r in range(args.rounds):
            for name in rotated(names, r):
                # the bandwidth right before and after each generation: this machine's memory
                # speed drifts, so each sample gets its own roofline, at the higher of the two
                before = measure_bandwidth(args.threads, args.bandwidth_mb, args.bandwidth_repeats)
                gen = backends[name].generate(
                    None, prompt, max_new_tokens=args.tokens, ignore_eos=True
                )
                after = measure_bandwidth(args.threads, args.bandwidth_mb, args.bandwidth_repeats)
                bandwidth += [before, after]
                samples[name].append(
                    {
                        "bandwidth_gbps": max(before["best_gbps"], after["best_gbps"]),
                        "decode_tok_s": gen.decode_tokens_per_s,
                        "decode_ms": gen.decode_ms,
                        "prefill_ms": gen.prefill_ms,
                        "prompt_tokens": gen.prompt_tokens,
                        "tokens": len(gen.token_ids),
                    }
                )
            round_bw = [b["best_gbps"] for b in bandwidth[-2 * len(names) :]]
            log(
                f"{context} round {r + 1}/{args.rounds}: bandwidth {min(round_bw):.1f}-"
                f"{max(round_bw):.1f} GB/s; "
                + ", ".join(f"{n} {samples[n][-1]['decode_tok_s']:.1f}" for n in names)
            )
        bw_all = [x for b in bandwidth for x in b["samples_gbps"]]
        bw = {
            "best_gbps": max(bw_all),
            "median_gbps": statistics.median(bw_all),
            "per_measurement_best_gbps": [b["best_gbps"] for b in bandwidth],
            "samples_gbps": bw_all,
            "method": bandwidth[0]["method"],
            "size_mb": args.bandwidth_mb,
            "repeats_per_generation": args.bandwidth_repeats,
            "threads": args.threads,
        }
        rows = summarise(work, samples, bw, args.tokens)
        contexts[context] = {
            "prompt": prompt,
            "new_tokens": args.tokens,
            "rounds": args.rounds,
            "threads": args.threads,
            "bandwidth": bw,
            "variants": rows,
            "met": all(r["met"] for r in rows.values() if "met" in r),
        }
    for b in backends.values():
        b.close()
    return contexts


def summarise(work: Path, samples: dict[str, list[dict]], bw: dict, tokens: int) -> dict:
    """Per variant: median tok/s, ratio to PyTorch fp32, roofline fraction, target and met.

    ``roofline_fraction`` (judged): the median over generations of ``tok/s / roofline``, each
    against the higher bandwidth measured just before and just after it.
    ``roofline_fraction_run_best``: the median tok/s against the best bandwidth of the whole
    context run (stricter where memory speed drifted during the run). ``ratio_per_round``:
    each round's tok/s over PyTorch's in the same round.
    """
    from edgekd.plan.roofline import decode_bytes_per_token, roofline_tok_s

    rows: dict = {}
    base_runs = samples["pytorch-fp32"]
    base = statistics.median(s["decode_tok_s"] for s in base_runs)
    for name, runs in samples.items():
        tok_s = [s["decode_tok_s"] for s in runs]
        prompt_tokens = runs[0]["prompt_tokens"]
        context = prompt_tokens + tokens // 2  # mean cache length over the decode
        need = decode_bytes_per_token(variant_dir(work, name), context)
        median = statistics.median(tok_s)
        row = {
            "decode_tok_s": median,
            "decode_tok_s_samples": tok_s,
            "prefill_ms_median": statistics.median(s["prefill_ms"] for s in runs),
            "prompt_tokens": prompt_tokens,
            "ratio_vs_pytorch_fp32": median / base,
            "ratio_per_round": [
                s["decode_tok_s"] / b["decode_tok_s"] for s, b in zip(runs, base_runs)
            ],
            "bytes_per_token": need,
            "roofline_fraction_samples": [
                s["decode_tok_s"] / roofline_tok_s(need["total"], s["bandwidth_gbps"]) for s in runs
            ],
            "roofline_tok_s_run_best_bw": roofline_tok_s(need["total"], bw["best_gbps"]),
        }
        row["roofline_fraction"] = statistics.median(row["roofline_fraction_samples"])
        row["roofline_fraction_run_best"] = median / row["roofline_tok_s_run_best_bw"]
        row["achieved_gbps"] = median * need["total"] / 1e9
        if name in RATIO_TARGETS:
            row["target_ratio"] = RATIO_TARGETS[name]
            row["hand_export_ratio"] = HAND_EXPORT_RATIOS[name]
            row["met"] = row["ratio_vs_pytorch_fp32"] >= RATIO_TARGETS[name]
        if name in ROOFLINE_VARIANTS:
            row["target_roofline_fraction"] = ROOFLINE_TARGET
            row["met"] = row["roofline_fraction"] >= ROOFLINE_TARGET
        if name.endswith("-opset18"):  # the exporter's default opset, for comparison
            row["ratio_vs_opset23"] = median / statistics.median(
                x["decode_tok_s"] for x in samples[name.removesuffix("-opset18")]
            )
        rows[name] = row
    return rows


# ---- vision ------------------------------------------------------------------------------------
def vision(work: Path, args, log) -> dict:
    """PyTorch vs onnxruntime vision encoders, interleaved rounds, parity of the visual tokens."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgekd.export.parity import compare, synthetic_image
    from edgekd.models import VLM
    from edgekd.runtime.onnxruntime import OPTIMIZATION_LEVELS, _session_options

    vlm = VLM.from_pretrained(work / "ckpt")
    vlm.model.model.language_model = None  # vision tower + projector only
    size = vlm.processor.image_processor.size
    image = synthetic_image(0, (size["width"], size["height"]))
    pixels = vlm.processor.image_processor(images=[image], return_tensors="np")["pixel_values"]
    pixels = pixels.astype(np.float32)

    @torch.inference_mode()
    def run_torch():
        return vlm.project(vlm.vision_features(torch.from_numpy(pixels))).numpy()

    runners = {"pytorch-fp32": run_torch}
    sessions = {}
    fp32 = artifact.load(work / "onnx-fp32").path(targets.ONNX_VISION)
    for level in OPTIMIZATION_LEVELS:
        sessions[f"onnx-fp32 ({level})"] = (fp32, level)
    opset18 = artifact.load(work / "onnx-fp32-opset18").path(targets.ONNX_VISION)
    sessions["onnx-fp32-opset18 (all)"] = (opset18, "all")
    sessions["onnx-int8-vision (all)"] = (int8_vision(work, log), "all")
    for name, (path, level) in sessions.items():
        s = ort.InferenceSession(
            str(path),
            _session_options(args.threads, level),
            providers=["CPUExecutionProvider"],
        )
        runners[name] = lambda s=s: s.run(None, {"pixel_values": pixels})[0]
    outputs = {name: run() for name, run in runners.items()}  # warm-up, and the parity outputs
    ref = outputs["pytorch-fp32"]
    times: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    for r in range(args.vision_rounds):
        for name in rotated(names, r):
            t0 = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        log(
            f"vision round {r + 1}/{args.vision_rounds}: "
            + ", ".join(f"{n} {times[n][-1]:.0f} ms" for n in names)
        )
    base = statistics.median(times["pytorch-fp32"])
    rows = {}
    for name in names:
        ms = statistics.median(times[name])
        numbers = compare(outputs[name], ref)
        rows[name] = {
            "ms": ms,
            "ms_samples": times[name],
            "speedup_vs_pytorch_fp32": base / ms,
            "parity": {
                "max_abs": numbers["max_abs"],
                "max_rel": numbers["max_rel"],
                "min_cosine": numbers["cosine_min"],
            },
        }
        if name != "pytorch-fp32":
            rows[name]["met"] = base / ms >= VISION_TARGET
    return {
        "image_size": [size["height"], size["width"]],
        "visual_tokens": int(ref.shape[1]),
        "rounds": args.vision_rounds,
        "threads": args.threads,
        "target_speedup": VISION_TARGET,
        "int8_vision": "the fp32 artifact's vision_encoder.onnx through "
        "edgekd.export.onnx_graph.quantize_int8 (dynamic int8, per-channel weights: the "
        "int8 decoder's pass); not an export option: edgekd's int8/int4 keep vision fp32",
        "variants": rows,
    }


def int8_vision(work: Path, log) -> Path:
    """The fp32 vision encoder with int8 dynamic MatMuls (edgekd's int8 pass), made once."""
    from edgekd.export import onnx_graph as g

    path = work / "vision-int8" / targets.ONNX_VISION
    if not path.exists():
        t0 = time.perf_counter()
        fp32 = artifact.load(work / "onnx-fp32").path(targets.ONNX_VISION)
        model = g.quantize_int8(g.load(fp32))
        path.parent.mkdir(exist_ok=True)
        g.save(model, path)
        log(f"int8 vision encoder ({time.perf_counter() - t0:.0f} s)")
    return path


# ---- prefill against the compute roofline -----------------------------------------------------
def prompt_gemm(dims, tokens: int, threads: int) -> dict:
    """GEMM throughput at the prompt's shape: tokens x hidden x MLP width, fp32 and int8."""
    from edgekd.plan.roofline import measure_gemm

    return measure_gemm(tokens, dims.hidden, dims.intermediate, threads=threads)


def roofline_columns(row: dict, name: str, work: Path, roof: dict) -> None:
    """The prompt's FLOPs at the GEMM throughput of the arithmetic the variant computes in
    (:func:`edgekd.plan.roofline.prefill_bound`) into ``row``: ``prefill_roofline_ms``,
    ``prefill_over_roofline`` (measured / roofline) and the rest."""
    from edgekd.plan.roofline import prefill_bound, text_dims_of

    precision = text_dims_of(variant_dir(work, name))[1]
    b = prefill_bound(
        roof["dims"], precision, row["prompt_tokens"], roof["gemm"], row["prefill_ms"]
    )
    row["prefill_gemm"] = b["arithmetic"]
    row["prefill_flops"] = b["flops"]["total"]
    row["prefill_roofline_ms"] = b["roofline_ms"]
    row["prefill_over_roofline"] = b["over_roofline"]
    row["prefill_achieved_gflops"] = b["achieved_gflops"]


def best_gemm(runs: list[dict]) -> dict:
    """Per arithmetic, the run with the highest throughput (interference only slows a GEMM),
    the others kept as samples."""
    out = {}
    for arithmetic in runs[0]:
        rows = [r[arithmetic] for r in runs if arithmetic in r]
        best = max(rows, key=lambda r: r["gflops"])
        out[arithmetic] = {**best, "samples_gflops": [r["gflops"] for r in rows]}
    return out


def close_with_roofline(backends: dict, dims, tokens: int, threads: int, gemm_runs: list) -> dict:
    """After the rounds: the GEMM measured once more, every backend closed; the roofline's
    inputs (the dimensions and the best GEMM per arithmetic)."""
    gemm_runs.append(prompt_gemm(dims, tokens, threads))
    for b in backends.values():
        b.close()
    return {"dims": dims, "gemm": best_gemm(gemm_runs)}


def prefill(work: Path, args, log) -> dict:
    """Prefill of the image-length text prompt (as long as one image's visual tokens plus a
    question: the decode stage's ``image-length`` prompt), one generated token, every
    :data:`PREFILL_VARIANTS` and each GGUF at every :data:`PREFILL_BATCHES`, interleaved rounds;
    medians, ratios to PyTorch eager fp32 and the compute roofline (GEMM throughput measured
    before and after the rounds, the best kept)."""
    from edgekd.plan.roofline import prefill_flops, text_dims_of
    from edgekd.runtime import load_backend
    from edgekd.runtime.llamacpp import N_BATCH, N_UBATCH, LlamaCppBackend
    from edgekd.runtime.prompt import encode_prompt

    pytorch = open_pytorch(work, log)
    visual = artifact.load(work / "onnx-fp32").preprocessing["image_tokens_per_image"]
    prompt = decode_prompts(pytorch.processor.tokenizer, visual)["image-length"]
    tokens = int(encode_prompt(pytorch.processor, None, prompt)[0].shape[1])
    backends = {"pytorch-fp32": pytorch}
    before = [n for n in PREFILL_BEFORE if (work / n / artifact.MANIFEST).is_file()]
    for name in [*PREFILL_VARIANTS[1:], *before]:
        t0 = time.perf_counter()
        if name.startswith("gguf"):
            for n_batch, n_ubatch in PREFILL_BATCHES:
                label = f"{name} b{n_batch}/u{n_ubatch}"
                backends[label] = LlamaCppBackend(  # n_ctx >= n_batch: no size is clamped
                    work / name, n_threads=args.threads, n_ctx=max(tokens + 8, n_batch),
                    n_batch=n_batch, n_ubatch=n_ubatch,
                )  # fmt: skip
                llm = backends[label].session.llm
                effective = (llm.n_batch, llm.context_params.n_ubatch)
                if effective != (n_batch, n_ubatch):
                    raise EdgeKDError(f"{label}: llama.cpp runs n_batch/n_ubatch {effective}")
        else:
            backends[name] = load_backend(work / name, device="cpu", threads=args.threads)
            backends[name].vision = None  # text only
        log(f"loaded {name} ({time.perf_counter() - t0:.0f} s)")
    dims = text_dims_of(work / "ckpt")[0]
    gemm_runs = [prompt_gemm(dims, tokens, args.threads)]
    names = list(backends)
    for b in backends.values():  # warm-up
        b.generate(None, prompt, max_new_tokens=1, ignore_eos=True)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in rotated(names, r):
            gen = backends[name].generate(None, prompt, max_new_tokens=1, ignore_eos=True)
            samples[name].append(gen.prefill_ms)
        log(
            f"prefill round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {samples[n][-1]:.0f}" for n in names)
        )
    roof = close_with_roofline(backends, dims, tokens, args.threads, gemm_runs)
    base = statistics.median(samples["pytorch-fp32"])
    default = f" b{N_BATCH}/u{N_UBATCH}"
    rows = {}
    for name, ms in samples.items():
        row = {"prefill_ms": statistics.median(ms), "prefill_ms_samples": ms}
        row["prompt_tokens"] = tokens
        row["speedup_vs_pytorch_fp32"] = base / row["prefill_ms"]
        roofline_columns(row, name.split(" ")[0], work, roof)
        if name.startswith("gguf") and name.endswith(default):
            row["edgekd_default"] = True
            row["target_speedup"] = GGUF_PREFILL_TARGET
            row["met"] = row["speedup_vs_pytorch_fp32"] >= GGUF_PREFILL_TARGET
        if name.startswith("onnx") and name not in PREFILL_BEFORE:
            row["target_over_roofline"] = ONNX_PREFILL_ROOFLINE_TARGET
            row["met"] = row["prefill_over_roofline"] <= ONNX_PREFILL_ROOFLINE_TARGET
        rows[name] = row
    return {
        "prompt": prompt,
        "prompt_tokens": tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "gemm": roof["gemm"],
        "flops": prefill_flops(dims, tokens),
        "variants": rows,
    }


# ---- an answer about an image ------------------------------------------------------------------
def image_answers(work: Path, args, log) -> dict:
    """Each :data:`IMAGE_VARIANTS` answers one image question through its whole path (vision,
    prefill of the prompt with its visual tokens, ``--image-tokens`` decoded), interleaved
    rounds after a warm-up; medians of each stage and the ratios to PyTorch eager fp32.

    The GGUF artifacts take the exact path: clip's rows, the first dropped (the preset's
    ``default`` selection), fed as embeddings (:mod:`edgekd.runtime.llamacpp`).
    """
    from edgekd.export.parity import synthetic_image
    from edgekd.plan.roofline import text_dims_of
    from edgekd.runtime import load_backend
    from edgekd.runtime.torch import TorchBackend

    backends = {}
    for name in IMAGE_VARIANTS:
        t0 = time.perf_counter()
        if name == "pytorch-fp32":
            backends[name] = TorchBackend(work / "ckpt", device="cpu", dtype="float32")
        else:
            backends[name] = load_backend(work / name, device="cpu", threads=args.threads)
        log(f"loaded {name} ({time.perf_counter() - t0:.0f} s)")
    h, w = artifact.load(work / "onnx-fp32").preprocessing["image_size"]
    image = synthetic_image(0, (w, h))
    for b in backends.values():  # warm-up
        b.generate(image, IMAGE_QUESTION, max_new_tokens=WARMUP_TOKENS, ignore_eos=True)
    prompt_tokens = backends["pytorch-fp32"].encode(image, IMAGE_QUESTION)[0].shape[1]
    dims = text_dims_of(work / "ckpt")[0]
    gemm_runs = [prompt_gemm(dims, prompt_tokens, args.threads)]
    names = list(backends)
    samples: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in rotated(names, r):
            gen = backends[name].generate(
                image, IMAGE_QUESTION, max_new_tokens=args.image_tokens, ignore_eos=True
            )
            samples[name].append(
                {
                    "vision_ms": gen.vision_ms,
                    "prefill_ms": gen.prefill_ms,
                    "ttft_ms": gen.ttft_ms,
                    "decode_ms": gen.decode_ms,
                    "decode_tok_s": gen.decode_tokens_per_s,
                    "total_ms": gen.ttft_ms + gen.decode_ms,
                    "prompt_tokens": gen.prompt_tokens,
                    "tokens": len(gen.token_ids),
                }
            )
        log(
            f"image round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {samples[n][-1]['total_ms']:.0f} ms" for n in names)
        )
    roof = close_with_roofline(backends, dims, prompt_tokens, args.threads, gemm_runs)
    keys = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "total_ms")
    rows = {
        n: {
            **{k: statistics.median(x[k] for x in runs) for k in keys},
            "prompt_tokens": runs[0]["prompt_tokens"],
            "samples": runs,
        }
        for n, runs in samples.items()
    }
    base = rows["pytorch-fp32"]
    for name, row in rows.items():
        row["total_speedup_vs_pytorch_fp32"] = base["total_ms"] / row["total_ms"]
        row["vision_speedup_vs_pytorch_fp32"] = base["vision_ms"] / row["vision_ms"]
        row["prefill_speedup_vs_pytorch_fp32"] = base["prefill_ms"] / row["prefill_ms"]
        row["ttft_speedup_vs_pytorch_fp32"] = base["ttft_ms"] / row["ttft_ms"]
        row["decode_ratio_vs_pytorch_fp32"] = row["decode_tok_s"] / base["decode_tok_s"]
        roofline_columns(row, name, work, roof)
    best = min((n for n in rows if n != "pytorch-fp32"), key=lambda n: rows[n]["total_ms"])
    return {
        "question": IMAGE_QUESTION,
        "image_size": [h, w],
        "new_tokens": args.image_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "gemm": roof["gemm"],
        "best": best,
        "target_total_speedup": ANSWER_TARGET,
        "met": rows[best]["total_speedup_vs_pytorch_fp32"] >= ANSWER_TARGET,
        "variants": rows,
    }


# ---- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_speed.json"))
    ap.add_argument("--workdir", type=Path, default=None, help="keep and reuse artifacts here")
    ap.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode run")
    ap.add_argument("--contexts", nargs="+", choices=CONTEXTS, default=list(CONTEXTS))
    ap.add_argument(
        "--rounds", type=int, default=5, help="decode and image rounds (variants rotated)"
    )
    ap.add_argument("--vision-rounds", type=int, default=5)
    ap.add_argument("--image-tokens", type=int, default=16, help="new tokens per image answer")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument(
        "--bandwidth-repeats", type=int, default=3, help="bandwidth passes around each generation"
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from edgekd.envinfo import snapshot

    def env() -> dict:
        return snapshot(
            {"threads": args.threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        )

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict = {}
    if args.out.exists() and set(args.only) != set(STAGES):
        results = json.loads(args.out.read_text())  # merge the stages run now into it
    results.update(preset=PRESET, seed=0)
    keep = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()
    with keep as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "export" in args.only or not args.workdir:
            results["export"] = {**prepare(work, args.threads, log), "environment": env()}
        if "decode" in args.only:  # contexts run now replace the same contexts of --out
            contexts = decode(work, args, log)
            for c in contexts.values():
                c["environment"] = env()
            results["decode"] = {**results.get("decode", {}), **contexts}
        if "vision" in args.only:
            results["vision"] = {**vision(work, args, log), "environment": env()}
        if "prefill" in args.only:
            results["prefill"] = {**prefill(work, args, log), "environment": env()}
        if "image" in args.only:
            results["image"] = {**image_answers(work, args, log), "environment": env()}
    results["environment"] = env()  # of the latest run; each stage keeps its own
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"wrote {args.out}")


def report(results: dict) -> None:
    for context, c in results.get("decode", {}).items():
        bw = c["bandwidth"]
        prompt_tokens = c["variants"]["pytorch-fp32"]["prompt_tokens"]
        print(
            f"decode, context '{context}' ({prompt_tokens} prompt tokens), {c['threads']} "
            f"threads, {c['new_tokens']} tokens x {c['rounds']} rounds; bandwidth best "
            f"{bw['best_gbps']:.1f} GB/s, median {bw['median_gbps']:.1f} GB/s"
        )
        head = ("variant", "tok/s", "ratio", "target", "roofline", "met")
        print("{:<20} {:>7} {:>6} {:>7} {:>8} {:>4}".format(*head))
        for name, r in c["variants"].items():
            target = r.get("target_ratio") or r.get("target_roofline_fraction")
            met = {True: "yes", False: "no", None: ""}[r.get("met")]
            print(
                f"{name:<20} {r['decode_tok_s']:7.2f} {r['ratio_vs_pytorch_fp32']:6.2f} "
                f"{target or '':>7} {r['roofline_fraction']:8.2f} {met:>4}"
            )
    if "prefill" in results:
        pf = results["prefill"]
        g = pf["gemm"]
        gemm = ", ".join(f"{k} {v['gflops']:.0f} GFLOP/s" for k, v in g.items())
        print(f"prefill, {pf['prompt_tokens']} tokens, {pf['threads']} threads; GEMM {gemm}")
        for name, r in pf["variants"].items():
            print(
                f"{name:<26} {r['prefill_ms']:6.0f} ms {r['speedup_vs_pytorch_fp32']:5.2f}x  "
                f"roofline ({r['prefill_gemm']}) {r['prefill_roofline_ms']:5.0f} ms, "
                f"x{r['prefill_over_roofline']:.2f}"
            )
    if "image" in results:
        im = results["image"]
        print(f"image answer, {im['new_tokens']} tokens, {im['threads']} threads")
        for name, r in im["variants"].items():
            roof = r.get("prefill_over_roofline", float("nan"))  # older results lack it
            print(
                f"{name:<22} vision {r['vision_ms']:6.0f} ms  prefill {r['prefill_ms']:6.0f} ms "
                f"({r['prompt_tokens']} tokens, x{roof:.2f} roofline)  "
                f"TTFT {r['ttft_ms']:6.0f} ms  decode {r['decode_tok_s']:5.1f} tok/s  "
                f"total {r['total_ms']:6.0f} ms ({r['total_speedup_vs_pytorch_fp32']:.2f}x)"
            )
    if "vision" in results:
        v = results["vision"]
        print(f"vision encode {v['image_size']}, {v['threads']} threads")
        for name, r in v["variants"].items():
            p = r["parity"]
            print(
                f"{name:<26} {r['ms']:8.0f} ms {r['speedup_vs_pytorch_fp32']:5.2f}x  "
                f"cos {p['min_cosine']:.5f} max-abs {p['max_abs']:.3g}"
            )


if __name__ == "__main__":
    try:
        main()
    except EdgeKDError as e:  # e.g. a kept --workdir file changed since it was built
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
