"""GGUF files for llama.cpp, written with the ``gguf`` package: names, metadata, tensors, read-back.

The HF -> GGUF tensor names are declared as tables (``_LM_TENSORS``, ``_VISION_BLOCKS`` plus each
tower's own in :data:`edgekd.export.family.VISION_ARCHS`, ``_PROJECTOR_TENSORS``); an HF tensor
missing from them is an :class:`ExportError`, never a silently incomplete file. See
:mod:`edgekd.export.gguf` and :mod:`edgekd.export.family` for the llama.cpp facts relied on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.chat import stop_token_ids
from edgekd.errors import require
from edgekd.export.base import ExportError
from edgekd.export.family import (
    GGUF_DROP_KEY,
    GGUF_SCALE_KEY,
    gguf_drop_rows,
    text_arch,
    vision_arch,
)
from edgekd.models.dims import TextDims
from edgekd.runtime.llamacpp import import_llama_cpp, quiet_llama_logs

K_QUANT_ROW = 256  # llama.cpp's QK_K
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6
)  # fmt: skip
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class Quant:
    """A precision that llama.cpp's quantizer produces from an f32 GGUF."""

    ftype: str  # llama_cpp constant
    types: frozenset[str]  # tensor types that count as "quantized as asked"
    block: int  # row-size multiple the intended types need


PRECISIONS: dict[str, Quant | None] = {
    "f32": None,
    "f16": None,
    "q8_0": Quant("LLAMA_FTYPE_MOSTLY_Q8_0", frozenset({"Q8_0"}), 32),
    "q4_k_m": Quant("LLAMA_FTYPE_MOSTLY_Q4_K_M", frozenset({"Q4_K", "Q5_K", "Q6_K"}), K_QUANT_ROW),
}
# ---- tensor names: HF (relative to the module) -> GGUF, declared as data -------------------
_LM_TENSORS = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.self_attn.o_proj.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
_LM_HEAD = {"weight": "output.weight"}  # omitted when tied: llama.cpp then reuses token_embd
# the encoder blocks every tower shares; each tower's own tensors are in family.VISION_ARCHS
_VISION_BLOCKS = {
    "encoder.layers.{i}.layer_norm1.{p}": "v.blk.{i}.ln1.{p}",
    "encoder.layers.{i}.self_attn.q_proj.{p}": "v.blk.{i}.attn_q.{p}",
    "encoder.layers.{i}.self_attn.k_proj.{p}": "v.blk.{i}.attn_k.{p}",
    "encoder.layers.{i}.self_attn.v_proj.{p}": "v.blk.{i}.attn_v.{p}",
    "encoder.layers.{i}.self_attn.out_proj.{p}": "v.blk.{i}.attn_out.{p}",
    "encoder.layers.{i}.layer_norm2.{p}": "v.blk.{i}.ln2.{p}",
    "encoder.layers.{i}.mlp.fc1.{p}": "v.blk.{i}.ffn_up.{p}",
    "encoder.layers.{i}.mlp.fc2.{p}": "v.blk.{i}.ffn_down.{p}",
}
_PROJECTOR_TENSORS = {"linear_1.{p}": "mm.0.{p}", "linear_2.{p}": "mm.2.{p}"}


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


def _compile(table: dict[str, str | None]) -> list[tuple[re.Pattern, str | None]]:
    out = []
    for src, dst in table.items():
        pattern = re.escape(src)
        for key, rx in (
            ("i", r"(?P<i>\d+)"),
            ("p", r"(?P<p>weight|bias)"),
            ("rest", r"(?P<rest>.+)"),
        ):
            pattern = pattern.replace(re.escape("{" + key + "}"), rx)
        out.append((re.compile(pattern + "$"), dst))
    return out


def map_name(name: str, table: dict[str, str | None]) -> tuple[str | None, int | None]:
    """GGUF name (None: deliberately not written) and layer index of an HF tensor name.

    Raises:
        ExportError: the name is not in the table (an export never silently drops a tensor).
    """
    for rx, dst in _compile(table):
        m = rx.match(name)
        if m:
            groups = m.groupdict()
            layer = int(groups["i"]) if groups.get("i") is not None else None
            return (dst.format(**groups) if dst else None), layer
    raise ExportError(f"tensor '{name}' has no GGUF name; the gguf exporter does not know it")


