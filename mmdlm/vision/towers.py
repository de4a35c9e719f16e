"""Vision towers behind one factory: a from-scratch timm ViT, any timm model, any open_clip model, HF SigLIP, and
``vq``: the discrete codes of the model's own VQ image tokenizer, embedded and pooled (MMaDA reads images as codes).

Every tower maps [B, 3, H, W] pixels to [B, num_patches, hidden_size] features taken from one hidden state
(LLaVA's ``mm_vision_select_layer`` / ``mm_vision_select_feature``). Nothing ever downloads: weights come only
from a local ``checkpoint_path``.
"""

from __future__ import annotations

import difflib
import os

import torch
import torch.nn.functional as F
from torch import nn

from .tower_config import normalise_tower_config

# Checkpoint keys of the classifier side of timm models, which a tower never runs.
_TIMM_UNUSED_PREFIXES = ("head.", "head_drop.", "fc_norm.", "attn_pool.", "norm.")


def _resolve_layer(select_layer: int, num_layers: int) -> int:
    """Index into LLaVA's hidden_states tuple (entry 0 = embeddings, entry i = output of block i)."""
    idx = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= idx <= num_layers:
        raise ValueError(f"select_layer={select_layer} is out of range for a tower with {num_layers} layers "
                         f"(valid: {-(num_layers + 1)} .. {num_layers})")
    return idx


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision tower checkpoint_path {path!r} does not exist; point it at a local "
                                ".safetensors / .pt file (nothing is downloaded)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path!r} does not hold a flat state dict of tensors")
    return sd


def _load_weights(module: nn.Module, path: str, ignorable: set[str], ignorable_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``path`` into ``module``, finding the key prefix (``visual.``, ``module.``, ``vision_model.``, ...)
    under which the checkpoint stores it. Keys of parts we deliberately dropped are ignored; anything else
    missing or unexpected is an error."""
    sd = _read_state_dict(path)
    model_keys = set(module.state_dict())
    known = model_keys | ignorable
    anchors = sorted(model_keys)[:4] + sorted(ignorable)[:2]
    candidates = {""} | {ck[: len(ck) - len(mk)] for ck in sd for mk in anchors if ck.endswith("." + mk)}
    best = max(sorted(candidates), key=lambda p: sum(1 for k in sd if k.startswith(p) and k[len(p):] in known))
    picked = {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}
    missing = sorted(model_keys - set(picked))
    unexpected = sorted(k for k in picked if k not in known and not k.startswith(ignorable_prefixes))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the configured tower (key prefix {best!r}): "
                         f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    try:
        module.load_state_dict({k: v for k, v in picked.items() if k in model_keys}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path!r} has tensors of the wrong shape for the configured tower: {e}") from e


class _SiglipTrunk(nn.Module):
    """Holds the HF model as ``vision_model`` so keys read ``vision_model.*`` as in LLaDA-V checkpoints."""

    def __init__(self, siglip_config: dict):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel
        self.vision_model = SiglipVisionModel(SiglipVisionConfig(**siglip_config))


class _VQCodeTrunk(nn.Module):
    """A frozen copy of a VQ image tokenizer's encoder and codebook, then learned code embeddings pooled over the
    code grid. The codes are the ones the model draws with, so a tiny model trained from scratch reads images
    through features it already knows how to tell apart (a from-scratch ViT's features are nearly identical for
    different Shapes scenes at first, and the denoiser never learns to look at them)."""

    def __init__(self, vq: dict, width: int, pool: int):
        super().__init__()
        from .image_tokenizer import Encoder, VQConfig

        c = VQConfig(**vq)
        side = c.image_size // 2 ** len(c.channel_mult)
        if side % pool:
            raise ValueError(f"vision tower kind 'vq': pool={pool} must divide the {side}x{side} code grid")
        self.encoder = Encoder(c).requires_grad_(False)
        for p in self.encoder.parameters():
            p._mmdlm_frozen = True  # never trained here: the encoder belongs to the image tokenizer's stage
        self.register_buffer("codebook", torch.zeros(c.codebook_size, c.embed_dim))
        self.code_embed = nn.Embedding(c.codebook_size, width)
        # A learned embedding per pooled slot, as a ViT's pos_embed: a slot's grid cell is then in its features,
        # not only in its sequence position (whose offset to the answer varies with the prompt).
        self.pos_embed = nn.Parameter(torch.randn(1, (side // pool) ** 2, width) * 0.02)
        self.pool, self.side, self.image_size = pool, side, c.image_size

    @torch.no_grad()
    def load_image_tokenizer(self, image_tokenizer: nn.Module) -> None:
        """Copy the trained encoder and codebook of a :class:`~mmdlm.vision.image_tokenizer.VQImageTokenizer`."""
        self.encoder.load_state_dict(image_tokenizer.encoder.state_dict())
        self.codebook.copy_(image_tokenizer.embedding)

    @torch.no_grad()
    def codes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] pixels normalised to [-1, 1] -> codes [B, h, w] (as the image tokenizer encodes them)."""
        from .image_tokenizer import nearest_codes

        with torch.autocast(device_type=pixel_values.device.type, enabled=False):
            z = self.encoder(pixel_values.to(self.codebook.dtype))
            b, d, h, w = z.shape
            return nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, d), self.codebook).view(b, h, w)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.code_embed(self.codes(pixel_values)).permute(0, 3, 1, 2)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        return x.flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)


