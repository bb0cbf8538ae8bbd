"""An offline byte-level BPE tokenizer with a ChatML chat template, for tiny models.

The tests and the demo cannot download a tokenizer, so edgekd trains one in about a second
from a built-in corpus (plus any extra text). Byte-level BPE never meets an unknown character,
so it tokenizes any text; the corpus only decides which merges make common words short.
"""

from __future__ import annotations

from collections.abc import Iterable

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, IMAGE_TOKEN]

# ChatML, as Qwen2 uses it. Content may be a string or a list of {"type": "image"|"text"} items
# (the form transformers' processors pass); an image item renders as the <image> placeholder,
# which the processor then expands to one token per visual feature.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SHAPES = "circle rectangle triangle square shape"
_COLORS = "red green blue black gray grey teal brown yellow white color colour"
_FASHION = (
    "T-shirt/top t-shirt top trouser trousers pullover dress coat sandal shirt sneaker bag "
    "ankle boot"
)
_GRID = "top left top right bottom left bottom right position cell grid item items panel"
_WORDS = (
    "what which where how many is there a an the in of image picture photo does not contain "
    "shape color? yes no zero one two three four five six seven eight nine ten count "
    "question answer user assistant system describe show shows kind type category"
)
BUILTIN_CORPUS = [
    _SHAPES,
    _COLORS,
    _FASHION,
    _GRID,
    _WORDS,
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "What shape is in the image? What color is the shape? Is there a red shape in the image?",
    "Does the image contain a circle? Is there not a blue triangle? What is the shape?",
    "What item is in the top left? How many bags are there? Where is the sneaker?",
    "Is there a dress in the bottom right? Which category is shown in the top right cell?",
]


def train_tokenizer(
    extra_texts: Iterable[str] = (), vocab_size: int = 1024, model_max_length: int = 2048
):
    """Train a byte-level BPE tokenizer offline and wrap it for transformers.

    Args:
        extra_texts: Text to learn merges from, on top of :data:`BUILTIN_CORPUS`.
        vocab_size: Target vocabulary size, special tokens included.
        model_max_length: Recorded on the tokenizer for truncation warnings.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as EOS and pad, ChatML
        ``<|im_start|>``/``<|im_end|>`` and an ``<image>`` token, and a ChatML chat template.
        Training is deterministic: the same texts give the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(BUILTIN_CORPUS) + list(extra_texts)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
        chat_template=CHATML_TEMPLATE,
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START, IM_END, IMAGE_TOKEN]})
    return fast
