"""TensorRT backend: runs the engines of an edgekd TensorRT artifact with torch CUDA buffers.

    backend = TensorRTBackend("artifacts/student-trt-fp16")
    gen = backend.generate(Image.open("cat.png"), "What animal is this?", max_new_tokens=32)
    gen.text, gen.ttft_ms, gen.decode_tokens_per_s

The artifact (written by :mod:`edgekd.export.tensorrt`) holds ``vision.engine``,
``embed.engine``, ``decoder.engine`` (optimisation profile 0 ``prefill``, 1 ``decode``),
``engines.json`` and ``onnx/`` (the fp32 graphs the engines came from, and the processor).
The manifest is verified first; then ``engines.json`` is checked against this machine, because
a TensorRT engine runs only on the GPU architecture and TensorRT version that built it.

Execution uses the TensorRT 10 name-based API: one ``IExecutionContext`` per (engine, profile)
(``set_optimization_profile_async``), and per call ``set_input_shape`` and
``set_tensor_address`` for every input, outputs allocated as torch CUDA tensors of
``context.get_tensor_shape``, and ``execute_async_v3`` on the backend's CUDA stream, which all
torch work of a generation also uses. Greedy decoding runs prefill once over the prompt (empty
KV cache), then one token per step with ``present.*`` fed back as ``past_key_values.*``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekd import artifact, targets
from edgekd.runtime.base import BackendError, Generation, greedy_generate
from edgekd.runtime.prompt import check_image_slots, encode_prompt
from edgekd.targets import DecodeWeights

INSTALL_HINT = (
    "the tensorrt backend needs the tensorrt package and an NVIDIA GPU: pip install "
    "edgekd[tensorrt] on a machine with CUDA, or use the NVIDIA TensorRT container / JetPack "
    "on Jetson"
)
ENGINES_JSON = targets.TRT_ENGINES_JSON
DTYPE_BYTES = {"fp32": 4, "fp16": 2}
# trt data types (module attributes, as Polygraphy maps them) -> torch dtype names
_TORCH_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "uint8": "uint8",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
}


def import_tensorrt(error: type[Exception] = BackendError, need_gpu: bool = True):
    """``import tensorrt`` (with a CUDA GPU present unless ``need_gpu`` is off), or one
    ``error`` line saying how to get it."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the bindings without their shared libraries
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{INSTALL_HINT} (import tensorrt: {cause})") from None
    import torch

    if need_gpu and not torch.cuda.is_available():
        raise error(f"{INSTALL_HINT} (no CUDA GPU: torch.cuda.is_available() is False)")
    return tensorrt


def open_backend(path, *, device: str, threads: int | None) -> TensorRTBackend:
    """The tensorrt target's backend (the registry allows only GPU devices)."""
    return TensorRTBackend(path)


def decode_weights(loaded: artifact.Artifact) -> DecodeWeights:
    """The decoder engine's bytes (its weights are inside the engine); the KV cache at the
    export's ``kv_cache_dtype`` (fp32 for fp32 engines, else fp16)."""
    default = "fp32" if loaded.precision == "fp32" else "fp16"
    kv = DTYPE_BYTES[loaded.options.get("kv_cache_dtype", default)]
    weights = int(loaded.files[targets.TRT_ENGINES["decoder"]]["bytes"])
    return DecodeWeights(weights, kv_element_bytes=kv, tied_embedding=False)


def torch_dtype(trt, trt_dtype):
    """The torch dtype of a ``trt.DataType`` (``trt`` is the tensorrt module)."""
    import torch

    for name, torch_name in _TORCH_DTYPES.items():
        if getattr(trt, name, None) == trt_dtype:
            return getattr(torch, torch_name)
    raise BackendError(f"TensorRT tensor type {trt_dtype} has no torch equivalent in edgekd")


