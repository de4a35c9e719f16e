"""Recipe parsing: strict keys and types, errors that name the key path, value checks, bundled recipes load."""

import json
from pathlib import Path

import pytest

from mmdlm.training.data_recipe import ShapesSource
from mmdlm.training.recipe import DenoiserStage, RecipeError, load_recipe, recipe_from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _base(**changes):
    d = {
        "data": {"sources": [{"type": "shapes", "n": 4}]},
        "stages": [{"type": "tokenizer"}, {"type": "denoiser", "steps": 3}],
    }
    d.update(changes)
    return d


def _error(d) -> str:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(d)
    return str(e.value)


def test_valid_recipe_builds_typed_dataclasses():
    r = recipe_from_dict(_base(stages=[{"type": "denoiser", "lr": "1e-3", "betas": [0.9, 0.95]}]))
    stage = r.stages[0]
    assert isinstance(stage, DenoiserStage) and isinstance(r.data.sources[0], ShapesSource)
    assert stage.lr == pytest.approx(1e-3) and isinstance(stage.lr, float)  # PyYAML reads 1e-3 as a string
    assert stage.name == "model"  # the last denoiser stage's folder is the final model


def test_wrong_type_names_the_key_path():
    msg = _error(_base(stages=[{"type": "denoiser", "lr": "fast"}]))
    assert msg == "stages[0].lr: expected float, got str 'fast'"
    assert _error(_base(seed=True)).startswith("seed: expected int, got bool")
    assert _error(_base(data={"sources": [{"type": "shapes", "n": 2.5}]})).startswith("data.sources[0].n: expected int")
    assert _error(_base(stages=[{"type": "denoiser", "freeze": "vision_tower"}])).startswith(
        "stages[0].freeze: expected list of str")
    assert _error(_base(stages=[{"type": "denoiser", "task_weights": {"t2i": "x"}}])).startswith(
        "stages[0].task_weights.t2i: expected float")


def test_unknown_keys_are_errors_at_every_level():
    assert _error(_base(learning_rate=1.0)).startswith("learning_rate: unknown key")
    assert _error(_base(model={"hidden_sise": 8})).startswith("model.hidden_sise: unknown key")
    msg = _error(_base(stages=[{"type": "tokenizer"}, {"type": "denoiser", "lrr": 0.1}]))
    assert msg.startswith("stages[1].lrr: unknown key") and "'lr'" in msg  # lists the known keys
    assert _error(_base(data={"sources": [{"type": "shapes", "path": "x"}]})).startswith("data.sources[0].path: unknown")
    msg = _error(_base(model={"image_tokenizer": {"codebok_size": 8}}, stages=[{"type": "image_tokenizer"}]))
    assert msg.startswith("model.image_tokenizer.codebok_size: unknown key")
    assert _error(_base(model={"generation": {"gen_lenght": 8}})).startswith("model.generation.gen_lenght: unknown")


