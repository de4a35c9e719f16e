"""MaskGIT text-to-image sampler: cosine schedule, code range, guidance with mixed prompt lengths, seeding, errors."""

import math
from types import SimpleNamespace

import pytest
import torch

from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration
from mmdlm.sampling.maskgit import cosine_schedule, generate_image_tokens, t2i_prompt_ids

MASK, EOS, BOS, T2I, SOI, EOI, OFFSET, CODES = 63, 2, 1, 6, 4, 5, 40, 16
N = 12


def tiny(draw=True, **kw):
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mask_token_id=MASK,
               eos_token_id=EOS, bos_token_id=BOS, soi_token_id=SOI, eoi_token_id=EOI, t2i_token_id=T2I,
               image_token_offset=OFFSET, codebook_size=CODES, max_position_embeddings=64,
               initializer_range=0.5)  # an opinionated random model: argmax differs between slots
    cfg.update(kw)
    torch.manual_seed(0)
    model = MMDLMForConditionalGeneration(MMDLMConfig(**cfg)).eval()
    if draw:  # stands in for a VQ tokenizer config: the sampler only needs the code range
        model.config.image_tokenizer_config = {}
    return model


@pytest.fixture(scope="module")
def model():
    return tiny()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_t2i_prompt_layout(model):
    assert t2i_prompt_ids(model.config, [10, 11]) == [T2I, BOS, 10, 11, EOS]
    assert t2i_prompt_ids(model.config, []) == [T2I, BOS, EOS]


def test_cosine_schedule_values():
    for T in (1, 4, 8, 16):
        counts = [cosine_schedule(k, T, N) for k in range(T)]
        assert counts[-1] == 0
        before = N
        for k, c in enumerate(counts[:-1]):
            raw = math.floor(N * math.cos(math.pi / 2 * (k + 1) / T))
            assert c == max(1, min(before - 1, raw)) and 1 <= c <= max(before - 1, 1)
            before = c
    with pytest.raises(ValueError):
        cosine_schedule(4, 4, N)


def test_masked_counts_follow_schedule_and_known_codes_stay(model):
    seen = []
    prompts = [t2i_prompt_ids(model.config, [10, 11, 12]), t2i_prompt_ids(model.config, [20])]
    codes = generate_image_tokens(model, prompts, N, steps=6, generator=gen(0), callback=lambda k, c: seen.append(c))
    assert codes.shape == (2, N) and len(seen) == 6
    prev = torch.full((2, N), -1)
    for k, c in enumerate(seen):
        assert ((c < 0).sum(1) == cosine_schedule(k, 6, N)).all()
        known = prev >= 0
        assert torch.equal(c[known], prev[known])
        prev = c
    assert torch.equal(seen[-1], codes) and codes.min() >= 0 and codes.max() < CODES


def test_inpainting_keeps_known_codes_and_schedules_each_row_over_its_unknown_slots(model):
    prompts = [t2i_prompt_ids(model.config, [10, 11, 12]), t2i_prompt_ids(model.config, [20])]
    init = torch.full((2, N), -1)
    init[0, :4] = torch.tensor([1, 2, 3, 4])  # row 0 draws 8 slots, row 1 all 12
    seen = []
    codes = generate_image_tokens(model, prompts, N, steps=5, guidance_scale=2.0, generator=gen(0), init_codes=init,
                                  callback=lambda k, c: seen.append(c))
    assert torch.equal(codes[0, :4], init[0, :4]) and codes.min() >= 0
    for k, c in enumerate(seen):
        assert (c < 0).sum(1).tolist() == [cosine_schedule(k, 5, 8), cosine_schedule(k, 5, N)]
    # Row 1 had nothing known: it draws what it draws without init_codes (the same noise, row by row).
    plain = generate_image_tokens(model, prompts, N, steps=5, guidance_scale=2.0, generator=[gen(3), gen(4)])
    mixed = generate_image_tokens(model, prompts, N, steps=5, guidance_scale=2.0, generator=[gen(3), gen(4)],
                                  init_codes=init)
    assert torch.equal(plain[1], mixed[1]) and not torch.equal(plain[0], mixed[0])
    # The known codes condition the rest: the same row with other known codes draws other codes.
    other = init.clone()
    other[0, :4] = torch.tensor([9, 9, 9, 9])
    shifted = generate_image_tokens(model, prompts, N, steps=5, guidance_scale=2.0, generator=[gen(3), gen(4)],
                                    init_codes=other)
    assert not torch.equal(shifted[0, 4:], mixed[0, 4:])
    full = torch.arange(2 * N).reshape(2, N) % CODES
    assert torch.equal(generate_image_tokens(model, prompts, N, steps=3, init_codes=full), full)
    for bad, match in ((init[:1], r"\[2, 12\]"), (init + CODES + 1, r"-1 \(to draw\)")):
        with pytest.raises(ValueError, match=match):
            generate_image_tokens(model, prompts, N, steps=2, init_codes=bad)


