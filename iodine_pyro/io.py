"""Writing files so that nothing is lost: whole or not at all, never through a link.

Every file the package writes goes through here:

    with atomic_path("runs/tet/checkpoint.pt") as tmp:   # a path for a library to write
        torch.save(state, tmp)
    with atomic_file("runs/tet/compare.json", "w") as f:  # an open file
        f.write(text)
    write_text(path, text); write_bytes(path, data)

The content goes to a temporary file in the target's own folder (so that the rename
cannot cross file systems), is flushed and fsynced, and only then renamed over the
target; the folder is fsynced so that the rename survives a power cut. A failure (a full
disk, a read-only folder, an exception of the writer, Ctrl-C) removes the temporary file
and leaves the target as it was. A target that is a symbolic link is refused rather than
written through: a link inside a run directory must not redirect what the run writes.

A file killed mid-write (SIGKILL, power loss) can leave its temporary file behind. The
writer holds an exclusive lock (flock) on its temporary file or folder for as long as it
writes it, and the next write of the same target removes the temporaries that nobody
holds: the kernel drops a lock when its process ends, however it ends, and a lock is seen
by every process that shares the file system's kernel (containers on one host) and, where
the file system supports flock over the network (NFSv4 on Linux), by other hosts. Where a
temporary cannot be locked at all, its name's process id decides (on this host only).
A folder is deleted by renaming it to a temporary name first (`remove_tree`), so that a
kill midway leaves recognisable garbage rather than half a store under its name.

Failures raise `WriteError`, an `OSError` whose message is one line that names the
target: ``cannot write runs/tet/checkpoint.pt: No space left on device``.

Files that belong together (a figure's PNG and the data behind it) are written with
`stage` and `commit`: the data goes to its temporary file first and is renamed into place
only together with the PNG, so that a failure leaves neither. Before the first of their
renames a journal (``.NAME.pairs`` beside the PNG) lists them all; a kill between two
renames leaves it, and the next write in that folder finishes the renames from it (the
temporary files are complete by then), so the pair is never left from two writes. A
reader that finds a journal knows the pair is being replaced.

`lock_dir` holds an exclusive lock on a folder (flock on the folder itself: nothing is
created in it) for a process that owns it, such as `fit` on its run directory.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["WriteError", "atomic_file", "atomic_path", "check_target", "commit", "discard", "finish_pairs", "in_use", "lock_dir",
           "missing_folders", "open_append", "pid_alive", "remove_dir", "remove_stale", "remove_tree",
           "replace_dir", "stage", "stage_npz", "stage_text", "temporary_dir", "write_bytes", "write_text"]

TEMP_SUFFIX = ".tmp"
PAIRS_SUFFIX = ".pairs"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class WriteError(OSError):
    """A file could not be written; the message is one line naming it."""

    def __init__(self, path: str | Path, reason: str, code: int | None = None):
        super().__init__(code or errno.EIO, reason, str(path))
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


def _reason(err: BaseException) -> str:
    """The one-line cause of an OS error (its strerror, without the errno and file)."""
    if isinstance(err, WriteError):
        return err.reason
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:              # another user's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True                      # no /proc: os.kill is all there is


def check_target(path: str | Path) -> Path:
    """`path` as a target to replace: refused (WriteError) when it is a symbolic link or a
    directory."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as e:
        raise WriteError(path, _reason(e), e.errno) from None
    if stat.S_ISLNK(mode):
        raise WriteError(path, "it is a symbolic link, and nothing is written through links "
                               "(remove it or choose another path)", errno.ELOOP)
    if stat.S_ISDIR(mode):
        raise WriteError(path, "it is a directory", errno.EISDIR)
    return path


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+(?:\.tmp|\.partial|\.old)$")


