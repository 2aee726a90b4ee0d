"""`fit`: a request, then the run directory and the data, then the state, then the loop.

    result = fit(out="runs/tet", steps=1000)                 # or fit(FitRequest(...))

Everything that can be known wrong is checked before anything is written: the arguments
(`FitRequest`), the configuration and the memory a step needs, the datasets given, and
what the run directory holds (`rundir.prepare_run_dir`). Under torchrun it trains
data-parallel (`ddp`): rank 0 writes the run directory, every process resumes from it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CHECKPOINT, METRICS, CheckpointError, check_resumable, truncate_metrics
from ..config import SEED_MAX, Config, make_config, resumed_config
from ..memory import check_memory
from ..data import DATASETS, DatasetError, background_groups
from ..guides import guide_class
from ..run import open_checked
from .ddp import Processes, setup, teardown
from .loop import Loop
from .request import FitRequest, FitResult
from .rundir import (
    check_same_data,
    default_datasets,
    generation_record,
    held_out_for,
    prepare_run_dir,
    recorded_path,
    run_data,
    run_lock,
)
from .speed import speed_settings
from .state import TrainingState
from .step import make_step

log = logging.getLogger(__name__)


def fit(request: FitRequest | None = None, /, **arguments: Any) -> FitResult:
    """Train (or continue training) the run in ``out`` up to ``steps`` total steps.

    Takes a `FitRequest`, or its fields as keywords (``fit(out=..., steps=...)``); the
    request's docstring describes them. Each row of metrics.jsonl has ``time`` and
    ``cpu_time``: the run's training wall and process CPU seconds so far, summed over every
    call that trained it.

    Under torchrun (WORLD_SIZE > 1) it trains data-parallel: the batch size is the global
    batch, split evenly over the processes; rank 0 writes the run directory.

    Every argument, the configuration, the datasets given and the memory a step needs
    are checked before anything is written (ValueError or DatasetError, one line).
    """
    if request is None:
        request = FitRequest(**arguments)
    elif arguments:
        raise TypeError("fit takes a FitRequest or its fields as keywords, not both")
    processes = setup(request.device)
    try:
        with run_lock(request.out, processes.is_main):
            result = _train(request, processes)
    except BaseException:
        teardown(processes, finished=False)
        raise
    teardown(processes)
    return result


def _train(request: FitRequest, processes: Processes) -> FitResult:
    plan = plan_run(request, processes)
    speed = speed_settings(processes.device, request.amp, request.channels_last, request.sync_free)
    state = TrainingState.start(plan.cfg, plan.store, seed=plan.seed, device=processes.device, speed=speed,
                                data=plan.data)
    if plan.ckpt is not None:
        state.restore(plan.ckpt, request.out / CHECKPOINT)
        _report_resumed(request, processes, state.step, plan.resume_changes)
    step = make_step(state.system, state.optimizer, plan.cfg.train.clip_norm, processes,
                     sync_free=speed.deferred, seed=plan.seed)
    loop = Loop(state, step, processes, request, plan.background)
    if plan.ckpt is None:
        loop.checkpoint()                                  # step 0: the directory now names its run
    stopped = loop.run()
    state.system.eval()
    return FitResult(step=state.step, out=request.out, stopped=stopped, last_metrics=loop.metrics.last,
                     skipped=step.faults.settle()[0], rank=processes.rank,
                     resumed_from=None if plan.ckpt is None else int(plan.ckpt["step"]),
                     system=state.system, data=plan.data)


def _report_resumed(request: FitRequest, processes: Processes, step: int, changes: list[str]) -> None:
    """Drop metrics rows past the checkpoint (they are logged again) and say where the run resumes."""
    if processes.is_main:
        truncate_metrics(request.out / METRICS, step)
    log.info("resuming %s at step %d", request.out, step)
    if request.report is None or not processes.is_main:
        return
    steps = request.step_limit
    request.report(f"resuming the run in {request.out} at step {step}" +
                   (f" with {', '.join(changes)}" if changes else "") +
                   (f" (it has reached `steps` {steps})" if step >= steps else
                    f", training to step {steps}" if steps < math.inf else ", training until the time limit"))


# -- what a request comes to ------------------------------------------------------------


# (training set, held-out set or None)
Datasets = tuple[str | Path, str | Path | None]


@dataclass
class RunPlan:
    """A request once the run directory and the datasets are settled."""

    cfg: Config
    ckpt: dict[str, Any] | None        # the checkpoint to continue from; None: a new run
    seed: int
    store: Any                         # the training store (an xarray Dataset), opened and checked
    background: int                    # its background groups
    data: dict[str, Any]               # the datasets as the checkpoint records them
    resume_changes: list[str]          # what a --resume changed (its schedule, K), one line each


def plan_run(request: FitRequest, processes: Processes) -> RunPlan:
    """Settle the configuration, the run directory (continue, start or refuse) and the
    datasets (given, recorded by the run, or generated in OUT/data) on every process."""
    out, device = request.out, processes.device
    resuming = request.resume and (out / CHECKPOINT).exists()   # then the stored configuration decides
    # a resume's overrides are checked against the run's own configuration (`resumed_config`),
    # not against a new run's: one that completes a stored schedule (pixel_return_start
    # after the run's own anneal) is valid there and would be refused here
    cfg = make_config(request.dataset, request.preset, None if resuming else request.overrides)
    for given in (request.data, request.eval_data):             # checked before anything is written
        if given is not None and not resuming:
            open_checked(given, cfg, command="fit")
    check_memory(cfg, device, num_slots=most_slots(cfg), what="fit")
    _check_request(cfg, out, request.data, request.num_images)
    ckpt = processes.main_first(prepare_run_dir, out, cfg, resume=request.resume, overwrite=request.overwrite,
                                keep=(request.data, request.eval_data))
    if ckpt is not None:
        cfg, seed, changes = _continued_settings(request, ckpt, resuming, device)
        train, held = _recorded_datasets(request, processes, ckpt)
    else:
        seed, changes = request.seed, []
        train, held = _new_datasets(request, processes, cfg)
    show = request.progress and processes.is_main
    ds = open_checked(train, cfg, command="fit")
    if held is None and ckpt is None:                  # --data without --eval-data: a held-out set
        held = processes.main_first(held_out_for, ds, out, seed, show)
    held_ds = open_checked(held, cfg, command="fit") if held is not None else None
    background = background_groups(ds.attrs)
    if cfg.train.batch_size > ds.sizes["image"]:
        raise DatasetError(f"`batch_size` {cfg.train.batch_size} exceeds the {ds.sizes['image']} images of {train}")
    processes.check_batch_size(cfg.train.batch_size)
    data = {"train": recorded_path(train, out), "eval": recorded_path(held, out) if held else None,
            "generated": generation_record(ds, held_ds)}      # what the stores say of themselves
    return RunPlan(cfg, ckpt, seed, ds, background, data, changes)


def most_slots(cfg: Config) -> int:
    """The largest K a run of `cfg` trains with (its schedule may change K: `num_slots_at`)."""
    return max(cfg.model.num_slots, cfg.train.num_slots_final or 0)


def _continued_settings(request: FitRequest, ckpt: dict[str, Any], resuming: bool,
                        device: torch.device) -> tuple[Config, int, list[str]]:
    """The configuration, seed and resume changes of a run continued from `ckpt`."""
    path = request.out / CHECKPOINT
    check_resumable(ckpt, path)
    cfg, changes = resumed_config(ckpt["config"], request.overrides) if resuming else (ckpt["config"], [])
    t, step = cfg.train, int(ckpt["step"])
    if t.num_slots_final is not None and step >= t.num_slots_step and cfg.model.num_slots != t.num_slots_final:
        if cfg.model.num_slots != ckpt["config"].model.num_slots:     # the resume itself asked for this K
            raise ValueError(f"model.num_slots {cfg.model.num_slots}: from step {t.num_slots_step} on the run "
                             f"trains with train.num_slots_final {t.num_slots_final}; change that field (or set "
                             "it to none) to go on with another K")
        changes.append(f"model.num_slots {cfg.model.num_slots} -> {t.num_slots_final} (train.num_slots_final)")
    check_memory(cfg, device, num_slots=most_slots(cfg), what="fit")    # with the K it will train with
    seed = ckpt.get("extra", {}).get("seed", request.seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise CheckpointError(f"checkpoint {path} has an invalid seed {seed!r}")
    return cfg, seed, changes


def _recorded_datasets(request: FitRequest, processes: Processes, ckpt: dict[str, Any]) -> Datasets:
    """(training set, held-out set) of a continued run: those given,
    else those its checkpoint records (generated again when they are gone)."""
    out, show, recorded = request.out, request.progress and processes.is_main, ckpt["data"]
    if request.data is not None and processes.is_main:
        check_same_data(recorded, request.data, out)
    train = request.data or processes.main_first(run_data, recorded, "train", out, show)
    held = request.eval_data or processes.main_first(run_data, recorded, "eval", out, show)
    return train, held


def _new_datasets(request: FitRequest, processes: Processes, cfg: Config) -> Datasets:
    """(training set, held-out set) of a new run: those given, else a generated pair in
    OUT/data."""
    if request.data is not None:
        return request.data, request.eval_data
    n, seed = request.num_images, request.seed
    train, held = processes.main_first(default_datasets, request.out, cfg.dataset, n, seed,
                                       request.progress and processes.is_main)
    return train, request.eval_data or held


def _check_request(cfg: Config, out: Path, data, num_images: int) -> None:
    """What can be known wrong before any data is generated or any file written: a guide
    that cannot read the dataset's sequences, fewer images to generate than one batch."""
    spec = DATASETS.get(cfg.dataset)
    if spec is not None and spec.sequence and not guide_class(cfg.guide.kind).reads_sequences:
        raise ValueError(f"guide.kind: the {cfg.guide.kind} guide reads single images and {cfg.dataset} "
                         f"holds sequences; train it with the iterative guide")
    if data is None and not (out / CHECKPOINT).exists() and spec is not None:
        H, W, C = spec.image_shape
        if (C, H, W) != (cfg.model.image_channels, *cfg.model.image_size):
            raise ValueError(f"model.image_size: {cfg.dataset} images are {C}x{H}x{W} (channels x height x width) "
                             f"and the configuration expects {cfg.model.image_channels}x{cfg.model.image_size[0]}x"
                             f"{cfg.model.image_size[1]}; drop the override, or pass `data` with such images")
    if data is None and not (out / CHECKPOINT).exists() and num_images < cfg.train.batch_size:
        raise ValueError(f"`num_images` {num_images} is fewer than one batch (`batch_size` "
                         f"{cfg.train.batch_size}); generate more images or lower the batch size")
