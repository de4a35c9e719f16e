"""What a stage trains: projector_only and freeze leave everything else as it was, and a stage whose rows cannot
reach what trains is refused with a message that says what to change."""

import pytest
import torch

from mmdlm.training.plots import read_metrics
from mmdlm.training.recipe import recipe_from_dict
from mmdlm.training.stages import train
from test_training_run import recipe_dict, straight, base, weights  # noqa: F401


def _from(straight, out, **stage):
    d = recipe_dict(steps=2, **stage)
    d["model"] = {"init_from": str(straight)}
    d["stages"] = d["stages"][2:]
    return train(recipe_from_dict(d), output_dir=out, cpu=True)


def _changed(before, after):
    return {k for k in after if after[k].is_floating_point() and not torch.equal(before[k], after[k])}


def test_projector_only_trains_the_projector_alone(straight, tmp_path):
    final = _from(straight, tmp_path, projector_only=True, tasks=["understanding"])
    changed = _changed(weights(straight), weights(final))
    assert changed and all(".mm_projector." in k for k in changed), sorted(changed)[:5]


def test_freeze_keeps_the_named_parts(straight, tmp_path):
    final = _from(straight, tmp_path, freeze=["vision_tower"])
    changed = _changed(weights(straight), weights(final))
    assert not any(".vision_tower." in k for k in changed)
    assert any(".mm_projector." in k for k in changed) and any(".layers." in k for k in changed)


def test_rows_that_reach_nothing_trainable(straight, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"projector_only: .*drawing \(t2i\) rows.*tasks: \[understanding\]"):
        _from(straight, tmp_path / "a", projector_only=True)  # the toy mixture draws too
    assert not (tmp_path / "a" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "a" / "metrics.jsonl")
    # Drawing rows while only the tower trains: each batch adds no gradient, says so, and nothing moves.
    final = _from(straight, tmp_path / "b", tasks=["t2i"], freeze=["model.layers", "model.embed_tokens", "lm_head",
                                                                  "mm_projector", "model.norm"])
    assert "a batch reached no trainable parameter" in capsys.readouterr().out
    assert not _changed(weights(straight), weights(final))
