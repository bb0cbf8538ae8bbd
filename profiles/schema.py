"""Typed schemas of edgekd profiles: device profiles (hardware) and recipe profiles (distillation).

Profiles are data (``profiles/devices/*.yaml``, ``profiles/recipes/*.yaml``); these pydantic models
are their only definition. Single fields are checked by pydantic constraints. Cross-field checks
collect every problem they find and raise them together as :class:`Problems`, each with the key
path the user would edit, so that the loader can report all of them in one line.

The models live in :mod:`edgekd.profiles.device` and :mod:`edgekd.profiles.recipe` over the
shared base in :mod:`edgekd.profiles.schema_base`; this module is their one public name.
"""

from __future__ import annotations

from edgekd.profiles.device import DeviceProfile, JetsonInfo, PowerMode, TensorRTSettings
from edgekd.profiles.recipe import (
    DataConfig,
    DistributedConfig,
    LogitLoss,
    LossConfig,
    RecipeProfile,
    TrainingConfig,
)
from edgekd.profiles.schema_base import (
    CHECKS_BY_PROFILE,
    PRECISIONS,
    Precision,
    Problems,
    ProfileError,
)

__all__ = [
    "CHECKS_BY_PROFILE",
    "PRECISIONS",
    "DataConfig",
    "DeviceProfile",
    "DistributedConfig",
    "JetsonInfo",
    "LogitLoss",
    "LossConfig",
    "PowerMode",
    "Precision",
    "Problems",
    "ProfileError",
    "RecipeProfile",
    "TensorRTSettings",
    "TrainingConfig",
]
