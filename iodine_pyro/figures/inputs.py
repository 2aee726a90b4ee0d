"""The computing side shared by the figures that run a model: a run and the dataset a
figure reads, its first images, the seed, tensors to arrays. No matplotlib here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from ..data import load_images
from ..run import IMAGES, SEQUENCES, Run
from ..system import Iodine


@dataclass
class Opened:
    """A run with the dataset a figure reads."""

    run: Run
    ds: Any
    data: str

    @property
    def system(self) -> Iodine:
        return self.run.system

    @property
    def cfg(self):
        return self.run.cfg

    def title(self) -> str:
        return self.run.title()


def open_run(run: Opened | Run | str | Path, data: str | Path | None, device: str, kind: str) -> Opened:
    """A run and its data; ``kind`` (the plot's name) must suit the data: `sequence` draws
    sequences, every other kind single images. An `Opened` run is returned as it is."""
    if isinstance(run, Opened):
        return run
    run = Run.of(run, device)
    need = {"sequence": SEQUENCES, "decomposition": None}.get(kind, IMAGES)   # fit draws sequence runs too
    ds, where = run.dataset(data, need=need, command=f"plot {kind}")
    return Opened(run, ds, where)


def first_images(run: Opened, num_images: int, device: str) -> dict[str, torch.Tensor]:
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    n = min(num_images, run.ds.sizes["image"])
    return {k: v.to(device) for k, v in load_images(run.ds, 0, n).items()}


def set_seed(value: int) -> None:
    pyro.set_rng_seed(value)  # torch, numpy and random


def final(system: Iodine, steps: int | None = None) -> str:
    """What the last step of a guide is, for titles: a refinement step, or one encoder pass."""
    if not system.guide.refines:
        return f"the {system.guide.kind} guide's one-shot posterior"
    return "final refinement step" + (f" ({steps})" if steps else "")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
