"""What the commands print: each result rendered by one function (rich tables and lines), so
that the commands only parse their options, call the library and hand the result here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgekd.plan import GB


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def parity_lines(parity: dict) -> list[str]:
    """A ✓/✗ line per parity check of a manifest's parity report, with its numbers."""
    lines = []
    for name, check in parity.get("checks", {}).items():
        mark = "[green]✓[/green]" if check.get("pass") else "[red]✗[/red]"
        numbers = ", ".join(
            f"{k} {_fmt(v)}"
            for k, v in check.items()
            if k != "pass" and isinstance(v, (int, float, bool, str))
        )
        lines.append(f"  {mark} {name}: {numbers}")
    return lines


def print_export(manifest: dict, target: str, precision: str, output: Path, console: Console):
    """The parity lines of an export and its one-line summary."""
    for line in parity_lines(manifest.get("parity", {})):
        console.print(line, highlight=False)
    for line in type_lines(manifest.get("components", {}), precision):
        console.print(line, highlight=False)
    size = sum(f["bytes"] for f in manifest["files"].values())
    console.print(
        f"[green]✓[/green] {target} {precision}: {len(manifest['files'])} files, "
        f"{size / 1e6:.1f} MB -> {output}"
    )


def type_lines(components: dict, precision: str) -> list[str]:
    """Per component that records them, the weight types actually written (share of the
    weight matrices' elements), and a warning when most of them fell back from ``precision``."""
    lines = []
    for name, part in components.items():
        share = part.get("weight_share") if isinstance(part, dict) else None
        if not share:
            continue
        types = ", ".join(f"{t} {100 * v:.0f}%" for t, v in share.items())
        lines.append(f"  {name.replace('_', ' ')} weights: {types}")
        asked = part.get("share_as_asked")
        if asked is not None and asked < 0.5:
            fell = part.get("fallbacks", {})
            lines.append(
                f"  [yellow]! {precision}: only {100 * asked:.0f}% of the weights quantized as "
                f"asked; {fell.get('count', 0)} matrices fell back ({fell.get('reason', '')})"
                "[/yellow]"
            )
    return lines


def print_train_plan(recipe_name: str, result, console: Console) -> None:
    """``edgekd plan --train``: the setup, the memory parts against the usable memory, the
    verdict and the step roofline."""
    s = result.setup
    console.print(
        f"{recipe_name}: {result.teacher} -> {result.student} on {s.processes} x "
        f"{result.profile}, {s.strategy}, {s.precision}, batch {s.batch} x {s.seq_len} tokens, "
        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}",
        highlight=False,
    )
    table = Table()
    table.add_column("per process", no_wrap=True)
    table.add_column("GB", justify="right")
    for part, value in result.parts.items():
        table.add_row(part, f"{value / GB:.2f}")
    colour = "green" if result.fits else "red"
    peak = f"[bold]{result.peak_bytes / GB:.2f}[/bold]"
    table.add_row(f"[bold]peak ({result.peak_phase})[/bold]", peak)
    table.add_row("usable", f"{result.usable_bytes / GB:.2f}")
    console.print(table)
    console.print(f"[{colour}]{result.verdict}[/{colour}]", highlight=False)
    seconds = result.step_seconds
    flops = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in result.step_flops.items())
    if seconds is None:
        console.print(f"step: {flops} TFLOP; the profile lists no peak to bound its time")
    else:
        console.print(
            f"step roofline: {seconds:.2f} s per micro-step at {result.peak_tflops:g} TFLOP/s "
            f"({flops} TFLOP); communication not included"
        )


