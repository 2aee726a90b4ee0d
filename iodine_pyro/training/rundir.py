"""The run directory: what makes a directory a run, who may write it, what it records.

* A directory is a run only when its checkpoint, or the manifest (``manifest.json``)
  that `fit` writes before anything else, says so. The manifest lists what the run makes
  (its files, the datasets it generated); ``--overwrite`` removes those and nothing else:
  never a ``--data`` store, never through a symbolic link.
* Run files are never written through symbolic links: a link in their place is refused.
* One `fit` at a time: it holds an exclusive lock on the run directory from start to end
  (`run_lock`), and a run continues on the store it was trained on (`check_same_data`).
* Datasets `fit` generates for a run live in OUT/data and are recorded in the manifest
  before they are generated, so that a kill mid-way leaves them the run's to remove.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT, METRICS, CheckpointError, load_checkpoint
from ..config import Config, field_differences, held_out, num_slots_at
from ..data import DATASETS, DatasetError, ensure_generated, generation, is_store
from ..data.store import open_store
from ..io import TEMP_SUFFIX, WriteError, in_use, lock_dir, remove_stale, remove_tree, write_text
from ..run import DATA_DIR, DATA_NAMES, data_location, generate_recorded

log = logging.getLogger(__name__)

# What `fit` makes in a run directory: its files (the pictures and the data behind them are
# drawn by the command line once training ends) and the datasets it generates.
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "iodine-pyro-run"
RUN_FILES = (CHECKPOINT, METRICS, "decomposition.png", "decomposition.npz", "curves.png", "curves.json")


def run_lock(out: Path, main: bool):
    """`fit` holds its run directory alone from start to end: an exclusive flock on the
    directory (`io.lock_dir`), dropped by the kernel however the process ends. A second
    writer is refused in one line naming the holder, before it reads or writes anything:
    two writers would truncate and append to one metrics.jsonl and replace each other's
    checkpoints. On rank 0 only (the one process that writes the run directory)."""
    if not main or (out.exists() and not out.is_dir()):
        return contextlib.nullcontext()           # prepare_run_dir refuses these in one line
    return lock_dir(out, "this run directory")


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


# -- the manifest ----------------------------------------------------------------------


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the run in `out` (None when there is none); CheckpointError when the
    file is there but is not one."""
    path = Path(out) / MANIFEST
    if not path.exists() and not _is_link(path):
        return None
    if _is_link(path):
        raise CheckpointError(f"{path} is a symbolic link; a run's manifest never is (remove it or choose another `out`)")
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


# -- what --overwrite removes -----------------------------------------------------------


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


# -- continue, start or refuse ----------------------------------------------------------


def _check_no_links(out: Path) -> None:
    """Refuse a run directory where a run file (or its data folder) is a symbolic link:
    fit would otherwise append to, overwrite or delete whatever the link points to."""
    for name in (MANIFEST, *RUN_FILES, DATA_DIR):
        if _is_link(out / name):
            raise CheckpointError(f"{out / name} is a symbolic link; fit never writes or deletes through links "
                                  f"(remove it or choose another `out`)")


def _remove_leftovers(out: Path, manifest: dict[str, Any] | None, ckpt: dict[str, Any] | None) -> list[str]:
    """Delete the temporary files of writes a kill cut short (ours only); the names of what
    is left in `out`."""
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    for name in entries:
        if _our_leftover(out, name) and (manifest is not None or ckpt is not None or name.startswith(f".{MANIFEST}.")):
            (out / name).unlink(missing_ok=True)
    if ckpt is not None:                                         # ... by an earlier version (no pid in the name)
        for stale in out.glob(f".{CHECKPOINT}.*.tmp"):
            if stale.is_file() and not stale.is_symlink() and not stale.name[len(CHECKPOINT) + 2:].split(".")[0].isdigit():
                stale.unlink()
    return [n for n in entries if (out / n).exists() or _is_link(out / n)]


def as_of_step(cfg: Config, step: int) -> Config:
    """`cfg` as a run of it stands after `step` steps: with the K of its schedule
    (`num_slots_at`), which training writes into ``model.num_slots``."""
    k = num_slots_at(cfg, step)
    if k == cfg.model.num_slots:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model.num_slots = k
    return cfg


def _refuse_another_run(out: Path, stored: Config, cfg: Config, checkpointed: bool) -> None:
    """A run of another configuration is refused, naming the first differences."""
    diff = config_differences(stored, cfg)
    if not diff:
        return
    shown = f"{'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}"
    if checkpointed:
        raise CheckpointError(f"{out} holds another run ({shown}); pass `resume` to continue it with its own "
                              f"settings, `overwrite` to replace it, or choose another `out`")
    raise CheckpointError(f"{out} holds another run, stopped before its first checkpoint ({shown}); "
                          f"pass `overwrite` to replace it, or choose another `out`")


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
        raise CheckpointError(f"`out` {out} is a file, not a run directory")
    if out.is_dir():
        _check_no_links(out)
    manifest = read_manifest(out) if out.is_dir() else None
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    entries = _remove_leftovers(out, manifest, ckpt)
    if manifest is None and ckpt is None and entries:
        raise CheckpointError(f"{out} is not empty and holds no run (found {sorted(entries)[0]!r}); "
                              f"choose another `out`" + ("" if overwrite else " (`overwrite` replaces runs only)"))
    if overwrite and (manifest is not None or ckpt is not None):
        _remove_run(out, manifest, ckpt, {Path(p).resolve() for p in keep if p})
        manifest = ckpt = None
    if ckpt is not None:
        if not resume:       # compared as of its step: a K changed by the schedule is the same run's
            _refuse_another_run(out, ckpt["config"], as_of_step(cfg, int(ckpt["step"])), checkpointed=True)
        return ckpt
    if resume:
        raise CheckpointError(f"no run to resume in {out} (no {CHECKPOINT})")
    if manifest is not None:                                     # stopped before its first checkpoint
        try:
            started = Config.from_dict(manifest["config"])
        except ValueError as e:
            raise CheckpointError(f"{out / MANIFEST} has an invalid configuration: {e}") from None
        _refuse_another_run(out, started, cfg, checkpointed=False)
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(out, e.strerror or type(e).__name__, e.errno) from None
    _new_manifest(out, cfg, [])
    return None


