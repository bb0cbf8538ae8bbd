"""The logits numbers every parity check gates on: cosines that ignore what the softmax ignores."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.export.parity import compare, compare_logits, next_token


def test_a_constant_offset_per_position_changes_nothing():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 300)).astype(np.float32)
    shifted = ref + np.arange(5, dtype=np.float32)[:, None] * 3.0  # softmax-invariant
    numbers = compare_logits(shifted, ref)
    assert numbers["cosine_min"] == pytest.approx(1.0)
    assert numbers["cosine_raw_min"] < 0.5  # the raw cosine calls it a large change
    assert next_token(shifted, ref)["kl_max"] == pytest.approx(0.0, abs=1e-9)


def test_a_real_change_hidden_by_a_large_mean_is_seen():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((3, 300)) + 20.0  # logits averaging 20, as a real LM's do
    noisy = ref + rng.standard_normal((3, 300))  # as large as the logits' own spread
    numbers = compare_logits(noisy, ref)
    assert numbers["cosine_raw_min"] > 0.99  # the offset hides it from the raw cosine
    assert numbers["cosine_min"] < 0.8
    assert compare(noisy, ref)["cosine_min"] == pytest.approx(numbers["cosine_raw_min"])
