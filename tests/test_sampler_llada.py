"""LLaDA reference sampler: schedule, block order, determinism, CFG, batching, EOS flags, banned ids, bad input."""

from types import SimpleNamespace

import pytest
import torch

from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration
from mmdlm.sampling.llada import SamplerOutput, generate, num_transfer_tokens

MASK, EOS, BOS, EOT = 63, 2, 1, 3


def tiny(**kw):
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mask_token_id=MASK,
               eos_token_id=EOS, bos_token_id=BOS, eot_token_id=EOT, max_position_embeddings=128)
    cfg.update(kw)
    torch.manual_seed(0)
    return MMDLMForConditionalGeneration(MMDLMConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def prompt(n=5, seed=0, batch=1):
    return torch.randint(4, 60, (batch, n), generator=torch.Generator().manual_seed(seed))


class Scripted(torch.nn.Module):
    """A stand-in denoiser whose logits are ``fn(input_ids, positions)`` [B, K, V]; records its inputs."""

    def __init__(self, config, fn):
        super().__init__()
        self.config, self.fn, self.inputs = config, fn, []
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, image_features=None, logits_to_keep=None):
        self.inputs.append((input_ids.clone(), None if attention_mask is None else attention_mask.clone()))
        return SimpleNamespace(logits=self.fn(input_ids, logits_to_keep))


