"""The environment snapshot every benchmark and report carries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edgekd.envinfo import contribute, snapshot


def test_snapshot_names_the_machine_and_is_plain_json():
    info = snapshot({"extra": 1})
    assert info["cpu_count"] >= 1 and info["machine"] and info["extra"] == 1
    assert json.loads(json.dumps(info)) == info
    if sys.platform == "linux":
        names = [
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.partition(":")[0].strip() in ("model name", "Model")
        ]
        assert info["cpu"] == (names[0] if names else info["cpu"])


def test_a_backend_contributes_its_facts(monkeypatch):
    from edgekd import envinfo

    monkeypatch.setattr(envinfo, "CONTRIBUTORS", dict(envinfo.CONTRIBUTORS))
    contribute("stand_in", lambda: {"variant": "x"})
    contribute("silent", lambda: None)
    info = snapshot()
    assert info["stand_in"] == {"variant": "x"} and "silent" not in info


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/cpuinfo")
def test_cpu_model_falls_back_when_cpuinfo_has_no_name(monkeypatch, tmp_path):
    from edgekd import envinfo

    real = Path.read_text

    def read_text(self, *args, **kwargs):
        return "processor : 0\n" if str(self) == "/proc/cpuinfo" else real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(envinfo.platform, "processor", lambda: "")
    assert envinfo.cpu_model() is None
