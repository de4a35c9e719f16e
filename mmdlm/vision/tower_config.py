"""Vision tower configs as data: the keys and defaults of each tower kind, the SigLIP presets, and the check that
turns a user's dict into a complete, JSON-serialisable config."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

KINDS = ("vit", "timm", "open_clip", "siglip", "vq")
_COMMON_KEYS = {"kind", "select_layer", "select_feature", "checkpoint_path", "prune_layers", "image_mean", "image_std",
                "pool_grid", "pool_type"}
_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": dict(image_size=64, patch_size=8, width=128, depth=4, heads=4, mlp_ratio=4.0, class_token=False),
    "timm": dict(model_name=None, image_size=None, model_kwargs={}),
    "open_clip": dict(model_name=None, image_size=None, model_kwargs={}),
    "siglip": dict(siglip_config=None),
    # vq: the VQ tokenizer's config (filled in from the model's image tokenizer by the training recipe), the width
    # of the learned code embeddings, and the average-pooling factor over the code grid (2: 16x16 codes -> 64 slots).
    "vq": dict(vq=None, width=128, pool=2),
}
# pool_grid: pool the square patch grid to pool_grid x pool_grid slots (token pooling as in LLaVA-OneVision /
# LaViDa): fewer, coarser slots; None keeps every patch. pool_type "avg" averages a slot's patches, "max" keeps each
# channel's peak, so a small object's local features survive whatever part of the slot it sits in.
_COMMON_DEFAULTS = dict(select_layer=-2, select_feature="patch", checkpoint_path=None, prune_layers=True,
                        image_mean=None, image_std=None, pool_grid=None, pool_type="avg")

# google/siglip-so400m-patch14-384, the tower LLaDA-V ships (pass siglip_config="so400m-patch14-384").
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_SIGLIP_PRESETS = {"so400m-patch14-384": SIGLIP_SO400M_384}


def normalise_tower_config(config: dict) -> dict:
    """A tower config with every default filled in, checked key by key; raises ``ValueError`` / ``TypeError``
    saying which key is wrong and what it accepts."""
    if not isinstance(config, dict):
        raise TypeError(f"vision tower config must be a dict, got {type(config).__name__}")
    kind = config.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown vision tower kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    allowed = _COMMON_KEYS | set(_KIND_DEFAULTS[kind])
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} for vision tower kind {kind!r}; allowed: {sorted(allowed)}")
    cfg = {"kind": kind, **copy.deepcopy(_COMMON_DEFAULTS), **copy.deepcopy(_KIND_DEFAULTS[kind])}
    cfg.update(copy.deepcopy(config))
    if cfg["select_feature"] not in ("patch", "cls_patch"):
        raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {cfg['select_feature']!r}")
    if cfg["pool_type"] not in ("avg", "max"):
        raise ValueError(f"pool_type must be 'avg' or 'max', got {cfg['pool_type']!r}")
    if not isinstance(cfg["select_layer"], int) or isinstance(cfg["select_layer"], bool):
        raise ValueError(f"select_layer must be an int (e.g. -2), got {cfg['select_layer']!r}")
    if kind in ("timm", "open_clip") and not isinstance(cfg["model_name"], str):
        raise ValueError(f"vision tower kind {kind!r} needs a 'model_name' string")
    if kind == "siglip":
        sc = cfg["siglip_config"]
        if isinstance(sc, str):
            if sc not in _SIGLIP_PRESETS:
                raise ValueError(f"unknown siglip_config preset {sc!r}; presets: {sorted(_SIGLIP_PRESETS)}")
            sc = dict(_SIGLIP_PRESETS[sc])
        if not isinstance(sc, dict):
            raise ValueError("vision tower kind 'siglip' needs 'siglip_config': a SiglipVisionConfig dict or a preset "
                             f"name from {sorted(_SIGLIP_PRESETS)}")
        cfg["siglip_config"] = {**sc, "vision_use_head": False}  # the pooling head is never used
    for key in ("image_mean", "image_std"):
        if cfg[key] is not None and len(cfg[key]) != 3:
            raise ValueError(f"{key} must have 3 values, got {cfg[key]!r}")
    if kind == "vq":
        if not isinstance(cfg["vq"], dict):
            raise ValueError("vision tower kind 'vq' needs 'vq': the image tokenizer's config dict (a training recipe "
                             "fills it in from model.image_tokenizer)")
        for key in ("width", "pool"):
            if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
                raise ValueError(f"vision tower kind 'vq': {key} must be a positive int, got {cfg[key]!r}")
        if cfg["checkpoint_path"] is not None:
            raise ValueError("vision tower kind 'vq' takes its encoder from the image tokenizer, not a checkpoint_path")
    if cfg["checkpoint_path"] is not None:
        cfg["checkpoint_path"] = os.fspath(cfg["checkpoint_path"])
    try:
        json.dumps(cfg)
    except TypeError as e:
        raise ValueError(f"vision tower config must be JSON-serialisable (it is stored in config.json): {e}") from e
    return cfg
