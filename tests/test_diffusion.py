"""Masked-diffusion objectives: forward process, LLaDA/LaViDa/MMaDA losses, mixed-batch loss, MC ELBO."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration
from mmdlm.diffusion import (
    complementary_forward_process,
    compute_batch_loss,
    cosine_mask_ratio,
    elbo_log_likelihood,
    forward_process,
    image_token_loss,
    mask_image_tokens,
    mask_probability,
    masked_diffusion_loss,
    sample_t,
    stratified_mask_counts,
    trailing_padding,
    validate_loss_options,
)

MASK, EOS, BOS, T2I, SOI, EOI = 63, 2, 1, 6, 4, 5


def tiny_config(**kw):
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mask_token_id=MASK,
               eos_token_id=EOS, bos_token_id=BOS, eot_token_id=3, soi_token_id=SOI, eoi_token_id=EOI,
               t2i_token_id=T2I, image_token_offset=40, codebook_size=16, max_position_embeddings=256)
    cfg.update(kw)
    return MMDLMConfig(**cfg)


def tiny_model():
    torch.manual_seed(0)
    return MMDLMForConditionalGeneration(tiny_config()).eval()


def g(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- schedule and forward process


def test_sample_t_range_and_antithetic_strata():
    t = sample_t(1000, generator=g())
    assert t.min() >= 0 and t.max() < 1
    B = 16
    ta = sample_t(B, antithetic=True, generator=g(1))
    strata = torch.floor(ta * B).long().sort().values
    assert torch.equal(strata, torch.arange(B))  # exactly one t per stratum [i/B, (i+1)/B)
    assert torch.equal(sample_t(B, antithetic=True, generator=g(1)), ta)


def test_mask_probability_range():
    t = torch.tensor([0.0, 0.5, 1.0])
    p = mask_probability(t, eps=1e-3)
    assert torch.allclose(p, torch.tensor([1e-3, 0.5 * 0.999 + 1e-3, 1.0]))
    p = mask_probability(sample_t(500, generator=g()))
    assert p.min() >= 1e-3 and p.max() <= 1.0


def test_forward_process_masks_only_maskable_at_rate_p():
    B, L = 4, 4000
    x = torch.randint(0, 60, (B, L))
    maskable = torch.zeros(B, L, dtype=torch.bool)
    maskable[:, L // 2 :] = True  # the "answer"
    p = torch.tensor([0.1, 0.4, 0.7, 1.0])
    noisy, masked, p_out = forward_process(x, MASK, maskable=maskable, p_mask=p, generator=g())
    assert torch.equal(p_out, p)
    assert not masked[:, : L // 2].any() and torch.equal(noisy[:, : L // 2], x[:, : L // 2])  # SFT: prompt clean
    assert torch.equal(noisy == MASK, masked) and torch.equal(noisy[~masked], x[~masked])
    rate = masked[:, L // 2 :].float().mean(1)
    assert torch.allclose(rate, p, atol=0.04)
    _, _, p_sampled = forward_process(x, MASK, generator=g())
    assert p_sampled.shape == (B,) and (p_sampled >= 1e-3).all()


def test_complementary_masks_are_complements():
    x = torch.randint(0, 60, (3, 20))
    maskable = torch.zeros(3, 20, dtype=torch.bool)
    maskable[:, 8:] = True
    noisy, masked, p = complementary_forward_process(x, MASK, maskable=maskable, generator=g())
    a, b = masked[:3], masked[3:]
    assert not (a & b).any() and torch.equal(a | b, maskable)
    assert torch.equal(noisy[3:] == MASK, b) and torch.allclose(p[3:], (1 - p[:3]).clamp(min=1e-3))


# ---------------------------------------------------------------- losses


def direct_loss(logits, targets, masked, p, region, objective, weighting, denominator=None):
    """Straightforward loops over rows and tokens, for comparison."""
    B, L, _ = logits.shape
    logp = F.log_softmax(logits.double(), -1)
    total, count = 0.0, 0
    for i in range(B):
        n_i = int(region[i].sum())
        for j in range(L):
            if masked[i, j] and region[i, j]:
                ce = -float(logp[i, j, targets[i, j]])
                count += 1
                if weighting == "mean":
                    total += ce
                elif objective == "pretrain":
                    total += ce / float(p[i])
                else:
                    total += ce / (float(p[i]) * max(n_i, 1)) / B
    if weighting == "mean":
        return total / max(count, 1)
    return total / denominator if objective == "pretrain" else total


def test_uniform_logits_give_closed_form_losses():
    V, B, L = 8, 2, 6
    logits = torch.zeros(B, L, V)  # CE = log V at every token
    targets = torch.randint(0, V, (B, L))
    masked = torch.tensor([[0, 0, 1, 1, 0, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    answer = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    p = torch.tensor([0.5, 0.25])
    lv = math.log(V)
    pretrain = masked_diffusion_loss(logits, targets, masked, p, objective="pretrain")
    assert pretrain.item() == pytest.approx((3 * lv / 0.5 + 1 * lv / 0.25) / (B * L), rel=1e-6)
    sft = masked_diffusion_loss(logits, targets, masked, p, answer_mask=answer)
    assert sft.item() == pytest.approx((3 * lv / (0.5 * 4) + lv / (0.25 * 3)) / B, rel=1e-6)
    mean = masked_diffusion_loss(logits, targets, masked, p, answer_mask=answer, weighting="mean")
    assert mean.item() == pytest.approx(lv, rel=1e-6)


@pytest.mark.parametrize("objective,weighting", [("sft", "elbo"), ("pretrain", "elbo"), ("sft", "mean")])
def test_losses_match_direct_computation(objective, weighting):
    torch.manual_seed(1)
    B, L, V = 3, 7, 11
    logits = torch.randn(B, L, V)
    targets = torch.randint(0, V, (B, L))
    masked = torch.rand(B, L) < 0.5
    answer = torch.zeros(B, L, dtype=torch.bool)
    answer[0, 2:], answer[1, 4:], answer[2, 1:] = True, True, True
    p = torch.tensor([0.3, 0.6, 0.9])
    got = masked_diffusion_loss(logits, targets, masked, p, objective=objective, weighting=weighting, answer_mask=answer)
    region = answer if objective == "sft" else torch.ones_like(answer)
    want = direct_loss(logits, targets, masked, p, region, objective, weighting, denominator=B * L)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_pad_switch_drops_eos_padding_from_loss_and_length():
    torch.manual_seed(2)
    V = 10
    # prompt (2 tokens) | answer 5 7 | EOS (real end) | EOS EOS (padding)
    targets = torch.tensor([[3, 4, 5, 7, EOS, EOS, EOS]])
    assert trailing_padding(targets, EOS).tolist() == [[False] * 5 + [True, True]]
    answer = torch.tensor([[0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    masked = torch.ones_like(answer)
    logits = torch.randn(1, 7, V)
    p = torch.tensor([0.5])
    with_pad = masked_diffusion_loss(logits, targets, masked, p, answer_mask=answer)
    without = masked_diffusion_loss(logits, targets, masked, p, answer_mask=answer, pad_counts_as_answer=False,
                                    eos_token_id=EOS)
    real = answer.clone()
    real[0, 5:] = False
    assert with_pad.item() == pytest.approx(direct_loss(logits, targets, masked, p, answer, "sft", "elbo"), rel=1e-5)
    assert without.item() == pytest.approx(direct_loss(logits, targets, masked, p, real, "sft", "elbo"), rel=1e-5)
    assert with_pad.item() != pytest.approx(without.item())
    # An attention mask marks padding too.
    am = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    by_mask = masked_diffusion_loss(logits, targets, masked, p, answer_mask=answer, pad_counts_as_answer=False,
                                    attention_mask=am)
    assert by_mask.item() == pytest.approx(without.item(), rel=1e-6)
    with pytest.raises(ValueError, match="eos_token_id"):
        masked_diffusion_loss(logits, targets, masked, p, answer_mask=answer, pad_counts_as_answer=False)


def test_zero_masked_rows_give_no_nan():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 5))
    masked = torch.zeros(2, 5, dtype=torch.bool)
    answer = torch.ones(2, 5, dtype=torch.bool)
    for kw in (dict(), dict(weighting="mean"), dict(objective="pretrain")):
        loss = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.5, 0.5]), answer_mask=answer, **kw)
        assert loss.item() == 0.0
        loss.backward()
    masked[0, 1] = True  # row 1 has nothing masked: it must add exactly zero
    one = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.5, 0.5]), answer_mask=answer)
    assert torch.isfinite(one)
    assert one.item() == pytest.approx(direct_loss(logits.detach(), targets, masked, [0.5, 0.5], answer, "sft", "elbo"))


def test_bad_loss_options_raise():
    x = torch.zeros(1, 3, 4)
    t = torch.zeros(1, 3, dtype=torch.long)
    m = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="answer_mask"):
        masked_diffusion_loss(x, t, m, 0.5)
    with pytest.raises(ValueError, match="weighting"):
        masked_diffusion_loss(x, t, m, 0.5, answer_mask=m, weighting="sum")
    with pytest.raises(ValueError, match="p_mask"):
        masked_diffusion_loss(x, t, m, 0.0, answer_mask=m)
    with pytest.raises(ValueError, match="least masking ratio"):
        validate_loss_options(eps=1.5)
    with pytest.raises(ValueError, match="padding_weight"):
        validate_loss_options(padding_weight="rows")
    with pytest.raises(ValueError, match="padding_weight is a masked-diffusion option"):
        validate_loss_options("ar", padding_weight="row")
    validate_loss_options(eps=1.0, padding_weight="row")  # every answer fully masked: allowed


def test_cosine_image_masking_counts_and_loss():
    t = torch.tensor([0.0, 0.5, 0.9, 0.999])
    assert torch.allclose(cosine_mask_ratio(t), torch.cos(math.pi * t / 2))
    codes = torch.randint(0, 16, (4, 20))
    noisy, masked, ratio = mask_image_tokens(codes, MASK, g(), t=t)
    want = torch.clamp(torch.round(20 * torch.cos(math.pi * t / 2)), min=1).long()
    assert torch.equal(masked.sum(1), want)  # the last row rounds to 0 and is lifted to 1
    assert torch.equal(noisy == MASK, masked)
    maskable = torch.zeros(4, 20, dtype=torch.bool)
    maskable[:, 5:15] = True
    _, masked, _ = mask_image_tokens(codes, MASK, g(), maskable=maskable, t=t)
    assert not (masked & ~maskable).any()
    logits = torch.randn(4, 20, 30)
    targets = torch.randint(0, 30, (4, 20))
    want = F.cross_entropy(logits[masked], targets[masked])
    assert image_token_loss(logits, targets, masked).item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------- mixed batch


class Recorder(torch.nn.Module):
    """Runs the real model on full sequences, remembers inputs and full logits, returns the asked-for positions."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=None, **kw):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        self.seen = SimpleNamespace(ids=input_ids.clone(), am=attention_mask.clone(), logits=out.logits.detach())
        return SimpleNamespace(logits=out.logits.gather(1, logits_to_keep[..., None].expand(-1, -1, out.logits.shape[-1])))


