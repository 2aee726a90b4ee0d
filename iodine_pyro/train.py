"""Training: Pyro SVI on the T-step weighted ELBO with Adam and global-norm clipping.

One step:

    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x)   # sum_t w_t L_t
    loss.backward(); clip_grad_norm_(params, 5.0); adam.step()

``pyro.optim`` builds one optimiser per parameter and its ``ClippedAdam`` clips each
element, not the global norm, so the step uses ``torch.optim.Adam`` directly.

`fit` owns a run directory: it resumes from its checkpoint when one is there, writes
``metrics.jsonl`` every ``log_every`` steps and checkpoints atomically every
``checkpoint_every`` steps, at the end, on SIGINT/SIGTERM, and when numerical faults or
damaged data stop the run. Under torchrun it trains data-parallel
(`iodine_pyro.distributed`): rank 0 writes the run directory, every process resumes from it.

Nothing is lost (docs/robustness.md):

* A directory is a run only when its checkpoint, or the manifest (``manifest.json``)
  that `fit` writes before anything else, says so. The manifest lists what the run
  makes (its files, the datasets it generated); ``--overwrite`` removes those and
  nothing else: never a ``--data`` store, never through a symbolic link.
* Run files are never written through symbolic links: a link in their place is refused.
* One `fit` at a time: it holds an exclusive lock on the run directory from start to end
  (`_run_lock`), and a run continues on the store it was trained on (`_check_same_data`).
* A step is applied only when the batch, the loss, the gradient and the updated
  parameters are all finite; otherwise it is undone, skipped and counted (`_Snapshot`).
* Data are checked as they are read; a missing or damaged chunk stops the run with a
  checkpoint of the last good step.
* A kill at any moment (data generation, the first checkpoint, training) leaves a
  directory that the same command continues.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (CHECKPOINT, METRICS, CheckpointError, check_resumable, load_checkpoint,
                         save_checkpoint, set_rng_state, truncate_metrics)
from .config import (INT_MAX, SEED_MAX, Config, check_memory, field_differences, held_out, make_config,
                     pixel_scale_at, resumed_config)
from .data import DATASETS, Batches, DatasetError, background_groups, ensure_generated, is_store
from .evaluate import batch_metrics
from .io import TEMP_SUFFIX, WriteError, in_use, lock_dir, open_append, remove_stale, remove_tree, write_text
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

    def update(self, mse: torch.Tensor, applied: torch.Tensor | bool = True, release: bool = False) -> None:
        """Take the MSE of a step; a step that was not `applied` changes nothing. With
        `release` beta rises towards 1 at the full rate whatever the MSE (a final phase
        on the ELBO: ``train.geco_release_step``)."""
        mse = mse.detach().to(self.mse)
        smoothed = torch.where(torch.isnan(self.mse), mse, self.ema * self.mse + (1 - self.ema) * mse)
        violation = torch.ones_like(smoothed) if release else (1 - smoothed / self.goal).clamp(-1.0, 1.0)
        log_beta = (self.log_beta + self.rate * violation).clamp(math.log(self.BETA_MIN), 0.0)
        ok = torch.as_tensor(applied, device=self.mse.device) & torch.isfinite(smoothed)
        self.mse = torch.where(ok, smoothed, self.mse)
        self.log_beta = torch.where(ok, log_beta, self.log_beta)

    def state_dict(self) -> dict[str, float]:
        return {"log_beta": float(self.log_beta), "mse": float(self.mse)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.log_beta = torch.tensor(float(state["log_beta"]), device=self.log_beta.device)
        self.mse = torch.tensor(float(state["mse"]), device=self.mse.device)


class _Snapshot:
    """The parameters and optimiser state before a step, so that a step whose update is
    not finite can be undone.

    Adam with a finite gradient can still produce non-finite parameters (an enormous
    learning rate, an overflowing moment): checking the loss and the gradient is not
    enough for "the last good state" to be good. The copies are kept in buffers that are
    reused every step (a few times the size of the parameters)."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = params, optimizer
        self.saved: list[torch.Tensor] = []
        self.had_state: set[int] = set()

    def _tensors(self, only: set[int] | None = None) -> list[torch.Tensor]:
        tensors = list(self.params)
        for p in self.params:
            if only is None or id(p) in only:
                tensors += [v for _, v in sorted(self.optimizer.state.get(p, {}).items()) if torch.is_tensor(v)]
        return tensors

    @torch.no_grad()
    def save(self) -> None:
        self.had_state = {id(p) for p in self.params if self.optimizer.state.get(p)}
        tensors = self._tensors(self.had_state)
        if [t.shape for t in self.saved] != [t.shape for t in tensors]:
            self.saved = [t.detach().clone() for t in tensors]
        else:
            for buffer, t in zip(self.saved, tensors):
                buffer.copy_(t)

    @torch.no_grad()
    def finite(self) -> torch.Tensor:
        """Whether every parameter is finite, as a device bool (nothing read on the host)."""
        return torch.stack([torch.isfinite(p).all() for p in self.params]).all()

    @torch.no_grad()
    def restore(self, keep: torch.Tensor | None = None) -> None:
        """Put the saved state back; with `keep` (a device bool), only where it is false,
        without reading it on the host. Optimiser state that the step created is dropped
        (or, with `keep`, zeroed: Adam's state before its first step)."""
        for p in self.params:
            if id(p) not in self.had_state and self.optimizer.state.get(p):
                if keep is None:
                    self.optimizer.state.pop(p, None)
                else:
                    for v in self.optimizer.state[p].values():
                        if torch.is_tensor(v):
                            v.copy_(torch.where(keep, v, torch.zeros_like(v)))
        for t, buffer in zip(self._tensors(self.had_state), self.saved):
            t.copy_(buffer if keep is None else torch.where(keep, t, buffer))


