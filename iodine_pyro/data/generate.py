"""Generation of the registered procedural datasets into stores, in worker processes.

Chunk i of a dataset is drawn from ``SeedSequence(seed).spawn(...)[i]`` by the dataset's
`DatasetSpec.make_chunk`, in worker processes that come from a clean server process
(`_process_pool`), and written in order by `iodine_pyro.data.store.write_chunks` into a
temporary directory that becomes the store only once it is complete
(`iodine_pyro.data.store.new_store`): a generation that is killed leaves no store, and
running it again starts afresh. The workers end with the process that started them, even
when it is killed (`_watch_parent`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..io import WriteError
from .errors import DatasetError
from .registry import DATASETS, dataset_spec
from .store import (
    CHUNK_SIZE,
    FORMAT,
    FORMAT_VERSION,
    interrupt_deferred,
    is_store,
    new_store,
    open_store,
    write_chunks,
)

__all__ = ["ensure", "generate"]

log = logging.getLogger(__name__)


def _generate_chunk(name: str, seed: np.random.SeedSequence, n: int) -> dict[str, np.ndarray]:
    """One chunk of a registered dataset (runs in a worker process)."""
    return DATASETS[name].make_chunk(np.random.default_rng(seed), n)


class _InProcess(Executor):
    """A serial executor: workers=1 runs without spawning processes."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _watch_parent(lifeline) -> None:
    """Worker initialiser: ignore Ctrl-C, and end this worker as soon as the process that
    started the pool is gone. Ctrl-C reaches every process of the terminal's group; the
    main process alone answers it (`_stop_workers`), so a worker prints no traceback.
    A worker also ends as soon as the process that started the pool is gone. Its parent is the fork server, which outlives a killed main process as long
    as workers hold its pipe, and a worker waiting for tasks holds both ends of the task
    queue, so neither would ever notice. `lifeline` is the reading end of a pipe whose
    writing end only the main process holds: it reads end-of-file when that process dies,
    however it dies."""
    def wait() -> None:
        try:
            lifeline.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(1)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=wait, name="watch-parent", daemon=True).start()


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes forked from a clean server process, not from this one: a fork of a
    process that holds an OpenGL context (the Objects Room renderer), a Mitsuba variant or
    torch's thread pools can deadlock in the child. Each worker watches this process and
    ends with it (`_watch_parent`)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])               # the generators, imported once
    _start_forkserver()
    lifeline, keep = context.Pipe(duplex=False)               # the workers read; only we hold `keep`
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_watch_parent, initargs=(lifeline,))
    pool._lifeline = (lifeline, keep)                          # alive as long as the pool
    try:
        with interrupt_deferred():                             # every worker known before a Ctrl-C acts
            pool.submit(int)                                   # starts them all (forkserver: at once)
    except BaseException:
        _stop_workers(pool)
        raise
    return pool


def _start_forkserver() -> None:
    """Start the fork server with Ctrl-C ignored: it inherits that (a new interpreter keeps
    an ignored SIGINT ignored), so a Ctrl-C while it imports the generators (seconds: torch)
    prints no traceback of it, and its workers inherit it from their first instruction."""
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_workers(executor: Executor) -> None:
    """Cancel what is queued and end the workers now (an error or Ctrl-C in this process:
    a worker may be minutes into a chunk that nobody will read), without waiting on them.

    A worker killed while it sends a chunk leaves part of a message in the result pipe, and
    the pool's reader thread would wait for the rest forever (and the interpreter for that
    thread at exit). This process holds the pipe's writing end too; closing it once the
    workers are dead gives the reader end-of-file, and it ends."""
    processes = dict(getattr(executor, "_processes", None) or {})
    for process in processes.values():
        if process.is_alive():
            process.kill()
    for process in processes.values():
        process.join(timeout=10)
    queue = getattr(executor, "_result_queue", None)
    if queue is not None:
        with contextlib.suppress(OSError):
            queue._writer.close()
    executor.shutdown(wait=False, cancel_futures=True)
    for end in getattr(executor, "_lifeline", ()):
        end.close()


WORKER_BYTES = 300 * 2**20    # what one generation worker holds (about 200 MB measured), with room


