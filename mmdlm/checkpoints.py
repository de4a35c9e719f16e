"""Load real LLaDA, LLaDA-V and MMaDA checkpoints (and mmdlm's own) from a local folder into
:class:`~mmdlm.MMDLMForConditionalGeneration`, natively: no ``trust_remote_code``, no hub, no pickles.

Supported layouts (``config.json`` decides, see :func:`detect_layout`):

* ``llada``   -- GSAI-ML/LLaDA-8B-Base/Instruct: OLMo config (``d_model``, ``n_layers``, ...) and OLMo keys
  (``model.transformer.blocks.N.q_proj`` ...), renamed to LLaMA names with a fixed table (:data:`OLMO_TOP_LEVEL`, :data:`OLMO_BLOCK`).
* ``mmada``   -- Gen-Verse/MMaDA-8B-*: the ``llada`` layout with ``model_type "mmada"``, vocab resized to
  ``llm_vocab_size + codebook_size``; image code ``c`` is token ``len(tokenizer) + c`` (126349 + c).
  No image tokenizer is bundled (MAGVIT-v2 lives elsewhere), so the loaded model can read image *codes* but
  ``config.image_tokenizer_config`` stays None and it cannot draw pixels until one is attached.
* ``llada_v`` -- GSAI-ML/LLaDA-V: ``model_type "llava_llada"``, LLaMA keys (= ours), SigLIP tower under
  ``model.vision_tower.vision_tower.vision_model.*``, ``model.mm_projector.{0,2}`` and ``model.image_newline``.
  The SigLIP config comes from, in order: a ``vision_config`` dict in config.json; ``vision_tower/config.json``
  (a SigLIP folder's config: a SiglipConfig or SiglipVisionConfig); ``mm_vision_tower`` naming a local SigLIP
  folder (absolute or relative to the checkpoint); the built-in so400m-patch14-384 shape when ``mm_vision_tower``
  names that model. LLaDA-V stores the tower without its last layer (it uses layer -2); both that and a full tower
  load.
* ``llada_llama`` -- the text-only LLaDA LM with LLaMA keys, as LLaDA-V's conversion script writes it.
* ``mmdlm``   -- ``model_type "mmdlm"`` (what ``save_pretrained`` writes).

LLaDA-family tokenizers have no ``<image>``, ``<|soi|>``, ``<|eoi|>``, ``<|t2i|>``, ``<|mmu|>`` tokens; the loader
renames reserved tokens to those names (ids unchanged, so ``len(tokenizer)`` and MMaDA's offsets hold):
``<|soi|>``/``<|eoi|>``/``<|t2i|>``/``<|mmu|>`` take MMaDA's reserved slots 0/1/4/5 (126084/5/8/9) and ``<image>``
takes the reserved token just before ``<|mdm_mask|>`` (126335). LLaDA-V itself writes ``<image>`` as -200 in
text; a real id is needed for the feature slots, and a reserved one is never produced by the real tokenizer.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

# The layout tables and config translation live in checkpoint_layouts; the public names stay importable from here.
from .checkpoint_layouts import (  # noqa: F401
    LAYOUTS,
    OLMO_BLOCK,
    OLMO_TOP_LEVEL,
    CheckpointError,
    _generation_defaults,
    _llama_config,
    _olmo_config,
    _read_json,
    _special_fields,
    _vision_fields,
    detect_layout,
    llama_to_olmo,
    olmo_to_llama,
)
from .configuration_mmdlm import MMDLMConfig
from .tokenization import (BOS_TOKEN, CHAT_TEMPLATE, END_HEADER_TOKEN, EOS_TOKEN, EOT_TOKEN, EOI_TOKEN, IMAGE_TOKEN,
                           MASK_TOKEN, MMU_TOKEN, SOI_TOKEN, START_HEADER_TOKEN, T2I_TOKEN)

LLADA_V_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
# LLaDA-V's conversation template: its system prompt unless the chat brings one, then LLaDA's format.
LLADA_V_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}{%- set messages = [{'role': 'system', 'content': '"
    + LLADA_V_SYSTEM_PROMPT + "'}] + messages -%}{%- endif -%}" + CHAT_TEMPLATE
)
_MMADA_RESERVED = {SOI_TOKEN: 0, EOI_TOKEN: 1, T2I_TOKEN: 4, MMU_TOKEN: 5}


@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` found and did."""

    layout: str
    path: str
    weight_files: list[str]
    num_tensors: int
    num_parameters: int
    special_token_ids: dict[str, int] = field(default_factory=dict)
    renamed_tokens: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    generation_config: Any = None  # the source model's decoding defaults (None for mmdlm folders: see the folder)


@dataclass
class _Stored:
    file: Path
    shape: tuple[int, ...]


# ------------------------------------------------------------------------------------------------ folder reading


