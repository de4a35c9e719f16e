"""The training mixture: load every data source of a recipe, check its examples before training starts, and draw
batches deterministically from (seed, stage, step, micro-step, rank) so a resumed run sees the same data."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .data_recipe import DataRecipe
from .recipe import TASKS

IMAGE_TOKEN = "<image>"


@dataclass
class LoadedSource:
    """One source's examples, its sampling weight and what was skipped while loading it."""

    name: str
    examples: list[dict]
    weight: float
    skipped: list[str] = field(default_factory=list)


def source_label(src: Any, index: int) -> str:
    """A short human name for a source, used in messages: ``sources[1] (llava_json data/train.json)``."""
    where = getattr(src, "path", None) or getattr(src, "dir", None) or getattr(src, "split", "")
    return f"sources[{index}] ({src.type} {where})".replace(" )", ")")


def _load_text_file(path: Path, field_name: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    if path.suffix in (".json", ".jsonl"):
        raw = path.read_text(encoding="utf-8")
        try:
            records = json.loads(raw) if path.suffix == ".json" else [json.loads(x) for x in raw.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON{' Lines' if path.suffix == '.jsonl' else ''}: {e}") from e
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of records")
        texts = []
        for i, r in enumerate(records):
            text = r.get(field_name) if isinstance(r, dict) else r
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"record {i} of {path}: field {field_name!r} must be a non-empty string")
            texts.append(text)
    else:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"task": "text", "text": t} for t in texts]


def load_source(src: Any, on_missing: str = "error") -> tuple[list[dict], list[str]]:
    """Examples of one recipe source and the messages of entries skipped for a missing image."""
    if src.type == "shapes":
        from ..data.shapes import shapes_examples

        return shapes_examples(src.split, src.n, seed=src.seed, tasks=tuple(src.tasks),
                               question_types=src.question_types, objects=src.objects), []
    if src.type == "digits":
        from ..data.digits import digit_examples

        return digit_examples(src.split, tasks=tuple(src.tasks), augment=src.augment, seed=src.seed,
                              stroke=tuple(src.augment_stroke)), []
    if src.type == "llava_json":
        from ..data.loaders import load_llava_json

        examples = load_llava_json(src.path, src.image_folder, on_missing=on_missing)
        return list(examples), list(getattr(examples, "skipped", []))
    if src.type == "imagefolder":
        from ..data.loaders import load_imagefolder

        kwargs = {"prompt": src.prompt} if src.prompt is not None else {}
        return load_imagefolder(src.dir, task=src.task, split=src.split, text_column=src.text_column, **kwargs), []
    if src.type == "table":
        from ..data.loaders import load_table

        kwargs = {"prompt": src.prompt} if src.prompt is not None else {}
        return load_table(src.path, image_column=src.image_column, text_column=src.text_column, task=src.task,
                          image_root=src.image_root, question_column=src.question_column, **kwargs), []
    if src.type == "text":
        return _load_text_file(Path(src.path), src.field), []
    raise ValueError(f"unknown source type {src.type!r}")


def check_example(ex: Any, where: str) -> None:
    """Raise ValueError (naming ``where``) unless ``ex`` follows the example format of docs/architecture.md."""
    if not isinstance(ex, dict) or ex.get("task") not in TASKS:
        task = ex.get("task") if isinstance(ex, dict) else type(ex).__name__
        raise ValueError(f"{where}: 'task' must be one of {list(TASKS)}, got {task!r}")
    task = ex["task"]
    if task == "text":
        if not isinstance(ex.get("text"), str) or not ex["text"].strip():
            raise ValueError(f"{where}: a text example needs a non-empty 'text' string")
        return
    if task == "t2i":
        if not isinstance(ex.get("prompt"), str):
            raise ValueError(f"{where}: a t2i example needs a 'prompt' string")
        if ex.get("image") is None and ex.get("image_codes") is None:
            raise ValueError(f"{where}: a t2i example needs an 'image' (PIL) or precomputed 'image_codes'")
        return
    messages, images = ex.get("messages"), ex.get("images", [])
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: an understanding example needs a non-empty 'messages' list")
    if not isinstance(images, list):
        raise ValueError(f"{where}: 'images' must be a list of PIL images")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be a dict with a string 'content'")
        expected = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != expected:
            raise ValueError(
                f"{where}: message {i} has role {m.get('role')!r}, expected {expected!r}; turns must alternate "
                "user/assistant starting with user"
            )
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's answer (the training target)")
    n_slots = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n_slots != len(images):
        raise ValueError(
            f"{where}: {n_slots} '{IMAGE_TOKEN}' placeholder(s) but {len(images)} image(s); write one placeholder per image"
        )
    if any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] == "assistant"):
        raise ValueError(f"{where}: '{IMAGE_TOKEN}' may appear only in user turns")