def _finite_batch(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def train_step(system: Iodine, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               clip_norm: float, kl_scale: float | torch.Tensor = 1.0,
               snapshot: _Snapshot | None = None) -> tuple[float, float, bool, torch.Tensor]:
    """One SVI step. Returns (loss, gradient norm, applied, reconstruction MSE).

    The step is applied only when the batch, the loss, the gradient and the updated
    parameters are all finite; otherwise the parameters and the optimiser state are as
    before the call (an update that came out non-finite is undone from `snapshot`, made
    here when not given) and `applied` is False."""
    optimizer.zero_grad(set_to_none=True)
    if not _finite_batch(x):                           # NaN or infinite pixels: nothing to learn from
        return math.nan, math.nan, False, torch.full((), math.nan, device=x.device)
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
    snapshot = snapshot or _Snapshot(list(system.parameters()), optimizer)
    snapshot.save()
    optimizer.step()
    if not bool(snapshot.finite()):
        snapshot.restore()
        optimizer.zero_grad(set_to_none=True)
        return value, float(norm), False, mse
    return value, float(norm), True, mse


class _DeviceFaults:
    """Skipped steps counted on the device (the sync-free path): how many, the current
    run of consecutive ones and the longest run since the last `settle`."""

    def __init__(self, device: torch.device):
        self.counts = torch.zeros(3, dtype=torch.long, device=device)   # skipped, current run, longest run

    def add(self, applied: torch.Tensor) -> None:
        b = (~applied).long()
        skipped, run, longest = self.counts.unbind()
        run = (run + b) * b
        self.counts = torch.stack([skipped + b, run, torch.maximum(longest, run)])

    def settle(self) -> tuple[int, int]:
        """(steps skipped so far, longest run since the previous call): one host read."""
        skipped, run, longest = self.counts.tolist()
        self.counts = torch.tensor([skipped, run, run], dtype=torch.long, device=self.counts.device)
        return skipped, longest


class _TrainingBar:
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


# What `fit` makes in a run directory: its files (the pictures and the data behind them are
# drawn by the command line once training ends) and the datasets it generates.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "iodine-pyro-run"
RUN_FILES = (CHECKPOINT, METRICS, "decomposition.png", "decomposition.npz", "curves.png", "curves.json")
DATA_DIR = "data"


def config_differences(a: Config, b: Config) -> list[str]:
    """'section.field: a != b' for every field where two configurations differ."""
    out = [f"{key}: {va!r} != {vb!r}" for key, va, vb in field_differences(a, b)]
    if (a.dataset, a.preset) != (b.dataset, b.preset):
        out.insert(0, f"dataset/preset: {a.dataset}/{a.preset} != {b.dataset}/{b.preset}")
    return out


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _our_leftover(folder: Path, name: str) -> bool:
    """Whether a directory entry is a temporary file that a killed `fit` left while writing
    one of its run files (``.checkpoint.pt.<pid>.<hex>.tmp``): nobody holds its lock
    (`io.in_use`), whichever host wrote it."""
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return False
    parts = name[1:-len(TEMP_SUFFIX)].rsplit(".", 2)
    return (len(parts) == 3 and parts[0] in (*RUN_FILES, MANIFEST) and parts[1].isdigit()
            and not in_use(str(folder / name), int(parts[1])))


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the run in `out` (None when there is none); CheckpointError when the
    file is there but is not one."""
    path = Path(out) / MANIFEST
    if not path.exists() and not _is_link(path):
        return None
    if _is_link(path):
        raise CheckpointError(f"{path} is a symbolic link; a run's manifest never is (remove it or choose another --out)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a run manifest ({type(e).__name__})") from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
          and all(isinstance(manifest.get(k), list) and all(isinstance(v, str) for v in manifest[k])
                  for k in ("files", "stores", "dirs"))
          and isinstance(manifest.get("config"), dict))
    if not ok:
        raise CheckpointError(f"{path} is not a run manifest")
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    write_text(Path(out) / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _new_manifest(out: Path, cfg: Config, made_dirs: list[str]) -> dict[str, Any]:
    manifest = {"format": MANIFEST_FORMAT, "format_version": 1, "config": cfg.to_dict(),
                "files": [MANIFEST, *RUN_FILES], "stores": [], "dirs": made_dirs}
    _write_manifest(out, manifest)
    return manifest


def record_store(out: Path, path: Path) -> None:
    """Add a dataset that `fit` is about to generate inside its run directory to the
    manifest (before generating it, so that a kill mid-way leaves it recorded)."""
    manifest = read_manifest(out)
    if manifest is None or Path(path).exists() or _is_link(Path(path)):
        return                              # only what fit is about to make is the run's
    try:
        rel = Path(path).resolve().relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        return                              # outside the run: not the run's to remove
    changed = False
    if rel not in manifest["stores"]:
        manifest["stores"].append(rel)
        changed = True
    parent = Path(rel).parent.as_posix()
    if parent != "." and parent not in manifest["dirs"] and not (Path(out) / parent).exists():
        manifest["dirs"].append(parent)
        changed = True
    if changed:
        _write_manifest(out, manifest)


def _inside(out: Path, rel: str) -> Path | None:
    """OUT/rel when it lies inside `out` through real directories only (no component a
    symbolic link, no ``..``), else None."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        return None
    path = Path(out)
    for part in parts:
        path = path / part
        if _is_link(path):
            return None
    return path


def _legacy_record(ckpt: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """What a run made by a version without manifests made: its files, and the datasets its
    checkpoint records as generated (relative paths inside the run)."""
    stores = []
    data = (ckpt or {}).get("data") or {}
    generated = data.get("generated") or {}
    for which in ("train", "eval"):
        value = data.get(which)
        if which in generated and isinstance(value, str) and not Path(value).is_absolute():
            stores.append(value)
    return list(RUN_FILES), stores


def _remove_run(out: Path, manifest: dict[str, Any] | None, ckpt: dict[str, Any] | None,
                keep: set[Path]) -> None:
    """Remove what the run in `out` made (its manifest's record, or a legacy run's files and
    generated datasets): regular files only, stores only when they are stores, never
    through a symbolic link and never a path in `keep` (the datasets this call trains on)."""
    files, stores = (manifest["files"], manifest["stores"]) if manifest else _legacy_record(ckpt)
    for rel in stores:
        path = _inside(out, rel)
        if path is None or path.resolve() in keep:
            continue
        remove_stale(path)                              # a generation or a removal of it cut short
        if is_store(path) and path.is_dir():
            log.info("removing %s (generated by the run it replaces)", path)
            remove_tree(path)                           # renamed first: a kill leaves no half store
    for rel in [f for f in files if f != MANIFEST] + [MANIFEST]:
        path = _inside(out, rel)
        if path is None:
            continue
        remove_stale(path)
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()
        except FileNotFoundError:
            pass
    for rel in sorted((manifest or {}).get("dirs", []), key=len, reverse=True):
        path = _inside(out, rel)
        if path is not None and path.is_dir():
            try:
                path.rmdir()                            # only when empty: anything else stays
            except OSError:
                pass


def _check_no_links(out: Path) -> None:
    """Refuse a run directory where a run file (or its data folder) is a symbolic link:
    fit would otherwise append to, overwrite or delete whatever the link points to."""
    for name in (MANIFEST, *RUN_FILES, DATA_DIR):
        if _is_link(out / name):
            raise CheckpointError(f"{out / name} is a symbolic link; fit never writes or deletes through links "
                                  f"(remove it or choose another --out)")


def prepare_run_dir(out: Path, cfg: Config, *, resume: bool, overwrite: bool,
                    keep: tuple[str | Path | None, ...] = ()) -> dict[str, Any] | None:
    """Decide what `fit` does with `out`: continue its run (the checkpoint is returned),
    start a new one (None), or refuse. A new run's directory gets its manifest here,
    before anything else is written.

    A directory is a run when its checkpoint says so, or (a run stopped before its first
    checkpoint) its manifest. Anything else that is not empty is refused, with or without
    `overwrite`, which replaces a run by removing what its manifest records (never the
    datasets in `keep`, never through a link)."""
    ckpt_path = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a run directory")
    if out.is_dir():
        _check_no_links(out)
    manifest = read_manifest(out) if out.is_dir() else None
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    for name in entries:                                         # writes a kill cut short
        if _our_leftover(out, name) and (manifest is not None or ckpt is not None or name.startswith(f".{MANIFEST}.")):
            (out / name).unlink(missing_ok=True)
    if ckpt is not None:                                         # ... by an earlier version (no pid in the name)
        for stale in out.glob(f".{CHECKPOINT}.*.tmp"):
            if stale.is_file() and not stale.is_symlink() and not stale.name[len(CHECKPOINT) + 2:].split(".")[0].isdigit():
                stale.unlink()
    entries = [n for n in entries if (out / n).exists() or _is_link(out / n)]
    if manifest is None and ckpt is None and entries:
        raise CheckpointError(f"{out} is not empty and holds no run (found {sorted(entries)[0]!r}); "
                              f"choose another --out" + ("" if overwrite else " (--overwrite replaces runs only)"))
    if overwrite and (manifest is not None or ckpt is not None):
        _remove_run(out, manifest, ckpt, {Path(p).resolve() for p in keep if p})
        manifest = ckpt = None
    if ckpt is not None:
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
    if manifest is not None:                                     # stopped before its first checkpoint
        try:
            started = Config.from_dict(manifest["config"])
        except ValueError as e:
            raise CheckpointError(f"{out / MANIFEST} has an invalid configuration: {e}") from None
        diff = config_differences(started, cfg)
        if diff:
            raise CheckpointError(
                f"{out} holds another run, stopped before its first checkpoint ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''}); pass --overwrite to replace it, or choose another --out")
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(out, e.strerror or type(e).__name__, e.errno) from None
    _new_manifest(out, cfg, [])
    return None


def default_datasets(out: Path, dataset: str, num_images: int, seed: int,
                     progress: bool) -> tuple[Path, Path]:
    """Generate (once) a training set and a held-out set in OUT/data, each recorded in the
    run's manifest first; a generation cut short is done again."""
    if dataset not in DATASETS:
        raise DatasetError(f"no generator for {dataset!r}; pass --data with a stored dataset "
                           f"(generators: {', '.join(DATASETS)})")
    data = out / DATA_DIR
    paths = []
    for name, n, s in (("train", num_images, seed), ("test", *held_out(num_images, seed))):
        record_store(out, data / name)
        paths.append(ensure_generated(dataset, n, data / name, seed=s, progress=progress))
    return paths[0], paths[1]


def _recorded_path(path: str | Path, out: Path) -> str:
    """How a checkpoint names a dataset: relative to the run directory when it lies inside it
    (so that the run can be moved, or cloned with its checkpoint), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(out).resolve()))
    except ValueError:
        return str(path)


def _check_same_data(recorded: dict[str, Any], given: str | Path, out: Path) -> None:
    """A run continues on the store it was trained on (its checkpoint's data position is a
    position in that store): `--data` naming another one is refused while the recorded one
    is there; when it is gone (moved), the other is taken, with a warning."""
    value = recorded["train"]
    path = Path(value) if Path(value).is_absolute() else out / value
    if Path(given).resolve() == path.resolve():
        return
    if is_store(path):
        raise CheckpointError(f"{out} is trained on {value}, not {given}; continue it without --data (or with "
                              f"that store), or train on {given} into another --out")
    log.warning("the training data of %s (%s) is gone; continuing on %s", out, value, given)


def held_out_for(ds, out: Path, seed: int, progress: bool) -> Path | None:
    """A held-out set for a run trained on the store `ds`: as many images as it holds (up
    to 1024) of its dataset, generated in OUT/data/test from another seed; None when its
    dataset has no generator (then evaluation needs --data)."""
    name = str(ds.attrs.get("dataset", ""))
    if name not in DATASETS:
        log.warning("no generator for %r: the run records no held-out set (evaluate it with --data)", name)
        return None
    record_store(out, out / DATA_DIR / "test")
    n, held_out_seed = held_out(ds.sizes["image"], seed)
    return ensure_generated(name, n, out / DATA_DIR / "test", seed=held_out_seed, progress=progress)


def fit(*, out: str | Path, steps: int | None, dataset: str = "tetrominoes", preset: str = "paper",
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
            with the stored configuration, `overrides` changing only its learning-rate
            schedule: `config.resumed_config`) or `overwrite` (start afresh).
        steps: total number of optimisation steps of the run; None: as many as `time_limit`
            allows (then required).
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

    Every argument, the configuration, the datasets given and the memory a step needs
    are checked before anything is written (ValueError or DatasetError, one line).
    """
    args = dict(locals())
    _check_arguments(args)
    processes = distributed.setup(device)
    try:
        with _run_lock(Path(out), processes.is_main):
            return _fit(processes, **args)
    finally:
        distributed.teardown(processes)


def _run_lock(out: Path, main: bool):
    """`fit` holds its run directory alone from start to end: an exclusive flock on the
    directory (`io.lock_dir`), dropped by the kernel however the process ends. A second
    writer is refused in one line naming the holder, before it reads or writes anything:
    two writers would truncate and append to one metrics.jsonl and replace each other's
    checkpoints. On rank 0 only (the one process that writes the run directory)."""
    if not main or (out.exists() and not out.is_dir()):
        return contextlib.nullcontext()           # prepare_run_dir refuses these in one line
    return lock_dir(out, "this run directory")


def _check_arguments(a: dict[str, Any]) -> None:
    """`fit`'s arguments by type and range (one line naming the argument), before any work."""
    def integer(name: str, low: int, high: int = INT_MAX) -> None:
        v = a[name]
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise ValueError(f"{name} must be an integer from {low} to {high}, got {v!r}")

    if a["steps"] is None:
        if a["time_limit"] is None:
            raise ValueError("steps may be left out only with a time limit")
    else:
        integer("steps", 1, 2**62)
    integer("num_images", 1)
    integer("log_every", 1)
    integer("checkpoint_every", 1)
    integer("seed", 0, SEED_MAX)                  # numpy's seeds, with room for the held-out set's
    limit = a["time_limit"]
    if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool)
                                  and 0 < limit < math.inf):
        raise ValueError(f"time_limit must be a positive, finite number of seconds, got {limit!r}")
    if a["time_clock"] not in ("wall", "cpu"):
        raise ValueError(f"time_clock must be wall or cpu, got {a['time_clock']!r}")
    try:
        torch.device(a["device"])
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{a['device']!r} is not a device; use cpu, cuda or cuda:N") from None


