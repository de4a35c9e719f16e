"""What a pipeline call reports: its cost (GenerationStats) and, when streamed, the partial states it yields, how a
partial canvas is rendered, and the worker thread that runs the sampler while the caller iterates."""

from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from PIL import Image

MASK_GLYPH = "░"  # how a still-masked token is shown in a partial answer


@dataclass
class GenerationStats:
    """What one call cost: ``forward_passes`` (network evaluations), ``tokens`` (positions decoded per row),
    ``tokens_per_forward`` (= tokens / forward_passes, > 1 means parallel decoding), ``seconds`` (wall clock)."""

    forward_passes: int
    tokens: int
    tokens_per_forward: float
    seconds: float
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamState:
    """One intermediate canvas of a text answer.

    ``text`` is the partial answer with every still-masked token shown as :data:`MASK_GLYPH`; ``segments`` splits
    it into ``(text, masked)`` runs for highlighting; ``masked`` counts the masked tokens left. The last state has
    ``done=True``, ``text`` equal to the final answer and ``stats`` set.
    """

    text: str
    segments: list[tuple[str, bool]] = field(default_factory=list)
    step: int = 0
    nfe: int = 0
    masked: int = 0
    done: bool = False
    stats: GenerationStats | None = None


@dataclass
class ImageStreamState:
    """One intermediate image: still-unknown image tokens are painted gray; ``done=True`` on the final image."""

    image: Image.Image
    step: int = 0
    unknown: int = 0
    done: bool = False
    stats: GenerationStats | None = None


class _Cancelled(Exception):
    """Raised inside a sampler callback when the consumer of a stream stopped listening."""


def render_partial_text(gen_ids: torch.Tensor, step: int, nfe: int, *, config: Any, tokenizer: Any) -> StreamState:
    """Decode committed tokens run by run; show masks as MASK_GLYPH and stop at the first committed end token."""
    cfg, tok = config, tokenizer
    stop_ids = {i for i in (cfg.eot_token_id, getattr(cfg, "eos_token_id", None), tok.eos_token_id) if i is not None}
    mask_id = cfg.mask_token_id
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    masked = 0

    def flush() -> None:
        if run:
            text = tok.decode(run, skip_special_tokens=True)
            if text:
                segments.append((text, False))
            run.clear()

    for t in gen_ids.tolist():
        if t == mask_id:
            flush()
            segments.append((MASK_GLYPH, True))
            masked += 1
        elif t in stop_ids:
            break
        else:
            run.append(t)
    flush()
    text = "".join(s for s, _ in segments).lstrip()
    return StreamState(text=text, segments=segments, step=step, nfe=nfe, masked=masked)


def render_partial_image(
    codes: torch.Tensor, grid: tuple[int, int], image_tokenizer: Any, device: Any
) -> tuple[Image.Image, int]:
    """Decode the known codes (the sampler marks unknown ones -1) and paint the unknown patches gray."""
    h, w = grid
    unknown = codes.reshape(h, w) < 0
    filled = codes.reshape(1, h, w).clamp(min=0)
    pixels = image_tokenizer.decode(filled.to(device))[0].float().cpu()
    _, H, W = pixels.shape
    cell = unknown.cpu().repeat_interleave(H // h, 0).repeat_interleave(W // w, 1)
    pixels[:, : cell.shape[0], : cell.shape[1]][:, cell] = 0.5
    return image_tokenizer.to_pil(pixels)[0], int(unknown.sum())


class ForwardCounter:
    """Counts the model's top-level forward calls while active (what a stream reports as forward passes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.count, self._handle = model, 0, None

    def _hook(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> "ForwardCounter":
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def run_streaming(run: Callable[[Callable[[Any], None]], Any], lock: threading.Lock) -> Iterator[Any]:
    """Run ``run(emit)`` in a worker thread (holding ``lock``) and yield what it emits, then its return value.

    Exceptions from the worker are re-raised here unchanged. If the consumer stops early, the next ``emit`` raises
    inside the worker so the sampler stops too.
    """
    items: queue.Queue = queue.Queue()
    stop = threading.Event()
    ITEM, DONE, ERROR = 0, 1, 2

    def emit(item: Any) -> None:
        if stop.is_set():
            raise _Cancelled()
        items.put((ITEM, item))

    def worker() -> None:
        try:
            with lock, torch.no_grad():  # grad mode is per thread
                result = run(emit)
            items.put((DONE, result))
        except _Cancelled:
            items.put((DONE, None))
        except BaseException as e:  # noqa: BLE001 — handed to the consumer thread
            items.put((ERROR, e))

    thread = threading.Thread(target=worker, name="mmdlm-stream", daemon=True)
    thread.start()
    try:
        while True:
            kind, payload = items.get()
            if kind == ERROR:
                raise payload
            yield payload
            if kind == DONE:
                return
    finally:
        stop.set()
        thread.join(timeout=60)
