"""Every shipped profile validates; a broken one gets one line naming the file and the keys."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from edgekd.errors import EdgeKDError
from edgekd.profiles import (
    DeviceProfile,
    LossConfig,
    ProfileError,
    RecipeProfile,
    list_profiles,
    load_device_profile,
    load_recipe,
    profile_to_dict,
    profile_to_yaml,
)

PACKAGE = resources.files("edgekd.profiles")
DEVICE_FILES = sorted(p.name for p in (PACKAGE / "devices").iterdir() if p.name.endswith(".yaml"))
RECIPE_FILES = sorted(p.name for p in (PACKAGE / "recipes").iterdir() if p.name.endswith(".yaml"))
EXPECTED_DEVICES = {
    "jetson-orin-nano-8gb",
    "jetson-orin-nx-16gb",
    "jetson-agx-orin-64gb",
    "rtx-4090",
    "a100-80gb",
    "h100-80gb",
    "cpu-x86_64",
}

VALID_DEVICE = {
    "name": "box",
    "description": "a test device",
    "kind": "gpu",
    "arch": "x86_64",
    "memory_gb": 16,
    "memory_bandwidth_gbps": 500,
    "peak_tflops": {"fp16": 100, "int8": 200},
    "supported_precisions": ["fp32", "fp16", "int8"],
    "preferred_precision": "fp16",
    "preferred_target": "tensorrt",
}
VALID_RECIPE = {
    "name": "demo",
    "description": "a test recipe",
    "teacher": "tiny:small",
    "student": "tiny:tiny",
    "method": "switch-kd",
    "training": {
        "global_batch_size": 16,
        "per_device_batch_size": 4,
        "learning_rate": 1e-3,
        "max_length": 64,
    },
    "data": {"dataset": "easy-vqa"},
}


def write(tmp_path: Path, name: str, data: dict | str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(load, *args, **kwargs) -> str:
    with pytest.raises(ProfileError) as info:
        load(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- shipped profiles ---------------------------------------------------------------------------


def test_profile_not_utf8_or_infinite_is_one_line(tmp_path):
    from edgekd.profiles import ProfileError

    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ProfileError, match="not UTF-8 text"):
        load_device_profile(tmp_path / "bad.yaml")
    with pytest.raises(ProfileError, match="memory_gb"):
        load_device_profile("jetson-orin-nano-8gb", {"memory_gb": float("inf")})


def test_shipped_profiles_are_listed():
    assert set(list_profiles("device")) == EXPECTED_DEVICES
    assert list_profiles("device") == [f[: -len(".yaml")] for f in DEVICE_FILES]
    assert list_profiles("recipe") == ["easyvqa-cpu", "tinyllava-3b-to-0.5b"]
    assert list_profiles("recipe") == [f[: -len(".yaml")] for f in RECIPE_FILES]


@pytest.mark.parametrize("filename", DEVICE_FILES)
def test_shipped_device_validates(filename: str):
    stem = filename[: -len(".yaml")]
    profile = load_device_profile(stem)
    assert profile.name == stem
    assert profile.notes and profile.description
    assert (PACKAGE / "devices" / filename).read_text().startswith("#")  # sources header
    # Peaks stay in the order every NVIDIA or x86 data sheet gives: int8 >= fp16 >= fp32.
    modes = [None] + [m.name for m in profile.power_modes]
    for mode in modes:
        fp32, fp16, int8 = (profile.peak(p, mode) for p in ("fp32", "fp16", "int8"))
        assert fp32 and int8 and int8 >= (fp16 or fp32) >= fp32
    assert DeviceProfile.model_validate(profile_to_dict(profile)) == profile


@pytest.mark.parametrize("filename", RECIPE_FILES)
def test_shipped_recipe_validates(filename: str):
    stem = filename[: -len(".yaml")]
    recipe = load_recipe(stem)
    assert recipe.name == stem
    assert (PACKAGE / "recipes" / filename).read_text().startswith("#")
    train = recipe.training
    processes = recipe.distributed.num_processes
    steps = train.gradient_accumulation_steps
    assert train.per_device_batch_size * processes * steps == train.global_batch_size
    assert RecipeProfile.model_validate(yaml.safe_load(profile_to_yaml(recipe))) == recipe


def test_switch_kd_recipe_values():
    recipe = load_recipe("tinyllava-3b-to-0.5b")
    assert recipe.method == "switch-kd" and recipe.training.train_vision_tower is True
    assert recipe.training.gradient_accumulation_steps == 4  # 128 / (4 x 8)
    assert (recipe.training.learning_rate, recipe.distributed.strategy) == (2e-5, "deepspeed-zero3")
    assert "REPLACE" in recipe.teacher and "REPLACE" in recipe.student
    cpu = load_recipe("easyvqa-cpu")
    assert (cpu.teacher, cpu.student, cpu.data.dataset) == ("tiny:small", "tiny:tiny", "easy-vqa")
    assert not cpu.training.bf16 and cpu.distributed.strategy == "none"


def test_jetson_power_modes_override_default_figures():
    nano = load_device_profile("jetson-orin-nano-8gb")
    assert nano.unified_memory and nano.jetson.module == "NVIDIA Jetson Orin Nano"
    assert nano.default_power_mode == "15W" and nano.bandwidth_gbps() == 68
    assert nano.bandwidth_gbps("MAXN_SUPER") == 102.4 and nano.peak("int8", "MAXN_SUPER") == 33.4
    assert nano.peak("int8", "25W") == nano.peak("int8")  # no override: the profile's figure
    assert "valid: 15W, 25W, MAXN_SUPER, 7W" in error_of(nano.power_mode, "MAXN")


# --- errors -------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_ones():
    message = error_of(load_device_profile, "jetson-nano")
    valid = ", ".join(list_profiles("device"))
    assert message == f"unknown device profile 'jetson-nano'; valid: {valid}"
    assert "valid: easyvqa-cpu, tinyllava-3b-to-0.5b" in error_of(load_recipe, "nope")
    assert "valid: device, recipe" in error_of(list_profiles, "gadget")
    assert issubclass(ProfileError, EdgeKDError) and issubclass(ProfileError, ValueError)


def test_missing_file():
    assert "not found" in error_of(load_device_profile, "/nonexistent/box.yaml")


def test_broken_yaml_gives_file_and_line(tmp_path: Path):
    path = write(tmp_path, "box", "name: box\nkind: gpu\npeak_tflops: [fp16\nnotes: x\n")
    message = error_of(load_device_profile, path)
    assert message.startswith(f"{path}:4:") and "invalid YAML" in message
    duplicate = write(tmp_path, "dup", "name: dup\nkind: gpu\nkind: cpu\n")
    message = error_of(load_device_profile, duplicate)
    assert message == f"{duplicate}:3:1: invalid YAML: duplicate key 'kind'"
    assert "expected a mapping" in error_of(load_device_profile, write(tmp_path, "empty", ""))


def test_schema_errors_reported_at_once_in_one_line(tmp_path: Path):
    data = dict(VALID_DEVICE, name="other", memory_gb=-1, kind="tpu", colour="red")
    data["power_modes"] = [{"name": "a"}]
    path = write(tmp_path, "box", data)
    message = error_of(load_device_profile, path)
    assert message.startswith(f"{path}: ")
    for part in (
        "kind: must be 'jetson', 'gpu' or 'cpu', got 'tpu'",
        "memory_gb: must be > 0, got -1",
        "power_modes.0.watts: field required",
        "colour: unknown key; valid keys: name, description,",
        "name: must equal the file name 'box', got 'other'",
    ):
        assert part in message


def test_cross_field_errors_reported_at_once(tmp_path: Path):
    data = dict(VALID_DEVICE, kind="jetson", preferred_precision="bf16", default_power_mode="MAXN")
    data["tensorrt"] = {
        "workspace_gb": 1,
        "max_batch": 1,
        "opt_seq_len": 4096,
        "max_seq_len": 2048,
        "max_past_len": 1,
    }
    message = error_of(load_device_profile, write(tmp_path, "box", data))
    for part in (
        "jetson: required when kind is 'jetson'",
        "arch: Jetson boards are 'aarch64'",
        "preferred_precision: 'bf16' is not in supported_precisions (fp32, fp16, int8)",
        "default_power_mode: 'MAXN' is not a power mode",
        "tensorrt.opt_seq_len: must be <= max_seq_len (2048), got 4096",
    ):
        assert part in message


def test_path_loads(tmp_path: Path):
    copy = tmp_path / "jetson-orin-nano-8gb.yaml"
    with resources.as_file(PACKAGE / "devices" / copy.name) as shipped:
        shutil.copy(shipped, copy)
    by_path, by_text = load_device_profile(copy), load_device_profile(str(copy))
    assert by_path == by_text == load_device_profile(copy.stem)
    recipe = load_recipe(write(tmp_path, "demo", VALID_RECIPE))
    assert recipe.training.gradient_accumulation_steps == 4  # 16 / (4 x 1 process)


def test_recipe_k_max_must_not_exceed_top_n(tmp_path: Path):
    data = dict(VALID_RECIPE, loss={"top_n": 32, "k_min": 70, "k_max": 64})
    message = error_of(load_recipe, write(tmp_path, "demo", data))
    assert "loss.k_max: must be >= k_min (70), got 64" in message
    assert "loss.k_max: must be <= top_n (32), got 64" in message
    with pytest.raises(ValidationError, match="must be <= top_n"):
        LossConfig(top_n=32, k_max=64)


def test_recipe_cross_field_rules(tmp_path: Path):
    training = dict(VALID_RECIPE["training"], global_batch_size=10, train_vision_tower=False)
    data = dict(VALID_RECIPE, training=training, distributed={"num_processes": 2})
    message = error_of(load_recipe, write(tmp_path, "demo", data))
    assert "training.train_vision_tower: switch-kd updates the student vision tower" in message
    assert "distributed.num_processes: strategy 'none' runs 1 process, got 2" in message
    kd = dict(VALID_RECIPE, method="kd", teacher=None, loss={"w_vsd": 1.0})
    message = error_of(load_recipe, write(tmp_path, "demo", kd))
    assert "teacher: required for method 'kd'" in message and "loss.w_vsd: method 'kd'" in message
    sft = load_recipe(write(tmp_path, "demo", dict(VALID_RECIPE, method="sft")))
    assert (sft.loss.w_align, sft.loss.w_vsd, sft.training.train_vision_tower) == (0, 0, False)


def test_gradient_accumulation_is_checked(tmp_path: Path):
    training = dict(VALID_RECIPE["training"], gradient_accumulation_steps=3)
    message = error_of(load_recipe, write(tmp_path, "demo", dict(VALID_RECIPE, training=training)))
    assert "training.gradient_accumulation_steps: global_batch_size / (" in message
    assert "= 4, got 3" in message


def test_accelerate_config_is_relative_to_the_recipe(tmp_path: Path):
    data = dict(VALID_RECIPE, distributed={"strategy": "ddp", "accelerate_config": "acc.yaml"})
    path = write(tmp_path, "demo", data)
    assert "distributed.accelerate_config: file not found" in error_of(load_recipe, path)
    (tmp_path / "acc.yaml").write_text("num_processes: 1\n")
    assert load_recipe(path).distributed.accelerate_config == str((tmp_path / "acc.yaml").resolve())


def test_overrides_are_validated_like_file_keys():
    recipe = load_recipe("easyvqa-cpu", overrides={"training.max_steps": 5})
    assert recipe.training.max_steps == 5
    message = error_of(load_recipe, "easyvqa-cpu", overrides={"training.learning_rate": 5})
    assert "training.learning_rate: must be <= 1, got 5" in message


def test_dump_is_yaml_in_schema_order():
    text = profile_to_yaml(load_device_profile("rtx-4090"))
    assert text.startswith("name: rtx-4090\ndescription:")
    assert "jetson" not in yaml.safe_load(text)  # unset optional blocks are left out
