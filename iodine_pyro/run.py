"""A trained run: the one place where a command opens a run, its data and its images.

    run = Run.open("runs/tet")                       # a run directory or checkpoint file
    run = Run.open("pretrained:tetrominoes")         # weights shipped with the package
    run.system, run.cfg, run.step, run.name          # the trained `Iodine` (eval mode), ...
    run.metrics()                                    # the rows of its metrics.jsonl
    ds, where = run.dataset(need="images", command="sample")   # its held-out set, checked
    batch, where = run.images(0, 16, command="sample")         # images [0, 16) of it

`fit` (its pictures, from the system it has just trained), `evaluate`, `sample`,
`compare`, `plot` and `ablate` all open runs and their data here: the checkpoint is read
once per command and its configuration validated; the held-out set is the one recorded in
the checkpoint, or `data` when a command is given one; a shipped model's held-out set is
generated once into the cache (``$IODINE_PYRO_CACHE``, default ``~/.cache/iodine-pyro``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import xarray as xr

from .checkpoint import CheckpointError, load_checkpoint, read_metrics
from .config import Config, pixel_scale_at
from .data import DatasetError, background_groups, ensure_generated, is_sequence, is_store, load_images, open_dataset
from .system import Iodine

__all__ = ["PRETRAINED_PREFIX", "Run", "Shipped", "cache_dir", "check_dataset", "data_location",
           "generate_recorded", "open_checked", "pretrained_models", "recorded_data"]

PRETRAINED_PREFIX = "pretrained:"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


class Shipped(NamedTuple):
    """A model shipped with the package (``pretrained:NAME``)."""

    weights: Path                        # NAME.pt: parameters and configuration
    held_out: tuple[int, int] | None     # (images, seed) of the generated held-out set it was judged on


def pretrained_models() -> dict[str, Shipped]:
    """Every shipped model by name: each evaluation file ``NAME.json`` in the package's
    ``pretrained/`` folder with its weights ``NAME.pt`` beside it (`benchmarks/ship_pretrained.py`
    writes both), so that shipping a model is writing its two files."""
    models = {}
    for path in sorted(PRETRAINED_DIR.glob("*.json")):
        weights = path.with_suffix(".pt")
        if not weights.is_file():
            continue
        try:
            generated = json.loads(path.read_text())["held_out"].get("generated")
            held = (int(generated[0]), int(generated[1])) if generated else None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{path} is not a shipped model's evaluation file ({type(e).__name__}: {e})") from None
        models[path.stem] = Shipped(weights, held)
    return models


IMAGES, SEQUENCES = "images", "sequences"


def cache_dir() -> Path:
    """Where generated held-out sets of shipped models are kept."""
    return Path(os.environ.get("IODINE_PYRO_CACHE") or Path.home() / ".cache" / "iodine-pyro")


def check_dataset(ds: xr.Dataset, cfg: Config, where: str, need: str | None = None,
                  command: str = "this command") -> None:
    """A store fits a configuration: its images have the configured channels and size,
    and (with `need`) it holds single ``images`` or ``sequences`` as the command needs."""
    m = cfg.model
    H, W, C = ds.sizes["height"], ds.sizes["width"], ds.sizes["channel"]
    if (C, H, W) != (m.image_channels, *m.image_size):
        raise DatasetError(f"{where} holds {C}x{H}x{W} images (channels x height x width) but the "
                           f"{cfg.dataset}/{cfg.preset} configuration expects "
                           f"{m.image_channels}x{m.image_size[0]}x{m.image_size[1]}")
    if need == IMAGES and is_sequence(ds):
        raise DatasetError(f"{where} holds sequences; {command} works on single images "
                           "(for sequence runs: fit, evaluate and plot sequence)")
    if need == SEQUENCES and not is_sequence(ds):
        raise DatasetError(f"{where} holds single images, not sequences; {command} needs a sequence run")


DATA_DIR = "data"                                   # a run's generated datasets: OUT/data/train, OUT/data/test
DATA_NAMES = {"train": "train", "eval": "test"}


def recorded_data(data: dict[str, Any], which: str, out: Path, progress: bool) -> str | None:
    """The ``train`` or ``eval`` set a checkpoint records, as a path (`data_location`),
    generated first when it has to be."""
    path, make = data_location(data, which, out)
    if make:
        generate_recorded(data, which, path, progress)
    return path


def generate_recorded(data: dict[str, Any], which: str, path: str, progress: bool) -> None:
    """Generate at `path` the ``train`` or ``eval`` set whose generation `data` records."""
    n, seed = data["generated"][which]
    ensure_generated(data["generated"]["dataset"], int(n), path, seed=int(seed), progress=progress)


def data_location(data: dict[str, Any], which: str, out: Path) -> tuple[str | None, bool]:
    """Where the ``train`` or ``eval`` set a checkpoint records is, and whether it is
    generated data to ensure there (`ensure_generated`: checked, and made when missing or
    damaged). Relative paths lie in the run directory. Generated data (the record
    says how it was made) is generated again, exactly, when it is gone: where it was when
    that lies inside the run directory (a run directory copied without its data, a
    checkpoint committed without it), else in OUT/data (a run moved away from a store it
    was given).

    A checkpoint may come from anyone, so what it records is checked before it is used: a
    relative path must stay inside the run directory (no ``..``, no symbolic link on the
    way), and data are generated only there; an absolute path (a store given to `fit`
    with --data) is only read. Anything else is refused in one line: pass --data."""
    value = data.get(which)
    if not value:
        return None, False
    if not isinstance(value, str) or "\0" in value:
        raise CheckpointError(f"the checkpoint in {out} names its {which} data oddly ({value!r}); pass `data`")
    made = data.get("generated")
    generated = bool(made) and which in made
    if Path(value).is_absolute():
        if is_store(value) or not generated:
            return value, False
        value = f"{DATA_DIR}/{DATA_NAMES[which]}"       # the run has moved from it: made again inside
    path = _inside_run(Path(out), value)
    if path is None:
        raise CheckpointError(f"the checkpoint in {out} records {which} data at {value!r}, outside its run "
                              f"directory (through '..' or a symbolic link); pass `data`")
    return str(path), generated


def _inside_run(out: Path, rel: str) -> Path | None:
    """OUT/rel when it stays inside `out`: no ``..`` and no symbolic link among its parts."""
    parts = Path(rel).parts
    if not parts or ".." in parts:
        return None
    path = out
    for part in parts:
        path = path / part
        if path.is_symlink():
            return None
    return path


def open_checked(path: str | Path, cfg: Config, need: str | None = None,
                 command: str = "this command") -> xr.Dataset:
    """Open the store at `path` and check that it fits `cfg` (`check_dataset`)."""
    ds = open_dataset(path)
    check_dataset(ds, cfg, str(path), need, command)
    return ds


@dataclass
class Run:
    """A trained system with what it was trained on.

    Attributes:
        system: the `Iodine` (eval mode unless the caller trains it).
        ckpt: the checkpoint's contents (``config``, ``step``, ``data``, ...).
        name: a short name (the run directory's, or ``pretrained-<name>``).
        home: the run directory (None for a shipped model): default place of outputs.
        ref: what the run was opened from: ``pretrained:NAME``, or the resolved path.
        shipped: the shipped model's entry (`pretrained_models`) when it is one, else None.
    """

    system: Iodine
    ckpt: dict[str, Any]
    name: str
    home: Path | None
    ref: str
    shipped: Shipped | None = None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, ref: str | Path, device: str | torch.device = "cpu", amp: bool = False) -> "Run":
        """A run directory, a checkpoint file, or ``pretrained:NAME`` (`pretrained_models`),
        ready for inference (`set_precision`: channels-last, bf16 autocast with `amp`)."""
        text, shipped = str(ref), None
        if text.startswith(PRETRAINED_PREFIX):
            name, models = text[len(PRETRAINED_PREFIX):], pretrained_models()
            if name not in models:
                raise CheckpointError(f"no shipped model {name!r}; shipped: "
                                      f"{', '.join(PRETRAINED_PREFIX + n for n in models)}")
            shipped = models[name]
            path, run_name, home = shipped.weights, f"pretrained-{name}", None
        else:
            path = Path(ref)
            home = path if path.is_dir() or path.suffix != ".pt" else path.parent
            run_name = home.resolve().name or "run"
            text = str(path.resolve())
        ckpt = load_checkpoint(path, map_location=device)
        with torch.random.fork_rng(devices=[]):   # its initial weights are replaced: draw them apart
            system = Iodine(ckpt["config"]).to(device)
        try:
            system.load_state_dict(ckpt["system"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path} does not fit its configuration: "
                                  f"{str(e).splitlines()[0]}") from None
        system.model.pixel_scale = pixel_scale_at(ckpt["config"], int(ckpt["step"]))  # as trained at its step
        system.eval()
        return cls(system, ckpt, run_name, home, text, shipped).set_precision(amp)

    @classmethod
    def of(cls, run: "Run | str | Path", device: str | torch.device = "cpu", amp: bool | None = None) -> "Run":
        """`run` itself when it is a `Run` (its precision changed only when `amp` is given),
        else `Run.open(run, device, amp)`."""
        if isinstance(run, Run):
            return run if amp is None else run.set_precision(amp)
        return cls.open(run, device, bool(amp))

    def set_precision(self, amp: bool) -> "Run":
        """Inference in bf16 autocast (`amp`) or in full precision; convolution weights
        channels-last either way (the same numbers up to the order of a sum).

        Inference (the guide's refinement with its inner gradient, no weight gradients) is
        convolutions at 85% of its time. On a 2-core AMD EPYC (Zen 4, AVX512-BF16), one
        thread, 32 images of ``pretrained:tetrominoes``: 4.6 CPU s in NCHW float32, 3.8
        channels-last (oneDNN reorders NCHW activations at every call), 2.0 channels-last in
        bf16 (`benchmarks/bench_inference_speed.py`). float32 convolutions already run near
        this core's float32 peak, so only bf16 halves the time; it changes the reported
        numbers in their last digits, hence off unless asked for.
        """
        self.system.use_fast_paths(amp=torch.bfloat16 if amp else None, channels_last=True)
        return self

    @classmethod
    def of_training(cls, system: Iodine, step: int, data: dict[str, str | None], home: Path) -> "Run":
        """The run `fit` has just trained, without reading its checkpoint back."""
        ckpt = {"config": system.cfg, "step": step, "data": data}
        system.model.pixel_scale = pixel_scale_at(system.cfg, step)
        return cls(system, ckpt, home.resolve().name, home, str(home))

    # -- what it is ----------------------------------------------------------------------
    @property
    def cfg(self) -> Config:
        return self.ckpt["config"]

    @property
    def step(self) -> int:
        return int(self.ckpt["step"])

    @property
    def device(self) -> torch.device:
        return next(self.system.parameters()).device

    def title(self) -> str:
        return f"{self.cfg.dataset} run {self.name}, training step {self.step}"

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of the run's metrics.jsonl ([] for a shipped model or before logging)."""
        return read_metrics(self.home) if self.home is not None else []

    def output(self, name: str) -> Path:
        """The default path of an output file: in the run directory, or for a shipped model
        in a folder named after it in the working directory."""
        return (self.home if self.home is not None else Path(self.name)) / name

    # -- its data ------------------------------------------------------------------------
    def data_path(self, data: str | Path | None = None) -> str:
        """`data`, else the held-out set recorded with the run, else (a shipped model) its
        generated held-out set."""
        if data:
            return str(data)
        recorded = recorded_data(self.ckpt.get("data") or {}, "eval", self.home or Path("."), progress=False)
        if recorded:
            return recorded
        held = self.shipped.held_out if self.shipped is not None else None
        if held is None:
            raise DatasetError(f"{self.ref} records no held-out set; pass `data`")
        n, seed = held
        path = cache_dir() / "heldout" / f"{self.cfg.dataset}-{n}-seed{seed}"
        return str(ensure_generated(self.cfg.dataset, n, path, seed=seed, progress=False))

    def dataset(self, data: str | Path | None = None, need: str | None = IMAGES,
                command: str = "this command") -> tuple[xr.Dataset, str]:
        """The opened store of `data_path(data)`, checked against the run's configuration
        (and for single ``images`` or ``sequences`` when `need` says)."""
        where = self.data_path(data)
        return open_checked(where, self.cfg, need, command), where

    def images(self, start: int, stop: int, data: str | Path | None = None, need: str | None = IMAGES,
               command: str = "this command") -> tuple[dict[str, torch.Tensor], str]:
        """Images [start, stop) of the run's held-out set (or `data`), clipped to its size, on
        the run's device; ``mask`` too when the store has masks."""
        ds, where = self.dataset(data, need, command)
        n = ds.sizes["image"]
        if start >= n:
            raise DatasetError(f"image {start} is outside {where}, which holds {n} images")
        batch = load_images(ds, start, min(stop, n))
        return {k: v.to(self.device) for k, v in batch.items()}, where

    @staticmethod
    def background_groups(ds: xr.Dataset) -> int:
        """Leading mask groups of `ds` that FG-ARI drops (the dataset's description)."""
        return background_groups(ds.attrs)
