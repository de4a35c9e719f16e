"""benchmarks/tower_sweep.py writes valid recipes that differ from the shipped one only in the tower."""

import importlib.util
from pathlib import Path

from mmdlm.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tower_sweep", ROOT / "benchmarks" / "tower_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_variants_are_the_shipped_recipe_up_to_the_tower_pretraining_with_only_the_tower_changed(tmp_path):
    shipped = load_recipe(sweep.BASE)
    for name, path in sweep.write_recipes(list(sweep.VARIANTS), tmp_path).items():
        r = load_recipe(path)
        assert r.output_dir == str(tmp_path / name)
        assert [s.type for s in r.stages] == ["image_tokenizer", "tokenizer", "vision_pretrain", "denoiser"], name
        assert r.stages[:3] == shipped.stages[:3], name
        assert (r.stages[3].steps, r.stages[3].is_causal) == (2, True), name
        assert r.data == shipped.data and r.seed == shipped.seed, name
        tower, shipped_tower = dict(r.model.vision_tower), dict(shipped.model.vision_tower)
        for key, value in sweep.VARIANTS[name].items():
            assert tower.pop(key) == value, (name, key)
            shipped_tower.pop(key, None)
        assert tower == shipped_tower, name


def test_max_is_the_shipped_tower(tmp_path):
    r = load_recipe(sweep.write_recipes(["max"], tmp_path)["max"])
    assert r.model == load_recipe(sweep.BASE).model


def test_summary_table_reads_eval_reports():
    report = {"splits": {"test": {"vqa_accuracy": 0.5, "caption_exact_match": 0.25, "caption_attribute_accuracy":
                                  {"color": 1.0, "shape": 0.625, "size": 0.5, "position": 0.0}}}}
    table = sweep.summary_table({"v": {"status": "done", "eval": report}, "w": {"status": "failed in train",
                                                                                "eval": None}})
    assert "| v | done | 50.0% | 25.0% | 100.0% | 62.5% | 50.0% | 0.0% |" in table
    assert "| w | failed in train | - | - | - | - | - | - |" in table
