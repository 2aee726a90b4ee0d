"""Folders built whole beside their target and put in place with one rename, and removed
by renaming them away first."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from .base import (
    WriteError,
    _fsync_dir,
    _hold,
    _reason,
    _release,
    _remove_empty,
    _temp_name,
)
from .pairs import _make_room


def temporary_dir(path: str | Path) -> Path:
    """A new, empty folder next to `path` to build it in (see `replace_dir`); folders of
    earlier builds whose process no longer runs are removed first."""
    path = Path(path)
    made, tmp = _make_room(path, ".partial")
    try:
        tmp.mkdir()
    except OSError as e:
        _remove_empty(made)
        raise WriteError(path, _reason(e), e.errno) from None
    _hold(tmp)
    return tmp


def remove_dir(tmp: Path, made: list[Path] = ()) -> None:
    """Remove the folder `tmp` (a build that failed) and the empty folders in `made`."""
    _release(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    _remove_empty(list(made))


def replace_dir(tmp: Path, path: str | Path, *, replace: bool = False) -> Path:
    """Rename the folder `tmp` to `path`. An empty folder at `path` is taken over; a
    non-empty one only with `replace` (it is moved aside, then removed once `tmp` is in
    place). A link at `path` is refused."""
    path = Path(path)
    if path.is_symlink():
        raise WriteError(path, "it is a symbolic link, and nothing is written through links", errno.ELOOP)
    old = None
    try:
        if path.is_dir():
            if any(path.iterdir()):
                if not replace:
                    raise WriteError(path, "it is not empty", errno.ENOTEMPTY)
                old = _temp_name(path, ".old")
                os.replace(path, old)
            else:
                path.rmdir()
        os.replace(tmp, path)
    except OSError as e:
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)                # put the old one back
                old = None
        raise WriteError(path, _reason(e), e.errno) from None
    _release(tmp)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def remove_tree(path: str | Path) -> None:
    """Delete the folder `path` (never through a link) so that a kill midway leaves no half
    of it under its name: it is renamed to a temporary name first, which the next write of
    `path` removes (`remove_stale`) if this process does not get to."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        raise WriteError(path, "it is not a folder (a link is never followed)", errno.ENOTDIR)
    trash = _temp_name(path, ".old")
    try:
        os.replace(path, trash)
    except OSError as e:
        raise WriteError(path, _reason(e), e.errno) from None
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
