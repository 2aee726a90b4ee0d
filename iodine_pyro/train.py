"""Training: Pyro SVI on the T-step weighted ELBO with Adam and global-norm clipping.

One step:

    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x)   # sum_t w_t L_t
    loss.backward(); clip_grad_norm_(params, 5.0); adam.step()

``pyro.optim`` builds one optimiser per parameter and its ``ClippedAdam`` clips each
element, not the global norm, so the step uses ``torch.optim.Adam`` directly.

`fit` owns a run directory: it resumes from its checkpoint when one is there, writes
``metrics.jsonl`` every ``log_every`` steps and checkpoints atomically every
``checkpoint_every`` steps, at the end, on SIGINT/SIGTERM, and when numerical faults
stop the run. Under torchrun it trains data-parallel (`iodine_pyro.distributed`): rank 0
writes the run directory, every process resumes from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (CHECKPOINT, METRICS, CheckpointError, load_checkpoint, save_checkpoint,
                         set_rng_state, truncate_metrics)
from .config import Config, make_config
from .data import DATASETS, Batches, DatasetError, background_groups, ensure_generated, is_store
from .evaluate import batch_metrics
from .run import Run, open_checked, recorded_data
from .system import Iodine

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (repeated numerical faults); the message says what to do."""


def make_optimizer(system: Iodine, cfg: Config, fused: bool = False) -> torch.optim.Adam:
    t = cfg.train
    return torch.optim.Adam(system.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None)


