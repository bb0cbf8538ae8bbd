"""``edgekd plan --train`` against measurement: peak tensor memory per process, and step time.

Two runs, each next to the plan's prediction for exactly its setting:

* ``tiny``: ``edgekd distill`` (switch-kd, tiny checkpoints, 3 steps) in 2 CPU processes
  (torchrun, gloo) under DDP and DeepSpeed ZeRO-3; the peak of each rank, measured around the
  whole run (models loaded inside it).
* ``paper``: the paper's shapes (``qwen2.5-3b-siglip-so400m`` teacher, ``qwen2-0.5b-siglip-so400m``
  student, random weights), two switch-kd steps in one CPU process with one image per
  sequence at ``--seq-len`` tokens, gradient checkpointing (student and switch route), and both
  models in bf16 (``--precision bf16``; fp32 weights and AdamW state do not fit 24 GB next to
  a bf16 3B teacher). The step is edgekd's own pieces (student forward with the feature
  capture, ``TeacherRoutes``, the ``Objective``, AdamW), phase by phase; peak memory and time
  per phase. The plan for the paper's recipe on 8 GPUs (ZeRO-3, H100) is printed beside it.

Memory is what PyTorch's allocator hands out for tensors (``edgekd.plan.memory``), which is
what the plan predicts; ratios are predicted / measured.

    python benchmarks/bench_train_memory.py tiny --out benchmarks/results/train_memory_tiny.json
    python benchmarks/bench_train_memory.py paper --out benchmarks/results/train_memory_paper.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edgekd.envinfo import snapshot
from edgekd.plan import GB
from edgekd.plan.memory import TensorMemory
from edgekd.plan.training import TrainSetup, plan_train

HERE = Path(__file__).resolve()
TINY_OVERRIDES = {
    "training.max_steps": 3,
    "training.global_batch_size": 8,
    "training.per_device_batch_size": 4,
    "training.max_length": 64,
    "training.learning_rate": 1e-3,
    "loss.top_n": 32,
    "loss.k_max": 8,
}


def machine_profile():
    """The cpu-x86_64 profile with this machine's memory (MemTotal)."""
    from edgekd.profiles import load_device_profile

    kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return load_device_profile("cpu-x86_64").model_copy(update={"memory_gb": kib * 1024 / GB})


# ---- tiny: edgekd distill in 2 processes -------------------------------------------------
def tiny_worker(fields: dict, out: str) -> None:
    from edgekd.distill.run import DistillJob, run

    if fields["overrides"].get("distributed.strategy") == "deepspeed-zero3":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # not needed with gloo
    with TensorMemory("cpu") as mem:
        run(DistillJob(**fields))
    rank = os.environ.get("RANK", "0")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_bytes": mem.peak_bytes}))