def test_tagged_unions_and_value_checks():
    assert "unknown type 'webdataset'" in _error(_base(data={"sources": [{"type": "webdataset"}]}))
    assert _error(_base(data={"sources": [{"n": 3}]})).startswith("data.sources[0]: missing 'type'")
    assert _error(_base(data={"sources": [{"type": "llava_json"}]})).startswith("data.sources[0].path: required")
    assert _error(_base(data={"sources": [{"type": "shapes"}], "on_missing": "ignore"})).startswith("data.on_missing")
    assert _error(_base(stages=[{"type": "denoiser", "lr": -1.0}])).startswith("stages[0].lr: must be > 0")
    assert _error(_base(stages=[{"type": "denoiser", "schedule": "step"}])).startswith("stages[0].schedule")
    assert _error(_base(stages=[{"type": "denoiser", "task_weights": {"video": 1.0}}])).startswith(
        "stages[0].task_weights.video: unknown task")
    assert "order" in _error(_base(stages=[{"type": "denoiser"}, {"type": "tokenizer"}]))
    assert "twice" in _error(_base(stages=[{"type": "denoiser", "name": "a"}, {"type": "denoiser", "name": "a"}]))
    assert _error(_base(stages=[])).startswith("stages: empty")
    assert _error(_base(stages=[{"type": "denoiser", "tasks": ["reading"]}])).startswith(
        "stages[0].tasks[0]: unknown task 'reading'")
    assert _error(_base(stages=[{"type": "denoiser", "tasks": []}])).startswith("stages[0].tasks: empty")
    two = {"sources": [{"type": "shapes", "n": 4}, {"type": "digits"}]}
    weighted = lambda w: _base(data=two, stages=[{"type": "denoiser", "source_weights": w}])  # noqa: E731
    assert recipe_from_dict(weighted([0, 2])).stages[0].source_weights == [0.0, 2.0]
    assert _error(weighted([1.0])).startswith("stages[0].source_weights: 1 weights for 2 data.sources")
    assert _error(weighted([1.0, -1.0])).startswith("stages[0].source_weights[1]: must be >= 0")
    assert _error(weighted([0, 0])).startswith("stages[0].source_weights: all 0")
    assert "image_tokenizer" in _error(_base(stages=[{"type": "image_tokenizer"}]))  # needs model.image_tokenizer
    msg = _error(_base(model={"image_tokenizer": {"image_size": 30}}, stages=[{"type": "image_tokenizer"}]))
    assert msg.startswith("model.image_tokenizer:") and "divisible" in msg


def test_vision_pretrain_stage_checks():
    tower = {"kind": "vit", "image_size": 32}
    pre = {"type": "vision_pretrain", "steps": 2}
    stages = [{"type": "tokenizer"}, pre, {"type": "denoiser"}]
    r = recipe_from_dict(_base(model={"vision_tower": tower}, stages=stages))
    stage = r.stages[1]
    assert stage.name == "vision_pretrain"
    as_denoiser = stage.as_denoiser_stage()
    assert as_denoiser.loss == {"objective": "ar"} and as_denoiser.tasks == ["understanding"]
    assert (as_denoiser.steps, as_denoiser.lr, as_denoiser.name) == (2, stage.lr, "vision_pretrain")
    assert _error(_base(stages=[pre, {"type": "denoiser"}])).startswith("model.vision_tower: a vision_pretrain")
    assert "order" in _error(_base(model={"vision_tower": tower}, stages=[{"type": "denoiser"}, pre]))
    assert "more than one" in _error(_base(model={"vision_tower": tower}, stages=[pre, dict(pre, name="b"),
                                                                                  {"type": "denoiser"}]))
    assert "needs a denoiser" in _error(_base(model={"vision_tower": tower}, stages=[pre]))
    assert _error(_base(model={"vision_tower": tower, "vision_tower_from": "x"}, stages=[pre, {"type": "denoiser"}])
                  ).startswith("model.vision_tower_from: the recipe also has a vision_pretrain stage")
    assert _error(_base(model={"vision_tower": tower}, stages=[dict(pre, hidden_size=30, num_attention_heads=4),
                                                               {"type": "denoiser"}])).startswith(
        "stages[0].hidden_size: 30 is not divisible")
    assert _error(_base(model={"vision_tower_from": "x"})).startswith("model.vision_tower_from: set model.vision_tower")


def test_shapes_question_types_are_checked_before_training():
    ok = recipe_from_dict(_base(data={"sources": [{"type": "shapes", "n": 4, "question_types": ["position"]}]}))
    assert ok.data.sources[0].question_types == ["position"]
    for bad in (["where"], []):
        message = _error(_base(data={"sources": [{"type": "shapes", "n": 4, "question_types": bad}]}))
        assert message.startswith("data.sources[0].question_types:") and "'position'" in message


def test_shapes_objects_are_checked_before_training():
    ok = recipe_from_dict(_base(data={"sources": [{"type": "shapes", "n": 4, "objects": [2, 3]}]}))
    assert ok.data.sources[0].objects == [2, 3]
    for bad in ([0, 2], []):
        message = _error(_base(data={"sources": [{"type": "shapes", "n": 4, "objects": bad}]}))
        assert message.startswith("data.sources[0].objects:") and "[1, 2, 3]" in message


