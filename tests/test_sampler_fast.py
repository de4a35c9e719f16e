"""Fast sampler: exact against the LLaDA reference, early stop, caches, parallel commit rules; AR twin's KV cache."""

import pytest
import torch

from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration
from mmdlm.sampling import fast, llada
from mmdlm.sampling.autoregressive import generate_autoregressive
from mmdlm.sampling.cache import BlockCache
from mmdlm.sampling.commit_rules import CommitRule, make_rule, select_commits

V, MASK, EOS, EOT = 48, 47, 1, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on shared cores spinning threads slow every step down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed=0, **kw):
    # A larger init than training uses gives peaked predictions, so float rounding never decides a token.
    cfg = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               mask_token_id=MASK, eos_token_id=EOS, eot_token_id=EOT, initializer_range=0.3)
    cfg.update(kw)
    torch.manual_seed(seed)
    return MMDLMForConditionalGeneration(MMDLMConfig(**cfg)).eval()


class EosFrom(MMDLMForConditionalGeneration):
    """Test model whose EOS logit wins at absolute positions >= eos_from: a left-padded row with a shorter prompt
    reaches that position later in its answer, so rows finish at different blocks."""

    eos_from = 10**9

    def forward(self, *args, position_ids=None, logits_to_keep=None, **kwargs):
        out = super().forward(*args, position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)
        pos = position_ids.gather(1, logits_to_keep.to(position_ids.device))
        out.logits[..., EOS] += 30.0 * (pos >= self.eos_from)
        return out


def eos_model(eos_from):
    torch.manual_seed(0)
    m = EosFrom(MMDLMConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            mask_token_id=MASK, eos_token_id=EOS, eot_token_id=EOT, initializer_range=0.3)).eval()
    m.eos_from = eos_from
    return m