def remove_stale(path: str | Path) -> None:
    """Remove the temporary files and folders that writes of `path` by processes that no
    longer run left next to it (a kill mid-write)."""
    path = Path(path)
    try:
        siblings = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in siblings:
        m = _TEMP.match(entry.name)
        if m is None or m["name"] != path.name or in_use(entry.path, int(m["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


# -- locks ----------------------------------------------------------------------------

_held: dict[str, int] = {}          # temporary path -> the descriptor that holds its lock
_held_lock = threading.Lock()


def _try_lock(fd: int) -> bool | None:
    """An exclusive flock on `fd` without waiting: True when taken, False when another open
    file holds it, None when the file system cannot lock it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _hold(tmp: Path, fd: int | None = None) -> None:
    """Lock the temporary `tmp` for as long as this process writes it (`_release`); `fd` an
    open descriptor of it (duplicated: the lock outlives its closing), else it is opened."""
    try:
        fd = os.dup(fd) if fd is not None else os.open(tmp, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return
    _try_lock(fd)
    with _held_lock:
        old = _held.pop(str(tmp), None)
        _held[str(tmp)] = fd
    if old is not None:
        os.close(old)


def _release(tmp: Path) -> None:
    with _held_lock:
        fd = _held.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def in_use(path: str, pid: int) -> bool:
    """Whether a temporary file or folder is still being written: its lock is held; where
    it cannot be locked, its writer's process id still runs (on this host)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return True                      # gone, or not ours to judge
    try:
        free = _try_lock(fd)
    finally:
        os.close(fd)                     # and with it the lock just taken
    return pid_alive(pid) if free is None else not free


def _holder(folder: Path) -> str:
    """Who holds the flock of `folder` (from /proc/locks): 'process N (its command)', or ''."""
    try:
        st = os.stat(folder)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        pid, where = fields[4], fields[5].split(":")
        if len(where) == 3 and where[2] == str(st.st_ino) and int(where[0], 16) == os.major(st.st_dev) \
                and int(where[1], 16) == os.minor(st.st_dev):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = " ".join(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
            except OSError:
                command = ""
            command = command if len(command) <= 120 else command[:117] + "..."
            return f"process {pid}" + (f" ({command})" if command else "")
    return ""


@contextlib.contextmanager
def lock_dir(folder: str | Path, what: str = "it") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (made when missing, and removed again when it is
    still empty at the end) for as long as the block runs; refused at once (WriteError,
    one line naming the holder) when another process holds it. The lock is a flock on the
    folder itself, dropped by the kernel when the process ends however it ends: there is
    no stale lock to clean. Where the file system cannot lock a folder, nothing is held."""
    folder = Path(folder)
    made = missing_folders(folder)
    _mkdir(folder, folder)
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        _remove_empty(made)
        raise WriteError(folder, _reason(e), e.errno) from None
    try:
        if _try_lock(fd) is False:
            holder = _holder(folder) or "another process"
            raise WriteError(folder, f"{holder} is writing {what}; wait for it to end or choose another "
                                     f"directory", errno.EBUSY)
        yield folder
    finally:
        os.close(fd)
        _remove_empty(made)


def _temp_name(path: Path, kind: str = TEMP_SUFFIX) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{kind}"


def missing_folders(folder: Path) -> list[Path]:
    """The folders on `folder`'s path that do not exist yet, deepest first: what a write
    creates, and removes again when it fails."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def _mkdir(folder: Path, target: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise WriteError(target, "a part of its folder is a file, not a folder", e.errno) from None
    except OSError as e:
        raise WriteError(target, _reason(e), e.errno) from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                             # some file systems cannot sync a folder
    finally:
        os.close(fd)


def _create(tmp: Path, target: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(tmp, flags, 0o666)            # the umask applies, as for any new file
    except OSError as e:
        raise WriteError(target, _reason(e), e.errno) from None


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _make_room(path: Path, kind: str = TEMP_SUFFIX) -> tuple[list[Path], Path]:
    """Create `path`'s missing folders and clear stale temporaries of it: (the folders made,
    a fresh temporary name beside it)."""
    made = missing_folders(path.parent)
    _mkdir(path.parent, path)
    finish_pairs(path.parent)
    remove_stale(path)
    return made, _temp_name(path, kind)


def _abandon(path: Path, tmp: Path, made: list[Path], error: BaseException) -> None:
    """A write of `path` failed: remove its temporary file and the folders made for it; an
    OS error becomes one `WriteError` naming `path` (the caller re-raises anything else)."""
    _unlink(tmp)
    _remove_empty(made)
    if isinstance(error, OSError):
        raise WriteError(path, _reason(error), error.errno) from None


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


# -- directories ----------------------------------------------------------------------


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