def _memory_available() -> int | None:
    """Bytes of memory free for new processes (MemAvailable of /proc/meminfo), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_count(workers: int | None, num_chunks: int) -> int:
    """The worker processes to start: `workers` (default up to 4), at most one per CPU and
    per chunk, and no more than the free memory holds (`WORKER_BYTES` each): more cannot
    go faster, and each one costs memory. The data do not depend on it."""
    cpus = os.cpu_count() or 1
    count = min(workers or min(cpus, 4), cpus, num_chunks)
    free = _memory_available()
    if free is not None:
        count = min(count, max(1, free // WORKER_BYTES))
    if workers is not None and count < workers:
        log.info("generating with %d worker processes instead of %d (CPUs, chunks, free memory)", count, workers)
    if count > 1 and unguarded_script():
        log.info("generating in this process: worker processes would run %s again, which has no "
                 "`if __name__ == \"__main__\":` guard around its work", sys.modules["__main__"].__file__)
        return 1
    return max(count, 1)


_MAIN_GUARD = re.compile(r"""__name__\s*==\s*['"]__main__['"]|['"]__main__['"]\s*==\s*__name__""")


def unguarded_script() -> bool:
    """Whether the program is a script whose work has no ``if __name__ == "__main__":``
    guard. A worker process starts by importing the main script (the fork server sends it
    the script's path), so such a script's call of `generate` (or of `fit`, which generates)
    would run again in every worker, which may not start processes while it starts: the
    pool broke (`BrokenProcessPool`). A package's ``__main__`` run with ``-m`` and an
    interactive session are not imported again."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if path is None or name == "__main__" or name.endswith(".__main__"):
        return False
    try:
        source = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return _MAIN_GUARD.search(source) is None


def _ordered_results(executor: Executor, tasks: list[tuple], window: int) -> Iterator[dict[str, np.ndarray]]:
    """Run ``_generate_chunk`` over tasks in order, at most ``window`` chunks in flight."""
    pending: collections.deque[Future] = collections.deque()
    for task in tasks:
        pending.append(executor.submit(_generate_chunk, *task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def generate(
    name: str,
    num_images: int,
    out: str | Path,
    *,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> Path:
    """Generate ``num_images`` images of dataset ``name`` into a new store at ``out``.

    Chunk i is drawn from ``SeedSequence(seed).spawn(...)[i]``, so the data depend only on
    ``seed`` and ``chunk_size``, not on ``workers``; for Tetrominoes a smaller set is a
    prefix of a larger one. Chunks are appended to the store as they arrive; memory stays bounded.

    Args:
        name: a dataset of :data:`iodine_pyro.data.registry.DATASETS`.
        num_images: number of images (at least 1).
        out: the store directory; must not exist or be empty unless ``overwrite``.
        seed: the dataset's seed.
        workers: processes (default ``min(cpu_count, 4)``); 1 runs in this process.
        progress: show a tqdm progress bar.
        overwrite: replace an existing store at ``out``.
        chunk_size: images per chunk (also the generation unit).

    Returns:
        the store's path.
    """
    spec = dataset_spec(name)
    for what, value, low in (("num_images", num_images, 1), ("chunk_size", chunk_size, 1), ("seed", seed, 0),
                             ("workers", 1 if workers is None else workers, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    out = Path(out)
    num_chunks = math.ceil(num_images / chunk_size)
    workers = worker_count(workers, num_chunks)
    seeds = np.random.SeedSequence(seed).spawn(num_chunks)
    tasks = [(name, s, min(chunk_size, num_images - i * chunk_size)) for i, s in enumerate(seeds)]
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "seed": int(seed),
        "generator": spec.description,
        "num_images": int(num_images),
    }
    with new_store(out, overwrite) as tmp:
        executor: Executor = _InProcess() if workers == 1 else _process_pool(workers)
        try:
            with tqdm(total=num_images, disable=not progress, desc=f"generate {name}", unit="img") as bar:
                chunks = _ordered_results(executor, tasks, window=2 * workers)
                write_chunks(tmp, chunks, attrs, factor_dims=spec.factor_dims, chunk_size=chunk_size, bar=bar)
        except BaseException:
            _stop_workers(executor)
            raise
        executor.shutdown(wait=True)
        for end in getattr(executor, "_lifeline", ()):
            end.close()
    log.info("wrote %d %s images to %s", num_images, name, out)
    return out


def generation(ds) -> tuple[str, int, int] | None:
    """How the store `ds` (an opened dataset) was generated: (dataset, images, seed), which
    `ensure` makes again image for image; None for any other store (a converted official
    file, one generated in chunks of another size, which draw other images, one written by
    other code). Two stores with the same generation hold the same data."""
    attrs = ds.attrs
    name, seed, n = attrs.get("dataset"), attrs.get("seed"), attrs.get("num_images")
    if attrs.get("format") != FORMAT or name not in DATASETS or "converted_from" in attrs:
        return None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in (seed, n)) \
            or int(n) != ds.sizes["image"] or _chunk_size(ds) != CHUNK_SIZE:
        return None
    return str(name), int(n), int(seed)


def _chunk_size(ds) -> int | None:
    """Images per stored chunk of the store `ds` (the unit its images were drawn in)."""
    return tuple(ds["image"].encoding.get("chunks") or (None,))[0] if "image" in ds else None


def ensure(name: str, num_images: int, out: str | Path, *, seed: int = 0, progress: bool = True,
           workers: int | None = None) -> Path:
    """A complete store of `num_images` images of dataset `name` from `seed` at `out`:
    the one there when it is that, generated afresh when there is none or a damaged one,
    refused (DatasetError) when it holds other data.

    Two processes that ensure the same store at once (an `evaluate` beside a training's,
    both of a run whose held-out set is not generated yet) both generate it; the one whose
    store lands second takes the first's, which holds the same images (generation is
    deterministic), rather than failing because `out` is no longer empty."""
    out = Path(out)
    found = _found(name, num_images, seed, out)
    if found:
        return out
    try:
        return generate(name, num_images, out, seed=seed, progress=progress, overwrite=found is False,
                        workers=workers)
    except (WriteError, DatasetError):   # `out` no longer empty, before or after this generation
        if _found(name, num_images, seed, out):
            return out                  # generated beside this one meanwhile
        raise


def _found(name: str, num_images: int, seed: int, out: Path) -> bool | None:
    """True when `out` holds the store `ensure` asks for, False when it holds a damaged
    one (to generate again), None when it holds none; DatasetError when it holds other data."""
    if not is_store(out):
        return None
    try:
        ds = open_store(out)
    except DatasetError:            # incomplete or damaged: generate it again
        return False
    if generation(ds) != (name, num_images, seed):
        attrs = ds.attrs
        raise DatasetError(f"{out} holds {ds.sizes['image']} {attrs.get('dataset')} images of seed "
                           f"{attrs.get('seed')} in chunks of {_chunk_size(ds)}, not {num_images} {name} images "
                           f"of seed {seed} in chunks of {CHUNK_SIZE}; choose another directory or remove it")
    return True