def test_image_slots_only_get_image_codes(model):
    V = model.config.vocab_size

    class TextLover(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.w = model.config, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, logits_to_keep=None, **kw):
            logits = torch.zeros(input_ids.shape[0], logits_to_keep.shape[1], V)
            logits[..., :OFFSET] = 50.0  # text tokens (and the mask) are far likelier than any code
            logits[..., MASK] = 60.0
            logits[..., OFFSET + 3] = 1.0
            return SimpleNamespace(logits=logits)

    codes = generate_image_tokens(TextLover(), [t2i_prompt_ids(model.config, [9])], N, steps=4, temperature=0.0)
    assert (codes == 3).all()


def test_guided_batch_with_mixed_lengths_equals_each_prompt_alone(model):
    prompts = [t2i_prompt_ids(model.config, t) for t in ([10, 11, 12, 13, 14], [], [30, 31])]
    for temperature in (1.0, 0.0):
        gens = [gen(100 + i) for i in range(3)]  # one generator per row: the noise does not depend on the batch
        batch = generate_image_tokens(model, prompts, N, steps=5, guidance_scale=2.0, temperature=temperature,
                                      generator=gens)
        for i, p in enumerate(prompts):
            alone = generate_image_tokens(model, [p], N, steps=5, guidance_scale=2.0, temperature=temperature,
                                          generator=[gen(100 + i)])
            assert torch.equal(batch[i], alone[0])
    unguided = generate_image_tokens(model, prompts, N, steps=5, guidance_scale=0.0, temperature=0.0)
    guided = generate_image_tokens(model, prompts, N, steps=5, guidance_scale=2.0, temperature=0.0)
    assert not torch.equal(unguided, guided)


def test_seeded_determinism(model):
    p = [t2i_prompt_ids(model.config, [10, 11])]
    a = generate_image_tokens(model, p, N, steps=4, generator=gen(1))
    b = generate_image_tokens(model, p, N, steps=4, generator=gen(1))
    c = generate_image_tokens(model, p, N, steps=4, generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tensor_prompts_and_custom_uncond(model):
    p = t2i_prompt_ids(model.config, [10, 11])
    a = generate_image_tokens(model, [torch.tensor(p)], N, steps=3, temperature=0.0)
    b = generate_image_tokens(model, [p], N, steps=3, temperature=0.0)
    c = generate_image_tokens(model, [p], N, steps=3, temperature=0.0, uncond_prompt_ids=[T2I, BOS, 17, EOS])
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=0), "steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(prompt_ids=[[T2I, BOS] + [10] * 60 + [EOS]]), "max_position_embeddings"),
        (dict(prompt_ids=[]), "empty"),
        (dict(prompt_ids=[[T2I, BOS, MASK, EOS]]), "mask token"),
        (dict(num_image_tokens=0), "num_image_tokens"),
    ],
)
def test_bad_inputs_raise(model, kwargs, match):
    args = dict(prompt_ids=[[T2I, BOS, 10, EOS]], num_image_tokens=N, steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_image_tokens(model, **args)


def test_model_without_codebook_cannot_draw():
    with pytest.raises(ValueError, match="can_draw_images"):
        generate_image_tokens(tiny(draw=False), [[T2I, BOS, EOS]], N)
