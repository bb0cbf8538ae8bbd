"""``edgekd distill`` end to end on tiny models: every method, outputs, bad input, faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from distill_helpers import write_dataset
from safetensors.torch import load_file

from edgekd.distill.methods import names
from edgekd.distill.run import run
from edgekd.distill.trainer import DistillError
from edgekd.errors import DataError, ModelError, OutputExistsError
from edgekd.models import VLM


@pytest.mark.parametrize("method", names())
def test_every_method_trains_and_saves_a_standard_checkpoint(job_factory, method):
    job = job_factory(method)
    summary = run(job)
    assert summary["global_step"] == 3
    out = job.output
    assert {p.name for p in out.iterdir()} >= {
        "model",
        "checkpoints",
        "config.yaml",
        "training_log.json",
    }
    vlm = VLM.from_pretrained(out / "model")  # loads as a plain transformers Llava
    assert (out / "model" / "edgekd_distill.yaml").exists()
    assert not any(
        k.startswith("vsd_adapter") for k in load_file(out / "model" / "model.safetensors")
    )
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    steps = [h for h in log if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    expected = {"ce", "learning_rate", "tokens_per_s"}
    if method != "sft":
        expected.add("align")
    if method in ("bild", "dbild", "switch-kd"):
        expected |= {"k_t", "k_s"}
    if method == "switch-kd":
        expected.add("vsd")
    assert expected <= set(steps[-1]), steps[-1]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert vlm.vocab_size > 0


def test_switch_kd_trains_the_vision_tower_and_other_methods_do_not(job_factory, student_ckpt):
    before = load_file(student_ckpt / "model.safetensors")
    tower = [k for k in before if "vision_tower." in k]
    assert tower
    for method, moved in (("switch-kd", True), ("dbild", False)):
        job = job_factory(method)
        run(job)
        after = load_file(job.output / "model" / "model.safetensors")
        changed = any(not torch.equal(before[k], after[k]) for k in tower)
        assert changed is moved, method


def test_train_language_model_false_trains_the_projector_alone(job_factory, student_ckpt):
    """LLaVA's first stage: only the projector moves (the tower is frozen for sft)."""
    before = load_file(student_ckpt / "model.safetensors")
    job = job_factory("sft", overrides={"training.train_language_model": False})
    run(job)
    after = load_file(job.output / "model" / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("multi_modal_projector." in k for k in moved), sorted(moved)[:3]


def test_linear_adapter_is_saved_apart(job_factory):
    job = job_factory("switch-kd", vsd_adapter="linear")
    run(job)
    adapter = load_file(job.output / "model" / "vsd_adapter.safetensors")
    assert set(adapter) == {"vsd_adapter.weight", "vsd_adapter.bias"}


def test_resolved_config_records_overrides(job_factory):
    job = job_factory("dbild", overrides={"loss.temperature": 2.0})
    run(job)
    text = (job.output / "config.yaml").read_text()
    assert "method: dbild" in text and "temperature: 2.0" in text and "w_vsd: 0.0" in text


def test_vocabulary_mismatch_names_both_sizes(job_factory, tmp_path):
    from edgekd.models import build_vlm, train_tokenizer

    other = build_vlm("small", tokenizer=train_tokenizer(["other words only"] * 20, vocab_size=700))
    other.save_pretrained(tmp_path / "other-teacher")
    job = job_factory("kd", teacher=str(tmp_path / "other-teacher"))
    with pytest.raises(
        ModelError, match=r"teacher vocabulary size \d+ != student vocabulary size \d+"
    ):
        run(job)
    assert not (job.output / "model").exists()


def test_untrained_tiny_teacher_is_refused(job_factory):
    with pytest.raises(ModelError, match="--method sft"):
        run(job_factory("kd", teacher="tiny:small"))


def test_empty_dataset(job_factory, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="empty"):
        run(job_factory("sft", data=empty))


def test_every_sample_truncated_to_zero_answer_tokens(job_factory, tmp_path):
    data = write_dataset(tmp_path / "img-only", n=8, text_only=0)
    job = job_factory("sft", data=data, overrides={"training.max_length": 20})
    with pytest.raises(DistillError, match="every sample has zero answer tokens.*max_length 20"):
        run(job)


def test_existing_output_needs_overwrite_or_resume(job_factory):
    job = job_factory("sft")
    job.output.mkdir(parents=True)
    (job.output / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite.*--resume"):
        run(job)
    assert (job.output / "keep.txt").exists()
    job.resume = True
    with pytest.raises(DistillError, match="no checkpoint"):
        run(job)


def test_nan_loss_stops_naming_step_and_last_checkpoint(job_factory, monkeypatch):
    from edgekd.distill import objective

    calls = {"n": 0}
    original = objective.Objective.__call__

    def poisoned(self, *args, **kwargs):
        loss, stats = original(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(objective.Objective, "__call__", poisoned)
    job = job_factory("sft", overrides={"training.max_steps": 5})
    with pytest.raises(
        DistillError, match=r"not finite at step 3; last good checkpoint: .*checkpoint-2"
    ):
        run(job)
    assert not (job.output / "model").exists()


def test_interrupted_checkpoint_save_leaves_no_checkpoint_folder(job_factory, monkeypatch):
    from transformers import Trainer

    original = Trainer._save_rng_state
    saves = {"n": 0}

    def crash_on_second(self, output_dir):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError("No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_on_second)
    job = job_factory("sft", overrides={"training.max_steps": 5})
    with pytest.raises(OSError, match="No space left"):
        run(job)
    ckpts = sorted(
        p.name for p in (job.output / "checkpoints").iterdir() if p.name.startswith("checkpoint-")
    )
    assert ckpts == ["checkpoint-2"]
    complete = job.output / "checkpoints" / "checkpoint-2"
    assert (complete / "trainer_state.json").exists() and (complete / "model.safetensors").exists()
    job.resume = True  # the leftover staging folder is cleaned and training resumes from step 2
    assert run(job)["global_step"] == 5
    assert not (job.output / "checkpoints" / ".staging").exists()


def test_cli_reports_bad_input_in_one_line(distill_data, student_ckpt, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgekd",
            "distill",
            "--method",
            "kd",
            "--teacher",
            str(tmp_path / "missing"),
            "--student",
            str(student_ckpt),
            "--data",
            str(distill_data),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not found" in lines[0], result.stderr


def test_builtin_dataset_names_are_written_once_to_the_cache(tmp_path, monkeypatch):
    from edgekd.data import DATASETS
    from edgekd.distill.run import resolve_dataset

    calls = []

    def writer(folder, overwrite=False):
        calls.append(folder)
        write_dataset(folder, n=3, text_only=0)

    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(DATASETS, "toy-set", writer)
    first = resolve_dataset("toy-set")
    assert first == tmp_path / "cache" / "data" / "toy-set" / "train.json" and first.is_file()
    assert resolve_dataset("toy-set") == first and len(calls) == 1
    assert resolve_dataset(str(first.parent)) == first  # a folder written by `edgekd data`
    with pytest.raises(DistillError, match="neither a file nor a built-in dataset.*toy-set"):
        resolve_dataset("no-such-set")


def test_has_checkpoint_only_for_complete_checkpoints(job_factory):
    from edgekd.distill.run import has_checkpoint

    job = job_factory("sft")
    assert not has_checkpoint(job.output)
    (job.output / "checkpoints" / ".staging" / "checkpoint-2").mkdir(parents=True)
    assert not has_checkpoint(job.output)  # a save cut short is not a checkpoint
    job.overwrite = True
    run(job)
    assert has_checkpoint(job.output)


def test_the_student_keeps_no_hook_of_the_run(job_factory):
    """The visual switch's feature capture is removed from the student when training ends."""
    from edgekd.distill.run import DistillRun

    job = job_factory("switch-kd", overrides={"training.max_steps": 1})
    distill_run = DistillRun(job)
    distill_run.run()
    projector = distill_run.student.model.model.multi_modal_projector
    assert not projector._forward_pre_hooks


@pytest.mark.parametrize("world", [None, "2"])
def test_a_launched_process_ends_without_finalisation_once_saved(world):
    """Under torchrun/accelerate (WORLD_SIZE > 1) `edgekd distill` ends its process with the
    code given, its output flushed, skipping interpreter teardown (where gloo/DeepSpeed threads
    can abort a saved run); a plain process carries on."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world:
        env["WORLD_SIZE"] = world
    code = (
        "import sys; from edgekd.distill.run import leave_launched_process\n"
        "print('saved'); sys.stdout.write('buffered'); leave_launched_process(3)\n"
        "print(' carried on')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if world:
        assert (run.returncode, run.stdout) == (3, "saved\nbuffered")
    else:
        assert (run.returncode, run.stdout) == (0, "saved\nbuffered carried on\n")
