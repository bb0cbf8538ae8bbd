"""Shared fixtures: tiny VLMs built from configs, seeded, on CPU, in about a second."""

from __future__ import annotations

import os

# Tests never reach a model hub: hub ids must resolve from the local cache or fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # two xdist workers on two cores


@pytest.fixture(scope="session")
def tokenizer():
    from edgekd.models import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_vlm(tokenizer):
    """A tiny SigLIP + Qwen2 LLaVA (16 visual tokens, 64 px images), random weights, eval mode."""
    from edgekd.models import build_vlm

    return build_vlm("tiny", tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="session")
def small_vlm(tokenizer):
    """A larger tiny-family VLM sharing ``tiny_vlm``'s tokenizer and vision shape (a teacher)."""
    from edgekd.models import build_vlm

    return build_vlm("small", tokenizer=tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_vlm, tmp_path_factory):
    """``tiny_vlm`` saved as a transformers checkpoint directory."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_vlm.save_pretrained(path)
    return path
