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

The package: `base` (the error, the checks, temporary names, locks), `pairs` (files
written together, and the way cleared for every write), `files` (whole files, appends)
and `dirs` (folders built whole, removed by renaming them away).
"""

from .base import (
           TEMP_SUFFIX,
           WriteError,
           check_target,
           in_use,
           lock_dir,
           missing_folders,
           pid_alive,
           remove_stale,
)
from .dirs import remove_dir, remove_tree, replace_dir, temporary_dir
from .files import atomic_file, atomic_path, open_append, write_bytes, write_text
from .pairs import commit, discard, finish_pairs, stage, stage_npz, stage_text

__all__ = ["TEMP_SUFFIX", "WriteError", "atomic_file", "atomic_path", "check_target", "commit", "discard", "finish_pairs", "in_use", "lock_dir",
           "missing_folders", "open_append", "pid_alive", "remove_dir", "remove_stale", "remove_tree",
           "replace_dir", "stage", "stage_npz", "stage_text", "temporary_dir", "write_bytes", "write_text"]
