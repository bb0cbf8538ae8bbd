"""LLaVA-format data: validate the JSON up front, tokenize conversations, collate batches.

The samples are read and validated by :mod:`edgekd.data.samples`; the format (LLaVA's
``llava_v1_5_mix665k.json`` and its descendants)::

    [{"id": "q1", "image": "rel/path.png",            # optional: text-only samples have none
      "conversations": [{"from": "human", "value": "<image>\\nQuestion"},
                        {"from": "gpt", "value": "Answer"}, ...]}]

How a sample becomes tensors, for any LLaVA-family processor with a chat template:

1. turns become chat messages; ``<image>`` in a user turn becomes a ``{"type": "image"}`` item;
2. the chat template renders the whole conversation; each assistant message's character span
   comes from rendering prefixes (``messages[:i]`` + generation prompt starts it, ``messages[:i+1]``
   ends it, end-of-turn text included so the model learns to stop);
3. each image placeholder is expanded into the processor's number of visual tokens (measured once
   by running the processor on a dummy image), the spans shifted accordingly;
4. the tokenizer's offsets label every token whose first character lies in an assistant span;
   everything else is ``-100``.

The result equals the processor's own ``processor(text=..., images=...)`` expansion (a test pins
it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from edgekd.chat import IMAGE_PLACEHOLDER, content_items
from edgekd.data.samples import load_llava_json, resolve_images, validate_samples
from edgekd.errors import DataError, ModelError
from edgekd.images import open_rgb

IGNORE_INDEX = -100


# ---- the dataset -----------------------------------------------------------------------------
@dataclass
class _Encoded:
    input_ids: np.ndarray  # (L,) int64, after truncation
    labels: np.ndarray  # (L,) int64, IGNORE_INDEX outside assistant spans
    full_length: int  # before truncation

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    @property
    def n_answer_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format samples as token ids, assistant-only labels and pixel values.

    Labels are aligned with ``input_ids`` (the transformers convention: the model shifts them).

    Args:
        samples_or_path: A LLaVA JSON file or already loaded samples (validated either way).
        image_root: Folder the ``image`` paths are relative to (paths may not leave it).
            ``None`` only for text-only data.
        processor: A LLaVA-family processor (``.tokenizer``, ``.image_processor``, a chat template).
        max_length: Sequences are right-truncated to this many tokens; image tokens are never cut.
        image_token_id: Overrides the id read from the processor.

    Items are dicts: ``input_ids``, ``attention_mask``, ``labels`` (LongTensor (L,)),
    ``pixel_values`` ((3, H, W) float, or ``None`` for text-only samples) and ``id``.
    Token encodings are cached after their first computation (images are not), so :meth:`stats`
    before training makes later epochs cheap, and DataLoader workers inherit the cache on fork.

    Raises:
        DataError: invalid samples, image paths outside ``image_root``, missing image files, or a
            ``max_length`` that cannot hold one image's tokens.
        ModelError: the processor has no chat template or no image token.
    """

    def __init__(
        self,
        samples_or_path: str | os.PathLike | Sequence[dict],
        image_root: str | os.PathLike | None,
        processor: Any,
        max_length: int,
        *,
        image_token_id: int | None = None,
    ) -> None:
        if isinstance(samples_or_path, (str, os.PathLike)):
            self.samples = load_llava_json(samples_or_path)
        else:
            self.samples = validate_samples(list(samples_or_path))
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = int(max_length)
        self._template_owner, self._list_content = _chat_template_owner(processor, self.tokenizer)
        self.image_token, self.image_token_id = _image_token(
            processor, self.tokenizer, image_token_id
        )
        self.image_paths = resolve_images(self.samples, image_root)
        has_images = any(p is not None for p in self.image_paths)
        self.num_image_tokens = (
            _measure_image_tokens(processor, self.image_token, self.image_token_id)
            if has_images
            else 0
        )
        if has_images and self.max_length <= self.num_image_tokens:
            raise DataError(
                f"max_length {self.max_length} cannot hold the {self.num_image_tokens} image "
                f"tokens of one image plus text; raise max_length above {self.num_image_tokens}"
            )
        self._cache: list[_Encoded | None] = [None] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        enc = self.encode(i)
        return {
            "input_ids": torch.from_numpy(enc.input_ids.copy()),
            "attention_mask": torch.ones(len(enc.input_ids), dtype=torch.long),
            "labels": torch.from_numpy(enc.labels.copy()),
            "pixel_values": self.load_pixels(i),
            "id": self.samples[i]["id"],
        }

    # ---- text ------------------------------------------------------------------------------
    def render(self, i: int) -> tuple[str, list[tuple[int, int]]]:
        """The chat-template text of sample ``i`` and its assistant character spans (unexpanded)."""
        sample = self.samples[i]
        messages = self._messages(sample["conversations"])
        full = self._render(messages, sample["id"])
        spans = []
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            head = self._render(messages[:k], sample["id"], add_generation_prompt=True)
            upto = self._render(messages[: k + 1], sample["id"])
            for prefix, n in ((head, k), (upto, k + 1)):
                if not full.startswith(prefix):
                    raise ModelError(
                        f"the chat template is not prefix-stable: rendering the first {n} "
                        f"messages of sample '{sample['id']}' is not a prefix of the whole "
                        "conversation, so "
                        "assistant spans cannot be located; use a template that renders earlier "
                        "turns the same way whatever follows"
                    )
            # trailing whitespace after the end-of-turn text belongs to the next prompt
            end = len(head) + len(upto[len(head) :].rstrip())
            spans.append((len(head), end))
        n_images = full.count(self.image_token)
        expected = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in sample["conversations"])
        if n_images != expected:
            raise ModelError(
                f"the chat template rendered {n_images} '{self.image_token}' tokens for sample "
                f"'{sample['id']}' with {expected} image(s); the template must emit the image "
                "token once per {'type': 'image'} item"
            )
        return full, spans

    def encode(self, i: int) -> _Encoded:
        """Token ids and labels of sample ``i`` (cached)."""
        if self._cache[i] is not None:
            return self._cache[i]
        text, spans = self.render(i)
        text, spans = self._expand_images(text, spans)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
        in_span = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            in_span |= (starts >= s) & (starts < e)
        labels = np.where(in_span, ids, IGNORE_INDEX)
        full_length = len(ids)
        if full_length > self.max_length:
            self._check_images_fit(ids, i)
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        self._cache[i] = _Encoded(ids, labels, full_length)
        return self._cache[i]

    def prompt_ids(self, i: int) -> list[int]:
        """Token ids of sample ``i`` up to its last assistant turn, with the generation prompt
        and expanded image tokens: what a model is given to answer (evaluation, parity)."""
        sample = self.samples[i]
        messages = self._messages(sample["conversations"])
        last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
        text = self._render(messages[:last], sample["id"], add_generation_prompt=True)
        text, _ = self._expand_images(text, [])
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _messages(self, conversations: list[dict]) -> list[dict]:
        return [{"role": t["from"], "content": self._content(t["value"])} for t in conversations]

    def _content(self, text: str) -> str | list[dict]:
        if not self._list_content:  # a text-only tokenizer template: inline the image token
            return text.replace(IMAGE_PLACEHOLDER, self.image_token)
        return content_items(text)

    def _render(self, messages: list[dict], sid: str, add_generation_prompt: bool = False) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self._template_owner.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:  # e.g. raise_exception("roles must alternate")
            raise DataError(f"sample '{sid}': the chat template refused it: {e}") from None

    def _expand_images(self, text: str, spans: list[tuple[int, int]]):
        if self.num_image_tokens <= 1 or self.image_token not in text:
            return text, spans
        tok = self.image_token
        starts = [m.start() for m in re.finditer(re.escape(tok), text)]
        grow = (self.num_image_tokens - 1) * len(tok)

        def shift(pos: int) -> int:
            return pos + grow * sum(1 for s in starts if s < pos)

        expanded = (tok * self.num_image_tokens).join(text.split(tok))
        return expanded, [(shift(s), shift(e)) for s, e in spans]

    def _check_images_fit(self, ids: np.ndarray, i: int) -> None:
        pos = np.flatnonzero(ids == self.image_token_id)
        if len(pos) and pos[-1] >= self.max_length:
            raise DataError(
                f"sample '{self.samples[i]['id']}': image tokens at positions {pos[0]}..{pos[-1]} "
                f"do not fit max_length {self.max_length}; raise max_length (truncation never "
                "cuts image tokens)"
            )

    # ---- images ----------------------------------------------------------------------------
    def load_pixels(self, i: int) -> torch.Tensor | None:
        """Preprocessed (3, H, W) pixels of sample ``i``, or ``None`` for a text-only sample.

        Raises:
            DataError: the file cannot be opened or decoded (naming the sample and the path).
        """
        path = self.image_paths[i]
        if path is None:
            return None
        rgb = open_rgb(path, self.samples[i]["id"])
        out = self.processor.image_processor(images=rgb, return_tensors="pt")
        return out["pixel_values"][0]

    # ---- statistics ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Tokenize every sample once (no images) and summarize lengths and truncation.

        Returns:
            ``n_samples``, ``n_truncated`` (longer than ``max_length``), ``n_no_answer_tokens``
            (no labelled token left after truncation: they teach nothing), ``mean_length`` and
            ``max_length_seen`` (both before truncation, to help choose ``max_length``), plus
            ``max_length`` and ``image_tokens_per_image``.
        """
        encs = [self.encode(i) for i in range(len(self))]
        full = np.asarray([e.full_length for e in encs])
        return {
            "n_samples": len(encs),
            "n_truncated": sum(e.truncated for e in encs),
            "n_no_answer_tokens": sum(e.n_answer_tokens == 0 for e in encs),
            "mean_length": float(full.mean()),
            "max_length_seen": int(full.max()),
            "max_length": self.max_length,
            "image_tokens_per_image": self.num_image_tokens,
        }

    @property
    def n_truncated(self) -> int:
        """Samples longer than ``max_length`` (tokenizes everything once; cached afterwards)."""
        return self.stats()["n_truncated"]


def _chat_template_owner(processor: Any, tokenizer: Any) -> tuple[Any, bool]:
    """Who renders conversations, and whether it takes list content (processors do)."""
    if getattr(processor, "chat_template", None) and processor is not tokenizer:
        return processor, True
    if getattr(tokenizer, "chat_template", None):
        return tokenizer, False
    raise ModelError(
        "the processor and its tokenizer have no chat template; set "
        "processor.chat_template (e.g. ChatML) before building the dataset"
    )


def _image_token(processor: Any, tokenizer: Any, override: int | None) -> tuple[str, int]:
    token = (
        getattr(processor, "image_token", None)
        or getattr(tokenizer, "image_token", None)
        or IMAGE_PLACEHOLDER
    )
    tid = override
    if tid is None:
        tid = getattr(processor, "image_token_id", None)
    if tid is None:
        tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == getattr(tokenizer, "unk_token_id", object()):
        raise ModelError(f"the tokenizer has no image token '{token}'; pass image_token_id")
    return token, int(tid)


def _measure_image_tokens(processor: Any, image_token: str, image_token_id: int) -> int:
    """Visual tokens per image, counted in the processor's own expansion of one dummy image."""
    from PIL import Image

    h, w = _processor_image_size(processor.image_processor)
    dummy = Image.new("RGB", (w, h))
    ids = processor(text=image_token, images=dummy, return_tensors="pt")["input_ids"]
    n = int((ids == image_token_id).sum())
    if n == 0:
        raise ModelError(
            f"the processor did not expand '{image_token}' (id {image_token_id}) "
            "into image tokens; check image_token_id"
        )
    return n


