"""Run directories and checkpoints: written atomically, validated on load.

A run directory holds ``checkpoint.pt`` (everything needed to continue exactly),
``metrics.jsonl`` (one JSON object per logged step) and the pictures of the run.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .io import check_target, write_bytes, write_text

FORMAT = "iodine-pyro-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, foreign or incompatible (message names the file)."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, whole or not at all (`iodine_pyro.io`): the bytes are made in memory,
    then written to a temporary file in the same directory, fsynced and renamed over
    `path`. A full disk or a read-only directory gives a `WriteError` naming `path` (torch
    would report a failed zip write) and leaves the previous file intact."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


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


@contextmanager
def seeded(seed: int, like: torch.Tensor) -> Iterator[None]:
    """Torch's draws inside come from a stream seeded by `seed` (the CPU's and `like`'s
    GPU's); the stream outside, training's or a caller's, is left as it was."""
    with torch.random.fork_rng(devices=[like.device.index or 0] if like.is_cuda else []):
        torch.manual_seed(seed)
        yield


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


def _load_failure(path: Path, err: Exception) -> CheckpointError:
    """A one-line reason a file could not be unpickled (never torch's advice to load it
    with ``weights_only=False``, which would run whatever code the file holds)."""
    text = str(err)
    if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
        return CheckpointError(f"{path} holds Python objects that a checkpoint never holds (not an iodine-pyro "
                               f"checkpoint, or altered); it is not loaded")
    if isinstance(err, OSError):
        return CheckpointError(f"cannot read checkpoint {path}: {err.strerror or type(err).__name__}")
    reason = " ".join(text.split()) or type(err).__name__
    if "zip" in reason.lower() or "central directory" in reason.lower():
        reason = "truncated, or not a checkpoint file"
    return CheckpointError(f"cannot read checkpoint {path}: {reason[:160]}")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint file; raise `CheckpointError` naming it otherwise.

    Only tensors and plain values are unpickled (``weights_only``), and the stored
    configuration passes `iodine_pyro.config.validate` like any other, as does the step."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, foreign objects
        raise _load_failure(path, e) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an iodine-pyro checkpoint")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ckpt.get('format_version')!r}, "
                              f"this version reads {FORMAT_VERSION}")
    missing = [k for k in ("config", "system", "step") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    try:
        ckpt["config"] = Config.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid configuration: {e}") from None
    step = ckpt["step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**62:
        raise CheckpointError(f"checkpoint {path} has an invalid step {step!r} (a count of steps >= 0)")
    system = ckpt["system"]
    if not isinstance(system, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in system.items()):
        raise CheckpointError(f"checkpoint {path} has no parameters (its 'system' is not a table of tensors)")
    if not isinstance(ckpt.get("extra", {}), dict):
        raise CheckpointError(f"checkpoint {path} has an invalid 'extra' entry")
    return ckpt


def check_resumable(ckpt: dict[str, Any], path: Path) -> None:
    """What `fit` needs to continue a run is in the checkpoint and of the right kind:
    optimiser state, RNG states, data position and data, each named when it is not."""
    if "optimizer" not in ckpt:
        raise CheckpointError(f"{path} holds a model's weights only (no optimiser or data state): "
                              f"it cannot be resumed; train into another `out`")
    missing = [k for k in ("rng", "data_state", "data") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it cannot be resumed")
    opt, rng, state, data = ckpt["optimizer"], ckpt["rng"], ckpt["data_state"], ckpt["data"]
    if not isinstance(opt, dict) or not {"state", "param_groups"} <= set(opt):
        raise CheckpointError(f"checkpoint {path} has an invalid optimiser state")
    if not isinstance(rng, dict) or not torch.is_tensor(rng.get("torch")) or rng["torch"].dtype != torch.uint8 \
            or not isinstance(rng.get("python"), tuple):
        raise CheckpointError(f"checkpoint {path} has invalid random-number-generator states")
    if not isinstance(state, dict) or not all(
            isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0
            for k in ("epoch", "position")):
        raise CheckpointError(f"checkpoint {path} has an invalid data position {state!r}")
    if not isinstance(data, dict) or not isinstance(data.get("train"), str) or \
            not isinstance(data.get("eval"), (str, type(None))):
        raise CheckpointError(f"checkpoint {path} does not name its training data")
    generated = data.get("generated")
    if generated is not None and not (
            isinstance(generated, dict) and isinstance(generated.get("dataset"), str)
            and all(isinstance(generated.get(k), (list, tuple)) and len(generated[k]) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in generated[k])
                    for k in ("train", "eval") if k in generated)):
        raise CheckpointError(f"checkpoint {path} has an invalid record of its generated data")


def _numeric(value: Any, depth: int = 0) -> bool:
    """A number (NaN and infinities included), null, or lists and tables of them."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    if depth < 3 and isinstance(value, list):
        return all(_numeric(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return all(_numeric(v, depth + 1) for v in value.values())
    return False


def valid_row(row: Any) -> bool:
    """A row as `fit` writes it: a JSON object whose ``step`` is a whole number >= 1 and
    whose other values are numbers (NaN and infinities included), null, or lists and
    tables of them (``per_step``)."""
    return (isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
            and 0 < row["step"] < 2**62 and _numeric(row))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics file (``metrics.jsonl``, or the run directory holding it), in
    order; [] when there is none. The file is the user's to edit, so every row is checked
    (`valid_row`): a line cut by a crash, or a row that is not one `fit` writes (a step
    that is not a whole number, a value that is not a number), is skipped, with one
    warning naming the file and the first such line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        return []
    rows, bad = [], []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        log.warning("cannot read %s: %s", path, e.strerror or type(e).__name__)
        return []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if valid_row(row):
            rows.append(row)
        elif line.strip():
            bad.append(number)
    if bad and not (len(bad) == 1 and bad[0] == len(text.splitlines()) and not text.endswith("\n")):
        log.warning("%s: skipped %d line(s) that are not metrics rows (first: line %d)", path, len(bad), bad[0])
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop logged rows past `step` (and a line cut by a crash): a resumed run logs them
    again. The file is rewritten whole (`iodine_pyro.io`), never through a link."""
    path = Path(path)
    check_target(path)
    if not path.exists():
        return
    keep = "".join(json.dumps(row) + "\n" for row in read_metrics(path) if row["step"] <= step)
    write_text(path, keep)