def _check_request(cfg: Config, out: Path, data, num_images: int) -> None:
    """What can be known wrong before any data is generated or any file written: a guide
    that cannot read the dataset's sequences, fewer images to generate than one batch."""
    from .guides import guide_class

    spec = DATASETS.get(cfg.dataset)
    if spec is not None and spec.sequence and not guide_class(cfg.guide.kind).reads_sequences:
        raise ValueError(f"guide.kind: the {cfg.guide.kind} guide reads single images and {cfg.dataset} "
                         f"holds sequences; train it with the iterative guide")
    if data is None and not (out / CHECKPOINT).exists() and spec is not None:
        H, W, C = spec.image_shape
        if (C, H, W) != (cfg.model.image_channels, *cfg.model.image_size):
            raise ValueError(f"model.image_size: {cfg.dataset} images are {C}x{H}x{W} (channels x height x width) "
                             f"and the configuration expects {cfg.model.image_channels}x{cfg.model.image_size[0]}x"
                             f"{cfg.model.image_size[1]}; drop the override, or pass --data with such images")
    if data is None and not (out / CHECKPOINT).exists() and num_images < cfg.train.batch_size:
        raise ValueError(f"--num-images {num_images} is fewer than one batch (--batch-size "
                         f"{cfg.train.batch_size}); generate more images or lower the batch size")


