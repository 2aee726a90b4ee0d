"""Options and checks shared by the commands, declared once.

Every command module imports its shared options from here (`Device`, `Seed`, `Data`,
`NumIters`, `NumSlots`, `Quiet`, ...). Numbers are range-checked by the option itself
(`at_least`, `positive`), names against the registries they name (`choice`), the device before any work
(`check_device`). Heavy modules (torch, pyro, xarray, matplotlib) are imported inside the
commands, so that ``iodine-pyro --help`` and a usage error answer at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import SEED_MAX


class UserError(Exception):
    """An error the user can fix; printed as one line."""


class OptionError(typer.BadParameter):
    """A bad option value; its message names the option (printed as it is, one line)."""


# -- values checked against a registry ---------------------------------------------------

def choice(option: str, names: Callable[[], Sequence[str]], what: str) -> Callable[[Optional[str]], Optional[str]]:
    """A callback that accepts one of `names()` (or None) and refuses anything else in one
    line that lists them ("unknown `what` ...")."""
    def check(value: Optional[str]) -> Optional[str]:
        if value is not None and value not in names():
            raise OptionError(f"unknown {what} {value!r} for {option}; choose from {', '.join(names())}")
        return value
    return check


def dataset_names() -> list[str]:
    from ..config import ARCHITECTURES
    return list(ARCHITECTURES)


def preset_names() -> list[str]:
    from ..config import PRESETS
    return list(PRESETS)


def guide_names() -> list[str]:
    from ..guides import guide_kinds
    return guide_kinds()


def _listed(names: Callable[[], Sequence[str]]) -> str:
    return ", ".join(names())


def at_least(option: str, low: int) -> Callable[[Optional[int]], Optional[int]]:
    """A callback that accepts a number >= `low` (or None)."""
    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and not value >= low:
            raise OptionError(f"{option} must be at least {low}, got {value}")
        return value
    return check


def seed_value(option: str = "--seed") -> Callable[[Optional[int]], Optional[int]]:
    """A callback that accepts a seed: an integer from 0 to `SEED_MAX` (numpy's seeds, with
    room for the generated held-out set's, `iodine_pyro.config.held_out`)."""
    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and not 0 <= value <= SEED_MAX:
            raise OptionError(f"{option} must be an integer from 0 to {SEED_MAX}, got {value}")
        return value
    return check



def positive(option: str) -> Callable[[Optional[float]], Optional[float]]:
    """A callback that accepts a finite number above 0 (or None)."""
    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and not (0 < value < math.inf):
            raise OptionError(f"{option} must be positive and finite, got {value}")
        return value
    return check


# -- the device --------------------------------------------------------------------------

CUDA_INSTALL = ("install a CUDA build of torch, e.g. pip install torch --index-url "
                "https://download.pytorch.org/whl/cu124 (see the README's GPU section)")


def check_device(value: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, usable here: refused with one line (how to install a
    CUDA build of torch, when this one is a CPU build) before any work starts."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise OptionError(f"--device {value!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return value
    if device.type != "cuda":
        raise OptionError(f"--device {value!r}: this tool runs on cpu or cuda")
    if torch.version.cuda is None:
        raise OptionError(f"--device {value}: this torch ({torch.__version__}) is a CPU build; {CUDA_INSTALL}")
    if not torch.cuda.is_available():
        raise OptionError(f"--device {value}: torch sees no GPU (no driver, or CUDA_VISIBLE_DEVICES hides it)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionError(f"--device {value!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return value


# -- durations ---------------------------------------------------------------------------

def parse_duration(text: Optional[str], option: str = "--time-limit") -> Optional[float]:
    """Seconds from "90s", "45m", "2h" or "1.5h" (None stays None). A bare number is refused:
    "--time-limit 4" read as seconds once stopped a run meant to train 4 minutes after 4 s."""
    if text is None:
        return None
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    scale = units.get(t[-1:])
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise OptionError(f"{option} {text!r} is not a duration; write it with a unit: 90s, 45m or 2h") from None
    if scale is None:
        raise OptionError(f"{option} {text!r} has no unit; write {t}s, {t}m or {t}h (seconds, minutes, hours)")
    if not (value > 0 and math.isfinite(value)):
        raise OptionError(f"{option} must be a positive, finite duration, got {text!r}")
    return value


# -- the shared options ------------------------------------------------------------------

Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N (checked before any work starts).",
                                     callback=check_device)]
Seed = Annotated[int, typer.Option(help="Seed of the posterior samples and of every random choice.",
                                   callback=seed_value())]
Data = Annotated[Optional[Path], typer.Option(help="Dataset directory (default: the run's held-out set).")]
NumIters = Annotated[Optional[int], typer.Option(
    callback=at_least("--num-iters", 1), help="Refinement steps (default: the trained T; more looks beyond it, fewer stops early).")]
NumSlots = Annotated[Optional[int], typer.Option(callback=at_least("--num-slots", 1), help="K at test time (default: the trained K).")]
NumImages = Annotated[int, typer.Option(callback=at_least("--num-images", 1), help="Images to use (the first N of the dataset).")]
BatchSize = Annotated[int, typer.Option(callback=at_least("--batch-size", 1), help="Images per batch.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Threads = Annotated[Optional[int], typer.Option(
    callback=at_least("--threads", 1),
    help="CPU threads (default: one per core that other work leaves free when the command starts; "
         "the first line says what was chosen).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
RunRef = Annotated[str, typer.Argument(
    metavar="RUN", help="Run directory, checkpoint file, or a shipped model (pretrained:tetrominoes).")]
DatasetName = Annotated[str, typer.Option(
    help=f"Dataset and its architecture (appendix C): {_listed(dataset_names)}.",
    callback=choice("--dataset", dataset_names, "dataset"))]
PresetName = Annotated[str, typer.Option(
    help="paper (appendix C), deepmind (released code) or fast (learns fastest per hour).",
    callback=choice("--preset", preset_names, "preset"))]


def use_threads(threads: Optional[int], device: str = "cpu", err: bool = False) -> None:
    """Set torch's CPU threads (`iodine_pyro.threads.apply`) and say what was chosen: the
    command's first line (on stderr with `err`, where stdout is JSON); under torchrun only
    rank 0 says it."""
    import os

    from ..threads import apply

    line = apply(threads, device)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(line, err=err)
