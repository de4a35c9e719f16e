"""A small trainable VQ autoencoder that turns images into a grid of discrete codes (MMaDA's MAGVIT-v2 role).

Conv encoder -> nearest-codebook quantiser (EMA codebook updates, dead-code restart, commitment loss,
straight-through gradients) -> conv decoder. Pixels are in [0, 1] at the API and [-1, 1] inside.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .image_processing import load_image

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
MODEL_TYPE = "mmdlm_vq_image_tokenizer"
NORMS = ("group", "pixel")


@dataclass
class VQConfig:
    """Sizes of the VQ tokenizer. Every entry of ``channel_mult`` is one stride-2 level, so the default turns
    64x64 pixels into a 16x16 code grid."""

    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    embed_dim: int = 32
    codebook_size: int = 256
    commitment_cost: float = 0.25
    ema_decay: float = 0.99
    ink_weight: float = 0.0  # extra reconstruction weight on non-white pixels (line art, Shapes, digits); 0 = plain MSE
    dead_code_threshold: float = 0.03  # EMA usage below this (codes per batch) -> restart the code from the data
    # "group": GroupNorm, whose statistics span the whole image, so every code depends on every object (one small
    # shape changes most of a 16x16 grid); "pixel": each position normalised over its channels alone, so a code
    # depends only on the pixels its convolutions see, and blank canvas is the same codes wherever it is.
    norm: str = "group"

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be non-empty positive ints, got {self.channel_mult}")
        factor = 2 ** len(self.channel_mult)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**len(channel_mult) = {factor}")
        for name in ("in_channels", "base_channels", "num_res_blocks", "embed_dim", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

    @property
    def grid_side(self) -> int:
        """Codes per side of the (square) code grid."""
        return self.image_size // 2 ** len(self.channel_mult)


class PixelNorm(nn.Module):
    """Layer norm over the channels of each position (with a learned scale and shift per channel)."""

    def __init__(self, ch: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(ch)), nn.Parameter(torch.zeros(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias).permute(0, 3, 1, 2)


def _norm(ch: int, kind: str = "group") -> nn.Module:
    if kind == "pixel":
        return PixelNorm(ch)
    return nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0), ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str = "group"):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, norm), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, norm), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        ch = c.base_channels
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        for mult in c.channel_mult:
            for _ in range(c.num_res_blocks):
                layers.append(ResBlock(ch, c.base_channels * mult, c.norm))
                ch = c.base_channels * mult
            layers.append(nn.Conv2d(ch, ch, 4, stride=2, padding=1))  # exact halving
        self.down = nn.Sequential(*layers)
        self.mid = ResBlock(ch, ch, c.norm)
        self.norm_out, self.conv_out = _norm(ch, c.norm), nn.Conv2d(ch, c.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        ch = c.base_channels * c.channel_mult[-1]
        self.conv_in = nn.Conv2d(c.embed_dim, ch, 3, padding=1)
        self.mid = ResBlock(ch, ch, c.norm)
        layers: list[nn.Module] = []
        for mult in reversed(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers.append(ResBlock(ch, c.base_channels * mult, c.norm))
                ch = c.base_channels * mult
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        self.up = nn.Sequential(*layers)
        self.norm_out, self.conv_out = _norm(ch, c.norm), nn.Conv2d(ch, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    # Keep codebook statistics identical across data-parallel ranks.
    if _distributed():
        torch.distributed.all_reduce(t)
    return t


def nearest_codes(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row for each row of ``flat`` [N, D], with distances in fp32 even when the
    module was cast to half precision."""
    flat, e = flat.float(), codebook.float()
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
    return dist.argmin(1)


