"""Tiny random checkpoints with the real LLaDA, LLaDA-V and MMaDA folder layouts (config fields, key names,
sharded safetensors + index, a tokenizer with the real special tokens), for tests and benchmarks.

The fake tokenizer is a small byte-level BPE followed by LLaDA's special-token block in the real order
(``<|startoftext|>``, ``<|endoftext|>``, ``[CLS]``, ``[gMASK]``, reserved tokens, ``<|mdm_mask|>``, ...,
``<|eot_id|>``), only with 12 front reserved tokens instead of 252, so ids are small but the structure matches:
the token just before ``<|mdm_mask|>`` is a reserved one and MMaDA's task tokens sit at reserved slots 0, 1, 4, 5.
:data:`REAL_TOKEN_IDS` records the real ids; :class:`FakeCheckpoint.token_ids` the fake ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

N_FRONT_RESERVED = 12  # the real tokenizer has 252 (<|reserved_token_0..251|>)
# MMaDA's task tokens reuse reserved slots (Gen-Verse/MMaDA training/prompting_utils.py, use_reserved_token=True).
MMADA_TASK_TOKENS = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>",
                     "<|lvg|>", "[iPAD]", "<|r2i|>")


def _special_block(n_reserved: int) -> list[str]:
    """LLaDA's added tokens in id order (real: 126080 .. 126348)."""
    return (["<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]"]
            + [f"<|reserved_token_{k}|>" for k in range(n_reserved)]
            + ["<|mdm_mask|>", "<|reserved_token_253|>", "<|reserved_token_254|>", "<|reserved_token_255|>",
               "<role>", "</role>", "<|arithmetic_start|>", "<|arithmetic_end|>", "<|number_start|>",
               "<|number_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


REAL_TOKEN_IDS: dict[str, int] = {t: 126080 + i for i, t in enumerate(_special_block(252))}
REAL_TOKEN_IDS.update({t: 126084 + k for k, t in enumerate(MMADA_TASK_TOKENS)})

# LLaDA-Instruct's chat template, restated: BOS before the first message, "\n\n" after each header.
LLADA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_CORPUS = (
    "what color is the circle in the image ? the circle is red . how many shapes are there ? there are two shapes . "
    "describe the picture in one sentence . a blue square is left of a green triangle . is there a yellow star ? "
    "yes , there is a small yellow star at the top right . you are a helpful language and vision assistant . "
    "the answer is 3 . draw a purple heart on a white background . digits 0 1 2 3 4 5 6 7 8 9 ."
)


@dataclass
class FakeCheckpoint:
    """What a ``write_fake_*`` call wrote: the folder, its config.json, every stored tensor by checkpoint key,
    the fake tokenizer's special-token ids and the ids the same tokens have in the real 126k tokenizer."""

    path: Path
    layout: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    token_ids: dict[str, int]
    real_token_ids: dict[str, int]
    vision_config: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_fake_tokenizer(task_token_names: bool = False):
    """A small byte-level BPE ``PreTrainedTokenizerFast`` with LLaDA's special-token block appended in the real
    order; ``task_token_names`` renames reserved slots 0..10 to MMaDA's task tokens (``<|soi|>``, ...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    block = _special_block(N_FRONT_RESERVED)
    if task_token_names:
        for k, name in enumerate(MMADA_TASK_TOKENS):
            block[block.index(f"<|reserved_token_{k}|>")] = name
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in block])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", add_bos_token=False, add_eos_token=False,
                                  clean_up_tokenization_spaces=False, model_max_length=4096)
    tok.chat_template = LLADA_CHAT_TEMPLATE
    return tok


def save_fake_tokenizer(tok, path: Path) -> None:
    """Save like the real LLaDA folders: tokenizer.json plus a tokenizer_config.json naming
    PreTrainedTokenizerFast, with add_bos/eos false and the chat template inline (no chat_template.jinja)."""
    tok.save_pretrained(str(path))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("backend", None)
    cfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                "chat_template": tok.chat_template})
    cfg_file.write_text(json.dumps(cfg, indent=2))
    (path / "chat_template.jinja").unlink(missing_ok=True)


def _token_ids(tok) -> dict[str, int]:
    """Ids of the special-block tokens the fake tokenizer holds."""
    vocab = tok.get_vocab()
    names = _special_block(N_FRONT_RESERVED) + list(MMADA_TASK_TOKENS)
    return {t: int(vocab[t]) for t in names if t in vocab}


def _round64(n: int) -> int:
    return 64 * ((n + 63) // 64)


class _Rand:
    """Seeded random tensors: weight matrices ~ N(0, 1/fan_in), norm weights 1 + 0.2 N(0, 1) so an
    ignored or misplaced norm changes the logits, biases 0.1 N(0, 1)."""

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def __call__(self, shape, kind: str = "matrix") -> torch.Tensor:
        x = torch.randn(*shape, generator=self.gen)
        if kind == "norm":
            x = 1.0 + 0.2 * x
        elif kind == "bias":
            x = 0.1 * x
        elif kind == "matrix":
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            x = x / fan_in ** 0.5
        return x.to(self.dtype).contiguous()


def _write_shards(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """One ``model.safetensors`` (shards=1) or ``model-0000k-of-0000n.safetensors`` + index, as HF writes them."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    target, groups, size = total / shards, [[]], 0
    for k in keys:
        if size >= target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(k)
        size += tensors[k].numel() * tensors[k].element_size()
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_json(file: Path, obj: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(obj, indent=2))


def _olmo_config(n_layers, d_model, n_heads, n_kv_heads, mlp_hidden, vocab, weight_tying, rope_theta, ids) -> dict:
    """The fields of LLaDA-8B's OLMo-style config.json (GSAI-ML/LLaDA-8B-Instruct), at the fake's sizes."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": d_model,
        "embedding_dropout": 0.0, "embedding_size": vocab, "eos_token_id": ids["<|endoftext|>"],
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": ids["<|mdm_mask|>"],
        "max_sequence_length": 4096, "mlp_hidden_size": mlp_hidden, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "n_layers": n_layers,
        "pad_token_id": ids["<|endoftext|>"], "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": rope_theta,
        "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False, "vocab_size": vocab,
        "weight_tying": weight_tying,
    }


def _olmo_tensors(rand: _Rand, n_layers, d_model, n_heads, n_kv_heads, mlp_hidden, vocab, weight_tying) -> dict:
    hd = d_model // n_heads
    t = {"model.transformer.wte.weight": rand((vocab, d_model), "embedding")}
    for i in range(n_layers):
        p = f"model.transformer.blocks.{i}."
        t[p + "attn_norm.weight"] = rand((d_model,), "norm")
        t[p + "q_proj.weight"] = rand((n_heads * hd, d_model))
        t[p + "k_proj.weight"] = rand((n_kv_heads * hd, d_model))
        t[p + "v_proj.weight"] = rand((n_kv_heads * hd, d_model))
        t[p + "attn_out.weight"] = rand((d_model, n_heads * hd))
        t[p + "ff_norm.weight"] = rand((d_model,), "norm")
        t[p + "ff_proj.weight"] = rand((mlp_hidden, d_model))
        t[p + "up_proj.weight"] = rand((mlp_hidden, d_model))
        t[p + "ff_out.weight"] = rand((d_model, mlp_hidden))
    t["model.transformer.ln_f.weight"] = rand((d_model,), "norm")
    if not weight_tying:
        t["model.transformer.ff_out.weight"] = rand((vocab, d_model))
    return t


def write_fake_llada(path, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 4,
                     mlp_hidden: int = 96, vocab: Optional[int] = None, weight_tying: bool = False, shards: int = 2,
                     seed: int = 0, rope_theta: float = 500000.0, dtype: torch.dtype = torch.float32) -> FakeCheckpoint:
    """Write a tiny LLaDA-8B-style checkpoint (OLMo keys ``model.transformer.*``, OLMo config, sharded safetensors,
    tokenizer) to ``path``. ``vocab`` defaults to ``len(tokenizer)`` rounded up to 64, like LLaDA's 126464."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_fake_tokenizer()
    vocab = vocab or _round64(len(tok))
    if vocab < len(tok):
        raise ValueError(f"vocab={vocab} is smaller than the fake tokenizer ({len(tok)} tokens)")
    ids = _token_ids(tok)
    config = _olmo_config(n_layers, d_model, n_heads, n_kv_heads, mlp_hidden, vocab, weight_tying, rope_theta, ids)
    tensors = _olmo_tensors(_Rand(seed, dtype), n_layers, d_model, n_heads, n_kv_heads, mlp_hidden, vocab,
                            weight_tying)
    _write_json(path / "config.json", config)
    _write_shards(path, tensors, shards)
    save_fake_tokenizer(tok, path)
    return FakeCheckpoint(path, "llada", config, tensors, ids, {t: REAL_TOKEN_IDS[t] for t in ids})


def write_fake_mmada(path, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 4,
                     mlp_hidden: int = 96, codebook_size: int = 64, num_vq_tokens: int = 16,
                     task_token_names: bool = True, shards: int = 2, seed: int = 0, rope_theta: float = 500000.0,
                     dtype: torch.dtype = torch.float32) -> FakeCheckpoint:
    """Write a tiny MMaDA-8B-style checkpoint: LLaDA's OLMo layout with ``wte`` and ``ff_out`` resized to
    ``llm_vocab_size + codebook_size`` rows (real: 126464 + 8192 = 134656) and MMaDA's extra config fields.
    ``task_token_names`` names the reserved slots ``<|soi|>``, ``<|eoi|>``, ...; False keeps ``<|reserved_token_k|>``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_fake_tokenizer(task_token_names=task_token_names)
    llm_vocab = _round64(len(tok))
    vocab = llm_vocab + codebook_size
    ids = _token_ids(tok)
    config = _olmo_config(n_layers, d_model, n_heads, n_kv_heads, mlp_hidden, vocab, False, rope_theta, ids)
    config.update({"architectures": ["MMadaModelLM"], "model_type": "mmada", "llm_vocab_size": llm_vocab,
                   "codebook_size": codebook_size, "num_vq_tokens": num_vq_tokens, "num_new_special_tokens": 0,
                   "new_vocab_size": vocab})
    config.pop("auto_map")
    tensors = _olmo_tensors(_Rand(seed, dtype), n_layers, d_model, n_heads, n_kv_heads, mlp_hidden, vocab, False)
    _write_json(path / "config.json", config)
    _write_shards(path, tensors, shards)
    save_fake_tokenizer(tok, path)
    real = {t: REAL_TOKEN_IDS[t] for t in ids if t in REAL_TOKEN_IDS}
    extra = {"image_token_offset": len(tok), "real_image_token_offset": 126349, "llm_vocab_size": llm_vocab}
    return FakeCheckpoint(path, "mmada", config, tensors, ids, real, extra=extra)


def fake_siglip_config(hidden_size: int = 32, intermediate_size: int = 48, num_hidden_layers: int = 3,
                       num_attention_heads: int = 2, image_size: int = 28, patch_size: int = 14) -> dict[str, Any]:
    """A SiglipVisionConfig dict shaped like siglip(2)-so400m-patch14-384's, at toy sizes."""
    return {"model_type": "siglip_vision_model", "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads, "num_channels": 3,
            "image_size": image_size, "patch_size": patch_size, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6, "attention_dropout": 0.0}


def _siglip_tensors(rand: _Rand, vision_config: dict, keep_layers: int) -> dict[str, torch.Tensor]:
    """SigLIP vision weights under LLaDA-V's prefix; like LLaVA-OneVision, only ``keep_layers`` encoder layers
    are stored and the pooling head is absent (it is replaced by Identity before saving)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    fields = {k: v for k, v in vision_config.items() if k != "model_type"}
    with torch.device("meta"):
        shapes = SiglipVisionModel(SiglipVisionConfig(**fields, vision_use_head=False)).state_dict()
    out = {}
    for key, meta in shapes.items():
        key = key.removeprefix("vision_model.")
        if key.startswith("encoder.layers.") and int(key.split(".")[2]) >= keep_layers:
            continue
        kind = "matrix" if meta.dim() >= 2 else ("norm" if "norm" in key and key.endswith("weight") else "bias")
        out["model.vision_tower.vision_tower.vision_model." + key] = rand(tuple(meta.shape), kind)
    return out


def write_fake_llada_v(path, *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 4,
                       mlp_hidden: int = 96, vocab: Optional[int] = None, tie_word_embeddings: bool = False,
                       shards: int = 2, seed: int = 0, rope_theta: float = 500000.0, vision: bool = True,
                       vision_config: Optional[dict] = None, truncate_tower: bool = True,
                       vision_config_location: str = "config", dtype: torch.dtype = torch.float32) -> FakeCheckpoint:
    """Write a tiny LLaDA-V-style checkpoint: LLaMA-style LM keys, SigLIP tower under
    ``model.vision_tower.vision_tower.vision_model.*`` (last layer dropped when ``truncate_tower``, as LLaDA-V
    does), ``model.mm_projector.{0,2}`` (mlp2x_gelu), ``model.image_newline``, and a ``llava_llada`` config.

    ``vision_config_location`` says where the SigLIP config goes: ``"config"`` (a ``vision_config`` entry in
    config.json) or ``"subfolder"`` (``vision_tower/config.json``, a full SiglipConfig as in a SigLIP folder).
    ``vision=False`` writes the text-only LM as LLaDA-V's conversion script leaves it (``model_type "llada"``).
    """
    if vision_config_location not in ("config", "subfolder"):
        raise ValueError(f"vision_config_location must be 'config' or 'subfolder', got {vision_config_location!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_fake_tokenizer()
    vocab = vocab or _round64(len(tok))
    ids = _token_ids(tok)
    rand = _Rand(seed, dtype)
    hd = d_model // n_heads
    t = {"model.embed_tokens.weight": rand((vocab, d_model), "embedding")}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = rand((d_model,), "norm")
        t[p + "self_attn.q_proj.weight"] = rand((n_heads * hd, d_model))
        t[p + "self_attn.k_proj.weight"] = rand((n_kv_heads * hd, d_model))
        t[p + "self_attn.v_proj.weight"] = rand((n_kv_heads * hd, d_model))
        t[p + "self_attn.o_proj.weight"] = rand((d_model, n_heads * hd))
        t[p + "post_attention_layernorm.weight"] = rand((d_model,), "norm")
        t[p + "mlp.gate_proj.weight"] = rand((mlp_hidden, d_model))
        t[p + "mlp.up_proj.weight"] = rand((mlp_hidden, d_model))
        t[p + "mlp.down_proj.weight"] = rand((d_model, mlp_hidden))
    t["model.norm.weight"] = rand((d_model,), "norm")
    if not tie_word_embeddings:
        t["lm_head.weight"] = rand((vocab, d_model))
    # LLaDA-V's LLaMA-style config.json (train/llada_v_prepare/files/config.json); bos_token_id 128000 is the
    # LLaMA-3 leftover the real file carries (the tokenizer's BOS is <|startoftext|>).
    config: dict[str, Any] = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": ids["<|endoftext|>"],
        "hidden_act": "silu", "hidden_size": d_model, "initializer_range": 0.02, "intermediate_size": mlp_hidden,
        "max_position_embeddings": 16384, "mlp_bias": False, "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers, "num_key_value_heads": n_kv_heads, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "bfloat16", "use_cache": False,
        "vocab_size": vocab,
    }
    vc = None
    if vision:
        vc = dict(vision_config or fake_siglip_config())
        mm_hidden = vc["hidden_size"]
        keep = vc["num_hidden_layers"] - 1 if truncate_tower else vc["num_hidden_layers"]
        t.update(_siglip_tensors(rand, vc, keep))
        t["model.mm_projector.0.weight"] = rand((d_model, mm_hidden))
        t["model.mm_projector.0.bias"] = rand((d_model,), "bias")
        t["model.mm_projector.2.weight"] = rand((d_model, d_model))
        t["model.mm_projector.2.bias"] = rand((d_model,), "bias")
        t["model.image_newline"] = rand((d_model,), "bias") * 10
        s = vc["image_size"]
        config.update({
            "architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada",
            "mm_vision_tower": "google/siglip2-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
            "mm_hidden_size": mm_hidden, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_patch_merge_type": "spatial_unpad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
            "mm_newline_position": "grid", "use_mm_proj": True, "image_aspect_ratio": "anyres_max_4",
            "image_grid_pinpoints": [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
            "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        })
        if vision_config_location == "config":
            config["vision_config"] = vc
        else:
            inner = {k: v for k, v in vc.items() if k != "model_type"}
            text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "vocab_size": 64, "model_type": "siglip_text_model"}
            _write_json(path / "vision_tower" / "config.json",
                        {"architectures": ["SiglipModel"], "model_type": "siglip", "text_config": text,
                         "vision_config": {**inner, "model_type": "siglip_vision_model"}})
    _write_json(path / "config.json", config)
    _write_shards(path, t, shards)
    save_fake_tokenizer(tok, path)
    return FakeCheckpoint(path, "llada_v" if vision else "llada_llama", config, t, ids,
                          {k: REAL_TOKEN_IDS[k] for k in ids}, vision_config=vc)
