"""The method registry: a method registered from outside the library trains like the built-in
ones (its loss function plus one registration), and the recipe schema, the objective and the
CLI help read the registry."""

from __future__ import annotations

import pytest
import yaml

from edgekd.distill import methods
from edgekd.distill.losses import LossOutput
from edgekd.distill.methods import Method


def _l1_logits(student, teacher, mask, *, temperature: float = 1.0):
    """A toy logit loss: mean |z_s - z_t| / T at the supervised positions."""
    rows = mask.reshape(-1)
    s = student.reshape(-1, student.shape[-1])[rows].float() / temperature
    t = teacher.reshape(-1, teacher.shape[-1])[rows].float().detach() / temperature
    loss = (s - t).abs().mean() if rows.any() else student.sum() * 0.0
    return LossOutput(loss=loss, n_tokens=int(rows.sum()))


@pytest.fixture
def l1_method(monkeypatch):
    """``l1-test`` registered for one test; records what the objective passed its loss."""
    calls: list[dict] = []

    def recorded(student, teacher, mask, *, temperature: float = 1.0):
        calls.append({"temperature": temperature, "vocab": student.shape[-1]})
        return _l1_logits(student, teacher, mask, temperature=temperature)

    spec = Method("l1-test", "toy L1 between logits", loss=recorded, temperature=2.0)
    monkeypatch.setitem(methods.METHODS, spec.name, spec)
    return calls


def test_a_registered_method_trains_through_edgekd_distill(job_factory, l1_method):
    from edgekd.distill.run import run

    job = job_factory("l1-test", overrides={"training.max_steps": 1})
    summary = run(job)
    assert summary["global_step"] == 1 and summary["method"] == "l1-test"
    assert l1_method and all(c["temperature"] == 2.0 for c in l1_method)  # its own, fixed
    config = yaml.safe_load((job.output / "config.yaml").read_text())
    assert config["method"] == "l1-test"
    assert config["loss"]["w_vsd"] == 0.0  # a weight the method does not use
    assert config["training"]["train_vision_tower"] is False  # no visual switch


def test_the_schema_and_the_cli_read_the_registry(l1_method, tmp_path):
    from edgekd.distill.objective import Objective
    from edgekd.profiles import load_recipe

    assert "l1-test" in methods.help_text()
    objective = Objective(method="l1-test")
    assert objective.needs_teacher and not objective.uses_switch and objective.scale == 1.0
    recipe = load_recipe("easyvqa-cpu").model_dump()
    recipe.update(name="l1", method="l1-test")
    recipe["loss"]["w_vsd"] = 0.5
    path = tmp_path / "l1.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(Exception, match=r"loss\.w_vsd.*does not use it"):
        load_recipe(str(path))
    recipe.update(method="nope")
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(Exception, match=r"unknown method 'nope'; valid: .*l1-test"):
        load_recipe(str(path))


def test_every_builtin_method_is_declared_once():
    assert methods.names() == ("sft", "kd", "rkl", "bild", "dbild", "switch-kd")
    assert [m.name for m in methods.METHODS.values() if m.switch] == ["switch-kd"]
    assert [m.name for m in methods.METHODS.values() if not m.reads_teacher_logits] == ["sft"]
