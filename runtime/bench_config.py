"""``edgekd bench``'s options and eval items: :class:`BenchConfig` validates every option at once,
:func:`load_items` reads the single-turn questions of a LLaVA-format eval file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgekd import artifact
from edgekd.errors import DataError, EdgeKDError
from edgekd.io import is_hub_id
from edgekd.targets import DEVICES


class BenchError(EdgeKDError, RuntimeError):
    """A bench cannot run as asked (a model too large for the device, a crashed model run)."""


class BenchConfigError(EdgeKDError, ValueError):
    """Invalid ``edgekd bench`` options (every problem in one line)."""


@dataclass
class BenchConfig:
    """Everything ``edgekd bench`` takes; :meth:`validate` reports every problem at once."""

    models: list[str]
    data: str | Path
    output: str | Path
    teacher: str | None = None
    device: str = "cpu"
    profile: str | None = None
    power_mode: str | None = None
    image_root: str | Path | None = None
    runs: int = 20
    warmup: int = 3
    speed_tokens: int = 32
    limit: int | None = 200
    max_new_tokens: int = 16
    context: int = 2048  # tokens of KV cache in the fit check against the profile
    threads: int | None = None
    ort_provider: str = "cuda"  # onnxruntime's provider on cuda/jetson: cuda or tensorrt
    idle_s: float = 1.0  # idle power sampled this long before the timed runs (when metered)
    isolate: bool = True  # each model in its own process (peak memory of its own)
    overwrite: bool = False
    names: list[str] = field(default_factory=list)  # labels; default: the directory names

    def validate(self) -> None:
        problems = []
        if not self.models:
            problems.append("give at least one --model")
        if self.device not in DEVICES:
            problems.append(f"--device '{self.device}' is unknown (valid: {', '.join(DEVICES)})")
        for name, value, low in (
            ("--runs", self.runs, 1),
            ("--warmup", self.warmup, 0),
            ("--speed-tokens", self.speed_tokens, 2),
            ("--max-new-tokens", self.max_new_tokens, 1),
            ("--context", self.context, 1),
        ):
            if value < low:
                problems.append(f"{name} must be at least {low} (got {value})")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be at least 1 (got {self.limit})")
        from edgekd.runtime.onnxruntime import GPU_PROVIDERS

        if self.ort_provider not in GPU_PROVIDERS:
            problems.append(
                f"--ort-provider '{self.ort_provider}' is unknown (valid: "
                f"{', '.join(GPU_PROVIDERS)})"
            )
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be at least 1 (got {self.threads})")
        if self.names and len(self.names) != len(self.models):
            problems.append(f"{len(self.names)} --name for {len(self.models)} --model")
        for m in [*self.models, *([self.teacher] if self.teacher else [])]:
            if not Path(m).expanduser().exists() and not is_hub_id(str(m)):
                problems.append(f"model '{m}' not found (a directory, or a hub id org/name)")
                continue
            try:
                artifact.kind_of(m)
            except artifact.ArtifactError as e:
                problems.append(str(e))
        if not Path(self.data).is_file():
            what = "is a directory, not a file" if Path(self.data).is_dir() else "not found"
            problems.append(f"eval set '{self.data}' {what}: give the LLaVA JSON file")
        if problems:
            raise BenchConfigError("; ".join(problems))


def load_items(data: str | Path, image_root=None, limit: int | None = None) -> list[dict]:
    """Single-turn questions of a LLaVA-format eval file: prompt, reference, type, image path.

    Raises:
        DataError: invalid JSON or samples, missing or unreadable images (the count and the
            first one), paths leaving the image root, a multi-turn sample, or a limit below 1.
    """
    from edgekd.data.samples import checked_samples

    samples, images = checked_samples(data, image_root, limit)  # bad images fail here
    items = []
    for sample, image in zip(samples, images, strict=True):
        turns = [t for t in sample["conversations"] if t["from"] != "system"]
        users = [t for t in turns if t["from"] == "user"]
        if len(users) != 1 or turns[-1]["from"] != "assistant":
            raise DataError(
                f"sample '{sample['id']}': bench takes single-turn questions (one user turn, "
                f"then the answer); it has {len(users)} user turns"
            )
        items.append(
            {
                "id": sample["id"],
                "prompt": users[0]["value"],
                "reference": str(sample.get("answer", turns[-1]["value"])),
                "question_type": sample.get("question_type", "all"),
                "image": None if image is None else str(image),
            }
        )
    return items
