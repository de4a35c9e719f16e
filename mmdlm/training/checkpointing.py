"""Atomic training checkpoints: model (safetensors), optimizer, scheduler, RNG states and data position, written
into a temporary folder beside the target and renamed into place only once complete."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being trained (different shapes or parameter names)."""


# ---------------------------------------------------------------------------------------------------- atomic folders


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems / platforms do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def atomic_directory(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create folder ``target`` atomically: ``write(tmp)`` fills a temporary folder beside it, which is fsynced
    and renamed to ``target``. An existing ``target`` stays in place until the new one is complete; a crash
    at any point leaves either the old or the new folder, plus at most a ``.tmp-*``/``.old-*`` leftover that
    :func:`remove_leftovers` deletes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{_TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            # Directories cannot be os.replace'd over a non-empty target: move the old one aside first.
            old = target.parent / f"{_OLD_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-*`` folders of interrupted saves in ``folder``; restore a target whose replacement was
    interrupted between its two renames. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(_OLD_PREFIX):
            original = folder / p.name[len(_OLD_PREFIX):].rsplit("-", 1)[0]
            if not original.exists():
                os.rename(p, original)
                continue
        if p.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors and ints, loadable with weights_only=True."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
            "has_gauss": int(np_has_gauss), "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (a checkpoint exists only once fully written)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name[len(STEP_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint in ``folder``, or None."""
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    folder: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: Optional[dict[str, Any]] = None,
    scheduler_state: Optional[dict[str, Any]] = None,
    state: Optional[dict[str, Any]] = None,
    keep: int = 1,
    ema_state: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write checkpoint ``step`` into ``folder`` atomically and then prune to the newest ``keep`` ones.

    ``state`` is JSON metadata (stage, recipe fingerprint, metrics); the step and the RNG states are added here.
    ``ema_state`` (moving averages of the parameters, :class:`mmdlm.training.ema.ParameterEMA`) goes to
    ``ema.safetensors``.
    The previous checkpoint is deleted only after the new one has been renamed into place.
    """
    folder = Path(folder)
    remove_leftovers(folder)
    # Clone so tied weights (lm_head = embed_tokens) do not make safetensors refuse shared storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    ema = {k: v.detach().to("cpu").contiguous().clone() for k, v in ema_state.items()} if ema_state else None
    meta = {**(state or {}), "step": int(step), "time": time.time()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if ema is not None:
            save_file(ema, str(tmp / EMA_FILE), metadata={"format": "pt"})
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if scheduler_state is not None:
            torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(capture_rng_state(), tmp / "rng_state.pt")
        # The state file goes last: list_checkpoints only trusts folders that have it.
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    path = atomic_directory(folder / checkpoint_name(step), write)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes stored in a checkpoint (or model folder), read without loading tensors."""
    file = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    with safe_open(str(file), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_compatible(path: str | os.PathLike, model_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise :class:`CheckpointMismatchError` unless the checkpoint holds exactly the model's parameters
    with the same shapes (so a resume fails before any training step, not inside one)."""
    saved = checkpoint_shapes(path)
    missing = sorted(set(model_shapes) - set(saved))
    unexpected = sorted(set(saved) - set(model_shapes))
    differ = sorted(k for k in set(saved) & set(model_shapes) if tuple(saved[k]) != tuple(model_shapes[k]))
    if not (missing or unexpected or differ):
        return
    lines = [f"cannot resume from {path}: it was saved from a different model."]
    if differ:
        k = differ[0]
        lines.append(f"  {len(differ)} shape mismatch(es), e.g. {k}: {list(saved[k])} in the checkpoint vs "
                     f"{list(model_shapes[k])} now")
    if missing:
        lines.append(f"  {len(missing)} parameter(s) missing from the checkpoint, e.g. {missing[0]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected parameter(s) in the checkpoint, e.g. {unexpected[0]}")
    lines.append("Resume with the recipe that wrote it, or use a fresh --output directory (or drop --resume).")
    raise CheckpointMismatchError("\n".join(lines))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint: ``{"model", "optimizer", "scheduler", "rng", "state", "ema"}`` (absent parts are None).

    Everything but the safetensors model is read with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")

    def _load(name: str) -> Any:
        p = path / name
        return torch.load(p, map_location=map_location, weights_only=True) if p.is_file() else None

    return {
        "model": load_file(str(path / MODEL_FILE), device=str(map_location)),
        "optimizer": _load("optimizer.pt"),
        "scheduler": _load("scheduler.pt"),
        "rng": _load("rng_state.pt"),
        "state": json.loads((path / STATE_FILE).read_text(encoding="utf-8")),
        "ema": load_file(str(path / EMA_FILE), device=str(map_location)) if (path / EMA_FILE).is_file() else None,
    }
