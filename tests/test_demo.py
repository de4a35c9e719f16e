"""The Gradio demo served on 127.0.0.1 and called through gradio_client: every endpoint, streaming, bad input."""

from __future__ import annotations

import os
import socket

import httpx
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from mmdlm.demo.app import (  # noqa: E402
    EXAMPLES_DIR,
    MASK_LABEL,
    QUEUE_MAX_SIZE,
    build_demo,
    canvas_value,
    history_to_messages,
    launch,
    load_examples,
)
from mmdlm.pipeline import StreamState  # noqa: E402

# sampler, steps, gen_length, block_length, threshold, temperature, cfg_scale
SETTINGS = ("llada", 4, 8, 8, 0.9, 0.0, 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(pipeline):
    demo = launch(pipeline=pipeline, port=free_port(), prevent_thread_lock=True, quiet=True)
    return demo, gradio_client.Client(demo.local_url, verbose=False)


@pytest.fixture(scope="module")
def served(tiny_pipeline):
    demo, client = serve(tiny_pipeline)
    yield demo, client
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return served[1]


@pytest.fixture()
def image():
    return gradio_client.handle_file(str(EXAMPLES_DIR / "shapes_0.png"))


def test_server_is_local_private_and_queued(served, tiny_pipeline):
    demo, client = served
    assert demo.local_url.startswith("http://127.0.0.1:")
    assert demo.server_name == "127.0.0.1" and not demo.share and not demo.analytics_enabled
    assert demo._queue.max_size == QUEUE_MAX_SIZE and demo._queue.default_concurrency_limit == 1
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/chat", "/ask", "/caption", "/draw"} <= set(endpoints)
    # The sampler settings start at the model's generation config.
    defaults = {p["parameter_name"]: p["parameter_default"] for p in endpoints["/ask"]["parameters"]
                if p["parameter_has_default"]}
    gc = tiny_pipeline.generation_config
    assert defaults["steps"] == gc.steps and defaults["gen_length"] == gc.gen_length
    assert defaults["sampler"] == gc.sampler and defaults["threshold"] == gc.threshold


def test_ask_streams_the_canvas_and_ends_with_the_answer(client, tiny_pipeline, image):
    question = "what color is the circle?"
    job = client.submit(image, question, *SETTINGS, api_name="/ask")
    list(job)  # wait for the end of the stream
    answer, canvas, stats = job.outputs()[-1]
    expected = tiny_pipeline.answer(str(EXAMPLES_DIR / "shapes_0.png"), question, sampler="llada", steps=4,
                                    gen_length=8, block_length=8)
    assert answer == expected
    assert [c["class_or_confidence"] for c in canvas] == [None] and canvas[0]["token"] == expected
    assert stats.startswith("**4** forward passes") and "tokens per forward" in stats
    partial = job.outputs()[:-1]
    assert len(partial) >= 2, "the canvas should be streamed step by step"
    assert any(c["class_or_confidence"] == MASK_LABEL for c in partial[0][1])


def test_caption_and_keyword_arguments(client, tiny_pipeline, image):
    answer, _, stats = client.predict(image=image, api_name="/caption")  # settings default to the model's
    assert answer == tiny_pipeline.caption(str(EXAMPLES_DIR / "shapes_0.png"))
    assert "forward passes" in stats


def test_chat_is_multi_turn(client, tiny_pipeline, image):
    history, box, canvas, stats = client.predict({"text": "what color is the circle?", "files": [image]}, [],
                                                 *SETTINGS, api_name="/chat")
    assert box == {"text": "", "files": []} and "forward passes" in stats
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert [b["type"] for b in history[0]["content"]] == ["file", "text"]
    # Send the conversation back (files re-attached) with a follow-up that carries no image.
    resent = [{"role": m["role"], "content": [
        {"type": "file", "file": gradio_client.handle_file(b["file"])} if b["type"] == "file" else b
        for b in m["content"]]} for m in history]
    history2, *_ = client.predict({"text": "how many shapes are there?", "files": []}, resent, *SETTINGS,
                                  api_name="/chat")
    assert [m["role"] for m in history2] == ["user", "assistant", "user", "assistant"]
    path = str(EXAMPLES_DIR / "shapes_0.png")
    expected = tiny_pipeline.chat([
        {"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "what color is the circle?"}]},
        {"role": "assistant", "content": history[1]["content"][0]["text"]},
        {"role": "user", "content": "how many shapes are there?"},
    ], sampler="llada", steps=4, gen_length=8, block_length=8)
    assert history2[-1]["content"][0]["text"] == expected


def test_draw_returns_the_decoded_image(client, tiny_pipeline):
    path, stats = client.predict("a large red circle at the center.", 4, 1.0, 0, 1, api_name="/draw")
    size = tiny_pipeline.model.image_tokenizer.config.image_size
    with Image.open(path) as im:
        assert im.size == (size, size)
        drawn = im.convert("RGB").tobytes()
    assert drawn == tiny_pipeline.generate_image("a large red circle at the center.", steps=4, guidance_scale=1.0,
                                                 seed=0).tobytes()
    assert stats.startswith("**4** forward passes")


def test_draw_with_candidates_shows_the_pick_and_its_scores(client, tiny_pipeline):
    path, stats = client.predict("a large red circle at the center.", 4, 1.0, 0, 3, api_name="/draw")
    with Image.open(path) as im:
        drawn = im.convert("RGB").tobytes()
    want = tiny_pipeline.generate_image("a large red circle at the center.", steps=4, guidance_scale=1.0, seed=0,
                                        candidates=3)
    assert drawn == want.tobytes()
    (scores,) = tiny_pipeline.last_image_scores
    assert stats.endswith("best of **3** drawings (reading scores " + ", ".join(f"{x:.1f}" for x in scores) + ")")


@pytest.mark.parametrize(
    "api_name, args, message",
    [
        ("/ask", ("{img}", "q", "llada", 0, 8, 8, 0.9, 0.0, 0.0), "steps must be a positive integer, got 0."),
        ("/ask", ("{img}", "q", "llada", 4, 8, 3, 0.9, 0.0, 0.0),
         "gen_length (8) must be a multiple of block_length (3)."),
        ("/ask", (None, "q", *SETTINGS), "no image"),
        ("/ask", ("{img}", "  ", *SETTINGS), "the question is empty"),
        ("/ask", ("{txt}", "q", *SETTINGS), "'notes.txt' is not an image"),
        ("/ask", ("{img}", "q", "llada", "many", 8, 8, 0.9, 0.0, 0.0), "steps must be a number, got 'many'"),
        ("/ask", ("{img}", "q", "turbo", *SETTINGS[1:]), "unknown sampler 'turbo'"),
        ("/caption", (None, *SETTINGS), "no image"),
        ("/chat", ({"text": "hi", "files": []}, [], *SETTINGS), "no image in the conversation"),
        ("/chat", ({"text": "hi", "files": ["{txt}"]}, [], *SETTINGS), "'notes.txt' is not an image"),
        ("/chat", ({"text": "", "files": ["{img}"]}, [], *SETTINGS), "the question is empty"),
        ("/draw", ("", 4, 1.0, 0, 1), "the prompt is empty"),
        ("/draw", ("a circle", 0, 1.0, 0, 1), "steps must be a positive integer, got 0."),
        ("/draw", ("a circle", 4, 1.0, 0, 2.5), "candidates must be a whole number, got 2.5"),
    ],
)
def test_bad_input_shows_a_message_and_the_server_keeps_serving(client, image, tmp_path, api_name, args, message):
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")

    def fill(a):
        if a == "{img}":
            return image
        if a == "{txt}":
            return gradio_client.handle_file(str(txt))
        if isinstance(a, dict):
            return {**a, "files": [fill(f) for f in a["files"]]}
        return a

    with pytest.raises(Exception) as info:
        client.predict(*[fill(a) for a in args], api_name=api_name)
    assert type(info.value).__name__ == "AppError" and message in str(info.value)
    assert client.predict(image, "q", *SETTINGS, api_name="/ask")[0] is not None


def test_huge_uploads_are_refused(served, client, image, tmp_path):
    demo, _ = served
    response = httpx.post(demo.local_url + "gradio_api/upload",
                          files={"files": ("big.png", os.urandom(6 * 1024 * 1024), "image/png")}, timeout=60)
    assert response.status_code == 413
    assert client.predict(image, "q", *SETTINGS, api_name="/ask")[0] is not None


def test_history_and_canvas_helpers():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/a.png"}}, {"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
        {"role": "user", "content": "more"},
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": [{"type": "image", "image": "/a.png"}, {"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": [{"type": "text", "text": "q2"}, {"type": "text", "text": "more"}]},
    ]
    partial = StreamState(text="ab░", segments=[("ab", False), ("░", True)], masked=1)
    assert canvas_value(partial) == [("ab", None), ("░", MASK_LABEL)]
    assert canvas_value(StreamState(text="abc", done=True)) == [("abc", None)]


def test_bundled_examples_are_small_shapes_images():
    manifest = load_examples()
    assert len(manifest["examples"]) >= 4 and manifest["draw_prompts"]
    for ex in manifest["examples"]:
        assert os.path.getsize(ex["path"]) < 8_000
        with Image.open(ex["path"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"


def test_launch_refuses_to_share(tiny_pipeline):
    with pytest.raises(ValueError, match="share"):
        launch(pipeline=tiny_pipeline, share=True, prevent_thread_lock=True)
    assert isinstance(build_demo(tiny_pipeline), gr.Blocks)


def test_shapes_tiny_demo_answers_the_examples(shapes_tiny_reader):
    demo, client = serve(shapes_tiny_reader)
    try:
        for ex in load_examples()["examples"]:
            answer, _, _ = client.predict(gradio_client.handle_file(ex["path"]), ex["question"], api_name="/ask")
            assert answer == ex["answer"], ex
    finally:
        demo.close()