def print_inference_plan(result, context: int, batch: int, console: Console) -> None:
    """``edgekd plan``: per precision, memory parts, fit, margin and the decode roofline."""
    mode = f", {result.power_mode}" if result.power_mode else ""
    table = Table(
        title=f"{result.model} on {result.profile}{mode}: context {context}, batch {batch}; "
        f"usable {result.usable_gb:.2f} of {result.memory_gb:g} GB, {result.bandwidth_gbps:g} GB/s"
    )
    table.add_column("precision", no_wrap=True)
    for col in ("weights", "KV", "act.", "total", "fits", "margin", "tok/s"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("bound")
    for row in result.rows:
        colour = "green" if row.fits else "red"
        table.add_row(
            row.precision,
            f"{row.weights / GB:.2f}",
            f"{row.kv_bytes / GB:.3f}",
            f"{row.activation_bytes / GB:.3f}",
            f"{row.total_bytes / GB:.2f}",
            f"[{colour}]{'yes' if row.fits else 'no'}[/{colour}]",
            f"{row.margin_gb:+.2f}",
            f"{row.decode_tok_s:,.1f}",
            row.bound,
        )
    console.print(table)
    for row in result.rows:
        if not row.fits:
            console.print(f"[red]✗[/red] {row.precision}: {row.verdict}", highlight=False)
    console.print(
        "sizes in GB (1e9 bytes); tok/s: decode roofline, an upper bound (bandwidth / bytes "
        "read per token, or peak compute)"
    )


def print_dataset(out: Path, meta: dict, console: Console) -> None:
    """A written dataset: samples, images and question types per split."""
    table = Table(title=f"{out}")
    table.add_column("split")
    table.add_column("samples", justify="right")
    table.add_column("images", justify="right")
    table.add_column("per type")
    for split, info in meta.get("splits", {}).items():
        per_type = ", ".join(f"{k} {v}" for k, v in info.get("per_type", {}).items())
        table.add_row(split, str(info["n_samples"]), str(info.get("n_images", "")), per_type)
    console.print(table)


def print_converted(src: str, path: Path, detail, console: Console) -> None:
    """The one-line summary of a conversion, from its ``edgekd_convert.json``."""
    from edgekd.models.tinyllava import MANIFEST

    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    console.print(
        f"[green]✓[/green] converted {src} -> {path} ({manifest['dtype']}, "
        f"{manifest['image_token']['token']} id {manifest['image_token']['id']}, "
        f"{detail(manifest)})"
    )


def print_model(ckpt: str, vlm, parameters: dict[str, int], console: Console) -> None:
    """A checkpoint's parameter counts, shapes and tokenizer."""
    table = Table(title=ckpt, show_header=False)
    for key, value in parameters.items():
        table.add_row(f"params.{key}", f"{value:,}")
    cfg = vlm.config
    table.add_row(
        "vision",
        f"{cfg.vision_config.model_type} {cfg.vision_config.hidden_size}d "
        f"x{cfg.vision_config.num_hidden_layers}, {cfg.vision_config.image_size}px",
    )
    table.add_row(
        "text",
        f"{cfg.text_config.model_type} {cfg.text_config.hidden_size}d "
        f"x{cfg.text_config.num_hidden_layers}, vocab {vlm.vocab_size}",
    )
    table.add_row("visual tokens / image", str(vlm.num_image_tokens()))
    table.add_row("image token id", str(vlm.image_token_id))
    table.add_row("tokenizer fingerprint", vlm.fingerprint())
    console.print(table)


def print_pruned(ckpt: str, out, record: dict[str, Any], console: Console) -> None:
    """``edgekd models prune``: the layers kept per stack and the parameters before and after."""
    kept = [
        f"{stack} {', '.join(map(str, record[key]['kept']))} of {record[key]['of']}"
        for stack, key in (("decoder layers", "text_layers"), ("vision layers", "vision_layers"))
        if key in record
    ]
    p = record["parameters"]
    console.print(
        f"[green]✓[/green] {ckpt} -> {out}: {'; '.join(kept)} kept "
        f"({p['before'] / 1e6:.2f}M -> {p['after'] / 1e6:.2f}M parameters)"
    )


def print_assembled(out, record: dict[str, Any], console: Console) -> None:
    """``edgekd models assemble``: the parts, the visual tokens and the parameters per stage."""
    p = record["parameters"]
    console.print(
        f"[green]✓[/green] {record['vision']['model_type']} + {record['projector']} + "
        f"{record['language']['model_type']} -> {out}: {record['image_size']} px, "
        f"{record['visual_tokens']} visual tokens, <image> = id {record['image_token_id']}; "
        f"{p['vision_tower'] / 1e6:.2f}M + {p['projector'] / 1e6:.2f}M (new) + "
        f"{p['language_model'] / 1e6:.2f}M = {p['total'] / 1e6:.2f}M parameters"
    )


def print_profiles(devices: dict[str, Any], recipes: dict[str, Any], console: Console) -> None:
    """The device profiles (memory, bandwidth, peak, target) and the recipes (method,
    strategy, description), by name."""
    table = Table(title="device profiles")
    table.add_column("name", no_wrap=True)
    for col in ("kind", "memory GB", "GB/s", "fp16 TFLOP/s", "target"):
        table.add_column(col, justify="right" if col[0].isupper() or "/" in col else "left")
    for name, p in devices.items():
        fp16 = p.peak_tflops.get("fp16")
        table.add_row(
            name,
            p.kind,
            f"{p.memory_gb:g}",
            f"{p.memory_bandwidth_gbps:g}",
            "-" if fp16 is None else f"{fp16:g}",
            p.preferred_target,
        )
    console.print(table)
    table = Table(title="recipe profiles")
    table.add_column("name", no_wrap=True)
    for col in ("method", "strategy", "description"):
        table.add_column(col)
    for name, r in recipes.items():
        table.add_row(name, r.method, r.distributed.strategy, r.description)
    console.print(table)
