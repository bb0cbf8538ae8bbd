"""plan(): memory fit and decode roofline, checked by hand for the 0.5B preset on Orin Nano."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgekd.errors import ModelError
from edgekd.plan.inference import plan
from edgekd.profiles import ProfileError

PRESET = "qwen2-0.5b-siglip-so400m"
NANO = "jetson-orin-nano-8gb"

# Parameter counts of the preset, and by hand the 1-D ones (biases, norms; kept in fp16 when
# quantized) and the rows of the >= 2-D ones (one int8 scale each).
PARAMS = {"language_model": 494_032_768, "vision_tower": 428_225_600, "projector": 1_836_800}
# Qwen2-0.5B: per layer q/k/v biases 896+128+128 and 2 norms of 896; final norm 896.
LM_VEC = 24 * (896 + 128 + 128 + 2 * 896) + 896
# rows: per layer q 896, k 128, v 128, o 896, gate 4864, up 4864, down 896; embedding 151936
LM_ROWS = 24 * (896 + 128 + 128 + 896 + 4864 + 4864 + 896) + 151_936
# SigLIP-so400m, 27 layers: q/k/v/out biases, fc1 and fc2 biases, 2 layer norms (weight + bias);
# patch-embedding bias, post-layernorm, attention-pooling head (in/out biases, norm, MLP biases).
VIS_VEC = 27 * (4 * 1152 + 4304 + 1152 + 4 * 1152) + 1152 + 2 * 1152 + (3456 + 1152 + 2 * 1152)
VIS_VEC += 4304 + 1152
# rows: per layer q/k/v/out 1152 each, fc1 4304, fc2 1152; patch conv 1152, positions 729,
# head probe 1, in_proj 3456, out_proj 1152, fc1 4304, fc2 1152
VIS_ROWS = 27 * (4 * 1152 + 4304 + 1152) + 1152 + 729 + 1 + 3456 + 1152 + 4304 + 1152
VEC = {"language_model": LM_VEC, "vision_tower": VIS_VEC, "projector": 896 + 896}
ROWS = {"language_model": LM_ROWS, "vision_tower": VIS_ROWS, "projector": 896 + 896}


def hand_weight_bytes(stage: str, precision: str) -> float:
    n, vec, rows = PARAMS[stage], VEC[stage], ROWS[stage]
    return {
        "fp32": 4 * n,
        "fp16": 2 * n,
        "bf16": 2 * n,
        "int8": (n - vec) + 2 * rows + 2 * vec,
        "int4": (n - vec) * 4.5 / 8 + 2 * vec,
    }[precision]


def hand_kv_bytes(context: int, batch: int = 1, per: int = 2) -> int:
    return 2 * 24 * 2 * 64 * context * batch * per


@pytest.fixture(scope="module")
def nano_plan():
    return plan(PRESET, NANO, context=2048)


def test_plan_params_and_precisions(nano_plan):
    assert nano_plan.params == PARAMS
    assert [r.precision for r in nano_plan.rows] == ["fp32", "fp16", "bf16", "int8", "int4"]
    assert nano_plan.reserve_gb == 1.5 and nano_plan.usable_gb == 6.5  # 1 GB + 8/16


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "int4"])
def test_plan_weights_and_kv_match_hand_computation(nano_plan, precision):
    row = nano_plan.row(precision)
    for stage in PARAMS:
        assert row.weight_bytes[stage] == pytest.approx(hand_weight_bytes(stage, precision))
    assert row.kv_bytes == hand_kv_bytes(2048, per=4 if precision == "fp32" else 2)
    assert row.kv_bytes == (50_331_648 if precision == "fp32" else 25_165_824)


def test_plan_fp16_roofline_and_margin_by_hand(nano_plan):
    row = nano_plan.row("fp16")
    # decode reads the LM weights (tied embedding = LM head, read whole) and the KV cache
    memory_tok_s = 68e9 / (2 * PARAMS["language_model"] + hand_kv_bytes(2048))
    assert row.memory_tok_s == pytest.approx(memory_tok_s) and round(memory_tok_s, 1) == 67.1
    assert row.compute_tok_s == pytest.approx(10.2e12 / (2 * PARAMS["language_model"]))
    assert row.bound == "memory" and row.decode_tok_s == row.memory_tok_s
    # activations: LM layer at prefill, 2048 x (4 x 896 + 2 x 128 + 3 x 4864) fp16, + fp32 logits
    assert row.activation_bytes == 2048 * (4 * 896 + 256 + 3 * 4864) * 2 + 151_936 * 4
    total = 2 * sum(PARAMS.values()) + hand_kv_bytes(2048) + row.activation_bytes
    assert row.total_bytes == pytest.approx(total)
    assert row.fits and row.margin_gb == pytest.approx(6.5 - total / 1e9)


def test_plan_power_mode_changes_bandwidth():
    row = plan(PRESET, NANO, power_mode="MAXN_SUPER").row("int4")
    assert row.memory_tok_s > plan(PRESET, NANO).row("int4").memory_tok_s * 1.49


def test_plan_that_does_not_fit_says_by_how_much():
    result = plan(PRESET, NANO, context=32768, batch=16)
    row = result.row("fp16")
    assert row.kv_bytes == hand_kv_bytes(32768, batch=16)
    needed = row.weights + row.kv_bytes + row.activation_bytes
    assert not row.fits and row.margin_gb == pytest.approx(6.5 - needed / 1e9)
    assert row.verdict == f"does not fit by {(needed / 1e9 - 6.5):.2f} GB"


def test_plan_bad_inputs_are_one_line_errors():
    with pytest.raises(ProfileError, match="unknown device profile 'nope'; valid: .*orin-nano"):
        plan(PRESET, "nope")
    with pytest.raises(ProfileError, match="unknown power mode 'TURBO'"):
        plan(PRESET, NANO, power_mode="TURBO")
    with pytest.raises(ModelError, match="neither a preset"):
        plan("not a model!", NANO)


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edgekd", "plan", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_plan_prints_table():
    done = _cli("--model", PRESET, "--profile", NANO, "--context", "2048")
    assert done.returncode == 0, done.stderr
    for text in (
        "precision",
        "weights",
        "margin",
        "tok/s",
        "int4",
        "memory",
        "67.1",
        "usable 6.50",
    ):
        assert text in done.stdout


def test_cli_plan_bad_profile_exit_2():
    done = _cli("--model", PRESET, "--profile", "nope")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown device profile 'nope'" in done.stderr
