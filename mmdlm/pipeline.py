"""MMDLMPipeline: the user-facing API (answer / caption / chat / generate_image, streaming variants and per-call
statistics) on top of a loaded model, its processor and its generation config."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from .data.shapes import CAPTION_PROMPT
# BUNDLED_MODELS, resolve_model_path, MASK_GLYPH and the state classes are also importable from here, where they
# lived before the model-folder and streaming code got their own modules.
from .model_files import BUNDLED_MODELS, load_generation_defaults, load_processor, resolve_model_path  # noqa: F401
from .streaming import (  # noqa: F401
    MASK_GLYPH,
    ForwardCounter,
    GenerationStats,
    ImageStreamState,
    StreamState,
    render_partial_image,
    render_partial_text,
    run_streaming,
)

SAMPLING_OPTIONS = (
    "sampler", "steps", "gen_length", "block_length", "temperature", "remasking", "cfg_scale", "threshold", "cache",
)
# Prompts longer than this many characters are refused before tokenization (which would be slow on huge strings).
MAX_QUESTION_CHARS = 20_000


def _is_batch(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _check_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"the {what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"the {what} is empty; type a {what}")
    if len(text) > MAX_QUESTION_CHARS:
        raise ValueError(f"the {what} is {len(text):,} characters long; the limit is {MAX_QUESTION_CHARS:,}")
    return text


class MMDLMPipeline:
    """Ask questions about images, caption them, chat, and draw — one masked-diffusion model behind it all.

    >>> import mmdlm
    >>> pipe = mmdlm.load("shapes-tiny")
    >>> pipe.answer("shapes.png", "what color is the circle?")
    'red'

    Sampling options (``sampler``, ``steps``, ``gen_length``, ``block_length``, ``temperature``, ``remasking``,
    ``cfg_scale``, ``threshold``, ``cache``) default to the model's generation config and can be overridden per call.
    After each call ``last_stats`` holds a :class:`GenerationStats`; after ``generate_image`` with candidates,
    ``last_image_scores`` holds each prompt's candidate scores (``None`` after a call without).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, generation_config: Any = None) -> None:
        from .generation_config import MMDLMGenerationConfig

        self.model = model.eval()
        self.processor = processor
        self.generation_config = generation_config if generation_config is not None else MMDLMGenerationConfig()
        self.last_stats: GenerationStats | None = None
        self.last_image_scores: list[list[float]] | None = None
        # One generation at a time: streams run the sampler in a worker thread.
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = "shapes-tiny",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> "MMDLMPipeline":
        """Load a bundled model by name (``"shapes-tiny"``) or a local folder (mmdlm, LLaDA, LLaDA-V or MMaDA
        layout) onto ``device`` (default: CUDA when available, else CPU) in ``dtype`` (default: the checkpoint's)."""
        from .checkpoints import load_checkpoint

        path = resolve_model_path(name_or_path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
            dtype = getattr(torch, dtype)
        model, tokenizer, info = load_checkpoint(path, dtype=dtype, device=device)
        processor = load_processor(path, tokenizer, model)
        gen_config = load_generation_defaults(path, info, model)
        return cls(model, processor, gen_config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def can_understand_images(self) -> bool:
        return bool(self.model.config.can_understand_images)

    @property
    def can_draw_images(self) -> bool:
        return bool(self.model.config.can_draw_images)

    # ---------------------------------------------------------------------------------------------------------------
    # text answers

    def answer(self, image: Any, question: str | Sequence[str], **sampling: Any) -> str | list[str]:
        """Answer ``question`` about ``image`` (path, PIL image or numpy array). Lists of images and questions
        (equal lengths; one question is reused for every image) give a list of answers, decoded as one batch."""
        conversations, batched = self._vqa_conversations(image, question)
        answers = self._generate_text(conversations, sampling)
        return answers if batched else answers[0]

    def caption(self, image: Any, **sampling: Any) -> str | list[str]:
        """Describe ``image`` (or each image of a list) with the model's caption instruction."""
        return self.answer(image, CAPTION_PROMPT, **sampling)

    def chat(self, messages: Sequence[dict], **sampling: Any) -> str:
        """Continue a conversation in transformers-5 message format and return the assistant's reply.

        ``messages`` is a list of ``{"role": "user"|"assistant"|"system", "content": str | [blocks]}`` with blocks
        ``{"type": "image", "image": <path | PIL | array>}`` and ``{"type": "text", "text": ...}``.
        """
        return self._generate_text([self._check_messages(messages)], sampling)[0]

    def stream_answer(self, image: Any, question: str, **sampling: Any) -> Iterator[StreamState]:
        """Like :meth:`answer` for one image, yielding a :class:`StreamState` after every denoising step."""
        conversations, batched = self._vqa_conversations(image, question)
        if batched:
            raise ValueError("stream_answer takes one image and one question; use answer() for batches")
        return self._stream_text(conversations, sampling)

    def stream_chat(self, messages: Sequence[dict], **sampling: Any) -> Iterator[StreamState]:
        """Like :meth:`chat`, yielding a :class:`StreamState` after every denoising step."""
        return self._stream_text([self._check_messages(messages)], sampling)

    # ---------------------------------------------------------------------------------------------------------------
    # images

    def generate_image(
        self,
        prompt: str | Sequence[str],
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        temperature: float = 1.0,
        candidates: int | None = None,
    ) -> Image.Image | list[Image.Image]:
        """Draw ``prompt`` (or each prompt of a list) with MaskGIT decoding (a causal model, e.g. the AR twin, draws
        code by code and ignores ``steps``); ``seed`` makes it reproducible.

        ``candidates`` = N > 1 (default: the generation config's ``image_candidates``, 1) draws N images of each
        prompt and keeps the one the model itself reads back best: the highest ELBO of the prompt as the image's
        caption (:func:`mmdlm.reading_score.caption_log_likelihoods`). It costs N drawings plus one batched forward
        pass per drawing, and needs a model that also reads images.
        """
        prompts, batched = (list(prompt), True) if _is_batch(prompt) else ([prompt], False)
        n = self._image_candidates(candidates)
        self.last_image_scores = None
        if n == 1:
            images = self._generate_images(prompts, steps, guidance_scale, seed, temperature, callback=None)
            return images if batched else images[0]
        from .reading_score import caption_log_likelihoods

        start = time.perf_counter()
        repeated = [p for p in prompts for _ in range(n)]
        drawn = self._generate_images(repeated, steps, guidance_scale, seed, temperature, callback=None)
        with self._lock, ForwardCounter(self.model) as calls:
            scores = caption_log_likelihoods(self.model, self.processor, drawn, [p.strip() for p in repeated])
        best = [max(range(i * n, (i + 1) * n), key=scores.__getitem__) for i in range(len(prompts))]
        images = [drawn[i] for i in best]
        passes, tokens = self.last_stats.forward_passes + calls.count, self.last_stats.tokens
        self.last_stats = GenerationStats(forward_passes=passes, tokens=tokens, tokens_per_forward=tokens / passes,
                                          seconds=time.perf_counter() - start, batch_size=len(prompts))
        self.last_image_scores = [scores[i * n:(i + 1) * n] for i in range(len(prompts))]
        return images if batched else images[0]

    def _image_candidates(self, candidates: int | None) -> int:
        n = candidates if candidates is not None else getattr(self.generation_config, "image_candidates", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"candidates must be a whole number >= 1 (drawings per prompt), got {n!r}")
        if n > 1 and not self.can_understand_images:
            raise ValueError("candidates > 1 keeps the drawing the model reads back best, and this model cannot read "
                             "images (no vision tower); use candidates=1")
        return n

    def stream_image(
        self,
        prompt: str,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        temperature: float = 1.0,
    ) -> Iterator[ImageStreamState]:
        """Like :meth:`generate_image` for one prompt, yielding the partly decoded image (unknown tokens gray)."""
        if _is_batch(prompt):
            raise ValueError("stream_image takes one prompt; use generate_image() for batches")
        self._check_can_draw()
        _check_text(prompt, "prompt")
        return self._stream_image(prompt, steps, guidance_scale, seed, temperature)

    def _stream_image(self, prompt: str, steps: int | None, guidance_scale: float | None, seed: int | None,
                      temperature: float) -> Iterator[ImageStreamState]:
        grid = self._image_grid()

        def run(emit: Callable[[Any], None]) -> list[Image.Image]:
            def on_step(step: int, codes: torch.Tensor) -> None:
                image, unknown = render_partial_image(codes[0], grid, self.model.image_tokenizer, self.device)
                emit(ImageStreamState(image=image, step=step, unknown=unknown))

            return self._generate_images([prompt], steps, guidance_scale, seed, temperature, on_step)

        last_step = -1
        for item in run_streaming(run, self._lock):
            if isinstance(item, ImageStreamState):
                last_step = item.step
                yield item
            else:
                yield ImageStreamState(image=item[0], step=last_step, unknown=0, done=True, stats=self.last_stats)

    # ---------------------------------------------------------------------------------------------------------------
    # internals: text

    def _vqa_conversations(self, image: Any, question: Any) -> tuple[list[list[dict]], bool]:
        if image is None or (_is_batch(image) and len(image) == 0):
            raise ValueError("no image given; pass an image path, a PIL image or a numpy array")
        if not self.can_understand_images:
            raise ValueError("this model has no vision tower, so it cannot answer questions about images")
        batched = _is_batch(image) or _is_batch(question)
        images = list(image) if _is_batch(image) else [image]
        questions = list(question) if _is_batch(question) else [question]
        if len(questions) == 1 and len(images) > 1:
            questions = questions * len(images)
        if len(images) == 1 and len(questions) > 1:
            images = images * len(questions)
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions; pass one question per image")
        from .vision.image_processing import load_image

        conversations = []
        for img, q in zip(images, questions):
            _check_text(q, "question")
            if img is None:
                raise ValueError("no image given; pass an image path, a PIL image or a numpy array")
            content = [{"type": "image", "image": load_image(img)}, {"type": "text", "text": q.strip()}]
            conversations.append([{"role": "user", "content": content}])
        return conversations, batched

    def _check_messages(self, messages: Any) -> list[dict]:
        from .vision.image_processing import load_image

        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
            if m["role"] not in ("user", "assistant", "system"):
                raise ValueError(f"message {i} has role {m['role']!r}; use 'user', 'assistant' or 'system'")
            content = m["content"]
            if isinstance(content, str):
                out.append({"role": m["role"], "content": content})
                continue
            blocks = []
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "image":
                    src = next((block[k] for k in ("image", "path", "url") if block.get(k) is not None), None)
                    if src is None:
                        raise ValueError(f"message {i} has an image block without an image")
                    if isinstance(src, str) and src.startswith(("http://", "https://")):
                        raise ValueError("image URLs are not fetched (mmdlm works offline); download the file first")
                    if not self.can_understand_images:
                        raise ValueError("this model has no vision tower, so it cannot read images")
                    blocks.append({"type": "image", "image": load_image(src)})
                elif kind == "text":
                    blocks.append({"type": "text", "text": str(block.get("text", ""))})
                else:
                    raise ValueError(f"message {i} has a content block of type {kind!r}; use 'image' or 'text'")
            out.append({"role": m["role"], "content": blocks})
        if out[-1]["role"] != "user":
            raise ValueError("the last message must come from the user (the model answers it)")
        last = out[-1]["content"]
        last_text = last if isinstance(last, str) else "".join(b["text"] for b in last if b["type"] == "text")
        if not last_text.strip() and not (isinstance(last, list) and any(b["type"] == "image" for b in last)):
            raise ValueError("the last user message is empty; type a question")
        if len(last_text) > MAX_QUESTION_CHARS:
            raise ValueError(f"the question is {len(last_text):,} characters long; the limit is {MAX_QUESTION_CHARS:,}")
        return out

    def _sampling_options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The caller's sampling overrides (None = "use the generation config"); the samplers merge in the rest."""
        unknown = sorted(set(overrides) - set(SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}; valid options: {', '.join(SAMPLING_OPTIONS)}")
        options = {k: v for k, v in overrides.items() if v is not None}
        sampler = options.get("sampler", getattr(self.generation_config, "sampler", "fast"))
        if sampler == "llada":  # the reference sampler has no cache and commits a fixed number per step
            options.pop("threshold", None)
            options.pop("cache", None)
        return options

    def _gen_length(self, options: dict[str, Any]) -> int:
        value = options.get("gen_length", getattr(self.generation_config, "gen_length", 0))
        return value if isinstance(value, int) else 0

    def _encode(self, conversations: list[list[dict]], gen_length: int) -> dict[str, Any]:
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        inputs = {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in dict(inputs).items()}
        if isinstance(inputs.get("pixel_values"), list):
            inputs["pixel_values"] = [p.to(self.device) for p in inputs["pixel_values"]]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        prompt_len = inputs["input_ids"].shape[1]
        if limit and prompt_len + int(gen_length) > limit:
            raise ValueError(
                f"the prompt is {prompt_len} tokens and the answer {int(gen_length)} tokens, more than the model's "
                f"{limit}-token context; shorten the question (or the conversation) or lower gen_length"
            )
        return inputs

    def _run_text(self, conversations: list[list[dict]], sampling: dict[str, Any], callback: Callable | None):
        """Encode, sample and decode; returns (answers, stats)."""
        from .sampling import generate

        options = self._sampling_options(sampling)
        start = time.perf_counter()
        inputs = self._encode(conversations, self._gen_length(options))
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs.pop("attention_mask", None)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: let the samplers take their unpadded path
        extra = {k: inputs[k] for k in ("pixel_values", "image_sizes") if inputs.get(k) is not None}
        with torch.no_grad():
            out = generate(self.model, input_ids, attention_mask, generation_config=self.generation_config,
                           callback=callback, **extra, **options)
        prompt_len = input_ids.shape[1]
        answers = self.processor.batch_decode_answers(out.sequences, prompt_len)
        seconds = time.perf_counter() - start
        gen = out.sequences.shape[1] - prompt_len
        nfe = int(out.nfe or 0)
        stats = GenerationStats(forward_passes=nfe, tokens=gen, tokens_per_forward=(gen / nfe if nfe else 0.0),
                                seconds=seconds, batch_size=input_ids.shape[0])
        return answers, stats

    def _generate_text(self, conversations: list[list[dict]], sampling: dict[str, Any]) -> list[str]:
        with self._lock:
            answers, stats = self._run_text(conversations, sampling, None)
        self.last_stats = stats
        return answers

    def _stream_text(self, conversations: list[list[dict]], sampling: dict[str, Any]) -> Iterator[StreamState]:
        options = self._sampling_options(sampling)  # fail fast, before the worker starts
        gen_length = self._gen_length(options)

        def run(emit: Callable[[Any], None]) -> Any:
            calls = ForwardCounter(self.model)

            def on_step(step: int, x: torch.Tensor) -> None:
                emit(render_partial_text(x[0, x.shape[1] - gen_length:], step, calls.count,
                                         config=self.model.config, tokenizer=self.processor.tokenizer))

            with calls:
                return self._run_text(conversations, sampling, on_step)

        def states() -> Iterator[StreamState]:
            last_step = -1
            for item in run_streaming(run, self._lock):
                if isinstance(item, StreamState):
                    last_step = item.step
                    yield item
                else:
                    answers, stats = item
                    self.last_stats = stats
                    text = answers[0]
                    yield StreamState(text=text, segments=[(text, False)] if text else [], step=last_step,
                                      nfe=stats.forward_passes, masked=0, done=True, stats=stats)

        return states()

    # ---------------------------------------------------------------------------------------------------------------
    # internals: images

    def _check_can_draw(self) -> None:
        if not self.can_draw_images:
            raise ValueError("this model cannot draw images (it has no image tokenizer); use a text-to-image model")

    def _image_grid(self) -> tuple[int, int]:
        h, w = self.model.image_tokenizer.grid_size
        return int(h), int(w)

    def _generate_images(self, prompts: list[str], steps: int | None, guidance_scale: float | None,
                         seed: int | None, temperature: float, callback: Callable | None) -> list[Image.Image]:
        """Sample image codes for each prompt and decode them; holds the lock unless called from a stream."""
        from .sampling.autoregressive import generate_image_tokens_autoregressive
        from .sampling.maskgit import generate_image_tokens

        self._check_can_draw()
        if not prompts:
            raise ValueError("no prompt given; pass a text prompt")
        for p in prompts:
            _check_text(p, "prompt")
        gc = self.generation_config
        steps = steps if steps is not None else getattr(gc, "image_steps", 16)
        guidance_scale = guidance_scale if guidance_scale is not None else getattr(gc, "guidance_scale", 3.5)
        h, w = self._image_grid()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        start = time.perf_counter()
        with (self._lock if callback is None else contextlib.nullcontext()), torch.no_grad():
            calls = ForwardCounter(self.model)
            with calls:
                prompt_ids = self.processor.build_t2i_prompt([p.strip() for p in prompts])
                if getattr(self.model.config, "is_causal", False):  # an AR twin draws code by code; steps unused
                    codes = generate_image_tokens_autoregressive(
                        self.model, prompt_ids, h * w, guidance_scale=guidance_scale, temperature=temperature,
                        generator=generator, callback=callback,
                    )
                else:
                    codes = generate_image_tokens(
                        self.model, prompt_ids, h * w, steps=steps, guidance_scale=guidance_scale,
                        temperature=temperature, generator=generator, callback=callback,
                    )
            images = self.model.image_tokenizer.to_pil(self.model.image_tokenizer.decode(codes.view(-1, h, w)))
        passes = calls.count
        self.last_stats = GenerationStats(forward_passes=passes, tokens=h * w,
                                          tokens_per_forward=h * w / passes if passes else 0.0,
                                          seconds=time.perf_counter() - start, batch_size=len(prompts))
        return images