def check_device(info: dict[str, Any], trt_version: str) -> None:
    """Refuse engines built for another GPU architecture or another TensorRT version."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    here, built = f"{major}.{minor}", info["device"]["compute_capability"]
    problems = []
    if built != here:
        problems.append(
            f"they were built for compute capability {built} ({info['device']['name']}), this "
            f"GPU is {here} ({torch.cuda.get_device_name(0)})"
        )
    if info["tensorrt_version"] != trt_version:
        problems.append(
            f"they were built with TensorRT {info['tensorrt_version']}, this is {trt_version}"
        )
    if problems:
        raise BackendError(
            "TensorRT engines run only where they were built: "
            + "; ".join(problems)
            + "; re-export on this machine (edgekd export --target tensorrt)"
        )


def load_engines(paths: Sequence[str | Path], trt=None) -> tuple[list[Any], tuple[Any, Any]]:
    """Deserialize engine files with one ``trt.Runtime``.

    Returns:
        The engines, and ``(runtime, logger)``, which must outlive them.
    """
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engines = []
    for path in paths:
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise BackendError(
                f"{path}: TensorRT {trt.__version__} cannot deserialize this engine (another "
                "TensorRT version or GPU built it?); re-export it on this machine"
            )
        engines.append(engine)
    return engines, (runtime, logger)


class EngineRunner:
    """One execution context of an engine, on one optimisation profile; calls take torch tensors.

    Inputs are moved to CUDA and cast to the engine's I/O types; outputs are new CUDA tensors.
    Work is queued on torch's current CUDA stream (nothing synchronises here).
    """

    def __init__(self, engine, profile: int = 0, label: str = "engine") -> None:
        import tensorrt as trt
        import torch

        self.engine, self.profile, self.label = engine, profile, label
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{label}: TensorRT could not create an execution context")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self._empty = torch.empty(256, dtype=torch.uint8, device="cuda")  # for 0-size tensors
        self._live: list[Any] = []
        if profile:
            stream = torch.cuda.current_stream()
            if not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
                raise BackendError(f"{label}: the engine has no optimisation profile {profile}")
            stream.synchronize()

    def limits(self, name: str) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes of input ``name`` in this runner's profile."""
        return tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(name, self.profile))

    def __call__(self, feed: dict[str, Any]) -> dict[str, Any]:
        import torch

        stream = torch.cuda.current_stream()
        live = []
        for name in self.inputs:
            if name not in feed:
                raise BackendError(f"{self.label}: input '{name}' missing (given: {list(feed)})")
            t = torch.as_tensor(feed[name]).to("cuda", self.dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(t.shape)):
                low, _, high = self.limits(name)
                raise BackendError(
                    f"{self.label}: input '{name}' of shape {tuple(t.shape)} is outside "
                    f"optimisation profile {self.profile} ({low} to {high}); re-export with a "
                    "device profile of larger tensorrt limits"
                )
            self._bind(name, t)
            live.append(t)
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self._bind(name, out[name])
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.label}: execute_async_v3 failed (see the TensorRT log)")
        self._live = live  # inputs stay allocated until the next call
        return out

    def _bind(self, name: str, t) -> None:
        ptr = t.data_ptr() if t.numel() else self._empty.data_ptr()
        if not self.context.set_tensor_address(name, ptr):
            raise BackendError(f"{self.label}: TensorRT refused the buffer of '{name}'")


def _first(outputs: dict[str, Any]):
    return next(iter(outputs.values()))


