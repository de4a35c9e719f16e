"""mmdlm.sampling.generate (sampler choice, config defaults, aliases) and MMDLMGenerationConfig save/load."""

import json

import pytest
import torch

import mmdlm.sampling as sampling
from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration
from mmdlm.generation_config import MMDLMGenerationConfig, load_generation_config
from mmdlm.sampling.llada import generate as llada_generate

MASK = 63


def config():
    return MMDLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mask_token_id=MASK,
                       eos_token_id=2, bos_token_id=1, max_position_embeddings=128)


GenModel = MMDLMForConditionalGeneration  # its bases start with the generation mixin


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MMDLMForConditionalGeneration(config()).eval()


def test_generate_matches_reference_and_reports_nfe_and_time(model):
    x = torch.randint(3, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    out = sampling.generate(model, x, sampler="llada", steps=8, max_new_tokens=8, block_length=4)
    assert torch.equal(out.sequences, llada_generate(model, x, steps=8, gen_length=8, block_length=4))
    assert out.nfe == 8 and out.seconds > 0 and out.sequences.shape == (2, 13)
    with pytest.raises(ValueError, match="disagree"):
        sampling.generate(model, x, sampler="llada", max_new_tokens=8, gen_length=4)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling.generate(model, x, sampler="beam")


def test_generation_config_defaults_and_explicit_kwargs_win(model):
    x = torch.randint(3, 60, (1, 4), generator=torch.Generator().manual_seed(1))
    gc = MMDLMGenerationConfig(sampler="llada", steps=4, gen_length=8, block_length=4, remasking="random")
    seen = []
    out = sampling.generate(model, x, generation_config=gc, generator=torch.Generator().manual_seed(0),
                            callback=lambda i, z: seen.append(i))
    assert out.sequences.shape == (1, 12) and seen == [0, 1, 2, 3] and out.nfe == 4
    want = llada_generate(model, x, steps=4, gen_length=8, block_length=4, remasking="random",
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.sequences, want)
    out = sampling.generate(model, x, generation_config=gc, steps=8, remasking="low_confidence")
    assert out.nfe == 8
    # Only gen_length given: block_length and steps are fitted (block 4 does not divide 6; steps keep 0.5/token).
    out = sampling.generate(model, x, generation_config=gc, gen_length=6, generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (1, 10) and out.nfe == 3
    with pytest.raises(TypeError, match="MMDLMGenerationConfig"):
        sampling.generate(model, x, generation_config={"steps": 4})


def test_fast_sampler_missing_is_explained(model, monkeypatch):
    monkeypatch.setattr(sampling, "_fast_sampler", lambda: None)
    x = torch.randint(3, 60, (1, 4))
    with pytest.raises(ImportError, match="sampler='llada'"):
        sampling.generate(model, x, sampler="fast", steps=2, gen_length=2, block_length=2)
    with pytest.warns(UserWarning, match="falling back"):  # "fast" only by default: fall back to the reference
        out = sampling.generate(model, x, steps=2, gen_length=2, block_length=2)
    assert out.sequences.shape == (1, 6)


def test_fast_sampler_gets_fast_options(model, monkeypatch):
    calls = {}

    def fake_fast(model, input_ids, attention_mask=None, **kw):
        calls.update(kw)
        return llada_generate(model, input_ids, attention_mask, steps=kw["steps"], gen_length=kw["gen_length"],
                              block_length=kw["block_length"])

    monkeypatch.setattr(sampling, "_fast_sampler", lambda: fake_fast)
    gc = MMDLMGenerationConfig(steps=4, gen_length=4, block_length=4, threshold=0.7, cache="dual")
    out = sampling.generate(model, torch.randint(3, 60, (1, 4)), generation_config=gc)
    assert calls["threshold"] == 0.7 and calls["cache"] == "dual" and out.nfe is None


def test_generation_config_validates():
    with pytest.raises(ValueError, match="sampler"):
        MMDLMGenerationConfig(sampler="greedy")
    with pytest.raises(ValueError, match="multiple of block_length"):
        MMDLMGenerationConfig(gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="cache"):
        MMDLMGenerationConfig(cache="paged")
    with pytest.raises(ValueError, match="image_candidates must be a positive integer"):
        MMDLMGenerationConfig(image_candidates=0)
    MMDLMGenerationConfig(temperature=0.0).validate(strict=True)  # argmax needs no do_sample flag


def test_generation_config_round_trips_through_save_pretrained(tmp_path):
    assert GenModel.can_generate()
    torch.manual_seed(0)
    m = GenModel(config())
    assert isinstance(m.generation_config, MMDLMGenerationConfig) and m.generation_config.eos_token_id == 2
    m.generation_config = MMDLMGenerationConfig(sampler="llada", steps=64, gen_length=64, block_length=16,
                                                cache="dual", guidance_scale=5.0, image_steps=12, threshold=0.8,
                                                image_candidates=4)
    m.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["sampler"] == "llada" and saved["image_steps"] == 12 and saved["temperature"] == 0.0
    loaded = GenModel.from_pretrained(tmp_path)
    gc = loaded.generation_config
    assert isinstance(gc, MMDLMGenerationConfig)
    assert (gc.sampler, gc.steps, gc.block_length, gc.cache, gc.guidance_scale, gc.threshold) == (
        "llada", 64, 16, "dual", 5.0, 0.8)
    assert load_generation_config(tmp_path).image_steps == 12 and gc.image_candidates == 4
    assert load_generation_config(tmp_path / "nowhere").sampler == "fast"  # defaults when there is no file
    out = sampling.generate(loaded, torch.randint(3, 60, (1, 3)), gen_length=4, block_length=4, steps=2)
    assert out.nfe == 2