class VQImageTokenizer(nn.Module):
    """Images in [0, 1] <-> LongTensor code grids [B, h, w] with values in [0, codebook_size)."""

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = config or VQConfig()
        c = self.config
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        # The codebook is a buffer: it is learned by EMA of assigned encoder outputs, not by the optimiser.
        self.register_buffer("embedding", torch.randn(c.codebook_size, c.embed_dim) * 0.1)
        self.register_buffer("ema_cluster_size", torch.ones(c.codebook_size))
        self.register_buffer("ema_embed_sum", self.embedding.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # ---------------------------------------------------------------------------------------------------- geometry
    @property
    def grid_size(self) -> tuple[int, int]:
        return self.config.grid_side, self.config.grid_side

    @property
    def num_tokens(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    # ---------------------------------------------------------------------------------------------------- quantiser
    def _check_pixels(self, x: torch.Tensor) -> None:
        c, f = self.config, 2 ** len(self.config.channel_mult)
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != c.in_channels:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"pixel_values must be a [B, {c.in_channels}, H, W] tensor, got {shape}")
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"pixel_values must be in [0, 1], got [{lo:.3g}, {hi:.3g}]; pass unnormalised pixels "
                             "(use VQImageTokenizer.preprocess)")

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        return nearest_codes(flat, self.embedding)

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        # Data-dependent init: start every code on a real encoder output, so none begins far from the data.
        pick = torch.randint(0, flat.shape[0], (self.config.codebook_size,), device=flat.device)
        self.embedding.copy_(flat[pick])
        if _distributed():
            torch.distributed.broadcast(self.embedding, 0)
        self.ema_embed_sum.copy_(self.embedding)
        self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        c = self.config
        onehot = F.one_hot(idx, c.codebook_size).type(flat.dtype)
        counts, sums = _all_reduce_(onehot.sum(0)), _all_reduce_(onehot.t() @ flat)
        d = c.ema_decay
        self.ema_cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.ema_embed_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.ema_cluster_size.sum()
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        size = (self.ema_cluster_size + 1e-5) / (n + c.codebook_size * 1e-5) * n
        self.embedding.copy_(self.ema_embed_sum / size[:, None])
        dead = self.ema_cluster_size < c.dead_code_threshold
        if dead.any():  # restart unused codes on random encoder outputs so the whole codebook stays in play
            fresh = flat[torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)]
            if _distributed():  # the dead mask is identical on every rank (all-reduced stats); rank 0 picks
                torch.distributed.broadcast(fresh, 0)
            self.embedding[dead] = fresh
            self.ema_embed_sum[dead] = fresh
            self.ema_cluster_size[dead] = 1.0

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] -> (straight-through quantised z, codes [B, h, w], commitment loss)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        if self.training and not bool(self.initialized):
            self._init_codebook(flat)
        idx = self._nearest(flat)
        if self.training:
            self._ema_update(flat, idx)
        q = self.embedding[idx].view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        commit = self.config.commitment_cost * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), idx.view(b, h, w), commit

    # ---------------------------------------------------------------------------------------------------- public API
    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Autoencode [B, 3, H, W] pixels in [0, 1]; in training mode this also updates the codebook.

        Returns ``recon`` (unclamped, in [0, 1] scale), ``codes`` [B, h, w], ``loss`` = ``recon_loss`` (MSE) +
        ``commit_loss``.
        """
        self._check_pixels(pixel_values)
        z = self.encoder(pixel_values * 2 - 1)
        zq, codes, commit = self.quantize(z)
        recon = self.decoder(zq) * 0.5 + 0.5
        recon_loss = F.mse_loss(recon, pixel_values)
        if self.config.ink_weight:
            # Small objects on a white canvas are a few percent of the pixels: plain MSE lets the codes blur them.
            ink = (1.0 - pixel_values.amin(dim=1, keepdim=True) > 0.1).float()
            recon_loss = ((recon - pixel_values).pow(2) * (1.0 + self.config.ink_weight * ink)).mean()
        return {"recon": recon, "codes": codes, "loss": recon_loss + commit, "recon_loss": recon_loss,
                "commit_loss": commit}

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels in [0, 1] -> LongTensor codes [B, h, w]. Never changes the codebook."""
        self._check_pixels(pixel_values)
        z = self.encoder(pixel_values * 2 - 1)
        b, d, h, w = z.shape
        return self._nearest(z.permute(0, 2, 3, 1).reshape(-1, d).float()).view(b, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] or [B, h*w] -> images [B, 3, H, W] clamped to [0, 1] (no gradients: use forward() to
        train the decoder)."""
        if not torch.is_tensor(codes) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError("codes must be an integer tensor (e.g. torch.long)")
        if codes.ndim == 2:
            h, w = self.grid_size
            if codes.shape[1] != h * w:
                raise ValueError(f"flat codes must have {h * w} = {h}x{w} entries per image, got {codes.shape[1]}")
            codes = codes.view(codes.shape[0], h, w)
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, h, w] or [B, h*w], got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must be in [0, {self.codebook_size}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]; subtract image_token_offset from token ids")
        q = F.embedding(codes.long(), self.embedding).permute(0, 3, 1, 2)
        dtype = self.decoder.conv_in.weight.dtype
        return (self.decoder(q.to(dtype)) * 0.5 + 0.5).clamp(0, 1)

    def preprocess(self, images: Any | Sequence[Any]) -> torch.Tensor:
        """Images (anything ``load_image`` accepts, one or a list) -> [B, 3, S, S] in [0, 1]: resize the short
        side to ``image_size`` (bicubic), then centre-crop, as MMaDA does for MAGVIT-v2."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        s, out = self.config.image_size, []
        for im in batch:
            im = load_image(im)
            w, h = im.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            im = im.crop((left, top, left + s, top + s))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return torch.stack(out).to(self.embedding.device)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        """[B, 3, H, W] or [3, H, W] tensor in [0, 1] (values are clamped) -> list of RGB PIL images."""
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] or [3, H, W], got {tuple(images.shape)}")
        arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    # ---------------------------------------------------------------------------------------------------- files
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors``, each atomically (temp file, then ``os.replace``)."""
        from safetensors.torch import save_file
        os.makedirs(save_directory, exist_ok=True)
        cfg = {"model_type": MODEL_TYPE, **asdict(self.config)}
        cfg["channel_mult"] = list(cfg["channel_mult"])
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        for name, write in ((CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2))),
                            (WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))):
            fd, tmp = tempfile.mkstemp(dir=save_directory, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, os.path.join(save_directory, name))
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "VQImageTokenizer":
        """Load a tokenizer written by :meth:`save_pretrained` (returned on CPU, in eval mode)."""
        from safetensors.torch import load_file
        d = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{str(d / name)!r} not found; save a tokenizer with save_pretrained() first")
        raw = json.loads((d / CONFIG_NAME).read_text())
        if raw.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"{d / CONFIG_NAME} is not a VQ image tokenizer config (model_type != {MODEL_TYPE!r})")
        known = {f.name for f in fields(VQConfig)}
        if set(raw) - known:
            raise ValueError(f"unknown keys in {d / CONFIG_NAME}: {sorted(set(raw) - known)}")
        model = cls(VQConfig(**raw))
        model.load_state_dict(load_file(str(d / WEIGHTS_NAME), device="cpu"), strict=True)
        return model.eval()
