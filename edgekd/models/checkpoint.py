"""Checks of a local checkpoint before transformers loads it, each failure one ModelError.

transformers reports a broken checkpoint late and in its own words: a truncated safetensors
file as a Rust deserialisation error, a ``config.json`` of the wrong shape as a TypeError, a
config that does not match the weights as a warning (the rest left random), a config much larger
than its weights by allocating all of it. These functions name the file and the fix first.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from edgekd.errors import ModelError
from edgekd.io import checkpoint_dir, first_line, is_hub_id
from edgekd.models.hub import resolve_source

SUPPORTED_MODEL_TYPES = ("llava",)
LLAVA15_ARCHITECTURE = "LlavaLlamaForCausalLM"  # the original LLaVA code base's checkpoints
_FIT_FACTOR = 1.25  # a config describing more parameters than this x the weights' is refused


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """The checkpoint directory of a local path (a run directory's ``model/``), or a hub id.

    Raises:
        ModelError: the path does not exist. A path written as one (``./x``, ``runs/x`` when
            ``runs/`` is here, ...) fails at once instead of being looked up on the hub.
    """
    src = str(path_or_id)
    local = Path(src).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"checkpoint '{src}' is a file; pass its directory")
        return str(checkpoint_dir(local) or local)
    if not is_hub_id(src):  # a path written as a local one fails here, without the network
        raise ModelError(f"checkpoint '{src}' not found; pass a directory or a hub id (org/name)")

    # the hub's snapshot (data files, never code), failing in one line where it is unreachable
    return str(resolve_source(src).path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file of a checkpoint, every failure a one-line :class:`ModelError`."""
    if not path.is_file():
        raise ModelError(f"'{path.parent}' is not {what}: it has no {path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read '{path}': {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"'{path}' is not a JSON object (got {type(data).__name__})")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a local checkpoint, checked to be an object whose shapes are numbers.

    Raises:
        ModelError: missing, not JSON, not an object, or a sub-config / size that is malformed.
    """
    path = folder / "config.json"
    config = read_json(path, what="a checkpoint")
    problems = []
    for key in ("text_config", "vision_config"):
        sub = config.get(key, {})
        if not isinstance(sub, dict):
            problems.append(f"{key} is {type(sub).__name__}, not an object")
            continue
        for size in _SIZE_KEYS:
            value = sub.get(size)
            if value is not None and not _positive_int(value):
                problems.append(f"{key}.{size} is {value!r}, not a positive integer")
    if problems:
        raise ModelError(f"'{path}': {'; '.join(problems)}")
    return config


_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "image_size",
    "patch_size",
    "max_position_embeddings",
)


def pickle_refused(path: str | os.PathLike) -> ModelError:
    """The error for a pickle weights file that ``weights_only`` loading refused."""
    return ModelError(
        f"'{path}' is a pickle holding objects other than tensors; edgekd loads weights "
        "without running pickled code: save them as safetensors in an environment you trust"
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_weights(folder: Path, config) -> None:
    """The weight files of ``folder`` are readable and ``config`` does not describe a larger model.

    Every safetensors file (``model.safetensors`` or the shards its index names) must have a
    whole header; the parameters ``config`` describes (counted on the meta device: no memory)
    may not exceed the weights' by more than :data:`_FIT_FACTOR`. Pickle-only checkpoints are
    checked by the loader (``weights_only``).

    Raises:
        ModelError: no weights, a malformed index or a missing shard, a truncated or corrupt
            safetensors file, or a config far larger than the weights (both counts named).
    """
    numel = _weights_numel(weight_files(folder))
    if numel is None:
        return
    described = _described_numel(config, folder)
    if described > _FIT_FACTOR * numel:
        raise ModelError(
            f"'{folder}': config.json describes {described / 1e6:,.2f}M parameters but the "
            f"weights hold {numel / 1e6:,.2f}M; use the config.json the weights were saved with"
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the model (empty for a pickle-only checkpoint).

    Raises:
        ModelError: no weights at all, a malformed index, or a shard the index names missing.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, what="a sharded checkpoint")
        weight_map = data.get("weight_map")
        if "metadata" not in data or not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"'{index}' is not a shard index (with 'metadata' and 'weight_map')")
        shards = [folder / str(name) for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelError(f"'{index}' names {len(missing)} missing shard(s), e.g. {missing[0]}")
        return shards
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if any(folder.glob("pytorch_model*.bin")):
        return []
    raise ModelError(f"'{folder}' has no weights (model.safetensors)")


def _weights_numel(files: list[Path]) -> int | None:
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    n = 1
                    for dim in f.get_slice(key).get_shape():
                        n *= dim
                    total += n
        except (SafetensorError, OSError) as e:
            raise ModelError(
                f"'{file}' is not a readable safetensors file (truncated or corrupt: "
                f"{first_line(e)}); save or copy the checkpoint again"
            ) from None
    return total


def _described_numel(config, folder: Path) -> int:
    import torch
    from transformers import LlavaForConditionalGeneration

    try:
        with torch.device("meta"), _without_zero3_init():
            model = LlavaForConditionalGeneration(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise ModelError(
            f"'{folder / 'config.json'}' does not describe a model edgekd can build: "
            f"{first_line(e)}"
        ) from None
    return sum(p.numel() for p in model.parameters())


def _without_zero3_init():
    """A context in which transformers builds sub-models plainly even under DeepSpeed ZeRO-3.

    Under ZeRO-3 every ``from_config`` partitions and re-initialises parameters, which a model
    on the meta device (built only to count its parameters) cannot take.
    """
    from transformers import modeling_utils

    return getattr(modeling_utils, "set_zero3_state", nullcontext)()


def load_config(src: str, trust_remote_code: bool = False):
    """The config of a checkpoint directory or hub id, every parse failure a :class:`ModelError`.

    A local ``config.json`` is checked first (:func:`read_config`, :func:`check_llava_config`).
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig

    try:
        if Path(src).is_dir():
            check_llava_config(read_config(Path(src)), src)
        else:
            raw, _ = PretrainedConfig.get_config_dict(src)
            check_llava_config(raw, src)
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ModelError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError, StrictDataclassError) as e:
        cause = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e
        raise ModelError(f"cannot read a model config from '{src}': {first_line(cause)}") from None


def load_processor(src: str, trust_remote_code: bool = False):
    """The checkpoint's processor, its image processor always the PIL-backed class;
    malformed tokenizer or processor files are a ModelError.

    transformers saves a backend-neutral image processor name (``SiglipImageProcessor``) and
    reloads the torchvision-backed class wherever torchvision is installed, whose resize differs
    from PIL's by a few grey levels. The reference implementations (LLaVA, TinyLLaVA) resize
    with PIL, so edgekd pins that backend: preprocessing does not depend on what is installed.
    The tokenizers library raises a bare ``Exception`` for a ``tokenizer.json`` it cannot
    parse; that, and the usual parse errors, name the checkpoint.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(
            str(src), backend="pil", trust_remote_code=trust_remote_code
        )
    except Exception as e:
        parse_error = (OSError, ValueError, KeyError, TypeError, AttributeError)
        if not isinstance(e, parse_error) and type(e) is not Exception:
            raise  # not a parse error of the files: a bug, with its traceback
        why = f"no key {e}" if isinstance(e, KeyError) else first_line(e)
        raise ModelError(f"cannot load the tokenizer or processor of '{src}': {why}") from None


def check_loading_info(info: dict[str, Any], src: str) -> None:
    """Refuse weights that do not fill the model ``config.json`` describes, exactly.

    transformers loads such checkpoints with a warning, leaving the missing or mismatched
    weights random; a model that silently answers noise is worse than an error.
    """
    mismatched = sorted(info.get("mismatched_keys") or [])
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    if not (mismatched or missing or unexpected):
        return
    if mismatched:
        key, ckpt, model = mismatched[0]
        first = f"{key} is {list(ckpt)} in the weights but {list(model)} by config.json"
    elif missing:
        first = f"{missing[0]} is missing from the weights"
    else:
        first = f"{unexpected[0]} in the weights has no place in the model"
    raise ModelError(
        f"'{src}': config.json does not match the weights ({len(mismatched)} mismatched, "
        f"{len(missing)} missing, {len(unexpected)} unexpected; first: {first}); use the "
        "config.json the weights were saved with"
    )


def require_chat_template(path_or_id: str | os.PathLike) -> None:
    """Refuse a local checkpoint without a chat template (prompts are rendered with it).

    Raises:
        ModelError: no ``chat_template.jinja`` and no template in the processor or tokenizer
            config.
    """
    local = Path(path_or_id).expanduser()
    folder = checkpoint_dir(local) if local.is_dir() else None
    if folder is None:
        return  # a hub id, or not a checkpoint: the loader says so
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        _check_template_syntax(jinja)
        return
    if (folder / "chat_templates").is_dir():
        return
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        # a broken config is named as such, not taken for one without a template
        if (folder / name).is_file() and read_json(folder / name, "a checkpoint file").get(
            "chat_template"
        ):
            return
    raise ModelError(
        f"checkpoint '{path_or_id}' has no chat template (no chat_template.jinja, none in its "
        "tokenizer or processor config); add the template the model was trained with"
    )


def _check_template_syntax(path: Path) -> None:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(path.read_text(encoding="utf-8"))
    except (TemplateSyntaxError, OSError, UnicodeDecodeError) as e:
        line = f" line {e.lineno}" if isinstance(e, TemplateSyntaxError) else ""
        raise ModelError(f"chat template '{path}'{line} is not valid Jinja: {e}") from None


def is_llava15(config: dict[str, Any]) -> bool:
    """An original LLaVA (LlavaLlamaForCausalLM) config.json, not a transformers Llava one."""
    return LLAVA15_ARCHITECTURE in (config.get("architectures") or []) or (
        "mm_vision_tower" in config and "text_config" not in config
    )


def check_llava_config(config: dict[str, Any], src: str) -> None:
    """Refuse checkpoints that are not LLaVA-family VLMs, with a hint for TinyLLaVA ones.

    Args:
        config: The checkpoint's raw ``config.json`` as a dict.
        src: Where it came from, for the message.
    """
    model_type = config.get("model_type")
    if is_llava15(config):  # model_type "llava" too, but LLaVA's own layout
        raise ModelError(
            f"'{src}' is an original LLaVA checkpoint (LlavaLlamaForCausalLM); convert it "
            f"first: edgekd convert llava15 {src} OUT"
        )
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    if model_type == "tinyllava" or "TinyLlava" in str(config.get("architectures", "")):
        raise ModelError(
            f"'{src}' is a TinyLLaVA Factory checkpoint; convert it first: "
            f"edgekd convert tinyllava {src} OUT"
        )
    raise ModelError(
        f"'{src}' is not a LLaVA-family VLM (model_type '{model_type}'); edgekd takes "
        "LlavaForConditionalGeneration checkpoints"
    )
