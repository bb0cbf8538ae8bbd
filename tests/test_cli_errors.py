"""Every known class of bad input ends in one line naming the file or option, exit code 2, and
nothing deleted or half-written; bugs keep their traceback. (The CLI runs in this process
through its real entry point, so that faults can be injected.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
from fault_helpers import bomb_png, leftovers, snapshot, write_qa_set


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the tiny checkpoint, free to corrupt."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def _tmpfs(path, options: str):
    """Mount a tmpfs at ``path`` (root only); skip when this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small file system")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return path


@pytest.fixture
def mount(tmp_path):
    mounted = []

    def make(name: str, options: str):
        mounted.append(_tmpfs(tmp_path / name, options))
        return mounted[-1]

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


# ---- images in bench --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("corrupt", "truncated"),
        ("fake", "cannot identify image file"),
        ("bomb", "too large to decode safely"),
        ("name-too-long", "File name too long"),
        ("symlink-loop", "cannot be opened"),
        ("nul-byte", "null byte"),
    ],
)
def test_bench_bad_image_is_one_line(cli, tiny_checkpoint, tmp_path, kind, fragment):
    data = write_qa_set(tmp_path / "eval")
    image = tmp_path / "eval" / "images" / "1.png"
    samples = json.loads(data.read_text())
    if kind == "corrupt":
        _truncate(image, 40)
    elif kind == "fake":
        image.write_text("just text")
    elif kind == "bomb":
        image.write_bytes(bomb_png())
    elif kind == "symlink-loop":
        image.unlink()
        os.symlink("1.png", image)
    else:
        samples[1]["image"] = "images/" + ("x" * 300 if kind == "name-too-long" else "a\0b")
        data.write_text(json.dumps(samples))
    before = snapshot(tmp_path / "eval")
    out = tmp_path / "report"
    result = cli("bench", "--model", tiny_checkpoint, "--data", data, "-o", out, "--no-isolate")
    result.one_line_error("q1", fragment)
    assert not out.exists() and leftovers(out) == []
    assert snapshot(tmp_path / "eval") == before


# ---- checkpoints ------------------------------------------------------------------------------
def _edit_config(ckpt, change) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(change(config)))


def _pickle_only(ckpt) -> None:
    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (os.system, (f"touch {ckpt / 'PWNED'}",))

    (ckpt / "model.safetensors").unlink()
    torch.save({"weight": Payload()}, ckpt / "pytorch_model.bin")


def _truncate(path, drop: int) -> None:
    path.write_bytes(path.read_bytes()[:-drop])