def scan_weights(folder: Path) -> dict[str, _Stored]:
    """Name, file, shape and dtype of every stored tensor, read from safetensors headers only (no data)."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    claimed: dict[str, str] = {}
    if index_file.exists():
        claimed = _read_json(index_file).get("weight_map") or {}
        if not claimed:
            raise CheckpointError(f"{index_file} has no weight_map; re-download it or delete it to use the shards.")
        names = sorted(set(claimed.values()))
        lost = [n for n in names if not (folder / n).is_file()]
        if lost:
            raise CheckpointError(
                f"{index_file.name} names {len(lost)} shard file(s) missing from {folder}: {lost}. The download is "
                f"incomplete: fetch those files (or delete a stale index if the weights were re-saved)."
            )
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" It holds {pickled}: mmdlm never unpickles weights; convert them to safetensors first "
                "(safetensors.torch.save_file on a state dict you trust)." if pickled else "")
        raise CheckpointError(f"no *.safetensors weights in {folder}.{hint}")
    stored: dict[str, _Stored] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in stored:
                    raise CheckpointError(f"tensor {key!r} is stored twice ({stored[key].file.name}, {file.name}).")
                sl = f.get_slice(key)
                stored[key] = _Stored(file, tuple(sl.get_shape()))
    wrong = [(k, n) for k, n in claimed.items() if k not in stored or stored[k].file.name != n]
    if wrong:
        k, n = wrong[0]
        raise CheckpointError(f"{index_file.name} says {len(wrong)} tensor(s) live in shards that do not hold them "
                              f"(e.g. {k!r} in {n}); the index and shards come from different saves: re-download.")
    return stored


# ------------------------------------------------------------------------------------------------ tokenizer


def _load_tokenizer(folder: Path):
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer grumbles about the unknown model_type in config.json
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 -- re-raised with the folder and a fix
        raise CheckpointError(f"the tokenizer in {folder} does not load with AutoTokenizer ({e}); it needs "
                              "tokenizer.json + tokenizer_config.json.") from e
    finally:
        hf_logging.set_verbosity(level)


def adapt_llada_tokenizer(tokenizer, chat_template: str = CHAT_TEMPLATE) -> tuple[Any, dict[str, str]]:
    """Give a LLaDA-family tokenizer mmdlm's special-token names by renaming reserved tokens (ids unchanged):
    ``<|soi|> <|eoi|> <|t2i|> <|mmu|>`` = reserved 0, 1, 4, 5 (MMaDA) and ``<image>`` = the reserved token just
    before ``<|mdm_mask|>``. Returns the new tokenizer (mask token and ``chat_template`` set) and the renames."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = tokenizer.get_vocab()
    if MASK_TOKEN not in vocab:
        raise CheckpointError(f"the tokenizer has no {MASK_TOKEN} token, so it is not a LLaDA-family tokenizer.")
    renames: dict[str, str] = {}
    for name, k in _MMADA_RESERVED.items():
        if name not in vocab and f"<|reserved_token_{k}|>" in vocab:
            renames[f"<|reserved_token_{k}|>"] = name
    before_mask = tokenizer.convert_ids_to_tokens(vocab[MASK_TOKEN] - 1)
    if IMAGE_TOKEN not in vocab and re.fullmatch(r"<\|reserved_token_\d+\|>", before_mask or ""):
        renames[before_mask] = IMAGE_TOKEN
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    for tok in data.get("added_tokens", []):
        tok["content"] = renames.get(tok["content"], tok["content"])
    model_vocab = data.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict):
        for old, new in renames.items():
            if old in model_vocab:
                model_vocab[new] = model_vocab.pop(old)
    specials = [t for t in (START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, IMAGE_TOKEN, SOI_TOKEN, EOI_TOKEN,
                            T2I_TOKEN, MMU_TOKEN) if t in vocab or t in renames.values()]
    new = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=tokenizer.pad_token or EOS_TOKEN, mask_token=MASK_TOKEN, additional_special_tokens=specials,
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        model_max_length=tokenizer.model_max_length,
    )
    new.chat_template = chat_template
    if len(new) != len(tokenizer):
        raise CheckpointError(f"renaming reserved tokens changed the tokenizer size ({len(tokenizer)} -> {len(new)}).")
    return new, renames


# ------------------------------------------------------------------------------------------------ weights


def _identity(key: str) -> str:
    return key


