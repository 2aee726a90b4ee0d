"""Input ablations (the paper's Figures 33 to 40): one run per refinement input left out.

    ablate("tetrominoes", steps=20000, out="runs/ablation")

trains ``out/full`` (every refinement input of the configuration) and ``out/no-<input>``
for each input (``guide.disabled_inputs = (input,)``), all on one generated dataset in
``out/data/train`` (held-out images in ``out/data/test``) with the same seed and settings.
Calling it again continues: a run that reached ``steps`` is skipped, a partial one resumes
from its checkpoint. `iodine_pyro.figures.ablation` draws the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT, load_checkpoint
from .config import held_out, make_config
from .data import DATASETS, ensure_generated
from .training import fit

__all__ = ["FULL", "AblationRun", "ablate", "plan"]

log = logging.getLogger(__name__)

FULL = "full"


@dataclass
class AblationRun:
    """One run of an ablation, as reported to the progress callback.

    ``status``: ``"start"`` (about to train), ``"trained"`` (reached its steps),
    ``"skipped"`` (had already reached them) or ``"stopped"`` (interrupted by a signal).
    """

    name: str                        # "full" or "no-<input>"
    out: Path
    disabled: tuple[str, ...]
    index: int                       # 0-based position in the plan
    total: int
    status: str
    step: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)


def plan(dataset: str, inputs: Sequence[str] | None = None, *, preset: str = "paper",
         overrides: dict[str, Any] | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """The runs of an ablation: ``[("full", ()), ("no-<input>", (input,)), ...]``.

    ``inputs`` defaults to every refinement input of the configuration (``guide.inputs``).
    Raises ValueError for an unknown input or one the configuration cannot do without.
    """
    overrides = dict(overrides or {})
    if "guide.disabled_inputs" in overrides:
        raise ValueError("an ablation sets guide.disabled_inputs itself; leave it out of the overrides")
    available = make_config(dataset, preset, overrides).guide.inputs
    names = list(dict.fromkeys(available if inputs is None else inputs))
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown refinement input(s) {', '.join(unknown)}; the {dataset}/{preset} "
                         f"inputs are {', '.join(available)}")
    runs = [(FULL, ())]
    for name in names:
        make_config(dataset, preset, {**overrides, "guide.disabled_inputs": (name,)})  # validates
        runs.append((f"no-{name}", (name,)))
    return runs


def _finished_step(run_dir: Path) -> int | None:
    path = run_dir / CHECKPOINT
    return int(load_checkpoint(path)["step"]) if path.exists() else None


def ablate(dataset: str, steps: int, out: str | Path, inputs: Sequence[str] | None = None,
           seed: int = 0, *, preset: str = "paper", num_images: int = 4096,
           batch_size: int | None = None, overrides: dict[str, Any] | None = None,
           log_every: int = 25, checkpoint_every: int = 250, device: str = "cpu",
           progress: bool = True,
           report: Callable[[AblationRun], None] | None = None) -> list[AblationRun]:
    """Train the full model and one model per refinement input left out.

    Args:
        dataset: a generated dataset (``iodine_pyro.data.DATASETS``).
        steps: total optimisation steps of every run.
        out: the ablation directory (``full/``, ``no-<input>/``, ``data/``).
        inputs: the inputs to leave out one at a time (default: all of the configuration's).
        seed: seed of the data and of every run.
        preset, batch_size, overrides: the configuration (as `iodine_pyro.training.fit`).
        num_images: training images to generate (held-out: `iodine_pyro.config.held_out`).
        log_every, checkpoint_every, device, progress: passed to `iodine_pyro.training.fit`.
        report: called with an `AblationRun` before and after every run.

    Returns:
        the final `AblationRun` of every run, in plan order (fewer when a signal stopped it).
    """
    if steps < 1 or num_images < 1:
        raise ValueError("steps and num_images must be at least 1")
    if dataset not in DATASETS:
        raise ValueError(f"no generator for {dataset!r}; choose from {', '.join(DATASETS)}")
    overrides = dict(overrides or {})
    if batch_size is not None:
        overrides["train.batch_size"] = batch_size
    runs = plan(dataset, inputs, preset=preset, overrides=overrides)
    out = Path(out)
    train = ensure_generated(dataset, num_images, out / "data" / "train", seed=seed, progress=progress)
    n, held_out_seed = held_out(num_images, seed)
    test = ensure_generated(dataset, n, out / "data" / "test", seed=held_out_seed, progress=progress)
    report = report or (lambda r: log.info("%s %s at step %d", r.name, r.status, r.step))
    results = []
    for index, (name, disabled) in enumerate(runs):
        run_dir = out / name
        run = AblationRun(name, run_dir, disabled, index, len(runs), "start")
        done = _finished_step(run_dir)
        if done is not None and done >= steps:
            run.status, run.step = "skipped", done
            report(run)
            results.append(run)
            continue
        run.step = done or 0
        report(run)
        run_overrides = {**overrides, "guide.disabled_inputs": disabled} if disabled else overrides
        result = fit(out=run_dir, data=train, eval_data=test, steps=steps, dataset=dataset,
                     preset=preset, overrides=run_overrides, seed=seed, log_every=log_every,
                     checkpoint_every=checkpoint_every, device=device, progress=progress)
        run = AblationRun(name, run_dir, disabled, index, len(runs),
                          "stopped" if result.stopped == "signal" else "trained",
                          result.step, result.last_metrics)
        report(run)
        results.append(run)
        if run.status == "stopped":
            break
    return results
