"""Next-token objective of the causal (AR twin) baseline: the loss by hand, learning, stage wiring and errors."""

import copy
import functools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration, diffusion
from mmdlm.diffusion import compute_batch_loss, validate_loss_options
from mmdlm.training.denoiser_stage import _check_loss_options
from mmdlm.training.plots import read_metrics
from mmdlm.training.recipe import DenoiserStage, load_recipe, recipe_from_dict
from mmdlm.training.stages import train

MASK, EOS, BOS, T2I, SOI, EOI = 63, 2, 1, 6, 4, 5
V = 64
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_model(is_causal=True):
    torch.manual_seed(0)
    config = MMDLMConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         mask_token_id=MASK, eos_token_id=EOS, bos_token_id=BOS, eot_token_id=3, soi_token_id=SOI,
                         eoi_token_id=EOI, t2i_token_id=T2I, image_token_offset=40, codebook_size=16,
                         max_position_embeddings=64, is_causal=is_causal)
    return MMDLMForConditionalGeneration(config)


class Successor(torch.nn.Module):
    """A causal stand-in whose logits at position i favour token input_ids[i] + 1 by A nats."""

    A = 3.0

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(is_causal=True, mask_token_id=MASK, eos_token_id=EOS, image_token_id=None)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=None, **kw):
        self.seen = input_ids.clone()
        logits = torch.zeros(*input_ids.shape, V)
        logits.scatter_(2, (input_ids + 1)[..., None] % V, self.A)
        return SimpleNamespace(logits=logits.gather(1, logits_to_keep[..., None].expand(-1, -1, V)))


def batch_of(rows):
    """rows: (tokens, loss_mask, attention_mask, task); all rows have the same length."""
    t = lambda i: torch.tensor([r[i] for r in rows])  # noqa: E731
    return dict(input_ids=t(0), loss_mask=t(1), attention_mask=t(2), task_ids=t(3))


def hand_batch():
    return batch_of([
        # text: targets 11 12 20 EOS after 10 11 12 20 -> right, right, wrong, wrong
        ([BOS, 10, 11, 12, 20, EOS, EOS, EOS], [0, 0, 1, 1, 1, 1, 0, 0], [1] * 8, 0),
        # t2i (left padding, invisible): codes 41 42 43 after <|soi|> 41 42 -> wrong, right, right
        ([EOS, T2I, BOS, 30, SOI, 41, 42, 43], [0, 0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1], 2),
    ])


def test_ar_loss_by_hand():
    right = math.log(math.exp(Successor.A) + V - 1) - Successor.A
    wrong = math.log(math.exp(Successor.A) + V - 1)
    model = Successor()
    batch = hand_batch()
    out = compute_batch_loss(model, batch, objective="ar", task_weights={"text": 2.0, "t2i": 0.5})
    assert torch.equal(model.seen, batch["input_ids"])  # nothing is masked
    assert out["text"].item() == pytest.approx((2 * right + 2 * wrong) / 4, rel=1e-6)
    assert out["t2i"].item() == pytest.approx((wrong + 2 * right) / 3, rel=1e-6)
    assert "understanding" not in out
    assert out["loss"].item() == pytest.approx(2.0 * out["text"].item() + 0.5 * out["t2i"].item(), rel=1e-6)


def test_ar_loss_drops_eos_padding_on_request():
    right = math.log(math.exp(Successor.A) + V - 1) - Successor.A
    wrong = math.log(math.exp(Successor.A) + V - 1)
    # targets 11, EOS, EOS (after 10, 11, EOS): right, wrong, wrong; the second EOS is padding
    batch = batch_of([([BOS, 10, 11, EOS, EOS], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], 0)])
    assert compute_batch_loss(Successor(), batch, objective="ar")["text"].item() == pytest.approx(
        (right + 2 * wrong) / 3, rel=1e-6)
    dropped = compute_batch_loss(Successor(), batch, objective="ar", pad_counts_as_answer=False)
    assert dropped["text"].item() == pytest.approx((right + wrong) / 2, rel=1e-6)


def test_ar_loss_matches_shifted_cross_entropy_of_the_real_model():
    model = tiny_model().eval()
    batch = hand_batch()
    out = compute_batch_loss(model, batch, objective="ar")
    ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"].bool()
    positions = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, position_ids=positions).logits
    for row, name in ((0, "text"), (1, "t2i")):
        target = lm[row, 1:]
        want = F.cross_entropy(logits[row, :-1][target], ids[row, 1:][target])
        assert out[name].item() == pytest.approx(want.item(), rel=1e-5)


