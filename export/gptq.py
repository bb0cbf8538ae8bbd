"""GPTQ: 4-bit weights chosen with the layer's calibration inputs, not rounded one by one.

Round-to-nearest int4 in blocks of 32 fails on real language models (SmolLM2-135M: the
teacher's next-token distribution moves 0.41-0.78 nats, docs/performance.md, "Real weights"):
every weight's rounding error adds up in the layer's output. GPTQ (Frantar et al., 2022)
quantizes a ``Linear``'s input columns one at a time and moves the rounding error of each onto
the columns not yet quantized, weighted by the inverse of ``H = X^T X`` (``X``: the layer's
inputs on calibration prompts), so the layer's *outputs* on those inputs stay close.

The grid is the format's (:data:`GRIDS`): a scale and an integer zero point per block of
``group`` consecutive inputs for onnxruntime's ``MatMulNBits``, an fp16 scale and zero 8 for
llama.cpp's Q4_0 (GPTQ makes up for the symmetric grid: on SmolLM2 both cost 0.014-0.016 nats
where rounding cost 0.4-0.8), an fp16 scale times one of 16 non-uniform levels for its
IQ4_NL (each column goes to the nearest level; :data:`CODEBOOKS`). Columns are visited in the
order of decreasing ``H[i, i]`` (the inputs that carry most energy first, "act-order"), while
each block's scale and zero point are fixed up front from the original weights ("static
groups"), so the blocks stay contiguous and any runtime reads them.

Hessians are accumulated from one forward pass per group of layers whose matrices fit
:data:`HESSIAN_BYTES` (a 3B model's ``down_proj`` Hessians do not fit at once); layers sharing
an input (q/k/v, gate/up) share its Gram matrix per forward.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.export import parity
from edgekd.export.base import ExportError

log = logging.getLogger(__name__)

HESSIAN_BYTES = 2 << 30  # fp32 Hessians held at once (a forward pass per group of layers)
DAMP = 0.01  # added to H's diagonal, in units of its mean (GPTQ's default)
COLUMN_BLOCK = 128  # columns updated together (lazy batch updates)
CALIBRATION_SAMPLES = 32  # default prompts (about 3k tokens with a 64-token image)
MAX_CALIBRATION_SAMPLES = 1024
CALIBRATION_SEED = 1000  # synthetic calibration images: seeds apart from parity's (0, 1, ...)


@dataclass(frozen=True)
class BlockQuantized:
    """A ``Linear`` weight ``[out, in]`` as ``(q - zero) * scale`` per block of ``group`` inputs.

    ``q``: uint8 ``[out, in_padded]`` (values below ``2**bits``; ``in`` padded with zeros to a
    multiple of ``group``), ``scale``: float32 ``[out, blocks]``, ``zero``: float32
    ``[out, blocks]`` (whole numbers). ``grid``: the format's rule (:data:`GRIDS`).
    """

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    group: int
    in_features: int
    grid: str = "zero_point"

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``[out, in]`` this block data stands for."""
        scale = np.repeat(self.scale, self.group, axis=1)
        if self.grid in CODEBOOKS:  # non-uniform levels: scale * book[q]
            book = np.asarray(CODEBOOKS[self.grid], np.float32)
            return (book[self.q] * scale)[:, : self.in_features]
        zero = np.repeat(self.zero.astype(np.float32), self.group, axis=1)
        return ((self.q.astype(np.float32) - zero) * scale)[:, : self.in_features]


