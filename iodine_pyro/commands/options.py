"""Options and checks shared by the commands, declared once.

Every command module imports its shared options from here (`Device`, `Seed`, `Data`,
`NumIters`, `NumSlots`, `Quiet`, ...). Numbers are range-checked by the option itself
(``min=``, or `positive` where the bound is open), fixed names by an Enum (`names_of`: datasets,
presets, decoders), names from an extensible registry by `choice` (guides), the device
before any work (`check_device`). Heavy modules (torch, pyro, xarray, matplotlib) are imported inside the
commands, so that ``iodine-pyro --help`` and a usage error answer at once.
"""

from __future__ import annotations

import math
from enum import Enum
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import DECODERS, SEED_MAX


class UserError(Exception):
    """An error the user can fix; printed as one line."""


class OptionError(typer.BadParameter):
    """A bad option value; its message names the option (printed as it is, one line)."""


# -- values checked against a registry ---------------------------------------------------

def names_of(kind: str, names: Sequence[str]) -> type[Enum]:
    """A str Enum of fixed `names`, for an option whose choices are known at import: click
    checks the value and lists the choices in `--help` and in its one-line error."""
    return Enum(kind, {n: n for n in names}, type=str)


def choice(option: str, names: Callable[[], Sequence[str]], what: str) -> Callable[[Optional[str]], Optional[str]]:
    """A callback that accepts one of `names()` (or None) and refuses anything else in one
    line that lists them ("unknown `what` ..."): for choices from a registry that code
    outside the package may extend after the command line is built (guides)."""
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
                                   min=0, max=SEED_MAX)]
Data = Annotated[Optional[Path], typer.Option(help="Dataset directory (default: the run's held-out set).")]
NumIters = Annotated[Optional[int], typer.Option(
    min=1, help="Refinement steps (default: the trained T; more looks beyond it, fewer stops early).")]
NumSlots = Annotated[Optional[int], typer.Option(min=1, help="K at test time (default: the trained K).")]
NumImages = Annotated[int, typer.Option(min=1, help="Images to use (the first N of the dataset).")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per batch.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Amp = Annotated[bool, typer.Option(
    "--amp/--no-amp",
    help="bf16 autocast for the networks: about twice the images per CPU-second on CPUs with bf16 "
         "instructions (AVX512-BF16, AMX; slower without them), the numbers changed in their last digits. "
         "Default: float32.")]
Threads = Annotated[Optional[int], typer.Option(
    min=1,
    help="CPU threads (default: one per core that other work leaves free when the command starts; "
         "the first line says what was chosen).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
RunRef = Annotated[str, typer.Argument(
    metavar="RUN", help="Run directory, checkpoint file, or a shipped model (pretrained:tetrominoes).")]
Dataset = names_of("Dataset", dataset_names())
Decoder = names_of("Decoder", DECODERS)
Preset = names_of("Preset", preset_names())
DatasetName = Annotated[Dataset, typer.Option(help="Dataset and its architecture (appendix C).")]
PresetName = Annotated[Preset, typer.Option(
    help="paper (appendix C), deepmind (released code) or fast (learns fastest per hour).")]


def use_threads(threads: Optional[int], device: str = "cpu", err: bool = False) -> None:
    """Set torch's CPU threads (`iodine_pyro.threads.apply`) and say what was chosen: the
    command's first line (on stderr with `err`, where stdout is JSON); under torchrun only
    rank 0 says it."""
    import os

    from ..threads import apply

    line = apply(threads, device)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(line, err=err)
