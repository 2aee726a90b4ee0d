"""When `fit` stops: small rules that the training loop asks before every step.

Each rule answers `due(step)`. The step limit is the same on every process; signals and
clocks are not, so the loop agrees on those over all processes (`first_due`) and every
process stops after the same step. Too many non-finite steps in a row stop the run with
an error instead (`FaultLimit`), after the last good state is saved.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from .ddp import Processes


class TrainingError(RuntimeError):
    """Training cannot go on (repeated numerical faults); the message says what to do."""


class StepLimit:
    """Stop once the run has `steps` optimisation steps (math.inf: never)."""

    reason, agreed = "done", False            # every process is at the same step

    def __init__(self, steps: float):
        self.steps = steps

    def due(self, step: int) -> bool:
        return step >= self.steps


class TimeLimit:
    """Stop after `seconds` of training in this call, counted from construction on the
    `clock`: "wall" seconds, or "cpu" seconds of this process (thread-seconds: on one
    thread, the time an idle core would take, whatever else the machine runs)."""

    reason, agreed = "time", True

    def __init__(self, seconds: float, clock: str = "wall"):
        self.seconds, self.clock = seconds, clock
        self._wall, self._cpu = time.time(), time.process_time()

    def due(self, step: int) -> bool:
        used = time.time() - self._wall if self.clock == "wall" else time.process_time() - self._cpu
        return used >= self.seconds


class Signals:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop, while entered."""

    reason, agreed = "signal", True

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self) -> Signals:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def due(self, step: int) -> bool:
        return self.signal is not None


def first_due(rules: list, step: int, processes: Processes) -> str | None:
    """The reason of the first rule that is due at `step` (on any process, for the rules
    that need agreeing), or None to go on."""
    for rule in rules:
        due = rule.due(step)
        if processes.any(due) if rule.agreed else due:
            return rule.reason
    return None


class FaultLimit:
    """Stop the run when `limit` steps in a row were non-finite (``train.max_bad_steps``):
    a learning rate or data that will not recover."""

    def __init__(self, limit: int = 20):
        self.limit = limit

    def exceeded(self, run: int) -> bool:
        return run >= self.limit

    def error(self, run: int, where: str, saved: Path) -> TrainingError:
        """The error that stops the run; `where` says at which step it was noticed."""
        return TrainingError(f"{run} non-finite steps in a row {where}; the last good state is saved in {saved} "
                             f"(lower the learning rate or check the data)")

