"""The onnx target's own parity checks, run by :func:`edgekd.export.parity.validate` beside the
shared ones (vision, logits, greedy, accuracy):

* ``preprocessing``: the artifact's saved processor gives the same token ids and pixel values
  as the checkpoint's processor;
* ``kv_cache``: decode steps through the KV cache with forced tokens against one full forward
  over them all (a cache or position bug shows even where greedy decoding of a random model
  repeats one token). The forced tokens are a plain sentence, so the positions checked are
  ones a decode reaches: after random ids a real model is far off everything it learnt, and a
  4-bit SmolLM2 teacher moved 0.33 nats there against 0.15 after the sentence (0.03 on the
  parity prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgekd.export.parity import Case, Tolerance, check_logits_numbers

KV_STEPS = 6  # forced decode steps compared with a full forward
FORCED_TEXT = " The answer is a small red circle in the middle of the picture."


def check_preprocessing(backend, parity_cases: Sequence[Case]) -> dict[str, Any]:
    """Token ids and pixels from the artifact's processor against the checkpoint's."""
    ids_equal, pixel_max_abs = True, 0.0
    for case in parity_cases:
        got_ids, got_pixels = backend.encode(case.image, case.question)
        ids_equal &= np.array_equal(got_ids, case.input_ids)
        if case.pixel_values is not None:
            diff = np.abs(got_pixels - case.pixel_values).max()
            pixel_max_abs = max(pixel_max_abs, float(diff))
    return {
        "ids_equal": bool(ids_equal),
        "pixel_max_abs": pixel_max_abs,
        "pass": bool(ids_equal) and pixel_max_abs <= 1e-6,
    }


def check_kv_cache(vlm, backend, case: Case, tol: Tolerance, steps: int = KV_STEPS) -> dict:
    """Forced decode steps through the KV cache against one full forward over them all."""
    import torch

    ids, pixels = case.input_ids, case.pixel_values
    forced = forced_tokens(vlm.tokenizer, steps)
    full = torch.from_numpy(np.concatenate([ids, np.asarray([forced], dtype=np.int64)], axis=1))
    images = None if pixels is None else torch.from_numpy(pixels)
    with torch.no_grad():
        ref = vlm.forward_stages(full, torch.ones_like(full), images).numpy()[0, ids.shape[1] - 1 :]
    got = backend.incremental_logits(ids, pixels, forced)
    return {"steps": steps, **check_logits_numbers(got, ref, tol)}


def forced_tokens(tokenizer, steps: int) -> list[int]:
    """``steps`` ids to force: :data:`FORCED_TEXT`'s tokens, then random ids if the sentence
    is shorter."""
    ids = list(tokenizer(FORCED_TEXT, add_special_tokens=False)["input_ids"][:steps])
    extra = np.random.default_rng(0).integers(0, len(tokenizer), steps - len(ids)).tolist()
    return [int(i) for i in ids + extra]
