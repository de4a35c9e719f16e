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
        variant = sweep.VARIANTS[name]
        base = load_recipe(variant.base)
        r = load_recipe(path)
        assert r.output_dir == str(tmp_path / name)
        # Reusing another run's first three stages is only sound if they and the data/model they see are the same.
        assert r.stages[:3] == base.stages[:3], name
        assert r.model == dataclasses.replace(base.model, **(variant.model or {})), name
        # A seed variant reruns the denoiser stages on first stages its base's seed built.
        assert r.seed == (base.seed if variant.seed is None else variant.seed), name
        assert r.model.vision_tower == base.model.vision_tower, name  # the reused tower
        if not (variant.sources or variant.add_sources):
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


def test_round_three_variants_change_the_denoiser_data_only_where_they_say(tmp_path):
    paths = sweep.write_recipes(["S1-shift2800", "S5-scenes30k", "S6-chat", "S7-ar1500-scenes30k"], tmp_path)
    s1, s5, s6, s7 = (load_recipe(p) for p in paths.values())
    assert [s.n for s in s5.data.sources[:3]] == [30000, 30000, 6000] and s5.data.sources[3:] == s1.data.sources[3:]
    assert s5.stages[:-1] == s1.stages[:-1] and s5.stages[-1] == s1.stages[-1]
    assert [s.weight for s in s6.data.sources] == [1.2, 0.6, 3.0, 0.6, 1.0, 0.6]
    assert (s6.data.sources[-1].tasks, s6.data.sources[-1].n) == (["chat"], 6000)
    assert sum(s.weight for s in s6.data.sources if s.tasks != ["t2i"]) == pytest.approx(
        sum(s.weight for s in s1.data.sources if s.tasks != ["t2i"]))  # as many understanding batches as S1
    assert s7.data.sources == s5.data.sources and (s7.stages[-2].steps, s7.stages[-1].steps) == (1500, 2700)
    assert s1.data.eval_sources == s5.data.eval_sources == s6.data.eval_sources  # same held-out eval loss
    s9 = load_recipe(sweep.write_recipes(["S9-ar3000"], tmp_path)["S9-ar3000"])
    assert (s9.stages[-2].is_causal, s9.stages[-2].steps, s9.stages[-1].steps) == (True, 3000, 2800)
    assert s9.stages[-1] == s1.stages[-1] and s9.data == s1.data
    shipped = load_recipe(sweep.SHIFT2800).to_dict()  # S9 is the shipped recipe, up to its output folder
    assert {**s9.to_dict(), "output_dir": None} == {**shipped, "output_dir": None}


def test_round_four_adds_slot_embeddings_to_the_shipped_recipe_only(tmp_path):
    s10 = load_recipe(sweep.write_recipes(["S10-slotpos"], tmp_path)["S10-slotpos"]).to_dict()
    shipped = load_recipe(sweep.SHIFT2800).to_dict()
    assert (s10["model"].pop("image_slot_embeddings"), shipped["model"].pop("image_slot_embeddings")) == (True, False)
    assert {**s10, "output_dir": None} == {**shipped, "output_dir": None}


def test_round_five_variants(tmp_path, monkeypatch):
    s11 = load_recipe(sweep.write_recipes(["S11-tower-tuned"], tmp_path)["S11-tower-tuned"])
    s1 = load_recipe(sweep.write_recipes(["S1-shift2800"], tmp_path)["S1-shift2800"])
    causal, diffusion = s11.stages[-2:]
    assert (causal.is_causal, causal.steps, causal.freeze, causal.vision_tower_lr) == (True, 1000, [], 2e-4)
    assert diffusion.freeze == ["vision_tower"] and diffusion == s1.stages[-1]
    assert dataclasses.replace(causal, freeze=["vision_tower"], vision_tower_lr=None) == s1.stages[-2]
    assert s11.model == s1.model and s11.data == s1.data
    seed1 = load_recipe(sweep.write_recipes(["S9-seed1"], tmp_path)["S9-seed1"]).to_dict()
    shipped = load_recipe(sweep.SHIFT2800).to_dict()
    assert (seed1["seed"], shipped["seed"]) == (1, 0)
    assert {**seed1, "output_dir": None, "seed": 0} == {**shipped, "output_dir": None}
    s12, s13 = (load_recipe(p).to_dict() for p in sweep.write_recipes(["S12-slotpos-where", "S13-where"],
                                                                      tmp_path).values())
    where = {"type": "shapes", "split": "train", "n": 30000, "seed": 1, "tasks": ["vqa"], "question_types": ["position"],
             "objects": None, "weight": 1.2}
    assert s12["data"]["sources"][-1] == s13["data"]["sources"][-1] == where
    assert s13["data"]["sources"][:-1] == shipped["data"]["sources"]
    assert s12["model"]["image_slot_embeddings"] and s12["stages"][-2]["steps"] == 1000
    assert {**s13, "output_dir": None, "data": None} == {**shipped, "output_dir": None, "data": None}
    monkeypatch.setitem(sweep.VARIANTS, "bad", sweep.Variant(sweep.DIFFUSION_ONLY, causal={"freeze": []}))
    with pytest.raises(ValueError, match="no causal denoiser stage"):
        sweep.variant_recipe("bad", tmp_path)


