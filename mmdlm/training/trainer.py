"""The loop every trainable stage runs: accelerate (one CPU, DDP, FSDP2 or DeepSpeed), gradient accumulation,
AdamW with parameter groups, warmup + cosine schedule, gradient clipping, bf16 autocast on GPUs, periodic
eval / checkpoints, exact resume, a NaN guard, tqdm and JSON-lines metrics."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpointing import check_compatible, latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from .ema import ParameterEMA
from .plots import MetricsLog

BatchFn = Callable[[int, int], dict]  # (step, micro) -> batch on CPU
LossFn = Callable[[torch.nn.Module, dict, torch.Generator], dict]  # -> {"loss": tensor, other scalars}
EvalFn = Callable[[torch.nn.Module], dict]

_BF16_WARNED = False


def cpu_has_bf16(warn: bool = False) -> bool:
    """Whether this CPU has native bf16 kernels (AVX512-BF16 / AMX). Without them bf16 autocast is emulated and many
    times slower than fp32 (benchmarks/bf16_cpu.py), so ``bf16_cpu`` falls back to fp32."""
    global _BF16_WARNED
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        ok = False
    if not ok and warn and not _BF16_WARNED:
        _BF16_WARNED = True
        print("[mmdlm train] bf16_cpu: this CPU has no native bf16 kernels (emulated bf16 is several times slower "
              "than fp32 here); training in fp32 instead", flush=True)
    return ok


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good state was saved as a checkpoint."""