def test_a_few_ar_steps_reduce_the_loss():
    model = tiny_model().train()
    batch = hand_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = compute_batch_loss(model, batch, objective="ar")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_ar_option_errors():
    batch = hand_batch()
    with pytest.raises(ValueError, match="is_causal=True"):
        compute_batch_loss(tiny_model(is_causal=False), batch, objective="ar")
    with pytest.raises(ValueError, match="cfg_dropout is a masked-diffusion option"):
        compute_batch_loss(Successor(), batch, objective="ar", cfg_dropout=0.1)
    for option in ({"weighting": "mean"}, {"antithetic": True}, {"eps": 0.01}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} is a masked-diffusion option"):
            validate_loss_options("ar", **option)
    with pytest.raises(ValueError, match="'diffusion'.*'ar'"):
        compute_batch_loss(Successor(), batch, objective="next-token")
    validate_loss_options("diffusion", weighting="mean", cfg_dropout=0.1)  # the denoiser keeps its options


def test_stage_refuses_objectives_that_do_not_fit_the_attention():
    causal, bidirectional = SimpleNamespace(is_causal=True), SimpleNamespace(is_causal=False)
    with pytest.raises(ValueError, match=r"stages\[2\]\.loss\.objective: 'ar'.*needs a causal model.*is_causal: true"):
        _check_loss_options(DenoiserStage(loss={"objective": "ar"}), bidirectional, "stages[2]")
    for loss in ({}, {"objective": "diffusion"}):
        with pytest.raises(ValueError, match=r"stages\[0\]\.loss\.objective: the model is causal.*objective: ar"):
            _check_loss_options(DenoiserStage(loss=loss), causal, "stages[0]")
    with pytest.raises(ValueError, match=r"stages\[0\]\.loss: cfg_dropout is a masked-diffusion option"):
        _check_loss_options(DenoiserStage(loss={"objective": "ar", "cfg_dropout": 0.1}), causal, "stages[0]")
    with pytest.raises(ValueError, match=r"stages\[0\]\.loss\.objective: 'bogus' is not an objective"):
        _check_loss_options(DenoiserStage(loss={"objective": "bogus"}), causal, "stages[0]")
    _check_loss_options(DenoiserStage(loss={"objective": "ar"}), causal, "stages[0]")
    _check_loss_options(DenoiserStage(loss={"cfg_dropout": 0.1}), bidirectional, "stages[0]")


def text_recipe(tmp_path, causal, loss, steps=12):
    text = tmp_path / "text.txt"
    text.write_text("a large red circle at the center.\na small blue square at the top left.\n")
    sources = [{"type": "text", "path": str(text)}]
    return {
        "seed": 0,
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "max_position_embeddings": 128, "is_causal": causal},
        "data": {"sources": sources, "eval_sources": sources},
        "tokenizer": {"vocab_size": 300},
        "stages": [{"type": "tokenizer"},
                   {"type": "denoiser", "steps": steps, "lr": 1e-2, "batch_size": 8, "warmup_steps": 1,
                    "log_every": 1, "max_length": 128, "loss": loss}],
    }


def test_training_run_passes_the_ar_objective_through(tmp_path, monkeypatch):
    real, seen = diffusion.compute_batch_loss, []

    @functools.wraps(real)  # the stage reads the loss options off the signature
    def spy(*args, **kwargs):
        seen.append(kwargs.get("objective"))
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "compute_batch_loss", spy)
    with pytest.raises(ValueError, match=r"stages\[1\]\.loss\.objective: the model is causal"):
        train(recipe_from_dict(text_recipe(tmp_path, True, {})), output_dir=tmp_path, cpu=True)
    assert not seen  # refused before the first step
    final = train(recipe_from_dict(text_recipe(tmp_path, True, {"objective": "ar"})), output_dir=tmp_path, cpu=True)
    assert final is not None and seen and set(seen) == {"ar"}
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_loss" in r}
    assert evals[12] < 0.75 * evals[0], evals