def feature_layers(vlm) -> list[int]:
    """The vision feature layer(s) as non-negative indices into HF ``hidden_states``."""
    layers = vlm.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    n = vlm.config.vision_config.num_hidden_layers
    resolved = [x if x >= 0 else n + 1 + x for x in layers]
    if any(not 0 <= x <= n for x in resolved):
        raise ExportError(f"vision_feature_layer {layers} is outside the {n}-layer vision tower")
    if resolved != sorted(set(resolved)):
        raise ExportError(
            f"vision_feature_layer {layers}: clip.cpp concatenates feature layers in ascending "
            "order, so several layers must be given ascending and distinct"
        )
    return resolved


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


LLAMA_CPP_USE = "the gguf target (quantization, validation)"  # names the use in its error


def import_gguf():
    return require("gguf", "gguf", ExportError, "the gguf target")


# ---- writers ---------------------------------------------------------------------------------
def _array(t, dtype: str) -> np.ndarray:
    """f32 for 1-D tensors (norms, biases: ggml wants them f32), else the requested dtype."""
    a = t.detach().to("cpu").float().numpy()
    return a.astype(np.float16) if dtype == "f16" and a.ndim >= 2 else np.ascontiguousarray(a)


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-rotation layout -> llama.cpp's interleaved-pair layout, per head (rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def lm_tensors(vlm, dtype: str) -> dict[str, np.ndarray]:
    """Language-model tensors under their GGUF names (the tied head is not duplicated)."""
    tc = vlm.config.text_config
    arch = text_arch(vlm.config)
    out: dict[str, np.ndarray] = {}
    for name, t in vlm.language_model.state_dict().items():
        gname, _ = map_name(name, _LM_TENSORS)
        if arch.norm_offset and gname.endswith("norm.weight"):
            t = t.float() + arch.norm_offset  # HF computes x * (offset + w); llama.cpp x * w
        a = _array(t, dtype)
        if arch.rope_interleaved and re.search(r"attn_[qk]\.", gname):
            dims = TextDims.from_config(tc)
            heads = dims.heads if ".attn_q." in gname else dims.kv_heads
            a = _permute_rope(a, heads)
        out[gname] = a
    head = vlm.lm_head.weight
    if head.data_ptr() != vlm.language_model.get_input_embeddings().weight.data_ptr():
        out[_LM_HEAD["weight"]] = _array(head, dtype)
    return out


def vision_tensors(vlm, dtype: str) -> tuple[dict[str, np.ndarray], int]:
    """mmproj tensors and the number of vision blocks written (up to the deepest feature layer)."""
    n_blocks = max(feature_layers(vlm))
    vc = vlm.config.vision_config
    table = {**vision_arch(vlm.config).gguf_tensors, **_VISION_BLOCKS}
    out: dict[str, np.ndarray] = {}
    for name, t in vlm.vision_tower.state_dict().items():
        # a tower may nest everything under vision_model.; the bare transformer does not
        gname, layer = map_name(name.removeprefix("vision_model."), table)
        if gname is None or (layer is not None and layer >= n_blocks):
            continue  # after the feature layer: never computed by the PyTorch model either
        if vc.intermediate_size == vc.hidden_size and ".ffn_" in gname:
            # clip.cpp swaps ffn_up/ffn_down of "legacy" files when ffn_down's rows equal n_embd,
            # which a square MLP always satisfies: store them swapped so the loader swaps back.
            gname = gname.replace("ffn_up", "ffn_tmp").replace("ffn_down", "ffn_up")
            gname = gname.replace("ffn_tmp", "ffn_down")
        out[gname] = _array(t, dtype)
    scale = projector_scale(vlm)
    for name, t in vlm.projector.state_dict().items():
        if name.startswith("linear_2."):
            t = t.float() * scale
        out[map_name(name, _PROJECTOR_TENSORS)[0]] = _array(t, dtype)
    if not vlm.config.multimodal_projector_bias:  # clip's mlp graph always adds mm.{0,2}.bias
        for i, lin in (("0", vlm.projector.linear_1), ("2", vlm.projector.linear_2)):
            out[f"mm.{i}.bias"] = np.zeros(lin.out_features, dtype=np.float32)
    return out, n_blocks


