"""benchmarks/recipe_sweep.py writes valid recipes that differ from their base only where a variant says."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from mmdlm.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("recipe_sweep", ROOT / "benchmarks" / "recipe_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _unweighted(source):
    return dataclasses.replace(source, weight=1.0)


def test_every_variant_is_a_valid_recipe_that_can_reuse_one_runs_stages(tmp_path):
    paths = sweep.write_recipes(list(sweep.VARIANTS), tmp_path)
    assert load_recipe(sweep.A2D).output_dir == "runs/shapes-tiny-a2d"  # its run is the default --reuse
    for name, path in paths.items():
        base = load_recipe(sweep.VARIANTS[name][0])
        r = load_recipe(path)
        assert r.output_dir == str(tmp_path / name)
        # Reusing another run's first three stages is only sound if they and the data/model they see are the same.
        assert r.stages[:3] == base.stages[:3], name
        assert r.model == base.model and r.seed == base.seed, name
        assert [_unweighted(s) for s in r.data.sources] == [_unweighted(s) for s in base.data.sources], name


def test_variant_overrides_land_on_the_right_stage(tmp_path):
    c = load_recipe(sweep.write_recipes(["C-ar3000"], tmp_path)["C-ar3000"])
    ar, diffusion = c.stages[-2:]
    assert (ar.is_causal, ar.steps, ar.lr) == (True, 3000, 8e-4)
    assert (diffusion.is_causal, diffusion.steps, diffusion.lr) == (False, 2200, 2e-4)
    r = load_recipe(sweep.write_recipes(["R-ar1000-t2i57"], tmp_path)["R-ar1000-t2i57"])
    assert [s.weight for s in r.data.sources] == [1.2, 1.2, 3.0, 0.6, 1.0]
    assert (r.stages[-2].steps, r.stages[-1].steps, r.stages[-1].lr) == (1000, 2650, 8e-4)


def test_round_two_variants_change_only_what_they_say(tmp_path):
    paths = sweep.write_recipes(["S1-shift2800", "S2-arfrac", "S3-understand53", "S4-ar1500"], tmp_path)
    s1, s2, s3, s4 = (load_recipe(p) for p in paths.values())
    assert s1.model.shift_logits and s1.stages[2].steps == 5000  # the shifted base with the longer tower pretraining
    assert [(s.is_causal, s.steps) for s in s1.stages[3:]] == [(True, 1000), (False, 2800)]
    assert s2.stages[-1].loss == {**s1.stages[-1].loss, "ar_fraction": 0.25}
    assert s2.stages[:-1] == s1.stages[:-1]
    assert [s.weight for s in s3.data.sources] == [1.8, 1.8, 3.0, 0.9, 1.0] and s3.stages[-1].steps == 3160
    assert (s4.stages[-2].steps, s4.stages[-1].steps) == (1500, 2700)


def test_variants_of_different_bases_are_refused_in_one_sweep(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--variants", "A-a2d", "S1-shift2800", "--reuse", "nowhere"])
    assert "different base recipes" in capsys.readouterr().err


def test_ar_steps_on_a_recipe_without_a_causal_stage_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.VARIANTS, "bad", (sweep.DIFFUSION_ONLY, 100, None, None, None))
    with pytest.raises(ValueError, match="no causal denoiser stage"):
        sweep.variant_recipe("bad", tmp_path)


def test_summary_table_reads_eval_reports():
    report = {"splits": {"test": {"vqa_accuracy": 0.5, "caption_exact_match": 0.25, "t2i_all_correct": 0.0},
                         "digits": {"digit_accuracy": 1.0, "drawn_digit_accuracy": 0.9}}}
    table = sweep.summary_table({"v": {"status": "done", "train_s": 12.0, "eval": report},
                                 "w": {"status": "failed in train", "train_s": None, "eval": None}})
    assert "| v | done | 12.0 | 50% | 25% | 0% | 100% | 90% |" in table
    assert "| w | failed in train | - | - | - | - | - | - |" in table


def test_variant_r_is_the_shipped_recipe_before_its_tower_change_and_e_the_diffusion_only_one(tmp_path):
    for name, recipe in (("R-ar1000-t2i57", sweep.SHIPPED), ("E-diffusion-only", sweep.DIFFUSION_ONLY)):
        written = load_recipe(sweep.write_recipes([name], tmp_path)[name]).to_dict()
        expected = load_recipe(recipe).to_dict()
        written.pop("output_dir"), expected.pop("output_dir")
        if name == "R-ar1000-t2i57":  # shipped since: a max-pooled tower and 400 more diffusion steps
            assert expected["model"]["vision_tower"].pop("pool_type") == "max"
            assert written["model"]["vision_tower"].pop("pool_type", "avg") == "avg"
            assert (expected["stages"][-1]["steps"], written["stages"][-1]["steps"]) == (3050, 2650)
            expected["stages"][-1]["steps"] = 2650
        assert written == expected, name
