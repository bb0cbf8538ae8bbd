"""One configuration, three ways in: the CLI options agree with the recipe schema and with the
library's own defaults, so that a default or a help text is written once and cannot drift."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing

import pytest

from edgekd.cli import stages
from edgekd.profiles import recipe_field


def _options(command) -> dict[str, tuple[type, typing.Any, str | None]]:
    """Each parameter of a Typer command: its type (Optional unwrapped), default and help."""
    hints = typing.get_type_hints(command, include_extras=True)
    out = {}
    for name, param in inspect.signature(command).parameters.items():
        tp, info = hints[name], None
        if typing.get_origin(tp) is typing.Annotated:
            tp, *extras = typing.get_args(tp)
            info = next((e for e in extras if hasattr(e, "help")), None)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        out[name] = (tp, param.default, info.help if info is not None else None)
    return out


def _schema_type(annotation) -> type:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


@pytest.mark.parametrize("flag", sorted(stages.RECIPE_FLAGS))
def test_each_recipe_flag_is_its_schema_field(flag):
    key = stages.RECIPE_FLAGS[flag]
    field = recipe_field(key)
    tp, default, help_text = _options(stages.distill)[flag]
    assert tp is _schema_type(field.annotation), (flag, tp, field.annotation)
    assert default is None  # the recipe's value unless given
    assert field.description and help_text.startswith(field.description)


def test_the_other_distill_options_default_as_the_library_does():
    from edgekd.distill.run import DistillJob

    job = {f.name: f for f in dataclasses.fields(DistillJob)}
    for name, (_, default, _) in _options(stages.distill).items():
        if name in stages.RECIPE_FLAGS or name == "set_":
            continue
        assert name in job, f"--{name} is neither a recipe key nor a DistillJob field"
        if default is not inspect.Parameter.empty:
            assert default == job[name].default, (name, default, job[name].default)


def test_the_bench_options_default_as_the_library_does():
    from edgekd.runtime.bench import BenchConfig

    config = {f.name: f for f in dataclasses.fields(BenchConfig)}
    renamed = {"model": "models", "name": "names"}
    for name, (_, default, _) in _options(stages.bench).items():
        field = config[renamed.get(name, name)]
        if default is inspect.Parameter.empty or field.default is dataclasses.MISSING:
            continue
        expected = field.default
        assert default == expected or (default is None and name == "name"), (name, default)


def test_the_objective_and_the_losses_default_as_the_recipe_does():
    from edgekd.distill import losses
    from edgekd.distill.objective import Objective
    from edgekd.profiles.schema import LossConfig

    recipe = LossConfig()
    shared = [f for f in dataclasses.fields(Objective) if f.name in LossConfig.model_fields]
    assert len(shared) >= 9  # weights, temperature, t2_scale, top_n, k clamp, logit_loss, chunk
    for f in shared:
        assert f.default == getattr(recipe, f.name), f.name
    # the softened losses run at the recipe's settings; kd and rkl at T = 1 by definition
    for fn in (losses.dbild, losses.bild, losses.forward_kl, losses.reverse_kl):
        for name, param in inspect.signature(fn).parameters.items():
            if name in LossConfig.model_fields and not (
                name == "temperature" and "kl" in fn.__name__
            ):
                assert param.default == getattr(recipe, name), (fn.__name__, name)