def load_sources(sources: Sequence[Any], on_missing: str, kind: str = "sources") -> list[LoadedSource]:
    """Load and check every source; raises before training on an empty or malformed source."""
    loaded = []
    for i, src in enumerate(sources):
        label = source_label(src, i).replace("sources", kind, 1)
        try:
            examples, skipped = load_source(src, on_missing)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise type(e)(f"data.{label}: {e}") from e
        if not examples:
            raise ValueError(f"data.{label}: the source holds no examples; check its path/split/tasks")
        for j, ex in enumerate(examples):
            check_example(ex, f"data.{label} example {j}")
        loaded.append(LoadedSource(label, list(examples), float(src.weight), skipped))
    return loaded


class Mixture:
    """Weighted sampling over sources. Each example is drawn by first picking a (source, task) bucket with
    probability weight * share of that task in the source, then an example of the bucket uniformly."""

    def __init__(self, sources: list[LoadedSource], seed: int = 0) -> None:
        if not sources:
            raise ValueError("the mixture has no sources")
        self.sources = sources
        self.seed = int(seed)
        self.buckets: list[tuple[str, list[dict]]] = []
        self.bucket_sources: list[int] = []  # the index in `sources` of each bucket
        for i, s in enumerate(sources):
            by_task: dict[str, list[dict]] = {}
            for ex in s.examples:
                by_task.setdefault(ex["task"], []).append(ex)
            for task, exs in by_task.items():
                self.buckets.append((task, exs))
                self.bucket_sources.append(i)
        self.weights = self._bucket_weights([s.weight for s in sources])

    def _bucket_weights(self, source_weights: Sequence[float]) -> np.ndarray:
        weights = np.array([source_weights[i] * len(exs) / len(self.sources[i].examples)
                            for i, (_, exs) in zip(self.bucket_sources, self.buckets)], dtype=np.float64)
        return weights / weights.sum()

    @property
    def examples(self) -> Iterator[dict]:
        for s in self.sources:
            yield from s.examples

    @property
    def skipped(self) -> list[str]:
        return [m for s in self.sources for m in s.skipped]

    def task_shares(self) -> dict[str, float]:
        """Expected fraction of each task in a batch (tasks that cannot be drawn left out)."""
        shares: dict[str, float] = {}
        for (task, _), w in zip(self.buckets, self.weights):
            if w > 0:
                shares[task] = shares.get(task, 0.0) + float(w)
        return shares

    def source_shares(self) -> dict[str, float]:
        """Expected fraction of batches drawn from each source, by its name (after any stage reweighting)."""
        shares = {s.name: 0.0 for s in self.sources}
        for i, w in zip(self.bucket_sources, self.weights):
            shares[self.sources[i].name] += float(w)
        return shares

    def reweighted(self, source_weights: Optional[Sequence[float]]) -> "Mixture":
        """The same sources and seed drawn with other source weights, one per source in order (0 leaves a source
        out); ``None``: this mixture itself."""
        if source_weights is None:
            return self
        if len(source_weights) != len(self.sources) or min(source_weights) < 0 or not sum(source_weights) > 0:
            raise ValueError(f"expected {len(self.sources)} weights >= 0 (one per data source, in order, not all 0), "
                             f"got {list(source_weights)}")
        out = copy.copy(self)
        out.weights = self._bucket_weights(source_weights)
        return out

    def restricted(self, tasks: Optional[Sequence[str]]) -> "Mixture":
        """The same sources and seed with only the buckets of ``tasks`` (``None``: this mixture itself)."""
        if tasks is None:
            return self
        keep = [i for i, (task, _) in enumerate(self.buckets) if task in tasks and self.weights[i] > 0]
        if not keep:
            present = sorted({task for (task, _), w in zip(self.buckets, self.weights) if w > 0})
            raise ValueError(f"the stage's tasks {list(tasks)} select no data; the mixture draws {present}")
        out = copy.copy(self)
        out.buckets = [self.buckets[i] for i in keep]
        out.bucket_sources = [self.bucket_sources[i] for i in keep]
        out.weights = self.weights[keep] / self.weights[keep].sum()
        return out

    def drawn_examples(self) -> list[dict]:
        """Every example that :meth:`sample` can draw (those of buckets with a weight above 0)."""
        return [ex for (_, exs), w in zip(self.buckets, self.weights) if w > 0 for ex in exs]

    def sample(self, batch_size: int, *keys: int, group_by_task: bool = False) -> list[dict]:
        """Draw ``batch_size`` examples from a generator seeded by (seed, *keys) — pass (stage, step, micro, rank).

        With ``group_by_task`` all examples of the batch share one task (picked by its share)."""
        rng = np.random.default_rng([self.seed, *[int(k) for k in keys]])
        weights = self.weights
        if group_by_task:
            shares = self.task_shares()
            tasks = sorted(shares)
            task = tasks[int(rng.choice(len(tasks), p=np.array([shares[t] for t in tasks])))]
            weights = np.array([w if t == task else 0.0 for (t, _), w in zip(self.buckets, self.weights)])
            weights = weights / weights.sum()
        picks = rng.choice(len(self.buckets), size=batch_size, p=weights)
        out = []
        for b in picks:
            exs = self.buckets[int(b)][1]
            out.append(exs[int(rng.integers(len(exs)))])
        return out


