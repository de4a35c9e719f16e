"""The reconstruction ceiling: an image tokenizer's reconstructions scored by the drawing checkers."""

import json

import pytest
import torch
from torch import nn

from mmdlm.data.shapes import ShapesWorld
from mmdlm.eval.reconstruction import code_locality, load_image_tokenizer, main, score_reconstructions
from mmdlm.vision.image_tokenizer import VQConfig, VQImageTokenizer


class PixelCodec(nn.Module):
    """A stand-in tokenizer whose 'codes' are the pixels themselves, optionally blanked to white on decode."""

    def __init__(self, blank: bool = False):
        super().__init__()
        self.blank = blank
        self.dummy = nn.Parameter(torch.zeros(1))
        self.real = VQImageTokenizer(VQConfig(base_channels=8, embed_dim=4, codebook_size=8))

    def preprocess(self, images):
        return self.real.preprocess(images)

    def encode(self, pixels):
        return pixels

    def decode(self, codes):
        return torch.ones_like(codes) if self.blank else codes

    to_pil = staticmethod(VQImageTokenizer.to_pil)


def test_a_lossless_codec_reaches_the_checkers_ceiling_and_a_blank_one_scores_nothing():
    perfect = score_reconstructions(PixelCodec(), splits=["test", "digits"], n=40)
    assert perfect["test"]["t2i_all_correct"] >= 0.99
    assert perfect["digits"]["drawn_digit_accuracy"] == perfect["digits"]["original_digit_accuracy"] >= 0.9
    blank = score_reconstructions(PixelCodec(blank=True), splits=["test"], n=20)
    assert blank["test"]["t2i_all_correct"] == 0.0 and blank["test"]["t2i_attribute_accuracy"]["color"] == 0.0


def test_an_untrained_tokenizer_scores_below_a_lossless_one(tmp_path):
    vq = VQImageTokenizer(VQConfig(base_channels=8, embed_dim=4, codebook_size=8))
    vq.save_pretrained(tmp_path / "vq")
    out = tmp_path / "ceiling.json"
    assert main([str(tmp_path / "vq"), "--splits", "test", "--n", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["test"]["t2i_all_correct"] < 0.5 and result["locality"]["codes"] == 256
    assert isinstance(load_image_tokenizer(str(tmp_path / "vq")), VQImageTokenizer)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown split"):
        score_reconstructions(PixelCodec(), splits=["train"])
    with pytest.raises(ValueError, match="n must be"):
        score_reconstructions(PixelCodec(), n=0)


def test_code_locality_tells_a_per_position_norm_from_group_norm():
    scenes = [s.image for s in ShapesWorld("test", 16, 0)]
    found = {}
    for norm in ("pixel", "group"):
        torch.manual_seed(0)
        vq = VQImageTokenizer(VQConfig(base_channels=16, embed_dim=8, codebook_size=64, norm=norm))
        vq.train()(vq.preprocess(scenes))  # data-dependent codebook init: codes differ between patches
        found[norm] = code_locality(vq)
    assert found["pixel"]["moved_by_one_small_shape"] > 0 and found["pixel"]["moved_far_away"] == 0
    assert found["group"]["moved_far_away"] > 10
