"""Run directories and checkpoints: written atomically, validated on load.

A run directory holds ``checkpoint.pt`` (everything needed to continue exactly),
``metrics.jsonl`` (one JSON object per logged step) and the pictures of the run.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config

FORMAT = "iodine-pyro-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, foreign or incompatible (message names the file)."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, *, cfg: Config, system_state: dict, optimizer_state: dict,
                    step: int, data_state: dict, data: dict, extra: dict | None = None) -> None:
    atomic_save({
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
        "system": system_state, "optimizer": optimizer_state, "step": step,
        "rng": rng_state(), "data_state": data_state, "data": data, "extra": extra or {},
    }, path)


def save_weights(path: Path, ckpt: dict[str, Any], extra: dict | None = None) -> None:
    """A checkpoint's parameters and configuration only (no optimiser, RNG or data state): a
    trained model to ship, evaluate and sample from, not to resume."""
    atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, "config": ckpt["config"].to_dict()
                 if isinstance(ckpt["config"], Config) else ckpt["config"], "system": ckpt["system"],
                 "step": int(ckpt["step"]), "extra": extra or {}}, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint file; raise `CheckpointError` naming it otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, foreign objects
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason[:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an iodine-pyro checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    missing = {"config", "system", "step"} - set(ckpt)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    try:
        ckpt["config"] = Config.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid configuration: {e}") from None
    return ckpt


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics file (``metrics.jsonl``, or the run directory holding it), in
    order; a line cut by a crash is skipped; [] when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows past `step` (and a line cut by a crash): a resumed run logs them again."""
    if not Path(path).exists():
        return
    keep = "".join(json.dumps(row) + "\n" for row in read_metrics(path) if row["step"] <= step)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(keep)
    os.replace(tmp, path)

