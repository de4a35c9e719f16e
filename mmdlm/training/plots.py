"""Metrics as JSON lines (``metrics.jsonl``) and a PNG of the training curves (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional


class MetricsLog:
    """Append-only JSON-lines log; ``truncate_after`` drops records a resumed run will write again."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_after(self, stage: str, step: int) -> None:
        """Remove this stage's records with a step above ``step`` (the resumed run writes them again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if not (r.get("stage") == stage and r.get("step", 0) > step)]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_metrics(records: list[dict[str, Any]], out_png: str | os.PathLike, title: Optional[str] = None) -> Optional[Path]:
    """One row per stage: training loss (and eval metrics, dashed) against the step, and the learning rate.
    Returns the PNG path, or None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    stages: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "stage" in r and "step" in r:
            stages.setdefault(r["stage"], []).append(r)
    stages = {k: v for k, v in stages.items() if any(_numeric_keys(v))}
    if not stages:
        return None
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.2 * len(stages)), squeeze=False)
    for row, (stage, recs) in enumerate(stages.items()):
        ax_loss, ax_lr = axes[row]
        for key in sorted(_numeric_keys(recs)):
            if key in ("lr", "step", "time", "elapsed_s", "examples_per_s", "grad_norm"):
                continue
            pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                style = "--o" if key.startswith("eval") else "-"
                ax_loss.plot(xs, ys, style, label=key, markersize=3)
        ax_loss.set_title(f"{stage}: losses")
        ax_loss.set_xlabel("step")
        ax_loss.legend(fontsize=7)
        ax_loss.grid(alpha=0.3)
        lr = [(r["step"], r["lr"]) for r in recs if isinstance(r.get("lr"), (int, float))]
        if lr:
            xs, ys = zip(*lr)
            ax_lr.plot(xs, ys, color="tab:gray")
        ax_lr.set_title(f"{stage}: learning rate")
        ax_lr.set_xlabel("step")
        ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    # keep half an inch at the top for the title: tight_layout alone lets the first row overlap it
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.5 if title else 0) / fig.get_figheight()))
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def _numeric_keys(records: list[dict[str, Any]]) -> set[str]:
    return {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "step"}