def test_num_transfer_tokens_schedule():
    for n in (0, 1, 5, 8, 13, 32):
        for steps in (1, 3, 4, 8):
            mask = torch.zeros(2, 40, dtype=torch.bool)
            mask[0, :n] = True
            mask[1, : n // 2] = True
            q = num_transfer_tokens(mask, steps)
            assert q.shape == (2, steps)
            assert q.sum(1).tolist() == [n, n // 2]
            for row, m in zip(q, (n, n // 2)):
                assert row.tolist() == [m // steps + (i < m % steps) for i in range(steps)]


def test_blocks_fill_left_to_right_and_commits_are_final(model):
    x = prompt(4)
    P, G, BL, S = 4, 12, 4, 6  # 3 blocks of 2 steps each: 2 tokens per step
    seen = []
    out = generate(model, x, steps=S, gen_length=G, block_length=BL, callback=lambda i, z: seen.append((i, z)),
                   return_dict=True)
    assert isinstance(out, SamplerOutput) and out.nfe == S and [i for i, _ in seen] == list(range(S))
    prev = torch.cat([x, torch.full((1, G), MASK)], 1)
    for i, z in seen:
        block = i // (S // (G // BL))
        end = P + (block + 1) * BL
        assert torch.equal(z[:, :P], x)
        assert (z[:, end:] == MASK).all()  # nothing beyond the current block
        was = prev != MASK
        assert torch.equal(z[was], prev[was])  # committed tokens never change
        assert int((z != MASK).sum() - was.sum()) == 2  # the quota
        prev = z
    assert not (out.sequences == MASK).any()


def test_temperature_zero_is_deterministic_and_seeded_sampling_reproducible(model):
    x = prompt(5)
    kw = dict(steps=8, gen_length=8, block_length=4)
    assert torch.equal(generate(model, x, **kw), generate(model, x, **kw))
    a = generate(model, x, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, x, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)
    c = generate(model, x, temperature=1.0, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_changes_output_and_masks_only_real_prompt_tokens(model):
    x = prompt(5)
    kw = dict(steps=8, gen_length=8, block_length=8)
    plain = generate(model, x, **kw)
    guided = generate(model, x, cfg_scale=3.0, **kw)  # no attention mask: LLaDA raised NameError here
    assert not torch.equal(plain, guided)
    spy = Scripted(model.config, lambda ids, keep: model(input_ids=ids, logits_to_keep=keep).logits)
    am = torch.tensor([[0, 0, 1, 1, 1]])
    generate(spy, x, attention_mask=am, cfg_scale=1.0, steps=2, gen_length=4, block_length=4)
    ids, mask = spy.inputs[0]
    assert ids.shape[0] == 2 and torch.equal(ids[0, :5], x[0]) and mask.shape == (2, 9)
    assert torch.equal(ids[1, :2], x[0, :2]) and (ids[1, 2:] == MASK).all()  # padding kept, prompt masked


def test_remasking_modes(model):
    x = prompt(5)
    kw = dict(steps=8, gen_length=8, block_length=4)
    low = generate(model, x, remasking="low_confidence", **kw)
    r1 = generate(model, x, remasking="random", generator=torch.Generator().manual_seed(0), **kw)
    r2 = generate(model, x, remasking="random", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(r1, r2) and not (r1 == MASK).any() and not (low == MASK).any()
    # Commit order differs: random mode picks positions regardless of confidence.
    orders = []
    for mode in ("low_confidence", "random"):
        seen = []
        generate(model, x, remasking=mode, steps=8, gen_length=8, block_length=8,
                 generator=torch.Generator().manual_seed(3), callback=lambda i, z: seen.append(z.clone()))
        done = [torch.zeros(8, dtype=torch.bool)] + [z[0, 5:] != MASK for z in seen]
        orders.append([int((b & ~a).nonzero()) for a, b in zip(done, done[1:])])  # position committed at each step
    assert orders[0] != orders[1]


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [prompt(3, seed=1)[0], prompt(6, seed=2)[0], prompt(5, seed=3)[0]]
    P = 6
    ids = torch.full((3, P), EOS)
    am = torch.zeros(3, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], am[i, P - len(p):] = p, 1
    for kw in (dict(), dict(cfg_scale=1.5)):
        batch = generate(model, ids, attention_mask=am, steps=8, gen_length=8, block_length=4, **kw)
        for i, p in enumerate(prompts):
            alone = generate(model, p[None], steps=8, gen_length=8, block_length=4, **kw)
            assert torch.equal(batch[i, P:], alone[0, len(p):])
    # With one generator per row, sampling at temperature > 0 is batch-independent too.
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    batch = generate(model, ids, attention_mask=am, steps=4, gen_length=4, block_length=4, temperature=1.0, generator=gens)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], steps=4, gen_length=4, block_length=4, temperature=1.0,
                         generator=[torch.Generator().manual_seed(10 + i)])
        assert torch.equal(batch[i, P:], alone[0, len(p):])


def test_eos_flags_take_effect(model):
    V = model.config.vocab_size

    def eos_loving(ids, keep):
        logits = torch.zeros(ids.shape[0], keep.shape[1], V)
        logits[..., 20] = 1.0  # weak preference for a normal token everywhere
        odd = keep % 2 == 1
        logits[..., EOS] = torch.where(odd, 12.0, -5.0)  # confident EOS at odd positions ...
        logits[..., EOT] = torch.where(keep % 4 == 1, 13.0, -5.0)  # ... and EoT at some of them
        return logits

    x = torch.tensor([[BOS, 10, 11, 12]])  # P = 4: generated positions 4..11
    kw = dict(steps=8, gen_length=8, block_length=8)
    plain = generate(Scripted(model.config, eos_loving), x, **kw)
    assert (plain[0, 5::2] != 20).all()  # EOS/EoT win at odd positions without flags
    no_eos = generate(Scripted(model.config, eos_loving), x, logits_eos_inf=True, **kw)
    assert not (no_eos == EOS).any()
    seen = []
    generate(Scripted(model.config, eos_loving), x, confidence_eos_eot_inf=True,
             callback=lambda i, z: seen.append(z[0, 4:].clone()), **kw)
    # With suppressed confidence the four normal tokens are committed before any EOS/EoT.
    assert all((z[0::2] != MASK).sum() == min(i + 1, 4) for i, z in enumerate(seen))
    seen_plain = []
    generate(Scripted(model.config, eos_loving), x, callback=lambda i, z: seen_plain.append(z[0, 4:].clone()), **kw)
    assert (seen_plain[0][1::2] != MASK).any()  # ... whereas unflagged, EOS/EoT go first


def test_banned_ids_and_mask_never_produced(model):
    V = model.config.vocab_size
    banned = list(range(20, 40))

    def loves_banned(ids, keep):
        logits = torch.zeros(ids.shape[0], keep.shape[1], V)
        logits[..., 20:40] = 10.0
        logits[..., MASK] = 20.0
        return logits

    out = generate(Scripted(model.config, loves_banned), prompt(4), steps=4, gen_length=8, block_length=8,
                   banned_token_ids=banned, temperature=1.0, generator=torch.Generator().manual_seed(0))
    gen = out[0, 4:]
    assert not (gen == MASK).any() and not ((gen >= 20) & (gen < 40)).any()
    cfg_banned = tiny(banned_token_ids=banned)  # default comes from model.config.banned_token_ids
    out = generate(Scripted(cfg_banned.config, loves_banned), prompt(4), steps=4, gen_length=8, block_length=8)
    assert not ((out[0, 4:] >= 20) & (out[0, 4:] < 40)).any()


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.tensor([[5, MASK, 6]]),), {}, "mask token"),
        ((torch.tensor([[5, 6]]),), dict(gen_length=10, block_length=4), "multiple of block_length"),
        ((torch.tensor([[5, 6]]),), dict(gen_length=8, block_length=4, steps=5), "multiple of the number of blocks"),
        ((torch.tensor([[5, 6]]),), dict(steps=0), "steps"),
        ((torch.zeros(1, 0, dtype=torch.long),), {}, "empty prompt"),
        ((torch.tensor([5, 6]),), {}, "2-D"),
        ((torch.tensor([[5.0, 6.0]]),), {}, "integer"),
        ((torch.tensor([[5, 6]]), torch.ones(1, 3)), {}, "attention_mask"),
        ((torch.tensor([[5, 6]]), torch.zeros(1, 2)), {}, "all zeros"),
        ((torch.tensor([[5, 6]]),), dict(remasking="entropy"), "remasking"),
        ((torch.tensor([[5, 6]]),), dict(temperature=-1.0), "temperature"),
        ((torch.tensor([[5, 6]]),), dict(gen_length=200, block_length=200, steps=200), "max_position_embeddings"),
    ],
)
def test_bad_inputs_raise(model, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, *args, **{**dict(steps=4, gen_length=4, block_length=4), **kwargs})


def test_missing_mask_id_raises():
    m = tiny(mask_token_id=None)
    with pytest.raises(ValueError, match="mask"):
        generate(m, prompt(3), steps=2, gen_length=2, block_length=2)
