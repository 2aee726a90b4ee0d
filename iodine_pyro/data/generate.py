"""Generation of the registered procedural datasets into stores, in worker processes.

Chunk i of a dataset is drawn from ``SeedSequence(seed).spawn(...)[i]`` by the dataset's
`DatasetSpec.make_chunk`, in worker processes that come from a clean server process
(`_process_pool`), and written in order by `iodine_pyro.data.store.write_chunks`.
"""

from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import DatasetError
from .registry import DATASETS, dataset_spec
from .store import CHUNK_SIZE, FORMAT, FORMAT_VERSION, is_store, open_store, prepare_output, write_chunks

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


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes forked from a clean server process, not from this one: a fork of a
    process that holds an OpenGL context (the Objects Room renderer), a Mitsuba variant or
    torch's thread pools can deadlock in the child."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])               # the generators, imported once
    return ProcessPoolExecutor(workers, mp_context=context)


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
    if num_images < 1 or chunk_size < 1:
        raise ValueError("num_images and chunk_size must be at least 1")
    out = Path(out)
    prepare_output(out, overwrite)
    workers = workers or min(os.cpu_count() or 1, 4)
    num_chunks = math.ceil(num_images / chunk_size)
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
    executor: Executor = _InProcess() if workers == 1 else _process_pool(min(workers, num_chunks))
    with executor, tqdm(total=num_images, disable=not progress, desc=f"generate {name}", unit="img") as bar:
        chunks = _ordered_results(executor, tasks, window=2 * workers)
        write_chunks(out, chunks, attrs, factor_dims=spec.factor_dims, chunk_size=chunk_size, bar=bar)
    log.info("wrote %d %s images to %s", num_images, name, out)
    return out


def ensure(name: str, num_images: int, out: str | Path, *, seed: int = 0, progress: bool = True,
           workers: int | None = None) -> Path:
    """A complete store of `num_images` images of dataset `name` from `seed` at `out`:
    the one there when it is that, generated afresh when there is none or an incomplete one
    (a generation cut short), refused (DatasetError) when it holds other data."""
    out = Path(out)
    if is_store(out):
        try:
            ds = open_store(out)
        except DatasetError:            # incomplete or damaged: generate it again
            ds = None
        if ds is not None:
            attrs = ds.attrs
            if (attrs.get("dataset"), ds.sizes["image"], attrs.get("seed")) != (name, num_images, seed):
                raise DatasetError(f"{out} holds {ds.sizes['image']} {attrs.get('dataset')} images of seed "
                                   f"{attrs.get('seed')}, not {num_images} {name} images of seed {seed}; "
                                   f"choose another directory or remove it")
            return out
        return generate(name, num_images, out, seed=seed, progress=progress, overwrite=True, workers=workers)
    return generate(name, num_images, out, seed=seed, progress=progress, workers=workers)