def learning_rate(cfg: Config, step: int) -> float:
    """The learning rate of optimisation step `step` (0-based): a linear warm-up over
    ``warmup_steps``, then ``lr`` times ``lr_decay`` per ``lr_decay_steps``."""
    t = cfg.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    return t.lr * warm * t.lr_decay ** (step // t.lr_decay_steps)


class Geco:
    """GECO (Rezende and Viola, 2018) as a weight beta on the KL terms.

    Minimise the KL subject to the reconstruction MSE staying below `goal`: beta falls
    while the (smoothed) MSE of the final refinement step is above the goal, so the
    networks first learn to reconstruct, and rises back to 1 (the ELBO) once it is below:

        mse_ema <- ema * mse_ema + (1 - ema) * mse
        log beta <- clip(log beta + rate * clip(1 - mse_ema / goal, -1, 1), log BETA_MIN, 0)

    The inner clip bounds a step's change of log beta by `rate`: at initialisation the
    MSE can be a hundred times the goal, which would otherwise drive beta to its floor
    within a few steps (seen: 1e-6 after 100 steps with rate 0.01).

    The state lives on the training device (no host read per step) and is checkpointed.
    """

    BETA_MIN = 1e-6

    def __init__(self, goal: float, rate: float, ema: float, device: torch.device | str = "cpu"):
        self.goal, self.rate, self.ema = goal, rate, ema
        self.log_beta = torch.zeros((), device=device)
        self.mse = torch.full((), float("nan"), device=device)   # NaN: nothing measured yet

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp()

    def update(self, mse: torch.Tensor, applied: torch.Tensor | bool = True) -> None:
        """Take the MSE of a step; a step that was not `applied` changes nothing."""
        mse = mse.detach().to(self.mse)
        smoothed = torch.where(torch.isnan(self.mse), mse, self.ema * self.mse + (1 - self.ema) * mse)
        violation = (1 - smoothed / self.goal).clamp(-1.0, 1.0)
        log_beta = (self.log_beta + self.rate * violation).clamp(math.log(self.BETA_MIN), 0.0)
        ok = torch.as_tensor(applied, device=self.mse.device) & torch.isfinite(smoothed)
        self.mse = torch.where(ok, smoothed, self.mse)
        self.log_beta = torch.where(ok, log_beta, self.log_beta)

    def state_dict(self) -> dict[str, float]:
        return {"log_beta": float(self.log_beta), "mse": float(self.mse)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.log_beta = torch.tensor(float(state["log_beta"]), device=self.log_beta.device)
        self.mse = torch.tensor(float(state["mse"]), device=self.mse.device)


def train_step(system: Iodine, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               clip_norm: float, kl_scale: float | torch.Tensor = 1.0) -> tuple[float, float, bool, torch.Tensor]:
    """One SVI step. Returns (loss, gradient norm, applied, reconstruction MSE); a
    non-finite loss or gradient is never applied to the parameters."""
    optimizer.zero_grad(set_to_none=True)
    loss, mse = system.objective(x, kl_scale=kl_scale)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value, float("nan"), False, mse
    loss.backward()
    params = [p for p in system.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return value, float(norm), False, mse
    optimizer.step()
    return value, float(norm), True, mse


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


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


RUN_FILES = (CHECKPOINT, METRICS, "decomposition.png", "curves.png")


def config_differences(a: Config, b: Config) -> list[str]:
    """'section.field: a != b' for every field where two configurations differ."""
    out = []
    for section in ("model", "guide", "train"):
        da, db = a.to_dict()[section], b.to_dict()[section]
        out += [f"{section}.{k}: {da[k]!r} != {db[k]!r}" for k in da if da[k] != db[k]]
    if (a.dataset, a.preset) != (b.dataset, b.preset):
        out.insert(0, f"dataset/preset: {a.dataset}/{a.preset} != {b.dataset}/{b.preset}")
    return out


def prepare_run_dir(out: Path, cfg: Config, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Decide what `fit` does with `out`: continue its run (the checkpoint is returned),
    start a new one (None), or refuse. Never writes over another run's results unless
    `overwrite`, which removes the run's own files and generated data only."""
    ckpt_path = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a run directory")
    if overwrite and out.exists():
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in ("train", "test"):
            if is_store(out / "data" / name):
                shutil.rmtree(out / "data" / name)
        return None
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        for stale in out.glob(f".{CHECKPOINT}.*.tmp"):               # a write cut short by a crash
            stale.unlink()
        if resume:
            return ckpt
        diff = config_differences(ckpt["config"], cfg)
        if diff:
            raise CheckpointError(
                f"{out} holds another run ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); "
                f"pass --resume to continue it with its own settings, --overwrite to replace it, "
                f"or choose another --out")
        return ckpt
    if resume:
        raise CheckpointError(f"no run to resume in {out} (no {CHECKPOINT})")
    foreign = [p.name for p in out.iterdir() if p.name not in (*RUN_FILES, "data")] if out.exists() else []
    if foreign:
        raise CheckpointError(f"{out} is not empty and holds no run (found {foreign[0]!r}); "
                              f"choose another --out or pass --overwrite")
    return None


def default_datasets(out: Path, dataset: str, num_images: int, seed: int,
                     progress: bool) -> tuple[Path, Path]:
    """Generate (once) a training set and a held-out set in OUT/data; a generation cut
    short is done again."""
    if dataset not in DATASETS:
        raise DatasetError(f"no generator for {dataset!r}; pass --data with a stored dataset "
                           f"(generators: {', '.join(DATASETS)})")
    data = out / "data"
    return (ensure_generated(dataset, num_images, data / "train", seed=seed, progress=progress),
            ensure_generated(dataset, min(1024, num_images), data / "test", seed=seed + 10_000, progress=progress))


def _recorded_path(path: str | Path, out: Path) -> str:
    """How a checkpoint names a dataset: relative to the run directory when it lies inside it
    (so that the run can be moved, or cloned with its checkpoint), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(out).resolve()))
    except ValueError:
        return str(path)


def held_out_for(ds, out: Path, seed: int, progress: bool) -> Path | None:
    """A held-out set for a run trained on the store `ds`: as many images as it holds (up
    to 1024) of its dataset, generated in OUT/data/test from another seed; None when its
    dataset has no generator (then evaluation needs --data)."""
    name = str(ds.attrs.get("dataset", ""))
    if name not in DATASETS:
        log.warning("no generator for %r: the run records no held-out set (evaluate it with --data)", name)
        return None
    return ensure_generated(name, min(1024, ds.sizes["image"]), out / "data" / "test", seed=seed + 10_000,
                            progress=progress)


def fit(*, out: str | Path, steps: int, dataset: str = "tetrominoes", preset: str = "paper",
        overrides: dict[str, Any] | None = None, data: str | Path | None = None,
        eval_data: str | Path | None = None, num_images: int = 4096, seed: int = 0,
        log_every: int = 25, checkpoint_every: int = 250, device: str = "cpu",
        progress: bool = True, resume: bool = False, overwrite: bool = False,
        amp: bool | None = None, channels_last: bool | None = None,
        sync_free: bool | None = None, time_limit: float | None = None,
        time_clock: str = "wall", report: Callable[[str], None] | None = None) -> FitResult:
    """Train (or continue training) the run in `out` up to `steps` total steps.

    Args:
        out: run directory. When it holds a checkpoint of the same configuration the run
            continues from it; another configuration is refused unless `resume` (continue
            with the stored configuration) or `overwrite` (start afresh).
        steps: total number of optimisation steps of the run.
        dataset, preset, overrides: the configuration (see `make_config`).
        data: a stored dataset directory; default: generate `num_images` images (and a
            held-out set) in OUT/data.
        eval_data: held-out images for `evaluate` (recorded in the checkpoint); default: the
            generated held-out set, or with `data` one generated like it (`held_out_for`).
        seed: seeds parameters, sampling, generated data and the data order.
        amp: bf16 autocast for the networks (default: on for CUDA, off for CPU).
        channels_last: channels-last conv weights (default: on for CUDA).
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

    Each row of metrics.jsonl has ``time`` and ``cpu_time``: the run's training wall and
    process CPU seconds so far, summed over every call that trained it.

    Under torchrun (WORLD_SIZE > 1) it trains data-parallel: the batch size is the global
    batch, split evenly over the processes; rank 0 writes the run directory.
    """
    args = dict(locals())
    processes = distributed.setup(device)
    try:
        return _fit(processes, **args)
    finally:
        distributed.teardown(processes)


def _fit(processes: distributed.Processes, *, out, steps, dataset, preset, overrides, data, eval_data,
         num_images, seed, log_every, checkpoint_every, device, progress, resume, overwrite, amp,
         channels_last, sync_free, time_limit, time_clock, report) -> FitResult:
    device = processes.device
    out = Path(out)
    cfg = make_config(dataset, preset, overrides)
    ckpt = processes.main_first(prepare_run_dir, out, cfg, resume=resume, overwrite=overwrite)
    generated = None               # {"dataset", "train": [n, seed], "eval": [n, seed]} of data fit made
    if ckpt is not None and "optimizer" not in ckpt:
        raise CheckpointError(f"{out / CHECKPOINT} holds a model's weights only (no optimiser or data state): "
                              f"it cannot be resumed; train into another --out")
    if ckpt is not None:
        cfg = ckpt["config"]
        seed = int(ckpt.get("extra", {}).get("seed", seed))
        generated = ckpt["data"].get("generated")
        data = data or processes.main_first(recorded_data, ckpt["data"], "train", out, progress and processes.is_main)
        eval_data = eval_data or processes.main_first(recorded_data, ckpt["data"], "eval", out,
                                                      progress and processes.is_main)
    elif data is None:
        data, gen_eval = processes.main_first(default_datasets, out, cfg.dataset, num_images, seed,
                                              progress and processes.is_main)
        eval_data = eval_data or gen_eval
        generated = {"dataset": cfg.dataset, "train": [num_images, seed], "eval": [min(1024, num_images), seed + 10_000]}
    ds = open_checked(data, cfg, command="fit")
    if eval_data is None and ckpt is None:             # --data without --eval-data: a held-out set
        eval_data = processes.main_first(held_out_for, ds, out, seed, progress and processes.is_main)
    if eval_data is not None:
        open_checked(eval_data, cfg, command="fit")
    background = background_groups(ds.attrs)
    if cfg.train.batch_size > ds.sizes["image"]:
        raise DatasetError(f"--batch-size {cfg.train.batch_size} exceeds the {ds.sizes['image']} "
                           f"images of {data}")
    processes.check_batch_size(cfg.train.batch_size)

    speed = distributed.speed_settings(device, amp, channels_last, sync_free)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    system = Iodine(cfg).to(device).use_fast_paths(speed.amp, speed.channels_last)
    optimizer = make_optimizer(system, cfg, fused=speed.deferred)
    batches = Batches(ds, cfg.train.batch_size, seed=seed)
    geco = Geco(cfg.train.geco_goal, cfg.train.geco_rate, cfg.train.geco_ema, device) \
        if cfg.train.geco_goal is not None else None
    step, spent = 0, {"time": 0.0, "cpu_time": 0.0}     # training seconds of earlier calls
    resumed_from = None
    ckpt_path = out / CHECKPOINT
    if ckpt is not None:
        try:
            system.load_state_dict(ckpt["system"])
            distributed.load_optimizer_state(optimizer, ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt_path} does not fit this model: {str(e).splitlines()[0]}") from None
        batches.load_state_dict(ckpt["data_state"])
        spent.update({k: float(v) for k, v in ckpt.get("extra", {}).get("spent", {}).items() if k in spent})
        if geco is not None and "geco" in ckpt.get("extra", {}):
            geco.load_state_dict(ckpt["extra"]["geco"])
        set_rng_state(ckpt["rng"])
        step = resumed_from = int(ckpt["step"])
        if processes.is_main:
            truncate_metrics(out / METRICS, step)
        log.info("resuming %s at step %d", out, step)
        if report is not None and processes.is_main:
            report(f"resuming the run in {out} at step {step}" +
                   (f" (it has reached --steps {steps})" if step >= steps else f", training to step {steps}"))
    trainer = None    # one process with host checks: train_step
    if processes.distributed or speed.deferred:
        trainer = distributed.Trainer(system, optimizer, cfg.train.clip_norm, processes,
                                      deferred=speed.deferred, seed=seed)
    data_info = {"train": _recorded_path(data, out), "eval": _recorded_path(eval_data, out) if eval_data else None,
                 "generated": generated}

    t_start, c_start = time.time(), time.process_time()

    def clock() -> dict[str, float]:
        """Training seconds of the run so far (wall and CPU), earlier calls included."""
        return {"time": spent["time"] + time.time() - t_start,
                "cpu_time": spent["cpu_time"] + time.process_time() - c_start}

    def out_of_time() -> bool:
        if time_limit is None:
            return False
        used = time.time() - t_start if time_clock == "wall" else time.process_time() - c_start
        return used >= time_limit

    def checkpoint():
        if trainer is not None:
            trainer.ensure_in_sync()
        if not processes.is_main:
            return
        save_checkpoint(ckpt_path, cfg=cfg, system_state=system.state_dict(),
                        optimizer_state=optimizer.state_dict(), step=step,
                        data_state=batches.state_dict(), data=data_info,
                        extra={"seed": seed, "spent": clock(),
                               **({"geco": geco.state_dict()} if geco is not None else {})})

    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        checkpoint()  # step 0: the directory now names its run
    system.train()
    bad_in_row, skipped, last = 0, 0, {}
    stop = "done"
    it = iter(batches)
    bar = tqdm(total=steps, initial=min(step, steps), disable=not (progress and processes.is_main),
               desc=f"fit {cfg.dataset}", unit="step", dynamic_ncols=True)
    # Pyro's argument validation costs ~20% per step; non-finite values are caught below.
    with _StopFlag() as flag, open(out / METRICS if processes.is_main else os.devnull, "a") as mlog, \
            pyro.validation_enabled(False):
        while step < steps:
            if processes.any(flag.signal is not None):           # every process stops at the same step
                stop = "signal"
                break
            if processes.any(out_of_time()):
                stop = "time"
                break
            batch = distributed.to_device(processes.shard(next(it)), device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            beta = geco.beta if geco is not None else 1.0
            if trainer is None:
                loss, gnorm, applied, mse = train_step(system, optimizer, batch["image"], cfg.train.clip_norm, beta)
            else:                                                # applied is None when checked on the device
                loss, gnorm, applied, mse = trainer.step(batch["image"], step, beta)
            if geco is not None:
                geco.update(mse, trainer.last_applied if applied is None else applied)
            if applied is False:
                bad_in_row, skipped = bad_in_row + 1, skipped + 1
                log.warning("step %d: non-finite loss or gradient (loss %s, gradient norm %s); skipped",
                            step + 1, loss, gnorm)
                if bad_in_row >= cfg.train.max_bad_steps:
                    checkpoint()
                    raise TrainingError(
                        f"{bad_in_row} non-finite steps in a row after step {step}; the last good state "
                        f"is saved in {ckpt_path} (lower the learning rate or check the data)")
                continue
            bad_in_row = 0
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                if applied is None:                              # the one host synchronisation of N steps
                    loss, gnorm, skipped, longest = trainer.settle()
                    if longest >= cfg.train.max_bad_steps:
                        checkpoint()
                        raise TrainingError(
                            f"{longest} non-finite steps in a row before step {step}; the last good state "
                            f"is saved in {ckpt_path} (lower the learning rate or check the data)")
                last = {"step": step, "loss": loss, "grad_norm": gnorm, "skipped": skipped,
                        **{k: round(v, 3) for k, v in clock().items()},
                        **({"beta": float(geco.beta)} if geco is not None else {}),
                        **(batch_metrics(system, batch, background) if processes.is_main else {})}
                mlog.write(json.dumps(last) + "\n")
                mlog.flush()
                bar.set_postfix(loss=f"{loss:.4g}", fg_ari=f"{last.get('fg_ari', math.nan):.3f}")
            if step % checkpoint_every == 0:
                checkpoint()
        checkpoint()
    bar.close()
    if trainer is not None and trainer.deferred:
        skipped = trainer.settle()[2]
    system.eval()
    return FitResult(step=step, out=out, stopped=stop, last_metrics=last, skipped=skipped,
                     rank=processes.rank, resumed_from=resumed_from, system=system, data=data_info)