def weight_key(weight: np.ndarray) -> str:
    """A content key for a ``[out, in]`` weight (graphs keep weights but not module names)."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    return hashlib.sha1(w.tobytes() + str(w.shape).encode()).hexdigest()


def block_grid(w, bits: int, group: int, grid: str = "zero_point"):
    """Per-block ``scale`` and ``zero`` (weights are ``(q - zero) * scale``, ``q`` from 0 to
    ``2**bits - 1``) of ``w`` ``[out, in]`` (torch, ``in % group == 0``), as the format stores
    them (see :data:`GRIDS`)."""
    import torch

    out, n = w.shape
    blocks = w.reshape(out, n // group, group)
    top = 2**bits - 1
    tiny = torch.finfo(torch.float32).tiny
    if grid == "zero_point":
        hi, lo = blocks.amax(-1).clamp(min=0), blocks.amin(-1).clamp(max=0)
        scale = ((hi - lo) / top).clamp(min=tiny)
        return scale, (-lo / scale).round()
    if grid == "ggml_q4_0":  # d * (q - 8), d in fp16 from the signed absmax (llama.cpp's rule)
        idx = blocks.abs().argmax(-1, keepdim=True)
        signed = blocks.gather(-1, idx).squeeze(-1)
        d = (signed / -(2 ** (bits - 1))).half().double()
        d = torch.where(d != 0, d, torch.ones_like(d))
        return d, torch.full_like(d, 2 ** (bits - 1))
    if grid == "ggml_iq4_nl":  # d * book[q], d in fp16: the signed absmax lands on -127 exactly
        idx = blocks.abs().argmax(-1, keepdim=True)
        signed = blocks.gather(-1, idx).squeeze(-1)
        d = (signed / CODEBOOKS[grid][0]).half().double()
        d = torch.where(d != 0, d, torch.ones_like(d))
        return d, torch.zeros_like(d)
    raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")


GRIDS = {
    "zero_point": "onnxruntime MatMulNBits: fp32 scale, integer zero point per block",
    "ggml_q4_0": "llama.cpp Q4_0: fp16 scale, zero 8, symmetric",
    "ggml_iq4_nl": "llama.cpp IQ4_NL: fp16 scale times one of 16 non-uniform levels",
}
# grids whose levels are a table (the weight is scale * book[q]): ggml's kvalues_iq4nl
CODEBOOKS = {
    "ggml_iq4_nl": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113),
}


def quantize_weight(
    weight,
    hessian,
    *,
    bits: int = 4,
    group: int = 32,
    damp: float = DAMP,
    grid: str = "zero_point",
) -> BlockQuantized:
    """GPTQ of one ``[out, in]`` weight (torch or numpy) against ``hessian`` ``[in, in]``."""
    import torch

    w = torch.as_tensor(np.asarray(weight), dtype=torch.float64)
    h = torch.as_tensor(np.asarray(hessian), dtype=torch.float64).clone()
    out, n_in = w.shape
    pad = -n_in % group
    if pad:  # padded inputs carry nothing: zero weights, unit diagonal
        w = torch.nn.functional.pad(w, (0, pad))
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = block_grid(w, bits, group, grid)
    col_scale = scale.repeat_interleave(group, 1)
    col_zero = zero.repeat_interleave(group, 1)
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h = w[:, order], h[order][:, order]
    col_scale, col_zero = col_scale[:, order], col_zero[:, order]
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = torch.zeros_like(w)
    top = 2**bits - 1
    book = torch.tensor(CODEBOOKS[grid], dtype=w.dtype) if grid in CODEBOOKS else None
    mids = None if book is None else (book[1:] + book[:-1]) / 2
    for i1 in range(0, n, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, n)
        w1, err = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=w.dtype)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s, z = col_scale[:, i1 + i], col_zero[:, i1 + i]
            if book is None:
                level = (w1[:, i] / s + z).round().clamp(0, top)
                value = (level - z) * s
            else:  # the nearest table level
                level = torch.bucketize(w1[:, i] / s, mids)
                value = book[level] * s
            levels[:, i1 + i] = level
            e = (w1[:, i] - value) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    levels = levels[:, torch.argsort(order)]
    return BlockQuantized(
        q=levels.numpy().astype(np.uint8),
        scale=scale.numpy().astype(np.float32),
        zero=zero.numpy().astype(np.float32),
        bits=bits,
        group=group,
        in_features=n_in,
        grid=grid,
    )


def calibration_prompts(vlm, config, data, samples: int) -> list[Any]:
    """GPTQ's prompts: the first ``samples`` of the LLaVA JSON ``data`` (the training data
    is the natural choice), or synthetic image prompts (seeds apart from the parity prompts',
    so the parity check is not measured on what the quantizer saw)."""
    source = replace(config, eval_data=Path(data) if data else None)
    return parity.cases(vlm, source, n=samples, seed=CALIBRATION_SEED)


def calibration_problems(options: dict[str, Any]) -> list[str]:
    """GPTQ's options (ONNX int4, GGUF q4_0): ``calibration_samples`` and ``calibration_data``."""
    problems = []
    samples = options.get("calibration_samples", CALIBRATION_SAMPLES)
    if not isinstance(samples, int) or isinstance(samples, bool):
        samples = -1
    if not 1 <= samples <= MAX_CALIBRATION_SAMPLES:
        problems.append(
            f"calibration_samples {options.get('calibration_samples')!r} must be an integer from "
            f"1 to {MAX_CALIBRATION_SAMPLES} (default "
            f"{CALIBRATION_SAMPLES})"
        )
    data = options.get("calibration_data")
    if data is not None and not Path(str(data)).is_file():
        problems.append(
            f"calibration_data {data!r} is not a file: give a LLaVA JSON (the training data "
            "is a good choice), or leave it out for synthetic image prompts"
        )
    return problems