def step_seed(*keys: int) -> int:
    """A 63-bit seed mixing the run seed, stage, step, micro-step and rank (no two tuples collide in practice)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warmup to 1, then cosine/linear decay to
    ``min_ratio`` at ``total``, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def name_matches(name: str, prefix: str) -> bool:
    """True when parameter ``name`` lies under ``prefix``, also after any leading module path
    (``vision_tower`` matches ``model.vision_tower.blocks.0.attn.qkv.weight``)."""
    dotted = f".{name}"
    return dotted.endswith(f".{prefix}") or f".{prefix}." in dotted


def build_param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, special_lrs: Optional[dict[str, float]] = None
) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: matrices decay, vectors (norms, biases) do not; parameters
    under a prefix of ``special_lrs`` get that learning rate (e.g. the vision tower)."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        label, group_lr = "base", lr
        for prefix, special in (special_lrs or {}).items():
            if name_matches(name, prefix):
                label, group_lr = prefix, special
                break
        decay = p.ndim >= 2 and weight_decay > 0
        key = (label, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": group_lr, "weight_decay": weight_decay if decay else 0.0,
                           "name": f"{label}/{'decay' if decay else 'no_decay'}"}
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameters: check the stage's freeze list / projector_only")
    return list(groups.values())


class StageTrainer:
    """Runs ``steps`` optimizer steps of one stage, resuming from ``checkpoint_dir`` when asked.

    Randomness is derived from (seed, stage_index, step, micro, rank) for every micro-step — the batch drawn by
    ``batch_fn`` and the noise generator handed to ``loss_fn`` — so an interrupted-then-resumed run repeats
    exactly the data and noise of an uninterrupted one. A stage with ``ema_decay`` also keeps a moving average of
    the trainable parameters (``self.ema``), saved in every checkpoint.
    """

    def __init__(
        self,
        accelerator: Any,
        model: torch.nn.Module,
        stage: Any,
        stage_index: int,
        checkpoint_dir: Path,
        metrics: MetricsLog,
        seed: int,
        param_groups: list[dict[str, Any]],
        betas: tuple[float, float] = (0.9, 0.999),
        on_save: Optional[Callable[[], None]] = None,
        fingerprint: str = "",
        metric_keys: tuple[str, ...] = ("loss",),
        find_unused_parameters: bool = False,
    ) -> None:
        self.acc = accelerator
        self.stage = stage
        self.index = stage_index
        self.checkpoint_dir = Path(checkpoint_dir)
        self.metrics = metrics
        self.seed = seed
        self.on_save = on_save
        self.fingerprint = fingerprint
        # A fixed key list keeps the cross-rank reduction the same shape on every rank, even when a rank's batch
        # lacks a task (its per-task loss is then absent there).
        self.metric_keys = tuple(dict.fromkeys((*metric_keys, "loss", "grad_norm")))
        self.grad_accum = int(getattr(stage, "grad_accum", 1))
        self.find_unused_parameters = find_unused_parameters
        self.raw_model = model
        self.optimizer = torch.optim.AdamW(param_groups, lr=stage.lr, betas=tuple(betas), weight_decay=stage.weight_decay)
        total, warmup, schedule, floor = stage.steps, stage.warmup_steps, stage.schedule, stage.min_lr_ratio
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, total, warmup, schedule, floor)
        )
        self.params = [p for g in param_groups for p in g["params"]]
        self.start_step = 0
        self._warned_no_grad = False
        self.ema: Optional[ParameterEMA] = None
        if getattr(stage, "ema_decay", None) is not None:
            if accelerator.distributed_type in ("FSDP", "DEEPSPEED"):
                raise ValueError(
                    f"{stage.name}: ema_decay is not supported with FSDP or DeepSpeed (the averages would have to "
                    "be sharded like the parameters); train this stage with DDP or one process, or drop ema_decay"
                )
            self.ema = ParameterEMA(model, stage.ema_decay)

    # ------------------------------------------------------------------------------------------------ resume

    def resume_from_latest(self) -> int:
        """Load the newest checkpoint of this stage (if any) into model, optimizer, scheduler and RNG; returns
        the step to continue from. Raises before any training when the checkpoint belongs to another model."""
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return 0
        shapes = {k: tuple(v.shape) for k, v in self.raw_model.state_dict().items()}
        check_compatible(path, shapes)
        ckpt = load_checkpoint(path)
        if ckpt["state"].get("fingerprint") not in (None, "", self.fingerprint):
            raise ValueError(
                f"cannot resume from {path}: it was written by a different model/tokenizer setup of stage "
                f"{self.stage.name!r}; use the recipe that wrote it, or a fresh --output directory"
            )
        self.raw_model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt["ema"] is None:
                raise ValueError(
                    f"cannot resume from {path}: stage {self.stage.name!r} sets ema_decay but the checkpoint holds "
                    "no moving averages (it was written without ema_decay); resume with the recipe that wrote it"
                )
            self.ema.load_state_dict(ckpt["ema"])
        if ckpt["optimizer"] is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["rng"] is not None:
            restore_rng_state(ckpt["rng"])
        self.start_step = int(ckpt["state"]["step"])
        return self.start_step

    def save(self, step: int, extra: Optional[dict[str, Any]] = None) -> Optional[Path]:
        """Checkpoint the current state as ``step`` completed steps (called on every rank; rank 0 writes)."""
        model_state = self.acc.get_state_dict(self.model)  # gathers full weights under FSDP/ZeRO-3
        path = None
        if self.acc.is_main_process:
            state = {"stage": self.stage.name, "stage_index": self.index, "world_size": self.acc.num_processes,
                     "fingerprint": self.fingerprint, **(extra or {})}
            path = save_checkpoint(self.checkpoint_dir, step, model_state, self.optimizer.state_dict(),
                                   self.scheduler.state_dict(), state, keep=self.stage.keep_checkpoints,
                                   ema_state=self.ema.state_dict() if self.ema is not None else None)
            if self.on_save is not None:
                self.on_save()
        self.acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------------------------ loop

    def _autocast(self):
        bf16 = bool(getattr(self.stage, "bf16", False))
        dev = self.acc.device
        if bf16 and dev.type == "cuda" and torch.cuda.is_bf16_supported() and self.acc.mixed_precision == "no":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if getattr(self.stage, "bf16_cpu", False) and dev.type == "cpu" and cpu_has_bf16(warn=True):
            # about 1.5x faster on CPUs with bf16 kernels; norms, softmax and logits stay fp32 in the model
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def _any_rank(self, flag: bool) -> bool:
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def _window_means(self, window: dict[str, list[float]]) -> dict[str, float]:
        """Mean of each metric over the log window and over all ranks (ranks lacking a key do not count)."""
        keys = self.metric_keys
        sums = [float(np.sum(window.get(k, []))) for k in keys]
        counts = [float(len(window.get(k, []))) for k in keys]
        if self.acc.num_processes > 1:
            t = torch.tensor(sums + counts, dtype=torch.float64, device=self.acc.device)
            t = self.acc.reduce(t, reduction="sum").tolist()
            sums, counts = t[:len(keys)], t[len(keys):]
        return {k: s / c for k, s, c in zip(keys, sums, counts) if c > 0}

    def _zero_gradient_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """A batch whose rows reach no trainable parameter (say, text rows when only the projector trains) adds
        nothing to the gradient: a zero loss over the trainable parameters stands in for it. Several processes
        would have to agree on such a batch, so there it stops the run with what to change instead."""
        what = (f"stage {self.stage.name!r}, step {step + 1}: a batch reached no trainable parameter (its rows do not "
                "pass through the parts that train: freeze / projector_only)")
        if self.acc.num_processes > 1:
            raise ValueError(f"{what}; leave those tasks or sources out of the stage (tasks: / source_weights:)")
        if not self._warned_no_grad:
            self._warned_no_grad = True
            print(f"[mmdlm train] {what}; such batches add no gradient", flush=True)
        return loss.detach() + sum(0.0 * p.sum() for p in self.params)

    def _diverged(self, step: int, what: str, value: float) -> None:
        path = self.save(step, {"diverged": True})
        where = f"{path}" if path is not None else f"{self.checkpoint_dir}"
        raise TrainingDiverged(
            f"training diverged in stage {self.stage.name!r} at step {step + 1}: {what} is {value}. "
            f"The last good state (after step {step}) is saved in {where}. Lower the learning rate "
            f"(now {self.stage.lr:g}), raise warmup_steps or grad_clip, then rerun with --resume."
        )

    def _evaluate(self, eval_fn: EvalFn, step: int) -> None:
        self.model.eval()
        with torch.no_grad(), self._autocast():
            results = eval_fn(self.model)
        if results:
            self.metrics.write({"stage": self.stage.name, "step": step,
                                **{f"eval_{k}": float(v) for k, v in results.items()}})

    def fit(self, batch_fn: BatchFn, loss_fn: LossFn, eval_fn: Optional[EvalFn] = None,
            stop_after: Optional[int] = None) -> bool:
        """Train to ``stage.steps``. Returns True when finished, False when stopped by ``stop_after``
        (steps in this call), after saving a checkpoint to resume from."""
        acc, stage = self.acc, self.stage
        ga = self.grad_accum
        if ga > 1 and acc.distributed_type == "DEEPSPEED":
            raise ValueError(
                f"{stage.name}: grad_accum={ga} with DeepSpeed: DeepSpeed steps after every backward; set "
                "grad_accum: 1 and raise batch_size (or the number of processes) instead"
            )
        if getattr(acc, "ddp_handler", None) is not None:  # read by prepare() when it wraps the model in DDP
            acc.ddp_handler.find_unused_parameters = self.find_unused_parameters
        self.model, self.optimizer = acc.prepare(self.raw_model, self.optimizer)
        model = self.model
        # FSDP2 swaps parameters for sharded ones during prepare; the optimizer's groups hold the live ones.
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        rank, steps, ga = acc.process_index, stage.steps, self.grad_accum
        step = self.start_step
        bar = tqdm(total=steps, initial=step, desc=stage.name, disable=not acc.is_main_process, dynamic_ncols=True)
        window: dict[str, list[float]] = {}
        t_last, n_examples = time.time(), 0
        t_start = t_last
        try:
            if eval_fn is not None and step == 0:  # the untrained baseline, on the same fixed eval noise
                self._evaluate(eval_fn, 0)
            while step < steps:
                if stop_after is not None and step - self.start_step >= stop_after:
                    self.save(step)
                    return False
                model.train()
                self.optimizer.zero_grad(set_to_none=True)
                totals: dict[str, float] = {}
                for micro in range(ga):
                    seed = step_seed(self.seed, self.index, step, micro, rank)
                    torch.manual_seed(seed)  # any randomness inside the model (e.g. VQ dead-code restarts)
                    batch = batch_fn(step, micro)
                    n_examples += next((int(v.shape[0]) for v in batch.values() if torch.is_tensor(v)), 0)
                    batch = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                    generator = torch.Generator(device="cpu").manual_seed(seed)
                    sync = acc.no_sync(model) if micro < ga - 1 and acc.num_processes > 1 else nullcontext()
                    with sync:
                        with self._autocast():
                            out = loss_fn(model, batch, generator)
                        loss = out["loss"]
                        if not loss.requires_grad:
                            loss = self._zero_gradient_loss(loss, step)
                        bad = not bool(torch.isfinite(loss.detach()).all())
                        if self._any_rank(bad):
                            self._diverged(step, "the loss", float(loss.detach()))
                        acc.backward(loss / ga)
                    for k, v in out.items():
                        if torch.is_tensor(v) and v.numel() == 1:
                            totals[k] = totals.get(k, 0.0) + float(v.detach()) / ga
                if stage.grad_clip > 0:
                    norm = acc.clip_grad_norm_(self.params, stage.grad_clip)
                else:
                    grads = [p.grad.norm() for p in self.params if p.grad is not None]
                    norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())
                if norm is None:  # DeepSpeed clips inside its engine and reports no norm
                    norm = float("nan")
                elif not math.isfinite(norm := float(norm)):
                    self._diverged(step, "the gradient norm", norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(step)
                step += 1
                if math.isfinite(norm):
                    totals["grad_norm"] = norm
                for k, v in totals.items():
                    window.setdefault(k, []).append(v)
                bar.update(1)
                bar.set_postfix(loss=f"{totals['loss']:.4f}", lr=f"{lr:.2e}")
                last = step == steps
                if (stage.log_every and step % stage.log_every == 0) or last:
                    means = self._window_means(window)
                    now = time.time()
                    self.metrics.write({"stage": stage.name, "step": step, "lr": lr, **means,
                                        "examples_per_s": n_examples * acc.num_processes / max(now - t_last, 1e-9),
                                        "elapsed_s": now - t_start})
                    window, t_last, n_examples = {}, now, 0
                if eval_fn is not None and ((stage.eval_every and step % stage.eval_every == 0) or last):
                    self._evaluate(eval_fn, step)
                if (stage.save_every and step % stage.save_every == 0) or last:
                    self.save(step)
        finally:
            bar.close()
        return True
