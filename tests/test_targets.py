"""The target registry: a target registered from outside the library runs through export,
load_backend and bench like the built-in ones, and the built-ins are declared once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edgekd import artifact, targets
from edgekd.export import ExportConfig, export
from edgekd.export.parity import Tolerance
from edgekd.targets import DecodeWeights, Target

# ---- a dummy target: its exporter, its backend, its bytes reader ------------------------------
WEIGHTS = "weights/model.safetensors"


class CopyExporter:
    """Stores the checkpoint's files under ``weights/`` and proves them with the shared checks."""

    name, precisions = "copy", ("fp32",)

    def check(self, vlm, config) -> None:
        pass

    def export(self, vlm, config, out: Path) -> dict:
        vlm.save_pretrained(out / "weights", overwrite=True)
        files = sorted(p.relative_to(out).as_posix() for p in (out / "weights").iterdir())
        return {"weights": {"files": files, "precision": "fp32"}}

    def validate(self, vlm, config, out: Path) -> dict:
        from edgekd.export import parity

        backend = CopyBackend(out, verify=False)
        tol = Tolerance(vision_cosine=0.99999, logits_cosine=0.99999, token_exact=True)
        return parity.validate(vlm, backend, config, tol)


def _torch_backend_class():
    from edgekd.runtime.torch import TorchBackend

    return TorchBackend


class CopyBackend:
    """The stored checkpoint through the torch backend, after the manifest's checks."""

    def __new__(cls, path, verify: bool = True, **kwargs):
        if verify:
            artifact.verify(path, expect="copy")
        backend = _torch_backend_class()(Path(path) / "weights", device="cpu")
        backend.name = "copy"
        return backend


def open_copy(path, *, device: str, threads: int | None):
    return CopyBackend(path)


def copy_weights(loaded) -> DecodeWeights:
    return DecodeWeights(int(loaded.files[WEIGHTS]["bytes"]), 4, tied_embedding=True)


@pytest.fixture
def copy_target():
    target = targets.register(
        Target(
            name="copy", precisions=("fp32",), files=(WEIGHTS,), extra="dev",
            exporter=CopyExporter, backend=open_copy, decode_weights=copy_weights,
        )
    )  # fmt: skip
    yield target
    targets.TARGETS.pop("copy")


def _eval_set(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    samples = []
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(root / "images" / f"{i}.png")
        samples.append(
            {
                "id": f"q{i}",
                "image": f"images/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is it?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    (root / "eval.json").write_text(json.dumps(samples))
    return root / "eval.json"


def test_a_target_registered_outside_the_library_exports_loads_and_benches(
    copy_target, tiny_checkpoint, tmp_path
):
    from edgekd.runtime import load_backend
    from edgekd.runtime.bench import BenchConfig, run_bench

    out = tmp_path / "copy-artifact"
    manifest = export(
        ExportConfig(
            str(tiny_checkpoint), "copy", "fp32", out, n_parity_prompts=2, max_new_tokens=4
        )
    )
    assert manifest["target"] == "copy" and WEIGHTS in manifest["files"]
    assert manifest["parity"]["passed"] and manifest["parity"]["checks"]["greedy"]["prompts"] == 2
    assert artifact.kind_of(out) == "copy"

    backend = load_backend(out, device="cpu", threads=1, ort_provider="cuda")  # not its option
    assert backend.name == "copy" and backend.generate(None, "Say yes.", 3).token_ids

    report = run_bench(
        BenchConfig(
            models=[str(out)], data=_eval_set(tmp_path / "eval"), output=tmp_path / "bench",
            runs=1, warmup=0, speed_tokens=2, limit=2, max_new_tokens=2, isolate=False,
        ),
        show_table=False,
    )  # fmt: skip
    (result,) = report["results"]
    assert result["kind"] == "copy" and result["accuracy"]["n"] == 2
    moved = result["roofline"]["bytes_per_token"]
    assert moved["format"] == "copy" and moved["weights"] == manifest["files"][WEIGHTS]["bytes"]


def test_an_artifact_is_exactly_its_manifest(copy_target, tiny_checkpoint, tmp_path):
    out = tmp_path / "a"
    export(ExportConfig(str(tiny_checkpoint), "copy", "fp32", out, n_parity_prompts=1))
    (out / "weights" / "chat_template.json").write_text("{}")  # a file a loader would read
    with pytest.raises(artifact.ArtifactError, match="chat_template.json' is not listed"):
        artifact.verify(out)
    (out / "weights" / "chat_template.json").unlink()
    os.mkfifo(out / "weights" / "extra.json")  # not a regular file: refused all the same
    with pytest.raises(artifact.ArtifactError, match="extra.json' is not listed"):
        artifact.verify(out)


def _pre(manifest: dict, **changes) -> dict:
    return {**manifest, "preprocessing": {**manifest["preprocessing"], **changes}}


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: [], "expected a JSON object, got list"),
        (lambda m: 3, "expected a JSON object, got int"),
        (lambda m: None, "expected a JSON object, got NoneType"),
        (lambda m: {**m, "files": None}, "'files' has the wrong type"),
        (
            lambda m: {k: v for k, v in m.items() if k != "preprocessing"},
            "'preprocessing' is missing",
        ),
        (lambda m: {**m, "target": "onnx"}, "a onnx artifact holds 'vision_encoder.onnx'"),
        (lambda m: {**m, "target": "nope"}, "target 'nope' is not one of"),
        (lambda m: {**m, "files": {"../x": m["files"][WEIGHTS]}}, "'../x' leaves the artifact"),
        (lambda m: {**m, "text_dims": {**m["text_dims"], "layers": "2"}}, "text_dims.layers"),
        (lambda m: {**m, "version": 1}, "version 1 (this edgekd reads 2); re-export"),
        (lambda m: _pre(m, image_size=[64]), "image_size must be [height, width]"),
        (lambda m: _pre(m, image_size=["a", "b"]), "image_size must be [height, width]"),
        (lambda m: _pre(m, image_mean=["x"]), "image_mean must be a list of finite numbers"),
        (lambda m: _pre(m, rescale_factor=float("nan")), "rescale_factor must be a finite"),
        (lambda m: _pre(m, eos_token_ids=["x"]), "must be token ids below text_dims.vocab"),
        (lambda m: _pre(m, image_token_id=10**9), "must be token ids below text_dims.vocab"),
        (lambda m: _pre(m, image_tokens_per_image=-5), "image_tokens_per_image must be"),
        (lambda m: _pre(m, chat_template="{% for x in %}"), "not a valid Jinja template"),
    ],
)
def test_a_malformed_manifest_is_one_line(copy_target, tiny_checkpoint, tmp_path, change, message):
    out = tmp_path / "a"
    export(ExportConfig(str(tiny_checkpoint), "copy", "fp32", out, n_parity_prompts=1))
    raw = json.loads((out / artifact.MANIFEST).read_text())
    (out / artifact.MANIFEST).write_text(json.dumps(change(raw)))
    with pytest.raises(artifact.ArtifactError) as err:
        artifact.load(out)
    assert message in str(err.value) and "\n" not in str(err.value)
    shutil.rmtree(out)