def test_residual_dropout_is_checked_before_training():
    assert recipe_from_dict(_base(model={"residual_dropout": 0.1})).model.residual_dropout == 0.1
    assert _error(_base(model={"residual_dropout": 1.5})).startswith("model.residual_dropout: a probability")


def test_digits_augment_is_checked_before_training():
    ok = recipe_from_dict(_base(data={"sources": [{"type": "digits", "augment": 3, "seed": 2}]}))
    assert (ok.data.sources[0].augment, ok.data.sources[0].seed) == (3, 2)
    assert _error(_base(data={"sources": [{"type": "digits", "augment": -1}]})).startswith(
        "data.sources[0].augment:")
    assert "expected int" in _error(_base(data={"sources": [{"type": "digits", "augment": "many"}]}))
    ok = recipe_from_dict(_base(data={"sources": [{"type": "digits", "augment": 2, "augment_stroke": [-2, 4]}]}))
    assert ok.data.sources[0].augment_stroke == [-2, 4]
    for bad in ([4, -2], [0, 9], [1]):
        message = _error(_base(data={"sources": [{"type": "digits", "augment": 2, "augment_stroke": bad}]}))
        assert message.startswith("data.sources[0].augment_stroke:") and "-8 <= lo <= hi <= 8" in message
    assert "needs augment > 0" in _error(_base(data={"sources": [{"type": "digits", "augment_stroke": [0, 2]}]}))


def test_yaml_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [{type: shapes}]\nstages:\n  - {type: denoiser, steps: many}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    assert str(bad) in str(e.value) and "stages[0].steps: expected int, got str 'many'" in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")


def base_dir(name: str) -> str:
    """The output folder of the round-9 run that an -ema recipe repeats."""
    return "runs/shapes-tiny-" + name.split("shapes-tiny-")[1].removesuffix("-ema")


RECIPES = sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in [*CONFIGS.glob("*.yaml"),
                                                                          *CONFIGS.glob("experiments/*.yaml")])