class TensorRTBackend:
    """A loaded TensorRT artifact that answers ``generate(image, prompt, max_new_tokens)``.

    Args:
        artifact_dir: Directory written by ``edgekd export --target tensorrt``.
        verify: Check the manifest's hashes first. Only the exporter's own validation passes
            ``False``, before the manifest exists.

    Raises:
        ArtifactError: missing, truncated or modified files (named).
        BackendError: no tensorrt / GPU here, engines built elsewhere, or another target.
    """

    name = "tensorrt"

    def __init__(self, artifact_dir: str | Path, *, verify: bool = True) -> None:
        import torch

        from edgekd.models.vlm import load_processor

        self.root = Path(artifact_dir)
        self.artifact = artifact.verify(self.root, expect="tensorrt") if verify else None
        if not (self.root / ENGINES_JSON).is_file():
            raise BackendError(f"'{self.root}' has no {ENGINES_JSON}: not a TensorRT artifact")
        self.config = json.loads((self.root / ENGINES_JSON).read_text())
        self.device, self.stream = torch.device("cuda"), None
        self.vision, self.embed, self.prefill, self.decode = self._load_runners()
        self.processor = load_processor(self.root / targets.TRT_ONNX_DIR)  # PIL preprocessing
        pre = self.config["preprocessing"]
        self.eos_token_ids = {int(i) for i in pre["eos_token_ids"]}
        self.image_token_id = int(pre["image_token_id"])
        self.past_names = [n for n in self.prefill.inputs if n.startswith("past_key_values.")]
        self.max_prompt = self.prefill.limits("inputs_embeds")[2][1]
        self.max_past = self.decode.limits(self.past_names[0])[2][2]
        self.context_length = self.max_past + 1

    def _load_runners(self) -> tuple[Any, Any, Any, Any]:
        """Deserialize the engines and open the vision, embed, prefill and decode contexts."""
        import torch

        trt = import_tensorrt()
        check_device(self.config, trt.__version__)
        engines = self.config["engines"]
        (vision, embed, decoder), self._keep = load_engines(
            [
                artifact.listed(self.root, engines[k]["file"], self.artifact)
                for k in ("vision", "embed", "decoder")
            ],
            trt,
        )
        decode_profile = list(engines["decoder"]["profiles"]).index("decode")
        self.stream = torch.cuda.Stream()
        with torch.cuda.stream(self.stream):
            return (
                EngineRunner(vision, 0, "vision.engine"),
                EngineRunner(embed, 0, "embed.engine"),
                EngineRunner(decoder, 0, "decoder.engine (prefill)"),
                EngineRunner(decoder, decode_profile, "decoder.engine (decode)"),
            )

    def _on_stream(self):
        """Run torch work on the engines' CUDA stream (no stream: the current one)."""
        import torch

        return (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )

    def _sync(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()

    # ---- stages -----------------------------------------------------------------------------
    def encode(self, image, prompt: str):
        """Token ids (1, L) and pixel values (1, 3, H, W) or None, as the processor makes them."""
        return encode_prompt(self.processor, image, prompt)

    def visual_tokens(self, pixel_values):
        """(B, 3, H, W) pixels -> (B, N, D_text) visual tokens, float32 on the CPU."""
        import torch

        with torch.inference_mode(), self._on_stream():
            return self._visual(pixel_values).float().cpu()

    def prefill_logits(self, input_ids, pixel_values=None):
        """(1, L, V) logits of the whole prompt (empty cache), float32 on the CPU, for parity."""
        import torch

        ids = self._ids(input_ids)
        with torch.inference_mode(), self._on_stream():
            visual = None if pixel_values is None else self._visual(pixel_values)
            embeds = self._embeddings(ids, visual)
            logits, _ = self._step(self.prefill, embeds, {}, 0, last_only=False)
            return logits.float().cpu()

    def _ids(self, input_ids):
        import torch

        return torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(self.device)

    def _visual(self, pixel_values):
        import torch

        pv = torch.as_tensor(pixel_values, dtype=torch.float32)
        return _first(self.vision({"pixel_values": pv[None] if pv.dim() == 3 else pv}))

    def _embeddings(self, ids, visual):
        embeds = _first(self.embed({"input_ids": ids}))
        mask = ids == self.image_token_id
        n_feats = 0 if visual is None else visual.shape[0] * visual.shape[1]
        check_image_slots(int(mask.sum()), n_feats)
        if n_feats:
            visual = visual.to(embeds.dtype).reshape(-1, embeds.shape[-1])
            embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), visual)
        return embeds

    def _step(self, runner: EngineRunner, embeds, past: dict[str, Any], start: int, last_only=True):
        """One decoder call at cache length ``start``; returns logits and the new cache.

        ``last_only``: the last position's logits, (B, 1, V), all generation needs; otherwise
        every position's (parity). Engines built before ``logits_index`` return every one.
        """
        import torch

        b, length = embeds.shape[:2]
        if not past:  # an empty cache: (B, kv_heads, 0, head_dim) per layer
            m = self.config["model"]
            shape = (b, m["num_kv_heads"], 0, m["head_dim"])
            past = {
                n: torch.empty(shape, dtype=runner.dtypes[n], device=self.device)
                for n in self.past_names
            }
        feed = {
            "inputs_embeds": embeds,
            "attention_mask": torch.ones(b, start + length, dtype=torch.long, device=self.device),
            "position_ids": torch.arange(start, start + length, device=self.device).expand(
                b, length
            ),
            **past,
        }
        if "logits_index" in runner.inputs:
            first = length - 1 if last_only else 0
            feed["logits_index"] = torch.arange(first, length, device=self.device)
        out = runner(feed)
        present = {
            n.replace("present.", "past_key_values.", 1): t
            for n, t in out.items()
            if n.startswith("present.")
        }
        return out["logits"], present

    # ---- generation -------------------------------------------------------------------------
    def generate_ids(
        self, input_ids, pixel_values=None, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy decoding of one encoded prompt (batch 1), timed per stage.

        ``ignore_eos`` decodes exactly ``max_new_tokens`` tokens (fixed-length speed runs).
        """
        import torch

        ids = self._ids(input_ids)
        length = ids.shape[1]
        if length > self.max_prompt or length + max_new_tokens - 2 > self.max_past:
            raise BackendError(
                f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) do not fit the "
                f"engines (prefill <= {self.max_prompt} tokens, KV cache <= {self.max_past + 1}); "
                "re-export with a device profile of larger tensorrt.max_seq_len / max_past_len"
            )
        state: dict[str, Any] = {}

        def prefill(visual) -> int:
            logits, state["past"] = self._step(self.prefill, self._embeddings(ids, visual), {}, 0)
            return int(logits[0, -1].argmax())

        def step(token: int, position: int) -> int:
            embeds = _first(self.embed({"input_ids": torch.tensor([[token]])}))
            logits, state["past"] = self._step(self.decode, embeds, state["past"], position)
            return int(logits[0, -1].argmax())

        with torch.inference_mode(), self._on_stream():
            return greedy_generate(
                encode_image=lambda: None if pixel_values is None else self._visual(pixel_values),
                prefill=prefill,
                step=step,
                prompt_tokens=length,
                max_new_tokens=max_new_tokens,
                stop_ids=() if ignore_eos else self.eos_token_ids,
                decode=lambda t: self.processor.tokenizer.decode(t, skip_special_tokens=True),
                has_image=pixel_values is not None,
                sync=self._sync,
                extra={"device": self.config["device"]["name"]},
            )

    def generate(
        self, image, prompt: str, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy answer to ``prompt`` about ``image`` (a PIL image, a path, or ``None``)."""
        return self.generate_ids(
            *self.encode(image, prompt), max_new_tokens=max_new_tokens, ignore_eos=ignore_eos
        )

    def info(self) -> dict[str, Any]:
        """What a benchmark records about this backend."""
        engines = self.config["engines"]
        return {
            "backend": self.name,
            "tensorrt": self.config["tensorrt_version"],
            "device": self.config["device"],
            "device_profile": self.config["device_profile"],
            "precision": {k: e["precision"] for k, e in engines.items()},
            "artifact": str(self.root),
        }

    def close(self) -> None:
        self.vision = self.embed = self.prefill = self.decode = None
        self._keep = None
