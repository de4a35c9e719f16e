"""Offline loaders for users' own data: LLaVA conversation JSON/JSONL, `imagefolder` + metadata.jsonl,
and JSON/Parquet tables.

All loaders return lists of training examples in the shared format (see docs/architecture.md) with PIL RGB images.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .shapes import CAPTION_PROMPT

IMAGE_TOKEN = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TABLE_TASKS = ("caption", "t2i", "vqa")


class ExampleList(list):
    """A list of examples that also reports what was skipped: `skipped` holds one message per skipped entry."""

    def __init__(self, examples=(), skipped: list[str] | None = None):
        super().__init__(examples)
        self.skipped: list[str] = list(skipped or [])

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def open_image(source: Any, where: str = "") -> Image.Image:
    """Open a path, raw bytes, `{"bytes": ..., "path": ...}` dict or PIL image as a fully loaded PIL RGB image.

    `where` (e.g. "row 3 of data.jsonl") is added to error messages.
    """
    at = f" ({where})" if where else ""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return open_image(source["bytes"], where)
        if source.get("path"):
            return open_image(source["path"], where)
        raise ValueError(f"image dict has neither 'bytes' nor 'path'{at}: keys {sorted(source)}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(source))) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"could not decode image bytes{at}: {e}") from e
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}{at}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"corrupt or unreadable image {path}{at}: {e}") from e
    raise TypeError(
        f"unsupported image value of type {type(source).__name__}{at}; use a path, bytes or {{'bytes': ...}}"
    )


def _read_json_records(path: Path) -> list:
    """A JSON list, or JSON Lines (one object per line)."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty; it must hold a JSON list of entries or one JSON object per line")
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines despite the extension
        if data is not None:
            if not isinstance(data, list):
                raise ValueError(f"{path} must hold a JSON list of entries, got a {type(data).__name__}")
            return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno} is not valid JSON: {e}") from e
    return records


def _llava_messages(entry: dict, n_images: int, name: str) -> list[dict]:
    convs = entry.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise ValueError(f"{name}: missing or empty 'conversations' list")
    messages = []
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{name}: turn {t} must be a dict with 'from' and 'value'")
        role = _ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(f"{name}: turn {t} has unknown role {turn['from']!r}; use one of {sorted(_ROLES)}")
        if not isinstance(turn["value"], str):
            raise ValueError(f"{name}: turn {t} 'value' must be a string")
        expected = "user" if t % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"{name}: turn {t} is from {turn['from']!r} but turns must alternate human/gpt starting with human"
            )
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{name}: the conversation ends with a human turn; the last turn must be the answer (gpt)")
    n_tokens = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n_tokens != n_images:
        raise ValueError(
            f"{name}: {n_tokens} '{IMAGE_TOKEN}' token(s) in the conversation but {n_images} image(s); "
            f"put exactly one '{IMAGE_TOKEN}' in the human turns per image"
        )
    return messages


def load_llava_json(json_path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                    on_missing: str = "error") -> ExampleList:
    """Load a LLaVA-format conversation file (JSON list or JSONL) as understanding examples.

    Image paths are relative to `image_folder` (default: the JSON file's folder). `on_missing="error"` raises
    FileNotFoundError naming a missing image; `"skip"` drops that entry and records it in the returned
    `ExampleList.skipped`. Entries without "image" become text-only examples (`images=[]`).
    """
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"LLaVA JSON file not found: {json_path}")
    folder = Path(image_folder) if image_folder is not None else json_path.parent
    records = _read_json_records(json_path)
    if not records:
        raise ValueError(f"{json_path} holds no entries")
    examples, skipped = [], []
    for i, entry in enumerate(records):
        if not isinstance(entry, dict):
            raise ValueError(f"entry {i} of {json_path} must be a JSON object, got {type(entry).__name__}")
        name = f"entry {i}" + (f" (id {entry['id']!r})" if "id" in entry else "") + f" of {json_path}"
        rel = entry.get("image")
        rels = [] if rel is None else (list(rel) if isinstance(rel, list) else [rel])
        if not all(isinstance(r, str) and r for r in rels):
            raise ValueError(f"{name}: 'image' must be a path string or a list of path strings")
        messages = _llava_messages(entry, len(rels), name)
        paths = [folder / r for r in rels]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            if on_missing == "error":
                raise FileNotFoundError(
                    f"{name}: image not found: {missing[0]}; fix image_folder or pass on_missing='skip'"
                )
            skipped.append(f"{name}: image not found: {missing[0]}")
            continue
        example = {"task": "understanding", "images": [open_image(p, name) for p in paths], "messages": messages}
        if "id" in entry:
            example["id"] = entry["id"]
        examples.append(example)
    if not examples:
        raise ValueError(f"no usable entries in {json_path}: all {len(skipped)} skipped; first: {skipped[0]}")
    return ExampleList(examples, skipped)