def test_ar_twin_recipe_is_shapes_tiny_with_causal_attention():
    twin = load_recipe(CONFIGS / "ar-twin.yaml").to_dict()
    base = load_recipe(CONFIGS / "experiments" / "shapes-tiny-diffusion-only.yaml").to_dict()
    assert twin["model"]["is_causal"] and twin["stages"][-1]["loss"] == {"objective": "ar"}
    # It reuses the shipped run's tokenizers, whose stages are the same in both recipes.
    shipped = load_recipe(CONFIGS / "shapes-tiny.yaml")
    assert shipped.stages[:2] == load_recipe(CONFIGS / "experiments" / "shapes-tiny-diffusion-only.yaml").stages[:2]
    assert twin["tokenizer"]["path"] == str(Path(shipped.output_dir) / "tokenizer")
    assert twin["model"]["image_tokenizer_path"] == str(Path(shipped.output_dir) / "image_tokenizer")
    # Everything else matches: the two models differ only in attention and objective.
    expected = copy.deepcopy(base)
    expected["output_dir"] = twin["output_dir"]
    expected["model"].update(is_causal=True, image_tokenizer=None,
                             image_tokenizer_path=twin["model"]["image_tokenizer_path"])
    expected["model"]["generation"]["guidance_scale"] = 0.0  # no caption dropout, so no unconditional branch
    expected["tokenizer"]["path"] = twin["tokenizer"]["path"]
    expected["stages"] = [s for s in expected["stages"] if s["type"] in ("vision_pretrain", "denoiser")]
    expected["stages"][-1]["loss"] = {"objective": "ar"}
    twin["tokenizer"]["vocab_size"] = base["tokenizer"]["vocab_size"]  # unused when the tokenizer is loaded
    assert twin == expected


def test_generate_decodes_a_causal_model_greedily():
    """``mmdlm.sampling.generate`` (what the pipeline and ``model.generate`` call) hands a causal model to the
    greedy KV-cached decoder instead of running a diffusion sampler on it, and refuses diffusion-only options."""
    from mmdlm.sampling import generate
    from mmdlm.sampling.autoregressive import generate_autoregressive

    model = tiny_model().eval()
    ids = torch.tensor([[BOS, 10, 11, 12], [BOS, 20, 21, 22]])
    out = generate(model, ids, gen_length=6)
    expected = generate_autoregressive(model, ids, max_new_tokens=6, return_dict=True)
    assert torch.equal(out.sequences, expected.sequences) and out.nfe == expected.nfe
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=6).sequences, expected.sequences)
    with pytest.raises(ValueError, match="causal"):
        generate(model, ids, sampler="fast", gen_length=6)
    with pytest.raises(ValueError, match="streaming"):
        generate(model, ids, gen_length=6, callback=lambda *a: None)


# --- ar_fraction: next-token batches inside the diffusion stage of an AR-to-diffusion denoiser -----------------

def test_is_causal_override_is_exactly_the_other_attention():
    bidirectional, causal = tiny_model(is_causal=False).eval(), tiny_model(is_causal=True).eval()  # same weights
    ids = torch.tensor([[BOS, 10, 11, 12, 20, EOS]])
    with torch.no_grad():
        b, c = bidirectional(input_ids=ids).logits, causal(input_ids=ids).logits
        assert not torch.allclose(b, c)  # the override below has something to change
        assert torch.allclose(bidirectional(input_ids=ids, is_causal=True).logits, c, atol=1e-6)
        assert torch.allclose(causal(input_ids=ids, is_causal=False).logits, b, atol=1e-6)
        assert torch.equal(bidirectional(input_ids=ids).logits, b)  # the config still rules without it


def test_ar_fraction_one_trains_a_text_batch_with_the_causal_next_token_loss():
    batch = batch_of([([BOS, 10, 11, 12, 20, EOS, EOS, EOS], [0, 0, 1, 1, 1, 1, 0, 0], [1] * 8, 0)])
    out = compute_batch_loss(tiny_model(is_causal=False), batch, ar_fraction=1.0, padding_weight="row", eps=0.5,
                             generator=torch.Generator().manual_seed(0))
    ref = compute_batch_loss(tiny_model(is_causal=True), batch, objective="ar")
    assert set(out) == {"text_ar", "loss"}  # reported apart from the diffusion loss, whose scale differs
    assert out["text_ar"].item() == pytest.approx(ref["text"].item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-5)


def test_ar_fraction_leaves_drawing_batches_to_diffusion_and_mixes_text_batches_at_its_rate():
    model = tiny_model(is_causal=False)
    drawing = hand_batch()  # has a t2i row: always masked diffusion, with the same noise as ar_fraction=0
    for seed in range(3):
        a = compute_batch_loss(model, drawing, ar_fraction=1.0, generator=torch.Generator().manual_seed(seed))
        b = compute_batch_loss(model, drawing, generator=torch.Generator().manual_seed(seed))
        assert set(a) == set(b) == {"text", "t2i", "loss"} and torch.equal(a["loss"], b["loss"])
    text = batch_of([([BOS, 10, 11, 12, 20, EOS, EOS, EOS], [0, 0, 1, 1, 1, 1, 0, 0], [1] * 8, 0)])
    ar = sum("text_ar" in compute_batch_loss(model, text, ar_fraction=0.25, generator=torch.Generator().manual_seed(s))
             for s in range(200))
    assert 30 <= ar <= 70  # Binomial(200, 0.25): mean 50, sd 6