def test_a_number_too_long_to_read_is_one_line(copy_target, tiny_checkpoint, tmp_path):
    out = tmp_path / "a"
    export(ExportConfig(str(tiny_checkpoint), "copy", "fp32", out, n_parity_prompts=1))
    text = (out / artifact.MANIFEST).read_text()
    (out / artifact.MANIFEST).write_text(text.replace('"version": 2', '"version": ' + "9" * 5000))
    with pytest.raises(artifact.ArtifactError, match="manifest.json: cannot read it"):
        artifact.load(out)


def test_builtin_targets_are_declared_once():
    from edgekd.export import get_exporter

    assert targets.names() == ("gguf", "onnx", "tensorrt")
    for name in targets.names():
        exporter = get_exporter(name)
        assert exporter.name == name and exporter.precisions == targets.get(name).precisions
    with pytest.raises(targets.TargetError, match="valid: gguf, onnx, tensorrt"):
        targets.get("openvino")


def test_profile_schema_takes_registered_targets(copy_target):
    from edgekd.profiles import ProfileError, load_device_profile

    assert load_device_profile("cpu-x86_64", {"preferred_target": "copy"}).preferred_target
    with pytest.raises(ProfileError, match="unknown target 'openvino'; valid: copy, gguf, onnx"):
        load_device_profile("cpu-x86_64", {"preferred_target": "openvino"})


def test_a_device_profile_picks_the_export_precision_it_prefers(cli, tiny_checkpoint, tmp_path):
    """``edgekd export --profile P`` without ``--precision`` exports the profile's
    preferred_precision, in the target's own name for it (cpu-x86_64 prefers int8: q8_0)."""
    pytest.importorskip("llama_cpp")
    from edgekd.profiles import list_profiles, load_device_profile

    for name in list_profiles("device"):
        preferred = load_device_profile(name).preferred_precision
        for target in targets.TARGETS.values():
            chosen = target.precision_for(preferred)
            assert chosen is None or chosen in target.precisions, (name, target.name, chosen)
    assert targets.get("gguf").precision_for("fp16") == "f16"
    assert targets.get("onnx").precision_for("bf16") is None  # not an onnx precision: default
    out = tmp_path / "gguf"
    result = cli("export", str(tiny_checkpoint), "--target", "gguf", "--profile", "cpu-x86_64",
                 "-o", str(out), "--parity-prompts", "1")  # fmt: skip
    assert result.code == 0, result.err
    assert "precision q8_0: cpu-x86_64's preferred (int8)" in result.out
    assert json.loads((out / "manifest.json").read_text())["precision"] == "q8_0"
