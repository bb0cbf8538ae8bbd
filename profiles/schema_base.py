"""What both kinds of profile share: the base models, the precision names, and how cross-field
problems are collected (:class:`Problems`) and reported (:class:`ProfileError`)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)

from edgekd.errors import EdgeKDError

Precision = Literal["fp32", "fp16", "bf16", "int8", "int4"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

NAME = r"^[a-z0-9][a-z0-9._-]*$"
RELEASE = r"^\d+(\.(\d+|x))*$"
Positive = Annotated[float, Field(gt=0)]
Peaks = dict[Precision, Positive]


class ProfileError(EdgeKDError, ValueError):
    """A profile is unknown, unreadable or invalid; the message is one line naming file and keys."""


class Problems(ValueError):
    """Cross-field problems found by a validator, as (key path relative to the model, message)."""

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items
        super().__init__("; ".join(f"{key}: {msg}" if key else msg for key, msg in items))


# Validation context key set by the loader: blocks leave their cross-field checks to the profile,
# which then reports the problems of all blocks and its own in one go.
CHECKS_BY_PROFILE = "edgekd_checks_by_profile"


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Block(Model):
    """A profile block with cross-field checks of its own."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field problems as (key relative to the block, message); empty when consistent."""
        return []

    @model_validator(mode="after")
    def _check_block(self, info: ValidationInfo) -> Block:
        if not (info.context or {}).get(CHECKS_BY_PROFILE) and (problems := self.problems()):
            raise Problems(problems)
        return self


def nested(key: str, block: Block | None) -> list[tuple[str, str]]:
    return [(f"{key}.{sub}", msg) for sub, msg in block.problems()] if block is not None else []
