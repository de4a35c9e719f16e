"""Validate chat conversations in transformers-5 message format (string or image/text block content) and collect
their images in text order, ready for the chat template."""

from __future__ import annotations

from typing import Any

from .tokenization import IMAGE_TOKEN

_IMAGE_KEYS = ("image", "path", "url")  # where a transformers-5 image block may carry its image


def normalize_conversation(conversation: Any, extra_images: list[Any], row: int) -> tuple[list[dict], list[Any]]:
    """Validate one conversation; return template-ready messages and its images in text order.

    Image blocks carry their image or take the next one of ``extra_images``; each ``<image>`` written in
    text also takes the next one of ``extra_images``.
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(
            f"conversation {row} is empty or not a list of messages; pass [{{'role': 'user', 'content': ...}}]."
        )
    pending = list(extra_images)
    images: list[Any] = []

    def take(n: int, what: str) -> None:
        if n > len(pending):
            raise ValueError(
                f"conversation {row} has more images to place ({what}) than images passed in images=...; "
                "put each image in its block ({'type': 'image', 'image': ...}) or pass one image per placeholder."
            )
        images.extend(pending[:n])
        del pending[:n]

    messages: list[dict] = []
    for m, msg in enumerate(conversation):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {m} of conversation {row} must be a dict with 'role' and 'content'.")
        content = msg["content"]
        if isinstance(content, str):
            take(content.count(IMAGE_TOKEN), f"{IMAGE_TOKEN} in message {m}")
            messages.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise ValueError(
                f"message {m} of conversation {row} has content of type {type(content).__name__}; "
                "use a string or a list of {'type': 'image'|'text', ...} blocks."
            )
        blocks = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise ValueError(f"a text block in message {m} of conversation {row} needs a 'text' string.")
                take(block["text"].count(IMAGE_TOKEN), f"{IMAGE_TOKEN} in a text block of message {m}")
                blocks.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                payload = next((block[k] for k in _IMAGE_KEYS if block.get(k) is not None), None)
                if isinstance(payload, str) and payload.startswith(("http://", "https://")):
                    raise ValueError(
                        f"image URL {payload!r}: mmdlm never downloads; save the image and pass its local path."
                    )
                if payload is None:
                    take(1, f"an image block without an image in message {m}")
                else:
                    images.append(payload)
                blocks.append({"type": "image"})
            else:
                raise ValueError(
                    f"unknown content type {kind!r} in message {m} of conversation {row}; supported: 'text', "
                    "'image' (with 'image', 'path' or 'url' holding a local path, PIL image or array)."
                )
        messages.append({"role": msg["role"], "content": blocks})
    if pending:
        raise ValueError(
            f"conversation {row} got {len(pending)} more image(s) in images=... than it has places for; "
            f"add an image block or an {IMAGE_TOKEN} placeholder for each image."
        )
    return messages, images
