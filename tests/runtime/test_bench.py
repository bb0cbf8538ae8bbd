"""``edgekd bench`` on tiny models on CPU: the report, its numbers, crash safety, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekd.runtime.bench import BenchConfig, BenchError, agreement, load_items, run_bench

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgekd", *args], capture_output=True, text=True, timeout=600
    )


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> Path:
    """Six single-turn colour/shape questions with their images, LLaVA format."""
    root = tmp_path_factory.mktemp("eval")
    (root / "images").mkdir()
    samples = []
    rng = np.random.default_rng(0)
    for i in range(6):
        color = list(COLORS)[i % 3]
        pixels = np.full((64, 64, 3), COLORS[color], np.uint8)
        pixels[rng.integers(0, 32) :, :20] = 255
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        kind = "color" if i % 2 else "shape"
        question = "What color is the shape?" if kind == "color" else "What shape is it?"
        samples.append(
            {
                "id": f"q{i}",
                "image": f"images/{i}.png",
                "question_type": kind,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": color if kind == "color" else "rectangle"},
                ],
            }
        )
    (root / "eval.json").write_text(json.dumps(samples))
    return root / "eval.json"


def _config(models, eval_set, out, **kw) -> BenchConfig:
    base = dict(
        runs=3,
        warmup=1,
        speed_tokens=4,
        max_new_tokens=4,
        threads=1,
        idle_s=0.0,
        isolate=False,
        profile="cpu-x86_64",
    )
    base.update(kw)
    return BenchConfig(models=[str(m) for m in models], data=eval_set, output=out, **base)


@pytest.fixture(scope="module")
def report(
    contrast_checkpoint, contrast_onnx_artifact, gguf_f32_artifact, eval_set, tmp_path_factory
):
    out = tmp_path_factory.mktemp("bench") / "report"
    config = _config(
        [contrast_onnx_artifact, gguf_f32_artifact],
        eval_set,
        out,
        teacher=str(contrast_checkpoint),
        names=["onnx-fp32", "gguf-f32"],
    )
    return run_bench(config), out


def test_report_files_and_numbers(report):
    result, out = report
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in saved["results"]] == ["teacher", "onnx-fp32", "gguf-f32"]
    assert [r["kind"] for r in saved["results"]] == ["torch", "onnx", "gguf"]
    env = saved["environment"]
    assert env["profile"] == "cpu-x86_64" and env["bandwidth_gbps"] > 0 and "versions" in env
    for r in saved["results"]:
        lat = r["latency"]
        assert lat["runs"] == 3 and lat["new_tokens"] == 4
        for key in ("vision_ms", "prefill_ms", "ttft_ms", "e2e_ms"):
            p = lat[key]
            assert 0 < p["min"] <= p["p50"] <= p["p90"] <= p["p99"], (r["name"], key)
        assert lat["ttft_ms"]["p50"] > lat["vision_ms"]["p50"]
        assert lat["decode_tok_s"]["p50"] > 0
        assert r["memory"]["peak_rss_mb"] >= r["memory"]["rss_before_load_mb"] > 0
        assert r["power"]["source"] is None and "RAPL" in r["power"]["why"]
        acc = r["accuracy"]
        assert acc["n"] == 6 and set(acc["per_type"]) == {"color", "shape"}
        assert 0 <= acc["normalized_match"] <= 1 and len(acc["predictions"]) == 6
        roof = r["roofline"]
        assert roof["bytes_per_token"]["total"] > 0 and roof["tok_s"] > 0
        assert roof["fraction"] == pytest.approx(lat["decode_tok_s"]["p50"] / roof["tok_s"])
        # prefill: the prompt's FLOPs at the GEMM throughput measured in this run
        pre = r["prefill_roofline"]
        assert pre["arithmetic"] == "fp32" and pre["gemm_gflops"] > 0
        assert pre["flops"]["total"] > pre["flops"]["linear"] > 0
        assert pre["roofline_ms"] == pytest.approx(pre["flops"]["total"] / pre["gemm_gflops"] / 1e6)
        assert pre["over_roofline"] == pytest.approx(lat["prefill_ms"]["p50"] / pre["roofline_ms"])
    teacher, onnx, gguf = saved["results"]
    assert teacher["agreement_with_teacher"] == 1.0
    # fp32 exports of the teacher's own weights answer exactly as it does
    assert onnx["agreement_with_teacher"] == 1.0
    assert gguf["agreement_with_teacher"] == 1.0
    answers = {p["prediction"] for p in teacher["accuracy"]["predictions"]}
    assert len(answers) > 1  # answers depend on the input: agreement is not trivially 1


def test_markdown_table(report):
    _, out = report
    md = (out / "bench.md").read_text()
    assert "| model | backend | precision | vision ms | prefill ms (x roofline) | TTFT ms |" in md
    for name in ("teacher", "onnx-fp32", "gguf-f32"):
        assert f"| {name} |" in md
    assert "## Accuracy per question type" in md and "| color | shape |" in md


def test_agreement_counts_identical_answers():
    teacher = [{"id": "a", "prediction": "red"}, {"id": "b", "prediction": "circle"}]
    model = [{"id": "a", "prediction": " red"}, {"id": "b", "prediction": "square"}]
    assert agreement(model, teacher) == 0.5


def test_cli_bench_isolated_measures_peak_memory(
    contrast_checkpoint, contrast_onnx_artifact, eval_set, tmp_path
):
    out = tmp_path / "cli"
    result = _cli(
        "bench", "--model", str(contrast_onnx_artifact), "--teacher", str(contrast_checkpoint),
        "--data", str(eval_set), "--output", str(out), "--runs", "2", "--warmup", "0",
        "--speed-tokens", "3", "--limit", "3", "--threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "edgekd bench" in result.stdout and "report:" in result.stdout
    saved = json.loads((out / "bench.json").read_text())
    for r in saved["results"]:
        assert r["memory"]["peak_rss_mb"] >= r["memory"]["rss_before_load_mb"] > 0
    # each process has its own peak (not the parent's, which exec would carry in ru_maxrss)
    assert len({r["memory"]["peak_rss_mb"] for r in saved["results"]}) == 2
    assert "GPU" not in result.stdout and "power" not in result.stdout  # nothing measured
    env = saved["environment"]
    assert env["profile"] is None and env["bandwidth_source"].startswith("measured")
    assert env["bandwidth_gbps"] > 0
    _one_line_error(
        _cli("bench", "--model", str(contrast_onnx_artifact), "--data", str(eval_set),
             "--output", str(out)),
        "already exists", "--overwrite",
    )  # fmt: skip


def test_a_crash_keeps_finished_models_for_the_rerun(
    contrast_checkpoint, contrast_onnx_artifact, eval_set, tmp_path, monkeypatch
):
    import edgekd.runtime.bench as bench

    out = tmp_path / "crash"
    config = _config([contrast_onnx_artifact], eval_set, out, teacher=str(contrast_checkpoint))
    real = bench.bench_model

    def dies_on_the_artifact(spec, settings, items):
        if spec["kind"] == "onnx":
            raise BenchError("simulated crash")
        return real(spec, settings, items)

    monkeypatch.setattr(bench, "bench_model", dies_on_the_artifact)
    with pytest.raises(BenchError):
        run_bench(config)
    assert not out.exists()
    kept = list(out.with_name(f".{out.name}.partial").glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["role"] == "teacher"

    calls = []
    monkeypatch.setattr(bench, "bench_model", lambda *a: calls.append(a[0]["kind"]) or real(*a))
    run_bench(config)
    assert calls == ["onnx"]  # the teacher was reused, not measured again
    assert not out.with_name(f".{out.name}.partial").exists()
    assert len(json.loads((out / "bench.json").read_text())["results"]) == 2


# ---- bad input: one line, non-zero exit -----------------------------------------------------
def test_tampered_artifact_names_the_file(contrast_onnx_artifact, eval_set, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(contrast_onnx_artifact, copy)
    with open(copy / "embed_tokens.onnx", "ab") as f:
        f.write(b"\0")
    _one_line_error(
        _cli(
            "bench", "--model", str(copy), "--data", str(eval_set), "--output", str(tmp_path / "o")
        ),
        "embed_tokens.onnx",
    )
    assert not (tmp_path / "o").exists()


def test_missing_images_are_one_line(contrast_onnx_artifact, eval_set, tmp_path):
    data = tmp_path / "eval.json"
    data.write_text(eval_set.read_text())  # images/ is not next to this copy
    _one_line_error(
        _cli("bench", "--model", str(contrast_onnx_artifact), "--data", str(data),
             "--output", str(tmp_path / "o")),
        "6 images missing",
    )  # fmt: skip


def test_model_that_does_not_fit_says_by_how_much(contrast_onnx_artifact, eval_set, tmp_path):
    line = _one_line_error(
        _cli("bench", "--model", str(contrast_onnx_artifact), "--data", str(eval_set),
             "--profile", "jetson-orin-nano-8gb", "--context", "100000000",
             "--output", str(tmp_path / "o")),
        "does not fit by", "GB", "jetson-orin-nano-8gb",
    )  # fmt: skip
    assert "usable" in line


def test_bad_options_are_reported_together(eval_set, tmp_path):
    _one_line_error(
        _cli("bench", "--model", str(tmp_path / "nope"), "--data", str(eval_set), "--runs", "0",
             "--device", "tpu", "--ort-provider", "xla", "--output", str(tmp_path / "o")),
        "--device 'tpu'", "--runs must be at least 1", "nope", "--ort-provider 'xla'",
    )  # fmt: skip


def test_jetson_device_off_a_jetson(contrast_onnx_artifact, eval_set, tmp_path):
    if Path("/etc/nv_tegra_release").exists():
        pytest.skip("this host is a Jetson")
    _one_line_error(
        _cli("bench", "--model", str(contrast_onnx_artifact), "--data", str(eval_set),
             "--device", "jetson", "--output", str(tmp_path / "o")),
        "not an NVIDIA Jetson",
    )  # fmt: skip


def test_cuda_device_without_a_gpu(contrast_onnx_artifact, eval_set, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA GPU")
    _one_line_error(
        _cli("bench", "--model", str(contrast_onnx_artifact), "--data", str(eval_set),
             "--device", "cuda", "--output", str(tmp_path / "o")),
        "--device cuda", "use --device cpu",
    )  # fmt: skip


def test_backend_not_installed_names_the_extra(
    contrast_onnx_artifact, gguf_f32_artifact, monkeypatch
):
    import importlib.util

    from edgekd.runtime import load_backend
    from edgekd.runtime.base import BackendError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else find_spec(n, *a)
    )
    with pytest.raises(BackendError, match=r"pip install 'edgekd\[onnx\]'"):
        load_backend(contrast_onnx_artifact)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(BackendError, match="llama-cpp-python"):
        load_backend(gguf_f32_artifact)


def test_tensorrt_artifacts_need_a_gpu(tmp_path):
    from edgekd.runtime import load_backend
    from edgekd.runtime.base import BackendError

    (tmp_path / "manifest.json").write_text(json.dumps({"target": "tensorrt"}))
    with pytest.raises(BackendError, match="--device cuda or --device jetson"):
        load_backend(tmp_path, device="cpu", kind="tensorrt")


def test_multi_turn_samples_are_refused(eval_set, tmp_path):
    from edgekd.errors import DataError

    samples = json.loads(eval_set.read_text())
    samples[2]["conversations"] += [
        {"from": "human", "value": "And?"},
        {"from": "gpt", "value": "no"},
    ]
    data = eval_set.parent / "multi.json"
    data.write_text(json.dumps(samples))
    with pytest.raises(DataError, match="sample 'q2'.*single-turn"):
        load_items(data)
    items = load_items(eval_set, limit=2)
    assert [it["reference"] for it in items] == ["rectangle", "blue"]
    assert items[1]["prompt"] == "<image>\nWhat color is the shape?"
    assert Path(items[1]["image"]).is_file() and items[1]["question_type"] == "color"


def test_gpu_providers_missing_here_name_what_to_install(contrast_onnx_artifact):
    import onnxruntime as ort

    from edgekd.runtime import load_backend
    from edgekd.runtime.base import BackendError

    for provider, full in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "Tensorrt")):
        if any(p.startswith(full) for p in ort.get_available_providers()):
            continue
        with pytest.raises(BackendError, match=f"{full}.*onnxruntime-gpu"):
            load_backend(contrast_onnx_artifact, device="cuda", ort_provider=provider)


def test_jetson_target_uses_the_detected_board_and_its_power_mode(eval_set, monkeypatch):
    import edgekd.runtime.devices as devices
    from edgekd.runtime.bench_host import resolve_host

    board = Path(__file__).parent / "fixtures" / "jetson" / "orin-nano-8gb"
    outputs = {"nvpmodel": "NV Power Mode: MAXN_SUPER\n2\n", "jetson_clocks": None}
    detected = devices.detect_jetson(board, runner=lambda cmd: outputs.get(cmd[0]))
    monkeypatch.setattr(devices, "require_jetson", lambda *a, **k: detected)
    target = resolve_host(BenchConfig(models=["m"], data=eval_set, output="o", device="jetson"))
    assert target.profile.name == "jetson-orin-nano-8gb"
    assert target.power_mode == "MAXN_SUPER" and target.bandwidth_gbps == 102.4  # Super mode
    assert target.jetson["l4t"] == "36.4.3" and target.jetson["power_mode_id"] == 2
    assert "MAXN_SUPER" in target.bandwidth_source
    # the user's --power-mode wins for the roofline
    config = BenchConfig(models=["m"], data=eval_set, output="o", device="jetson", power_mode="15W")
    assert resolve_host(config).bandwidth_gbps == 68


def test_an_unknown_power_mode_is_refused_not_ignored(eval_set):
    from edgekd.profiles.schema import ProfileError
    from edgekd.runtime.bench_host import resolve_host

    def config(**kw):
        return BenchConfig(models=["m"], data=eval_set, output="o", **kw)

    with pytest.raises(ProfileError, match="unknown power mode 'TURBO'.*MAXN_SUPER"):
        resolve_host(config(profile="jetson-orin-nano-8gb", power_mode="TURBO"))
    with pytest.raises(BenchError, match="--power-mode needs a device profile"):
        resolve_host(config(power_mode="15W"))
    assert (
        resolve_host(config(profile="jetson-orin-nano-8gb", power_mode="25W")).bandwidth_gbps
        == 102.4
    )


def test_power_and_energy_per_token_from_the_meter(
    contrast_onnx_artifact, eval_set, tmp_path, monkeypatch
):
    import time

    import edgekd.runtime.power as power

    class SteadyMeter:  # 5 W, sampled every 10 ms
        source = "steady"

        def start(self):
            self.t0 = time.perf_counter()

        def stop(self):
            t1 = time.perf_counter()
            n = int((t1 - self.t0) / 0.01) + 2
            samples = [(self.t0 + k * (t1 - self.t0) / (n - 1), 5.0) for k in range(n)]
            return power.PowerTrace("steady", samples, peak_memory_mb=123.0, rails=["IN"])

    monkeypatch.setattr(power, "power_meter", lambda device: (SteadyMeter(), ""))
    out = tmp_path / "powered"
    run_bench(_config([contrast_onnx_artifact], eval_set, out, idle_s=0.05, names=["m"]))
    r = json.loads((out / "bench.json").read_text())["results"][0]
    p = r["power"]
    assert p["source"] == "steady" and p["rails"] == ["IN"]
    assert p["mean_w"] == pytest.approx(5.0) and p["idle_w"] == pytest.approx(5.0)
    e2e_s = sum([r["latency"]["e2e_ms"]["mean"]] * r["latency"]["runs"]) / 1e3
    tokens = r["latency"]["runs"] * r["latency"]["new_tokens"]
    assert p["energy_per_token_j"] == pytest.approx(5.0 * e2e_s / tokens, rel=0.2)
    row = next(line for line in (out / "bench.md").read_text().splitlines() if "| m |" in line)
    assert f"| {p['mean_w']:.1f} | {1e3 * p['energy_per_token_j']:.1f} |" in row
