"""End-to-end training runs at toy sizes: loss goes down, exact resume, crash-safe saves, shape-mismatch and NaN
guards, dataset errors before training, and a 2-process CPU data-parallel run."""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmdlm import diffusion
from mmdlm.training import checkpointing
from mmdlm.training.checkpointing import CheckpointMismatchError, latest_checkpoint, load_checkpoint
from mmdlm.training.plots import read_metrics
from mmdlm.training.recipe import recipe_from_dict
from mmdlm.training.stages import train
from mmdlm.training.trainer import TrainingDiverged

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def recipe_dict(steps=4, hidden=32, sources=None, **denoiser):
    return {
        "seed": 0,
        "model": {
            "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 128,
            "vision_tower": {"kind": "vit", "image_size": 64, "patch_size": 16, "width": 32, "depth": 1, "heads": 2},
            "image_tokenizer": {"image_size": 64, "base_channels": 8, "channel_mult": [1, 1, 2, 2], "embed_dim": 4,
                                "codebook_size": 16},
            "generation": {"gen_length": 16, "block_length": 8, "steps": 8},
        },
        "data": {"sources": sources or [{"type": "shapes", "n": 6, "tasks": ["caption", "vqa", "t2i"]}]},
        "tokenizer": {"vocab_size": 300},
        "stages": [
            {"type": "image_tokenizer", "steps": 1, "batch_size": 4, "holdout": 1, "log_every": 1},
            {"type": "tokenizer"},
            {"type": "denoiser", "steps": steps, "lr": 2e-3, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
             "max_length": 128, **denoiser},
        ],
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Image tokenizer + text tokenizer trained once; runs copy them in so those stages are skipped."""
    out = tmp_path_factory.mktemp("base")
    r = recipe_dict()
    r["stages"] = r["stages"][:2]
    assert train(recipe_from_dict(r), output_dir=out, cpu=True) is None  # no denoiser stage
    assert (out / "image_tokenizer" / "model.safetensors").is_file() and (out / "tokenizer").is_dir()
    return out


def run(base, out, d, **kwargs):
    out.mkdir(parents=True, exist_ok=True)
    for name in ("image_tokenizer", "tokenizer"):
        if not (out / name).exists():
            shutil.copytree(base / name, out / name)
    return train(recipe_from_dict(copy.deepcopy(d)), output_dir=out, cpu=True, **kwargs)


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory):
    """An uninterrupted 4-step run (grad_accum 2) that the resume tests must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    final = run(base, out, recipe_dict(grad_accum=2))
    return final


def test_final_folder_is_a_complete_model(straight):
    from mmdlm import MMDLMForConditionalGeneration
    from mmdlm.processing import MMDLMProcessor

    model = MMDLMForConditionalGeneration.from_pretrained(str(straight))
    processor = MMDLMProcessor.from_pretrained(straight)
    assert model.config.can_draw_images and model.config.can_understand_images
    # The VQ tokenizer travels inside the model, with the weights its own stage trained.
    vq = load_file(str(straight.parent / "image_tokenizer" / "model.safetensors"))
    w = weights(straight)
    assert all(torch.equal(w[f"image_tokenizer.{k}"], v) for k, v in vq.items())
    assert processor.num_image_tokens == 16 and processor.codebook_size == 16
    generation = json.loads((straight / "generation_config.json").read_text())
    assert (generation["gen_length"], generation["block_length"], generation["steps"]) == (16, 8, 8)
    assert (straight.parent / "curves.png").stat().st_size > 1000
    assert latest_checkpoint(straight.parent / "checkpoints" / "model") is None  # superseded by the final model


def test_vq_tower_takes_the_trained_image_tokenizer(base, tmp_path):
    """A 'vq' tower is filled in from the run's image tokenizer, copies its encoder and codebook, and keeps them
    frozen while the denoiser trains."""
    from mmdlm import MMDLMForConditionalGeneration

    d = recipe_dict(steps=2)
    d["model"]["vision_tower"] = {"kind": "vq", "width": 16, "pool": 2}
    final = run(base, tmp_path / "vq", d)
    model = MMDLMForConditionalGeneration.from_pretrained(str(final))
    assert model.config.vision_config["vq"]["codebook_size"] == model.config.codebook_size
    tower = model.model.vision_tower.vision_tower
    vq = load_file(str(base / "image_tokenizer" / "model.safetensors"))
    assert torch.equal(tower.codebook, vq["embedding"])
    assert all(torch.equal(v, vq[f"encoder.{k}"]) for k, v in tower.encoder.state_dict().items())
    assert model.model.vision_tower.num_patches == 4  # 4x4 codes of a 64 px image, pooled 2x2


def _tower(folder):
    return {k: v for k, v in weights(folder).items() if k.startswith("model.vision_tower.")}


def test_vision_pretrain_stage_hands_its_tower_to_the_denoiser(base, tmp_path):
    """The vision_pretrain stage trains a causal captioner on understanding rows only; the denoiser starts from
    its tower (frozen here, so the final tower must equal the captioner's exactly, and differ from a fresh one)."""
    from mmdlm import MMDLMForConditionalGeneration

    d = recipe_dict(steps=2, freeze=["vision_tower"])
    d["stages"].insert(2, {"type": "vision_pretrain", "hidden_size": 16, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "steps": 3, "lr": 5e-3, "batch_size": 4, "max_length": 128,
                           "log_every": 1})
    final = run(base, tmp_path / "pre", d)
    captioner = tmp_path / "pre" / "vision_pretrain"
    config = json.loads((captioner / "config.json").read_text())
    assert config["is_causal"] and config["hidden_size"] == 16 and not config.get("image_tokenizer_config")
    records = read_metrics(tmp_path / "pre" / "metrics.jsonl")
    pretrain = [r for r in records if r.get("stage") == "vision_pretrain" and "loss" in r]
    # understanding rows only: no t2i loss is ever logged
    assert len(pretrain) == 3 and all(r["understanding"] > 0 and r.get("t2i", 0) == 0 for r in pretrain), pretrain
    ours, theirs = _tower(final), _tower(captioner)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    fresh = MMDLMForConditionalGeneration(MMDLMForConditionalGeneration.config_class.from_pretrained(str(final)))
    fresh_tower = {f"model.vision_tower.{k}": v for k, v in fresh.model.vision_tower.state_dict().items()}
    assert any(not torch.equal(fresh_tower[k], ours[k]) for k in ours)


def test_a_next_token_stage_then_a_diffusion_stage(base, tmp_path):
    """AR-to-diffusion adaptation: a stage with is_causal: true trains next-token prediction and saves a causal
    model; the next stage, is_causal: false, continues from its weights with the diffusion loss."""
    d = recipe_dict(steps=2)
    first = dict(d["stages"][-1], name="ar", is_causal=True, loss={"objective": "ar"})
    d["stages"] = d["stages"][:-1] + [first, dict(d["stages"][-1], is_causal=False)]
    final = run(base, tmp_path / "ar2d", d)
    assert json.loads((tmp_path / "ar2d" / "ar" / "config.json").read_text())["is_causal"] is True
    assert json.loads((final / "config.json").read_text())["is_causal"] is False
    assert json.loads((final / "config.json").read_text()).get("shift_logits", False) is False
    # Dream / Dimple style: shifted logits keep the next-token alignment through both stages.
    shifted = run(base, tmp_path / "ar2d-shift", {**d, "model": {**d["model"], "shift_logits": True}})
    assert json.loads((tmp_path / "ar2d-shift" / "ar" / "config.json").read_text())["shift_logits"] is True
    assert json.loads((shifted / "config.json").read_text())["shift_logits"] is True
    # Without the second stage's override it would stay causal, which the diffusion loss refuses before training.
    d["stages"][-1].pop("is_causal")
    with pytest.raises(ValueError, match="is_causal: false on this stage"):
        run(base, tmp_path / "refused", d)


def test_a_stage_draws_with_its_own_source_weights(base, tmp_path, capsys):
    sources = [{"type": "shapes", "n": 6, "tasks": ["caption"]}, {"type": "shapes", "n": 6, "tasks": ["t2i"]}]
    d = recipe_dict(steps=3, sources=sources, source_weights=[1.0, 0.0])
    run(base, tmp_path / "reading", d)
    rows = [r for r in read_metrics(tmp_path / "reading" / "metrics.jsonl") if r.get("stage") == "model"]
    assert rows and all("understanding" in r and "t2i" not in r for r in rows if "loss" in r)
    out = capsys.readouterr().out
    assert "task shares understanding 1.00" in out
    assert "source shares sources[0] (shapes train) 1.000, sources[1] (shapes train) 0.000" in out
    d["stages"][-1]["tasks"] = ["t2i"]  # the source that holds the stage's task is weighed 0
    with pytest.raises(ValueError, match=r"stages\[2\]\.tasks: the stage's tasks \['t2i'\] select no data"):
        run(base, tmp_path / "nothing", d)


def test_vision_tower_from_copies_a_saved_tower_and_refuses_another_shape(base, straight, tmp_path):
    d = recipe_dict(steps=1, freeze=["vision_tower"])
    d["model"]["vision_tower_from"] = str(straight)
    final = run(base, tmp_path / "copy", d)
    ours, theirs = _tower(final), _tower(straight)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    d["model"]["vision_tower"] = {**d["model"]["vision_tower"], "width": 48}
    with pytest.raises(ValueError, match="vision_tower_from: the tower saved at"):
        run(base, tmp_path / "other", d)


def test_init_from_adds_code_positions_to_a_saved_model_and_trains_them(straight, tmp_path):
    d = recipe_dict(steps=2, tasks=["t2i"])
    d["model"] = {"init_from": str(straight), "image_code_positions": True, "residual_dropout": 0.1}
    d["stages"] = d["stages"][2:]
    final = train(recipe_from_dict(d), output_dir=tmp_path, cpu=True)
    table = weights(final)["model.image_code_pos_embed"]
    assert table.shape == (16, 32) and table.abs().sum() > 0  # a 4x4 code grid; zeros at the start, then trained
    config = json.loads((final / "config.json").read_text())
    assert config["image_code_positions"] is True and config["residual_dropout"] == 0.1  # replaced the loaded 0.0


def test_init_from_draws_through_another_image_tokenizer(straight, tmp_path):
    vq_run = recipe_dict()
    vq_run["model"]["image_tokenizer"]["norm"] = "pixel"
    vq_run["stages"] = vq_run["stages"][:1]
    train(recipe_from_dict(vq_run), output_dir=tmp_path / "vq", cpu=True)
    d = recipe_dict(steps=1, tasks=["t2i"])
    d["model"] = {"init_from": str(straight), "image_tokenizer_path": str(tmp_path / "vq" / "image_tokenizer")}
    d["stages"] = d["stages"][2:]
    final = train(recipe_from_dict(d), output_dir=tmp_path / "draw", cpu=True)
    assert json.loads((final / "config.json").read_text())["image_tokenizer_config"]["norm"] == "pixel"
    theirs, ours = weights(tmp_path / "vq" / "image_tokenizer"), weights(final)
    assert all(torch.equal(ours[f"image_tokenizer.{k}"], v) for k, v in theirs.items())  # swapped in, not trained
    assert not torch.equal(weights(straight)["image_tokenizer.embedding"], theirs["embedding"])
    # Another codebook size cannot replace the model's image codes.
    vq_run["model"]["image_tokenizer"]["codebook_size"] = 8
    train(recipe_from_dict(vq_run), output_dir=tmp_path / "vq8", cpu=True)
    d["model"]["image_tokenizer_path"] = str(tmp_path / "vq8" / "image_tokenizer")
    with pytest.raises(ValueError, match="8 codes but this model's vocabulary holds 16"):
        train(recipe_from_dict(d), output_dir=tmp_path / "draw8", cpu=True)


def test_training_reduces_the_loss(base, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("a large red circle at the center.\na small blue square at the top left.\n")
    d = recipe_dict(steps=20, lr=1e-2, batch_size=8, sources=[{"type": "text", "path": str(text)}])
    d["data"]["eval_sources"] = d["data"]["sources"]
    del d["model"]["vision_tower"], d["model"]["image_tokenizer"]
    d["stages"] = d["stages"][1:]
    run(base, tmp_path, d)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len([r for r in records if "loss" in r]) == 20
    # The eval loss uses the same examples and noise every time, so it tracks learning, not noise.
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [0, 20]
    assert evals[20] < 0.75 * evals[0], evals


def test_resume_matches_uninterrupted_run(base, straight, tmp_path):
    d = recipe_dict(grad_accum=2)
    assert run(base, tmp_path, d, stop_after=2) is None
    assert latest_checkpoint(tmp_path / "checkpoints" / "model").name.endswith("00000002")
    with pytest.raises(FileExistsError, match="--resume"):  # never silently restarts a stage
        run(base, tmp_path, d)
    final = run(base, tmp_path, d, resume=True)
    assert_same_weights(straight, final)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("stage") == "model" and "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_crash_while_saving_keeps_previous_checkpoint(base, straight, tmp_path, monkeypatch):
    d = recipe_dict(grad_accum=2)
    run(base, tmp_path, d, stop_after=1)
    ckpts = tmp_path / "checkpoints" / "model"
    real_save = torch.save
    calls = []

    def crashing_save(obj, f, *a, **k):  # the optimizer file lands, then the process "dies"
        calls.append(f)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill during save")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpointing.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        run(base, tmp_path, d, resume=True, stop_after=1)  # crashes while saving step 2
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    latest = latest_checkpoint(ckpts)
    assert latest.name.endswith("00000001")
    assert load_checkpoint(latest)["state"]["step"] == 1
    final = run(base, tmp_path, d, resume=True)
    assert_same_weights(straight, final)


def test_resume_from_other_model_shape_fails_before_training(base, tmp_path):
    run(base, tmp_path, recipe_dict(), stop_after=1)
    before = read_metrics(tmp_path / "metrics.jsonl")
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        run(base, tmp_path, recipe_dict(hidden=48), resume=True)
    assert read_metrics(tmp_path / "metrics.jsonl") == before  # not one step was taken
    assert latest_checkpoint(tmp_path / "checkpoints" / "model").name.endswith("00000001")


def test_nan_loss_stops_with_a_usable_checkpoint(base, tmp_path, monkeypatch):
    real = diffusion.compute_batch_loss
    calls = []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(diffusion, "compute_batch_loss", poisoned)
    d = recipe_dict(steps=3)
    with pytest.raises(TrainingDiverged) as e:
        run(base, tmp_path, d)
    msg = str(e.value)
    assert "at step 2" in msg and "nan" in msg and "learning rate" in msg and "--resume" in msg
    latest = latest_checkpoint(tmp_path / "checkpoints" / "model")
    ckpt = load_checkpoint(latest)
    assert ckpt["state"]["step"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values() if v.is_floating_point())
    monkeypatch.setattr(diffusion, "compute_batch_loss", real)
    assert run(base, tmp_path, d, resume=True) is not None


def _llava(tmp_path, entries):
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "images" / "ok.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    return [{"type": "llava_json", "path": str(path), "image_folder": str(tmp_path / "images")},
            {"type": "shapes", "n": 2, "tasks": ["caption", "t2i"]}]


def _entry(image, answer="red"):
    return {"image": image, "conversations": [{"from": "human", "value": "<image>\nwhat color?"},
                                              {"from": "gpt", "value": answer}]}


def test_dataset_errors_surface_before_training(base, tmp_path):
    out = tmp_path / "out"
    sources = _llava(tmp_path, [_entry("ok.png"), _entry("missing.png")])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        run(base, out, recipe_dict(sources=sources))
    assert not (out / "checkpoints").exists() and not (out / "model").exists()

    for entries, match in (([], "no entries"),
                           ([{"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}],
                            "last turn")):
        sources = _llava(tmp_path, entries)
        with pytest.raises(ValueError, match=match) as e:
            run(base, out, recipe_dict(sources=sources))
        assert "data.sources[0]" in str(e.value)
    assert not (out / "checkpoints").exists()

    too_long = [_entry("ok.png", answer="x"), {"conversations": [{"from": "human", "value": "fox " * 200},
                                                                {"from": "gpt", "value": "ok"}]}]
    with pytest.raises(ValueError, match="max_length"):
        run(base, out, recipe_dict(sources=_llava(tmp_path, too_long)))
    assert not (out / "checkpoints").exists()


def test_missing_images_can_be_skipped_and_counted(base, tmp_path, capsys):
    d = recipe_dict(steps=1, sources=_llava(tmp_path, [_entry("ok.png"), _entry("missing.png")]))
    d["data"]["on_missing"] = "skip"
    assert run(base, tmp_path / "out", d) is not None
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert {"stage": "data", "skipped_examples": 1} in records
    assert "1 example(s) were skipped" in capsys.readouterr().out


DDP_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, time
    import torch
    from mmdlm.training import stages, trainer
    from mmdlm.training.recipe import recipe_from_dict

    out = sys.argv[1]
    real_fit = trainer.StageTrainer.fit

    def fit(self, *args, **kwargs):  # after each stage, every rank records a hash of its parameters
        done = real_fit(self, *args, **kwargs)
        h = hashlib.sha256()
        for name, p in sorted(self.raw_model.state_dict().items()):
            h.update(name.encode()); h.update(p.detach().cpu().contiguous().numpy().tobytes())
        with open(f"{out}/hash-{self.stage.name}-rank{self.acc.process_index}-of{self.acc.num_processes}", "w") as f:
            f.write(h.hexdigest())
        return done

    trainer.StageTrainer.fit = fit

    real_tokenizer_stage = stages._tokenizer_stage

    def late_tokenizer_stage(ctx, *args, **kwargs):  # rank 1 arrives after rank 0 has written the tokenizer
        if ctx.accelerator.process_index:
            time.sleep(3)
        return real_tokenizer_stage(ctx, *args, **kwargs)

    stages._tokenizer_stage = late_tokenizer_stage
    stages.train(recipe_from_dict(json.loads(sys.argv[2])), output_dir=out, cpu=True)
""")


def test_two_process_cpu_data_parallel_ranks_agree(tmp_path):  # with a moving average of the weights
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(out), json.dumps(recipe_dict(steps=2, ema_decay=0.9, ema_save_raw=True))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("image_tokenizer", "model"):
        hashes = [(out / f"hash-{stage}-rank{r}-of2").read_text() for r in (0, 1)]
        assert hashes[0] == hashes[1], stage
    assert (out / "model" / "model.safetensors").is_file()
    assert "2 process(es)" in proc.stdout
    # The stage's model is the moving average (rank 0 writes it), the raw weights are beside it.
    assert not torch.equal(weights(out / "model")["lm_head.weight"], weights(out / "model-raw")["lm_head.weight"])