def _fmt(items: list, n: int = 8) -> str:
    return f"{items[:n]}" + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _load_weights(model, stored: dict[str, _Stored], rename: Callable[[str], Optional[str]],
                  source_name: Callable[[str], str], folder: Path, dtype: Optional[torch.dtype], device,
                  allow_tied_head: bool, notes: list[str]) -> None:
    """Check every expected tensor exists with the right shape and nothing is left over, then read the
    tensors one at a time into the (meta-device) model. ``rename`` maps stored names to the model's;
    ``source_name`` maps back, only for messages."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
    plan: dict[str, str] = {}
    unexpected, mismatched = [], []
    for src, info in stored.items():
        tgt = rename(src)
        if tgt == "lm_head.weight" and tied and allow_tied_head:
            notes.append("dropped the stored lm_head.weight: the head is tied to the embeddings.")
            continue
        if tgt not in expected:
            unexpected.append(src if tgt in (None, src) else f"{src} -> {tgt}")
        elif expected[tgt] != info.shape:
            mismatched.append(f"{src} in {info.file.name}: expected {list(expected[tgt])}, got {list(info.shape)}")
        else:
            plan[tgt] = src
    if mismatched:
        raise CheckpointError(f"{len(mismatched)} tensor(s) in {folder} do not match the shapes config.json implies: "
                              f"{_fmt(mismatched, 5)}. Fix config.json (sizes, vocab, heads) to match the weights.")
    absent = [k for k in expected if k not in plan]
    missing = [k if source_name(k) == k else f"{source_name(k)} (-> {k})" for k in absent]
    if missing or unexpected:
        hint = ""
        if "lm_head.weight" in absent:
            hint += " The head is missing: if it is tied to the embeddings set weight_tying / tie_word_embeddings true."
        if any(u.startswith(("lm_head", "model.transformer.ff_out")) for u in unexpected):
            hint += " A separate head is stored: set weight_tying / tie_word_embeddings false."
        raise CheckpointError(
            f"the weights in {folder} do not match config.json: {len(missing)} missing {_fmt(missing)}, "
            f"{len(unexpected)} unexpected {_fmt(unexpected)}. Nothing was loaded.{hint} Check num layers / "
            "vision settings in config.json, or re-download incomplete shards."
        )
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for tgt, src in plan.items():
        by_file.setdefault(stored[src].file, []).append(tgt)
    for file, targets in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for tgt in targets:
                t = f.get_tensor(plan[tgt])
                state[tgt] = t.to(device=device or "cpu", dtype=dtype if t.is_floating_point() and dtype else None)
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.tie_weights()


def _build(config: MMDLMConfig):
    from accelerate import init_empty_weights

    from .modeling_mmdlm import MMDLMForConditionalGeneration

    with init_empty_weights(include_buffers=False):  # parameters on "meta": no second copy of 16 GB
        return MMDLMForConditionalGeneration(config)


def _resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    resolved = getattr(torch, aliases.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating torch dtype; use e.g. torch.bfloat16, 'float32' or None.")
    return resolved


def load_checkpoint(path, dtype: Optional[torch.dtype | str] = None, device=None):
    """Load a LLaDA, LLaDA-V, MMaDA or mmdlm checkpoint folder; returns ``(model, tokenizer or None, info)``.

    ``dtype`` casts floating tensors (a torch dtype or its name; None or "auto" keeps the stored dtype);
    ``device`` is where tensors are placed as they are read. Every tensor is checked (names after renaming, shapes) before any is read, so a checkpoint
    is loaded completely or not at all; problems raise :class:`CheckpointError` saying what to fix.
    """
    dtype = _resolve_dtype(dtype)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist; pass a local folder holding "
                                "config.json, *.safetensors and the tokenizer (nothing is downloaded).")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass the folder that holds it and config.json.")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        seen = sorted(p.name for p in folder.iterdir())[:12]
        raise CheckpointError(f"{folder} has no config.json (it holds {seen}); a checkpoint folder needs "
                              "config.json next to its *.safetensors.")
    raw = _read_json(cfg_file)
    try:
        stored, scan_error = scan_weights(folder), None
    except CheckpointError as e:
        stored, scan_error = {}, e
    layout = detect_layout(raw, list(stored))
    if scan_error is not None:
        raise scan_error
    notes: list[str] = []
    tok, renames = _load_tokenizer(folder), {}
    rename: Callable[[str], Optional[str]] = _identity
    source_name: Callable[[str], str] = _identity
    if layout == "mmdlm":
        config = MMDLMConfig.from_dict({k: v for k, v in raw.items() if k != "model_type"})
    else:
        if tok is not None:
            template = LLADA_V_CHAT_TEMPLATE if layout == "llada_v" else CHAT_TEMPLATE
            tok, renames = adapt_llada_tokenizer(tok, template)
        if layout in ("llada", "mmada"):
            fields = _olmo_config(raw, cfg_file)
            rename, source_name = olmo_to_llama, llama_to_olmo
        else:
            fields = _llama_config(raw, cfg_file, notes)
        if layout == "llada_v":
            fields.update(_vision_fields(raw, folder, list(stored), notes))
        fields.update(_special_fields(layout, raw, tok, fields["vocab_size"], cfg_file, notes))
        try:
            config = MMDLMConfig(**fields, source_layout=layout)
        except ValueError as e:
            raise CheckpointError(f"{cfg_file} gives an inconsistent model: {e}") from e
    model = _build(config)
    _load_weights(model, stored, rename, source_name, folder, dtype, device, layout == "mmdlm", notes)
    if device is not None:
        model.to(device)  # non-persistent buffers (e.g. SigLIP position ids) were built on the CPU
    model.eval()
    ids = {k: v for k, v in config.to_dict().items() if k.endswith("token_id") and v is not None}
    info = CheckpointInfo(layout, str(folder), sorted({s.file.name for s in stored.values()}), len(stored),
                          sum(p.numel() for p in model.parameters()), ids, renames, notes,
                          None if layout == "mmdlm" else _generation_defaults(layout, config))
    return model, tok, info


def save_checkpoint(model, tokenizer, path) -> None:
    """Save ``model`` (mmdlm format) and ``tokenizer`` side by side so :func:`load_checkpoint` reads them back."""
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
