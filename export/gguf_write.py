"""GGUF files for llama.cpp, written with the ``gguf`` package: names, metadata, tensors, read-back.

The HF -> GGUF tensor names are declared as tables (``_LM_TENSORS``, ``_VISION_BLOCKS`` plus each
tower's own in :data:`edgekd.export.family.VISION_ARCHS`, ``_PROJECTOR_TENSORS``); an HF tensor
missing from them is an :class:`ExportError`, never a silently incomplete file. See
:mod:`edgekd.export.gguf` and :mod:`edgekd.export.family` for the llama.cpp facts relied on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import require
from edgekd.export.base import ExportError
from edgekd.export.family import (
    GGUF_DROP_KEY,
    GGUF_SCALE_KEY,
    gguf_drop_rows,
    text_arch,
    vision_arch,
)
from edgekd.export.gguf_vocab import (  # noqa: F401 - the tokenizer's facts, re-exported
    PRE_TOKENIZERS,
    chat_template,
    pre_tokenizer_name,
    special_ids,
    tokenizer_model,
    vocabulary,
)
from edgekd.export.gptq import linears, take
from edgekd.models.dims import TextDims, vision_mlp_width
from edgekd.runtime.llamacpp import import_llama_cpp, quiet_llama_logs

K_QUANT_ROW = 256  # llama.cpp's QK_K
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


@dataclass(frozen=True)
class Quant:
    """A quantized precision: llama.cpp's quantizer makes it from an f32 GGUF (``ftype``), or
    edgekd writes it itself from GPTQ blocks (``grid``, :mod:`edgekd.export.gptq`)."""

    ftype: str | None  # llama_cpp constant; None: written by edgekd
    types: frozenset[str]  # tensor types that count as "quantized as asked"
    block: int  # row-size multiple the intended types need
    grid: str | None = None  # GPTQ grid of the weight matrices (edgekd-written precisions)
    file_type: int = 0  # general.file_type of edgekd-written files (llama_ftype)


PRECISIONS: dict[str, Quant | None] = {
    "f32": None,
    "f16": None,
    "q8_0": Quant("LLAMA_FTYPE_MOSTLY_Q8_0", frozenset({"Q8_0"}), 32),
    "q4_k_m": Quant("LLAMA_FTYPE_MOSTLY_Q4_K_M", frozenset({"Q4_K", "Q5_K", "Q6_K"}), K_QUANT_ROW),
    # GPTQ on the Q4_0 grid: the decoder's matrices Q4_0 (a type llama.cpp repacks for its x86
    # kernels, ggml-cpu repack.cpp),
    # the embedding (and the tied output) Q8_0, norms f32
    "q4_0": Quant(None, frozenset({"Q4_0"}), 32, grid="ggml_q4_0", file_type=2),
    # the other 4-bit type llama.cpp repacks for x86 (16 non-uniform levels, blocks of 32),
    # from GPTQ on its grid as q4_0: llama.cpp's own IQ4_NL (no calibration) moved the real
    # teacher's next-token distribution 0.39 nats (docs/performance.md, "Real weights")
    "iq4_nl": Quant(None, frozenset({"IQ4_NL"}), 32, grid="ggml_iq4_nl", file_type=25),
    # 16-bit with fp32's range; llama.cpp's x86 kernels multiply it natively (AVX512-BF16)
    "bf16": Quant("LLAMA_FTYPE_MOSTLY_BF16", frozenset({"BF16"}), 1),
}
Q4_0_BLOCK = 32  # weights per Q4_0 / IQ4_NL block: an fp16 scale and 16 bytes of 4-bit levels
GGML_GRIDS = {"ggml_q4_0": "Q4_0", "ggml_iq4_nl": "IQ4_NL"}  # GPTQ grid -> the ggml type
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
LM_HEAD = {"weight": "output.weight"}  # omitted when tied: llama.cpp then reuses token_embd
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


def _rope_heads(vlm, gname: str) -> int | None:
    """The heads whose rows :func:`_permute_rope` reorders in ``gname`` (q/k of an architecture
    whose llama.cpp graph rotates interleaved pairs), else ``None``."""
    if not text_arch(vlm.config).rope_interleaved or not re.search(r"attn_[qk]\.", gname):
        return None
    dims = TextDims.from_config(vlm.config.text_config)
    return dims.heads if ".attn_q." in gname else dims.kv_heads


def lm_tensors(vlm, dtype: str) -> dict[str, np.ndarray]:
    """Language-model tensors under their GGUF names (the tied head is not duplicated)."""
    arch = text_arch(vlm.config)
    out: dict[str, np.ndarray] = {}
    for name, t in vlm.language_model.state_dict().items():
        gname, _ = map_name(name, _LM_TENSORS)
        if arch.norm_offset and gname.endswith("norm.weight"):
            t = t.float() + arch.norm_offset  # HF computes x * (offset + w); llama.cpp x * w
        a = _array(t, dtype)
        heads = _rope_heads(vlm, gname)
        out[gname] = _permute_rope(a, heads) if heads else a
    head = vlm.lm_head.weight
    if head.data_ptr() != vlm.language_model.get_input_embeddings().weight.data_ptr():
        out[LM_HEAD["weight"]] = _array(head, dtype)
    return out


def encode_q4_0(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """ggml ``block_q4_0`` rows (``[rows, blocks * 18]`` bytes) from levels ``q``
    ``[rows, K]`` (0-15, the weight is ``(q - 8) * scale``) and ``scale`` ``[rows, K / 32]``:
    per block the fp16 scale, then byte ``j`` = level ``j`` | level ``j + 16`` << 4.
    ``block_iq4_nl`` is the same layout, ``q`` indexing its level table."""
    rows, k = q.shape
    q = q.reshape(rows, k // Q4_0_BLOCK, Q4_0_BLOCK).astype(np.uint8)
    half = Q4_0_BLOCK // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    d = scale.astype(np.float16).reshape(rows, k // Q4_0_BLOCK, 1).view(np.uint8)
    return np.concatenate([d, packed], axis=-1).reshape(rows, -1)


def gptq_lm_tensors(vlm, blocks: dict[str, list[Any]]) -> dict[str, tuple[np.ndarray, Any]]:
    """``{gguf name: (bytes, GGMLQuantizationType)}`` of the language model's quantized
    tensors: each GPTQ'd matrix as Q4_0 or IQ4_NL, its grid's type (rows permuted like
    :func:`lm_tensors`), the embedding and an untied lm_head as Q8_0 (llama.cpp's rule for the
    output matrix at Q4_0).

    Raises:
        ExportError: a matrix has no GPTQ blocks, or a row is not whole Q4_0 blocks.
    """
    gguf = import_gguf()
    qt = gguf.GGMLQuantizationType
    pending = {key: list(found) for key, found in blocks.items()}
    out: dict[str, tuple[np.ndarray, Any]] = {}
    matrices = {f"{n}.weight" for n, _ in linears(vlm)}
    for name, t in vlm.language_model.state_dict().items():
        if name not in matrices:
            continue
        gname, _ = map_name(name, _LM_TENSORS)
        block = take(pending, t.detach().float().cpu().numpy())
        if block is None:
            raise ExportError(f"no GPTQ blocks for {name}; the model changed during export")
        kind = GGML_GRIDS.get(block.grid)
        if block.in_features % Q4_0_BLOCK or kind is None:
            raise ExportError(f"{name}: rows of {block.in_features} are not whole 32-blocks")
        q, scale = block.q, block.scale
        heads = _rope_heads(vlm, gname)
        if heads:  # rows permuted as lm_tensors permutes the float matrix
            q, scale = _permute_rope(q, heads), _permute_rope(scale, heads)
        out[gname] = (encode_q4_0(q, scale), getattr(qt, kind))
    embed = vlm.language_model.get_input_embeddings().weight
    tables = {"token_embd.weight": embed}
    if vlm.lm_head.weight.data_ptr() != embed.data_ptr():
        tables[LM_HEAD["weight"]] = vlm.lm_head.weight
    for gname, t in tables.items():
        out[gname] = (gguf.quants.quantize(_array(t, "f32"), qt.Q8_0), qt.Q8_0)
    return out


def vision_tensors(vlm, dtype: str) -> tuple[dict[str, np.ndarray], int]:
    """mmproj tensors and the number of vision blocks written (up to the deepest feature layer)."""
    n_blocks = max(feature_layers(vlm))
    vc, varch = vlm.config.vision_config, vision_arch(vlm.config)
    table = {**varch.gguf_tensors, **(varch.gguf_blocks or _VISION_BLOCKS)}
    state = fold_layer_scale(vlm.vision_tower.state_dict(), varch.layer_scale)
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        # a tower may nest everything under vision_model.; the bare transformer does not
        gname, layer = map_name(name.removeprefix("vision_model."), table)
        if gname is None or (layer is not None and layer >= n_blocks):
            continue  # after the feature layer: never computed by the PyTorch model either
        if vision_mlp_width(vc) == vc.hidden_size and ".ffn_" in gname:
            # clip.cpp swaps ffn_up/ffn_down of "legacy" files when ffn_down's rows equal n_embd,
            # which a square MLP always satisfies: store them swapped so the loader swaps back.
            gname = gname.replace("ffn_up", "ffn_tmp").replace("ffn_down", "ffn_up")
            gname = gname.replace("ffn_tmp", "ffn_down")
        if gname == "v.class_embd":  # clip reads a vector; DINOv2 stores (1, 1, hidden)
            t = t.reshape(vc.hidden_size)
        elif gname == "v.position_embd.weight":  # a matrix; DINOv2's is (1, 1 + patches, hidden)
            t = t.reshape(-1, vc.hidden_size)
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


def fold_layer_scale(state: dict[str, Any], scales: dict[str, str]) -> dict[str, Any]:
    """``state`` with each per-channel scale (``scales``: name suffix -> the linear layer it
    follows, in the same block) multiplied into that layer's weight rows and bias; the scale
    itself is kept (its mmproj name is ``None``)."""
    state = dict(state)
    for name in list(state):
        for suffix, linear in scales.items():
            if name.endswith(suffix):
                scale, target = state[name].float(), name[: -len(suffix)] + linear
                state[f"{target}.weight"] = state[f"{target}.weight"].float() * scale[:, None]
                if f"{target}.bias" in state:
                    state[f"{target}.bias"] = state[f"{target}.bias"].float() * scale
    return state


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


def write_lm(vlm, path: Path, dtype: str, blocks=None, file_type=None) -> dict[str, np.ndarray]:
    """Write the language model (``dtype`` f32 or f16) with its tokenizer; returns its tensors.

    ``blocks`` (GPTQ, :func:`gptq_lm_tensors`): the matrices are written quantized from them,
    and ``file_type`` names the file's precision.
    """
    gguf = import_gguf()
    tc = vlm.config.text_config
    arch = text_arch(vlm.config).gguf_arch
    tensors = lm_tensors(vlm, dtype)
    quantized = gptq_lm_tensors(vlm, blocks) if blocks is not None else {}
    vocab = vocabulary(vlm)
    head_dim = TextDims.from_config(tc).head_dim
    rope = getattr(tc, "rope_parameters", None) or {"rope_theta": getattr(tc, "rope_theta", 1e4)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(str(getattr(vlm.config, "_name_or_path", "") or "edgekd-vlm"))
    if file_type is None:
        file_type = GGML_TYPE_F16 if dtype == "f16" else GGML_TYPE_F32
    w.add_file_type(file_type)
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
        if name in quantized:
            data, qtype = quantized[name]
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
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
    w.add_uint32(K.ClipVision.FEED_FORWARD_LENGTH, vision_mlp_width(vc))
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
    """``llama_model_quantize`` from an f32 GGUF to ``precision`` (q8_0, q4_k_m, iq4_nl, bf16)."""
    llama_cpp = import_llama_cpp(ExportError, LLAMA_CPP_USE)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, PRECISIONS[precision].ftype)
    params.nthread = n_threads or 0
    with quiet_llama_logs():  # it reports every tensor; the fallbacks are read back instead
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama_model_quantize to {precision} failed (code {rc})")
