"""How fast does a fresh denoiser + vision tower learn to read ONE kind of question? A few-minute diagnostic.

Builds a fresh model from a saved model folder's config (same tower, projector and tokenizer; optionally fewer
layers), trains it with the real collator and masked-diffusion loss on one Shapes question type (or on solid-colour
images: "what color is the image?"), and prints the held-out accuracy of the first answer token, predicted in one
forward pass with the whole answer masked.

    python benchmarks/reading_probe.py --qtype solid --steps 100      # global colour: the image path works
    python benchmarks/reading_probe.py --qtype color --steps 150      # "what color is the triangle?" (8 colours)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image

from mmdlm import diffusion
from mmdlm.configuration_mmdlm import MMDLMConfig
from mmdlm.data.shapes import COLORS, ShapesWorld, shapes_examples, understanding_example
from mmdlm.modeling_mmdlm import MMDLMForConditionalGeneration
from mmdlm.model_files import resolve_model_path
from mmdlm.processing import MMDLMProcessor
from mmdlm.training.collators import MultiTaskCollator
from mmdlm.training.denoiser_stage import load_vision_tower

QTYPES = ("solid", "color", "shape", "count", "exist", "position", "size", "color1")


def _solid(i: int) -> dict:
    name = list(COLORS)[i % len(COLORS)]
    return understanding_example(Image.new("RGB", (64, 64), COLORS[name]), "what color is the image?", name, "solid")


def _examples(qtype: str, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    if qtype == "solid":
        return [_solid(i) for i in range(n_train)], [_solid(i) for i in range(n_test)]
    if qtype == "color1":  # colour questions about one-object scenes only: no binding, the only object answers
        def one_object(split: str, n: int) -> list[dict]:
            return [understanding_example(s.image, qa.question, qa.answer, "color1") for s in ShapesWorld(split, n)
                    if len(s.scene.shapes) == 1 for qa in s.qas if qa.qtype == "color"]
        return one_object("train", 3 * n_train), one_object("test", 12 * n_test)[:n_test]
    train = [e for e in shapes_examples("train", n_train, tasks=("vqa",)) if e["qtype"] == qtype]
    test = [e for e in shapes_examples("test", 4 * n_test, tasks=("vqa",)) if e["qtype"] == qtype][:n_test]
    return train, test


def first_token_accuracy(model, collator, examples: list[dict], mask_id: int, causal: bool = False) -> float:
    """Share of rows whose first answer token is the argmax with the whole answer masked (a causal model: the
    argmax at the position before it)."""
    was_training = model.training
    model.eval()
    batch = collator(examples)
    ids, targets = batch["input_ids"].clone(), batch["loss_mask"]
    ids[targets] = mask_id
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    first = targets.float().argmax(1, keepdim=True)
    model.train(was_training)
    return float((logits.argmax(-1).gather(1, first - int(causal)) == batch["input_ids"].gather(1, first)).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-tiny", help="model folder (or bundled name) whose config is copied")
    p.add_argument("--qtype", choices=QTYPES, default="color")
    p.add_argument("--layers", type=int, default=2, help="denoiser layers of the fresh model (default 2)")
    p.add_argument("--vision-tower", default=None, metavar="JSON",
                   help="another vision tower config, e.g. a linear patch embedding only (Fuyu-style): "
                        "'{\"kind\": \"vit\", \"patch_size\": 8, \"depth\": 1, \"select_layer\": 0}'")
    p.add_argument("--vision-tower-from", default=None, metavar="FOLDER",
                   help="start the tower from this saved model's tower (same tower config), e.g. the vision_pretrain "
                        "output of a run")
    p.add_argument("--freeze-tower", action="store_true", help="do not train the vision tower")
    p.add_argument("--objective", choices=("diffusion", "ar"), default="diffusion",
                   help="ar: the same model made causal and trained on next-token prediction (the AR twin's loss)")
    p.add_argument("--ar-steps", type=int, default=0,
                   help="diffusion: train the first N steps as a causal model with next-token prediction, then switch "
                        "to bidirectional attention and the diffusion loss (AR-to-diffusion adaptation, as Dream)")
    p.add_argument("--weighting", choices=("elbo", "mean"), default=None,
                   help="diffusion loss weighting: elbo (1/t, LLaDA; the default) or mean (LaViDa, Dimple)")
    p.add_argument("--min-answer-length", type=int, default=0,
                   help="EOS-pad answers to this many tokens, as a recipe's min_answer_length does (default 0)")
    p.add_argument("--padding-weight", choices=("token", "row"), default="token",
                   help="how much the EOS padding counts in the loss: each pad a full token (LLaDA) or one per row")
    p.add_argument("--eps", type=float, default=None,
                   help="diffusion: the least masking ratio, p = eps + (1 - eps) t (default LLaDA's 1e-3; 0.5 masks "
                        "at least half of every answer, 1.0 all of it)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=25, help="evaluate every N steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    path = resolve_model_path(args.model)
    config = MMDLMConfig.from_pretrained(path)
    config.num_hidden_layers = args.layers
    config.is_causal = args.objective == "ar"
    processor = MMDLMProcessor.from_pretrained(path)
    if args.vision_tower:
        config.vision_config = json.loads(args.vision_tower)
    model = MMDLMForConditionalGeneration(config).train()
    if args.vision_tower_from:
        load_vision_tower(model, Path(args.vision_tower_from))
    if args.freeze_tower:
        model.model.vision_tower.requires_grad_(False)
    processor.num_image_tokens = model.model.vision_tower.num_patches + int(config.use_image_newline)
    collator = MultiTaskCollator(processor, max_length=512, config=config, min_answer_length=args.min_answer_length)
    train, test = _examples(args.qtype, 4000 if args.qtype != "solid" else 800, 128)
    answers = sorted({e["messages"][-1]["content"] for e in train})
    print(f"qtype={args.qtype}: {len(train)} training rows, {len(test)} held-out rows, {len(answers)} answers "
          f"(uniform guess {1 / len(answers):.1%}); {args.layers}-layer denoiser, tower {config.vision_config}")
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01)
    eps = {} if args.eps is None else {"eps": args.eps}
    start = time.perf_counter()
    for step in range(args.steps + 1):
        objective = "ar" if step < args.ar_steps else args.objective
        config.is_causal = objective == "ar"
        batch = collator(rng.sample(train, min(args.batch_size, len(train))))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion.compute_batch_loss(model, batch, objective=objective,
                                              **({} if objective == "ar" else dict(
                                                  weighting=args.weighting, padding_weight=args.padding_weight,
                                                  **eps)))["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0:
            acc = first_token_accuracy(model, collator, test, config.mask_token_id, config.is_causal)
            print(f"step {step:4d}  loss {loss.item():.3f}  held-out first-token accuracy {acc:.1%}  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