def mixed_batch():
    rows = [
        ([BOS, 10, 11, 12, 13, 14, 15, 16, EOS, EOS], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1], 0),  # text, EOS-padded answer
        ([BOS, 20, 21, 22, 23, 24, 25, 26, 27, EOS], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], 1),  # understanding
        ([EOS, T2I, BOS, 30, 31, EOS, SOI, 41, 42, 43, 44, EOI], [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0], 2),  # t2i
    ]
    L = max(len(r[0]) for r in rows)
    ids = torch.full((3, L), EOS)
    am = torch.zeros(3, L, dtype=torch.long)
    lm = torch.zeros(3, L, dtype=torch.long)
    for i, (toks, loss, _) in enumerate(rows):
        if i == 2:
            ids[i], am[i, 1:], lm[i] = torch.tensor(toks), 1, torch.tensor(loss)
        else:  # text rows are EOS-padded on the right and those pads are targets
            ids[i, : len(toks)], am[i] = torch.tensor(toks), 1
            lm[i, : len(loss)], lm[i, len(loss):] = torch.tensor(loss), 1
    return dict(input_ids=ids, attention_mask=am, loss_mask=lm, task_ids=torch.tensor([r[2] for r in rows]))


def test_compute_batch_loss_matches_direct_losses():
    model = Recorder(tiny_model())
    batch = mixed_batch()
    batch["p_mask"] = torch.tensor([0.6, 0.8, 0.5])
    out = compute_batch_loss(model, batch, generator=g(3), task_weights={"t2i": 0.5, 0: 2.0})
    seen, ids, lm = model.seen, batch["input_ids"], batch["loss_mask"].bool()
    masked = seen.ids == MASK
    assert torch.equal(seen.ids[~lm], ids[~lm])  # prompts stay clean
    assert masked[2].sum() >= 1
    for i, name in ((0, "text"), (1, "understanding")):
        want = direct_loss(seen.logits[i : i + 1], ids[i : i + 1], masked[i : i + 1], batch["p_mask"][i : i + 1],
                           lm[i : i + 1], "sft", "elbo")
        assert out[name].item() == pytest.approx(want, rel=1e-5)
    want_t2i = F.cross_entropy(seen.logits[2][masked[2]], ids[2][masked[2]])
    assert out["t2i"].item() == pytest.approx(want_t2i.item(), rel=1e-5)
    total = 2.0 * out["text"] + out["understanding"] + 0.5 * out["t2i"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out["loss"].backward()


def test_cfg_dropout_removes_the_condition():
    model = Recorder(tiny_model())
    batch = mixed_batch()
    compute_batch_loss(model, batch, generator=g(), cfg_dropout=1.0)
    seen, am, lm = model.seen, batch["attention_mask"].bool(), batch["loss_mask"].bool()
    for i in (0, 1):  # every real prompt token becomes a mask
        assert (seen.ids[i][am[i] & ~lm[i]] == MASK).all()
    # t2i: the caption is hidden, leaving <|t2i|> BOS EOS <|soi|> ... visible, as the sampler's unconditional row
    visible = seen.ids[2][seen.am[2].bool()].tolist()
    assert visible[:4] == [T2I, BOS, EOS, SOI] and 30 not in visible and 31 not in visible


def test_pad_switch_in_batch_keeps_eos_padding_clean():
    model = Recorder(tiny_model())
    batch = mixed_batch()
    batch["p_mask"] = torch.ones(3)
    compute_batch_loss(model, batch, generator=g(), pad_counts_as_answer=False)
    row = model.seen.ids[0]  # BOS 10 11 | 12..16 EOS | EOS EOS EOS
    assert row[8] == MASK and (row[9:] == EOS).all()  # the first EOS is a target, the padding after it is not
    assert (row[3:8] == MASK).all()


def test_row_padding_weight_counts_a_rows_padding_as_one_token():
    model = Recorder(tiny_model())
    batch = mixed_batch()
    batch["p_mask"] = torch.ones(3)  # every target masked, 1/p = 1: the loss is a weighted mean CE per row
    out = compute_batch_loss(model, batch, generator=g(), padding_weight="row")
    ce = F.cross_entropy(model.seen.logits.transpose(1, 2), batch["input_ids"], reduction="none")
    # text row: BOS 10 11 | 12..16 EOS | EOS EOS EOS -> 5 words + the closing EOS at full weight, 3 pads at 1/3 each
    want_text = (ce[0, 3:9].sum() + ce[0, 9:].mean()) / 7
    assert out["text"].item() == pytest.approx(want_text.item(), rel=1e-5)
    # understanding row: 24 25 26 27 EOS | EOS EOS
    want_und = (ce[1, 5:10].sum() + ce[1, 10:].mean()) / 6
    assert out["understanding"].item() == pytest.approx(want_und.item(), rel=1e-5)
    plain = compute_batch_loss(Recorder(tiny_model()), batch, generator=g())
    assert plain["text"].item() == pytest.approx(ce[0, 3:].mean().item(), rel=1e-5)  # "token": every pad counts
    assert plain["t2i"].item() == pytest.approx(out["t2i"].item(), rel=1e-6)  # image codes are never padding
    with pytest.raises(ValueError, match="padding_weight"):
        compute_batch_loss(model, batch, padding_weight="rows")


def test_compute_batch_loss_rejects_bad_batches():
    model = tiny_model()
    batch = mixed_batch()
    with pytest.raises(ValueError, match="task_ids"):
        compute_batch_loss(model, {k: v for k, v in batch.items() if k != "task_ids"})
    bad = dict(batch, task_ids=torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="task_ids"):
        compute_batch_loss(model, bad)
    with pytest.raises(ValueError, match="task_weights"):
        compute_batch_loss(model, batch, task_weights={"video": 1.0})


# ---------------------------------------------------------------- ELBO likelihood


def test_stratified_counts_are_in_range_and_spread():
    for T in (1, 3, 7, 40):
        for b in (1, 4, 16):
            for k in range(1, T + 1):
                c = stratified_mask_counts(k, T, b)
                assert c.min() >= 1 and c.max() <= T and c[0] == k
    c = stratified_mask_counts(1, 64, 16)
    assert torch.equal(c, torch.arange(1, 64, 4))


class Oracle(torch.nn.Module):
    """Predicts a fixed answer with certainty at the answer positions (or uniform logits when answer is None)."""

    def __init__(self, config, answer=None, prompt_len=0):
        super().__init__()
        self.config, self.answer, self.P = config, answer, prompt_len
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.masked_counts = []

    def forward(self, input_ids, logits_to_keep=None, **kw):
        B, K = logits_to_keep.shape
        logits = torch.zeros(B, K, self.config.vocab_size)
        self.masked_counts.append((input_ids[:, self.P :] == MASK).sum(1))
        assert (input_ids[:, : self.P] != MASK).all()  # the prompt is never masked
        if self.answer is not None:
            logits[:, torch.arange(K), torch.tensor(self.answer)] = 30.0
        return SimpleNamespace(logits=logits)


def test_elbo_perfect_model_scores_higher_and_uniform_is_exact():
    config = tiny_config()
    prompt, right, wrong = [BOS, 10, 11], [20, 21, 22, 23], [20, 30, 31, 23]
    oracle = Oracle(config, right, prompt_len=3)
    good = elbo_log_likelihood(oracle, prompt, right, mc_num=8, batch_size=4, generator=g())
    bad = elbo_log_likelihood(oracle, prompt, wrong, mc_num=8, batch_size=4, generator=g())
    assert good > bad and good > -1e-6
    counts = torch.cat(oracle.masked_counts)
    assert counts.min() >= 1 and counts.max() <= 4
    # Uniform logits: every masked token costs log V and the 1/p weights make each row cost T·log V exactly.
    uniform = elbo_log_likelihood(Oracle(config, None, 3), prompt, right, mc_num=8, batch_size=4, generator=g())
    assert uniform == pytest.approx(-4 * math.log(config.vocab_size), rel=1e-6)


def test_elbo_with_real_model_is_deterministic_and_checks_args():
    model = tiny_model()
    a = elbo_log_likelihood(model, [BOS, 10], [12, 13, 14], mc_num=4, batch_size=2, generator=g(5))
    b = elbo_log_likelihood(model, [BOS, 10], [12, 13, 14], mc_num=4, batch_size=2, generator=g(5))
    c = elbo_log_likelihood(model, [BOS, 10], [12, 13, 14], mc_num=4, batch_size=2, generator=g(5), cfg_scale=1.0)
    assert a == b and a < 0 and c != a
    with pytest.raises(ValueError, match="multiple of batch_size"):
        elbo_log_likelihood(model, [BOS], [12], mc_num=10, batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        elbo_log_likelihood(model, [BOS], [], mc_num=4, batch_size=2)


class ImageRecorder(Recorder):
    """Treats pixel_values as ready-made features [slots, hidden] so the image path runs without a vision tower."""

    def image_features(self, pixel_values):
        return pixel_values

    def forward(self, input_ids, pixel_values=None, image_features=None, **kw):
        self.features = pixel_values if pixel_values is not None else image_features
        return super().forward(input_ids, image_features=self.features, **kw)


def test_understanding_images_follow_their_rows_through_cfg_dropout():
    IMG = 7
    torch.manual_seed(0)
    model = ImageRecorder(MMDLMForConditionalGeneration(tiny_config(image_token_id=IMG)).eval())
    ids = torch.tensor([[BOS, IMG, IMG, 10, 11, 12, EOS], [BOS, IMG, IMG, 20, 21, 22, EOS]])
    lm = torch.tensor([[0, 0, 0, 0, 1, 1, 1]] * 2)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=lm, task_ids=torch.tensor([1, 1]),
                 pixel_values=torch.randn(4, 32))
    compute_batch_loss(model, batch, generator=g())
    assert model.features is batch["pixel_values"]  # nothing dropped: the images go straight into forward
    compute_batch_loss(model, batch, generator=g(), cfg_dropout=1.0)
    assert model.features.shape == (0, 32) and not (model.seen.ids == IMG).any()  # dropped rows lose their images
    for seed in range(50):  # find a draw that drops exactly one row: the other row must keep its own features
        compute_batch_loss(model, batch, generator=g(seed), cfg_dropout=0.5)
        kept = (model.seen.ids == IMG).any(1)
        if int(kept.sum()) == 1:
            row = int(kept.nonzero())
            assert torch.equal(model.features, batch["pixel_values"][2 * row : 2 * row + 2])
            break
    else:
        pytest.fail("no seed dropped exactly one of two rows at q = 0.5")