def batch(lengths=(6, 4, 2), seed=1):
    """Left-padded prompts of different real lengths (pad = EOS, as in mmdlm's tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), EOS)
    am = torch.zeros(len(lengths), P, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, P - n:] = torch.randint(3, V - 1, (n,), generator=g)
        am[r, P - n:] = 1
    return ids, am


def until_stop(row, P):
    """Answer up to and including the first EOS/EoT (the whole answer if none)."""
    gen = row[P:].tolist()
    for j, t in enumerate(gen):
        if t in (EOS, EOT):
            return gen[: j + 1]
    return gen


KW = dict(steps=16, gen_length=16, block_length=4)


@pytest.mark.parametrize("temperature,remasking,cfg_scale", [(0.0, "low_confidence", 0.0), (0.0, "low_confidence", 1.5),
                                                           (0.8, "low_confidence", 1.5), (0.8, "random", 0.0)])
def test_exact_configuration_matches_reference(temperature, remasking, cfg_scale):
    m = tiny()
    ids, am = batch()
    P = ids.shape[1]
    common = dict(KW, cfg_scale=cfg_scale, temperature=temperature, remasking=remasking)
    ref = llada.generate(m, ids, am, generator=torch.Generator().manual_seed(3), **common)
    # No early stop: every token equals the reference's (noise is drawn in the reference's layout).
    full = fast.generate(m, ids, am, generator=torch.Generator().manual_seed(3), early_stop=False, **common)
    assert torch.equal(full, ref)
    # Early stop: identical text up to the first EOS/EoT, EOS after it.
    es = fast.generate(m, ids, am, generator=torch.Generator().manual_seed(3), return_dict=True, **common)
    for r in range(ids.shape[0]):
        want = until_stop(ref[r], P)
        assert es.sequences[r, P : P + len(want)].tolist() == want
        assert (es.sequences[r, P + len(want):] == EOS).all()


def test_exact_single_prompt_and_per_row_generators():
    m = tiny(seed=2)
    ids, am = batch()
    gens = lambda: [torch.Generator().manual_seed(10 + r) for r in range(3)]  # noqa: E731
    ref = llada.generate(m, ids, am, temperature=1.0, generator=gens(), **KW)
    got = fast.generate(m, ids, am, temperature=1.0, generator=gens(), **KW)
    P = ids.shape[1]
    for r in range(3):
        want = until_stop(ref[r], P)
        assert got[r, P : P + len(want)].tolist() == want
    one = ids[2:, am[2].bool()]  # the third prompt alone, unpadded
    alone = fast.generate(m, one, early_stop=False, **KW)
    assert torch.equal(alone[0, one.shape[1]:], llada.generate(m, one, **KW)[0, one.shape[1]:])


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_is_exact(cache, shift):
    m = tiny(seed=3, shift_logits=shift)
    ids, am = batch()
    ref = llada.generate(m, ids, am, cfg_scale=1.0, **KW)
    got = fast.generate(m, ids, am, cfg_scale=1.0, cache=cache, cache_refresh=1, early_stop=False, **KW)
    assert torch.equal(got, ref)
    # The default block refresh is an approximation but cheaper: it runs fewer query tokens.
    cheap = fast.generate(m, ids, am, cache=cache, early_stop=False, return_dict=True, **KW)
    exact = fast.generate(m, ids, am, early_stop=False, return_dict=True, **KW)
    assert cheap.query_tokens < exact.query_tokens and cheap.nfe == exact.nfe


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cache_gives_full_forward_logits_when_nothing_changed(mode, shift):
    m = tiny(seed=4, shift_logits=shift)
    ids, am = batch()
    B, P = ids.shape
    x = torch.cat([ids, torch.randint(3, V - 1, (B, 8)), torch.full((B, 8), MASK)], 1)  # 2 answer blocks of 4
    amf = torch.cat([am, torch.ones(B, 16, dtype=torch.long)], 1)
    pos = (amf.cumsum(-1) - 1).clamp(min=0)
    s, e = P + 8, P + 12
    full = m(input_ids=x, attention_mask=amf, position_ids=pos, use_cache=True)
    bc = BlockCache(mode, "block", P, lead=int(shift))
    bc.store(full.cache, s, e)
    qs, qe = bc.window(s, e, x.shape[1])
    emb = m.model.embed(x)
    keep = torch.arange(s, e)[None].expand(B, -1)
    got = m(inputs_embeds=emb[:, qs:qe], attention_mask=bc.key_mask(amf, s, e), position_ids=pos[:, qs:qe],
            cache=bc.kv, logits_to_keep=keep - qs).logits
    assert torch.allclose(got, full.logits[:, s:e], atol=1e-5)
    # ...and the cache really is used: stale K/V (from another sequence) changes the logits.
    other = m(input_ids=torch.randint(3, V - 1, x.shape), attention_mask=amf, position_ids=pos, use_cache=True)
    bc.store(other.cache, s, e)
    stale = m(inputs_embeds=emb[:, qs:qe], attention_mask=bc.key_mask(amf, s, e), position_ids=pos[:, qs:qe],
              cache=bc.kv, logits_to_keep=keep - qs).logits
    assert not torch.allclose(stale, full.logits[:, s:e], atol=1e-3)


def test_early_stop_exact_text_fewer_forwards_rows_independent():
    ids, am = batch(lengths=(6, 2))  # real prompt lengths 6 and 2: positions differ by 4
    m = eos_model(eos_from=6 + 4)  # row 0's EOS wins from answer slot 4 (block 1), row 1's from slot 8 (block 2)
    kw = dict(steps=24, gen_length=24, block_length=4)
    P = ids.shape[1]
    ref = llada.generate(m, ids, am, **kw, return_dict=True)
    seen = []
    got = fast.generate(m, ids, am, **kw, return_dict=True, callback=lambda i, x: seen.append(x))
    for r in range(2):
        want = until_stop(ref.sequences[r], P)
        assert want[-1] == EOS
        assert got.sequences[r, P : P + len(want)].tolist() == want
    # Row 0 stops at its first step in block 1 (EOS is the most confident slot), row 1 in block 2; the
    # reference runs all 24 steps.
    assert got.nfe < ref.nfe == 24
    n0, n1 = got.nfe_per_row.tolist()
    assert n0 < n1 == got.nfe
    # Once row 0 finished, later snapshots never change it (it is no longer computed).
    assert all(torch.equal(snap[0], got.sequences[0]) for snap in seen[n0 - 1:])


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("refresh", ["block", "never"])
def test_prefix_caches_are_exact_for_a_causal_model(refresh, shift):
    # Under causal attention nothing before the block ever sees the block or what follows it, so the prefix K/V a
    # cache holds (refreshed per block, or prefix-DLM's prompt-alone prefill) is exactly what a full forward computes.
    m = tiny(seed=7, is_causal=True, shift_logits=shift)
    ids, am = batch()
    exact = fast.generate(m, ids, am, early_stop=False, return_dict=True, **KW)
    cached = fast.generate(m, ids, am, cache="prefix", cache_refresh=refresh, early_stop=False, return_dict=True, **KW)
    assert torch.equal(cached.sequences, exact.sequences)
    assert cached.query_tokens < exact.query_tokens


@pytest.mark.parametrize("rule,cache", [(dict(threshold=0.6), "dual"), (dict(factor=1.0), "prefix"),
                                        (dict(entropy_bound=0.3), "none"), (dict(confident_decoding=0.6), "dual")])
def test_parallel_rules_progress_and_never_touch_committed(rule, cache):
    m = tiny(seed=5)
    ids, am = batch()
    P = ids.shape[1]
    seen = [torch.cat([ids, torch.full((3, 16), MASK)], 1)]
    out = fast.generate(m, ids, am, steps=8, gen_length=16, block_length=8, cfg_scale=0.5, temperature=0.5,
                        generator=torch.Generator().manual_seed(0), cache=cache, early_stop=False,
                        callback=lambda i, x: seen.append(x), return_dict=True, **rule)
    assert (out.sequences != MASK).all()
    for prev, cur in zip(seen, seen[1:]):
        was = prev[:, P:] != MASK
        assert torch.equal(cur[:, P:][was], prev[:, P:][was])  # committed tokens never change
        # Blocks advance together: the current block is the first one where any row still has masks.
        block = int((~was).any(0).nonzero()[0]) // 8
        new = (cur[:, P:] != MASK) & ~was
        assert not new[:, : block * 8].any() and not new[:, (block + 1) * 8:].any()
        had = (~was[:, block * 8 : (block + 1) * 8]).any(1)
        assert (new.sum(1)[had] >= 1).all()  # at least one commit per row that had a masked slot
    assert out.nfe == len(seen) - 1 <= 8


def test_threshold_rule_is_parallel_on_a_confident_model():
    m = tiny(seed=6, initializer_range=2.0)  # very peaked predictions
    ids, am = batch()
    ref = fast.generate(m, ids, am, early_stop=False, return_dict=True, **KW)
    par = fast.generate(m, ids, am, early_stop=False, return_dict=True, threshold=0.9, **KW)
    assert par.nfe < ref.nfe
    assert (par.sequences != MASK).all()


def test_commit_rules_follow_their_definitions():
    conf = torch.tensor([[0.2, 0.99, 0.7, 0.95]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    quota = torch.tensor([1])
    sel = lambda rule, **kw: select_commits(rule, conf, valid, quota, **kw)[0].tolist()  # noqa: E731
    assert sel(CommitRule("fixed")) == [False, True, False, False]
    assert sel(make_rule(threshold=0.9)) == [False, True, False, True]
    assert sel(make_rule(threshold=0.999)) == [False, True, False, False]  # the best one always goes
    # factor f=1: (n+1)(1-c_n) = 0.02, 0.15, 1.2, ... < 1 for n = 1, 2 only.
    assert sel(make_rule(factor=1.0)) == [False, True, False, True]
    assert sel(make_rule(factor=1.3)) == [False, True, True, True]
    ent = torch.tensor([[0.5, 0.1, 0.2, 0.3]])
    # γ = 0.25: sorted 0.1, 0.2, 0.3, 0.5; entropy before each = 0, 0.1, 0.3, ... -> two slots.
    got = select_commits(make_rule(entropy_bound=0.25), conf, valid, quota, entropy=ent)[0].tolist()
    assert got == [False, True, True, False]
    assert sel(make_rule(confident_decoding=0.9)) == [False, True, False, True]
    assert sel(make_rule(confident_decoding=0.999)) == [False, True, False, False]  # fallback: the schedule's 1
    assert sel(CommitRule("fixed"), last_step=True) == [True] * 4
    with pytest.raises(ValueError, match="one parallel commit rule"):
        make_rule(threshold=0.9, factor=1.0)


def test_bad_options_are_explained():
    m = tiny()
    ids, am = batch()
    with pytest.raises(ValueError, match="cache must be one of"):
        fast.generate(m, ids, am, cache="bogus", **KW)
    with pytest.raises(ValueError, match="dual cache"):
        fast.generate(m, ids, am, cache="dual", cache_refresh="never", **KW)
    with pytest.raises(ValueError, match="low_confidence"):
        fast.generate(m, ids, am, threshold=0.9, remasking="random", **KW)


def test_autoregressive_cache_equals_full_recompute_and_padding():
    m = tiny(seed=7, is_causal=True)
    ids, am = batch()
    cached = generate_autoregressive(m, ids, am, max_new_tokens=10, eos_token_id=[], return_dict=True)
    plain = generate_autoregressive(m, ids, am, max_new_tokens=10, eos_token_id=[], use_cache=False)
    assert torch.equal(cached.sequences, plain)
    assert cached.nfe == 10
    # A padded row decodes as it does alone.
    one = ids[2:, am[2].bool()]
    alone = generate_autoregressive(m, one, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(alone[0, one.shape[1]:], plain[2, ids.shape[1]:])


def test_autoregressive_rows_stop_at_eos_independently():
    m = tiny(seed=7, is_causal=True)
    ids, am = batch()
    free = generate_autoregressive(m, ids, am, max_new_tokens=12, eos_token_id=[])
    P = ids.shape[1]
    stop = int(free[0, P + 2])  # make row 0's third new token the stop token
    got = generate_autoregressive(m, ids, am, max_new_tokens=12, eos_token_id=stop, return_dict=True)
    assert got.nfe_per_row[0] == 3 and (got.sequences[0, P + 3:] == stop).all()
    for r in range(3):
        gen = free[r, P:].tolist()
        n = gen.index(stop) + 1 if stop in gen else len(gen)
        assert got.sequences[r, P : P + n].tolist() == gen[:n]
        assert got.nfe_per_row[r] == n


def test_autoregressive_needs_a_causal_model():
    with pytest.raises(ValueError, match="is_causal"):
        generate_autoregressive(tiny(), torch.tensor([[3, 4]]), max_new_tokens=2)


def test_image_features_are_merged_once_and_match_reference():
    m = tiny(seed=8, image_token_id=3)
    ids, am = batch(lengths=(7, 5))
    ids[:, -4:-1] = 3  # three image slots per row, in the real part of both prompts
    feats = torch.randn(6, 32)
    ref = llada.generate(m, ids, am, image_features=feats, cfg_scale=1.0, **KW)
    got = fast.generate(m, ids, am, image_features=feats, cfg_scale=1.0, early_stop=False, **KW)
    assert torch.equal(got, ref)
    # The features matter (so the comparison above is not vacuous).
    other = fast.generate(m, ids, am, image_features=feats * -1, cfg_scale=1.0, early_stop=False, **KW)
    assert not torch.equal(other, ref)
