"""Image codes drawn left to right by a causal model (the AR twin): the KV-cached loop against a full recompute,
guidance, per-row seeding, the code range, and the errors that keep MaskGIT and AR decoding apart."""

import pytest
import torch

from mmdlm.sampling.autoregressive import generate_image_tokens_autoregressive
from mmdlm.sampling.maskgit import generate_image_tokens, t2i_prompt_ids

from test_sampler_maskgit import CODES, OFFSET, SOI, tiny

N = 10


@pytest.fixture(scope="module")
def causal():
    return tiny(is_causal=True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_greedy(model, prompt, guidance_scale=0.0):
    """Greedy codes with no cache: the whole row is recomputed for every code."""
    codes = []
    for _ in range(N):
        row = prompt + [SOI] + [c + OFFSET for c in codes]
        logits = model(input_ids=torch.tensor([row])).logits[0, -1, OFFSET : OFFSET + CODES].double()
        if guidance_scale > 0:
            un_row = t2i_prompt_ids(model.config, []) + [SOI] + [c + OFFSET for c in codes]
            un = model(input_ids=torch.tensor([un_row])).logits[0, -1, OFFSET : OFFSET + CODES].double()
            logits = (1 + guidance_scale) * logits - guidance_scale * un
        codes.append(int(logits.argmax()))
    return codes


@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_cached_batch_with_mixed_lengths_equals_full_recompute(causal, guidance_scale):
    prompts = [t2i_prompt_ids(causal.config, [10, 11, 12]), t2i_prompt_ids(causal.config, [13])]
    codes = generate_image_tokens_autoregressive(causal, prompts, N, guidance_scale=guidance_scale, temperature=0)
    expected = [reference_greedy(causal, p, guidance_scale) for p in prompts]
    assert codes.tolist() == expected
    assert len({tuple(r) for r in expected}) == 2  # the prompts matter, so the comparison means something


def test_sampling_is_seeded_per_row_and_stays_in_the_codebook(causal):
    prompts = [t2i_prompt_ids(causal.config, [10, 11]), t2i_prompt_ids(causal.config, [12, 13, 14])]
    batch = generate_image_tokens_autoregressive(causal, prompts, N, temperature=1.0, generator=[gen(1), gen(2)])
    alone = generate_image_tokens_autoregressive(causal, prompts[1:], N, temperature=1.0, generator=[gen(2)])
    assert torch.equal(batch[1], alone[0])
    again = generate_image_tokens_autoregressive(causal, prompts, N, temperature=1.0, generator=[gen(1), gen(2)])
    assert torch.equal(batch, again)
    other = generate_image_tokens_autoregressive(causal, prompts, N, temperature=1.0, generator=[gen(3), gen(4)])
    assert not torch.equal(batch, other)
    assert int(batch.min()) >= 0 and int(batch.max()) < CODES


def test_callback_sees_codes_appear_in_raster_order(causal):
    seen = []
    codes = generate_image_tokens_autoregressive(causal, [t2i_prompt_ids(causal.config, [10])], N, temperature=0,
                                                 callback=lambda t, c: seen.append((t, c[0].tolist())))
    assert [t for t, _ in seen] == list(range(N))
    for t, row in seen:
        assert row[: t + 1] == codes[0, : t + 1].tolist() and row[t + 1 :] == [-1] * (N - t - 1)


def test_maskgit_and_ar_decoding_refuse_the_other_kind_of_model(causal):
    prompt = [t2i_prompt_ids(causal.config, [10])]
    with pytest.raises(ValueError, match="causal"):
        generate_image_tokens(causal, prompt, N)
    with pytest.raises(ValueError, match="needs a causal model"):
        generate_image_tokens_autoregressive(tiny(), prompt, N)


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(temperature=-0.5), "temperature"),
    (dict(num_image_tokens=0), "num_image_tokens"),
    (dict(num_image_tokens=60), "max_position_embeddings"),
    (dict(prompt_ids=[]), "prompt_ids is empty"),
])
def test_bad_inputs_raise(causal, kwargs, match):
    args = dict(prompt_ids=[t2i_prompt_ids(causal.config, [10])], num_image_tokens=N)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_image_tokens_autoregressive(causal, **args)


def test_model_without_codebook_cannot_draw():
    with pytest.raises(ValueError, match="cannot draw"):
        generate_image_tokens_autoregressive(tiny(draw=False, is_causal=True), [[1, 2]], N)


def test_pipeline_draws_with_a_causal_model_code_by_code(tiny_model_dir, tmp_path):
    """``generate_image`` / ``stream_image`` on a causal model folder take the AR path: one forward per code, the
    same codes as the sampler called directly, and a stream whose unknown region shrinks one code at a time."""
    import json
    import shutil

    from mmdlm.pipeline import MMDLMPipeline

    folder = shutil.copytree(tiny_model_dir, tmp_path / "causal")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "is_causal": True}))
    pipe = MMDLMPipeline.from_pretrained(folder, device="cpu")
    h, w = pipe._image_grid()
    image = pipe.generate_image("a small red circle at the center.", seed=3, guidance_scale=0.0)
    assert pipe.last_stats.forward_passes == h * w
    codes = generate_image_tokens_autoregressive(
        pipe.model, pipe.processor.build_t2i_prompt(["a small red circle at the center."]), h * w,
        generator=torch.Generator().manual_seed(3))
    decoded = pipe.model.image_tokenizer.to_pil(pipe.model.image_tokenizer.decode(codes.view(-1, h, w)))[0]
    assert image.tobytes() == decoded.tobytes()
    states = list(pipe.stream_image("a small red circle at the center.", seed=3, guidance_scale=0.0))
    assert [s.unknown for s in states[:-1]] == list(range(h * w - 1, -1, -1))
    assert states[-1].done and states[-1].image.tobytes() == image.tobytes()


@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_a_model_with_shifted_logits_draws_the_same_codes(causal, guidance_scale):
    import copy

    shifted = copy.deepcopy(causal)
    shifted.config.shift_logits = True  # same weights: the decoder must ask it for next-token logits
    prompts = [t2i_prompt_ids(causal.config, [10, 11, 12]), t2i_prompt_ids(causal.config, [13])]
    codes = generate_image_tokens_autoregressive(shifted, prompts, N, guidance_scale=guidance_scale, temperature=0)
    assert codes.tolist() == [reference_greedy(causal, p, guidance_scale) for p in prompts]