def test_every_recipe_is_checked():
    assert {"shapes-tiny", "shapes-tiny-drawn-digits", "tiny-test", "experiments/shapes-tiny-draw-long"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_bundled_recipes_load(name):
    r = load_recipe(CONFIGS / f"{name}.yaml")
    if name == "experiments/shapes-tiny-read-stroke":  # the read recipe, its digit copies with other pen widths
        arm, shipped = r.to_dict(), load_recipe(CONFIGS / "shapes-tiny-read.yaml").to_dict()
        assert (arm.pop("output_dir"), shipped.pop("output_dir")) == ("runs/shapes-tiny-read-stroke",
                                                                       "runs/shapes-tiny-read")
        assert [s.pop("augment_stroke") for s in arm["data"]["sources"] if s["type"] == "digits"] == [[-2, 4], [0, 0]]
        assert [s.pop("augment_stroke") for s in shipped["data"]["sources"] if s["type"] == "digits"] == [[0, 0]] * 2
        assert arm == shipped
    if name == "experiments/shapes-tiny-read-digits-projector":  # read-digits, the projector alone training
        arm, base = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-read-digits.yaml").to_dict()
        arm.pop("output_dir"), base.pop("output_dir")
        ours, theirs = arm["stages"][0], base["stages"][0]
        changed = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
        assert changed == {"lr": (3e-4, 1e-4), "projector_only": (True, False), "tasks": (["understanding"], None),
                           "vision_tower_lr": (None, 5e-5)}
        arm["stages"], base["stages"] = [], []
        assert arm == base
    if name == "experiments/shapes-tiny-read-digits-dropout":  # read-digits with dropout in every block
        arm, base = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-read-digits.yaml").to_dict()
        assert (arm.pop("output_dir"), base.pop("output_dir")) == ("runs/shapes-tiny-read-digits-dropout",
                                                                   "runs/shapes-tiny-read-digits")
        assert (arm["model"].pop("residual_dropout"), base["model"].pop("residual_dropout")) == (0.1, None)
        assert arm == base
    if name == "experiments/shapes-tiny-read-digits-drawn":  # read-digits plus the model's own drawn digits
        arm, base = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-read-digits.yaml").to_dict()
        arm.pop("output_dir"), base.pop("output_dir")
        drawn = arm["data"]["sources"].pop()
        assert (drawn["type"], drawn["task"], drawn["path"]) == ("table", "vqa", "runs/drawn-digits/rows.jsonl")
        assert arm["stages"][0].pop("source_weights") == base["stages"][0].pop("source_weights") + [1.0]
        assert arm == base
    if name == "shapes-tiny-drawn-digits":  # the fifth shipped recipe is round 11's experiment that ran
        shipped, ran = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-read-digits-drawn3000.yaml")
        assert (shipped.pop("output_dir"), ran.output_dir) == ("runs/shapes-tiny-drawn-digits",
                                                               "runs/shapes-tiny-read-digits-drawn3000")
        ran = ran.to_dict()
        ran.pop("output_dir")
        assert shipped == ran and shipped["model"]["init_from"] == "runs/shapes-tiny-read/model"
    if name == "experiments/shapes-tiny-read-digits-drawn3000-share":  # the drawings at round 10's share
        arm, base = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-read-digits-drawn3000.yaml").to_dict()
        arm.pop("output_dir"), base.pop("output_dir")
        weights = arm["stages"][0].pop("source_weights")
        assert weights[-2:] == [0.25, 0.75] and base["stages"][0].pop("source_weights") == weights[:-2] + [1.0, 1.0]
        assert arm == base
    if name == "experiments/shapes-tiny-read-digits-drawn3000":  # round 10's drawn run, 2 250 more drawings
        arm, base = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-read-digits-drawn.yaml").to_dict()
        arm.pop("output_dir"), base.pop("output_dir")
        more, first = arm["data"]["sources"].pop(), arm["data"]["sources"][-1]
        assert (more["path"], more["weight"], first["weight"]) == ("runs/drawn-digits-b/rows.jsonl", 0.75, 0.25)
        first["weight"] = base["data"]["sources"][-1]["weight"]  # data weights, replaced by source_weights below
        assert arm["stages"][0].pop("source_weights") == base["stages"][0].pop("source_weights") + [1.0]
        assert arm == base
    if name.endswith("-ema"):  # round 10's A/B: the round-9 run it repeats, plus the moving average
        arm, base = r.to_dict(), load_recipe(CONFIGS / f"{name.removesuffix('-ema')}.yaml").to_dict()
        assert (arm.pop("output_dir"), base.pop("output_dir")) == (f"{base_dir(name)}-ema", base_dir(name))
        (stage,) = arm["stages"]
        decay, schedules = {"experiments/shapes-tiny-read-digits-ema": (0.995, ("cosine", "cosine")),
                            "experiments/shapes-tiny-read-draw-ema": (0.99, ("constant", "cosine"))}[name]
        assert (stage.pop("ema_decay"), stage.pop("ema_save_raw")) == (decay, True)
        assert (stage.pop("schedule"), base["stages"][0].pop("schedule")) == schedules
        assert base["stages"][0]["ema_decay"] is None
        base["stages"][0].pop("ema_decay"), base["stages"][0].pop("ema_save_raw")
        assert arm == base
    if name == "experiments/shapes-tiny-draw-long":  # 4 equal drawing stages after the shipped recipe's model
        d = r.to_dict()
        assert d["model"]["init_from"] == "runs/shapes-tiny-drawn-digits/model"
        assert [s.pop("name") for s in d["stages"]] == ["draw1", "draw2", "draw3", "draw4"]
        assert all(s == d["stages"][0] for s in d["stages"]) and d["stages"][0]["schedule"] == "constant"
        weights = d["stages"][0]["source_weights"]
        assert weights[-1] / sum(weights) > 0.8 and d["data"]["sources"][-1]["tasks"] == ["t2i"]
    if name == "experiments/shapes-tiny-draw-pixel-2k":  # round 13: draw-pixel-more's stage again, longer, on its model
        arm, base = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-draw-pixel-more.yaml").to_dict()
        assert (arm.pop("output_dir"), base.pop("output_dir")) == ("runs/shapes-tiny-draw-pixel-2k",
                                                                   "runs/shapes-tiny-draw-pixel-more")
        assert arm["model"].pop("init_from") == "runs/shapes-tiny-draw-pixel-more/model"
        base["model"].pop("init_from")
        ours, theirs = arm["stages"][0], base["stages"][0]
        assert {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]} == {"steps": (2000, 1200),
                                                                                 "eval_every": (500, 300)}
        arm["stages"], base["stages"] = [], []
        assert arm == base
    if name == "experiments/shapes-tiny-vq-pixel":  # an image tokenizer only: shapes-tiny's with per-position norms
        shipped = load_recipe(CONFIGS / "shapes-tiny.yaml")
        assert [s.type for s in r.stages] == ["image_tokenizer"] and r.stages[0] == shipped.stages[0]
        assert r.data.sources == shipped.data.sources
        vq, ours = dict(r.model.image_tokenizer), dict(shipped.model.image_tokenizer)
        assert vq.pop("norm") == "pixel" and "norm" not in ours and vq == ours
        return
    if name == "experiments/shapes-tiny-codes8":  # an image tokenizer only: shapes-tiny's with one more level
        shipped = load_recipe(CONFIGS / "shapes-tiny.yaml")
        assert [s.type for s in r.stages] == ["image_tokenizer"] and r.stages[0] == shipped.stages[0]
        assert r.data.sources == shipped.data.sources
        vq, ours = r.model.image_tokenizer, shipped.model.image_tokenizer
        assert (vq.pop("channel_mult"), vq.pop("codebook_size")) == ([1, 2, 2], 1024)
        assert (ours.pop("channel_mult"), ours.pop("codebook_size")) == ([1, 2], 512) and vq == ours
        return
    assert r.stages[-1].type == "denoiser"
    if name == "experiments/shapes-tiny-pretrain5000":  # the previous model's recipe with a longer vision_pretrain
        longer, shipped = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-max3050.yaml").to_dict()
        assert [(d["stages"][2]["steps"], d["stages"][-1]["steps"]) for d in (longer, shipped)] == [(5000, 2800),
                                                                                                   (2500, 3050)]
        for d in (longer, shipped):
            d.pop("output_dir"), d["stages"][-1].pop("steps")
            d["stages"][2].pop("steps"), d["stages"][2].pop("eval_every")
        assert longer == shipped
    if name == "experiments/shapes-tiny-shift":  # pretrain5000 with shifted logits, then a reading polish
        shifted, plain = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-pretrain5000.yaml").to_dict()
        assert (shifted["model"].pop("shift_logits"), plain["model"].pop("shift_logits")) == (True, False)
        shifted.pop("output_dir"), plain.pop("output_dir")
        polish = shifted["stages"].pop()
        assert shifted["stages"][-1].pop("name") == "denoiser2" and plain["stages"][-1].pop("name") == "model"
        # A shorter diffusion stage, so that the run fits about 100 minutes on a CPU without bf16 kernels.
        assert (shifted["stages"][-1].pop("steps"), plain["stages"][-1].pop("steps")) == (1500, 2800)
        assert shifted == plain
        assert (polish["tasks"], polish["steps"], polish["lr"], polish["is_causal"]) == (["understanding"], 400, 3e-4,
                                                                                          False)
    if name == "experiments/shapes-tiny-max3050":  # the previous model: no shifted logits, 3 050 diffusion steps
        old, shipped = r.to_dict(), load_recipe(CONFIGS / "shapes-tiny.yaml").to_dict()
        assert (old["model"].pop("shift_logits"), shipped["model"].pop("shift_logits")) == (False, True)
        assert [(d["stages"][2]["steps"], d["stages"][-1]["steps"]) for d in (old, shipped)] == [(2500, 3050),
                                                                                                (5000, 2800)]
    if name == "experiments/shapes-tiny-switch":  # the switch to diffusion on reading rows only
        (stage,) = r.stages
        assert r.model.init_from == "runs/shapes-tiny-pretrain5000/denoiser1"
        assert (stage.is_causal, stage.tasks, stage.steps, stage.lr) == (False, ["understanding"], 300, 2e-4)
    if name == "shapes-tiny-questions":  # shapes-tiny.yaml's model, more questions of 30 000 other scenes
        questions, drawing_back = r.stages
        shipped = load_recipe(CONFIGS / "shapes-tiny.yaml")
        assert r.model.init_from == f"{shipped.output_dir}/model"  # the first recipe's final folder
        assert not questions.is_causal and not drawing_back.is_causal  # None: the loaded model's own, bidirectional
        added = [i for i, s in enumerate(r.data.sources) if s.type == "shapes" and s not in shipped.data.sources]
        assert [(r.data.sources[i].n, r.data.sources[i].seed, r.data.sources[i].tasks) for i in added] == [
            (30000, 1, ["vqa"])]
        (q,) = added
        assert questions.source_weights[q] / sum(questions.source_weights) > 0.6
        scenes_t2i = [i for i, s in enumerate(r.data.sources) if s.type == "shapes" and "t2i" in s.tasks]
        assert [r.data.sources[i] for i in scenes_t2i] == [s for s in shipped.data.sources if s.type == "shapes"
                                                           and "t2i" in s.tasks]
        assert [questions.source_weights[i] for i in scenes_t2i] == [0.0]  # the first stage draws no scenes...
        assert [drawing_back.source_weights[i] for i in scenes_t2i] == [3.0]  # ...the second, as shapes-tiny.yaml
    if name == "experiments/shapes-tiny-codepos":  # the A/B: the control lacks only the code-position table
        arm, control = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-codepos-control.yaml").to_dict()
        assert (arm["model"].pop("image_code_positions"), control["model"].pop("image_code_positions")) == (True, False)
        assert arm["stages"][0].pop("name") == "draw1" and control["stages"][0].pop("name") in (None, "model")
        arm.pop("output_dir"), control.pop("output_dir")
        assert arm == control
    if name == "experiments/shapes-tiny-tower-tune":  # the tower trains, at a third of the denoiser's lr
        (stage,) = r.stages
        assert stage.freeze == [] and stage.vision_tower_lr == pytest.approx(stage.lr / 3)
        tuned, control = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-tower-tune-control.yaml").to_dict()
        assert (tuned["stages"][0].pop("freeze"), control["stages"][0].pop("freeze")) == ([], ["vision_tower"])
        assert tuned["stages"][0].pop("vision_tower_lr") and control["stages"][0].pop("vision_tower_lr") is None
        tuned.pop("output_dir"), control.pop("output_dir")
        assert tuned == control  # the control arm differs only in the tower's training
    if name == "shapes-tiny-polish":  # the questions recipe's model: drawing steps, then reading with the tower
        draw, tower = r.to_dict()["stages"]
        questions = load_recipe(CONFIGS / "shapes-tiny-questions.yaml")
        assert r.model.init_from == f"{questions.output_dir}/model" and r.data.sources == questions.data.sources
        # Its first stage is the codepos A/B's control stage: same seed, stage index, steps and source weights.
        control = load_recipe(CONFIGS / "experiments" / "shapes-tiny-codepos-control.yaml")
        (control_stage,) = control.to_dict()["stages"]
        assert draw.pop("source_weights") == [s.weight for s in control.data.sources] and r.seed == control.seed
        assert control_stage.pop("source_weights") is None
        assert (draw.pop("name"), control_stage.pop("name")) == ("draw", "model") and draw == control_stage
        assert [s.tasks for s in control.data.sources] == [s.tasks for s in questions.data.sources]
        assert tower["freeze"] == [] and tower["vision_tower_lr"] < tower["lr"]
    if name == "shapes-tiny-read":  # the polish recipe's model: one reading stage, augmented digits, more captions
        (stage,) = r.stages
        polish = load_recipe(CONFIGS / "shapes-tiny-polish.yaml")
        assert r.model.init_from == f"{polish.output_dir}/model" and stage.freeze == []
        digits = [s for s in r.data.sources if s.type == "digits" and "vqa" in s.tasks]
        assert [(s.augment, s.tasks) for s in digits] == [(8, ["vqa", "caption"])]
        (captions,) = [s for s in r.data.sources if s.tasks == ["caption"]]
        (old_captions,) = [s for s in polish.data.sources if s.tasks == ["caption"]]
        assert (captions.n, captions.seed) == (20000, old_captions.seed) and old_captions.n == 6000
        drawing = sum(s.weight for s in r.data.sources if s.tasks == ["t2i"])
        assert 0.15 < drawing / sum(s.weight for s in r.data.sources) < 0.25
    if name == "experiments/shapes-tiny-read-control":  # differs from shapes-tiny-read only in the digit copies
        control, read = r.to_dict(), load_recipe(CONFIGS / "shapes-tiny-read.yaml").to_dict()
        assert (control["data"]["sources"][2].pop("augment"), read["data"]["sources"][2].pop("augment")) == (0, 8)
        control.pop("output_dir"), read.pop("output_dir")
        assert control == read
    if name == "experiments/shapes-tiny-digits":  # the read-digits experiment's stage, then the same at half the lr
        first, second = r.to_dict()["stages"]
        read = load_recipe(CONFIGS / "shapes-tiny-read.yaml")
        experiment = load_recipe(CONFIGS / "experiments" / "shapes-tiny-read-digits.yaml")
        assert r.model.init_from == f"{read.output_dir}/model" == experiment.model.init_from
        assert r.data == read.data == experiment.data and r.seed == experiment.seed
        (experiment_stage,) = experiment.to_dict()["stages"]
        assert (first.pop("name"), experiment_stage.pop("name")) == ("digits1", "model") and first == experiment_stage
        digits = [i for i, s in enumerate(r.data.sources) if s.type == "digits" and "vqa" in s.tasks]
        assert [first["source_weights"][i] / sum(first["source_weights"]) for i in digits] == [pytest.approx(3 / 6.3)]
        assert second["source_weights"] == first["source_weights"]
        assert (second["lr"], second["vision_tower_lr"]) == (first["lr"] / 2, first["vision_tower_lr"] / 2)
    if name == "experiments/shapes-tiny-read-draw":  # the polish recipe's drawing stage, longer, on the read model
        (stage,) = r.to_dict()["stages"]
        polish_draw = load_recipe(CONFIGS / "shapes-tiny-polish.yaml").to_dict()["stages"][0]
        read = load_recipe(CONFIGS / "shapes-tiny-read.yaml")
        assert r.model.init_from == f"{read.output_dir}/model" and r.data == read.data
        assert (stage.pop("steps"), polish_draw.pop("steps")) == (800, 300)
        stage.pop("eval_every"), polish_draw.pop("eval_every")
        assert stage == polish_draw
    if name == "experiments/shapes-tiny-draw-mix-5":  # round 17: draw-mix-4's stage again, on draw-mix-4's model
        more, base = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-draw-mix-4.yaml").to_dict()
        assert more["model"].pop("init_from") == f"{base['output_dir']}/model"
        base["model"].pop("init_from"), more.pop("output_dir"), base.pop("output_dir")
        assert more == base
    if name == "experiments/shapes-tiny-draw-multi":  # draw-mix-5 with drawing rows weighted to multi-object scenes
        multi, base = r.to_dict(), load_recipe(CONFIGS / "experiments" / "shapes-tiny-draw-mix-5.yaml").to_dict()
        added = multi["data"]["sources"].pop(5)
        assert (added["tasks"], added["objects"], added["seed"]) == (["t2i"], [2, 3], 2)
        (old_t2i,) = [s for s in base["data"]["sources"] if s["type"] == "shapes" and s["tasks"] == ["t2i"]]
        assert added["weight"] + multi["data"]["sources"][4]["weight"] == old_t2i["weight"]  # the same drawing share
        multi["data"]["sources"][4]["weight"] = old_t2i["weight"]
        multi.pop("output_dir"), base.pop("output_dir")
        assert multi == base
    if name == "ar-twin":
        assert r.model.is_causal
    if name == "experiments/shapes-tiny-a2d":
        ar, diffusion = r.stages[-2:]
        assert (ar.is_causal, ar.loss, ar.tasks) == (True, {"objective": "ar"}, ["understanding"])
        assert diffusion.is_causal is False and diffusion.loss["eps"] == 0.5
    if name == "experiments/shapes-tiny-continue-arfrac":  # the control differs only in ar_fraction and folder
        control = load_recipe(CONFIGS / "experiments" / "shapes-tiny-continue.yaml").to_dict()
        mixed = r.to_dict()
        assert mixed["stages"][-1]["loss"].pop("ar_fraction") == 0.5
        control.pop("output_dir"), mixed.pop("output_dir")
        assert mixed == control
    if name == "shapes-tiny":
        m = r.model
        assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads) == (256, 6, 8)
        assert m.vision_tower["pool_grid"] == 3 and m.image_tokenizer["codebook_size"] == 512 and m.shift_logits
        assert r.stages[-1].loss == {"cfg_dropout": 0.1, "padding_weight": "row", "eps": 0.5}
        assert [s.type for s in r.stages] == ["image_tokenizer", "tokenizer", "vision_pretrain", "denoiser", "denoiser"]
        ar, diffusion = r.stages[-2:]  # AR-to-diffusion: a causal next-token stage on the understanding rows first
        assert (ar.is_causal, ar.loss, ar.tasks) == (True, {"objective": "ar"}, ["understanding"])
        assert diffusion.is_causal is False and diffusion.tasks is None
        assert r.stages[-1].freeze == ["vision_tower"]


