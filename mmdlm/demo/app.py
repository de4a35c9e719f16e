"""The local web demo (Gradio 6): multimodal chat, ask/caption and drawing, with the denoising canvas streamed live."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr
from PIL import Image

from ..pipeline import MASK_GLYPH, GenerationStats, MMDLMPipeline, StreamState
from ..vision.image_processing import ImageLoadError, load_image

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
MAX_FILE_SIZE = "5mb"  # uploads above this are refused by the server before they reach the model
QUEUE_MAX_SIZE = 16
MASK_LABEL = "masked"
# Errors that mean "the input is wrong": shown to the user as they are, without an "internal error" prefix.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)
# System fonts only: Gradio's default theme would fetch Google Fonts, and the demo makes no outbound connections.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)
CSS = """
#canvas .textspan { font-family: ui-monospace, monospace; }
"""
INTRO = """# mmdlm — multimodal masked-diffusion demo
Answers are not written left to right: the model starts from a fully **masked** answer and unmasks tokens in
parallel over a few denoising steps. Watch the canvas below each answer (gray boxes are still-masked tokens)."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _user_errors(fn: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """Turn exceptions from a streaming handler into ``gr.Error`` popups; the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator:
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as e:
            raise gr.Error(_one_line(e), title="Invalid input", print_exception=False) from None
        except Exception as e:  # noqa: BLE001
            logger.exception("generation failed")
            raise gr.Error(f"generation failed: {type(e).__name__}: {_one_line(e)}", title="Error") from None

    return wrapper


def format_stats(stats: GenerationStats | None) -> str:
    """One Markdown line: forward passes, tokens per forward pass and seconds."""
    if stats is None:
        return ""
    return (f"**{stats.forward_passes}** forward passes · **{stats.tokens_per_forward:.2f}** tokens per forward "
            f"· **{stats.seconds:.2f}** s")


def canvas_value(state: StreamState) -> list[tuple[str, str | None]]:
    """HighlightedText value of a partial answer: committed text unlabelled, each masked token labelled."""
    if state.done:
        return [(state.text, None)] if state.text else []
    return [(text, MASK_LABEL if masked else None) for text, masked in state.segments]


def load_examples() -> dict[str, Any]:
    """The bundled examples manifest with absolute image paths (empty lists when it is missing)."""
    path = EXAMPLES_DIR / "examples.json"
    if not path.is_file():
        return {"examples": [], "draw_prompts": []}
    manifest = json.loads(path.read_text())
    for ex in manifest["examples"]:
        ex["path"] = str(EXAMPLES_DIR / ex["image"])
    return manifest


def _number(x: Any, name: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {x!r}") from None


def _whole(x: Any, name: str) -> int:
    value = _number(x, name)
    if value != int(value):
        raise ValueError(f"{name} must be a whole number, got {x!r}")
    return int(value)


def _sampling(sampler: str, steps: Any, gen_length: Any, block_length: Any, threshold: Any, temperature: Any,
              cfg_scale: Any) -> dict[str, Any]:
    """Sampler options from raw UI values; range checks are left to the samplers, whose messages reach the user."""
    return {
        "sampler": sampler,
        "steps": _whole(steps, "steps"),
        "gen_length": _whole(gen_length, "gen_length"),
        "block_length": _whole(block_length, "block_length"),
        "threshold": _number(threshold, "threshold") if sampler == "fast" else None,
        "temperature": _number(temperature, "temperature"),
        "cfg_scale": _number(cfg_scale, "cfg_scale"),
    }


def load_upload(item: Any) -> Image.Image:
    """An uploaded file (Gradio's raw file payload) as an RGB image; errors name the file as the user knows it."""
    path = _file_path(item)
    if not path:
        raise ValueError("no image; upload an image first")
    name = (item.get("orig_name") if isinstance(item, dict) else None) or os.path.basename(path)
    try:
        return load_image(path)
    except ImageLoadError as e:
        raise ImageLoadError(str(e).replace(repr(str(path)), repr(name))) from None


def _file_path(item: Any) -> str | None:
    """The server path of an uploaded file in any of the shapes Gradio hands over."""
    if item is None:
        return None
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "path" in item:
            return item["path"]
        if isinstance(item.get("file"), dict):
            return item["file"].get("path")
    return getattr(item, "path", None)


def history_to_messages(history: list[dict]) -> list[dict]:
    """Gradio 6 chat history (content = list of text/file blocks) -> transformers-5 messages with image blocks."""
    messages: list[dict] = []
    for m in history or []:
        role = m.get("role")
        if role not in ("user", "assistant"):
            continue
        content = m.get("content")
        items = content if isinstance(content, list) else [content]
        blocks = []
        for c in items:
            if isinstance(c, str):
                blocks.append({"type": "text", "text": c})
            elif isinstance(c, dict) and c.get("type") == "text":
                blocks.append({"type": "text", "text": c.get("text", "")})
            elif _file_path(c):
                blocks.append({"type": "image", "image": _file_path(c)})
        if messages and messages[-1]["role"] == role:  # Gradio may split one turn into several bubbles
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})
    return messages