CORRUPTIONS = {
    "truncated": (
        lambda c: _truncate(c / "model.safetensors", 9),
        "model.safetensors' is not a readable safetensors file",
    ),
    "random-bytes": (
        lambda c: (c / "model.safetensors").write_bytes(os.urandom(50_000)),
        "model.safetensors' is not a readable safetensors file",
    ),
    "config-a-list": (
        lambda c: (c / "config.json").write_text("[1, 2]"),
        "config.json' is not a JSON object",
    ),
    "sub-config-a-number": (
        lambda c: _edit_config(c, lambda d: {**d, "text_config": 5}),
        "text_config is int, not an object",
    ),
    "size-a-string": (
        lambda c: _edit_config(
            c, lambda d: {**d, "vision_config": {**d["vision_config"], "hidden_size": "64"}}
        ),
        "vision_config.hidden_size is '64', not a positive integer",
    ),
    "larger-than-weights": (
        lambda c: _edit_config(
            c, lambda d: {**d, "text_config": {**d["text_config"], "hidden_size": 128}}
        ),
        "config.json describes 0.45M parameters but the weights hold 0.27M",
    ),
    "text-config-empty": (  # transformers' defaults: a 7B model, never allocated
        lambda c: _edit_config(c, lambda d: {**d, "text_config": {}}),
        "but the weights hold 0.27M",
    ),
    "shapes-differ": (
        lambda c: _edit_config(
            c, lambda d: {**d, "text_config": {**d["text_config"], "intermediate_size": 96}}
        ),
        "config.json does not match the weights",
    ),
    "shard-index-broken": (
        lambda c: (c / "model.safetensors.index.json").write_text('{"weight_map": {}}'),
        "is not a shard index",
    ),
    "tokenizer-broken": (
        lambda c: (c / "tokenizer.json").write_text('{"version": "1.0", "model": {}}'),
        "cannot load the tokenizer or processor",
    ),
    "pickle-only": (_pickle_only, "pytorch_model.bin' is a pickle holding objects other than"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_checkpoint_is_one_line(cli, ckpt, kind):
    corrupt, fragment = CORRUPTIONS[kind]
    corrupt(ckpt)
    line = cli("models", "info", ckpt).one_line_error(str(ckpt), fragment)
    assert "weights_only=False" not in line and not (ckpt / "PWNED").exists()


def test_bad_checkpoint_in_export_leaves_no_output(cli, ckpt, tmp_path):
    CORRUPTIONS["truncated"][0](ckpt)
    out = tmp_path / "art"
    cli("export", ckpt, "--target", "onnx", "-o", out).one_line_error("not a readable safetensors")
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("kind", ["missing", "not-jinja"])
def test_export_without_a_usable_chat_template_fails_first(cli, ckpt, tmp_path, kind):
    template = ckpt / "chat_template.jinja"
    if kind == "missing":
        template.unlink()
    else:
        template.write_text("{% for m in messages %}{{ m.content }")
    out = tmp_path / "art"
    cli("export", ckpt, "--target", "onnx", "-o", out).one_line_error(str(ckpt), "chat template")
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("kind", ["no-chat-template", "text-config-empty"])
def test_bench_checks_checkpoints_before_running(cli, ckpt, tmp_path, kind):
    if kind == "no-chat-template":
        (ckpt / "chat_template.jinja").unlink()
    else:
        CORRUPTIONS[kind][0](ckpt)
    data = write_qa_set(tmp_path / "eval")
    out = tmp_path / "report"
    result = cli("bench", "--model", ckpt, "--data", data, "-o", out, "--no-isolate")
    result.one_line_error(str(ckpt))
    assert "[1/1]" not in result.out  # refused before the first model ran
    assert not out.exists() and leftovers(out) == []  # no empty .report.partial either


def test_export_with_a_bad_eval_set_fails_first(cli, ckpt, tmp_path):
    data = write_qa_set(tmp_path / "eval")
    (tmp_path / "eval" / "images" / "2.png").write_text("no image")
    out = tmp_path / "art"
    cli("export", ckpt, "--target", "onnx", "-o", out, "--eval-data", data).one_line_error(
        "sample 'q2'", "2.png"
    )
    assert not out.exists() and leftovers(out) == []


# ---- outputs ----------------------------------------------------------------------------------
def test_output_that_is_a_file_or_under_one(cli, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    cli("models", "create", "tiny", notes, "--overwrite").one_line_error(str(notes), "file")
    cli("models", "create", "tiny", notes / "m").one_line_error(str(notes), "which is a file")
    assert notes.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_output_on_a_read_only_file_system(cli, mount):
    ro = mount("ro", "ro,size=64k")
    cli("models", "create", "tiny", ro / "m").one_line_error(str(ro), "read-only file system")


def test_output_on_a_full_file_system_says_the_disk_is_full(cli, mount):
    full = mount("full", "size=256k")
    out = full / "m"
    cli("models", "create", "tiny", out).one_line_error(str(out), "the disk is full")
    assert os.listdir(full) == []


@pytest.mark.parametrize(
    "fault",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    ],
)
def test_full_disk_mid_write_keeps_the_old_output(cli, tmp_path, monkeypatch, fault):
    from edgekd import io
    from edgekd.models.vlm import VLM

    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def write_until_full(self, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise fault

    monkeypatch.setattr(VLM, "write", write_until_full)
    monkeypatch.setattr(io, "_free_bytes", lambda path: 0)  # what a full disk reports
    cli("models", "create", "tiny", out, "--overwrite").one_line_error(str(out), "disk is full")
    assert sorted(os.listdir(out)) == ["old.txt"] and leftovers(out) == []


def test_permission_denied_names_the_file(cli, tmp_path, monkeypatch):
    from edgekd.models.vlm import VLM

    def refused(self, folder):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / "config.json"))

    monkeypatch.setattr(VLM, "write", refused)
    out = tmp_path / "m"
    cli("models", "create", "tiny", out).one_line_error("config.json", "Permission denied")
    assert not out.exists() and leftovers(out) == []


def test_export_onto_its_source_is_refused(cli, ckpt):
    before = snapshot(ckpt)
    cli("export", ckpt, "--target", "onnx", "-o", ckpt, "--overwrite").one_line_error(
        f"output '{ckpt}' is the input"
    )
    assert snapshot(ckpt) == before


def test_bench_onto_its_model_or_eval_set_is_refused(cli, ckpt, tmp_path):
    data = write_qa_set(tmp_path / "eval")
    before = snapshot(tmp_path)
    for out, fragment in ((ckpt, "is the input"), (tmp_path / "eval", "contains the input")):
        cli(
            "bench", "--model", ckpt, "--data", data, "-o", out, "--overwrite", "--no-isolate"
        ).one_line_error(str(out), fragment)
    assert snapshot(tmp_path) == before


def test_models_create_into_the_working_directory_is_refused(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    cli("models", "create", "tiny", ".", "--overwrite").one_line_error("working directory")
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]  # no hidden temporary model either


def test_second_writer_gets_one_line_naming_the_holder(cli, tmp_path):
    from edgekd.outputs import output_lock

    out = tmp_path / "m"
    with output_lock(out):
        cli("models", "create", "tiny", out).one_line_error(str(out), f"pid {os.getpid()}")
    assert not out.exists()


def test_outputs_honour_the_umask(cli, tmp_path):
    old = os.umask(0o027)
    try:
        assert cli("models", "create", "tiny", tmp_path / "m").code == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o750
    assert set(modes.values()) == {0o640}, modes  # model.safetensors too (written 0600)


# ---- options ----------------------------------------------------------------------------------
def test_malformed_set_and_option_values(cli, tiny_checkpoint, tmp_path):
    run = ("distill", "--student", "tiny:tiny", "--method", "sft", "-o", tmp_path / "r")
    cli(*run, "--set", "training.max_steps=[1,").one_line_error("--set", "not valid YAML")
    cli(*run, "--set", "training.max_steps").one_line_error("--set", "expected KEY=VALUE")
    cli(*run, "--set", "training..x=1").one_line_error("--set", "expected KEY=VALUE")
    cli(
        "export", tiny_checkpoint, "--target", "onnx", "-o", tmp_path / "a", "--option", "k={"
    ).one_line_error("--option 'k={'", "not valid YAML")
    cli(*run, "--max-steps", "ten").one_line_error("--max-steps")
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "flags,fragments",
    [
        (("--logging-steps", "0"), ("--logging-steps must be at least 1",)),
        (("--save-steps", "-5"), ("--save-steps must be at least 1",)),
        (("--vsd-adapter", "cubic"), ("--vsd-adapter 'cubic'", "none, linear")),
        (("--device", "tpu"), ("--device 'tpu'", "auto, cpu, cuda")),
        (("--set", "distributed.strategy=fsdp"), ("distributed.strategy fsdp", "CUDA")),
        (
            ("--set", "distributed.strategy=ddp", "--set", "distributed.num_processes=2",
             "--per-device-batch-size", "16"),  # fmt: skip
            ("num_processes is 2", "torchrun --nproc_per_node 2"),
        ),
    ],
)
def test_bad_distill_settings(cli, tmp_path, flags, fragments):
    out = tmp_path / "r"
    base = ("distill", "--student", "tiny:tiny", "--method", "sft", "--device", "cpu")
    cli(*base, "-o", out, "--global-batch-size", "32", *flags).one_line_error(*fragments)
    assert not out.exists()