def calibrate(
    vlm, config, data, samples: int, *, grid: str, group: int = 32
) -> tuple[dict[str, list[BlockQuantized]], dict[str, Any]]:
    """GPTQ of the language model on :func:`calibration_prompts`: its blocks, and what the
    manifest records of the calibration."""
    prompts = calibration_prompts(vlm, config, data, samples)
    source = "LLaVA-JSON" if data else "synthetic image"
    log.info("GPTQ %s: calibrating on %d %s prompts", config.precision, len(prompts), source)
    blocks = quantize_language_model(vlm, prompts, bits=4, group=group, grid=grid)
    record = {
        "method": "gptq",
        "grid": grid,
        "samples": len(prompts),
        "tokens": int(sum(p.input_ids.shape[1] for p in prompts)),
        "source": str(data) if data else "synthetic",
    }
    return blocks, record


def take(pending: dict[str, list[BlockQuantized]], weight: np.ndarray) -> BlockQuantized | None:
    """The next unclaimed blocks of ``weight`` (``[out, in]``) from ``pending`` (a copy of
    :func:`quantize_language_model`'s result: equal weights are handed out in module order)."""
    found = pending.get(weight_key(weight))
    return found.pop(0) if found else None


def linears(vlm) -> list[tuple[str, Any]]:
    """The language model's ``Linear`` layers, by name (relative to the language model)."""
    import torch

    lm = vlm.model.model.language_model
    return [(n, m) for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def _groups(linears, budget: int) -> list[list[tuple[str, Any]]]:
    """Consecutive decoder layers whose Hessians (one per distinct input) fit ``budget``."""
    groups: list[list[tuple[str, Any]]] = []
    size, layer = budget + 1, None
    for name, module in linears:
        nbytes = 4 * module.in_features**2
        if _layer_of(name) != layer and size + nbytes > budget:
            groups.append([])
            size = 0
        layer = _layer_of(name)
        groups[-1].append((name, module))
        size += nbytes
    return groups


def hessians(vlm, prompts: Sequence[Any], modules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``H = X^T X / tokens`` (fp32, torch) of each module's input over ``prompts``
    (:class:`edgekd.export.parity.Case`); modules reading one input (q/k/v, gate/up) share its
    Gram matrix per forward."""
    import torch

    sums: dict[str, Any] = {}
    tokens: dict[str, int] = {}
    # input tensor id -> (tensor, Gram matrix, tokens) for the current forward; the tensor is
    # held so that its id cannot be reused within the forward
    seen: dict[int, tuple[Any, Any, int]] = {}

    def hook(name: str):
        def record(_module, args, _output):
            x = args[0]
            if id(x) not in seen:
                flat = x.detach().reshape(-1, x.shape[-1]).float().cpu()
                seen[id(x)] = (x, flat.T @ flat, flat.shape[0])
            _, gram, n = seen[id(x)]
            sums[name] = sums[name] + gram if name in sums else gram.clone()
            tokens[name] = tokens.get(name, 0) + n

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    try:
        for case in prompts:
            pv = case.pixel_values
            if pv is not None:
                pv = torch.from_numpy(pv).to(vlm.device, vlm.dtype)
            with torch.no_grad():
                vlm.forward_stages(torch.from_numpy(case.input_ids).to(vlm.device), None, pv)
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(tokens[n], 1) for n in sums}


def quantize_language_model(
    vlm,
    prompts: Sequence[Any],
    *,
    bits: int = 4,
    group: int = 32,
    skip: Callable[[str], bool] = lambda name: False,
    budget: int = HESSIAN_BYTES,
    grid: str = "zero_point",
) -> dict[str, list[BlockQuantized]]:
    """GPTQ of every ``Linear`` of the language model but those ``skip`` names, keyed by
    :func:`weight_key` of the original weight (equal weights: a list, in module order).

    Raises:
        ExportError: a layer saw no calibration input (it never runs in the forward).
    """
    chosen = [(n, m) for n, m in linears(vlm) if not skip(n)]
    done: dict[str, Any] = {}
    groups = _groups(chosen, budget)
    for i, modules in enumerate(groups, 1):
        hs = hessians(vlm, prompts, modules)
        for name, module in modules:
            if name not in hs:
                raise ExportError(f"GPTQ: {name} saw no calibration input; it never runs")
            w = module.weight.detach().float().cpu()
            quantized = quantize_weight(
                w.numpy(), hs[name].numpy(), bits=bits, group=group, grid=grid
            )
            done.setdefault(weight_key(w.numpy()), []).append(quantized)
        log.info(
            "GPTQ %d-bit: %d/%d layers quantized (group %d/%d)",
            bits,
            sum(len(m) for m in groups[:i]),
            len(chosen),
            i,
            len(groups),
        )
    return done