def tiny(args) -> dict:
    for folder in ("tests", "tests/distill"):  # the test helpers, and the samples they build
        sys.path.insert(0, str(HERE.parents[1] / folder))
    from distill_helpers import write_dataset

    from edgekd.data import LlavaDataset
    from edgekd.models import build_vlm, train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="edgekd-train-memory-"))
    tok = train_tokenizer()
    build_vlm("small", tokenizer=tok, seed=1).save_pretrained(tmp / "teacher")
    student = build_vlm("tiny", tokenizer=tok, seed=0)
    student.save_pretrained(tmp / "student")
    data = write_dataset(tmp / "data")
    lengths = [len(s["input_ids"]) for s in LlavaDataset(data, data.parent, student.processor, 64)]
    rows = []
    for strategy in ("ddp", "deepspeed-zero3"):
        out = tmp / strategy
        out.mkdir()
        fields = {
            "output": str(out / "run"),
            "recipe": "easyvqa-cpu",
            "method": "switch-kd",
            "teacher": str(tmp / "teacher"),
            "student": str(tmp / "student"),
            "data": str(data),
            "overrides": {**TINY_OVERRIDES, "distributed.strategy": strategy},
            "device": "cpu",
            "logging_steps": 1,
            "save_steps": 100,
        }
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "2"]  # fmt: skip
        cmd = [*launcher, str(HERE), "tiny-worker", json.dumps(fields), str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        measured = max(
            json.loads((out / f"rank{r}.json").read_text())["peak_bytes"] for r in (0, 1)
        )
        setup = TrainSetup(
            strategy=strategy, processes=2, batch=4, seq_len=max(lengths), answer_tokens=2,
            precision="fp32", gradient_checkpointing=False,
        )  # fmt: skip
        plan = plan_train(str(tmp / "teacher"), str(tmp / "student"), machine_profile(), setup)
        rows.append(_row(f"tiny, 2 processes, {strategy}", plan, measured))
    return {"runs": rows}


# ---- paper: the real shapes, one process ---------------------------------------------------
def paper(args) -> dict:
    from edgekd.distill.objective import Objective, supervised_positions
    from edgekd.distill.switch import FeatureCapture, TeacherRoutes
    from edgekd.models import build_vlm, train_tokenizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    timings: dict[str, list[float]] = {}
    with TensorMemory("cpu") as mem:
        with mem.phase("load"):
            tok = train_tokenizer()
            teacher = build_vlm("qwen2.5-3b-siglip-so400m", tokenizer=tok, seed=1)
            teacher.model.to(dtype)
            student = build_vlm("qwen2-0.5b-siglip-so400m", tokenizer=tok, seed=0)
            student.model.to(dtype)
        s_model = student.model
        s_model.train()
        s_model.activation_checkpointing_enable({"use_reentrant": False})
        unused = set(student.unused_vision_parameters())
        params = [p for n, p in s_model.named_parameters() if n not in unused]
        for n, p in s_model.named_parameters():
            p.requires_grad_(n not in unused)
        optimizer = torch.optim.AdamW(params, lr=2e-5)
        capture = FeatureCapture(s_model)
        routes = TeacherRoutes(teacher.model, checkpoint_switch=True)
        objective = Objective("switch-kd", top_n=256, k_min=3, k_max=64)
        batch = _paper_batch(student, args.seq_len, args.answer_tokens, dtype)
        keep = supervised_positions(batch["labels"])  # as the trainer's distill_step does
        for step in range(args.steps):
            phases = {
                "student forward": lambda: s_model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                    logits_to_keep=keep,
                ),
            }
            t0 = time.perf_counter()
            with mem.phase("student forward"):
                out = phases["student forward"]()
            t1 = time.perf_counter()
            with mem.phase("teacher forward (both routes)"):
                t_out = routes(batch["input_ids"], batch["attention_mask"],
                               batch["pixel_values"], None, capture.pop(), keep=keep)  # fmt: skip
            t2 = time.perf_counter()
            with mem.phase("loss"):
                loss, _ = objective(
                    out.logits, batch["labels"], t_out.logits, t_out.switch_logits, positions=keep
                )
            t3 = time.perf_counter()
            with mem.phase("backward"):
                loss.backward()
                del out, t_out, loss
            t4 = time.perf_counter()
            with mem.phase("optimizer step"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            t5 = time.perf_counter()
            for name, dt in zip(
                ("student forward", "teacher forward (both routes)", "loss", "backward",
                 "optimizer step"),
                (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
            ):  # fmt: skip
                timings.setdefault(name, []).append(round(dt, 2))
            print(f"step {step + 1}: {t5 - t0:.1f} s", flush=True)
    setup = TrainSetup(
        strategy="none", processes=1, batch=1, seq_len=args.seq_len,
        answer_tokens=args.answer_tokens, precision=args.precision, gradient_checkpointing=True,
    )  # fmt: skip
    here = plan_train("qwen2.5-3b-siglip-so400m", "qwen2-0.5b-siglip-so400m",
                      machine_profile(), setup)  # fmt: skip
    row = _row(f"paper shapes, 1 CPU process, {args.precision}", here, mem.peak_bytes)
    row["phases"] = {
        name: {"peak_gb": round(mem.phases.get(name, 0) / GB, 3), "seconds": timings.get(name)}
        for name in ("load", *timings)
    }
    row["step_seconds_measured"] = [
        round(sum(timings[k][i] for k in timings), 1) for i in range(args.steps)
    ]
    gemm = gemm_tflops(dtype)
    row["gemm_tflops_measured"] = round(gemm, 3)
    row["step_roofline_at_measured_gemm_s"] = round(
        sum(here.step_flops.values()) / (gemm * 1e12), 1
    )
    row["step_tflop"] = {k: round(v / 1e12, 2) for k, v in here.step_flops.items()}
    gpus = paper_recipe_plan()
    return {
        "runs": [row],
        "paper_recipe_8x_h100": _row("paper recipe, 8 x H100, ZeRO-3", gpus, None),
    }


def paper_recipe_plan():
    """The plan of the tinyllava-3b-to-0.5b recipe as written (8 x H100, ZeRO-3)."""
    from edgekd.plan.training import setup_from_recipe
    from edgekd.profiles import load_device_profile, load_recipe

    device = load_device_profile("h100-80gb")
    setup = setup_from_recipe(load_recipe("tinyllava-3b-to-0.5b"), device)
    return plan_train("qwen2.5-3b-siglip-so400m", "qwen2-0.5b-siglip-so400m", device, setup)


def gemm_tflops(dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's matmul rate (best of ``repeats`` n x n x n products), in TFLOP/s."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def _paper_batch(vlm, seq_len: int, answer: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    n_img = vlm.num_image_tokens()
    if seq_len <= n_img + answer:
        raise SystemExit(f"--seq-len must exceed {n_img} image tokens + {answer} answer tokens")
    ids = torch.randint(10, len(vlm.tokenizer), (1, seq_len), generator=g)
    ids[:, 1 : 1 + n_img] = vlm.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    size = vlm.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=g).to(dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": pixels}  # fmt: skip


def _row(name: str, plan, measured: int | None) -> dict:
    row = {
        "run": name,
        "setup": plan.setup.__dict__,
        "predicted_gb": round(plan.peak_bytes / GB, 3),
        "predicted_bytes": int(plan.peak_bytes),
        "predicted_phase": plan.peak_phase,
        "parts_gb": {k: round(v / GB, 3) for k, v in plan.parts.items()},
        "verdict": plan.verdict,
        "step_roofline_s": None if plan.step_seconds is None else round(plan.step_seconds, 2),
    }
    if measured is not None:
        row["measured_gb"] = round(measured / GB, 3)
        row["measured_bytes"] = int(measured)
        row["predicted_over_measured"] = round(plan.peak_bytes / measured, 3)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "tiny-worker":
        tiny_worker(json.loads(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", choices=("tiny", "paper"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--answer-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    start = time.time()
    result = tiny(args) if args.run == "tiny" else paper(args)
    result["wall_s"] = round(time.time() - start, 1)
    result["env"] = snapshot()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["runs"] + [result.get("paper_recipe_8x_h100")]:
        if row:
            print(json.dumps({k: row[k] for k in row if k not in ("parts_gb", "setup")}))


if __name__ == "__main__":
    main()
