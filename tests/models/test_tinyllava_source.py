"""Where a TinyLLaVA checkpoint comes from: a local directory, or a hub id (its hub-cache snapshot
here, since tests never reach the hub), and the CLI around it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinyllava_replica import write_tinyllava

from edgekd.errors import ModelError
from edgekd.models import VLM
from edgekd.models.tinyllava import convert_tinyllava

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo_id: str, src: Path) -> Path:
    """A huggingface_hub cache holding ``src`` as the ``main`` snapshot of ``repo_id``."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(src, repo / "snapshots" / COMMIT)
    return root


def test_hub_id_converts_from_its_hub_cache_snapshot(tmp_path, monkeypatch):
    from huggingface_hub import constants

    write_tinyllava(tmp_path / "published")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = _hub_cache(
        tmp_path / "hub", "Zhang199/TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path / "published"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    convert_tinyllava("Zhang199/TinyLLaVA-Qwen2-0.5B-SigLIP", tmp_path / "out", dtype="auto")
    manifest = json.loads((tmp_path / "out" / "edgekd_convert.json").read_text())
    assert manifest["source"] == "Zhang199/TinyLLaVA-Qwen2-0.5B-SigLIP"
    assert manifest["source_revision"] == COMMIT
    assert manifest["dtype"] == "float16"
    assert VLM.from_pretrained(tmp_path / "out").num_image_tokens() == 15


def test_hub_id_missing_from_an_offline_cache_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError) as e:
        convert_tinyllava("Zhang199/TinyLLaVA-Qwen2.5-3B-SigLIP", tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message
    assert "cannot get TinyLLaVA checkpoint 'Zhang199/TinyLLaVA-Qwen2.5-3B-SigLIP'" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "hf download Zhang199/TinyLLaVA-Qwen2.5-3B-SigLIP --local-dir DIR" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("src", ["./no/such/ckpt", "/no/such/ckpt", "~/no-such-ckpt", "a/b/c", "x"])
def test_missing_local_looking_path_fails_at_once(tmp_path, monkeypatch, src):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was sent to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(ModelError, match=r"not found: no such directory \(a hub id is org/name\)"):
        convert_tinyllava(src, tmp_path / "out")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgekd", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_cli_unreachable_hub_fails_quickly_in_one_line(tmp_path):
    # a closed local port: the hub is unreachable at once, whatever network the machine has
    env = {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_CACHE": str(tmp_path / "cache"),
    }
    start = time.perf_counter()
    result = _cli("convert", "tinyllava", "Org/TinyLLaVA-Missing", str(tmp_path / "o"), env=env)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot get TinyLLaVA checkpoint 'Org/TinyLLaVA-Missing'" in lines[0]
    assert "the hub cannot be reached" in lines[0]
    assert elapsed < 60, elapsed  # the interpreter start included; no retries or long timeouts
    assert not (tmp_path / "o").exists()


def test_cli_converts_with_dtype(tmp_path):
    base = write_tinyllava(tmp_path / "src")["base"]
    result = _cli(
        "convert",
        "tinyllava",
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        "--dtype",
        "auto",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "float16" in result.stdout and f"<image> id {base + 3}" in result.stdout
    bad = _cli(
        "convert",
        "tinyllava",
        str(tmp_path / "src"),
        str(tmp_path / "o2"),
        "--dtype",
        "fp8",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert bad.returncode == 2 and "unknown dtype 'fp8'" in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.strip()]) == 1
