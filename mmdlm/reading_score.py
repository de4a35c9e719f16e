"""How well a model reads a text back from an image: the masked-diffusion ELBO of the text as the image's caption.
A model that both draws and reads uses it to keep the best of several drawings of one prompt."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .data.shapes import CAPTION_PROMPT
from .likelihood import elbo_log_likelihood


@torch.no_grad()
def caption_log_likelihoods(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Any],
    texts: Sequence[str],
    *,
    instruction: str = CAPTION_PROMPT,
    mc_num: int = 8,
    seed: int = 0,
) -> list[float]:
    """For each (image, text) pair: a Monte-Carlo ELBO of log p(text | image, ``instruction``), the text scored as
    the assistant's answer (:func:`mmdlm.likelihood.elbo_log_likelihood`, ``mc_num`` masked copies in one batch).

    Every pair is scored with the same masks (one ``seed``), so two images scored against one text differ only by
    what the model reads in them. Higher is better; the values are sums of log-probabilities (nats).
    """
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images but {len(texts)} texts; give one text per image")
    device = next(model.parameters()).device
    scores = []
    for image, text in zip(images, texts):
        user = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": instruction}]}]
        prompt = processor.apply_chat_template(user, add_generation_prompt=True)
        full = processor.apply_chat_template(user + [{"role": "assistant", "content": text}],
                                             add_generation_prompt=False)
        prompt_ids, full_ids = prompt["input_ids"][0], full["input_ids"][0]
        if not torch.equal(full_ids[:len(prompt_ids)], prompt_ids):  # a chat template that rewrites earlier turns
            raise ValueError("the chat template renders the prompt differently once an answer follows; "
                             "cannot score the answer alone")
        pixels = prompt["pixel_values"]
        pixels = [p.to(device) for p in pixels] if isinstance(pixels, list) else pixels.to(device)
        features = model.image_features(pixels)
        generator = torch.Generator().manual_seed(int(seed))
        scores.append(elbo_log_likelihood(model, prompt_ids, full_ids[len(prompt_ids):], mc_num=mc_num,
                                          batch_size=mc_num, generator=generator, image_features=features))
    return scores