def test_deepspeed_strategy_without_the_package_names_it(cli, tmp_path, monkeypatch):
    import importlib.util

    from edgekd.distill import setup

    real = importlib.util.find_spec
    monkeypatch.setattr(
        setup.importlib.util, "find_spec", lambda name: None if name == "deepspeed" else real(name)
    )
    cli(
        "distill", "--student", "tiny:tiny", "--method", "sft", "--device", "cpu",
        "-o", tmp_path / "r", "--set", "distributed.strategy=deepspeed-zero3",
    ).one_line_error("deepspeed-zero3", "pip install deepspeed")  # fmt: skip


# ---- smaller classes --------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["./missing-student", "runs/typo", "student-typo"])
def test_local_looking_path_fails_at_once_without_the_hub(cli, tmp_path, monkeypatch, path):
    from transformers import AutoConfig, PretrainedConfig

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path went to the hub")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(PretrainedConfig, "get_config_dict", no_hub)
    monkeypatch.setattr(AutoConfig, "from_pretrained", no_hub)
    cli("models", "info", path).one_line_error(f"checkpoint '{path}' not found")
    cli(
        "distill", "--method", "sft", "--student", path, "--device", "cpu", "-o", "r"
    ).one_line_error(path, "not found")
    assert sorted(os.listdir(tmp_path)) == ["runs"]


