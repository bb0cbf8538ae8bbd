"""Device and recipe profiles: YAML data validated against :mod:`edgekd.profiles.schema`.

A profile is named by its file stem (``jetson-orin-nano-8gb``) and looked up among the packaged
files, or given as a path to a ``.yaml`` file. Every problem is raised as one :class:`ProfileError`
line that names the file and each key to change::

    >>> from edgekd.profiles import list_profiles, load_device_profile
    >>> "jetson-orin-nano-8gb" in list_profiles("device")
    True
    >>> load_device_profile("jetson-orin-nano-8gb").memory_bandwidth_gbps
    68.0
"""

from __future__ import annotations

import types
import typing
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .schema import (
    CHECKS_BY_PROFILE,
    PRECISIONS,
    DataConfig,
    DeviceProfile,
    DistributedConfig,
    JetsonInfo,
    LossConfig,
    PowerMode,
    Precision,
    Problems,
    ProfileError,
    RecipeProfile,
    TensorRTSettings,
    TrainingConfig,
)

__all__ = [
    "PRECISIONS",
    "DataConfig",
    "DeviceProfile",
    "DistributedConfig",
    "JetsonInfo",
    "LossConfig",
    "PowerMode",
    "Precision",
    "ProfileError",
    "RecipeProfile",
    "TensorRTSettings",
    "TrainingConfig",
    "list_profiles",
    "load_device_profile",
    "load_recipe",
    "profile_to_dict",
    "profile_to_yaml",
    "recipe_field",
    "show_profile",
]

ProfileKind = Literal["device", "recipe"]
_FOLDERS: dict[str, str] = {"device": "devices", "recipe": "recipes"}
_M = TypeVar("_M", bound=BaseModel)


def list_profiles(kind: ProfileKind) -> list[str]:
    """Names of the packaged profiles of ``kind`` ('device' or 'recipe'), sorted."""
    folder = _packaged_folder(kind)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_device_profile(
    name_or_path: str | Path, overrides: dict[str, Any] | None = None
) -> DeviceProfile:
    """Load and validate a device profile.

    Args:
        name_or_path: A packaged profile name, or a path to a ``.yaml`` file.
        overrides: Dotted keys to set before validation, e.g. ``{"tensorrt.max_batch": 2}``.

    Raises:
        ProfileError: Unknown name, missing file, invalid YAML or schema errors (all in one line).
    """
    profile, _ = _load(DeviceProfile, "device", name_or_path, overrides)
    return profile


