"""benchmarks/inpaint_probe.py: which codes an object covers, reading one object back, and the redraw plumbing."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdlm.data.shapes import Shape, ShapesWorld

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("inpaint_probe", ROOT / "benchmarks" / "inpaint_probe.py")
inpaint_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inpaint_probe)


def shape_at(cx, cy, diameter):
    return Shape("circle", "red", "small", 4, cx, cy, diameter, (220, 40, 40))


def test_object_mask_covers_the_patches_the_widened_box_touches():
    mask = inpaint_probe.object_mask(shape_at(32.0, 32.0, 9.0), grid=16).view(16, 16)
    # box 27.5..36.5 widened by 2 px -> 25.5..38.5 -> patches 6..9 in both directions
    assert mask.sum() == 16 and mask[6:10, 6:10].all()
    corner = inpaint_probe.object_mask(shape_at(5.0, 60.0, 17.0), grid=16).view(16, 16)
    assert corner[12:16, 0:4].all() and corner.sum() == 16  # clipped at the canvas edges
    assert inpaint_probe.object_mask(shape_at(32.0, 32.0, 9.0), grid=8, margin=0.0).view(8, 8)[3:5, 3:5].all()


def test_check_object_reads_each_object_of_a_real_render():
    samples = list(ShapesWorld("test", 20, 5))
    results = [inpaint_probe.check_object(s.image, s.scene, j) for s in samples for j in range(len(s.scene.shapes))]
    assert sum(r["all_right"] for r in results) >= 0.95 * len(results)
    blank = Image.new("RGB", (64, 64), "white")
    assert not any(inpaint_probe.check_object(blank, s.scene, 0)["found"] for s in samples)
    summary = inpaint_probe.summarize([{**results[0], "requested_size": "small"},
                                       {**results[1], "requested_size": "large"}])
    assert summary["all"]["n"] == 2 and summary["small"]["n"] == summary["large"]["n"] == 1


class Filler:
    """Stands in for the sampler: fills every masked slot from ``fill_with(init_codes)`` and keeps each call."""

    def __init__(self):
        self.calls, self.fill_with = [], None

    def __call__(self, model, prompts, n, steps, guidance_scale, generator, init_codes):
        self.calls.append(init_codes.clone())
        return torch.where(init_codes < 0, self.fill_with(init_codes), init_codes)


@pytest.fixture()
def fake_filler(monkeypatch):
    import mmdlm.sampling.maskgit as maskgit

    filler = Filler()
    monkeypatch.setattr(maskgit, "generate_image_tokens", filler)
    return filler


def test_redrawing_the_real_codes_scores_as_the_reconstruction_and_blank_ones_lose_the_object(shapes_tiny_pipeline,
                                                                                              fake_filler):
    pipe, vq = shapes_tiny_pipeline, shapes_tiny_pipeline.model.image_tokenizer
    samples = list(ShapesWorld("test", 6, 1))
    reconstruction = inpaint_probe.inpaint_objects(pipe, samples, None)
    real = vq.encode(vq.preprocess([s.image for s in samples for _ in s.scene.shapes])).flatten(1)
    fake_filler.fill_with = lambda init: real
    redrawn = inpaint_probe.inpaint_objects(pipe, samples, 16)
    assert redrawn == reconstruction and sum(r["found"] for r in redrawn) >= len(redrawn) - 1
    # Each call got the real codes with exactly the object's patches masked.
    given = torch.cat(fake_filler.calls)
    masked = given < 0
    assert masked.sum(1).tolist() == [r["codes"] for r in redrawn] and torch.equal(given[~masked], real[~masked])
    white = vq.encode(vq.preprocess([Image.new("RGB", (64, 64), "white")])).flatten(1)
    fake_filler.fill_with = lambda init: white.expand_as(init)
    erased = inpaint_probe.inpaint_objects(pipe, samples, 16)
    assert sum(r["found"] for r in erased) <= 0.2 * len(erased) and len(erased) == len(redrawn)


def test_main_writes_every_arm(tiny_pipeline, tmp_path, monkeypatch, capsys):
    import mmdlm

    monkeypatch.setattr(mmdlm, "load", lambda model, device=None: tiny_pipeline)
    inpaint_probe.main(["--n", "3", "--steps", "1", "2", "--batch-size", "4", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert list(result["arms"]) == ["reconstruction", "inpaint_1_steps", "inpaint_2_steps"]
    objects = sum(len(s.scene.shapes) for s in ShapesWorld("test", 3, 12345))
    assert result["objects"] == objects and all(a["all"]["n"] == objects for a in result["arms"].values())