def build_mixture(data: DataRecipe, seed: int) -> tuple[Mixture, list[dict]]:
    """The training mixture and the held-out eval examples (the first ``eval_examples`` of the eval sources,
    taken round-robin across them). Every dataset error surfaces here, before training."""
    mixture = Mixture(load_sources(data.sources, data.on_missing), seed=seed)
    eval_examples: list[dict] = []
    if data.eval_sources:
        loaded = load_sources(data.eval_sources, data.on_missing, kind="eval_sources")
        iters = [iter(s.examples) for s in loaded]
        while len(eval_examples) < data.eval_examples and iters:
            for it in list(iters):
                ex = next(it, None)
                if ex is None:
                    iters.remove(it)
                elif len(eval_examples) < data.eval_examples:
                    eval_examples.append(ex)
    return mixture, eval_examples


def mixture_texts(examples: Iterator[dict] | Sequence[dict]) -> Iterator[str]:
    """Every text of the examples (messages without image placeholders, t2i prompts, plain texts) for BPE training."""
    for ex in examples:
        if ex["task"] == "text":
            yield ex["text"]
        elif ex["task"] == "t2i":
            yield ex["prompt"]
        else:
            for m in ex["messages"]:
                yield m["content"].replace(IMAGE_TOKEN, "").strip()


def t2i_images(examples: Sequence[dict] | Iterator[dict]) -> list[Any]:
    """The distinct images of the t2i examples, in first-seen order."""
    seen, images = set(), []
    for ex in examples:
        if ex["task"] == "t2i" and ex.get("image") is not None and id(ex["image"]) not in seen:
            seen.add(id(ex["image"]))
            images.append(ex["image"])
    return images
