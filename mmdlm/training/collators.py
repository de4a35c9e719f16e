"""Turn a list of mixed training examples (understanding, text-to-image, plain text) into ONE padded batch for
:func:`mmdlm.diffusion.compute_batch_loss`.

Row layouts (docs/architecture.md):

* understanding: the chat template, each ``<image>`` expanded to its feature slots; targets are every assistant
  turn (content + ``<|eot_id|>``), one closing EOS, and the EOS padding.
* t2i: ``<|t2i|> BOS text EOS <|soi|> code+offset ... <|eoi|>``; targets are the code slots only.
* text: ``BOS text EOS``; targets are the text, the EOS and the EOS padding.

Rows are right-padded with EOS. Following LLaDA's SFT, the EOS padding of text/understanding rows is part of the
answer (the model learns to fill unused length with EOS, which is how a sampler's fixed ``gen_length`` ends) and
those rows get an all-ones attention mask: LLaDA trains without a padding mask, so the denoiser sees the same
all-visible context it sees when sampling. In t2i rows the padding is neither a target nor visible (MMaDA's
padding bias for t2i rows).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

TASK_IDS = {"text": 0, "understanding": 1, "t2i": 2}
_CACHE_KEY = "_mmdlm_encoded"


def precompute_image_codes(
    examples: Sequence[dict], image_tokenizer: Any, batch_size: int = 64, device: Optional[torch.device | str] = None
) -> int:
    """Encode the image of every t2i example once with the VQ ``image_tokenizer`` and store the flat code list
    (a LongTensor [N]) as ``example["image_codes"]``, so collation does no VQ work. Examples that already hold
    codes are skipped; an image shared by several examples is encoded once. Returns how many images were encoded."""
    todo: dict[int, list[dict]] = {}
    images: dict[int, Any] = {}
    for ex in examples:
        if ex.get("task") == "t2i" and ex.get("image_codes") is None:
            key = id(ex["image"])
            todo.setdefault(key, []).append(ex)
            images[key] = ex["image"]
    keys = list(todo)
    if not keys:
        return 0
    device = torch.device(device) if device is not None else next(image_tokenizer.parameters()).device
    was_training = image_tokenizer.training
    image_tokenizer.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(keys), batch_size):
                chunk = keys[start:start + batch_size]
                pixels = image_tokenizer.preprocess([images[k] for k in chunk]).to(device)
                codes = image_tokenizer.encode(pixels)
                codes = codes.reshape(len(chunk), -1).to("cpu", torch.long)
                for k, row in zip(chunk, codes):
                    for ex in todo[k]:
                        ex["image_codes"] = row.clone()
    finally:
        image_tokenizer.train(was_training)
    return len(keys)


class MultiTaskCollator:
    """Collate mixed examples into ``{"input_ids", "attention_mask", "loss_mask", "task_ids", "pixel_values"}``.

    ``processor`` is a :class:`mmdlm.processing.MMDLMProcessor` (tokenizer, chat template, image processor,
    ``image_slots``); ``config`` an :class:`mmdlm.MMDLMConfig` (image-code offset and range). ``image_tokenizer``
    is only needed for t2i examples without precomputed ``image_codes`` (slow: prefer
    :func:`precompute_image_codes`). ``max_length`` bounds every row: long answers and texts are cut, a prompt
    or an image that does not fit raises. (Condition dropout for classifier-free guidance is done by the loss:
    ``compute_batch_loss(..., cfg_dropout=q)``.)
    """

    def __init__(
        self,
        processor: Any,
        image_tokenizer: Any = None,
        max_length: int = 512,
        config: Any = None,
        min_answer_length: int = 0,
    ) -> None:
        if max_length < 4:
            raise ValueError(f"max_length={max_length} is too small for any row")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_tokenizer = image_tokenizer
        self.max_length = int(max_length)
        self.config = config
        # Text/understanding rows are EOS-padded to at least prompt + min_answer_length, so the denoiser sees
        # as many trailing EOS targets in training as a sampler's gen_length canvas holds at inference.
        self.min_answer_length = int(min_answer_length)
        ids = processor.token_ids
        self.bos, self.eos, self.pad = ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]
        self.t2i, self.soi, self.eoi = ids["t2i_token_id"], ids["soi_token_id"], ids["eoi_token_id"]
        self.image_token_id = ids["image_token_id"]
        self.code_offset = getattr(config, "image_token_offset", None) or processor.image_token_offset
        self.codebook_size = getattr(config, "codebook_size", None) or processor.codebook_size
        self._signature = (id(self.tokenizer), self.max_length, self.code_offset, processor.num_image_tokens)

    # ------------------------------------------------------------------------------------------------ encoding

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode_understanding(self, ex: dict) -> tuple[list[int], list[int]]:
        messages = ex["messages"]
        images = list(ex.get("images") or [])
        # Tokenize the conversation in segments that end where an answer starts or stops, so the prompt of each
        # turn is tokenized exactly as the sampler will tokenize it (BPE merges never cross an answer boundary).
        ids: list[int] = []
        targets: list[int] = []
        rendered = ""
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = self._render(messages[:k], add_generation_prompt=True)
            full = self._render(messages[:k + 1], add_generation_prompt=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise ValueError("the chat template does not render conversations prefix-consistently")
            seg = self._tokens(prompt[len(rendered):])
            ans = self._tokens(full[len(prompt):])
            ids += seg + ans
            targets += [0] * len(seg) + [1] * len(ans)
            rendered = full
        ids.append(self.eos)
        targets.append(1)
        # Expand each <image> placeholder to the slots its image fills.
        expanded_ids, expanded_targets = [], []
        image_iter = iter(images)
        for t, m in zip(ids, targets):
            if t == self.image_token_id:
                image = next(image_iter, None)
                if image is None:
                    raise ValueError("more <image> placeholders than images")
                n = self.processor.image_slots(image.size)
                expanded_ids += [t] * n
                expanded_targets += [0] * n
            else:
                expanded_ids.append(t)
                expanded_targets.append(m)
        if next(image_iter, None) is not None:
            raise ValueError("more images than <image> placeholders")
        first_target = expanded_targets.index(1)
        if first_target >= self.max_length:
            raise ValueError(
                f"the prompt is {first_target} tokens (with image slots) but max_length is {self.max_length}; "
                "raise the stage's max_length or shorten the prompt"
            )
        cut = self.max_length
        if cut < len(expanded_ids) and expanded_ids[cut] == self.image_token_id:
            # Never keep part of an image's slots (a later turn's image): cut before the whole run.
            while cut > 0 and expanded_ids[cut - 1] == self.image_token_id:
                cut -= 1
        return expanded_ids[:cut], expanded_targets[:cut]

    def _encode_t2i(self, ex: dict) -> tuple[list[int], list[int]]:
        codes = ex.get("image_codes")
        if codes is None:
            if self.image_tokenizer is None:
                raise ValueError(
                    "a t2i example has no precomputed 'image_codes' and the collator has no image_tokenizer; "
                    "call precompute_image_codes(examples, image_tokenizer) first"
                )
            precompute_image_codes([ex], self.image_tokenizer)
            codes = ex["image_codes"]
        codes = [int(c) for c in torch.as_tensor(codes).reshape(-1).tolist()]
        if self.code_offset is None or not self.codebook_size:
            raise ValueError("this model has no image-code range (config.codebook_size = 0); it cannot train t2i")
        if codes and (min(codes) < 0 or max(codes) >= self.codebook_size):
            raise ValueError(f"image codes must lie in [0, {self.codebook_size}), got [{min(codes)}, {max(codes)}]")
        text = self._tokens(ex["prompt"])
        room = self.max_length - len(codes) - 5
        if room < 0:
            raise ValueError(
                f"a t2i row needs {len(codes) + 5} tokens ({len(codes)} image codes) but max_length is "
                f"{self.max_length}; raise the stage's max_length"
            )
        head = [self.t2i, self.bos, *text[:room], self.eos, self.soi]
        ids = head + [c + self.code_offset for c in codes] + [self.eoi]
        targets = [0] * len(head) + [1] * len(codes) + [0]
        return ids, targets

    def _encode_text(self, ex: dict) -> tuple[list[int], list[int]]:
        ids = ([self.bos] + self._tokens(ex["text"]) + [self.eos])[:self.max_length]
        return ids, [0] + [1] * (len(ids) - 1)

    def encode(self, ex: dict) -> tuple[list[int], list[int]]:
        """(token ids, 0/1 target flags) of one example before padding; cached in the example dict."""
        cached = ex.get(_CACHE_KEY)
        if cached is not None and cached[0] == self._signature:
            return cached[1], cached[2]
        task = ex.get("task")
        if task == "understanding":
            ids, targets = self._encode_understanding(ex)
        elif task == "t2i":
            ids, targets = self._encode_t2i(ex)
        elif task == "text":
            ids, targets = self._encode_text(ex)
        else:
            raise ValueError(f"unknown task {task!r}; use one of {sorted(TASK_IDS)}")
        ex[_CACHE_KEY] = (self._signature, ids, targets)
        return ids, targets

    def _kept_images(self, ex: dict, ids: list[int]) -> list[Any]:
        """The images whose slots survived truncation (all of them unless a late turn was cut)."""
        images = list(ex.get("images") or [])
        n_slots = sum(1 for t in ids if t == self.image_token_id)
        kept, used = [], 0
        for image in images:
            used += self.processor.image_slots(image.size)
            if used > n_slots:
                break
            kept.append(image)
        return kept

    # ------------------------------------------------------------------------------------------------ batching

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        """Collate ``examples`` (any mix of tasks) into one right-padded batch."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        rows, images = [], []
        for ex in examples:
            task = ex.get("task")
            ids, targets = self.encode(ex)
            if task == "understanding":
                images.extend(self._kept_images(ex, ids))
            rows.append((task, ids, targets))
        width = max(len(ids) for _, ids, _ in rows)
        if self.min_answer_length:
            starts = [targets.index(1) for task, _, targets in rows if task != "t2i" and 1 in targets]
            width = max([width] + [min(s + self.min_answer_length, self.max_length) for s in starts])
        B = len(rows)
        input_ids = torch.full((B, width), self.pad, dtype=torch.long)
        attention_mask = torch.ones((B, width), dtype=torch.long)
        loss_mask = torch.zeros((B, width), dtype=torch.bool)
        task_ids = torch.empty(B, dtype=torch.long)
        for r, (task, ids, targets) in enumerate(rows):
            n = len(ids)
            input_ids[r, :n] = torch.tensor(ids, dtype=torch.long)
            loss_mask[r, :n] = torch.tensor(targets, dtype=torch.bool)
            task_ids[r] = TASK_IDS[task]
            if task == "t2i":
                attention_mask[r, n:] = 0
            else:
                loss_mask[r, n:] = True  # LLaDA: EOS padding is part of the answer
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "task_ids": task_ids,
        }
        if images:
            batch["pixel_values"] = self.processor.image_processor(images)["pixel_values"]
        return batch
