"""VQ image tokenizer: shapes, determinism, decode checks, save/load, and that a few steps of training work."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mmdlm.vision import VQConfig, VQImageTokenizer


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return VQImageTokenizer()  # default config: 64 px -> 16x16 codes


def _synthetic(n=6, size=16, seed=0):
    """White images each with one coloured rectangle at its own place."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.ones(n, 3, size, size)
    for i in range(n):
        y, x = (i * 3) % (size // 2), (i * 5) % (size // 2)
        imgs[i, :, y:y + size // 2, x:x + size // 3] = torch.rand(3, 1, 1, generator=g)
    return imgs


def test_default_geometry_and_encode(vq):
    assert vq.grid_size == (16, 16) and vq.codebook_size == 256 and vq.num_tokens == 256
    x = torch.rand(2, 3, 64, 64)
    codes = vq.encode(x)
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 256
    before = vq.embedding.clone()
    vq.train()
    assert torch.equal(vq.encode(x), codes)  # deterministic, and encode never touches the codebook
    vq.eval()
    assert torch.equal(vq.embedding, before)


def test_forward_outputs_and_decode(vq):
    x = torch.rand(2, 3, 64, 64)
    out = vq.eval()(x)
    assert out["recon"].shape == x.shape and out["codes"].shape == (2, 16, 16)
    assert torch.allclose(out["loss"], out["recon_loss"] + out["commit_loss"])
    img = vq.decode(out["codes"])
    assert img.shape == (2, 3, 64, 64) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert torch.allclose(vq.decode(out["codes"].view(2, -1)), img)  # flat codes give the same pictures
    assert torch.allclose(img, out["recon"].clamp(0, 1), atol=1e-5)


def test_bad_codes_and_pixels_raise(vq):
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        vq.decode(torch.full((1, 16, 16), 256))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        vq.decode(torch.full((1, 16, 16), -1))
    with pytest.raises(ValueError, match="integer"):
        vq.decode(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="256"):
        vq.decode(torch.zeros(1, 100, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vq.encode(torch.rand(1, 3, 64, 64) * 2 - 1)  # normalised to [-1, 1] by mistake
    with pytest.raises(ValueError, match="multiples"):
        vq.encode(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError):
        VQConfig(image_size=66)


def test_training_lowers_reconstruction_loss():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs run faster single-threaded, and the cores are shared
    try:
        torch.manual_seed(0)
        vq = VQImageTokenizer(VQConfig(image_size=16, base_channels=8, embed_dim=8, codebook_size=32))
        imgs = _synthetic()
        opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
        losses = []
        for _ in range(150):
            out = vq(imgs)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["recon_loss"].item())
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:3])
    vq.eval()
    codes = vq.encode(imgs)
    assert len(codes.unique()) > 4  # the codebook is in use, not collapsed to one code
    mse = float(((vq.decode(codes) - imgs) ** 2).mean())
    mean_image_mse = float(((imgs - imgs.mean(0, keepdim=True)) ** 2).mean())
    assert mse < 0.3 * mean_image_mse  # better than knowing only the average picture


def test_save_and_load_give_identical_codes(tmp_path):
    torch.manual_seed(1)
    vq = VQImageTokenizer(VQConfig(image_size=16, base_channels=8, embed_dim=8, codebook_size=32))
    imgs = _synthetic(4)
    vq.train()(imgs)  # one training forward: data-dependent codebook init + EMA step
    vq.eval()
    vq.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left behind
    again = VQImageTokenizer.from_pretrained(tmp_path)
    assert again.config == vq.config and not again.training
    assert torch.equal(again.encode(imgs), vq.encode(imgs))
    assert torch.equal(again.decode(vq.encode(imgs)), vq.decode(vq.encode(imgs)))
    with pytest.raises(FileNotFoundError):
        VQImageTokenizer.from_pretrained(tmp_path / "missing")


def test_preprocess_and_to_pil(vq):
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste(Image.new("RGB", (32, 64), (0, 0, 255)), (0, 0))  # blue strip on the left, cropped away
    x = vq.preprocess([img, np.full((64, 64, 3), 255, dtype=np.uint8)])
    assert x.shape == (2, 3, 64, 64) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.allclose(x[0, :, 32, 32], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)  # centre crop is red
    pils = vq.to_pil(x)
    assert [p.size for p in pils] == [(64, 64), (64, 64)] and pils[1].getpixel((5, 5)) == (255, 255, 255)
    assert vq.to_pil(x[0])[0].getpixel((32, 32))[0] > 250


def test_ink_weight_upweights_non_white_pixels(tmp_path):
    torch.manual_seed(0)
    cfg = dict(base_channels=8, embed_dim=4, codebook_size=16)
    plain, inked = VQImageTokenizer(VQConfig(**cfg)), VQImageTokenizer(VQConfig(**cfg, ink_weight=10.0))
    inked.load_state_dict(plain.state_dict())
    plain.eval(), inked.eval()
    white = torch.ones(1, 3, 64, 64)
    dot = white.clone()
    dot[:, :, 20:30, 20:30] = 0.0  # a black square: 100 "ink" pixels
    with torch.no_grad():
        # On a blank canvas there is no ink, so both losses agree; with ink the weighted loss is larger.
        assert torch.allclose(plain(white)["recon_loss"], inked(white)["recon_loss"])
        out = plain(dot)
        ink = torch.zeros(1, 1, 64, 64)
        ink[..., 20:30, 20:30] = 1.0
        expected = ((out["recon"] - dot).pow(2) * (1.0 + 10.0 * ink)).mean()
        assert torch.allclose(inked(dot)["recon_loss"], expected) and expected > out["recon_loss"]
    inked.save_pretrained(tmp_path)
    assert VQImageTokenizer.from_pretrained(tmp_path).config.ink_weight == 10.0


def _one_square(corner: bool) -> torch.Tensor:
    img = torch.ones(1, 3, 64, 64)
    if corner:
        img[:, :, 4:13, 4:13] = torch.tensor([0.86, 0.16, 0.16])[:, None, None]
    return img


def test_pixel_norm_keeps_codes_local_and_group_norm_does_not():
    # One small square in the top-left corner: with per-position normalisation the codes of the far half of the
    # canvas stay those of a blank one; GroupNorm's image-wide statistics move codes everywhere.
    changed = {}
    for norm in ("pixel", "group"):
        torch.manual_seed(0)
        vq = VQImageTokenizer(VQConfig(base_channels=16, embed_dim=8, codebook_size=64, norm=norm)).eval()
        blank_and_square = torch.cat([_one_square(False), _one_square(True)])
        vq.train()(blank_and_square)  # data-dependent codebook init, so the codes are not all one
        vq.eval()
        codes = vq.encode(blank_and_square)
        changed[norm] = (codes[0] != codes[1])
    assert changed["pixel"][:4, :4].any() and not changed["pixel"][8:, :].any() and not changed["pixel"][:, 8:].any()
    assert changed["group"][8:, 8:].any()
    with pytest.raises(ValueError, match="norm must be one of"):
        VQConfig(norm="batch")


def test_pixel_norm_survives_save_and_load(tmp_path):
    torch.manual_seed(2)
    vq = VQImageTokenizer(VQConfig(image_size=16, base_channels=8, embed_dim=8, codebook_size=32, norm="pixel"))
    imgs = _synthetic(4)
    vq.train()(imgs)
    vq.eval().save_pretrained(tmp_path)
    again = VQImageTokenizer.from_pretrained(tmp_path)
    assert again.config.norm == "pixel" and torch.equal(again.encode(imgs), vq.encode(imgs))
