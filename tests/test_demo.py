"""``edgekd demo`` end to end with every stage shortened: data, models, training, accuracy,
five exports with their parity checks, the bench; a second run reuses every stage."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("llama_cpp")


def test_demo_runs_every_stage_then_reuses_them(tmp_path, monkeypatch):
    from rich.console import Console

    import edgekd.cli.demo as demo

    for name, value in {
        "TEACHER_STEPS": 4,
        "STUDENT_STEPS": 4,
        "BATCH": 4,
        "EVAL_LIMIT": 6,
        "EXPORT_EVAL_LIMIT": 4,
        "BENCH_LIMIT": 3,
        "BENCH_RUNS": 1,
        "BENCH_TOKENS": 3,
        "BENCH_ISOLATE": False,
    }.items():
        monkeypatch.setattr(demo, name, value)
    console = Console(width=200, record=True)
    rows = demo.run_demo(tmp_path, console=console)
    stages = [r["stage"] for r in rows]
    assert stages[:7] == [
        "data",
        "teacher-init",
        "student-init",
        "teacher",
        "student-switch-kd",
        "student-sft",
        "accuracy",
    ]
    assert stages[7:] == [f"export-{t}-{p}" for t, p in demo.EXPORTS] + ["bench"]
    assert all(r["status"] == "done" for r in rows)
    for target, precision in demo.EXPORTS:
        manifest = json.loads(
            (tmp_path / "artifacts" / f"{target}-{precision}" / "manifest.json").read_text()
        )
        assert (manifest["target"], manifest["precision"]) == (target, precision)
    report = json.loads((tmp_path / "report" / "bench" / "bench.json").read_text())
    names = [r["name"] for r in report["results"]]
    assert names[0] == "teacher" and len(names) == 3 + len(demo.EXPORTS)
    assert all(r["accuracy"]["n"] == 3 for r in report["results"])
    out = console.export_text()
    assert "edgekd bench" in out and "report:" in out and "bench.md" in out

    again = demo.run_demo(tmp_path, console=Console(width=200, record=True))
    assert [r["status"] for r in again] == ["reused"] * len(rows)
