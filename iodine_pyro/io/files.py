"""Whole files: a temporary beside the target, flushed, fsynced and renamed over it; and
appends that never follow a link."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .base import (
    WriteError,
    _abandon,
    _create,
    _fsync_dir,
    _hold,
    _reason,
    _release,
    _remove_empty,
    check_target,
)
from .pairs import _make_room, _put_in_place


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder for a writer that opens files itself; renamed
    over `path` when the block ends, removed when it fails."""
    path = check_target(path)
    made, tmp = _make_room(path)
    try:
        fd = _create(tmp, path)
        _hold(tmp, fd)
        os.close(fd)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        check_target(path)                           # a link made meanwhile is not replaced
        _put_in_place(path, tmp)
    except BaseException as e:
        _abandon(path, tmp, made, e)
        raise
    finally:
        _release(tmp)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """An open temporary file ("w" text or "wb" bytes) renamed over `path` when the block
    ends (after flush and fsync), removed when it fails."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files (mode 'w' or 'wb'), not {mode!r}")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()


def write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def open_append(path: str | Path) -> IO[str]:
    """`path` opened for appending text, created when missing; never through a link."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        check_target(path)
        fd = os.open(path, flags, 0o666)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, "it is a symbolic link, and nothing is written through links"
                         if e.errno == errno.ELOOP else _reason(e), e.errno) from None
    return _AppendFile(os.fdopen(fd, "a", encoding="utf-8"), path)


class _AppendFile:
    """A text file whose write and flush failures name it (WriteError)."""

    def __init__(self, f: IO[str], path: Path):
        self._f, self.path = f, path

    def write(self, text: str) -> int:
        try:
            n = self._f.write(text)
            self._f.flush()
            return n
        except OSError as e:
            raise WriteError(self.path, _reason(e), e.errno) from None

    def flush(self) -> None:
        self.write("")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()

    def __enter__(self) -> "_AppendFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
