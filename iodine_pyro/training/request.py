"""What `fit` is asked to do (`FitRequest`, checked whole before any work) and what it
did (`FitResult`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import SEED_MAX
from ..fields import INT_MAX
from ..run import Run
from ..system import Iodine


@dataclass(kw_only=True)
class FitRequest:
    """A training run to make or continue; every argument is checked on construction (one
    line naming it, ValueError), before anything is read or written.

    Args:
        out: run directory. When it holds a checkpoint of the same configuration the run
            continues from it; another configuration is refused unless `resume` (continue
            with the stored configuration, `overrides` changing only its learning-rate
            schedule: `config.resumed_config`) or `overwrite` (start afresh).
        steps: total number of optimisation steps of the run; None: as many as `time_limit`
            allows (then required).
        dataset, preset, overrides: the configuration (see `make_config`).
        data: a stored dataset directory; default: generate `num_images` images (and a
            held-out set) in OUT/data.
        eval_data: held-out images for `evaluate` (recorded in the checkpoint); default: the
            generated held-out set, or with `data` one generated like it (`held_out_for`).
        num_images: images to generate when `data` is not given.
        seed: seeds parameters, sampling, generated data and the data order.
        log_every, checkpoint_every: a metrics row, and a checkpoint, every so many steps.
        device: cpu, cuda or cuda:N.
        progress: show progress bars.
        amp: bf16 autocast for the networks (default: `speed.speed_settings`).
        channels_last: channels-last conv weights (default: on).
        sync_free: check for non-finite steps on the device and read the outcome every
            `log_every` steps instead of every step (default: on for CUDA). Skipped steps
            then count towards `steps`, and a run of `max_bad_steps` faults is noticed at
            the next logging step (the parameters stay those of the last good step).
        time_limit: stop (with a checkpoint) after this many seconds of training in this
            call, even before `steps`; running it again continues.
        time_clock: what `time_limit` counts: "wall" seconds, or "cpu" seconds of this
            process (thread-seconds: on one thread, the time an idle core would take,
            whatever else the machine runs).
        report: called with a line for the user (on rank 0): that the run resumes, and from
            which step.
    """

    out: str | Path
    steps: int | None
    dataset: str = "tetrominoes"
    preset: str = "paper"
    overrides: dict[str, Any] | None = None
    data: str | Path | None = None
    eval_data: str | Path | None = None
    num_images: int = 4096
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250
    device: str = "cpu"
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    amp: bool | None = None
    channels_last: bool | None = None
    sync_free: bool | None = None
    time_limit: float | None = None
    time_clock: str = "wall"
    report: Callable[[str], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._check()
        self.out = Path(self.out)

    @property
    def step_limit(self) -> float:
        """The run's total steps; math.inf when only the time limit bounds it."""
        return math.inf if self.steps is None else self.steps

    def _integer(self, name: str, low: int, high: int = INT_MAX) -> None:
        v = getattr(self, name)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise ValueError(f"`{name}` must be an integer from {low} to {high}, got {v!r}")

    def _check(self) -> None:
        """The arguments by type and range (one line naming the argument)."""
        if self.steps is None:
            if self.time_limit is None:
                raise ValueError("`steps` may be left out only with a `time_limit`")
        else:
            self._integer("steps", 1, 2**62)
        self._integer("num_images", 1)
        self._integer("log_every", 1)
        self._integer("checkpoint_every", 1)
        self._integer("seed", 0, SEED_MAX)            # numpy's seeds, with room for the held-out set's
        limit = self.time_limit
        if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool)
                                      and 0 < limit < math.inf):
            raise ValueError(f"`time_limit` must be a positive, finite number of seconds, got {limit!r}")
        if self.time_clock not in ("wall", "cpu"):
            raise ValueError(f"`time_clock` must be wall or cpu, got {self.time_clock!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"{self.device!r} is not a device; use cpu, cuda or cuda:N") from None


@dataclass
class FitResult:
    step: int
    out: Path
    stopped: str           # "done" | "signal" | "time" (the time limit was reached)
    last_metrics: dict[str, Any]
    skipped: int = 0       # steps skipped for non-finite loss or gradient
    rank: int = 0          # this process's rank (0 for a single process)
    resumed_from: int | None = None     # the step the call continued from, or None for a new run
    system: Iodine | None = None        # the trained system (eval mode)
    data: dict[str, str | None] | None = None   # the training and held-out sets ("train", "eval")

    def run(self) -> Run:
        """The trained run as a `Run` (the system just trained, not read back from disk)."""
        return Run.of_training(self.system, self.step, self.data, self.out)
