"""The processor of a converted TinyLLaVA checkpoint: its tokenizer, prompt and image preprocessing.

What TinyLLaVA Factory does (paths in that repository) and how edgekd reproduces it:

* ``tinyllava/data/template/qwen2_base_template.py`` with ``base.py`` and ``formatter.py``: the
  prompt is the system sentence plus one space, then per turn
  ``USER: {q} ASSISTANT: {a}<|endoftext|>`` with no separator between turns; a question holding
  ``<image>`` has it removed, is stripped, and becomes ``<image>\\n{q}``. At inference the open
  answer renders as ``ASSISTANT:`` (no trailing space). A leading non-user message is skipped.
  :data:`QWEN2_BASE_TEMPLATE` renders the same text; a system message, if given, replaces the
  default sentence (TinyLLaVA would drop it), and several images in one turn each get
  ``<image>\\n``.
* ``tinyllava/data/image_preprocess.py``: images go through the vision tower's own image
  processor (SigLIP: a PIL bicubic resize to a square, then scaling to [-1, 1]).
  ``image_aspect_ratio == "pad"`` first pads the image to a square with the processor's mean
  colour (``int(0.5 * 255)`` = 127 for SigLIP), centred; transformers' LLaVA image processor with
  ``do_pad`` pads the same way before resizing. ``"anyres"`` splits the image into a grid of
  crops, several images' worth of visual tokens, which Llava's one-image input cannot hold.
* The tokenizer is the LLM's (TinyLLaVA saves it beside config.json, in the slow format:
  vocab.json, merges.txt, added_tokens.json, no tokenizer.json) and has no ``<image>`` token:
  images enter the text as the placeholder id -200. Llava needs a real token, so ``<image>`` is
  added as a special token at the next free id (151646 for Qwen2's tokenizer with 3 added
  tokens, 151665 for Qwen2.5's with 22). The ids differ between the two, which distillation
  allows: it translates the student's image token into the teacher's (see
  :func:`edgekd.models.vlm.check_compatible`).

Preprocessing is pinned to the PIL backend: transformers saves a backend-neutral class name
(``SiglipImageProcessor``) and would reload the torchvision-backed class wherever torchvision is
installed, whose bicubic resize differs from PIL's. :func:`edgekd.models.vlm.load_processor`
asks for the PIL classes, which reproduce TinyLLaVA's pixels exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekd.errors import ModelError
from edgekd.models.checkpoint import read_json

IMAGE_TOKEN = "<image>"
ASPECT_RATIOS = ("square", "pad")  # TinyLLaVA's image_aspect_ratio values a Llava can reproduce
DEFAULT_ASPECT_RATIO = "square"  # TinyLlavaConfig's default
SIGLIP_SIZE = 224  # SiglipVisionConfig's default image_size

QWEN2_BASE_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
# The answer's end per TinyLLaVA template (tinyllava/data/template/): qwen2_base, llama, gemma.
# LLaVA-1.5's vicuna_v1 prompt is the llama one (same system sentence, USER:/ASSISTANT:, </s>).
TEMPLATE_EOS = {"qwen2": "<|endoftext|>", "llama": "</s>", "gemma": "<eos>"}


def chat_template(eos: str, bos: str | None = None) -> str:
    """TinyLLaVA's prompt (and LLaVA-1.5's vicuna_v1) ending answers with ``eos``, the text
    opened with ``bos`` when the source tokenizer adds one (Llama's ``<s>``, Gemma's ``<bos>``).
    Content is a string or a list of {"type": "image"|"text"} items."""
    opening = "{{- '" + bos + "' -}}" if bos else ""
    return opening + _TEMPLATE_BODY.replace("@EOS@", eos)


_TEMPLATE_BODY = (
    '{%- set ns = namespace(system="' + QWEN2_BASE_SYSTEM + "\", images='') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- set n_images = (message['content'].split('<image>') | length) - 1 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image')"
    " | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if n_images > 0 -%}"
    "{%- set ns.images = '' -%}"
    "{%- for _ in range(n_images) -%}{%- set ns.images = ns.images + '<image>\\n' -%}{%- endfor -%}"
    "{%- set text = (ns.images + (text | replace('<image>', '') | trim)) | trim -%}"
    "{%- endif -%}"
    "{{- 'USER: ' + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + '@EOS@' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
QWEN2_BASE_TEMPLATE = chat_template(TEMPLATE_EOS["qwen2"])  # TinyLLaVA's qwen2_base prompt


def aspect_ratio_problem(value: Any) -> str | None:
    """Why TinyLLaVA's ``image_aspect_ratio`` cannot be converted, or None when it can."""
    if value is None or value in ASPECT_RATIOS:
        return None
    if value == "anyres":
        return (
            "image_aspect_ratio 'anyres' is not supported: TinyLLaVA cuts each image into a grid "
            "of crops (image_grid_pinpoints) plus a resized copy, which Llava's one-image input "
            f"cannot represent (supported: {', '.join(ASPECT_RATIOS)})"
        )
    return f"image_aspect_ratio {value!r} is unknown (supported: {', '.join(ASPECT_RATIOS)})"


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer with an ``<image>`` special token (added when absent).

    Returns:
        (tokenizer, added): ``added`` tells whether ``<image>`` was added here.
    """
    from transformers import AddedToken, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer peeks at config.json and warns that 'tinyllava' is no model type it knows.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(
            f"cannot load the tokenizer from '{path}' (TinyLLaVA saves it beside config.json): "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if IMAGE_TOKEN in tokenizer.get_vocab():
        return tokenizer, False
    tokenizer.add_tokens(
        [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
    )
    return tokenizer, True


def build_processor(
    path: Path,
    vision: dict,
    tokenizer,
    strategy: str,
    aspect_ratio: str | None,
    text_type: str = "qwen2",
):
    """LlavaProcessor: TinyLLaVA's image preprocessing, the tokenizer and the template of its
    language model (:data:`TEMPLATE_EOS`).

    Args:
        path: The checkpoint directory (a ``preprocessor_config.json`` there is honoured).
        vision: The SigLIP vision config (its ``image_size`` and ``patch_size``).
        tokenizer: From :func:`load_tokenizer`.
        strategy: Llava's ``vision_feature_select_strategy``.
        aspect_ratio: TinyLLaVA's ``image_aspect_ratio`` (``square``, ``pad`` or None).
        text_type: The language model's ``model_type`` (picks the template's answer end).
    """
    from transformers import LlavaProcessor

    template = chat_template(TEMPLATE_EOS[text_type], bos_into_template(tokenizer))
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=image_processor(path, vision, aspect_ratio),
        tokenizer=tokenizer,
        patch_size=vision.get("patch_size", 16),
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,  # SigLIP has no CLS token
    )


def bos_into_template(tokenizer) -> str | None:
    """The BOS the source tokenizer prepends (LLaVA and TinyLLaVA keep it once, at the start),
    moved into the template: the tokenizer stops adding it, so a rendered prompt tokenized with
    or without special tokens gets exactly one. None when it adds none (Qwen2)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or tokenizer("a")["input_ids"][:1] != [bos_id]:
        return None
    tokenizer.add_bos_token = False
    if tokenizer("a")["input_ids"][:1] == [bos_id]:
        raise ModelError(
            "the tokenizer keeps adding its BOS token; it cannot be moved into the template"
        )
    return tokenizer.bos_token


