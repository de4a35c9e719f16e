"""mmdlm's own small tokenizer: a byte-level BPE trained with HF `tokenizers`, LLaDA's special tokens and
LLaMA-3 chat template, plus the MMaDA task tokens, returned as a `PreTrainedTokenizerFast`."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"  # also the pad token, as in LLaDA
BOS_TOKEN = "<|startoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
IMAGE_TOKEN = "<image>"
SOI_TOKEN = "<|soi|>"
EOI_TOKEN = "<|eoi|>"
T2I_TOKEN = "<|t2i|>"
MMU_TOKEN = "<|mmu|>"

# Order fixes the ids: the BPE trainer gives special tokens ids 0..10 in this order.
SPECIAL_TOKENS: tuple[str, ...] = (
    EOS_TOKEN,
    BOS_TOKEN,
    MASK_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    IMAGE_TOKEN,
    SOI_TOKEN,
    EOI_TOKEN,
    T2I_TOKEN,
    MMU_TOKEN,
)

# LLaDA's template (BOS before the first message only, "\n\n" after the header, trimmed content), extended so
# that transformers-5 multimodal content (a list of {"type": "image"|"text"} blocks) renders each image block as
# "<image>\n" followed by the text; the processor relies on this being the single place where messages become text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}{%- set ns.text = ns.text + '" + IMAGE_TOKEN + "\\n' -%}"
    "{%- elif block['type'] == 'text' -%}{%- set ns.text = ns.text + block['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.text -%}"
    "{%- endif -%}"
    "{{- '" + START_HEADER_TOKEN + "' + message['role'] + '" + END_HEADER_TOKEN + "\\n\\n' + (content | trim) + '"
    + EOT_TOKEN + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + START_HEADER_TOKEN + "assistant" + END_HEADER_TOKEN + "\\n\\n' -}}"
    "{%- endif -%}"
)


def _round_up(n: int, multiple: int) -> int:
    return multiple * ((n + multiple - 1) // multiple)


def _texts(texts: Iterable[str]) -> Iterator[str]:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"train_tokenizer expects strings; item {i} is a {type(t).__name__}.")
        yield t


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The 11 :data:`SPECIAL_TOKENS` get ids 0..10 and are never split; every byte has a token, so any string
    round-trips. ``vocab_size`` counts the special tokens and the 256 byte tokens, so it must exceed 267.
    Training is deterministic for the same input (the result does not depend on the process).
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size <= minimum:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges: the {len(SPECIAL_TOKENS)} special tokens and "
            f"256 byte tokens already take {minimum} ids; use a vocab_size above {minimum} (e.g. 1024)."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}.")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_texts(texts), trainer=trainer)
    return wrap_tokenizer(bpe)


def wrap_tokenizer(tokenizer_object: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers.Tokenizer`` holding :data:`SPECIAL_TOKENS` with mmdlm's roles and chat template."""
    vocab = tokenizer_object.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer lacks mmdlm's special tokens {missing}; train it with train_tokenizer().")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN, MASK_TOKEN)],
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _token_id(tokenizer: Any, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:
        return None
    return int(tid)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of mmdlm's special tokens, keyed like :class:`~mmdlm.MMDLMConfig` fields (plus ``bos/eos/pad``)."""
    names = {
        "mask_token_id": MASK_TOKEN,
        "bos_token_id": BOS_TOKEN,
        "eos_token_id": EOS_TOKEN,
        "eot_token_id": EOT_TOKEN,
        "start_header_token_id": START_HEADER_TOKEN,
        "end_header_token_id": END_HEADER_TOKEN,
        "image_token_id": IMAGE_TOKEN,
        "soi_token_id": SOI_TOKEN,
        "eoi_token_id": EOI_TOKEN,
        "t2i_token_id": T2I_TOKEN,
        "mmu_token_id": MMU_TOKEN,
    }
    ids = {key: _token_id(tokenizer, token) for key, token in names.items()}
    missing = [names[k] for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(
            f"the tokenizer lacks mmdlm's special tokens {missing}; train one with "
            "mmdlm.tokenization.train_tokenizer (or add them as special tokens)."
        )
    ids["pad_token_id"] = ids["eos_token_id"]
    return ids  # type: ignore[return-value]


def config_token_fields(tokenizer: Any, codebook_size: int = 0) -> dict[str, Any]:
    """The token-related keyword arguments of :class:`~mmdlm.MMDLMConfig` for this tokenizer.

    Image codes follow the text vocabulary (``image_token_offset = len(tokenizer)``, as in MMaDA) and the
    embedding table is rounded up to a multiple of 64. ``banned_token_ids`` are tokens an answer must never
    contain (BOS, chat headers, image placeholder and image/task tokens).
    """
    if codebook_size < 0:
        raise ValueError(f"codebook_size must be >= 0, got {codebook_size}.")
    ids = special_token_ids(tokenizer)
    n_text = len(tokenizer)
    return {
        "vocab_size": _round_up(n_text + codebook_size, 64),
        "image_token_offset": n_text,
        "codebook_size": codebook_size,
        "mask_token_id": ids["mask_token_id"],
        "eot_token_id": ids["eot_token_id"],
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
        "image_token_id": ids["image_token_id"],
        "soi_token_id": ids["soi_token_id"],
        "eoi_token_id": ids["eoi_token_id"],
        "t2i_token_id": ids["t2i_token_id"],
        "mmu_token_id": ids["mmu_token_id"],
        "banned_token_ids": [
            ids["bos_token_id"],
            ids["start_header_token_id"],
            ids["end_header_token_id"],
            ids["image_token_id"],
            ids["soi_token_id"],
            ids["eoi_token_id"],
            ids["t2i_token_id"],
            ids["mmu_token_id"],
        ],
    }