def _fit(processes: distributed.Processes, *, out, steps, dataset, preset, overrides, data, eval_data,
         num_images, seed, log_every, checkpoint_every, device, progress, resume, overwrite, amp,
         channels_last, sync_free, time_limit, time_clock, report) -> FitResult:
    device = processes.device
    out = Path(out)
    steps = math.inf if steps is None else steps      # None: until the time limit
    cfg = make_config(dataset, preset, overrides)
    resuming = resume and (out / CHECKPOINT).exists()  # then the stored configuration decides
    for given in (data, eval_data):                    # the datasets given: checked before anything is written
        if given is not None and not resuming:
            open_checked(given, cfg, command="fit")
    check_memory(cfg, device, what="fit")
    _check_request(cfg, out, data, num_images)
    ckpt = processes.main_first(prepare_run_dir, out, cfg, resume=resume, overwrite=overwrite,
                                keep=(data, eval_data))
    ckpt_path = out / CHECKPOINT
    generated = None               # {"dataset", "train": [n, seed], "eval": [n, seed]} of data fit made
    if ckpt is not None:
        check_resumable(ckpt, ckpt_path)
        if ckpt["config"] is not cfg:
            check_memory(ckpt["config"], device, what="fit")
        cfg, schedule_changes = resumed_config(ckpt["config"], overrides) if resuming else (ckpt["config"], [])
        stored_seed = ckpt.get("extra", {}).get("seed", seed)
        if not isinstance(stored_seed, int) or isinstance(stored_seed, bool) or not 0 <= stored_seed <= SEED_MAX:
            raise CheckpointError(f"checkpoint {ckpt_path} has an invalid seed {stored_seed!r}")
        seed = stored_seed
        generated = ckpt["data"].get("generated")
        if data is not None and processes.is_main:
            _check_same_data(ckpt["data"], data, out)
        data = data or processes.main_first(recorded_data, ckpt["data"], "train", out, progress and processes.is_main)
        eval_data = eval_data or processes.main_first(recorded_data, ckpt["data"], "eval", out,
                                                      progress and processes.is_main)
    elif data is None:
        data, gen_eval = processes.main_first(default_datasets, out, cfg.dataset, num_images, seed,
                                              progress and processes.is_main)
        eval_data = eval_data or gen_eval
        generated = {"dataset": cfg.dataset, "train": [num_images, seed], "eval": list(held_out(num_images, seed))}
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
    if ckpt is not None:
        try:
            system.load_state_dict(ckpt["system"])
            distributed.load_optimizer_state(optimizer, ckpt["optimizer"])
            batches.load_state_dict(ckpt["data_state"])
            extra = ckpt.get("extra", {})
            spent.update({k: float(v) for k, v in extra.get("spent", {}).items() if k in spent})
            if geco is not None and "geco" in extra:
                geco.load_state_dict(extra["geco"])
            set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            text = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"{ckpt_path} does not fit this model: {text[:200]}") from None
        if not all(torch.isfinite(v).all() for v in system.state_dict().values() if v.is_floating_point()):
            raise CheckpointError(f"{ckpt_path} holds non-finite parameters; it cannot be resumed")
        step = resumed_from = int(ckpt["step"])
        if processes.is_main:
            truncate_metrics(out / METRICS, step)
        log.info("resuming %s at step %d", out, step)
        if report is not None and processes.is_main:
            report(f"resuming the run in {out} at step {step}" +
                   (f" with {', '.join(schedule_changes)}" if schedule_changes else "") +
                   (f" (it has reached --steps {steps})" if step >= steps else
                    f", training to step {steps}" if steps < math.inf else ", training until the time limit"))
    params = list(system.parameters())
    snapshot = _Snapshot(params, optimizer)
    trainer = None    # one process with host checks: train_step
    faults = None     # the sync-free path counts skipped steps on the device
    if processes.distributed or speed.deferred:
        trainer = distributed.Trainer(system, optimizer, cfg.train.clip_norm, processes,
                                      deferred=speed.deferred, seed=seed)
        if speed.deferred:
            faults = _DeviceFaults(device)
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

    def stop_on_faults(count: int, where: str) -> None:
        checkpoint()
        raise TrainingError(
            f"{count} non-finite steps in a row {where}; the last good state is saved in {ckpt_path} "
            f"(lower the learning rate or check the data)")

    if ckpt is None:
        checkpoint()  # step 0: the directory now names its run
    system.train()
    bad_in_row, skipped, last = 0, 0, {}
    stop = "done"
    it = iter(batches)
    bar = _TrainingBar(steps, step, time_limit if time_clock == "wall" else None,
                       disable=not (progress and processes.is_main), desc=f"fit {cfg.dataset}")
    first = step
    loss = gnorm = applied = batch = None

    def log_row() -> None:
        """Write step `step`'s row to metrics.jsonl: loss, clock, and the metrics of its batch."""
        nonlocal loss, gnorm, skipped, last
        if applied is None:                              # the one host synchronisation of N steps
            loss, gnorm = trainer.settle()[:2]
            skipped, longest = faults.settle()
            if longest >= cfg.train.max_bad_steps:
                stop_on_faults(longest, f"before step {step}")
        last = {"step": step, "loss": loss, "grad_norm": gnorm, "skipped": skipped,
                **{k: round(v, 3) for k, v in clock().items()},
                **({"beta": float(geco.beta)} if geco is not None else {}),
                **({"pixel_scale": system.model.pixel_scale} if cfg.train.pixel_scale_final else {}),
                **(batch_metrics(system, batch, background) if processes.is_main else {})}
        mlog.write(json.dumps(last) + "\n")
        bar.show(loss=f"{loss:.4g}", fg_ari=f"{last.get('fg_ari', math.nan):.3f}")

    # Pyro's argument validation costs ~20% per step; non-finite values are caught below.
    mlog = open_append(out / METRICS) if processes.is_main else open(os.devnull, "a")
    with _StopFlag() as flag, mlog, pyro.validation_enabled(False):
        while step < steps:
            if processes.any(flag.signal is not None):           # every process stops at the same step
                stop = "signal"
                break
            if processes.any(out_of_time()):
                stop = "time"
                break
            try:
                batch = distributed.to_device(processes.shard(next(it)), device)
            except DatasetError as e:                            # a chunk missing or damaged since the start
                checkpoint()
                raise DatasetError(f"{e} (training stopped at step {step}; the run is saved in {ckpt_path})") from None
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            system.model.pixel_scale = pixel_scale_at(cfg, step)
            beta = geco.beta if geco is not None else 1.0
            if trainer is None:
                loss, gnorm, applied, mse = train_step(system, optimizer, batch["image"], cfg.train.clip_norm, beta,
                                                       snapshot)
            else:
                snapshot.save()
                loss, gnorm, applied, mse = trainer.step(batch["image"], step, beta)
                if applied is None:                              # checked on the device: undo there
                    ok = snapshot.finite()
                    snapshot.restore(keep=ok)
                    faults.add(trainer.last_applied & ok)
                elif applied and processes.any(not bool(snapshot.finite())):
                    snapshot.restore()
                    applied = False
            if geco is not None:
                release = cfg.train.geco_release_step is not None and step >= cfg.train.geco_release_step
                geco.update(mse, (trainer.last_applied & ok) if applied is None else applied, release)
            if applied is False:
                bad_in_row, skipped = bad_in_row + 1, skipped + 1
                log.warning("step %d: non-finite batch, loss, gradient or update (loss %s, gradient norm %s); "
                            "skipped", step + 1, loss, gnorm)
                if bad_in_row >= cfg.train.max_bad_steps:
                    stop_on_faults(bad_in_row, f"after step {step}")
                continue
            bad_in_row = 0
            step += 1
            bar.update(step)
            if step % log_every == 0 or step == steps:
                log_row()
            if step % checkpoint_every == 0:
                checkpoint()
        if step > first and last.get("step") != step and applied is not False:   # stopped between logging steps
            log_row()
        checkpoint()
    bar.close()
    if faults is not None:
        skipped = faults.settle()[0]
    system.eval()
    return FitResult(step=step, out=out, stopped=stop, last_metrics=last, skipped=skipped,
                     rank=processes.rank, resumed_from=resumed_from, system=system, data=data_info)
