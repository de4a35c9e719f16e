"""What the stages of one training run share: the recipe, output folder, accelerator and metrics log
(:class:`RunContext`), the early-stop signal, and the fingerprints that guard resuming."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .checkpointing import atomic_directory, latest_checkpoint
from .plots import MetricsLog, plot_metrics
from .recipe import Recipe


class StageStopped(Exception):
    """``stop_after`` ended a stage early; its checkpoint lets ``--resume`` continue it."""


@dataclass
class RunContext:
    recipe: Recipe
    output_dir: Path
    accelerator: Any
    resume: bool
    stop_after: Optional[int]
    metrics: MetricsLog

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, message: str) -> None:
        if self.main:
            print(f"[mmdlm train] {message}", flush=True)

    def plot(self) -> None:
        if self.main:
            plot_metrics(self.metrics.records(), self.output_dir / "curves.png", title=str(self.output_dir))

    def checkpoint_dir(self, stage: Any) -> Path:
        return self.output_dir / "checkpoints" / stage.name

    def check_fresh(self, stage: Any) -> None:
        """Without --resume, refuse to silently restart a stage that has checkpoints."""
        ckpt = latest_checkpoint(self.checkpoint_dir(stage))
        if ckpt is not None and not self.resume:
            raise FileExistsError(
                f"stage {stage.name!r} has a checkpoint at {ckpt}; pass --resume to continue it, or use a fresh "
                "--output directory"
            )

    def finish(self, stage: Any, out: Path, write) -> None:
        """Write the stage's output folder atomically (rank 0), then drop its checkpoints."""
        if self.main:
            atomic_directory(out, write)
            shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)
        self.accelerator.wait_for_everyone()


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