def image_processor(path: Path, vision: dict, aspect_ratio: str | None):
    """SigLIP preprocessing at the tower's image size (PIL backend), padded first for ``pad``.

    The SigLIP values (mean and std 0.5, bicubic, 1/255) are those of the SigLIP checkpoints
    TinyLLaVA loads its processor from; a ``preprocessor_config.json`` in ``path`` overrides them.
    """
    from transformers import LlavaImageProcessorPil, SiglipImageProcessorPil

    size = int(vision.get("image_size", SIGLIP_SIZE))
    kwargs: dict[str, Any] = {
        "size": {"height": size, "width": size},
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "resample": 3,  # PIL.Image.BICUBIC
        **_saved_preprocessing(path, size),
    }
    if (aspect_ratio or DEFAULT_ASPECT_RATIO) == "pad":
        # LLaVA's processor pads with int(mean * 255), centred, before the resize: TinyLLaVA's
        # expand2square. Its CLIP-style centre crop must stay off (SigLIP resizes to a square).
        return LlavaImageProcessorPil(do_pad=True, do_center_crop=False, **kwargs)
    return SiglipImageProcessorPil(**kwargs)


def _saved_preprocessing(path: Path, size: int) -> dict[str, Any]:
    pre = path / "preprocessor_config.json"
    if not pre.is_file():
        return {}
    data = read_json(pre, what="an image processor")
    saved = data.get("size") or {}
    if isinstance(saved, dict):
        saved = saved.get("height", saved.get("shortest_edge"))
    if saved is not None and int(saved) != size:
        raise ModelError(
            f"'{pre}' resizes to {saved} px but the vision tower takes {size} px images; "
            "fix one of them"
        )
    keys = ("image_mean", "image_std", "resample", "rescale_factor")
    return {k: data[k] for k in keys if k in data}