def load_recipe(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> RecipeProfile:
    """Load and validate a recipe profile; ``distributed.accelerate_config`` becomes absolute.

    Args:
        name_or_path: A packaged recipe name, or a path to a ``.yaml`` file.
        overrides: Dotted keys to set before validation, e.g. ``{"training.max_steps": 10}``
            (how CLI flags reach the recipe, so that errors name the same keys).

    Raises:
        ProfileError: Unknown name, missing file, invalid YAML or schema errors (all in one line).
    """
    recipe, source = _load(RecipeProfile, "recipe", name_or_path, overrides)
    config = recipe.distributed.accelerate_config
    if config is not None:
        path = Path(config).expanduser()
        path = path if path.is_absolute() else Path(str(source)).parent / path
        if not path.is_file():
            raise ProfileError(f"{source}: distributed.accelerate_config: file not found: {path}")
        recipe.distributed.accelerate_config = str(path.resolve())
    return recipe


def recipe_field(key: str):
    """The schema field of a dotted recipe key (``training.max_steps``): its type, bounds,
    default and description, as pydantic declares them (``KeyError`` for an unknown key)."""
    model: Any = RecipeProfile
    *parents, last = key.split(".")
    for part in parents:
        model = _unwrap_optional(model.model_fields[part].annotation)
    return _unwrap_optional(model).model_fields[last]


def profile_to_dict(profile: BaseModel) -> dict[str, Any]:
    """A profile as plain JSON-compatible data (unset optional keys left out); reloads unchanged."""
    return profile.model_dump(mode="json", exclude_none=True)


def profile_to_yaml(profile: BaseModel) -> str:
    """A profile as YAML text in schema order, for ``edgekd profiles show``."""
    return yaml.safe_dump(profile_to_dict(profile), sort_keys=False, allow_unicode=True, width=100)


def show_profile(name_or_path: str | Path) -> str:
    """YAML of a device or recipe profile found by name or path (device names are tried first).

    Raises:
        ProfileError: The name is neither a device nor a recipe profile (both lists are given).
    """
    text = str(name_or_path)
    if text in list_profiles("device"):
        return profile_to_yaml(load_device_profile(text))
    if text in list_profiles("recipe"):
        return profile_to_yaml(load_recipe(text))
    if text.endswith((".yaml", ".yml")) or "/" in text:
        data = (
            _read_yaml(Path(text).read_text(encoding="utf-8"), text) if Path(text).is_file() else {}
        )
        loader = load_recipe if "method" in data else load_device_profile
        return profile_to_yaml(loader(text))
    raise ProfileError(
        f"unknown profile '{text}'; devices: {', '.join(list_profiles('device'))}; "
        f"recipes: {', '.join(list_profiles('recipe'))}"
    )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _load(
    model: type[_M], kind: str, name_or_path: str | Path, overrides: dict[str, Any] | None
) -> tuple[_M, Path | Traversable]:
    source = _locate(kind, name_or_path)
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    data = _read_yaml(text, source)
    stem = source.name.rsplit(".", 1)[0]
    problems = []
    if isinstance(data.get("name"), str) and data["name"] != stem:
        problems.append(f"name: must equal the file name '{stem}', got '{data['name']}'")
    _apply_overrides(data, overrides or {}, source)
    try:
        profile = model.model_validate(data, context={CHECKS_BY_PROFILE: True})
    except ValidationError as exc:
        problems = _problems(exc, model) + problems
    if problems:
        raise ProfileError(f"{source}: " + "; ".join(problems))
    return profile, source


def _packaged_folder(kind: str) -> Traversable:
    if kind not in _FOLDERS:
        raise ProfileError(f"unknown profile kind '{kind}'; valid: {', '.join(_FOLDERS)}")
    return resources.files(__name__) / _FOLDERS[kind]


def _locate(kind: str, name_or_path: str | Path) -> Path | Traversable:
    """A packaged profile by name, or a file by path (anything with a suffix or a separator)."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProfileError(f"{kind} profile file not found: {path}")
        return path
    source = _packaged_folder(kind) / f"{text}.yaml"
    if not source.is_file():
        valid = ", ".join(list_profiles(kind))  # type: ignore[arg-type]
        raise ProfileError(f"unknown {kind} profile '{text}'; valid: {valid}")
    return source


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, source: object) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ProfileError(f"{where}: invalid YAML: {problem}") from exc
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ProfileError(f"{source}: expected a mapping of keys at the top level, got {got}")
    return data


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: object) -> None:
    """Set dotted keys (``training.max_steps``) in the raw data, creating blocks as needed."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ProfileError(f"{source}: override '{dotted}': '{part}' is not a block")
        node[leaf] = value


# ---------------------------------------------------------------------------------------------
# Error formatting
# ---------------------------------------------------------------------------------------------

_BOUNDS = {
    "greater_than": ("> ", "gt"),
    "greater_than_equal": (">= ", "ge"),
    "less_than": ("< ", "lt"),
    "less_than_equal": ("<= ", "le"),
}


def _problems(exc: ValidationError, model: type[BaseModel] | None) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if p != "[key]")
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            for key, msg in cause.items:
                out.append(_line(loc + tuple(key.split(".")) if key else loc, msg))
        else:
            out.append(_line(loc, _message(err, model, err["loc"][:-1])))
    return out


def _line(loc: tuple[str, ...], message: str) -> str:
    return f"{'.'.join(loc)}: {message}" if loc else message


def _message(err: Any, model: type[BaseModel] | None, parent: tuple[Any, ...]) -> str:
    kind, ctx, got = err["type"], err.get("ctx") or {}, _short(err.get("input"))
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        keys = _keys_at(model, parent)
        return f"unknown key; valid keys: {', '.join(keys)}" if keys else "unknown key"
    if kind in _BOUNDS:
        op, bound = _BOUNDS[kind]
        return f"must be {op}{_number(ctx[bound])}, got {got}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {got}"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = err["msg"]
    return f"{msg[:1].lower()}{msg[1:]}, got {got}"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _keys_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found at ``loc`` inside ``model``, for 'unknown key' hints."""
    tp: Any = model
    for part in loc:
        tp = _unwrap_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return []
    tp = _unwrap_optional(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp
