"""The tokenizer stages of a run: train the VQ image tokenizer on the mixture's t2i images, and train (or copy) the
BPE text tokenizer; each is skipped when its output folder exists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .checkpointing import atomic_directory
from .mixture import Mixture, mixture_texts, t2i_images
from .recipe import ImageTokenizerStage, TokenizerStage
from .run_context import RunContext, StageStopped, _fingerprint
from .trainer import StageTrainer, build_param_groups, step_seed

ROLE_TEXTS = ("user", "assistant", "system")


# ---------------------------------------------------------------------------------------------------- image tokenizer


def _image_tokenizer_stage(ctx: RunContext, stage: ImageTokenizerStage, index: int, mixture: Mixture):
    from ..vision.image_tokenizer import VQConfig, VQImageTokenizer

    out = ctx.output_dir / stage.name
    if (out / "model.safetensors").is_file():
        ctx.log(f"stage {stage.name!r}: output exists at {out}, skipping")
        return VQImageTokenizer.from_pretrained(out)
    ctx.check_fresh(stage)
    seed, acc = ctx.recipe.seed, ctx.accelerator
    images = t2i_images(mixture.examples)
    if len(images) <= stage.holdout:
        raise ValueError(
            f"stage {stage.name!r} trains on the mixture's t2i images but found {len(images)} (holdout={stage.holdout}); "
            "add sources with a 't2i' task or lower holdout"
        )
    torch.manual_seed(step_seed(seed, index, 0))
    vq = VQImageTokenizer(VQConfig(**ctx.recipe.model.image_tokenizer))
    order = np.random.default_rng([seed, index]).permutation(len(images))
    pixels = torch.cat([(vq.preprocess([images[i] for i in order[s:s + 256]]) * 255).round().to(torch.uint8)
                        for s in range(0, len(order), 256)])
    held, train = pixels[:stage.holdout], pixels[stage.holdout:]
    ctx.log(f"stage {stage.name!r}: {len(train)} training images, {len(held)} held out")
    trainer = StageTrainer(acc, vq, stage, index, ctx.checkpoint_dir(stage), ctx.metrics, seed,
                           build_param_groups(vq, stage.lr, stage.weight_decay), on_save=ctx.plot,
                           fingerprint=_fingerprint(dataclasses.asdict(vq.config)),
                           metric_keys=("loss", "recon_loss", "commit_loss"))
    if ctx.resume and trainer.resume_from_latest():
        ctx.metrics.truncate_after(stage.name, trainer.start_step)
        ctx.log(f"stage {stage.name!r}: resumed at step {trainer.start_step}")

    def batch_fn(step: int, micro: int) -> dict:
        rng = np.random.default_rng([seed, index, step, micro, acc.process_index])
        return {"pixel_values": train[rng.integers(len(train), size=stage.batch_size)].float() / 255.0}

    def loss_fn(model, batch, generator) -> dict:
        out = model(batch["pixel_values"])
        return {"loss": out["loss"], "recon_loss": out["recon_loss"], "commit_loss": out["commit_loss"]}

    def eval_fn(model) -> dict:
        net = acc.unwrap_model(model)
        if not len(held):
            return {}
        errors, used = [], set()
        for s in range(0, len(held), 64):
            x = held[s:s + 64].to(acc.device).float() / 255.0
            res = net(x)  # eval mode: the codebook is not updated
            errors.append(float(((res["recon"].clamp(0, 1) - x) ** 2).mean()) * len(x))
            used.update(res["codes"].flatten().tolist())
        return {"recon_mse": sum(errors) / len(held), "codebook_usage": len(used) / vq.codebook_size}

    if not trainer.fit(batch_fn, loss_fn, eval_fn, stop_after=ctx.stop_after):
        raise StageStopped(stage.name)
    ctx.finish(stage, out, lambda tmp: acc.unwrap_model(trainer.model).save_pretrained(tmp))
    return VQImageTokenizer.from_pretrained(out)


# ---------------------------------------------------------------------------------------------------- tokenizer


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _tokenizer_stage(ctx: RunContext, stage: TokenizerStage, mixture: Mixture, eval_examples: list[dict]):
    out = ctx.output_dir / stage.name
    # Every rank passes the one barrier below, whichever branch it takes: a rank that reached the check late
    # would otherwise see the tokenizer rank 0 just wrote, skip the barrier, and hang the run.
    if (out / "tokenizer_config.json").is_file():
        ctx.log(f"stage {stage.name!r}: output exists at {out}, skipping")
    elif ctx.main:
        cfg = ctx.recipe.tokenizer
        if cfg.path is not None:
            tok = _load_tokenizer(cfg.path)
        else:
            from ..tokenization import train_tokenizer

            texts = list(mixture_texts(mixture.examples)) + list(mixture_texts(eval_examples)) + list(ROLE_TEXTS)
            ctx.log(f"stage {stage.name!r}: training a {cfg.vocab_size}-token BPE on {len(texts)} texts")
            tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
        atomic_directory(out, lambda tmp: tok.save_pretrained(str(tmp)))
    ctx.accelerator.wait_for_everyone()
    return _load_tokenizer(out)