def projector_scale(vlm) -> float:
    """Factor folded into the projector's last layer (``mm.2``) so that llama.cpp's decoder
    receives the visual rows PyTorch's does.

    1 unless the llama.cpp graph scales every input row by ``sqrt(hidden)`` (Gemma) while
    transformers scales only token embeddings: then ``1 / sqrt(hidden)``, which the decoder's
    scaling undoes. Stock llama.cpp tools then read the same mmproj right too.
    """
    if not text_arch(vlm.config).input_scale:
        return 1.0
    return float(vlm.config.text_config.hidden_size) ** -0.5


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


def write_lm(vlm, path: Path, dtype: str) -> dict[str, np.ndarray]:
    """Write the language model (``dtype`` f32 or f16) with its tokenizer; returns its tensors."""
    gguf = import_gguf()
    tc = vlm.config.text_config
    arch = text_arch(vlm.config).gguf_arch
    tensors = lm_tensors(vlm, dtype)
    vocab = vocabulary(vlm)
    head_dim = TextDims.from_config(tc).head_dim
    rope = getattr(tc, "rope_parameters", None) or {"rope_theta": getattr(tc, "rope_theta", 1e4)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(str(getattr(vlm.config, "_name_or_path", "") or "edgekd-vlm"))
    w.add_file_type(GGML_TYPE_F16 if dtype == "f16" else GGML_TYPE_F32)
    w.add_context_length(tc.max_position_embeddings)
    w.add_embedding_length(tc.hidden_size)
    w.add_block_count(tc.num_hidden_layers)
    w.add_feed_forward_length(tc.intermediate_size)
    w.add_head_count(tc.num_attention_heads)
    w.add_head_count_kv(tc.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(tc.rms_norm_eps))
    w.add_vocab_size(len(vocab["tokens"]))
    kind = tokenizer_model(vlm.tokenizer)
    w.add_tokenizer_model(kind["model"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if kind["model"] == "gpt2":
        w.add_tokenizer_pre(kind["pre"])
        w.add_token_merges(vocab["merges"])
    else:
        w.add_token_scores(vocab["scores"])
        w.add_add_space_prefix(kind["add_space_prefix"])
        if vlm.tokenizer.unk_token_id is not None:
            w.add_unk_token_id(vlm.tokenizer.unk_token_id)
    ids = special_ids(vlm)
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_pad_token_id(ids["pad"])
    if "eot" in ids:
        w.add_eot_token_id(ids["eot"])
    w.add_add_bos_token(bool(getattr(vlm.tokenizer, "add_bos_token", False)))
    w.add_add_eos_token(False)
    if chat_template(vlm):
        w.add_chat_template(chat_template(vlm))
    for name, a in tensors.items():
        w.add_tensor(name, a)
    _finish(w)
    return tensors


def write_mmproj(vlm, path: Path, dtype: str) -> tuple[dict[str, np.ndarray], int]:
    """Write the vision tower and projector in the legacy clip format; returns tensors, blocks."""
    gguf = import_gguf()
    vc, ip = vlm.config.vision_config, vlm.processor.image_processor
    tensors, n_blocks = vision_tensors(vlm, dtype)
    K = gguf.Keys
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("edgekd mmproj")
    w.add_description(f"{vc.model_type} + mlp projector (legacy clip format)")
    w.add_file_type(GGML_TYPE_F16 if dtype == "f16" else GGML_TYPE_F32)
    w.add_bool(K.Clip.HAS_VISION_ENCODER, True)
    w.add_bool("clip.has_text_encoder", False)  # read by older loaders
    w.add_bool(K.Clip.HAS_LLAVA_PROJECTOR, True)
    w.add_string(K.Clip.PROJECTOR_TYPE, "mlp")
    w.add_uint32(K.ClipVision.IMAGE_SIZE, vc.image_size)
    w.add_uint32(K.ClipVision.PATCH_SIZE, vc.patch_size)
    w.add_uint32(K.ClipVision.EMBEDDING_LENGTH, vc.hidden_size)
    w.add_uint32(K.ClipVision.FEED_FORWARD_LENGTH, vc.intermediate_size)
    w.add_uint32(K.ClipVision.PROJECTION_DIM, vlm.config.text_config.hidden_size)
    w.add_uint32(K.ClipVision.BLOCK_COUNT, n_blocks)
    w.add_uint32(K.ClipVision.Attention.HEAD_COUNT, vc.num_attention_heads)
    w.add_float32(K.ClipVision.Attention.LAYERNORM_EPS, float(vc.layer_norm_eps))
    w.add_array(K.ClipVision.IMAGE_MEAN, [float(x) for x in ip.image_mean])
    w.add_array(K.ClipVision.IMAGE_STD, [float(x) for x in ip.image_std])
    w.add_key_value(
        "clip.vision.feature_layer",
        feature_layers(vlm),
        gguf.GGUFValueType.ARRAY,
        gguf.GGUFValueType.INT32,
    )
    w.add_bool(K.ClipVision.USE_GELU, vision_arch(vlm.config).activations[vc.hidden_act])
    drop = gguf_drop_rows(vlm.config)
    if drop:  # clip.cpp ignores it; edgekd's backend drops these rows after encoding
        w.add_uint32(GGUF_DROP_KEY, drop)
    if projector_scale(vlm) != 1.0:  # folded into mm.2; the backend undoes it for parity
        w.add_float32(GGUF_SCALE_KEY, projector_scale(vlm))
    for name, a in tensors.items():
        w.add_tensor(name, a)
    _finish(w)
    return tensors, n_blocks


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path, precision: str, n_threads: int | None = None) -> None:
    """``llama_model_quantize`` from an f32 GGUF to ``precision`` (q8_0, q4_k_m)."""
    llama_cpp = import_llama_cpp(ExportError, LLAMA_CPP_USE)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, PRECISIONS[precision].ftype)
    params.nthread = n_threads or 0
    with quiet_llama_logs():  # it reports every tensor; the fallbacks are read back instead
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama_model_quantize to {precision} failed (code {rc})")


# ---- reading back ----------------------------------------------------------------------------
def tensor_table(path: Path) -> dict[str, dict[str, Any]]:
    """Per tensor: GGML type name, shape (ggml order: row size first) and bytes."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(str(path))
    return {
        t.name: {
            "type": gguf.GGMLQuantizationType(int(t.tensor_type)).name,
            "shape": [int(x) for x in t.shape],
            "bytes": int(t.n_bytes),
        }
        for t in reader.tensors
    }


def quant_report(table: dict[str, dict[str, Any]], precision: str) -> dict[str, Any]:
    """Type counts, and the weight matrices that fell back from the precision's intended types."""
    counts: dict[str, int] = {}
    for info in table.values():
        counts[info["type"]] = counts.get(info["type"], 0) + 1
    q = PRECISIONS[precision]
    fallbacks, unquantized = {}, []
    for name, info in table.items():
        if len(info["shape"]) < 2 or q is None:
            continue
        if info["type"] not in q.types:
            fallbacks[name] = {"type": info["type"], "row_size": info["shape"][0]}
        if info["type"] in ("F32", "F16", "BF16"):
            unquantized.append(name)
    report = {"tensor_types": {n: i["type"] for n, i in table.items()}, "type_counts": counts}
    if q is not None:
        report["fallbacks"] = {
            "count": len(fallbacks),
            "reason": f"row size not a multiple of {q.block} (the block of "
            f"{'/'.join(sorted(q.types))}); llama.cpp picked the type shown",
            "tensors": fallbacks,
        }
        report["unquantized_matrices"] = unquantized
    return report


def check_written(path: Path, expected: dict[str, np.ndarray], what: str) -> dict[str, Any]:
    """Guard against silently empty or partial files (the known 1 KB mmproj failure)."""
    table = tensor_table(path)
    missing = sorted(set(expected) - set(table))
    if missing:
        raise ExportError(
            f"{path.name}: {len(missing)} {what} tensor(s) missing, e.g. {missing[:3]}"
        )
    payload = sum(i["bytes"] for i in table.values())
    size = path.stat().st_size
    expected_min = sum(a.size for a in expected.values()) // 8  # >= 1 bit per weight even at q4
    if size < payload or payload < expected_min:
        raise ExportError(
            f"{path.name} is {size} bytes for {payload} bytes of tensor data (expected at least "
            f"{expected_min}); the file is truncated or lost its tensors"
        )
    return table