def test_variants_of_different_bases_are_refused_in_one_sweep(capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--variants", "A-a2d", "S1-shift2800", "--reuse", "nowhere"])
    assert "different base recipes" in capsys.readouterr().err


def test_a_variant_cannot_change_what_the_reused_stages_built(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.VARIANTS, "bad", sweep.Variant(sweep.SHIFT2800, model={"vision_tower": {"kind": "vit"}}))
    with pytest.raises(ValueError, match="vision_tower.*reused"):
        sweep.write_recipes(["bad"], tmp_path)


def test_ar_steps_on_a_recipe_without_a_causal_stage_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.VARIANTS, "bad", sweep.Variant(sweep.DIFFUSION_ONLY, ar_steps=100))
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
    for name, recipe in (("R-ar1000-t2i57", sweep.MAX3050), ("E-diffusion-only", sweep.DIFFUSION_ONLY)):
        written = load_recipe(sweep.write_recipes([name], tmp_path)[name]).to_dict()
        expected = load_recipe(recipe).to_dict()
        written.pop("output_dir"), expected.pop("output_dir")
        if name == "R-ar1000-t2i57":  # shipped since: a max-pooled tower and 400 more diffusion steps
            assert expected["model"]["vision_tower"].pop("pool_type") == "max"
            assert written["model"]["vision_tower"].pop("pool_type", "avg") == "avg"
            assert (expected["stages"][-1]["steps"], written["stages"][-1]["steps"]) == (3050, 2650)
            expected["stages"][-1]["steps"] = 2650
        assert written == expected, name


def test_rank_key_puts_shippable_drawing_first_then_reading():
    def report(vqa, em, drawn):
        return {"splits": {"test": {"vqa_accuracy": vqa, "caption_exact_match": em},
                           "digits": {"drawn_digit_accuracy": drawn}}}
    reports = {"reads-best-draws-badly": report(0.9, 0.9, 0.5), "draws": report(0.6, 0.3, 0.95),
               "draws-reads": report(0.7, 0.5, 0.91), "no-eval": None}
    order = sorted(reports, key=lambda n: sweep.rank_key(reports[n]), reverse=True)
    assert order == ["draws-reads", "draws", "reads-best-draws-badly", "no-eval"]


def test_pack_bundles_logs_and_the_best_models_in_small_parts(tmp_path):
    import tarfile

    sweep_dir = tmp_path / "sweep"
    for name, drawn in (("good", 0.95), ("bad", 0.2), ("unfinished", None)):
        d = sweep_dir / name
        (d / "eval").mkdir(parents=True)
        (d / "metrics.jsonl").write_text('{"step": 1}\n')
        (d / "vision_pretrain").mkdir()
        (d / "vision_pretrain" / "model.safetensors").write_bytes(b"x" * 100)
        if drawn is not None:
            (d / "model").mkdir()
            (d / "model" / "config.json").write_text("{}")
            (d / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 40)  # 10 240 bytes
            (d / "eval" / "eval.json").write_text(
                '{"splits": {"digits": {"drawn_digit_accuracy": %s}, "test": {}}}' % drawn)
    out = tmp_path / "out"
    written = sweep.pack(sweep_dir, out, models=1, part_bytes=4096)
    with tarfile.open(out / "results.tar") as tar:
        names = tar.getnames()
    assert "good/metrics.jsonl" in names and "good/eval/eval.json" in names
    assert not [n for n in names if "model" in n.split("/")[:-1] or "vision_pretrain" in n]
    parts = sorted(p for p in written if ".part-" in p.name)
    assert parts and all(p.name.startswith("good.model.tar.part-") and p.stat().st_size <= 4096 for p in parts)
    (tmp_path / "joined.tar").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "joined.tar") as tar:
        tar.extractall(tmp_path / "restored", filter="data")
    assert (tmp_path / "restored" / "model" / "model.safetensors").read_bytes() == bytes(range(256)) * 40