def test_ar_fraction_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"ar_fraction is a probability in \[0, 1\]"):
        validate_loss_options(ar_fraction=1.5)
    with pytest.raises(ValueError, match="ar_fraction is a masked-diffusion option"):
        validate_loss_options("ar", ar_fraction=0.5)
    bidirectional = SimpleNamespace(is_causal=False)
    _check_loss_options(DenoiserStage(loss={"ar_fraction": 0.3, "eps": 0.5}), bidirectional, "stages[4]")
    with pytest.raises(ValueError, match=r"stages\[4\]\.loss: ar_fraction is a probability"):
        _check_loss_options(DenoiserStage(loss={"ar_fraction": -0.1}), bidirectional, "stages[4]")


def test_a_diffusion_stage_with_ar_fraction_logs_both_losses_and_evaluates_diffusion_only(tmp_path):
    train(recipe_from_dict(text_recipe(tmp_path, False, {"ar_fraction": 0.5, "eps": 0.5}, steps=16)),
          output_dir=tmp_path, cpu=True)
    records = read_metrics(tmp_path / "metrics.jsonl")
    logged = {k for r in records if "eval_loss" not in r for k in r}
    assert {"text", "text_ar"} <= logged  # both kinds of batch happened, each logged under its own name
    evals = [r for r in records if "eval_loss" in r]
    assert evals and not any(k.endswith("_ar") for r in evals for k in r)


def test_shifted_logits_read_each_position_from_its_predecessor_and_keep_the_next_token_loss():
    plain, shifted = tiny_model().eval(), tiny_model().eval()
    shifted.config.shift_logits = True
    batch = hand_batch()
    ids, am = batch["input_ids"], batch["attention_mask"]
    positions = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = plain(input_ids=ids, attention_mask=am, position_ids=positions).logits
        b = shifted(input_ids=ids, attention_mask=am, position_ids=positions).logits
        idx = torch.tensor([[1, 5], [7, 2]])
        kept = shifted(input_ids=ids, attention_mask=am, position_ids=positions, logits_to_keep=idx).logits
    assert torch.allclose(b[:, 1:], a[:, :-1]) and torch.allclose(b[:, 0], a[:, 0])
    assert not torch.allclose(b[:, 1:], a[:, 1:])
    assert torch.allclose(kept, b.gather(1, idx[..., None].expand(-1, -1, V)))
    # The same weights are the same next-token model: an AR checkpoint can be read with shifted logits.
    for name, value in compute_batch_loss(plain, batch, objective="ar").items():
        assert compute_batch_loss(shifted, batch, objective="ar")[name].item() == pytest.approx(value.item(), rel=1e-5)


def test_shifted_logits_over_a_cache_start_one_position_early():
    model = tiny_model(is_causal=False).eval()
    model.config.shift_logits = True
    ids = torch.tensor([[BOS, 10, 11, MASK, MASK]])
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True)
        cache = [(k[:, :, :2], v[:, :, :2]) for k, v in full.cache]  # positions 0-1 cached
        # The first query position's predecessor is only K/V in the cache: asking for its logits is refused.
        with pytest.raises(ValueError, match="one position earlier"):
            model(input_ids=ids[:, 3:], position_ids=torch.tensor([[3, 4]]), cache=cache)
        # Starting the queries one earlier (position 2) gives positions 3-4 exactly the full forward's logits.
        got = model(input_ids=ids[:, 2:], position_ids=torch.tensor([[2, 3, 4]]), cache=cache,
                    logits_to_keep=torch.tensor([[1, 2]])).logits
    assert torch.allclose(got, full.logits[:, 3:], atol=1e-5)


def test_the_greedy_decoder_reads_next_token_logits_from_a_model_with_shifted_logits():
    from mmdlm.sampling.autoregressive import generate_autoregressive

    plain, shifted = tiny_model().eval(), tiny_model().eval()
    shifted.config.shift_logits = True
    ids = torch.tensor([[BOS, 10, 11, 12], [BOS, 20, 21, 22]])
    for use_cache in (True, False):
        want = generate_autoregressive(plain, ids, max_new_tokens=6, use_cache=use_cache, return_dict=True).sequences
        got = generate_autoregressive(shifted, ids, max_new_tokens=6, use_cache=use_cache, return_dict=True).sequences
        assert torch.equal(got, want)
