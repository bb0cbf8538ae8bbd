"""The LLaVA family the exporters take: one declaration per text decoder and vision tower.

Every fact an exporter needs about an architecture lives here as data, in the manner of
optimum's per-model export configs; the ONNX (and so the TensorRT) exporter and the GGUF writer
read the same entries, and :func:`family_problems` refuses everything else at ``check`` with the
supported list. Adding a decoder that llama.cpp runs with an existing graph is one
:class:`TextArch` entry (Gemma is the example: embedding scale, ``1 + w`` norms, GeGLU, tied
head); nothing else changes.

Facts read from llama.cpp (the sources vendored in llama-cpp-python 0.3.36):

* ``llama_model_rope_type``: ``qwen2`` and ``gemma`` rotate half-split pairs (NEOX, as HF does);
  ``llama`` rotates adjacent pairs, so HF's q/k rows are permuted per head when written.
* ``gemma``: RMSNorm multiplies by the stored weight, so HF's ``x * (1 + w)`` is stored as
  ``w + 1``; the output matrix is always ``token_embd`` (no ``output.weight`` is read); the FFN is
  GELU-gated (tanh form); every input row, token embeddings and batch embeddings alike, is
  scaled by ``sqrt(n_embd)``. transformers 5 scales only the token embeddings (inside
  ``GemmaTextScaledWordEmbedding``), so visual rows reach llama.cpp divided by that factor.
* clip.cpp's llava graph (``patch_offset = class_embedding ? 1 : 0``) keeps every row of a
  tower without a class embedding, so it cannot drop a SigLIP tower's first *patch* as the
  ``default`` selection does: edgekd's llama.cpp backend drops it after the encoder
  (:data:`GGUF_DROP_KEY`; the projector is token-wise, so this is exact).
* CLIP and DINOv2 towers carry a class token, which the llava graph of every llama-cpp-python
  release up to 0.3.36 appends *after* the patches while its positions and kept rows assume it
  first (llama.cpp issue #25814): it emits patches 2..N and the class token where the model has
  patches 1..N. edgekd's build of llama-cpp-python has the one-line fix (PR #25844,
  ``runtime/llama_source.py``), and the mmproj tables below order the class token first. Which
  order the installed llama.cpp has is measured before a class-token tower is exported
  (:mod:`edgekd.export.gguf_probe`), and a shifted llama.cpp is refused in one line.
* DINOv2's LayerScale (``layer_scale1``/``layer_scale2``, per-channel factors after attention
  and MLP, up to |7| in real towers) is folded into ``attn_out`` and ``ffn_down``: ``l * (W x +
  b) = (l W) x + l b``, exact up to rounding, since the llava graph applies none (``ls1``/``ls2``
  are read only by ``build_vit`` graphs). Its exact GELU runs as clip's tanh form, as CLIP's
  ``gelu`` does. The position table is the checkpoint's, for its ``image_size`` (``edgekd
  models assemble`` resizes it once, to the assembled resolution), so no graph resamples it per
  call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgekd import targets


@dataclass(frozen=True)
class TextArch:
    """One HF text decoder (``text_config.model_type``) as the exporters see it.

    Attributes:
        model_type: transformers' ``model_type``.
        gguf_arch: llama.cpp's ``general.architecture`` that runs it.
        rope_interleaved: llama.cpp's graph rotates adjacent pairs: q/k rows are permuted.
        activations: ``hidden_act`` values the llama.cpp graph computes.
        norm_offset: Added to RMSNorm weights when written (Gemma: 1).
        input_scale: llama.cpp multiplies every input row by ``sqrt(hidden)`` (Gemma).
        tied_head_only: llama.cpp's graph reuses ``token_embd`` as the output matrix.
        biases: Optional HF linear biases llama.cpp's graph adds when present.
        no_sliding_window: Config keys that must be unset (sliding-window attention).
    """

    model_type: str
    gguf_arch: str
    rope_interleaved: bool = False
    activations: tuple[str, ...] = ("silu",)
    norm_offset: float = 0.0
    input_scale: bool = False
    tied_head_only: bool = False
    biases: tuple[str, ...] = ()
    no_sliding_window: tuple[str, ...] = ()


@dataclass(frozen=True)
class VisionArch:
    """One HF vision tower (``vision_config.model_type``).

    Attributes:
        class_token: The tower prepends a learned class token (CLIP, DINOv2).
        activations: ``hidden_act`` -> clip.cpp's ``clip.use_gelu`` (True: GELU, tanh form;
            False: quick GELU).
        gguf_tensors: The tower's own HF tensors (beyond the shared encoder blocks) -> their
            mmproj names (``None``: deliberately not written).
        layer_scale: Per-channel scales (name suffix) -> the linear layer (suffix, in the same
            block) whose output they multiply; folded into its weight and bias when written.
        gguf_blocks: The encoder blocks' HF -> mmproj names, when not CLIP's and SigLIP's.
    """

    model_type: str
    class_token: bool
    activations: dict[str, bool]
    gguf_tensors: dict[str, str | None] = field(default_factory=dict)
    layer_scale: dict[str, str] = field(default_factory=dict)
    gguf_blocks: dict[str, str] | None = None


TEXT_ARCHS: dict[str, TextArch] = {
    a.model_type: a
    for a in (
        TextArch("qwen2", "qwen2", no_sliding_window=("use_sliding_window",)),
        TextArch("llama", "llama", rope_interleaved=True, biases=("attention_bias",)),
        # Mistral-style configs are Llama's graph once sliding_window is unset
        TextArch("mistral", "llama", rope_interleaved=True, no_sliding_window=("sliding_window",)),
        TextArch(
            "gemma",
            "gemma",
            activations=("gelu_pytorch_tanh", "gelu"),
            norm_offset=1.0,
            input_scale=True,
            tied_head_only=True,
        ),
    )
}

_SIGLIP_TENSORS = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    # features are read before these: not written (clip.cpp would apply v.post_ln)
    "post_layernorm.{p}": None,
    "head.{rest}": None,
}
_CLIP_TENSORS = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.{p}": "v.pre_ln.{p}",
    "post_layernorm.{p}": None,
}
_DINOV2_TENSORS = {
    "embeddings.cls_token": "v.class_embd",
    "embeddings.mask_token": None,  # masked image modelling only
    "embeddings.patch_embeddings.projection.{p}": "v.patch_embd.{p}",
    "embeddings.position_embeddings": "v.position_embd.weight",
    "encoder.layer.{i}.layer_scale1.lambda1": None,  # folded into attn_out
    "encoder.layer.{i}.layer_scale2.lambda1": None,  # folded into ffn_down
    "layernorm.{p}": None,  # after the last block: features are read before it
}
_DINOV2_BLOCKS = {
    "encoder.layer.{i}.norm1.{p}": "v.blk.{i}.ln1.{p}",
    "encoder.layer.{i}.attention.q_proj.{p}": "v.blk.{i}.attn_q.{p}",
    "encoder.layer.{i}.attention.k_proj.{p}": "v.blk.{i}.attn_k.{p}",
    "encoder.layer.{i}.attention.v_proj.{p}": "v.blk.{i}.attn_v.{p}",
    "encoder.layer.{i}.attention.o_proj.{p}": "v.blk.{i}.attn_out.{p}",
    "encoder.layer.{i}.norm2.{p}": "v.blk.{i}.ln2.{p}",
    "encoder.layer.{i}.mlp.fc1.{p}": "v.blk.{i}.ffn_up.{p}",
    "encoder.layer.{i}.mlp.fc2.{p}": "v.blk.{i}.ffn_down.{p}",
}
VISION_ARCHS: dict[str, VisionArch] = {
    a.model_type: a
    for a in (
        VisionArch(
            "siglip_vision_model",
            class_token=False,
            activations={"gelu_pytorch_tanh": True, "gelu": True},
            gguf_tensors=_SIGLIP_TENSORS,
        ),
        VisionArch(
            "clip_vision_model",
            class_token=True,
            activations={"quick_gelu": False, "gelu": True},
            gguf_tensors=_CLIP_TENSORS,
        ),
        VisionArch(
            "dinov2",
            class_token=True,
            activations={"gelu": True},
            gguf_tensors=_DINOV2_TENSORS,
            layer_scale={
                "layer_scale1.lambda1": "attention.o_proj",
                "layer_scale2.lambda1": "mlp.fc2",
            },
            gguf_blocks=_DINOV2_BLOCKS,
        ),
    )
}
PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh")  # clip's mlp projector is ggml_gelu
STRATEGIES = ("default", "full")
# mmproj keys: the rows edgekd's backend drops from clip's output, a factor folded into mm.2
GGUF_DROP_KEY, GGUF_SCALE_KEY = targets.GGUF_DROP_KEY, targets.GGUF_SCALE_KEY


def text_arch(config) -> TextArch:
    return TEXT_ARCHS[config.text_config.model_type]


def vision_arch(config) -> VisionArch:
    return VISION_ARCHS[config.vision_config.model_type]


def gguf_drop_rows(config) -> int:
    """Rows of clip.cpp's output edgekd drops to get the model's visual tokens.

    ``default`` drops the tower's first token: clip.cpp drops a real class token itself, but
    keeps a SigLIP tower's first patch, which the backend then drops (the projector is
    token-wise, so dropping after it is exact).
    """
    default = config.vision_feature_select_strategy == "default"
    return int(default and not vision_arch(config).class_token)


def family_problems(config, target: str) -> list[str]:
    """Everything about the architecture of a LlavaConfig that ``target`` cannot export."""
    tc, vc, problems = config.text_config, config.vision_config, []
    arch = TEXT_ARCHS.get(tc.model_type)
    if arch is None:
        problems.append(
            f"text decoder '{tc.model_type}' is not supported by the {target} exporter; "
            f"supported: {', '.join(TEXT_ARCHS)}"
        )
    else:
        problems += _text_problems(tc, arch, target)
    varch = VISION_ARCHS.get(vc.model_type)
    if varch is None:
        problems.append(
            f"vision tower '{vc.model_type}' is not supported by the {target} exporter; "
            f"supported: {', '.join(VISION_ARCHS)}"
        )
    strategy = config.vision_feature_select_strategy
    if strategy not in STRATEGIES:
        problems.append(f"vision_feature_select_strategy '{strategy}'; valid: default, full")
    if target == "gguf" and varch is not None:
        problems += _gguf_vision_problems(config, varch)
    return problems


def _text_problems(tc, arch: TextArch, target: str) -> list[str]:
    """What llama.cpp's graph for ``arch`` cannot compute (the ONNX trace runs transformers'
    own code, so it takes any configuration of a declared decoder)."""
    if target != "gguf":
        return []
    problems = []
    rope = getattr(tc, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type '{rope.get('rope_type')}' is not exported; only 'default'")
    for key in arch.no_sliding_window:
        if getattr(tc, key, None):
            problems.append(
                f"sliding-window attention ({key}={getattr(tc, key)}) is not exported; "
                f"set {key} to {'false' if key.startswith('use_') else 'null'}"
            )
    if getattr(tc, "mlp_bias", False):
        problems.append("MLP biases (mlp_bias=true) are not exported")
    if getattr(tc, "attention_bias", False) and tc.model_type != "qwen2":
        heads, hidden = tc.num_attention_heads, tc.hidden_size
        head_dim = getattr(tc, "head_dim", None) or hidden // heads
        if "attention_bias" not in arch.biases:
            problems.append(f"attention biases are not part of llama.cpp's {arch.gguf_arch} graph")
        elif heads * head_dim != hidden:
            problems.append(
                "attention biases with heads x head_dim != hidden_size: llama.cpp sizes the "
                "query bias by hidden_size"
            )
    act = getattr(tc, "hidden_act", "silu")
    if act not in arch.activations:
        problems.append(
            f"text activation '{act}' is not what llama.cpp's {arch.gguf_arch} graph computes; "
            f"valid: {', '.join(arch.activations)}"
        )
    if arch.tied_head_only and not getattr(tc, "tie_word_embeddings", True):
        problems.append(
            f"llama.cpp's {arch.gguf_arch} graph has no separate output matrix; export a model "
            "with tied embeddings"
        )
    return problems


def _gguf_vision_problems(config, varch: VisionArch) -> list[str]:
    """What clip.cpp's llava graph cannot compute of the tower (its class-token order is the
    installed llama.cpp's, measured at export: :mod:`edgekd.export.gguf_probe`)."""
    vc = config.vision_config
    problems = []
    if vc.hidden_act not in varch.activations:
        problems.append(
            f"vision activation '{vc.hidden_act}'; valid: {', '.join(varch.activations)}"
        )
    if varch.class_token and config.vision_feature_select_strategy == "full":
        problems.append(
            f"vision tower '{vc.model_type}' with the 'full' selection: clip's llava graph "
            "always drops the class token; export it with 'default' or with --target onnx"
        )
    if getattr(vc, "use_swiglu_ffn", False):
        problems.append(
            f"vision tower '{vc.model_type}' with a SwiGLU MLP (use_swiglu_ffn): clip's llava "
            "graph has a plain MLP; export it with --target onnx or tensorrt"
        )
    if config.projector_hidden_act not in PROJECTOR_ACTS:
        problems.append(
            f"projector activation '{config.projector_hidden_act}'; clip's mlp projector "
            f"applies GELU; valid: {', '.join(PROJECTOR_ACTS)}"
        )
    return problems