def build_demo(pipeline: MMDLMPipeline) -> gr.Blocks:
    """The demo's ``gr.Blocks`` for ``pipeline``; events are named /chat, /ask, /caption and /draw."""
    gc = pipeline.generation_config
    manifest = load_examples()

    def gc_get(name: str, default: Any) -> Any:
        value = getattr(gc, name, None)
        return default if value is None else value

    with gr.Blocks(title="mmdlm demo", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)

        with gr.Accordion("Sampler settings", open=False):
            with gr.Row():
                sampler = gr.Radio(["fast", "llada"], value=gc_get("sampler", "fast"), label="Sampler",
                                   info="fast: caches + parallel commits; llada: reference")
                steps = gr.Slider(1, max(256, int(gc_get("steps", 32))), value=int(gc_get("steps", 32)), step=1,
                                  label="Denoising steps")
                gen_length = gr.Slider(1, max(512, int(gc_get("gen_length", 32))), step=1,
                                       value=int(gc_get("gen_length", 32)), label="Generation length (tokens)")
                block_length = gr.Slider(1, max(512, int(gc_get("block_length", 32))), step=1,
                                         value=int(gc_get("block_length", 32)),
                                         label="Block length", info="must divide the generation length")
            with gr.Row():
                threshold = gr.Slider(0.0, 1.0, value=float(gc_get("threshold", 0.9)), step=0.01,
                                      label="Confidence threshold (fast sampler)")
                temperature = gr.Slider(0.0, 2.0, value=float(gc_get("temperature", 0.0)), step=0.05,
                                        label="Temperature", info="0 = greedy")
                cfg_scale = gr.Slider(0.0, 5.0, value=float(gc_get("cfg_scale", 0.0)), step=0.1,
                                      label="Classifier-free guidance (text)")
        settings = [sampler, steps, gen_length, block_length, threshold, temperature, cfg_scale]

        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chatbot",
                                     placeholder="Upload an image and ask about it.")
                chat_box = gr.MultimodalTextbox(
                    file_types=["image"], file_count="multiple", sources=["upload"], elem_id="chat-input",
                    placeholder="Attach an image (clip icon), type a question, press Enter", show_label=False,
                )
                chat_canvas = gr.HighlightedText(label="Denoising canvas", color_map={MASK_LABEL: "#9ca3af"},
                                                 elem_id="canvas", show_legend=False)
                chat_stats = gr.Markdown(elem_id="chat-stats", label="Statistics")
                clear = gr.Button("Clear conversation", size="sm")
                if manifest["examples"]:
                    gr.Examples([[{"text": e["question"], "files": [e["path"]]}] for e in manifest["examples"]],
                                inputs=[chat_box], label="Examples")

            with gr.Tab("Ask & caption", id="ask"):
                with gr.Row():
                    with gr.Column():
                        ask_image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                               elem_id="ask-image", height=256)
                        question = gr.Textbox(label="Question", placeholder="what color is the circle?",
                                              elem_id="ask-question", max_length=2000)
                        with gr.Row():
                            ask_btn = gr.Button("Ask", variant="primary", elem_id="ask-button")
                            caption_btn = gr.Button("Caption", elem_id="caption-button")
                    with gr.Column():
                        answer_box = gr.Textbox(label="Answer", interactive=False, elem_id="ask-answer")
                        ask_canvas = gr.HighlightedText(label="Denoising canvas", color_map={MASK_LABEL: "#9ca3af"},
                                                        show_legend=False)
                        ask_stats = gr.Markdown(elem_id="ask-stats", label="Statistics")
                if manifest["examples"]:
                    gr.Examples([[e["path"], e["question"]] for e in manifest["examples"]],
                                inputs=[ask_image, question], label="Examples")

            with gr.Tab("Draw", id="draw", visible=pipeline.can_draw_images):
                with gr.Row():
                    with gr.Column():
                        prompt_box = gr.Textbox(label="Prompt", placeholder="a large red circle at the center.",
                                            elem_id="draw-prompt", max_length=2000)
                        image_steps = gr.Slider(1, 64, value=int(gc_get("image_steps", 16)), step=1,
                                                label="Image decoding steps")
                        guidance = gr.Slider(0.0, 10.0, value=float(gc_get("guidance_scale", 3.5)), step=0.1,
                                             label="Guidance scale")
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        candidates = gr.Slider(1, 8, value=int(gc_get("image_candidates", 1)), step=1,
                                               label="Candidates (keep the drawing the model reads back best)",
                                               visible=pipeline.can_understand_images)
                        draw_btn = gr.Button("Draw", variant="primary", elem_id="draw-button")
                    with gr.Column():
                        drawn = gr.Image(label="Image (gray = not yet decoded)", type="pil", format="png",
                                         interactive=False, height=256, elem_id="draw-output")
                        draw_stats = gr.Markdown(elem_id="draw-stats", label="Statistics")
                if manifest["draw_prompts"]:
                    gr.Examples([[p] for p in manifest["draw_prompts"]], inputs=[prompt_box], label="Examples")

        # ----------------------------------------------------------------------------------------- handlers
        # Events run with preprocess=False: handlers get Gradio's raw payloads (file dicts, plain numbers) so that
        # every check is ours or the samplers' and its message reaches the user unchanged. Gradio still refuses
        # file paths outside its upload cache before a handler runs.
        @_user_errors
        def chat_fn(message: dict | None, history: list[dict], sampler: str, steps: float, gen_length: float,
                    block_length: float, threshold: float, temperature: float, cfg_scale: float):
            message = message or {}
            text = (message.get("text") or "").strip()
            files = [f for f in message.get("files") or [] if _file_path(f)]
            if not text:
                raise ValueError("the question is empty; type a question")
            images = [load_upload(f) for f in files]
            history = list(history or [])
            messages = history_to_messages(history)
            new_turn = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": new_turn})
            if pipeline.can_understand_images and not any(
                b["type"] == "image" for m in messages for b in m["content"]
            ):
                raise ValueError("no image in the conversation; attach an image to your message")
            options = _sampling(sampler, steps, gen_length, block_length, threshold, temperature, cfg_scale)
            stream = pipeline.stream_chat(messages, **options)
            state = next(stream)  # errors (bad settings, unreadable image) surface before the UI changes
            history.append({"role": "user", "content": [{"path": _file_path(f)} for f in files] + [text]})
            history.append({"role": "assistant", "content": state.text})
            while True:
                history[-1] = {"role": "assistant", "content": state.text}
                yield history, None, canvas_value(state), format_stats(state.stats)
                if state.done:
                    return
                state = next(stream)

        @_user_errors
        def ask_fn(image: dict | None, question: str, sampler: str, steps: float, gen_length: float,
                   block_length: float, threshold: float, temperature: float, cfg_scale: float):
            options = _sampling(sampler, steps, gen_length, block_length, threshold, temperature, cfg_scale)
            yield from _stream_answer(pipeline.stream_answer(load_upload(image), question or "", **options))

        @_user_errors
        def caption_fn(image: dict | None, sampler: str, steps: float, gen_length: float, block_length: float,
                       threshold: float, temperature: float, cfg_scale: float):
            options = _sampling(sampler, steps, gen_length, block_length, threshold, temperature, cfg_scale)
            yield from _stream_answer(pipeline.stream_answer(load_upload(image), _caption_prompt(), **options))

        @_user_errors
        def draw_fn(prompt: str, image_steps: float, guidance_scale: float, seed: float | None,
                    candidates: float = 1):
            seed_int = None if seed is None else _whole(seed, "seed")
            n = _whole(candidates, "candidates")
            if n > 1:  # no live canvas: the pick needs every finished drawing
                image = pipeline.generate_image(prompt or "", steps=_whole(image_steps, "image_steps"),
                                                guidance_scale=_number(guidance_scale, "guidance_scale"),
                                                seed=seed_int, candidates=n)
                (scores,) = pipeline.last_image_scores
                yield image, (f"{format_stats(pipeline.last_stats)} · best of **{n}** drawings (reading scores "
                              + ", ".join(f"{x:.1f}" for x in scores) + ")")
                return
            for state in pipeline.stream_image(prompt or "", steps=_whole(image_steps, "image_steps"),
                                               guidance_scale=_number(guidance_scale, "guidance_scale"), seed=seed_int):
                progress = f"step {state.step + 1}: {state.unknown} image tokens left to decode"
                yield state.image, (format_stats(state.stats) if state.done else progress)

        chat_box.submit(chat_fn, [chat_box, chatbot, *settings], [chatbot, chat_box, chat_canvas, chat_stats],
                        api_name="chat", preprocess=False)
        clear.click(lambda: ([], None, [], ""), None, [chatbot, chat_box, chat_canvas, chat_stats],
                    api_visibility="private")
        ask_outputs = [answer_box, ask_canvas, ask_stats]
        ask_btn.click(ask_fn, [ask_image, question, *settings], ask_outputs, api_name="ask", preprocess=False)
        question.submit(ask_fn, [ask_image, question, *settings], ask_outputs, api_visibility="private",
                        preprocess=False)
        caption_btn.click(caption_fn, [ask_image, *settings], ask_outputs, api_name="caption", preprocess=False)
        draw_btn.click(draw_fn, [prompt_box, image_steps, guidance, seed, candidates], [drawn, draw_stats],
                       api_name="draw", preprocess=False)
    return demo