def _table_examples(rows, image_column: str, text_column: str, task: str, resolve, where: str,
                    prompt: str, question_column: str) -> list[dict]:
    if task not in TABLE_TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TABLE_TASKS}")
    columns = list(rows.column_names)
    needed = [image_column, text_column] + ([question_column] if task == "vqa" else [])
    for col in needed:
        if col not in columns:
            raise ValueError(f"{where} has no column {col!r}; its columns are {columns}")
    if len(rows) == 0:
        raise ValueError(f"{where} holds no rows")
    examples = []
    for i, row in enumerate(rows):
        at = f"row {i} of {where}"
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{at}: column {text_column!r} must be a non-empty string, got {text!r}")
        image = open_image(resolve(row[image_column]), at)
        if task == "t2i":
            examples.append({"task": "t2i", "prompt": text, "image": image})
            continue
        question = prompt if task == "caption" else row[question_column]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{at}: column {question_column!r} must be a non-empty string, got {question!r}")
        examples.append({
            "task": "understanding",
            "images": [image],
            "messages": [{"role": "user", "content": IMAGE_TOKEN + "\n" + question},
                         {"role": "assistant", "content": text}],
            "qtype": "caption" if task == "caption" else "vqa",
        })
    return examples


def _no_decode(ds, column: str):
    """Turn off `datasets` image decoding so that we open (and name in errors) each image ourselves."""
    from datasets import Image as ImageFeature

    if column in ds.features and isinstance(ds.features[column], ImageFeature):
        ds = ds.cast_column(column, ImageFeature(decode=False))
    return ds


def load_imagefolder(data_dir: str | os.PathLike, task: str = "caption", split: str = "train",
                     text_column: str = "text", prompt: str = CAPTION_PROMPT,
                     cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Load `datasets`' "imagefolder" layout: images plus a metadata.jsonl with `file_name` and `text` columns.

    task "caption" gives understanding examples (user: `<image>\\n{prompt}`, assistant: text); "t2i" gives
    drawing examples with the text as prompt.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"imagefolder directory not found: {data_dir}")
    if not any(data_dir.rglob("metadata.*")):
        raise ValueError(f"{data_dir} has no metadata.jsonl; add one with 'file_name' and '{text_column}' per image")
    import datasets

    try:
        dsd = datasets.load_dataset("imagefolder", data_dir=str(data_dir), cache_dir=cache_dir and str(cache_dir))
    except (ValueError, FileNotFoundError) as e:  # e.g. no image files at all
        raise ValueError(f"could not load imagefolder {data_dir}: {e}") from e
    if split not in dsd:
        raise ValueError(f"imagefolder {data_dir} has no split {split!r}; it has {list(dsd)}")
    ds = _no_decode(dsd[split], "image")
    return _table_examples(ds, "image", text_column, task, lambda v: v, str(data_dir), prompt, "question")


def load_table(path: str | os.PathLike, image_column: str = "image", text_column: str = "text",
               task: str = "caption", image_root: str | os.PathLike | None = None, prompt: str = CAPTION_PROMPT,
               question_column: str = "question", cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Load a JSON/JSONL/Parquet table whose image column holds paths (relative to `image_root`, default the
    table's folder), raw bytes or `{"bytes": ...}` dicts.

    task "caption": understanding examples with `prompt` as question and the text as answer; "vqa": the
    question comes from `question_column`; "t2i": drawing examples with the text as prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table not found: {path}")
    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"unsupported table format {path.suffix!r} for {path}; use .json, .jsonl or .parquet")
    if path.stat().st_size == 0 or (builder == "json" and not path.read_text(encoding="utf-8").strip()):
        raise ValueError(f"{path} is empty; it must hold at least one row")
    root = Path(image_root) if image_root is not None else path.parent
    import datasets

    if builder == "parquet":
        import pyarrow.parquet as pq

        if pq.ParquetFile(path).metadata.num_rows == 0:
            raise ValueError(f"{path} holds no rows")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                   cache_dir=cache_dir and str(cache_dir))
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        cause = e.__cause__ or e
        raise ValueError(f"could not read {path} as a {builder} table (is it empty or malformed?): {cause}") from e
    if image_column in ds.column_names:
        ds = _no_decode(ds, image_column)

    def resolve(value):
        if isinstance(value, str):
            return root / value
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            return root / value["path"]
        return value

    return _table_examples(ds, image_column, text_column, task, resolve, str(path), prompt, question_column)
