"""How each checkpoint layout (LLaDA, MMaDA, LLaDA-V, LLaDA-LLaMA, mmdlm) maps onto mmdlm: layout detection, the
OLMo -> LLaMA weight-name tables, and the translation of its config.json into :class:`~mmdlm.MMDLMConfig` fields."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .configuration_mmdlm import MMDLMConfig
from .tokenization import (BOS_TOKEN, END_HEADER_TOKEN, EOS_TOKEN, EOT_TOKEN, EOI_TOKEN, IMAGE_TOKEN, MASK_TOKEN,
                           MMU_TOKEN, SOI_TOKEN, START_HEADER_TOKEN, T2I_TOKEN)

LAYOUTS = ("mmdlm", "llada", "mmada", "llada_v", "llada_llama")
_LAYOUT_HELP = (
    "supported layouts: 'mmdlm' (model_type \"mmdlm\"); 'llada' (OLMo fields d_model, n_layers, n_heads, "
    "mlp_hidden_size; keys model.transformer.*); 'mmada' (the same with model_type \"mmada\" or codebook_size); "
    "'llada_v' (model_type \"llava_llada\" or mm_* fields with hidden_size, num_hidden_layers); 'llada_llama' "
    "(model_type \"llada\" with hidden_size, num_hidden_layers and keys model.layers.*)"
)
# OLMo (original LLaDA / MMaDA) names -> LLaMA names (LLaDA-V / mmdlm). ff_proj is the SiLU-gated branch,
# up_proj the linear one, the block's ff_out the down projection; the top-level ff_out is the LM head.
OLMO_TOP_LEVEL = {"model.transformer.wte.weight": "model.embed_tokens.weight",
                  "model.transformer.ln_f.weight": "model.norm.weight",
                  "model.transformer.ff_out.weight": "lm_head.weight"}
OLMO_BLOCK = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
              "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
              "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
# Real LLaDA ids, used only when a folder has no tokenizer.
_REAL_IDS = {BOS_TOKEN: 126080, EOS_TOKEN: 126081, MASK_TOKEN: 126336, START_HEADER_TOKEN: 126346,
             END_HEADER_TOKEN: 126347, EOT_TOKEN: 126348, SOI_TOKEN: 126084, EOI_TOKEN: 126085, T2I_TOKEN: 126088,
             MMU_TOKEN: 126089, IMAGE_TOKEN: 126335}
_REAL_VOCAB, _REAL_TEXT_LEN = 126464, 126349
_SIGLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded faithfully; the message says what is wrong and how to fix it."""


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read {file}: {e}; the file must be valid JSON.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(data).__name__}.")
    return data


