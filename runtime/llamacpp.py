"""llama.cpp backend: runs a ``gguf`` artifact (``model.gguf`` + ``mmproj.gguf``).

The language model loads as ``llama_cpp.Llama``; the mmproj loads through llama-cpp-python's
multimodal handler (``MTMDChatHandler(clip_model_path=...)``), whose libmtmd context then
encodes images. Decoding is driven token by token here rather than through
``create_chat_completion`` so that the three stages can be timed apart and the token ids are
exact:

* ``vision_ms``: ``mtmd_encode_chunk`` (vision tower + projector on one image);
* ``prefill_ms``: the prompt's text tokens (``Llama.eval``), the visual rows written into the
  KV cache as embeddings (a ``llama_batch`` with ``embd`` set, ``n_batch`` rows per decode) and
  the first greedy token;
* ``decode_ms``: every later token, one ``Llama.eval`` each (argmax over the logits).

The visual rows are fed by edgekd rather than by libmtmd's helper so that an mmproj can say
what clip.cpp cannot: ``edgekd.vision.drop_first_tokens`` (a SigLIP tower with the ``default``
selection: clip keeps the first patch, the model drops it) and ``edgekd.vision.projector_scale``
(a factor folded into the projector, undone in :meth:`LlamaCppSession.encode_image`).

Images are resized as the checkpoint's processor does (a square resize, or the shortest edge
then a centre crop) with PIL first, so libmtmd only normalises them with the mmproj's mean/std.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import artifact, targets
from edgekd.envinfo import contribute
from edgekd.errors import require
from edgekd.runtime import ggml_cpu
from edgekd.runtime.base import BackendError, Generation, greedy_generate
from edgekd.runtime.prompt import open_image, pixels_to_uint8, render_template, split_at_image
from edgekd.targets import DecodeWeights

GGUF_KV_BYTES = 2  # llama.cpp's default KV cache type (f16)
# Prompt rows per llama_decode call and per compute pass. Measured at 801 prompt tokens on
# the 0.5B shape (docs/performance.md, "Where an answer with an image goes"): one
# llama_decode for the whole prompt in passes of 256 rows was the fastest at f16 and Q8_0
# (2% and 22% faster than 512/512), within 7% of the best at Q4_K_M; 1024-row passes were
# 10-20% slower everywhere.
N_BATCH = 2048
N_UBATCH = 256


def import_llama_cpp(error: type[Exception] = BackendError, what: str = "the llama.cpp backend"):
    """``llama_cpp`` and its libmtmd bindings, or ``error`` naming the extra to install.

    With a llama.cpp built as loadable CPU variants (``GGML_BACKEND_DL``, as edgekd's Makefile
    builds it) the best variant that a probe proves runs on this CPU is loaded first
    (:mod:`edgekd.runtime.ggml_cpu`; the Makefile's wheel does it on ``import llama_cpp``).
    """
    try:
        llama_cpp = require("llama_cpp", "gguf", error, what)
    except RuntimeError as e:  # the wheel's own variant loader: no variant runs here
        raise error(f"{what}: {e}") from None
    for module in ("llama_cpp._logger", "llama_cpp.llama_chat_format", "llama_cpp.mtmd_cpp"):
        require(module, "gguf", error, what)
    try:
        # libllama's handle: its symbols resolve to the ggml registry libllama and libmtmd
        # use (the package's libggml.so and libggml.so.0 are two copies, so two registries)
        ggml_cpu.load(llama_cpp.llama_cpp._lib)
    except ggml_cpu.NoUsableVariant as e:
        raise error(f"{what}: {e}; rebuild llama-cpp-python (make install)") from None
    # libmtmd logs every image to stderr by default; route it through llama-cpp-python's
    # logger, which Llama(verbose=False) silences
    callback = llama_cpp._logger.llama_log_callback
    llama_cpp.mtmd_cpp.mtmd_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.mtmd_cpp.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
    return llama_cpp


def environment_facts() -> dict[str, Any] | None:
    """llama.cpp's CPU variant, why better-ranked ones were skipped, and its features, when
    this process has loaded it."""
    llama_cpp = sys.modules.get("llama_cpp")
    if llama_cpp is None or not hasattr(llama_cpp, "llama_print_system_info"):
        return None
    info: dict[str, Any] = {"cpu_variant": ggml_cpu.loaded_variant()}
    chosen = ggml_cpu.selection()
    if chosen:
        info["cpu_variants"] = chosen["variants"]
        info["cpu_probe"] = {
            "checks": len(chosen["checks"]),
            "seconds": chosen.get("probe_s"),
            "cached": chosen["cached"],
        }
    info["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return info


contribute("llama_cpp", environment_facts)


def to_rgb_array(
    image,
    size: tuple[int, int],
    resample: int = 3,
    shortest_edge: int | None = None,
    pad_color: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """A PIL image, path or (H, W, 3) uint8 array as (H, W, 3) uint8 at ``size`` (height, width).

    With ``pad_color`` the image is first padded to a centred square of that colour (LLaVA's
    ``pad``). With ``shortest_edge`` it is resized so that its shorter side has that length
    (aspect kept, as CLIP's processor rounds it), then centre-cropped to ``size``.
    """
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise BackendError(
                f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
            )
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if pad_color is not None and image.size[0] != image.size[1]:
        side = max(image.size)
        square = Image.new("RGB", (side, side), tuple(pad_color))
        square.paste(image, ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        image = square
    if shortest_edge is not None and image.size != (size[1], size[0]):
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        other = int(shortest_edge * long / short)  # transformers' get_resize_output_image_size
        new = (shortest_edge, other) if w <= h else (other, shortest_edge)
        if new != image.size:
            image = image.resize(new, resample=resample)
        left, top = (new[0] - size[1]) // 2, (new[1] - size[0]) // 2  # as transformers crops
        image = image.crop((left, top, left + size[1], top + size[0]))
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), resample=resample)
    return np.asarray(image, dtype=np.uint8)


def pad_color(pre: dict[str, Any]) -> tuple[int, int, int] | None:
    """LLaVA's pad colour (the mean, in bytes) when the preprocessing pads to a square."""
    if not pre.get("pad_to_square"):
        return None
    return tuple(int(x * 255) for x in pre["image_mean"])


def mmproj_facts(path: str | Path) -> dict[str, float]:
    """edgekd's keys in an mmproj (rows to drop, the folded projector scale), defaults if absent."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    facts = {"drop_first_tokens": 0, "projector_scale": 1.0}
    keys = (
        (targets.GGUF_DROP_KEY, "drop_first_tokens", int),
        (targets.GGUF_SCALE_KEY, "projector_scale", float),
    )
    for key, name, kind in keys:
        field = reader.get_field(key)
        if field is not None:
            facts[name] = kind(field.parts[field.data[0]][0])
    return facts


_SILENT = []  # keeps the no-op ctypes callback alive while llama.cpp holds it


@contextlib.contextmanager
def quiet_llama_logs():
    """Discard libllama's log lines (e.g. the quantizer's per-tensor report) inside the block."""
    llama_cpp = import_llama_cpp()
    if not _SILENT:
        _SILENT.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
    llama_cpp.llama_log_set(_SILENT[0], ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))


class LlamaCppSession:
    """``model.gguf`` + ``mmproj.gguf`` loaded once; greedy generation with stage timings.

    Args:
        model_path: The language model GGUF.
        mmproj_path: The vision GGUF (``None``: text only).
        chat_template: Jinja template the prompt is rendered with.
        image_size: (height, width) images are resized to before encoding.
        image_token: The placeholder the template emits for an image.
        stop_ids: Token ids that end generation (kept in ``token_ids``, as transformers does).
        n_ctx: Context length of the llama.cpp context.
        n_threads: CPU threads (``None``: llama-cpp-python's default).
        n_batch: Prompt rows handed to one ``llama_decode`` (``None``: :data:`N_BATCH`, at
            most ``n_ctx``).
        n_ubatch: Rows llama.cpp computes at once within it (``None``: :data:`N_UBATCH`).
        n_gpu_layers: Layers offloaded to a GPU build of llama.cpp.
        logits_all: Keep every position's logits (``Llama.scores``), for parity checks.
        resample: PIL resampling filter for the resize (3: bicubic, SigLIP's).
        resize_shortest_edge: Resize the shortest edge to this, then centre-crop to
            ``image_size`` (CLIP's preprocessing); ``None``: a square resize.
        pad_color: Pad to a centred square of this colour first (LLaVA's ``pad``).
        drop_first_tokens: Rows of clip's output dropped before they are fed; ``None``: what
            the mmproj says (``edgekd.vision.drop_first_tokens``); 0 feeds every row, as stock
            llama.cpp tools do.
        error: Exception raised on failures (``ExportError`` when an exporter validates).

    Uses two private llama-cpp-python members (0.3.x): ``MTMDChatHandler._init_mtmd_context``
    to load the mmproj the way ``create_chat_completion`` would, and ``Llama._ctx`` for the
    last position's logits and the raw context handed to libmtmd.
    """

    def __init__(
        self,
        model_path: str | Path,
        mmproj_path: str | Path | None,
        *,
        chat_template: str,
        image_size: tuple[int, int],
        image_token: str = "<image>",
        stop_ids: list[int] | tuple[int, ...] = (),
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        n_gpu_layers: int = 0,
        logits_all: bool = False,
        resample: int = 3,
        resize_shortest_edge: int | None = None,
        pad_color: tuple[int, int, int] | None = None,
        drop_first_tokens: int | None = None,
        error: type[Exception] = BackendError,
    ) -> None:
        llama_cpp = import_llama_cpp(error)
        self._lc, self._mtmd, self._error = llama_cpp, llama_cpp.mtmd_cpp, error
        self.chat_template, self.image_token = chat_template, image_token
        self.image_size, self.resample = tuple(image_size), resample
        self.resize_shortest_edge, self.pad_color = resize_shortest_edge, pad_color
        self.stop_ids = set(int(i) for i in stop_ids)
        self.logits_all = logits_all
        self.handler = None
        self.drop_first_tokens = self.mmproj_drop = 0
        self.projector_scale = 1.0
        if mmproj_path is not None:
            facts = mmproj_facts(mmproj_path)
            self.projector_scale = facts["projector_scale"]
            self.mmproj_drop = facts["drop_first_tokens"]
            self.drop_first_tokens = (
                facts["drop_first_tokens"] if drop_first_tokens is None else drop_first_tokens
            )
            self.handler = llama_cpp.llama_chat_format.MTMDChatHandler(
                clip_model_path=str(mmproj_path), verbose=False, use_gpu=n_gpu_layers > 0
            )
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(model_path),
                chat_handler=self.handler,
                n_ctx=n_ctx,
                n_batch=min(n_ctx, n_batch or N_BATCH),
                n_ubatch=min(n_ctx, n_batch or N_BATCH, n_ubatch or N_UBATCH),
                n_threads=n_threads,
                n_gpu_layers=n_gpu_layers,
                logits_all=logits_all,
                verbose=False,
            )
        except ValueError as e:
            raise error(f"llama.cpp cannot load '{model_path}': {e}") from None
        if self.handler is not None:
            try:  # the handler owns the libmtmd context and frees it with the model
                self.handler._init_mtmd_context(self.llm)
            except ValueError as e:
                raise error(f"libmtmd cannot load '{mmproj_path}': {e}") from None
        self.n_vocab = self.llm.n_vocab()
        self.n_embd = self.llm.n_embd()
        self.special = {
            name: self.llm.detokenize([tok], special=True).decode("utf-8", errors="replace")
            for name, tok in (
                ("bos_token", self.llm.token_bos()),
                ("eos_token", self.llm.token_eos()),
            )
            if tok >= 0
        }

    # ---- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of ``text`` (special tokens parsed, no BOS added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def last_logits(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # ---- images ---------------------------------------------------------------------------
    def _image_chunks(self, image):
        """libmtmd chunks for one image (caller frees them) and the image chunk among them."""
        if self.handler is None:
            raise self._error("this session has no mmproj; it cannot take images")
        m = self._mtmd
        rgb = np.ascontiguousarray(self.rgb(image))
        data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
        chunks = m.mtmd_input_chunks_init()
        marker = m.mtmd_default_marker()
        text = m.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = (
            marker,
            len(marker),
            False,
            True,
        )
        try:
            arr = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = m.mtmd_tokenize(self.handler.mtmd_ctx, chunks, ctypes.byref(text), arr, 1)
            if rc != 0:
                raise self._error(f"libmtmd could not tokenize the image (code {rc})")
        finally:
            m.mtmd_bitmap_free(bitmap)
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                return chunks, chunk
        m.mtmd_input_chunks_free(chunks)
        raise self._error("libmtmd produced no image chunk")

    def rgb(self, image) -> np.ndarray:
        """The (H, W, 3) uint8 image libmtmd gets: resized (and cropped) as the processor does."""
        return to_rgb_array(
            image, self.image_size, self.resample, self.resize_shortest_edge, self.pad_color
        )

    def image_rows(self, chunk) -> int:
        """Visual tokens an image chunk becomes in the prompt (clip's rows minus the dropped)."""
        return self._mtmd.mtmd_input_chunk_get_n_tokens(chunk) - self.drop_first_tokens

    def _encode(self, chunk) -> tuple[np.ndarray, float]:
        """clip's projected rows of one image chunk, the dropped ones removed, and the ms."""
        m = self._mtmd
        t0 = time.perf_counter()
        rc = m.mtmd_encode_chunk(self.handler.mtmd_ctx, chunk)
        if rc != 0:
            raise self._error(f"the mmproj failed to encode the image (code {rc})")
        n = m.mtmd_input_chunk_get_n_tokens(chunk)
        ptr = m.mtmd_get_output_embd(self.handler.mtmd_ctx)
        rows = np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd)
        rows = np.array(rows[self.drop_first_tokens :], dtype=np.float32, copy=True)  # own copy
        return rows, (time.perf_counter() - t0) * 1e3

    def encode_image(self, image) -> tuple[np.ndarray, float]:
        """The model's projected visual tokens (N, D_text) of one image, and the encoding ms
        (the folded projector scale undone, so they compare with PyTorch's)."""
        chunks, chunk = self._image_chunks(image)
        try:
            rows, ms = self._encode(chunk)
            return rows / self.projector_scale, ms
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)

    def _decode_rows(self, rows: np.ndarray) -> None:
        """Write visual rows (N, n_embd) into the KV cache as embeddings at the current
        position: ``llama_batch`` with ``embd`` set, ``n_batch`` rows per ``llama_decode``."""
        lc, llm = self._lc, self.llm
        n = len(rows)
        if n == 0:
            raise self._error("the mmproj gave no visual rows after the dropped ones")
        if llm.n_tokens + n > llm.n_ctx():
            raise self._error(f"prompt of {llm.n_tokens + n} tokens exceeds n_ctx {llm.n_ctx()}")
        step = min(n, llm.n_batch)
        batch = lc.llama_batch_init(step, self.n_embd, 1)
        try:
            for start in range(0, n, step):
                part = rows[start : start + step]
                k = len(part)
                ctypes.memmove(batch.embd, part.ctypes.data, part.nbytes)
                for j in range(k):
                    batch.pos[j] = llm.n_tokens + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = False  # a prompt ends with text tokens
                batch.n_tokens = k
                rc = lc.llama_decode(llm._ctx.ctx, batch)
                if rc != 0:
                    raise self._error(f"decoding the image embeddings failed (code {rc})")
                llm.n_tokens += k
        finally:
            lc.llama_batch_free(batch)

    # ---- generation -----------------------------------------------------------------------
    def render(self, prompt: str, with_image: bool) -> str:
        """The chat-template text of one user turn (``image_token`` where the image goes)."""
        return render_template(self.chat_template, prompt, with_image, **self.special)

    def prompt_pieces(self, prompt: str, image) -> list[list[int] | str]:
        """The rendered prompt as token-id lists with ``"image"`` where the image goes."""
        text = self.render(prompt, image is not None)
        if image is None:
            return [self.tokenize(text)]
        parts = text.split(self.image_token)
        if len(parts) != 2:
            raise self._error(
                f"the chat template rendered {len(parts) - 1} image placeholders for one image"
            )
        return [self.tokenize(parts[0]), "image", self.tokenize(parts[1])]

    @contextlib.contextmanager
    def _image_chunk(self, pieces: list, image):
        """libmtmd's image chunk of ``image`` if ``pieces`` hold ``"image"`` (else None),
        freed when the block ends."""
        if "image" not in pieces:
            yield None
            return
        chunks, chunk = self._image_chunks(image)
        try:
            yield chunk
        finally:
            self._mtmd.mtmd_input_chunks_free(chunks)

    def prefill(self, pieces: list, image=None) -> None:
        """Reset, then feed ``pieces`` (token-id lists and ``"image"``, encoded here)."""
        with self._image_chunk(pieces, image) as chunk:
            rows = self._encode(chunk)[0] if chunk is not None else None
            self._feed(pieces, rows)

    def _feed(self, pieces: list, rows: np.ndarray | None) -> None:
        llm = self.llm
        llm.reset()
        llm._ctx.kv_cache_clear()
        if not pieces or isinstance(pieces[-1], str) or not pieces[-1]:
            raise self._error("the prompt must end with text tokens (the chat template's turn end)")
        for piece in pieces:
            if isinstance(piece, str):
                self._decode_rows(rows)
            elif piece:
                if llm.n_tokens + len(piece) > llm.n_ctx():
                    raise self._error(f"prompt exceeds n_ctx {llm.n_ctx()}")
                llm.eval(piece)

    def generate_pieces(
        self, pieces: list, image=None, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy decoding after ``pieces`` (token-id lists and ``"image"`` markers), through
        the shared loop (:func:`edgekd.runtime.base.greedy_generate`).

        ``ignore_eos`` decodes exactly ``max_new_tokens`` tokens (fixed-length speed runs).
        """
        with self._image_chunk(pieces, image) as chunk:
            return self._greedy(pieces, chunk, max_new_tokens, ignore_eos)

    def _greedy(self, pieces: list, chunk, max_new_tokens: int, ignore_eos: bool) -> Generation:
        n_image = 0 if chunk is None else self.image_rows(chunk)
        state: dict[str, Any] = {}
        llm = self.llm

        def encode_image():
            if chunk is not None:
                state["rows"] = self._encode(chunk)[0]

        def prefill(_) -> int:
            self._feed(pieces, state.get("rows"))
            return int(np.argmax(self.last_logits()))

        def step(token: int, _position: int) -> int:
            llm.eval([token])
            return int(np.argmax(self.last_logits()))

        return greedy_generate(
            encode_image=encode_image,
            prefill=prefill,
            step=step,
            prompt_tokens=sum(len(p) for p in pieces if not isinstance(p, str)) + n_image,
            max_new_tokens=max_new_tokens,
            stop_ids=() if ignore_eos else self.stop_ids,
            decode=lambda ids: self.detokenize([i for i in ids if i not in self.stop_ids]),
            has_image=chunk is not None,
            context_length=llm.n_ctx(),
        )

    def generate(
        self, image, prompt: str, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy answer to ``prompt`` about ``image`` (PIL image, path, uint8 array or None)."""
        pieces = self.prompt_pieces(prompt, image)
        return self.generate_pieces(pieces, image, max_new_tokens, ignore_eos)

    def close(self) -> None:
        self.llm.close()


def open_backend(path, *, device: str, threads: int | None) -> LlamaCppBackend:
    """The gguf target's backend; on a GPU every layer is offloaded (a CUDA build needed)."""
    if device != "cpu" and not import_llama_cpp().llama_supports_gpu_offload():
        raise BackendError(
            "this llama-cpp-python is built without GPU support; rebuild it: "
            'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir '
            "llama-cpp-python"
        )
    return LlamaCppBackend(path, n_threads=threads, n_gpu_layers=0 if device == "cpu" else -1)


def decode_weights(loaded: artifact.Artifact) -> DecodeWeights:
    """Every tensor of ``model.gguf`` except ``token_embd.weight``, from the file's tensor
    table; without a separate ``output.weight`` llama.cpp uses ``token_embd`` as the output
    matrix, so it is counted (once). The KV cache is llama.cpp's default type, f16."""
    from gguf import GGUFReader

    reader = GGUFReader(str(loaded.path(targets.GGUF_MODEL)))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    tied = "output.weight" not in sizes
    weights = sum(b for name, b in sizes.items() if name != "token_embd.weight" or tied)
    return DecodeWeights(weights, kv_element_bytes=GGUF_KV_BYTES, tied_embedding=tied)


class LlamaCppBackend:
    """A ``gguf`` artifact directory, ready to ``generate``.

    Args:
        artifact_dir: Directory written by ``edgekd export --target gguf``.
        n_threads: CPU threads (``None``: llama-cpp-python's default, half the cores).
        n_gpu_layers: Layers to offload when llama-cpp-python was built with a GPU backend.
        n_ctx: Context length; default: visual tokens + 1024, at most the model's.
        logits_all: Keep every position's logits (needed by :meth:`prefill_logits`).
        preprocessing: With ``verify=False`` (the exporter's validation, before the manifest
            exists): what the manifest will record (:func:`edgekd.artifact.preprocessing`).
        resample: PIL resampling filter of the checkpoint's processor (3: bicubic).
        verify: Check the manifest first.
        n_batch, n_ubatch: Prompt batch sizes (:class:`LlamaCppSession`).
        drop_first_tokens: Override the mmproj's rows to drop (0: feed every row of clip's
            output, as stock llama.cpp tools do; for measuring them).

    Raises:
        ArtifactError: the manifest is missing or of another target, or a file is missing,
            truncated, modified or unlisted.
        BackendError: llama-cpp-python is not installed.
    """

    name = "llamacpp"

    def __init__(
        self,
        artifact_dir: str | Path,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        n_ctx: int | None = None,
        *,
        logits_all: bool = False,
        preprocessing: dict[str, Any] | None = None,
        resample: int | None = None,
        verify: bool = True,
        drop_first_tokens: int | None = None,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
        error: type[Exception] = BackendError,
    ) -> None:
        self.root = Path(artifact_dir)
        self.artifact = artifact.verify(self.root, expect="gguf") if verify else None
        if self.artifact is not None:
            preprocessing = self.artifact.preprocessing
            vision = self.artifact.components.get("vision", {})
            resample = int(vision.get("image_resample", 3))
        self.pre = dict(preprocessing or {})
        self.image_token_id = int(self.pre["image_token_id"])
        self.eos_token_ids = set(int(i) for i in self.pre.get("eos_token_ids", []))
        self.session = LlamaCppSession(
            self.root / targets.GGUF_MODEL,
            self.root / targets.GGUF_MMPROJ,
            chat_template=self.pre["chat_template"],
            image_size=tuple(self.pre["image_size"]),
            image_token=self.pre["image_token"],
            stop_ids=sorted(self.eos_token_ids),
            n_ctx=n_ctx or int(self.pre["image_tokens_per_image"]) + 1024,
            n_threads=n_threads,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_gpu_layers=n_gpu_layers,
            logits_all=logits_all,
            resample=3 if resample is None else resample,
            resize_shortest_edge=self.pre.get("resize_shortest_edge"),
            pad_color=pad_color(self.pre),
            drop_first_tokens=drop_first_tokens,
            error=error,
        )
        self.context_length = self.session.llm.n_ctx()

    # ---- stages (the Backend protocol) ------------------------------------------------------
    def encode(self, image, prompt: str) -> tuple[np.ndarray, np.ndarray | None]:
        """llama.cpp's own token ids (image tokens expanded) and the pixel values the
        checkpoint's processor would make of the resized image."""
        image = open_image(image)
        pieces = self.session.prompt_pieces(prompt, image)
        n_image = int(self.pre["image_tokens_per_image"])
        n_image += self.session.mmproj_drop - self.session.drop_first_tokens  # a drop override
        ids = [t for p in pieces for t in ([self.image_token_id] * n_image if p == "image" else p)]
        pixels = None
        if image is not None:
            rgb = self.session.rgb(image)
            scale = float(self.pre.get("rescale_factor", 1 / 255))
            mean = np.asarray(self.pre["image_mean"], np.float32)[:, None, None]
            std = np.asarray(self.pre["image_std"], np.float32)[:, None, None]
            pixels = ((rgb.transpose(2, 0, 1).astype(np.float32) * scale - mean) / std)[None]
        return np.asarray([ids], np.int64), pixels

    def _image(self, pixel_values) -> np.ndarray:
        """(3, H, W) pixel values -> the (H, W, 3) uint8 image llama.cpp takes."""
        p = self.pre
        scale = p.get("rescale_factor", 1 / 255)
        return pixels_to_uint8(pixel_values, p["image_mean"], p["image_std"], scale)

    def visual_tokens(self, pixel_values) -> np.ndarray:
        """(B, 3, H, W) pixels -> (B, N, D_text) visual tokens from the mmproj."""
        batch = np.asarray(pixel_values)
        return np.stack([self.session.encode_image(self._image(pv))[0] for pv in batch])

    def prefill_logits(self, input_ids, pixel_values=None) -> np.ndarray:
        """(1, L, V) prompt logits; the rows at image positions are not computed by llama.cpp."""
        if not self.session.logits_all:
            raise BackendError("prefill_logits needs a backend opened with logits_all=True")
        pieces = split_at_image(input_ids, self.image_token_id)
        image = None if pixel_values is None else self._image(np.asarray(pixel_values)[0])
        self.session.prefill(pieces, image)
        n = self.session.llm.n_tokens
        return np.asarray(self.session.llm.scores[:n], np.float32)[None]

    def generate_ids(
        self, input_ids, pixel_values=None, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy decoding of an encoded prompt: the image-token run is replaced by the image,
        which the mmproj encodes (pixel values are turned back into the uint8 image)."""
        pieces = split_at_image(input_ids, self.image_token_id)
        image = None if pixel_values is None else self._image(np.asarray(pixel_values)[0])
        return self.session.generate_pieces(pieces, image, max_new_tokens, ignore_eos)

    def generate(
        self, image, prompt: str, max_new_tokens: int = 32, ignore_eos: bool = False
    ) -> Generation:
        """Greedy answer with stage timings (see the module docstring for what each covers)."""
        return self.session.generate(image, prompt, max_new_tokens, ignore_eos)

    def info(self) -> dict[str, Any]:
        """What a benchmark records about this backend."""
        return {
            "backend": self.name,
            "precision": self.artifact.precision if self.artifact else None,
            "n_ctx": self.context_length,
            "artifact": str(self.root),
        }

    def close(self) -> None:
        self.session.close()
