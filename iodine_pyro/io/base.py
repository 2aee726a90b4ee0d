"""What every writer shares: `WriteError`, the target's checks (no links, no folders), the
temporary names and the locks that tell a live writer's temporaries from a dead one's."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

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


def _abandon(path: Path, tmp: Path, made: list[Path], error: BaseException) -> None:
    """A write of `path` failed: remove its temporary file and the folders made for it; an
    OS error becomes one `WriteError` naming `path` (the caller re-raises anything else)."""
    _unlink(tmp)
    _remove_empty(made)
    if isinstance(error, OSError):
        raise WriteError(path, _reason(error), error.errno) from None
