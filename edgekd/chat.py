"""The ``<image>`` placeholder of LLaVA text, how a turn becomes chat-template content, and the
tokens that end a turn."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's placeholder in the JSON, whatever the processor's token is


def content_items(text: str) -> list[dict[str, str]]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "\\nWhat
    is it?"}]``: an image item at each placeholder, the text between them (empty text dropped)."""
    items: list[dict[str, str]] = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if k:
            items.append({"type": "image"})
        if piece:
            items.append({"type": "text", "text": piece})
    return items


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """EOS plus the chat template's end-of-turn token(s), as far as the vocabulary has them."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        if token in vocab:
            ids.add(vocab[token])
    if generation_config is not None and generation_config.eos_token_id is not None:
        eos = generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


# Prepended to a language model's own chat template: message contents given as item lists
# (``content_items``, transformers' processors) become strings with ``<image>`` at each image
# item, which templates written for text-only models expect. String contents pass unchanged.
_ITEMS_TO_TEXT = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.messages = ns.messages + [m] -%}"
    "{%- else -%}{%- set ns.text = '' -%}"
    "{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '" + IMAGE_PLACEHOLDER + "' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': ns.text}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


def with_image_items(template: str) -> str:
    """A text model's chat template that also renders image items as ``<image>``."""
    if template.startswith(_ITEMS_TO_TEXT):
        return template
    return _ITEMS_TO_TEXT + template
