"""The moving average of the weights (``ema_decay``): its arithmetic, the saved model, exact resume, and the
recipe and resume errors."""

import pytest
import torch

from mmdlm.training.checkpointing import latest_checkpoint, load_checkpoint
from mmdlm.training.ema import ParameterEMA
from mmdlm.training.recipe import RecipeError, recipe_from_dict
from mmdlm.training.stages import train
from test_training_run import assert_same_weights, base, recipe_dict, run, straight, weights  # noqa: F401


def test_ema_follows_its_formula_and_skips_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)
    ema = ParameterEMA(model, decay=0.5)
    assert "1.weight" not in ema.state_dict() and "0.weight" in ema.state_dict()
    start = model[0].weight.detach().clone()
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1000) == 0.5  # ramp, then the cap
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(0)
    assert torch.allclose(ema.state_dict()["0.weight"], 0.1 * start + 0.9 * (start + 1.0))
    ema.copy_to(model)
    assert torch.allclose(model[0].weight, 0.1 * start + 0.9 * (start + 1.0))
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({"0.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        ParameterEMA(model, decay=1.0)


def test_a_stage_saves_the_average_and_the_raw_weights(straight, tmp_path):
    d = recipe_dict(steps=1, ema_decay=0.99, ema_save_raw=True)
    d["model"] = {"init_from": str(straight)}
    d["stages"] = d["stages"][2:]
    final = train(recipe_from_dict(d), output_dir=tmp_path, cpu=True)
    start, raw, averaged = weights(straight), weights(tmp_path / "model-raw"), weights(final)
    # one update: decay min(0.99, 1/10) = 0.1, so the average is 0.1 * start + 0.9 * trained
    moved = [k for k in raw if not torch.equal(raw[k], start[k])]
    assert moved and not any(k.startswith("image_tokenizer.") for k in moved)  # the VQ does not train here
    for k in (k for k in raw if raw[k].is_floating_point()):
        assert torch.allclose(averaged[k], 0.1 * start[k] + 0.9 * raw[k], atol=1e-6), k


def test_the_raw_weights_are_those_of_a_run_without_ema_and_resume_is_exact(base, straight, tmp_path):
    d = recipe_dict(grad_accum=2, ema_decay=0.9, ema_save_raw=True)
    assert run(base, tmp_path / "a", d, stop_after=2) is None
    assert load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints" / "model"))["ema"]
    resumed = run(base, tmp_path / "a", d, resume=True)
    assert_same_weights(straight, tmp_path / "a" / "model-raw")  # averaging never touches training
    uninterrupted = run(base, tmp_path / "b", d)
    assert_same_weights(uninterrupted, resumed)
    assert not torch.equal(weights(resumed)["lm_head.weight"], weights(straight)["lm_head.weight"])


def test_ema_errors(base, tmp_path):
    with pytest.raises(RecipeError, match=r"stages\[2\]\.ema_decay: must be in \(0, 1\)"):
        recipe_from_dict(recipe_dict(ema_decay=1.0))
    with pytest.raises(RecipeError, match="ema_save_raw: needs ema_decay"):
        recipe_from_dict(recipe_dict(ema_save_raw=True))
    run(base, tmp_path, recipe_dict(), stop_after=1)  # a checkpoint without averages
    with pytest.raises(ValueError, match="holds no moving averages"):
        run(base, tmp_path, recipe_dict(ema_decay=0.9), resume=True)
