"""Atomic checkpoints: crash-safety at every point of a save, weights_only loading, shape checks, the CLI."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdlm.training import checkpointing, main
from mmdlm.training.checkpointing import (
    CheckpointMismatchError,
    atomic_directory,
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
)
from mmdlm.training.trainer import lr_multiplier, name_matches


def _state(scale=1.0):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    return model, opt, sched


def test_checkpoint_round_trip_with_weights_only_loading(tmp_path):
    model, opt, sched = _state()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 7, model.state_dict(), opt.state_dict(), sched.state_dict(), {"stage": "x"})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt = load_checkpoint(path)  # every .pt file goes through torch.load(weights_only=True)
    checkpointing.restore_rng_state(ckpt["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert ckpt["state"]["step"] == 7 and ckpt["state"]["stage"] == "x"
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
    _, opt2, sched2 = _state(scale=2.0)
    opt2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_keep_prunes_only_after_the_new_checkpoint_exists(tmp_path):
    model, opt, sched = _state()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model.state_dict(), opt.state_dict(), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


@pytest.mark.parametrize("fail_at", ["model", "optimizer", "state"])
def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    model, opt, sched = _state()
    save_checkpoint(tmp_path, 1, model.state_dict(), opt.state_dict(), sched.state_dict())
    real_save, real_file = torch.save, checkpointing.save_file

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    if fail_at == "model":
        monkeypatch.setattr(checkpointing, "save_file", boom)
    elif fail_at == "optimizer":
        monkeypatch.setattr(checkpointing.torch, "save", boom)
    else:  # everything written but the state file
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: boom())
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), sched.state_dict())
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert load_checkpoint(latest_checkpoint(tmp_path))["state"]["step"] == 1
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the failed save cleaned up


def test_killed_save_leftovers_are_ignored_and_removed(tmp_path):
    model, opt, _ = _state()
    save_checkpoint(tmp_path, 1, model.state_dict(), opt.state_dict())
    # A SIGKILL mid-write leaves a half-written temp folder (no cleanup code runs).
    half = tmp_path / ".tmp-step-00000002-deadbeef"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert remove_leftovers(tmp_path) == [half] and not half.exists()


def test_replacing_a_folder_survives_a_crash_between_renames(tmp_path, monkeypatch):
    target = tmp_path / "model"
    atomic_directory(target, lambda d: (d / "weights").write_text("old"))
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # old moved aside, new not yet in place
            raise KeyboardInterrupt("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(checkpointing.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        atomic_directory(target, lambda d: (d / "weights").write_text("new"))
    monkeypatch.undo()
    assert not target.exists()
    remove_leftovers(tmp_path)  # restores the old folder
    assert (target / "weights").read_text() == "old"
    atomic_directory(target, lambda d: (d / "weights").write_text("new"))
    assert (target / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_shape_check_names_the_mismatch(tmp_path):
    model, _, _ = _state()
    path = save_checkpoint(tmp_path, 1, model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_compatible(path, shapes)  # same model: fine
    shapes["0.weight"] = (5, 4)
    shapes["2.weight"] = (3,)
    with pytest.raises(CheckpointMismatchError) as e:
        check_compatible(path, shapes)
    msg = str(e.value)
    assert "0.weight: [3, 4] in the checkpoint vs [5, 4] now" in msg and "2.weight" in msg


def test_schedule_and_freeze_prefixes():
    values = [lr_multiplier(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert values[0] == 0.5 and values[1] == 1.0 and values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[1:], values[2:])) and values[-1] > 0.1
    assert lr_multiplier(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(5, 10, 0, "constant", 0.1) == 1.0
    assert name_matches("model.vision_tower.blocks.0.w", "vision_tower")
    assert name_matches("model.layers.3.mlp.up_proj.weight", "model.layers")
    assert not name_matches("model.layers_extra.w", "model.layers") and not name_matches("lm_head.weight", "head")


def test_cli_reports_recipe_errors_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("data: {sources: [{type: shapes}]}\nstages: [{type: denoiser, lr: fast}]\n")
    assert main([str(bad)]) == 2
    assert "stages[0].lr: expected float, got str 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--resume" in capsys.readouterr().out


def test_bf16_cpu_autocasts_only_where_the_cpu_has_bf16_kernels(monkeypatch, capsys):
    # Emulated bf16 (AVX2-only CPUs) measured several times slower than fp32: the option falls back to fp32 there.
    from types import SimpleNamespace

    from mmdlm.training import trainer

    fake = SimpleNamespace(stage=SimpleNamespace(bf16=True, bf16_cpu=True),
                           acc=SimpleNamespace(device=torch.device("cpu"), mixed_precision="no"))
    monkeypatch.setattr(trainer, "_BF16_WARNED", False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    with trainer.StageTrainer._autocast(fake):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with trainer.StageTrainer._autocast(fake):
        assert not torch.is_autocast_enabled("cpu")
    assert "no native bf16 kernels" in capsys.readouterr().out
    fake.stage.bf16_cpu = False
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    with trainer.StageTrainer._autocast(fake):
        assert not torch.is_autocast_enabled("cpu")
