"""The tokenizer of a GGUF file: which llama.cpp tokenizer reproduces the HF one, and the
vocabulary, merges or scores, special ids and chat template written with it.

Checked id for id against the HF tokenizer by the exporter (``gguf_validate``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgekd.chat import stop_token_ids
from edgekd.export.base import ExportError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6
)  # fmt: skip
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# llama.cpp pre-tokenizer per HF pre-tokenizer (tokenizer.json), checked by the round-trip test
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {"byte_level": "gpt-2", _QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}


def _tokenizer_json(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the tokenizer is not a fast (tokenizers) tokenizer; GGUF needs its BPE")
    return json.loads(backend.to_str())


def tokenizer_model(tokenizer) -> dict[str, Any]:
    """How llama.cpp reproduces this HF tokenizer (checked id for id by the exporter).

    * byte-level BPE (GPT-2 style: Qwen2, Llama-3): ``{"model": "gpt2", "pre": ...}``, with
      the merges and the pre-tokenizer that splits text the same way;
    * SentencePiece-style BPE (``▁``-marked words, ``<0xXX>`` byte fallback: Llama-2, Vicuna,
      TinyLlama, Mistral, Gemma): ``{"model": "llama", "add_space_prefix": ...}``, llama.cpp's
      SPM tokenizer, which merges the pair whose result scores highest: each token scores
      minus the rank of the merge that makes it, so merges apply in BPE's order.
    """
    tj = _tokenizer_json(tokenizer)
    if tj["model"]["type"] == "BPE" and tj["model"].get("byte_fallback"):
        return {"model": "llama", "add_space_prefix": _space_prefix(tj)}
    return {"model": "gpt2", "pre": pre_tokenizer_name(tokenizer)}


def _space_prefix(tj: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer marks the first word with ``▁`` (Llama) or not
    (Gemma), from its Metaspace pre-tokenizer or its Prepend/Replace normalizer."""
    pre, norm = tj.get("pre_tokenizer") or {}, tj.get("normalizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581":  # ▁
        return pre.get("prepend_scheme", "always") != "never"
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    replaces = [s for s in steps if s.get("type") == "Replace" and s.get("content") == "▁"]
    if replaces and not pre:
        return any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in steps)
    raise ExportError(
        "the SentencePiece-style tokenizer marks words in a way llama.cpp's SPM tokenizer "
        f"does not (pre-tokenizer {pre.get('type')!r}, normalizer {norm.get('type')!r})"
    )


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` that splits text as this HF tokenizer does."""
    tj = _tokenizer_json(tokenizer)
    if tj["model"]["type"] != "BPE" or tj["model"].get("byte_fallback"):
        raise ExportError(
            "the tokenizer is neither a byte-level BPE nor a SentencePiece-style BPE with byte "
            "fallback; GGUF export takes those two"
        )
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise ExportError("ByteLevel add_prefix_space=True has no llama.cpp pre-tokenizer")
        return PRE_TOKENIZERS["byte_level"]
    if pre.get("type") == "Sequence":
        splits = [p for p in pre["pretokenizers"] if p.get("type") == "Split"]
        regex = splits[0]["pattern"].get("Regex") if len(splits) == 1 else None
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    raise ExportError(f"pre-tokenizer {pre.get('type')!r} has no known llama.cpp equivalent")


def vocabulary(vlm) -> dict[str, Any]:
    """Tokens, token types and merges (byte-level BPE) or scores (SentencePiece-style, see
    :func:`tokenizer_model`), padded with ``[PAD{i}]`` to the embedding size."""
    tok = vlm.tokenizer
    n_tok, n_embd_rows = len(tok), vlm.vocab_size
    if n_tok > n_embd_rows:
        raise ExportError(f"the tokenizer has {n_tok} tokens but the embedding only {n_embd_rows}")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    missing = [i for i in range(n_tok) if i not in by_id]
    if missing:
        raise ExportError(f"token ids {missing[:5]} have no token; the vocabulary has gaps")
    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    spm = tokenizer_model(tok)["model"] == "llama"
    tokens, types = [], []
    for i in range(n_tok):
        tokens.append(by_id[i])
        if i in added:
            types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
        elif spm and _BYTE_TOKEN.fullmatch(by_id[i]):
            types.append(TOKEN_BYTE)
        elif spm and i == tok.unk_token_id:
            types.append(TOKEN_UNKNOWN)
        else:
            types.append(TOKEN_NORMAL)
    for i in range(n_tok, n_embd_rows):
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_UNUSED)
    merges = _tokenizer_json(tok)["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    out = {"tokens": tokens, "types": types, "merges": merges, "n_tokenizer": n_tok}
    if spm:
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        out["scores"] = [-float(rank.get(t, 0)) for t in tokens]
    return out


def special_ids(vlm) -> dict[str, int]:
    tok = vlm.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else stop_token_ids(tok)[0]
    ids = {"eos": eos, "bos": tok.bos_token_id if tok.bos_token_id is not None else eos}
    ids["pad"] = tok.pad_token_id if tok.pad_token_id is not None else eos
    im_end = tok.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids["eot"] = im_end
    return ids


def chat_template(vlm) -> str:
    return getattr(vlm.processor, "chat_template", None) or vlm.tokenizer.chat_template or ""
