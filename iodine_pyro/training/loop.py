"""The training loop: batches through the step until a stopping rule says stop.

    while no rule is due:                 # steps, signals, time (`stops`)
        x = next batch (this process's share, on the device)
        outcome = step(x, state.step, state.schedule())
        skipped on the host? count it, maybe stop on faults, next batch
        state.step += 1; log every `log_every`; checkpoint every `checkpoint_every`

It checkpoints at the end, on a signal or at the time limit (then it returns the reason),
and before it raises: when a chunk of the data is missing or damaged, and when too many
steps in a row were not finite (`stops.FaultLimit`). What it checkpoints is always the
last good state: a step that was not finite was undone by the step itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyro
import torch

from ..checkpoint import CHECKPOINT, METRICS
from ..data import DatasetError
from .ddp import Processes
from .report import MetricsLog, TrainingBar
from .request import FitRequest
from .speed import to_device
from .state import TrainingState
from .step import Step, StepOutcome
from .stops import FaultLimit, Signals, StepLimit, TimeLimit, first_due

log = logging.getLogger(__name__)


class Loop:
    """`fit`'s loop over one run.

    Args:
        state: the training state, new or restored.
        step: the optimisation step (`step.make_step`).
        processes: this process's place (rank 0 writes the run directory).
        request: the run's settings: its directory, steps, time limit, cadences, progress.
        background: the dataset's background groups (the logged FG-ARI leaves them out).
    """

    def __init__(self, state: TrainingState, step: Step, processes: Processes, request: FitRequest,
                 background: int):
        self.state, self.step, self.processes = state, step, processes
        self.log_every, self.checkpoint_every = request.log_every, request.checkpoint_every
        self.path = request.out / CHECKPOINT
        state.start_clock()                # training time counts from here, as the time limit does
        self.signals = Signals()
        self.limit = StepLimit(request.step_limit)
        self.rules = [self.limit, self.signals]
        if request.time_limit is not None:
            self.rules.append(TimeLimit(request.time_limit, request.time_clock))
        self.faults = FaultLimit(state.cfg.train.max_bad_steps)
        self.metrics = MetricsLog(request.out / METRICS, processes.is_main, background)
        self.bar = TrainingBar(request.step_limit, state.step,
                               request.time_limit if request.time_clock == "wall" else None,
                               disable=not (request.progress and processes.is_main), desc=f"fit {state.cfg.dataset}")
        self.batch: dict[str, torch.Tensor] = {}
        self.last_skipped = False          # the last step was skipped (host-checked)

    def run(self) -> str:
        """Train until a rule is due and checkpoint; its reason ("done", "signal", "time")."""
        first = self.state.step
        # Pyro's argument validation costs ~20% per step; non-finite values are the step's to catch.
        try:
            with self.signals, self.metrics, pyro.validation_enabled(False):
                stop = self._train()
                if self.state.step > first and self.metrics.last.get("step") != self.state.step \
                        and not self.last_skipped:
                    self._log()                                  # stopped between logging steps
                self.checkpoint()
        finally:
            self.bar.close()
        return stop

    def _train(self) -> str:
        state, batches = self.state, iter(self.state.batches)
        while (stop := first_due(self.rules, state.step, self.processes)) is None:
            self.batch = self._next_batch(batches)
            outcome = self.step(self.batch["image"], state.step, state.schedule())
            state.observe(outcome.mse, self.step.last_applied)
            self.last_skipped = outcome.applied is False       # known on the host only when host-checked
            if self.last_skipped:
                self._skipped(outcome)
                continue
            state.step += 1
            self.bar.update(state.step)
            if state.step % self.log_every == 0 or self.limit.due(state.step):
                self._log()
            if state.step % self.checkpoint_every == 0:
                self.checkpoint()
        return stop

    def _next_batch(self, batches: Iterator) -> dict[str, torch.Tensor]:
        """This process's share of the next global batch, on its device."""
        try:
            return to_device(self.processes.shard(next(batches)), self.processes.device)
        except DatasetError as e:                               # a chunk missing or damaged since the start
            self.checkpoint()
            raise DatasetError(f"{e} (training stopped at step {self.state.step}; the run is saved in "
                               f"{self.path})") from None

    def _skipped(self, outcome: StepOutcome) -> None:
        """A host-checked step that was not finite: warn, and stop when it ends a run of too many."""
        log.warning("step %d: non-finite batch, loss, gradient or update (loss %s, gradient norm %s); skipped",
                    self.state.step + 1, outcome.loss, outcome.grad_norm)
        _, run = self.step.faults.settle()
        self._stop_on_faults(run, f"after step {self.state.step}")

    def _log(self) -> None:
        """Write the metrics row of the step just done: the one host read of the sync-free step."""
        loss, grad_norm, skipped, longest = self.step.settle()
        self._stop_on_faults(longest, f"before step {self.state.step}")
        row = self.metrics.write(self.state, loss, grad_norm, skipped, self.batch)
        self.bar.show(loss=f"{loss:.4g}", fg_ari=f"{row.get('fg_ari', float('nan')):.3f}")

    def _stop_on_faults(self, run: int, where: str) -> None:
        if self.faults.exceeded(run):
            self.checkpoint()
            raise self.faults.error(run, where, self.path)

    def checkpoint(self) -> None:
        """Save the state (rank 0), once every process is known to hold the same one."""
        self.step.ensure_in_sync()
        if self.processes.is_main:
            self.state.save(self.path)
