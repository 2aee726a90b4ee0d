"""Files written together (a figure's PNG and the data behind it): staged, then renamed
into place together under a journal; and the way cleared for any write (`_make_room`),
which finishes a journal a kill left in the folder first."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .base import (
    _NOFOLLOW,
    _TEMP,
    PAIRS_SUFFIX,
    TEMP_SUFFIX,
    WriteError,
    _abandon,
    _create,
    _fsync_dir,
    _hold,
    _mkdir,
    _reason,
    _release,
    _remove_empty,
    _temp_name,
    _try_lock,
    _unlink,
    check_target,
    missing_folders,
    remove_stale,
)


def _make_room(path: Path, kind: str = TEMP_SUFFIX) -> tuple[list[Path], Path]:
    """Create `path`'s missing folders and clear stale temporaries of it: (the folders made,
    a fresh temporary name beside it)."""
    made = missing_folders(path.parent)
    _mkdir(path.parent, path)
    finish_pairs(path.parent)
    remove_stale(path)
    return made, _temp_name(path, kind)


# -- files written together -----------------------------------------------------------

_staged: dict[Path, list[tuple[Path, Path, list[Path]]]] = {}   # companion -> [(temporary, target, folders made)]
_staged_lock = threading.Lock()


def stage(path: str | Path, write: Callable[[IO[bytes]], Any], *, companion: str | Path) -> Path:
    """Write `path` whole to a temporary file now and put it in place only when `commit`
    is called for `companion` (the file it belongs with); `discard` removes it."""
    path = check_target(path)
    made, tmp = _make_room(path)
    try:
        fd = _create(tmp, path)
        _hold(tmp, fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        _release(tmp)
        _abandon(path, tmp, made, e)
        raise
    key = Path(os.path.abspath(companion))
    with _staged_lock:
        files = _staged.setdefault(key, [])
        for old in [f for f in files if f[1] == path]:   # staged before for a figure never saved
            _release(old[0])
            _unlink(old[0])
            files.remove(old)
        files.append((tmp, path, made))
    return path


def stage_npz(path: str | Path, arrays: dict[str, Any], *, companion: str | Path) -> Path:
    """`stage` the arrays as a compressed ``.npz`` file."""
    import numpy as np

    return stage(path, lambda f: np.savez_compressed(f, **arrays), companion=companion)


def stage_text(path: str | Path, text: str, *, companion: str | Path) -> Path:
    """`stage` a UTF-8 text file."""
    return stage(path, lambda f: f.write(text.encode("utf-8")), companion=companion)


def _put_in_place(path: Path, tmp: Path) -> None:
    """Rename `tmp` over `path`, and with it the files staged for `path` in its folder (a
    figure's data): a journal lists every rename before the first, so that a kill between
    two of them is finished by the next write in the folder (`finish_pairs`)."""
    with _staged_lock:
        files = _staged.pop(Path(os.path.abspath(path)), [])
    try:
        renames = [(t, p) for t, p, _ in files if p.parent == path.parent] + [(tmp, path)]
        if len(renames) == 1:
            os.replace(tmp, path)
        else:
            for _, target in renames:
                check_target(target)
            _journaled_renames(path.parent / f".{path.name}{PAIRS_SUFFIX}", renames)
        for t, p, _ in files:                        # a staged file in another folder: after it
            if p.parent != path.parent:
                os.replace(t, p)
    except BaseException:
        for t, _, _ in files:
            _release(t)
            _unlink(t)
        raise
    for t, _, _ in files:
        _release(t)


def _journaled_renames(journal: Path, renames: list[tuple[Path, Path]]) -> None:
    remove_stale(journal)                             # a journal's own write cut short
    jtmp = _temp_name(journal)
    fd = _create(jtmp, journal)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                # finish_pairs leaves a journal being followed alone
        os.write(fd, json.dumps([[t.name, p.name] for t, p in renames]).encode())
        os.fsync(fd)
        os.replace(jtmp, journal)
        _fsync_dir(journal.parent)
        for t, p in renames:
            os.replace(t, p)
        _fsync_dir(journal.parent)
        os.unlink(journal)
    except BaseException:
        _unlink(jtmp)
        raise
    finally:
        os.close(fd)


def finish_pairs(folder: str | Path) -> None:
    """Finish the renames of files written together that a kill cut short (their journal,
    ``.NAME.pairs``, is still there and nobody follows it): every temporary file it lists
    that is still there is renamed to its target, then the journal is removed. A journal
    names files of its own folder only, each temporary named after its target."""
    folder = Path(folder)
    try:
        journals = [e for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(PAIRS_SUFFIX)
                    and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    for entry in journals:
        try:
            fd = os.open(entry.path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            continue
        try:
            if _try_lock(fd) is False:
                continue
            renames = json.loads(os.read(fd, 1 << 16))
            for name, target in renames:
                m = _TEMP.match(name)
                if m is None or m["name"] != target or "/" in target or target in (".", ".."):
                    raise ValueError("not a journal of this package")
            for name, target in renames:
                with contextlib.suppress(FileNotFoundError):
                    if not os.path.islink(folder / target):
                        os.replace(folder / name, folder / target)
            _fsync_dir(folder)
            os.unlink(entry.path)
        except (OSError, ValueError, TypeError):
            pass                                     # not ours to follow: left as it is
        finally:
            os.close(fd)


def commit(companion: str | Path) -> None:
    """Put the files staged with `companion` in place (after `companion` itself is)."""
    with _staged_lock:
        files = _staged.pop(Path(os.path.abspath(companion)), [])
    for i, (tmp, path, _) in enumerate(files):
        try:
            check_target(path)
            os.replace(tmp, path)
        except OSError as e:
            for rest, _, _ in files[i:]:
                _release(rest)
                _unlink(rest)
            raise WriteError(path, _reason(e), e.errno) from None
        finally:
            _release(tmp)
        _fsync_dir(path.parent)


def discard(companion: str | Path) -> None:
    """Remove the files staged with `companion` (it could not be written), and the folders
    staging them made."""
    with _staged_lock:
        files = _staged.pop(Path(os.path.abspath(companion)), [])
    for tmp, _, _ in files:
        _release(tmp)
        _unlink(tmp)
    for _, _, made in reversed(files):
        _remove_empty(made)


@atexit.register
def _discard_all() -> None:
    for key in list(_staged):
        discard(key)
