"""What a training run reports as it goes: rows of ``metrics.jsonl`` and a progress bar.

Each row has the step, the loss and gradient norm of that step, the steps skipped so far,
``time`` and ``cpu_time`` (the run's training wall and process CPU seconds, summed over
every call that trained it), GECO's beta and the pixel scale where they change, and the
metrics of the step's batch (`evaluate.batch_metrics`). Those metrics sample posteriors on
a random stream of their own (seeded by the step), so logging draws nothing from training's:
a run is the same whatever `log_every`, and a run stopped between two logged steps (a time
limit, a signal) resumes exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import seeded
from ..evaluate import batch_metrics
from ..io import open_append
from .state import TrainingState


class MetricsLog:
    """``metrics.jsonl`` of a run, appended to while entered; on other processes than rank
    0 nothing is written (and no batch metrics are computed).

    Args:
        path: the metrics file.
        main: whether this process writes the run directory.
        background: ground-truth groups that are background (FG-ARI leaves them out).
    """

    def __init__(self, path: Path, main: bool, background: int):
        self.path, self.main, self.background = path, main, background
        self.last: dict[str, Any] = {}                    # the last row written

    def __enter__(self) -> MetricsLog:
        self.file = open_append(self.path) if self.main else open(os.devnull, "a")
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, state: TrainingState, loss: float, grad_norm: float, skipped: int,
              batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Write the row of step ``state.step``, whose images were `batch`; the row."""
        geco, system = state.geco, state.system
        self.last = {"step": state.step, "loss": loss, "grad_norm": grad_norm, "skipped": skipped,
                     **{k: round(v, 3) for k, v in state.clock().items()},
                     **({"beta": float(state.kl_weight)} if geco is not None or state.cfg.train.beta_max != 1 else {}),
                     **({"pixel_scale": system.model.pixel_scale} if state.cfg.train.pixel_scale_final else {}),
                     "num_slots": state.cfg.model.num_slots,        # K of the step (a resume may change it)
                     "batch_size": state.cfg.train.batch_size,      # its images (so may a resume)
                     **(self._batch_metrics(state.step, system, batch) if self.main else {})}
        self.file.write(json.dumps(self.last) + "\n")
        return self.last

    def _batch_metrics(self, step: int, system, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """`batch_metrics` on the random stream of `step`, leaving training's stream as it was."""
        with seeded(step, batch["image"]):
            return batch_metrics(system, batch, self.background)


class TrainingBar:
    """`fit`'s progress bar. With a number of steps it counts steps (and estimates the time
    left from their rate); with only a time limit it counts the limit's seconds, so that it
    shows how much of it is left, with the step reached beside it (a bar over an unknown
    number of steps shows neither a total nor the time left)."""

    def __init__(self, steps: float, step: int, time_limit: float | None, disable: bool, desc: str):
        self.timed = steps == math.inf and time_limit is not None
        self.start, self.step, self.postfix = time.time(), step, {}
        if self.timed:
            self.bar = tqdm(total=max(1, round(time_limit)), disable=disable, desc=desc, dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} of the time "
                                       "limit{postfix}")
        else:
            self.bar = tqdm(total=steps if steps < math.inf else None, initial=min(step, steps), disable=disable,
                            desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        """Step `step` is done."""
        if self.timed:
            self.bar.set_postfix(ordered_dict={"step": step, **self.postfix}, refresh=False)
            self.bar.update(min(self.bar.total, int(time.time() - self.start)) - self.bar.n)
        else:
            self.bar.update(step - self.step)
        self.step = step

    def show(self, **values: str) -> None:
        """Values to show beside the bar (the last logged loss and FG-ARI)."""
        self.postfix = values
        self.bar.set_postfix(ordered_dict={**({"step": self.step} if self.timed else {}), **values})

    def close(self) -> None:
        self.bar.close()
