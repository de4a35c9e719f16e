"""The `mmdlm` command: help texts, JSON output on the tiny model, delegation, and one-line errors with exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from mmdlm import cli

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("ask", "caption", "draw", "demo", "train", "eval", "bench"):
        assert f"\n    {command} " in out
    assert "examples:" in out and "Exit codes" in out
    code, out, _ = run(capsys)  # no command: help, and a usage exit code
    assert code == 2 and "usage: mmdlm" in out


@pytest.mark.parametrize("command", ["ask", "caption", "draw", "demo"])
def test_subcommand_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: mmdlm {command}") and "examples:" in out and "--model" in out
    if command in ("ask", "caption"):
        for flag in ("--steps", "--gen-length", "--block-length", "--temperature", "--threshold", "--cfg-scale",
                     "--sampler", "--json", "--device"):
            assert flag in out
    if command == "demo":
        assert "127.0.0.1" in out and "--port" in out


@pytest.mark.parametrize("command", ["train", "eval", "bench"])
def test_delegated_help(capsys, command):
    code, out, err = run(capsys, command, "--help")
    if code == 1 and "not available" in err:
        pytest.skip(f"`mmdlm {command}` has no implementation in this checkout yet")
    assert code == 0 and "usage:" in out and err == ""


def test_bench_quality_is_the_task_half_of_the_benchmark(capsys):
    code, out, err = run(capsys, "bench", "--help")
    assert code == 0 and "mmdlm bench quality" in out
    code, out, err = run(capsys, "bench", "quality", "--help")
    assert code == 0 and out.startswith("usage: mmdlm bench quality") and "--ar-model" in out and err == ""


def test_ask_json_matches_the_pipeline(capsys, tiny_model_dir, tiny_pipeline, example_images):
    image = str(example_images[0])
    code, out, err = run(capsys, "ask", image, "what color is the circle?", "--model", tiny_model_dir, "--device",
                         "cpu", "--sampler", "llada", "--steps", "4", "--gen-length", "8", "--json")
    assert code == 0, err
    result = json.loads(out)
    expected = tiny_pipeline.answer(image, "what color is the circle?", sampler="llada", steps=4, gen_length=8)
    assert result["answer"] == expected and result["question"] == "what color is the circle?"
    assert result["stats"]["forward_passes"] == 4 and result["stats"]["tokens_per_forward"] == pytest.approx(2.0)
    code, out, _ = run(capsys, "ask", image, "what color is the circle?", "--model", tiny_model_dir,
                       "--sampler", "llada", "--steps", "4", "--gen-length", "8")
    assert code == 0 and out == expected + "\n"  # plain mode prints just the answer


def test_caption_many_images_json(capsys, tiny_model_dir, tiny_pipeline, example_images):
    images = [str(p) for p in example_images[:2]]
    code, out, err = run(capsys, "caption", *images, "--model", tiny_model_dir, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [c["image"] for c in result["captions"]] == images
    assert [c["caption"] for c in result["captions"]] == tiny_pipeline.caption(images)
    assert result["stats"]["batch_size"] == 2


def test_draw_writes_a_png(capsys, tiny_model_dir, tmp_path):
    target = tmp_path / "drawn.png"
    code, out, err = run(capsys, "draw", "a large red circle at the center.", "-o", target, "--model",
                         tiny_model_dir, "--seed", "0", "--image-steps", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    with Image.open(target) as im:
        assert im.format == "PNG" and list(im.size) == result["size"] == [16, 16]
    assert result["stats"]["forward_passes"] == 2
    code, out, err = run(capsys, "draw", "a large red circle at the center.", "-o", target, "--model",
                         tiny_model_dir, "--seed", "0", "--image-steps", "2", "--candidates", "3", "--json")
    assert code == 0, err
    # three drawings in one batch (2 passes), then one scoring pass per drawing
    result = json.loads(out)
    assert result["stats"]["forward_passes"] == 2 + 3
    assert len(result["candidate_scores"]) == 3 and all(x < 0 for x in result["candidate_scores"])


def test_draw_temperature_zero_ignores_the_seed(capsys, tiny_model_dir, tmp_path):
    def draw(seed: int, temperature: str) -> bytes:
        target = tmp_path / f"{seed}-{temperature}.png"
        code, _, err = run(capsys, "draw", "a large red circle at the center.", "-o", target, "--model",
                           tiny_model_dir, "--seed", seed, "--image-steps", "2", "--temperature", temperature)
        assert code == 0, err
        with Image.open(target) as im:
            return im.tobytes()

    assert draw(0, "0") == draw(1, "0")  # argmax decoding: no randomness left
    assert draw(0, "1") != draw(1, "1")  # sampled codes: the seed matters, so the flag reached the sampler


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "{tmp}/missing.png", "q"], "does not exist"),
        (["ask", "{tmp}/notes.txt", "q"], "is not an image"),
        (["ask", "{img}", "q", "--steps", "0"], "steps must be a positive integer, got 0."),
        (["ask", "{img}", "q", "--gen-length", "8", "--block-length", "3"],
         "gen_length (8) must be a multiple of block_length (3)."),
        (["ask", "{img}", "   "], "question is empty"),
        (["ask", "{img}"], "the following arguments are required: question"),
        (["ask", "{img}", "q", "--steps", "many"], "invalid int value"),
        (["ask", "{img}", "q", "--model", "{tmp}/no-such-model"], "neither a bundled model"),
        (["draw", "a circle", "-o", "{tmp}/no/such/dir/x.png"], "does not exist"),
        (["draw", "a circle", "-o", "{tmp}/x.png", "--candidates", "0"], "candidates must be a whole number >= 1"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tiny_model_dir, example_images, tmp_path, argv, message):
    (tmp_path / "notes.txt").write_text("not an image")
    filled = [a.format(tmp=tmp_path, img=example_images[0]) for a in argv]
    if "--model" not in filled and filled[0] in ("ask", "draw"):
        filled += ["--model", str(tiny_model_dir)]
    code, out, err = run(capsys, *filled)
    assert code == 2
    assert out == "" and err.startswith("mmdlm: error: ") and err.count("\n") == 1
    assert message in err


def test_runtime_failure_exits_1(capsys, tiny_model_dir, example_images, monkeypatch):
    from mmdlm.pipeline import MMDLMPipeline

    def broken(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    monkeypatch.setattr(MMDLMPipeline, "answer", broken)
    code, out, err = run(capsys, "ask", example_images[0], "q", "--model", tiny_model_dir)
    assert code == 1 and out == ""
    assert err == "mmdlm: error: RuntimeError: CUDA out of memory. Tried to allocate 2 GiB\n"


def test_train_eval_bench_delegate_their_argv(capsys, monkeypatch):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 3

    monkeypatch.setitem(sys.modules, "mmdlm_fake_bench", types.SimpleNamespace(main=fake_main))
    monkeypatch.setitem(cli.DELEGATES, "bench", ("bench", ("mmdlm_missing_module", "mmdlm_fake_bench")))
    assert cli.main(["bench", "--steps", "4", "--help"]) == 3
    assert seen["argv"] == ["--steps", "4", "--help"]
    monkeypatch.setitem(cli.DELEGATES, "bench", ("bench", ("mmdlm_missing_module",)))
    code, _, err = run(capsys, "bench")
    assert code == 1 and "not available" in err and err.count("\n") == 1


def test_demo_binds_localhost_by_default(capsys, monkeypatch):
    import mmdlm.demo.app as app

    calls = []
    monkeypatch.setattr(app, "launch", lambda **kw: calls.append(kw))
    assert cli.main(["demo", "--model", "some/model", "--port", "9999"]) == 0
    assert calls == [{"model": "some/model", "host": "127.0.0.1", "port": 9999, "device": None}]


def test_console_command_prints_no_traceback(tmp_path):
    """The real process: bad input gives exit 2 and one stderr line, never a Python traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mmdlm.cli", "ask", str(tmp_path / "missing.png"), "q"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mmdlm: error: image file {str(tmp_path / 'missing.png')!r} "
                                                "does not exist"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