def test_recipe_model_options_reach_the_built_model():
    from mmdlm.tokenization import train_tokenizer
    from mmdlm.training.denoiser_stage import _fresh_model
    from mmdlm.training.recipe import ModelRecipe

    tokenizer = train_tokenizer([f"a small red circle at the top {i}" for i in range(50)], vocab_size=300)
    vit = {"kind": "vit", "image_size": 32, "patch_size": 16, "width": 32, "depth": 1, "heads": 2}
    for slots in (False, True):
        m = ModelRecipe(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vision_tower=vit,
                        shift_logits=True, image_slot_embeddings=slots)
        model, _ = _fresh_model(m, seed=0, tokenizer=tokenizer, vq=None, index=0)
        assert model.config.shift_logits and model.config.image_slot_embeddings == slots
        assert hasattr(model.model, "image_slot_embed") == slots


SHIPPED_CHAIN = ["shapes-tiny", "shapes-tiny-questions", "shapes-tiny-polish", "shapes-tiny-read",
                 "shapes-tiny-drawn-digits", "experiments/shapes-tiny-vq-pixel", "experiments/shapes-tiny-draw-pixel",
                 "experiments/shapes-tiny-draw-pixel-more", "experiments/shapes-tiny-draw-pixel-2k",
                 "experiments/shapes-tiny-read-pixel", "experiments/shapes-tiny-draw-mix",
                 "experiments/shapes-tiny-draw-mix-2", "experiments/shapes-tiny-read-mix",
                 "experiments/shapes-tiny-draw-mix-3", "experiments/shapes-tiny-read-mix-2",
                 "experiments/shapes-tiny-draw-mix-4"]


def test_the_bundled_models_recipes_form_one_chain():
    """Each recipe of the bundled model continues the last one's output, and the tokenizer it ships is recipe 6's."""
    recipes = {name: load_recipe(CONFIGS / f"{name}.yaml") for name in SHIPPED_CHAIN}
    models = [n for n in SHIPPED_CHAIN if n != "experiments/shapes-tiny-vq-pixel"]  # that one trains a tokenizer only
    assert recipes[models[0]].model.init_from is None
    for before, after in zip(models, models[1:]):
        assert recipes[after].model.init_from == f"{recipes[before].output_dir}/model", after
    vq = recipes["experiments/shapes-tiny-vq-pixel"]
    draw = recipes["experiments/shapes-tiny-draw-pixel"].model
    assert draw.image_tokenizer_path == f"{vq.output_dir}/image_tokenizer"
    shipped = json.loads((CONFIGS.parent / "mmdlm" / "weights" / "shapes-tiny" / "config.json").read_text())
    assert shipped["image_tokenizer_config"]["norm"] == vq.model.image_tokenizer["norm"] == "pixel"
