"""The bench report: ``bench.json`` (everything), ``bench.md`` (tables), ``bench.png`` (accuracy
against latency per variant) and the rich table printed at the end of ``edgekd bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from edgekd.io import atomic_write_json, atomic_write_text

COLUMNS = (
    ("model", "model"),
    ("backend", "backend"),
    ("precision", "precision"),
    ("vision ms", "vision"),
    ("prefill ms (x roofline)", "prefill"),
    ("TTFT ms", "ttft"),
    ("decode tok/s", "decode"),
    ("e2e ms p50 / p90 / p99", "e2e"),
    ("peak RSS MB", "rss"),
    ("GPU MB", "gpu"),
    ("power W", "power"),
    ("mJ / token", "energy"),
    ("roofline tok/s (achieved)", "roofline"),
    ("exact %", "exact"),
    ("normalised %", "normalized"),
    ("agrees with teacher %", "agreement"),
)


def _num(value, fmt: str = ".1f") -> str:
    return "n/a" if value is None else format(value, fmt)


def row_cells(r: dict[str, Any]) -> dict[str, str]:
    """One result as the table's cells (strings)."""
    lat, mem, power, roof = r["latency"], r["memory"], r["power"], r.get("roofline", {})
    e2e = lat["e2e_ms"]
    energy = power.get("energy_per_token_j")
    agreement = r.get("agreement_with_teacher")
    return {
        "model": r["name"] + (" (teacher)" if r["role"] == "teacher" != r["name"] else ""),
        "backend": r["kind"],
        "precision": r.get("precision") or r["backend"].get("dtype", "") or "",
        "vision": _num(lat["vision_ms"]["p50"]),
        "prefill": _prefill_cell(lat, r.get("prefill_roofline") or {}),
        "ttft": _num(lat["ttft_ms"]["p50"]),
        "decode": _num(lat["decode_tok_s"]["p50"]),
        "e2e": f"{e2e['p50']:.1f} / {e2e['p90']:.1f} / {e2e['p99']:.1f}",
        "rss": _num(mem.get("peak_rss_mb"), ".0f"),
        "gpu": _num(mem.get("gpu_peak_mb"), ".0f"),
        "power": _num(power.get("mean_w")),
        "energy": _num(None if energy is None else energy * 1e3),
        "roofline": (
            f"{roof['tok_s']:.1f} ({100 * roof['fraction']:.0f}%)"
            if roof.get("tok_s") and roof.get("fraction") is not None
            else "n/a"
        ),
        "exact": _num(100 * r["accuracy"]["exact_match"]),
        "normalized": _num(100 * r["accuracy"]["normalized_match"]),
        "agreement": _num(None if agreement is None else 100 * agreement),
    }