def _processor_image_size(image_processor: Any) -> tuple[int, int]:
    def get(d: Any, key: str) -> Any:
        return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

    for attr in ("crop_size", "size"):
        d = getattr(image_processor, attr, None)
        if d is None or (attr == "crop_size" and not getattr(image_processor, "do_center_crop", 0)):
            continue
        if get(d, "height") and get(d, "width"):
            return int(get(d, "height")), int(get(d, "width"))
        if get(d, "shortest_edge"):
            return int(get(d, "shortest_edge")), int(get(d, "shortest_edge"))
    return 224, 224


class LlavaCollator:
    """Pad items from :class:`LlavaDataset` into a batch.

    The batch holds ``input_ids`` (pad id), ``attention_mask`` (0) and ``labels`` (-100), all
    (B, L); ``pixel_values`` (N_images, 3, H, W) holding only the samples that have an image,
    in row order (``None`` when no row has one), which is the order the model's merge fills the
    image tokens in; ``has_image`` (B,) bool; and ``ids``.

    Args:
        pad_token_id: The tokenizer's pad id.
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.
        pad_to_multiple_of: Round L up to a multiple of this (fewer distinct shapes).
    """

    def __init__(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ) -> None:
        if padding_side not in ("right", "left"):
            raise DataError(f"padding_side '{padding_side}' is not one of: right, left")
        if pad_token_id is None:
            raise DataError("pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pixels = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
        return {
            "input_ids": self._pad([it["input_ids"] for it in items], length, self.pad_token_id),
            "attention_mask": self._pad([it["attention_mask"] for it in items], length, 0),
            "labels": self._pad([it["labels"] for it in items], length, IGNORE_INDEX),
            "pixel_values": torch.stack(pixels) if pixels else None,
            "has_image": torch.tensor([it.get("pixel_values") is not None for it in items]),
            "ids": [it.get("id") for it in items],
        }

    def _pad(self, rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for r, row in enumerate(rows):
            if self.padding_side == "right":
                out[r, : len(row)] = row
            else:
                out[r, length - len(row) :] = row
        return out