def detect_layout(config: dict[str, Any], keys: Optional[list[str]] = None) -> str:
    """Which of :data:`LAYOUTS` a ``config.json`` dict describes (``keys`` only improve the error message)."""
    mt = config.get("model_type")
    if mt == "mmdlm":
        return "mmdlm"
    olmo = all(f in config for f in ("d_model", "n_layers", "n_heads"))
    llama = all(f in config for f in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    if olmo and (mt == "mmada" or "codebook_size" in config or "new_vocab_size" in config):
        return "mmada"
    if olmo and mt in ("llada", None):
        return "llada"
    if llama and (mt == "llava_llada" or (mt == "llada" and any(k.startswith("mm_") for k in config))):
        return "llada_v"
    if llama and mt == "llada":
        return "llada_llama"
    seen_keys = f"; weight keys start {sorted(keys)[:4]}" if keys else ""
    raise CheckpointError(
        f"unknown checkpoint layout: config.json has model_type={mt!r} and fields {sorted(config)[:25]}"
        f"{seen_keys}. {_LAYOUT_HELP}. Convert the checkpoint to one of these or load it with its own code."
    )


def _token_id(tokenizer, token: str, vocab_size: int) -> Optional[int]:
    """The token's id in the tokenizer, else the real LLaDA id when the vocab is LLaDA's size, else None."""
    if tokenizer is not None:
        tid = tokenizer.get_vocab().get(token)
        return None if tid is None else int(tid)
    return _REAL_IDS.get(token) if vocab_size >= _REAL_VOCAB else None


# ------------------------------------------------------------------------------------------------ configs


def _require(cfg: dict, fields: tuple[str, ...], layout: str, file: Path) -> None:
    absent = [f for f in fields if cfg.get(f) is None]
    if absent:
        raise CheckpointError(f"{file} looks like a {layout!r} checkpoint but lacks {absent}; add them.")


def _olmo_config(cfg: dict, file: Path) -> dict[str, Any]:
    _require(cfg, ("d_model", "n_layers", "n_heads"), "llada", file)
    # OLMo switches LLaDA never uses; each would change the computation, so refuse rather than run it wrong.
    llada_block = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "alibi": False,
                   "rope": True, "include_bias": False, "include_qkv_bias": False, "scale_logits": False,
                   "input_emb_norm": False, "attention_layer_norm": False, "layer_norm_with_affine": True,
                   "clip_qkv": None}
    bad = {k: cfg[k] for k, v in llada_block.items() if k in cfg and cfg[k] != v}
    if bad:
        raise CheckpointError(f"{file} sets {bad}; LLaDA's block is {llada_block}. This is not a LLaDA/MMaDA "
                              "checkpoint mmdlm can run faithfully.")
    n_heads = cfg["n_heads"]
    n_kv = cfg.get("n_kv_heads") or (1 if cfg.get("multi_query_attention") else n_heads)
    return dict(
        vocab_size=cfg.get("embedding_size") or cfg.get("vocab_size"),
        hidden_size=cfg["d_model"],
        intermediate_size=cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * cfg["d_model"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=n_heads, num_key_value_heads=n_kv,
        max_position_embeddings=cfg.get("max_sequence_length", 4096),
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
    )


def _llama_config(cfg: dict, file: Path, notes: list[str]) -> dict[str, Any]:
    _require(cfg, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
             "llada_v", file)
    bad = {k: cfg[k] for k in ("attention_bias", "mlp_bias") if cfg.get(k)}
    if cfg.get("hidden_act", "silu") != "silu":
        bad["hidden_act"] = cfg["hidden_act"]
    if cfg.get("rope_scaling"):
        bad["rope_scaling"] = cfg["rope_scaling"]
    if bad:
        raise CheckpointError(f"{file} sets {bad}; LLaDA's LM has no biases, SiLU gates and plain RoPE. This is "
                              "not a LLaDA-V checkpoint mmdlm can run faithfully.")
    if "rope_theta" not in cfg:
        notes.append("config.json has no rope_theta; used LLaDA's 500000.")
    return dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim"), max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=float(cfg.get("rope_theta", 500000.0)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _siglip_config(cfg: dict, folder: Path, notes: list[str]) -> dict[str, Any]:
    """The SigLIP vision config of a LLaDA-V folder (see the module docstring for where it is looked for)."""
    found, where = None, None
    tower = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    candidates = [(cfg.get("vision_config"), "config.json vision_config")]
    for sub in [folder / "vision_tower"] + ([Path(tower), folder / tower] if isinstance(tower, str) else []):
        if (sub / "config.json").is_file():
            candidates.append((_read_json(sub / "config.json"), str(sub / "config.json")))
    for found, where in candidates:
        if isinstance(found, dict):
            break
    else:
        found = None
    if found is None and isinstance(tower, str) and "so400m-patch14-384" in tower:
        from .vision.tower_config import SIGLIP_SO400M_384

        found, where = dict(SIGLIP_SO400M_384), f"the built-in shape of {tower}"
    if found is None:
        raise CheckpointError(
            f"{folder} is a LLaDA-V checkpoint but no SigLIP config was found (mm_vision_tower={tower!r}). Give one: "
            "a 'vision_config' dict (SiglipVisionConfig fields) in config.json, a vision_tower/config.json copied "
            "from the SigLIP folder, or set mm_vision_tower to a local SigLIP folder."
        )
    if isinstance(found.get("vision_config"), dict):  # a full SiglipConfig (text + vision)
        found = found["vision_config"]
    if found.get("model_type", "siglip_vision_model") not in ("siglip_vision_model", "siglip"):
        raise CheckpointError(f"the vision config from {where} has model_type {found.get('model_type')!r}; only "
                              "SigLIP (fixed-resolution) towers are supported.")
    notes.append(f"SigLIP config from {where}.")
    return {k: found[k] for k in _SIGLIP_FIELDS if k in found}


def _vision_fields(cfg: dict, folder: Path, keys: list[str], notes: list[str]) -> dict[str, Any]:
    siglip = _siglip_config(cfg, folder, notes)
    if cfg.get("mm_hidden_size") not in (None, siglip.get("hidden_size")):
        raise CheckpointError(f"config.json has mm_hidden_size={cfg['mm_hidden_size']} but the SigLIP config's "
                              f"hidden_size is {siglip.get('hidden_size')}; they must agree.")
    select_layer = int(cfg.get("mm_vision_select_layer", -2))
    n_cfg = int(siglip.get("num_hidden_layers", 12))
    layer_re = re.compile(r"model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")
    n_stored = len({m.group(1) for k in keys if (m := layer_re.match(k))})
    used = select_layer if select_layer >= 0 else n_cfg + 1 + select_layer
    if n_stored == used and used < n_cfg:
        prune = True
        notes.append(f"SigLIP tower stored with {n_stored} of {n_cfg} layers (LLaVA-OneVision drops the layers after "
                     f"mm_vision_select_layer={select_layer}); loaded pruned.")
    elif n_stored == n_cfg:
        prune = False
    else:
        raise CheckpointError(
            f"the checkpoint stores {n_stored} SigLIP encoder layers, but the SigLIP config has {n_cfg} and "
            f"mm_vision_select_layer={select_layer} uses {used}; fix num_hidden_layers in the vision config."
        )
    if "unpad" in str(cfg.get("mm_patch_merge_type", "")):
        notes.append(f"mm_patch_merge_type={cfg['mm_patch_merge_type']!r}: LLaDA-V unpads anyres crops and adds "
                     "image_newline after every feature row; mmdlm adds one image_newline after each image.")
    return dict(
        vision_config={"kind": "siglip", "siglip_config": siglip, "select_layer": select_layer,
                       "select_feature": cfg.get("mm_vision_select_feature", "patch"), "prune_layers": prune},
        mm_projector_type=cfg.get("mm_projector_type", "mlp2x_gelu"),
        use_image_newline="model.image_newline" in keys,
        image_aspect_ratio=cfg.get("image_aspect_ratio", "pad"),  # LLaDA-V: anyres_max_4
        image_grid_pinpoints=cfg.get("image_grid_pinpoints"),
    )


def _special_fields(layout: str, raw: dict, tok, vocab_size: int, file: Path, notes: list[str]) -> dict[str, Any]:
    ids = {t: _token_id(tok, t, vocab_size) for t in _REAL_IDS}
    mask = raw.get("mask_token_id")
    if mask is not None and ids[MASK_TOKEN] is not None and mask != ids[MASK_TOKEN]:
        raise CheckpointError(f"{file} says mask_token_id={mask} but the tokenizer's {MASK_TOKEN} is "
                              f"{ids[MASK_TOKEN]}; the tokenizer does not belong to these weights.")
    eos = ids[EOS_TOKEN] if ids[EOS_TOKEN] is not None else raw.get("eos_token_id")
    out: dict[str, Any] = dict(mask_token_id=mask if mask is not None else ids[MASK_TOKEN], eot_token_id=ids[EOT_TOKEN],
                               bos_token_id=ids[BOS_TOKEN], eos_token_id=eos, pad_token_id=eos)  # LLaDA pads with EOS
    if out["mask_token_id"] is None:
        raise CheckpointError(f"cannot tell the mask token id: {file} has no mask_token_id and there is no tokenizer "
                              f"with {MASK_TOKEN}; add mask_token_id to config.json.")
    for name in ("soi", "eoi", "t2i", "mmu"):
        out[f"{name}_token_id"] = ids[f"<|{name}|>"]
    if layout == "llada_v":
        out["image_token_id"] = ids[IMAGE_TOKEN]
        if out["image_token_id"] is None:
            raise CheckpointError("cannot pick an id for the <image> feature slots: put the LLaDA tokenizer "
                                  "(tokenizer.json + tokenizer_config.json) in the checkpoint folder.")
        # LLaDA-V's sampler forbids EOS, BOS and the two header tokens at masked positions.
        out["banned_token_ids"] = [ids[t] for t in (EOS_TOKEN, BOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN)
                                   if ids[t] is not None]
    if layout == "mmada":
        out["codebook_size"] = int(raw.get("codebook_size", 8192))
        if tok is not None:
            out["image_token_offset"] = len(tok)
        elif raw.get("llm_vocab_size") == _REAL_VOCAB:
            out["image_token_offset"] = _REAL_TEXT_LEN
        else:
            raise CheckpointError("MMaDA image codes start at len(tokenizer): put the tokenizer in the folder.")
        notes.append(f"image code c is token {out['image_token_offset']} + c (codebook {out['codebook_size']}, "
                     f"{raw.get('num_vq_tokens')} tokens per image); no image tokenizer is bundled with MMaDA, so "
                     "drawing pixels needs one (config.image_tokenizer_config is None).")
    return out


# ------------------------------------------------------------------------------------------------ weight names


def olmo_to_llama(key: str) -> Optional[str]:
    """The mmdlm (LLaMA-style) name of an original LLaDA / MMaDA tensor, or None if the table has no entry."""
    if key in OLMO_TOP_LEVEL:
        return OLMO_TOP_LEVEL[key]
    m = re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.weight", key)
    if m and m.group(2) in OLMO_BLOCK:
        return f"model.layers.{m.group(1)}.{OLMO_BLOCK[m.group(2)]}.weight"
    return None


def llama_to_olmo(key: str) -> str:
    """Inverse of :func:`olmo_to_llama` (used to name missing tensors as the checkpoint would)."""
    top = {v: k for k, v in OLMO_TOP_LEVEL.items()}
    if key in top:
        return top[key]
    block = {v: k for k, v in OLMO_BLOCK.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if m and m.group(2) in block:
        return f"model.transformer.blocks.{m.group(1)}.{block[m.group(2)]}.weight"
    return key


# ------------------------------------------------------------------------------------------------ decoding defaults


def _generation_defaults(layout: str, config: MMDLMConfig):
    """Decoding defaults of the source model's own demos (LLaDA generate.py, LLaDA-V generate_demo.py, MMaDA app)."""
    from .generation_config import MMDLMGenerationConfig

    gen = MMDLMGenerationConfig.from_model_config(config)
    if layout == "llada_v":
        gen.block_length = 128
    elif layout == "mmada":
        gen.image_steps, gen.guidance_scale = 15, 3.5
    return gen