def test_the_committed_round_two_prefix_matches_its_recipe():
    """benchmarks/results/recipe-sweep/round2-prefix holds the S variants' shared stages: reusing it is only sound
    while it was trained with what their base recipe says."""
    import json

    prefix = ROOT / "benchmarks" / "results" / "recipe-sweep" / "round2-prefix"
    recipe = load_recipe(sweep.SHIFT2800)
    assert all((prefix / stage / "config.json").is_file() or stage == "tokenizer" for stage in sweep.REUSED_STAGES)
    vq = json.loads((prefix / "image_tokenizer" / "config.json").read_text())
    assert {k: vq[k] for k in recipe.model.image_tokenizer} == recipe.model.image_tokenizer
    captioner = json.loads((prefix / "vision_pretrain" / "config.json").read_text())
    pretrain = recipe.stages[2]
    assert captioner["vision_config"] == recipe.model.vision_tower
    assert (captioner["hidden_size"], captioner["num_hidden_layers"]) == (pretrain.hidden_size,
                                                                          pretrain.num_hidden_layers)
    vocab = json.loads((prefix / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) <= recipe.tokenizer.vocab_size
    assert "vision_pretrain" in {json.loads(line)["stage"] for line in (prefix / "metrics.jsonl").open()}


def test_round_six_variants(tmp_path):
    written = sweep.write_recipes(["S1-shift2800", "S14-ar-nopad", "S15-questions", "S9-ar3000"], tmp_path)
    s1, s14, s15, s9 = (load_recipe(p) for p in written.values())
    nopad = {"objective": "ar", "pad_counts_as_answer": False}
    assert s14.stages[-2].loss == nopad and s1.stages[-2].loss == {"objective": "ar"}
    assert dataclasses.replace(s14.stages[-2], loss=s1.stages[-2].loss) == s1.stages[-2]
    assert s14.stages[-1] == s1.stages[-1] and s14.data == s1.data
    causal = s15.stages[-2]
    assert (causal.steps, causal.batch_size, causal.min_answer_length, causal.loss) == (3000, 64, 0, nopad)
    sources = s15.to_dict()["data"]["sources"]
    shipped = s9.to_dict()["data"]["sources"]
    assert sources[0] == {**shipped[0], "tasks": ["vqa"], "n": 30000, "seed": 1}
    assert sources[3] == {**shipped[3], "tasks": ["vqa"]} and sources[1:3] + sources[4:] == shipped[1:3] + shipped[4:]
    assert not any("caption" in s.get("tasks", []) for s in sources)  # questions only, as its comment says


def test_prepared_probes_s16_and_s17(tmp_path):
    written = sweep.write_recipes(["S15-questions", "S16-questions-230k", "S17-questions-captions", "S9-ar3000"],
                                  tmp_path)
    s15, s16, s17, s9 = (load_recipe(p) for p in written.values())
    assert s16.stages[-2] == dataclasses.replace(s15.stages[-2], steps=4500) and s16.data == s15.data
    shipped = s9.to_dict()
    r = s17.to_dict()
    assert r["data"]["sources"][:-1] == shipped["data"]["sources"]
    assert r["data"]["sources"][-1] == {"type": "shapes", "split": "train", "n": 30000, "seed": 1, "tasks": ["vqa"],
                                        "question_types": None, "objects": None, "weight": 1.0}
    causal, diffusion = r["stages"][-2], r["stages"][-1]
    assert causal["source_weights"] == [1.2, 1.2, 3.0, 0.6, 1.0, 4.8] and causal["steps"] == 4500
    # the diffusion stage draws the shipped mixture: the shipped weights, and none of the added source
    assert diffusion["source_weights"] == [s["weight"] for s in shipped["data"]["sources"]] + [0.0]
    assert {**diffusion, "source_weights": None} == shipped["stages"][-1]