# -- the datasets a run records -----------------------------------------------------------


def default_datasets(out: Path, dataset: str, num_images: int, seed: int,
                     progress: bool) -> tuple[Path, Path]:
    """Generate (once) a training set and a held-out set in OUT/data, each recorded in the
    run's manifest first; a generation cut short is done again."""
    if dataset not in DATASETS:
        raise DatasetError(f"no generator for {dataset!r}; pass `data` with a stored dataset "
                           f"(generators: {', '.join(DATASETS)})")
    data = out / DATA_DIR
    paths = []
    for name, n, s in ((DATA_NAMES["train"], num_images, seed), (DATA_NAMES["eval"], *held_out(num_images, seed))):
        record_store(out, data / name)
        paths.append(ensure_generated(dataset, n, data / name, seed=s, progress=progress))
    return paths[0], paths[1]


def run_data(recorded: dict[str, Any], which: str, out: Path, progress: bool) -> str | None:
    """`recorded_data` for `fit`: a dataset it makes again inside its run directory is
    recorded in the manifest first, as one it generates."""
    path, make = data_location(recorded, which, out)
    if make:
        record_store(out, Path(path))
        generate_recorded(recorded, which, path, progress)
    return path


def held_out_for(ds, out: Path, seed: int, progress: bool) -> Path | None:
    """A held-out set for a run trained on the store `ds`: as many images as it holds (up
    to 1024) of its dataset, generated in OUT/data/test from another seed; None when its
    dataset has no generator (then evaluation needs --data)."""
    name = str(ds.attrs.get("dataset", ""))
    if name not in DATASETS:
        log.warning("no generator for %r: the run records no held-out set (evaluate it with --data)", name)
        return None
    record_store(out, out / DATA_DIR / DATA_NAMES["eval"])
    n, held_out_seed = held_out(ds.sizes["image"], seed)
    return ensure_generated(name, n, out / DATA_DIR / DATA_NAMES["eval"], seed=held_out_seed, progress=progress)


def recorded_path(path: str | Path, out: Path) -> str:
    """How a checkpoint names a dataset: relative to the run directory when it lies inside it
    (so that the run can be moved, or cloned with its checkpoint), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(out).resolve()))
    except ValueError:
        return str(path)


def check_same_data(recorded: dict[str, Any], given: str | Path, out: Path) -> None:
    """A run continues on the store it was trained on (its checkpoint's data position is a
    position in that store): `--data` naming another one is refused while the recorded one
    is there, unless it is the same generated data (same dataset, images and seed: a copy,
    or the same generation made again, as when a run is moved); when the recorded one is
    gone, the other is taken, with a warning unless it is the generation the run records."""
    value = recorded["train"]
    path = Path(value) if Path(value).is_absolute() else out / value
    if Path(given).resolve() == path.resolve():
        return
    made = _generation_at(given)
    if is_store(path):
        if made is not None and made == _generation_at(path):
            log.info("%s holds the data %s was trained on (%d %s images of seed %d); continuing on it",
                     given, out, made[1], made[0], made[2])
            return
        raise CheckpointError(f"{out} is trained on {value}, not {given}; continue it without `data` (or with "
                              f"that store, or a copy of it), or train on {given} into another `out`")
    record = recorded.get("generated") or {}
    if made is not None and record.get("dataset") == made[0] and list(record.get("train", ())) == list(made[1:]):
        log.info("the training data of %s (%s) is gone; continuing on %s, the same generated data", out, value, given)
        return
    log.warning("the training data of %s (%s) is gone; continuing on %s", out, value, given)


def _generation_at(path: str | Path) -> tuple[str, int, int] | None:
    """`generation` of the store at `path`; None when it is not a generated store or
    cannot be opened."""
    try:
        return generation(open_store(path))
    except (DatasetError, OSError, ValueError, KeyError):
        return None


def generation_record(train, held) -> dict[str, Any] | None:
    """How a checkpoint records the datasets a run trains and is evaluated on (opened
    stores; `held` may be None) when they are generated ones: ``{"dataset", "train":
    [images, seed], "eval": [images, seed]}``, from which a run directory moved or cloned
    without its data makes them again; None when the training store is not generated.
    It is read from the stores themselves, whoever generated them."""
    made = generation(train)
    if made is None:
        return None
    record: dict[str, Any] = {"dataset": made[0], "train": list(made[1:])}
    other = generation(held) if held is not None else None
    if other is not None and other[0] == made[0]:
        record["eval"] = list(other[1:])
    return record