def _caption_prompt() -> str:
    from ..data.shapes import CAPTION_PROMPT

    return CAPTION_PROMPT


def _stream_answer(stream: Iterator[StreamState]) -> Iterator[tuple[str, list, str]]:
    for state in stream:
        shown = state.text if state.done else state.text.replace(MASK_GLYPH, "")
        yield shown, canvas_value(state), format_stats(state.stats)


def launch(
    model: str = "shapes-tiny",
    host: str = "127.0.0.1",
    port: int | None = 7860,
    device: str | None = None,
    pipeline: MMDLMPipeline | None = None,
    **kwargs: Any,
) -> gr.Blocks:
    """Load ``model`` (or use ``pipeline``), build the demo and serve it on ``host:port`` (this machine only by
    default; never shared, no analytics). Extra keyword arguments go to ``gr.Blocks.launch`` (e.g.
    ``prevent_thread_lock=True``); returns the running demo (``demo.local_url``, ``demo.close()``)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if kwargs.get("share"):
        raise ValueError("share=True would open a public tunnel; the mmdlm demo only serves locally")
    pipe = pipeline if pipeline is not None else MMDLMPipeline.from_pretrained(model, device=device)
    demo = build_demo(pipe)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    options = dict(server_name=host, server_port=port, share=False, max_file_size=MAX_FILE_SIZE, show_error=True,
                   ssr_mode=False, footer_links=["api"], allowed_paths=[str(EXAMPLES_DIR)], theme=THEME, css=CSS,
                   quiet=False)
    options.update(kwargs)
    demo.launch(**options)
    return demo