def test_unknown_names_list_the_valid_ones(cli, tiny_checkpoint, tmp_path):
    cli(
        "export", tiny_checkpoint, "--target", "onnx", "-o", tmp_path / "a", "--profile", "nope"
    ).one_line_error("unknown device profile 'nope'", "cpu-x86_64")
    cli("models", "create", "tiny", tmp_path / "m", "--tokenizer", "./gone").one_line_error(
        "'gone' not found"
    )
    assert os.listdir(tmp_path) == []


def test_negative_limits_are_refused(cli, tiny_checkpoint, tmp_path):
    data = write_qa_set(tmp_path / "eval")
    cli("data", "easy-vqa", tmp_path / "d", "--limit-train", "-5").one_line_error("--limit-train")
    cli("data", "fashion-grid", tmp_path / "f", "--seed", "-1").one_line_error("seed must be >= 0")
    cli(
        "bench", "--model", tiny_checkpoint, "--data", data, "-o", tmp_path / "b", "--limit", "-1"
    ).one_line_error("--limit must be at least 1")
    cli(
        "export", tiny_checkpoint, "--target", "onnx", "-o", tmp_path / "a", "--eval-limit", "-3"
    ).one_line_error("--eval-limit")
    assert sorted(os.listdir(tmp_path)) == ["eval"]


@pytest.mark.parametrize("field", ["conversation", "answer"])
def test_empty_answers_are_refused(cli, tiny_checkpoint, tmp_path, field):
    data = write_qa_set(tmp_path / "eval")
    samples = json.loads(data.read_text())
    if field == "answer":
        samples[2]["answer"] = "  "
    else:
        samples[2]["conversations"][1]["value"] = ""
    data.write_text(json.dumps(samples))
    cli(
        "bench", "--model", tiny_checkpoint, "--data", data, "-o", tmp_path / "b", "--no-isolate"
    ).one_line_error("sample 'q2'", "empty")
    assert not (tmp_path / "b").exists()


def test_sigterm_mid_write_removes_the_temporary_output(cli, tmp_path, monkeypatch):
    from edgekd.models.vlm import VLM

    def write_then_terminated(self, folder):
        (folder / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler turns it into an unwinding

    monkeypatch.setattr(VLM, "write", write_then_terminated)
    out = tmp_path / "m"
    result = cli("models", "create", "tiny", out)
    assert result.code == 143 and "terminated" in result.err
    assert not out.exists() and leftovers(out) == []


# ---- the boundary itself ----------------------------------------------------------------------
def test_debug_shows_the_traceback_of_a_user_error(cli, tmp_path, monkeypatch):
    result = cli("--debug", "models", "create", "huge", tmp_path / "m")
    assert result.code == 2 and "Traceback" in result.err
    assert result.err.strip().splitlines()[-1].startswith("error: unknown model size 'huge'")
    monkeypatch.setenv("EDGEKD_DEBUG", "1")
    assert "Traceback" in cli("models", "create", "huge", tmp_path / "m").err


def test_a_bug_keeps_its_traceback(cli, tmp_path, monkeypatch):
    from edgekd.models import factory

    def bug(*args, **kwargs):
        return {}["total"]

    monkeypatch.setattr(factory, "create_checkpoint", bug)
    with pytest.raises(KeyError, match="total"):
        cli("models", "create", "tiny", tmp_path / "m")
