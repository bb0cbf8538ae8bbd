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


class CliResult:
    """Exit code and output of one ``edgekd`` command run in this process."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def one_line_error(self, *fragments: str) -> str:
        """Assert exit code 2, one line on stderr (``error: ...``, no traceback) holding
        every fragment; return the line."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == 2, (self.code, self.err)
        assert len(lines) == 1 and "Traceback" not in self.err, self.err
        assert lines[0].startswith("error: "), lines[0]
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        return lines[0]


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``edgekd ARGS...`` through the real entry point (:func:`edgekd.cli.main`) in this
    process, so that a test can inject faults with monkeypatch; returns a :class:`CliResult`."""
    import signal
    import sys

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging

    from edgekd.cli import main

    monkeypatch.delenv("EDGEKD_DEBUG", raising=False)  # restored after the test, whatever ran
    # main() turns progress bars off through the environment, read when the libraries load;
    # here they are loaded already
    if not are_progress_bars_disabled():
        disable_progress_bars()
    logging.disable_progress_bar()

    def run(*args) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["edgekd", *map(str, args)])
        handler = signal.getsignal(signal.SIGTERM)
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            signal.signal(signal.SIGTERM, handler)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
