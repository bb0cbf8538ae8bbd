"""What stock llama.cpp tools answer from a first-token-dropping GGUF artifact, on a trained model.

A model with LLaVA's ``default`` feature selection on a SigLIP tower (TinyLLaVA's ``patch``:
the first patch dropped) exports to GGUF as ``model.gguf`` + ``mmproj.gguf``; clip.cpp keeps
every patch, so edgekd's backend drops the first row itself (the exact path), while stock tools
(llama-server, llama-mtmd-cli) feed all of them, one visual token more than the model was
trained with. The gguf exporter measures both on ``--eval-data``; this script makes such a model
and reads the figures.

The model: a trained ``full``-selection checkpoint (default: the easy-vqa teacher of
``benchmarks/distill_methods.py``) switched to ``default`` and fine-tuned ``--steps`` with sft
on the same task, so it is trained with the dropped token; then PyTorch's accuracy on the test
split, and ``edgekd export --target gguf --precision f16 --eval-data`` (parity, accuracy, and
``parity.stock_llama_cpp``).

    python benchmarks/bench_gguf_stock_feed.py --out benchmarks/results/gguf_stock_feed.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

WORK = Path("runs/bench-distill")
SOURCE = WORK / "easy-vqa/color-shape/teacher-2000/model"
DATA = WORK / "easy-vqa/data"


def to_default_selection(src: Path, dst: Path) -> None:
    """Copy a ``full`` checkpoint and switch it to ``default`` (one visual token fewer)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == "full", "expects a 'full' checkpoint"
    config["vision_feature_select_strategy"] = "default"
    config["image_seq_length"] -= 1
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    processor = json.loads((dst / "processor_config.json").read_text())
    processor["vision_feature_select_strategy"] = "default"
    (dst / "processor_config.json").write_text(json.dumps(processor, indent=2))


def trained_steps(work: Path) -> int:
    """The steps the kept student was trained for (its run's config, not this run's flag)."""
    import yaml

    config = yaml.safe_load((work / "student" / "config.yaml").read_text())
    return int(config["training"]["max_steps"])


def train(args, start: Path) -> None:
    from rich.console import Console

    from edgekd.distill.run import DistillJob, run

    run(
        DistillJob(
            output=args.work / "student",
            recipe="easyvqa-cpu",
            method="sft",
            teacher=None,
            student=str(start),
            data=args.train,
            overrides={
                "training.max_steps": args.steps,
                "training.learning_rate": 3e-4,
                "training.train_vision_tower": True,
            },
            overwrite=True,
            device="cpu",
        ),
        console=Console(quiet=True),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--train", type=Path, default=DATA / "train.color-shape.json")
    ap.add_argument("--test", type=Path, default=DATA / "test.color-shape.json")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=300)
    ap.add_argument("--work", type=Path, default=WORK / "gguf-stock-feed")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_stock_feed.json"))
    ap.add_argument("--retrain", action="store_true", help="train again over a kept --work model")
    args = ap.parse_args()

    import torch

    from edgekd.envinfo import snapshot
    from edgekd.evaluate import evaluate
    from edgekd.export import ExportConfig, export
    from edgekd.models import VLM

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    start, model = args.work / "start", args.work / "student" / "model"
    t0 = time.perf_counter()
    if args.retrain or not (model / "config.json").is_file():
        to_default_selection(args.source, start)
        train(args, start)
    train_s = time.perf_counter() - t0
    pytorch = evaluate(
        VLM.from_pretrained(model), args.test, args.test.parent, limit=args.eval_limit,
        batch_size=64, max_new_tokens=6,
    )  # fmt: skip
    pytorch.pop("predictions")
    t0 = time.perf_counter()
    manifest = export(
        ExportConfig(
            str(model), "gguf", "f16", args.work / "gguf-f16", overwrite=True,
            eval_data=args.test, eval_limit=args.eval_limit, max_new_tokens=6,
        )
    )  # fmt: skip
    parity = manifest["parity"]
    result = {
        "model": f"{args.source} switched to 'default', sft {trained_steps(args.work)} steps "
        f"on {args.train}",
        "train_s": round(train_s, 1),  # 0 when a kept model was reused
        "export_s": round(time.perf_counter() - t0, 1),
        "pytorch": pytorch,
        "stock_llama_cpp": parity["stock_llama_cpp"],
        "vision_component": {
            k: manifest["components"]["vision"][k]
            for k in ("drop_first_tokens", "tower", "select_strategy")
        },
        "environment": snapshot({"threads": 2}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    stock = result["stock_llama_cpp"]
    print(
        f"PyTorch {stock['pytorch_normalized_match']:.3f}; edgekd exact path "
        f"{stock['exact_normalized_match']:.3f} (answers identical to PyTorch's "
        f"{stock['exact_answers_identical']:.3f}); stock, every row fed "
        f"{stock['stock_normalized_match']:.3f} (identical {stock['answers_identical']:.3f}), "
        f"{stock['samples']} samples"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