def _prefill_cell(lat: dict, roof: dict) -> str:
    """Prefill p50, and its multiple of the compute roofline where that was measured
    (results written before prefill was recorded: n/a)."""
    if "prefill_ms" not in lat:
        return "n/a"
    cell = _num(lat["prefill_ms"]["p50"])
    return cell + (f" (x{roof['over_roofline']:.2f})" if roof.get("over_roofline") else "")


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: setting, the main table, accuracy per question type, notes."""
    env, results = report["environment"], report["results"]
    cfg = report["config"]
    lines = [
        "# edgekd bench",
        "",
        f"- device: {env['device']}"
        + (f", profile {env['profile']}" if env.get("profile") else "")
        + (f", power mode {env['power_mode']}" if env.get("power_mode") else ""),
        f"- eval set: {report['eval']['data']} ({report['eval']['questions']} questions, "
        f"greedy, up to {cfg['max_new_tokens']} new tokens)",
        f"- latency: {cfg['runs']} runs after {cfg['warmup']} warm-up, {cfg['speed_tokens']} "
        "decoded tokens each (end of turn ignored), one eval image and question",
        "- memory bandwidth for the roofline: "
        + (
            f"{env['bandwidth_gbps']:.1f} GB/s ({env['bandwidth_source']})"
            if env.get("bandwidth_gbps")
            else "none"
        ),
        f"- commit {env.get('commit')}, {env['date']}",
        "",
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in results:
        cells = row_cells(r)
        lines.append("| " + " | ".join(cells[key] for _, key in COLUMNS) + " |")
    types = sorted({t for r in results for t in r["accuracy"]["per_type"]})
    lines += [
        "",
        "## Accuracy per question type (normalised match %, exact match % in brackets)",
        "",
        "| model | " + " | ".join(types) + " |",
        "|" + "---|" * (len(types) + 1),
    ]
    for r in results:
        per = r["accuracy"]["per_type"]
        cells = [
            f"{100 * per[t]['normalized_match']:.1f} ({100 * per[t]['exact_match']:.1f})"
            if t in per
            else ""
            for t in types
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    notes = sorted({r["power"]["why"] for r in results if r["power"].get("why")})
    if notes:
        lines += ["", "Power not measured: " + "; ".join(notes)]
    above = [r["name"] for r in results if ((r.get("roofline") or {}).get("fraction") or 0) > 1]
    if above:
        lines += [
            "",
            f"Above 100% of the roofline ({', '.join(above)}): the bytes a token reads fit in "
            "the caches, so memory bandwidth does not bound decoding at this size.",
        ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> bool:
    """Accuracy (normalised match) against end-to-end p50 latency, one point per variant.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    markers = "osD^v<>phX"
    for k, r in enumerate(report["results"]):
        x = r["latency"]["e2e_ms"]["p50"]
        y = 100 * r["accuracy"]["normalized_match"]
        teacher = r["role"] == "teacher"
        ax.scatter(
            x,
            y,
            marker="*" if teacher else markers[k % len(markers)],
            s=180 if teacher else 60,
            alpha=0.85,
            zorder=3,
            label=f"{r['name']}: {y:.1f}%, {x:.1f} ms",
        )
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel(
        f"end-to-end latency p50, ms ({report['config']['speed_tokens']} tokens; log scale)"
    )
    ax.set_ylabel("accuracy, normalised match %")
    env = report["environment"]
    ax.set_title(f"edgekd bench on {env.get('profile') or env['device']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return True


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """``bench.json``, ``bench.md`` and (with matplotlib) ``bench.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    report["plot"] = "bench.png" if plot(report, out_dir / "bench.png") else None
    if report["plot"] is None:
        report["plot_note"] = "matplotlib is not installed: pip install 'edgekd[plot]'"
    atomic_write_json(out_dir / "bench.json", report)
    atomic_write_text(out_dir / "bench.md", markdown(report))


# (title on screen, cell key): the Markdown table's numbers, narrowed to fit a terminal
SCREEN = (
    ("model", "model"),
    ("runtime", "variant"),
    ("TTFT\nms", "ttft"),
    ("tok/s", "decode"),
    ("e2e\nms", "e2e_p50"),
    ("RSS\nMB", "rss"),
    ("GPU\nMB", "gpu"),
    ("power\nW", "power"),
    ("mJ/\ntok", "energy"),
    ("roof\n%", "roofline_pct"),
    ("acc\n%", "normalized"),
    ("=teach\n%", "agreement"),
)
SCREEN_CAPTION = (
    "TTFT time to first token (p50), tok/s decode (p50), e2e end-to-end p50, RSS peak memory, "
    "roof share of the memory-bandwidth roofline, acc normalised match, =teach answers "
    "identical to the teacher's; all columns and p90/p99 in bench.md"
)


def print_table(report: dict[str, Any], console) -> None:
    """The main table on screen (rich); unmeasured columns are left out, and the runtime
    column on terminals narrower than 100 characters."""
    env = report["environment"]
    rows = []
    for r in report["results"]:
        cells = row_cells(r)
        roof = r.get("roofline") or {}
        cells["variant"] = f"{cells['backend']} {cells['precision']}".strip()
        cells["e2e_p50"] = _num(r["latency"]["e2e_ms"]["p50"])
        cells["roofline_pct"] = _num(
            None if roof.get("fraction") is None else 100 * roof["fraction"], ".0f"
        )
        rows.append(cells)
    columns = [(t, k) for t, k in SCREEN if any(row[k] != "n/a" for row in rows)]
    if console.width < 100:
        columns = [(t, k) for t, k in columns if k != "variant"]
    table = Table(
        title=f"edgekd bench: {env.get('profile') or env['device']}",
        caption=SCREEN_CAPTION,
        box=box.SIMPLE_HEAD,
    )
    longest = max(len(row["model"]) for row in rows)
    for title, key in columns:
        text = key in ("model", "variant")
        table.add_column(
            title,
            justify="left" if text else "right",
            no_wrap=not text,
            min_width=min(longest, 28) if key == "model" else None,
        )
    for cells in rows:
        table.add_row(*(cells[key] for _, key in columns))
    console.print(table)
