"""llama.cpp's CPU variants: what the probe costs at start-up, and what each variant runs at.

Two stages, each measurement in its own fresh process:

* ``startup``: ``import llama_cpp`` (the installed wheel loads its CPU variant,
  :mod:`edgekd.runtime.ggml_cpu`), ``--rounds`` times with an empty verdict cache (every
  variant ranked above the one chosen is probed, one child process per crash) and as many with
  the cache written, against the same import with the chosen variant loaded by hand first
  (no probe, no cache): the loader's cost, cold and warm.
* ``speed``: prefill (``--prompt`` tokens in one ``Llama.eval``) and greedy decode
  (``--decode`` tokens) of a language model of the paper's student shape (Qwen2-0.5B, random
  weights, written by edgekd's GGUF writer and quantized by llama.cpp to Q8_0 and Q4_0, the
  types with AMX kernels), once per CPU variant: the variant the probe chose, every
  better-ranked one it skipped (where it crashes, the crash is recorded, not a time) and
  ``haswell`` (AVX2, what a portable build without variants runs). Rounds alternate the
  variants; medians.

    flock /tmp/edgekd-cpu.lock python benchmarks/bench_cpu_variant.py \\
        --out benchmarks/results/cpu_variant.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FORCED = r"""
import ctypes, json, sys, time
registry, variant = sys.argv[1], sys.argv[2]
started = time.perf_counter()
if variant:  # the variant loaded by hand into the ggml libllama will use (same soname)
    ggml = ctypes.CDLL(registry, mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    assert ggml.ggml_backend_load(variant.encode())
import llama_cpp
"""

STARTUP = FORCED + r"""
print(json.dumps({"import_s": time.perf_counter() - started,
                  "selected": getattr(llama_cpp._cpu_variant, "SELECTED", None)}))
"""

SPEED = FORCED + r"""
import numpy as np
model, prompt, decode, threads = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
llm = llama_cpp.Llama(model_path=model, n_ctx=prompt + decode + 8, n_batch=2048, n_ubatch=256,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
tokens = np.random.default_rng(0).integers(100, llm.n_vocab(), prompt).tolist()
llm.eval(tokens[:8]); llm.reset()  # warm-up
t0 = time.perf_counter(); llm.eval(tokens); t1 = time.perf_counter()
for _ in range(decode):
    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
t2 = time.perf_counter()
maps = open("/proc/self/maps").read()
print(json.dumps({"prefill_ms": (t1 - t0) * 1e3, "decode_tok_s": decode / (t2 - t1),
                  "mapped": sorted(set(l.rsplit("ggml-cpu-", 1)[1].split(".so")[0]
                                       for l in maps.splitlines() if "ggml-cpu-" in l))}))
"""


def run(code: str, *args, env=None, timeout=900) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    if out.returncode < 0:
        import signal

        return {"crashed": signal.Signals(-out.returncode).name}
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def forced(lib: str, variant: str = "") -> tuple[str, str]:
    """The ggml registry library of ``lib`` and the library of ``variant`` ("" for none), the
    arguments of the child scripts above."""
    from edgekd.runtime import ggml_cpu

    libraries = {ggml_cpu.variant_name(p): str(p) for p in ggml_cpu.variant_libraries(lib)}
    return str(ggml_cpu.registry_library(lib)), libraries[variant] if variant else ""


def startup(lib: str, rounds: int) -> dict:
    samples: dict[str, list[float]] = {"cold": [], "warm": [], "by_hand": []}
    chosen = None
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "XDG_CACHE_HOME": cache}
            cold = run(STARTUP, *forced(lib), env=env)
            warm = run(STARTUP, *forced(lib), env=env)
            assert cold["selected"]["cached"] is False and warm["selected"]["cached"] is True
            chosen = cold["selected"]
            samples["cold"].append(cold["import_s"])
            samples["warm"].append(warm["import_s"])
        samples["by_hand"].append(run(STARTUP, *forced(lib, chosen["variant"]))["import_s"])
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return {
        "import_ms": {k: round(v, 1) for k, v in med.items()},
        "loader_cost_ms": {
            "cold": round(med["cold"] - med["by_hand"], 1),
            "warm": round(med["warm"] - med["by_hand"], 1),
        },
        "probe_s": chosen["probe_s"],
        "checks": len(chosen["checks"]),
        "variant": chosen["variant"],
        "variants": chosen["variants"],
        "samples_ms": {k: [round(x * 1e3, 1) for x in v] for k, v in samples.items()},
    }


def student_lm(work: Path, log) -> dict[str, Path]:
    """Qwen2-0.5B-shaped language model, random weights: f16 by edgekd's writer, then Q8_0
    and Q4_0 by llama.cpp's quantizer."""
    import llama_cpp

    from edgekd.export.gguf_write import write_lm
    from edgekd.models import build_vlm

    files = {p: work / f"lm-{p}.gguf" for p in ("q8_0", "q4_0")}
    if all(f.is_file() for f in files.values()):
        return files
    f16 = work / "lm-f16.gguf"
    if not f16.is_file():
        log("building qwen2-0.5b-siglip-so400m (random weights) and writing its LM as f16")
        write_lm(build_vlm("qwen2-0.5b-siglip-so400m", seed=0), f16, "f16")
    for precision, path in files.items():
        log(f"quantizing to {precision}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{precision.upper()}")
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params) == 0
    return files


def speed(lib: str, variants: list[str], models: dict, args, log) -> dict:
    samples: dict = {p: {v: [] for v in variants} for p in models}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for precision, model in models.items():
            for v in order:
                got = run(SPEED, *forced(lib, v), model, args.prompt, args.decode, args.threads)
                log(f"round {r + 1} {precision} {v}: {got}")
                samples[precision][v].append(got)
    rows = {}
    for precision, per in samples.items():
        rows[precision] = {}
        for v, runs in per.items():
            crashed = [s["crashed"] for s in runs if "crashed" in s]
            if crashed:
                rows[precision][v] = {"crashed": crashed[0]}
                continue
            rows[precision][v] = {
                "prefill_ms": round(statistics.median(s["prefill_ms"] for s in runs), 1),
                "prefill_tok_s": round(
                    args.prompt / statistics.median(s["prefill_ms"] for s in runs) * 1e3, 1
                ),
                "decode_tok_s": round(statistics.median(s["decode_tok_s"] for s in runs), 2),
                "mapped": runs[0]["mapped"],
            }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_variant.json"))
    ap.add_argument("--workdir", type=Path, default=None, help="keep the model files here")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("startup", "speed"), default=None)
    args = ap.parse_args()

    from edgekd.envinfo import snapshot
    from edgekd.runtime import ggml_cpu
    from edgekd.runtime.llamacpp import import_llama_cpp

    llama_cpp = import_llama_cpp()  # its facts (the variant and the verdicts) join the snapshot

    lib = str(Path(llama_cpp.llama_cpp._lib._name).resolve().parent)
    if not ggml_cpu.variant_libraries(lib):
        sys.exit("error: this llama-cpp-python has its CPU backend linked in: no variants")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict = {}
    if args.only and args.out.is_file():  # one stage again: keep the other's figures
        results = json.loads(args.out.read_text())
    results["environment"] = snapshot({"threads": args.threads})
    chosen = ggml_cpu.selection()
    if args.only in (None, "startup"):
        results["startup"] = startup(lib, args.rounds)
        log(json.dumps(results["startup"]["import_ms"]))
    if args.only in (None, "speed"):
        skipped = [v for v, why in chosen["variants"].items() if "in the probe" in why]
        variants = [chosen["variant"], *skipped, "haswell"]
        work = args.workdir or Path(tempfile.mkdtemp(prefix="edgekd-cpu-variant-"))
        work.mkdir(parents=True, exist_ok=True)
        models = student_lm(work, log)
        results["speed"] = {
            "model": "qwen2-0.5b (random weights)",
            "prompt_tokens": args.prompt,
            "decode_tokens": args.decode,
            "rows": speed(lib, list(dict.fromkeys(variants)), models, args, log),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
