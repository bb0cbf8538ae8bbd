"""Helpers shared by the export tests (tests/export is on sys.path; import by this name)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from llava_samples import COLOURS, image_sample, text_sample, write_samples
from PIL import Image


def write_eval_set(root: Path, n: int = 6) -> Path:
    """A small LLaVA eval set: coloured squares with a colour question, one text-only sample."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = COLOURS
    samples = []
    for i in range(n):
        name = list(colors)[i % 3]
        pixels = np.full((64, 64, 3), 255, np.uint8)
        pixels[8 + i : 40 + i, 10:42] = colors[name]
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        samples.append(image_sample(f"e{i}", f"images/{i}.png", "What color is it?", name, "color"))
    samples.append(text_sample("text", "Say yes.", "yes"))
    return write_samples(root / "eval.json", samples)


def spm_tokenizer(space_prefix: bool = True):
    """A SentencePiece-style tokenizer as Llama-2's tokenizer.json has it: BPE over ``▁``-marked
    words with ``<0xXX>`` byte fallback, ``▁`` prepended to the text (``space_prefix=False``:
    Gemma's, no prefix), ``<s>``/``</s>``/``<unk>``, ``<image>`` and the vicuna_v1 template
    (BOS in the template, as edgekd's converters write it)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    from edgekd.models.tinyllava_processor import TEMPLATE_EOS, chat_template
    from edgekd.models.tokenizer import BUILTIN_CORPUS

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = meta
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False)
    trainer_tok.train_from_iterator(BUILTIN_CORPUS, trainer)
    learnt = trainer_tok.get_vocab()
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for tok, _ in sorted(learnt.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Llama-2's tokenizer.json: ▁ prepended and spaces replaced by the normalizer, no splitting
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>", add_bos_token=False,
    )  # fmt: skip
    fast.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    fast.chat_template = chat_template(TEMPLATE_EOS["llama"], "<s>")
    return fast


def mmproj_rows_and_reference(vlm, folder: Path):
    """``vlm`` written as f32 GGUF files in ``folder``: llama.cpp's visual rows of one random
    64 px image (through edgekd's backend) and PyTorch's projected features of it."""
    from edgekd.export.gguf_probe import rows_and_reference

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    return rows_and_reference(vlm, folder, image)