class VisionTower(nn.Module):
    """A vision encoder that returns one selected hidden state as [B, num_patches, hidden_size] features."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = normalise_tower_config(config)
        cfg, kind = self.config, self.config["kind"]
        builder = {"vit": self._build_vit, "timm": self._build_timm, "open_clip": self._build_open_clip,
                   "siglip": self._build_siglip, "vq": self._build_vq}[kind]
        self._trunk_attr: str | None = None  # "trunk" when open_clip wraps a timm model
        target, full_keys = builder(cfg)  # target: the module a checkpoint file describes
        if cfg["checkpoint_path"] is not None:
            prefixes = _TIMM_UNUSED_PREFIXES if kind in ("vit", "timm") else ("head.",) if kind == "siglip" else ()
            _load_weights(target, cfg["checkpoint_path"], full_keys - set(target.state_dict()), prefixes)
        if self._hidden_size is None:
            self._probe()
        self._patch_side = self._check_pool_grid(cfg["pool_grid"])

    # ---------------------------------------------------------------------------------------------------- builders
    def _setup_timm_vit(self, m: nn.Module, cfg: dict) -> None:
        self._backend = "timm_vit"
        self._layer = _resolve_layer(cfg["select_layer"], len(m.blocks))
        if cfg["prune_layers"]:
            m.blocks = m.blocks[: self._layer]
        # The classifier side (final norm, pooling, head) is never run; dropping it keeps every parameter used.
        m.norm, m.fc_norm, m.head, m.attn_pool = nn.Identity(), nn.Identity(), nn.Identity(), None
        self._prefix = m.num_prefix_tokens
        gh, gw = m.patch_embed.grid_size
        self._image_size = m.patch_embed.img_size[0]
        self._hidden_size = m.embed_dim
        self._num_patches = gh * gw + (self._prefix if cfg["select_feature"] == "cls_patch" else 0)

    def _build_vit(self, cfg: dict) -> tuple[nn.Module, set[str]]:
        from timm.models.vision_transformer import VisionTransformer
        if cfg["image_size"] % cfg["patch_size"]:
            raise ValueError(f"image_size {cfg['image_size']} must be a multiple of patch_size {cfg['patch_size']}")
        m = VisionTransformer(img_size=cfg["image_size"], patch_size=cfg["patch_size"], embed_dim=cfg["width"],
                              depth=cfg["depth"], num_heads=cfg["heads"], mlp_ratio=cfg["mlp_ratio"],
                              class_token=cfg["class_token"], global_pool="token" if cfg["class_token"] else "avg",
                              num_classes=0)
        full = set(m.state_dict())
        self.vision_tower = m
        self._setup_timm_vit(m, cfg)
        self._mean = tuple(cfg["image_mean"] or (0.5, 0.5, 0.5))
        self._std = tuple(cfg["image_std"] or (0.5, 0.5, 0.5))
        return m, full

    def _build_timm(self, cfg: dict) -> tuple[nn.Module, set[str]]:
        import timm
        name = cfg["model_name"]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5)
            raise ValueError(f"unknown timm model {name!r}" + (f"; did you mean {close}?" if close else ""))
        kwargs = dict(cfg["model_kwargs"])
        if cfg["image_size"] is not None:
            kwargs["img_size"] = cfg["image_size"]
        try:
            m = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            # Convolutional models take any input size; image_size then only sets the processor's resolution.
            kwargs.pop("img_size")
            m = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        self.vision_tower = m
        full = set(m.state_dict())
        self._setup_timm_any(m, cfg)
        data_cfg = timm.data.resolve_model_data_config(m)
        self._mean = tuple(cfg["image_mean"] or data_cfg["mean"])
        self._std = tuple(cfg["image_std"] or data_cfg["std"])
        if self._image_size is None:
            self._image_size = cfg["image_size"] or data_cfg["input_size"][-1]
        return m, full

    def _setup_timm_any(self, m: nn.Module, cfg: dict) -> None:
        from timm.models.vision_transformer import VisionTransformer
        if isinstance(m, VisionTransformer):
            self._setup_timm_vit(m, cfg)
            return
        if not hasattr(m, "forward_intermediates"):
            raise ValueError(f"timm model {type(m).__name__} has no forward_intermediates(); pick a ViT or a "
                             "model that supports feature extraction")
        if cfg["select_feature"] != "patch":
            raise ValueError("select_feature='cls_patch' needs a ViT-style tower; use 'patch' for this timm model")
        # For non-ViT timm models select_layer indexes forward_intermediates' feature list (-1 = last stage).
        self._backend, self._hidden_size, self._image_size = "timm_generic", None, None
        if cfg["prune_layers"]:
            self._take = m.prune_intermediate_layers([cfg["select_layer"]], prune_norm=True, prune_head=True)
        else:
            self._take = [cfg["select_layer"]]

    def _build_open_clip(self, cfg: dict) -> tuple[nn.Module, set[str]]:
        import open_clip  # imported here only: some machines lack it
        from open_clip.transformer import VisionTransformer as OCViT
        name = cfg["model_name"]
        if ":" in name:
            raise ValueError(f"open_clip model_name {name!r} uses a hub/schema prefix; nothing is downloaded. Use a "
                             "built-in name (open_clip.list_models()) and a local checkpoint_path")
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
            raise ValueError(f"unknown open_clip model {name!r}" + (f"; did you mean {close}?" if close else ""))
        kwargs = dict(cfg["model_kwargs"])
        if cfg["image_size"] is not None:
            kwargs["force_image_size"] = cfg["image_size"]
        # open_clip moves its model to a device itself; keep it on meta when the caller builds on meta.
        device = "meta" if torch.empty(0).device.type == "meta" else "cpu"
        visual = open_clip.create_model(name, pretrained=None, device=device, **kwargs).visual
        self._mean = tuple(cfg["image_mean"] or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self._std = tuple(cfg["image_std"] or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.vision_tower = visual
        full = set(visual.state_dict())
        if isinstance(visual, OCViT):
            self._backend = "oc_vit"
            self._layer = _resolve_layer(cfg["select_layer"], len(visual.transformer.resblocks))
            if cfg["prune_layers"]:
                visual.transformer.resblocks = visual.transformer.resblocks[: self._layer]
            visual.ln_post, visual.proj, visual.attn_pool = nn.Identity(), None, None
            self._prefix = 1
            gh, gw = visual.grid_size
            self._image_size = visual.image_size[0]
            self._hidden_size = visual.transformer.width
            self._num_patches = gh * gw + (1 if cfg["select_feature"] == "cls_patch" else 0)
        elif hasattr(visual, "trunk"):  # open_clip's TimmModel wrapper
            visual.head = nn.Identity()
            self._trunk_attr = "trunk"
            self._setup_timm_any(visual.trunk, cfg)
            if self._image_size is None:
                self._image_size = cfg["image_size"] or visual.image_size[0]
        else:
            raise ValueError(f"open_clip model {name!r} has a {type(visual).__name__} image trunk; only ViT and "
                             "timm trunks are supported")
        return visual, full

    def _build_siglip(self, cfg: dict) -> tuple[nn.Module, set[str]]:
        self.vision_tower = _SiglipTrunk(cfg["siglip_config"])
        vm = self.vision_tower.vision_model
        full = set(vm.state_dict())
        self._backend = "siglip"
        self._layer = _resolve_layer(cfg["select_layer"], len(vm.encoder.layers))
        if cfg["prune_layers"]:  # LLaDA-V deletes the last layer; with select_layer=-2 this matches its keys
            del vm.encoder.layers[self._layer:]
        # post_layernorm is kept (its keys are in LLaDA-V checkpoints) but never used, so it is not trained.
        vm.post_layernorm.requires_grad_(False)
        c = vm.config
        self._prefix = 0
        self._image_size = c.image_size
        self._hidden_size = c.hidden_size
        self._num_patches = (c.image_size // c.patch_size) ** 2
        self._mean = tuple(cfg["image_mean"] or (0.5, 0.5, 0.5))
        self._std = tuple(cfg["image_std"] or (0.5, 0.5, 0.5))
        return vm, full

    def _build_vq(self, cfg: dict) -> tuple[nn.Module, set[str]]:
        self.vision_tower = _VQCodeTrunk(cfg["vq"], cfg["width"], cfg["pool"])
        self._backend = "vq"
        self._prefix = 0
        self._image_size = self.vision_tower.image_size
        self._hidden_size = cfg["width"]
        self._num_patches = (self.vision_tower.side // cfg["pool"]) ** 2
        # The VQ encoder takes pixels in [-1, 1].
        self._mean = tuple(cfg["image_mean"] or (0.5, 0.5, 0.5))
        self._std = tuple(cfg["image_std"] or (0.5, 0.5, 0.5))
        return self.vision_tower, set(self.vision_tower.state_dict())

    @torch.no_grad()
    def _probe(self) -> None:
        was_training = self.training
        self.eval()
        # On the parameters' device: checkpoint loading builds the model on "meta", where only shapes exist.
        device = next(self.vision_tower.parameters()).device
        out = self._features(torch.zeros(1, 3, self._image_size, self._image_size, dtype=self.dtype, device=device))
        self.train(was_training)
        self._num_patches, self._hidden_size = out.shape[1], out.shape[2]

    def _check_pool_grid(self, pool_grid: int | None) -> int | None:
        """Validate pool_grid and set num_patches to its slots; returns the side of the patch grid it pools."""
        if pool_grid is None:
            return None
        if not isinstance(pool_grid, int) or isinstance(pool_grid, bool) or pool_grid < 1:
            raise ValueError(f"pool_grid must be a positive int (slots per side) or None, got {pool_grid!r}")
        side = int(round(self._num_patches ** 0.5))
        if self.config["select_feature"] != "patch" or side * side != self._num_patches:
            raise ValueError(f"pool_grid needs a square grid of patch features; this tower gives {self._num_patches} "
                             f"slots (select_feature={self.config['select_feature']!r}). Drop pool_grid or use 'patch'.")
        if pool_grid > side:
            raise ValueError(f"pool_grid={pool_grid} is finer than the tower's {side}x{side} patch grid; pick <= {side}")
        self._num_patches = pool_grid * pool_grid
        return side

    # ---------------------------------------------------------------------------------------------------- forward
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        b = self._backend
        if b == "vq":
            return self.vision_tower(x)
        m = getattr(self.vision_tower, self._trunk_attr) if self._trunk_attr else self.vision_tower
        if b == "timm_vit":
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            for blk in m.blocks[: self._layer]:
                x = blk(x)
        elif b == "oc_vit":
            v = m
            x = v._embeds(x)
            batch_first = getattr(v.transformer, "batch_first", True)
            x = x if batch_first else x.transpose(0, 1)
            for blk in v.transformer.resblocks[: self._layer]:
                x = blk(x)
            x = x if batch_first else x.transpose(0, 1)
        elif b == "siglip":
            vm = self.vision_tower.vision_model
            x = vm.embeddings(x)
            for layer in vm.encoder.layers[: self._layer]:
                x = layer(x, None)
        else:  # timm_generic
            x = m.forward_intermediates(x, indices=self._take, intermediates_only=True, stop_early=True)[0]
            return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x
        if self.config["select_feature"] == "patch" and self._prefix:
            x = x[:, self._prefix:]
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, num_patches, hidden_size] features of the selected layer."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
        if pixel_values.shape[-2:] != (self._image_size, self._image_size):
            raise ValueError(f"this vision tower takes {self._image_size}x{self._image_size} images, got "
                             f"{tuple(pixel_values.shape[-2:])}; resize with MMDLMImageProcessor(image_size=...)")
        x = self._features(pixel_values.to(self.dtype))
        if self._patch_side is None:
            return x
        g = self.config["pool_grid"]
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self._patch_side, self._patch_side)
        pool = F.adaptive_max_pool2d if self.config["pool_type"] == "max" else F.adaptive_avg_pool2d
        return pool(grid, g).flatten(2).transpose(1, 2)

    # ---------------------------------------------------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def load_image_tokenizer(self, image_tokenizer: nn.Module) -> None:
        """Kind ``vq`` only: take the encoder and codebook of the model's trained image tokenizer."""
        if self._backend != "vq":
            raise ValueError(f"only a 'vq' vision tower reads an image tokenizer; this one is {self.config['kind']!r}")
        self.vision_tower.load_image_tokenizer(image_tokenizer)

    @property
    def hidden_size(self) -> int:
        return int(self._hidden_size)

    @property
    def num_patches(self) -> int:
        return int(self._num_patches)

    @property
    def image_size(self) -> int:
        return int(self._image_size)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self._mean)  # type: ignore[return-value]

    @property
    def image_std(self) -> tuple[float, float, float]:
        return tuple(float(x) for x in self._std)  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return (f"kind={self.config['kind']!r}, select_layer={self.config['select_layer']}, "
                f"num_patches={self.num_patches}, hidden_size={self.hidden_size}")


def create_vision_tower(config: dict) -> VisionTower:
    """Build a :class:`VisionTower` from a JSON-serialisable dict whose ``kind`` is one of ``vit``, ``timm``,
    ``open_clip``, ``siglip`` (see the module docstring and ``_KIND_DEFAULTS`` for each kind's keys)."""
    return VisionTower(config)
