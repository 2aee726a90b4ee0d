"""The on-disk dataset format: generation, lazy opening, and batches for training.

Every dataset (generated here, or converted from official files) is one zarr store (a
directory) written with xarray, chunked by 256 images along ``image`` and zstd-compressed
(with a checksum per chunk), so that a large set is written chunk by chunk and read lazily:

=============  ==================================  ==========================================
variable       dims                                dtype
=============  ==================================  ==========================================
``image``      (image, height, width, channel)     uint8
``mask``       (image, group, height, width)       uint8 0/1; group 0 is the background
factors        (image, group) or (image, group,    numeric; e.g. ``x``, ``y``, ``shape``,
               rgb) for ``color``                  ``color``, ``visibility``
=============  ==================================  ==========================================

Dataset attributes: ``format = "iodine-pyro-dataset"``, ``format_version = 1``,
``dataset`` (e.g. ``"tetrominoes"``), ``seed``, ``generator`` (a description) and
``num_images`` (written first, so an interrupted generation is recognised as incomplete).
A store converted from an official file (:mod:`iodine_pyro.data.convert`) has no ``seed``
but ``converted_from`` (the file), ``background_groups`` and ``num_images = -1`` until the
last chunk is written; it keeps the file's number of mask groups. xarray files a variable
named like a dimension (``image``) under coordinates; this module turns it back into a data
variable on writing and opening.

Training reads whole chunks through :class:`Batches` (a shuffle buffer of a few chunks)
instead of one image at a time, since each random image access would decompress a chunk.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr
from tqdm.auto import tqdm

from . import dsprites, shapes, tetrominoes
from . import clevr, objects_room  # import Mitsuba / MuJoCo only when a chunk is generated
from .errors import DatasetError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CHUNK_SIZE",
    "GeneratorSpec",
    "GENERATORS",
    "generate",
    "write_chunks",
    "open_dataset",
    "Batches",
    "load_images",
]

log = logging.getLogger(__name__)

FORMAT = "iodine-pyro-dataset"
FORMAT_VERSION = 1
CHUNK_SIZE = 256
ZSTD_LEVEL = 9

IMAGE_DIMS = ("image", "height", "width", "channel")
Arrays = dict[str, np.ndarray]
MASK_DIMS = ("image", "group", "height", "width")
# Sequence datasets (objects_room_sequences, multi_dsprites_sequences) insert a "frame" dim
# after "image".
SEQUENCE_IMAGE_DIMS = ("image", "frame", "height", "width", "channel")
SEQUENCE_MASK_DIMS = ("image", "frame", "group", "height", "width")


# ---------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorSpec:
    """A procedural dataset.

    Args:
        image_shape: (height, width, channels) of one image.
        num_groups: mask groups per image, background (group 0) included.
        make_chunk: ``make_chunk(rng, n)`` -> dict of numpy arrays with a leading axis of
            length n: ``image`` [n, H, W, C] uint8, ``mask`` [n, G, H, W] uint8 0/1, and
            per-group factors [n, G] or [n, G, k].
        description: a short description, stored as the ``generator`` attribute.
        factor_dims: names of the trailing dims of factors with more than 2 dims.
    """

    image_shape: tuple[int, int, int]
    num_groups: int
    make_chunk: Callable[[np.random.Generator, int], dict[str, np.ndarray]]
    description: str
    factor_dims: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"color": ("rgb",)})


GENERATORS: dict[str, GeneratorSpec] = {
    "tetrominoes": GeneratorSpec(
        image_shape=(tetrominoes.IMAGE_SIZE, tetrominoes.IMAGE_SIZE, 3),
        num_groups=tetrominoes.NUM_GROUPS,
        make_chunk=tetrominoes.make_chunk,
        description="iodine_pyro.data.tetrominoes: 3 non-overlapping bevelled tetrominoes, "
        "35x35, as DeepMind's multi_object_datasets",
    ),
    "multi_dsprites": GeneratorSpec(
        image_shape=(dsprites.IMAGE_SIZE, dsprites.IMAGE_SIZE, 3),
        num_groups=dsprites.VARIANTS["colored_on_grayscale"].num_groups,
        make_chunk=functools.partial(dsprites.make_chunk, variant="colored_on_grayscale"),
        description="iodine_pyro.data.dsprites: 2-5 saturated dSprites on a grey background, 64x64, "
        "as multi_object_datasets' multi_dsprites colored_on_grayscale",
    ),
    "multi_dsprites_colored_on_colored": GeneratorSpec(
        image_shape=(dsprites.IMAGE_SIZE, dsprites.IMAGE_SIZE, 3),
        num_groups=dsprites.VARIANTS["colored_on_colored"].num_groups,
        make_chunk=functools.partial(dsprites.make_chunk, variant="colored_on_colored"),
        description="iodine_pyro.data.dsprites: 1-4 random-RGB dSprites on a random-RGB background, "
        "64x64, as multi_object_datasets' multi_dsprites colored_on_colored",
    ),
    "multi_dsprites_binarized": GeneratorSpec(
        image_shape=(dsprites.IMAGE_SIZE, dsprites.IMAGE_SIZE, 1),
        num_groups=dsprites.VARIANTS["binarized"].num_groups,
        make_chunk=functools.partial(dsprites.make_chunk, variant="binarized"),
        description="iodine_pyro.data.dsprites: 2-3 white dSprites on black, 64x64x1, "
        "as multi_object_datasets' multi_dsprites binarized",
        factor_dims={"color": ("gray",)},
    ),
    "shapes": GeneratorSpec(
        image_shape=(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 1),
        num_groups=shapes.NUM_GROUPS,
        make_chunk=shapes.make_chunk,
        description="iodine_pyro.data.shapes: 3 outlined squares and triangles, 28x28 binary, "
        "overlaps unscored (Reichert & Serre 2013)",
    ),
    "objects_room": GeneratorSpec(
        image_shape=(objects_room.IMAGE_SIZE, objects_room.IMAGE_SIZE, 3),
        num_groups=objects_room.NUM_GROUPS,
        make_chunk=objects_room.make_chunk,
        description="iodine_pyro.data.objects_room: a cubic room (sky, floor, two wall halves) "
        "with 3 objects, 1-3 in view, 64x64, rendered with MuJoCo",
    ),
    "multi_dsprites_sequences": GeneratorSpec(
        image_shape=(dsprites.IMAGE_SIZE, dsprites.IMAGE_SIZE, 3),
        num_groups=dsprites.VARIANTS["colored_on_grayscale"].num_groups,
        make_chunk=dsprites.make_sequence_chunk,
        description="iodine_pyro.data.dsprites: 16-frame sequences of 2-5 saturated dSprites on grey, "
        "each moving at its own constant velocity, 64x64",
        factor_dims={"color": ("rgb",), "frame_visibility": ("frame",)},
    ),
    "objects_room_sequences": GeneratorSpec(
        image_shape=(objects_room.IMAGE_SIZE, objects_room.IMAGE_SIZE, 3),
        num_groups=objects_room.NUM_GROUPS,
        make_chunk=objects_room.make_sequence_chunk,
        description="iodine_pyro.data.objects_room: 16-frame camera flights through Objects Room "
        "scenes, 64x64, rendered with MuJoCo",
        factor_dims={"color": ("rgb",), "frame_visibility": ("frame",)},
    ),
    "clevr6": GeneratorSpec(
        image_shape=(clevr.IMAGE_SIZE, clevr.IMAGE_SIZE, 3),
        num_groups=clevr.NUM_GROUPS,
        make_chunk=clevr.make_clevr6_chunk,
        description="iodine_pyro.data.clevr: CLEVR scenes of 3-6 objects, the paper's 192x192 crop "
        "at 128x128, rendered with Mitsuba 3",
        factor_dims={"pixel_coords": ("coord",)},
    ),
    "clevr": GeneratorSpec(
        image_shape=(clevr.IMAGE_SIZE, clevr.IMAGE_SIZE, 3),
        num_groups=clevr.NUM_GROUPS,
        make_chunk=clevr.make_clevr_chunk,
        description="iodine_pyro.data.clevr: CLEVR scenes of 3-10 objects, the paper's 192x192 crop "
        "at 128x128, rendered with Mitsuba 3",
        factor_dims={"pixel_coords": ("coord",)},
    ),
}


def _generate_chunk(name: str, seed: np.random.SeedSequence, n: int) -> dict[str, np.ndarray]:
    """One chunk of a registered generator (runs in a worker process)."""
    return GENERATORS[name].make_chunk(np.random.default_rng(seed), n)


def _to_xarray(arrays: dict[str, np.ndarray], factor_dims: dict[str, tuple[str, ...]]) -> xr.Dataset:
    """Arrays -> dataset; ``factor_dims[key]`` names a factor's dims after (image, group), or
    all of them when it starts with "image"."""
    variables = {}
    for key, value in arrays.items():
        if key == "image":
            dims = IMAGE_DIMS if value.ndim == len(IMAGE_DIMS) else SEQUENCE_IMAGE_DIMS
        elif key == "mask":
            dims = MASK_DIMS if value.ndim == len(MASK_DIMS) else SEQUENCE_MASK_DIMS
        elif value.ndim == 2:
            dims = ("image", "group")
        elif factor_dims[key][0] == "image":
            dims = factor_dims[key]
        else:
            dims = ("image", "group") + factor_dims[key]
        variables[key] = (dims, value)
    return _image_as_data(xr.Dataset(variables))


def _image_as_data(ds: xr.Dataset) -> xr.Dataset:
    """Make ``image`` a data variable: xarray files a variable named like a dimension
    under coordinates."""
    return ds.reset_coords("image") if "image" in ds.coords else ds


def _encoding(ds: xr.Dataset, chunk_size: int) -> dict[str, dict[str, Any]]:
    codec = zarr.codecs.ZstdCodec(level=ZSTD_LEVEL, checksum=True)
    return {
        name: {
            "chunks": (chunk_size,) + var.shape[1:],
            "compressors": (codec,),
            "chunk_key_encoding": {"name": "default", "separator": "."},  # flat: one file per chunk
        }
        for name, var in ds.variables.items()
    }


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to clobber existing data; remove an old store when ``overwrite``."""
    if out.is_file():
        raise DatasetError(f"{out} is a file, not a dataset directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DatasetError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    if not _is_store(out):
        raise DatasetError(f"{out} is not empty and not a dataset store; refusing to delete it")
    log.info("removing existing store %s", out)
    shutil.rmtree(out)


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
    context.set_forkserver_preload([__name__])
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
        name: a key of :data:`GENERATORS`.
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
    if name not in GENERATORS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(sorted(GENERATORS))}")
    if num_images < 1 or chunk_size < 1:
        raise ValueError("num_images and chunk_size must be at least 1")
    spec = GENERATORS[name]
    out = Path(out)
    _prepare_output(out, overwrite)
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


def write_chunks(out: str | Path, chunks: Iterable[dict[str, np.ndarray]], attrs: dict[str, Any], *,
                 factor_dims: dict[str, tuple[str, ...]], chunk_size: int = CHUNK_SIZE,
                 bar: Any = None) -> int:
    """Write a stream of chunks to a new store at ``out`` (the writer of :func:`generate`
    and of :mod:`iodine_pyro.data.convert`).

    Args:
        out: the store directory (replaced; callers check it first, see ``generate``).
        chunks: dicts of arrays with a leading image axis (see :class:`GeneratorSpec`), each
            of ``chunk_size`` images except the last.
        attrs: dataset attributes, written with the first chunk. Without ``num_images`` the
            store says ``num_images = -1`` (incomplete) until the last chunk is written.
        factor_dims: names of factors' dims after (image, group), or all of them when the
            tuple starts with "image".
        chunk_size: images per stored chunk.
        bar: a tqdm bar to advance by each chunk's images.

    Returns:
        the number of images written (0 when ``chunks`` is empty: nothing is written).
    """
    total = 0
    counted = "num_images" in attrs
    attrs = {**attrs, "num_images": int(attrs.get("num_images", -1))}
    for i, arrays in enumerate(chunks):
        chunk = _to_xarray(arrays, factor_dims)
        chunk.attrs.update(attrs)  # an append rewrites the group's attributes
        if i == 0:
            chunk.to_zarr(out, mode="w", encoding=_encoding(chunk, chunk_size), consolidated=False,
                          zarr_format=3, write_empty_chunks=True)
        else:
            chunk.to_zarr(out, append_dim="image", consolidated=False, write_empty_chunks=True)
        total += chunk.sizes["image"]
        if bar is not None:
            bar.update(chunk.sizes["image"])
    if total and not counted:
        zarr.open_group(out, mode="r+").attrs["num_images"] = total
    return total


# ---------------------------------------------------------------------------------------
# Opening and validation
# ---------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_attrs(ds: xr.Dataset, path: Path) -> None:
    if ds.attrs.get("format") != FORMAT:
        raise DatasetError(f"{path} is not an iodine-pyro dataset (no format={FORMAT!r} attribute)")
    version = ds.attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{path} has format_version {version!r}; this version reads {FORMAT_VERSION}")


def _check_variables(ds: xr.Dataset, path: Path) -> None:
    sequence = "image" in ds.data_vars and "frame" in ds["image"].dims
    for name, dims in (("image", SEQUENCE_IMAGE_DIMS if sequence else IMAGE_DIMS),
                       ("mask", SEQUENCE_MASK_DIMS if sequence else MASK_DIMS)):
        if name not in ds.data_vars:
            raise DatasetError(f"{path} has no {name!r} variable")
        var = ds[name]
        if var.dims != dims or var.dtype != np.uint8:
            raise DatasetError(f"{path}: {name!r} is {var.dtype} {var.dims}; expected uint8 {dims}")
    for name, var in ds.data_vars.items():
        per_frame = sequence and var.dims[:2] == ("image", "frame")  # e.g. CATER's camera_matrix
        if var.dims[:2] != ("image", "group") and not per_frame and name not in ("image", "mask"):
            raise DatasetError(f"{path}: factor {name!r} has dims {var.dims}; "
                               f"expected ('image', 'group', ...)")
        if not np.issubdtype(var.dtype, np.number):
            raise DatasetError(f"{path}: {name!r} has non-numeric dtype {var.dtype}")


def _check_sizes(ds: xr.Dataset, path: Path) -> None:
    n = ds.sizes["image"]
    expected = ds.attrs.get("num_images", n)
    if expected < 0:
        raise DatasetError(f"{path} is incomplete: writing stopped after {n} images")
    if n == 0 or n != expected:
        raise DatasetError(f"{path} is incomplete: {n} of {expected} images")
    spec = GENERATORS.get(ds.attrs.get("dataset", ""))
    if spec is not None:
        shape = (ds.sizes["height"], ds.sizes["width"], ds.sizes["channel"])
        # A converted official file keeps its own number of groups (e.g. CLEVR6: 11).
        groups_differ = ds.sizes["group"] != spec.num_groups and "converted_from" not in ds.attrs
        if shape != spec.image_shape or groups_differ:
            raise DatasetError(f"{path}: images {shape} with {ds.sizes['group']} groups do not match "
                               f"{ds.attrs['dataset']} ({spec.image_shape}, {spec.num_groups} groups)")


def _check_chunks(path: Path) -> None:
    """Every chunk file is present (zarr would silently read a missing one as zeros)."""
    try:
        counts = {name: (array.nchunks_initialized, array.nchunks)
                  for name, array in zarr.open_group(path, mode="r").arrays()}
    except Exception as err:
        raise DatasetError(f"cannot open dataset {path}: {_first_line(err)}") from err
    for name, (present, total) in counts.items():
        if present != total:
            raise DatasetError(f"{path} is truncated: {name!r} has {present} of {total} chunks")


def open_dataset(path: str | Path) -> xr.Dataset:
    """Open a stored dataset lazily (nothing is read until indexed) and validate it.

    Raises:
        DatasetError: with a one-line message naming ``path`` when it is missing, not this
            format, lacks a variable, has wrong dims/dtypes/sizes, or is truncated/unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"no dataset at {path}")
    if not path.is_dir():
        raise DatasetError(f"{path} is not a dataset directory")
    try:  # cache=False: indexing reads from disk each time, nothing accumulates in memory
        ds = xr.open_dataset(path, engine="zarr", chunks=None, cache=False, consolidated=False,
                             mask_and_scale=False)
    except Exception as err:  # zarr, json and OS errors alike: the store is not readable
        raise DatasetError(f"cannot open dataset {path}: {_first_line(err)}") from err
    ds = _image_as_data(ds)
    _check_attrs(ds, path)
    _check_variables(ds, path)
    _check_sizes(ds, path)
    _check_chunks(path)
    ds = ds[["image", "mask", *sorted(k for k in ds.data_vars if k not in ("image", "mask"))]]
    ds.encoding["source"] = str(path)
    return ds


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def _read(ds: xr.Dataset, start: int, stop: int) -> dict[str, np.ndarray]:
    """Images and masks [start, stop) as numpy; read errors become DatasetError."""
    source = ds.encoding.get("source", "dataset")
    try:
        arrays = {
            "image": ds["image"][start:stop].values,  # [n, H, W, C] (sequences [n, F, H, W, C]) uint8
            "mask": ds["mask"][start:stop].values,  # [n, G, H, W] (sequences [n, F, G, H, W]) uint8
        }
    except Exception as err:  # codec or OS errors of a damaged store
        raise DatasetError(f"cannot read images {start}:{stop} of {source}: {_first_line(err)}") from err
    _check_masks(arrays["mask"], start, source)
    return arrays


def _check_masks(mask: np.ndarray, start: int, source: str) -> None:
    """Masks are one-hot: 0/1 values, at most one group per pixel (none: not scored)."""
    group = mask.ndim - 3  # the group axis: 1, or 2 for sequences [n, F, G, H, W]
    bad = (mask > 1).reshape(len(mask), -1).any(1) | \
        (mask.sum(group, dtype=np.int64) > 1).reshape(len(mask), -1).any(1)  # [n]
    if bad.any():
        i = start + int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{source}: the masks of image {i} are not one-hot (values must be 0/1 "
                           f"with at most one group per pixel)")


def _to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    image = torch.from_numpy(arrays["image"]).movedim(-1, -3)  # [B, (F,) C, H, W] uint8
    return {
        "image": image.float().div_(255.0).contiguous(),  # [B, (F,) C, H, W] float32 in [0, 1]
        "mask": torch.from_numpy(arrays["mask"]).float(),  # [B, (F,) G, H, W] float32 0/1
    }


def load_images(ds: xr.Dataset, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Images ``start:stop`` as a batch dict: ``image`` [B, C, H, W] float32 in [0, 1],
    ``mask`` [B, G, H, W] float32 0/1 (for evaluation). Sequences keep their frame axis:
    ``image`` [B, F, C, H, W], ``mask`` [B, F, G, H, W]."""
    n = ds.sizes["image"]
    if not 0 <= start < stop <= n:
        raise ValueError(f"image range {start}:{stop} is outside 0:{n}")
    return _to_tensors(_read(ds, start, stop))


def _chunk_size(ds: xr.Dataset) -> int:
    encoding = ds["image"].encoding
    preferred = encoding.get("preferred_chunks", {}).get("image")
    if preferred:
        return int(preferred)
    chunks = encoding.get("chunks")
    return int(chunks[0]) if chunks else CHUNK_SIZE


class Batches:
    """Shuffled mini-batches over a stored dataset, infinite over epochs and resumable.

    Each epoch permutes the order of the store's chunks, reads ``buffer_chunks`` chunks at a
    time, shuffles the images within that buffer and cuts the resulting stream into batches.
    Batches may span two buffers but never two epochs; with ``drop_last`` the epoch's final
    partial batch is dropped, otherwise it is yielded (smaller). The order depends only on
    ``seed``, the epoch and the buffer index, so :meth:`state_dict` (epoch, position) is all
    that a resumed stream needs to continue exactly where the original left off.

    Each batch is a dict: ``image`` [B, C, H, W] float32 in [0, 1], ``mask`` [B, G, H, W]
    float32 0/1 (sequences: [B, F, C, H, W] and [B, F, G, H, W]).

    Args:
        ds: a dataset from :func:`open_dataset` (or a path to one).
        batch_size: images per batch.
        seed: seed of the order.
        shuffle: shuffle chunks and images; otherwise images come in stored order.
        drop_last: drop each epoch's final partial batch.
        buffer_chunks: chunks read and shuffled together.
    """

    def __init__(self, ds: xr.Dataset | str | Path, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, buffer_chunks: int = 4):
        self.ds = ds if isinstance(ds, xr.Dataset) else open_dataset(ds)
        self.num_images = self.ds.sizes["image"]
        if batch_size < 1 or buffer_chunks < 1:
            raise ValueError("batch_size and buffer_chunks must be at least 1")
        if drop_last and batch_size > self.num_images:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.num_images} images with drop_last")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.buffer_chunks = buffer_chunks
        self.chunk_size = _chunk_size(self.ds)
        self.num_chunks = math.ceil(self.num_images / self.chunk_size)
        self.epoch = 0
        self.position = 0  # images of the current epoch already yielded
        self._stream: Iterator[dict[str, torch.Tensor]] | None = None

    # -- order ----------------------------------------------------------------------------

    def _epoch_end(self) -> int:
        """Stream position at which the epoch's batches end."""
        if self.drop_last:
            return self.num_images - self.num_images % self.batch_size
        return self.num_images

    def _buffers(self, epoch: int) -> list[list[int]]:
        """Chunk indices of each buffer of an epoch, in reading order."""
        chunks = np.arange(self.num_chunks)
        if self.shuffle:
            chunks = np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
        return [sorted(chunks[i : i + self.buffer_chunks].tolist())
                for i in range(0, self.num_chunks, self.buffer_chunks)]

    def _load_buffer(self, epoch: int, index: int, chunks: list[int]) -> dict[str, np.ndarray]:
        """The images of a buffer, shuffled, as numpy arrays."""
        parts = [_read(self.ds, c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_images))
                 for c in chunks]
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}  # [n, ...] each
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, index]).permutation(len(arrays["image"]))
            arrays = {k: v[order] for k, v in arrays.items()}
        return arrays

    def _buffer_size(self, chunks: list[int]) -> int:
        return sum(min(self.chunk_size, self.num_images - c * self.chunk_size) for c in chunks)

    # -- iteration ------------------------------------------------------------------------

    def _epoch_stream(self, epoch: int, position: int) -> Iterator[dict[str, np.ndarray]]:
        """Images of an epoch from stream position ``position`` on, buffer by buffer."""
        start = 0
        for index, chunks in enumerate(self._buffers(epoch)):
            size = self._buffer_size(chunks)
            if start + size > position:
                arrays = self._load_buffer(epoch, index, chunks)
                skip = max(position - start, 0)
                yield {k: v[skip:] for k, v in arrays.items()}
            start += size

    def _generate(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            epoch, position, end = self.epoch, self.position, self._epoch_end()
            pending: list[dict[str, np.ndarray]] = []
            held = 0
            for arrays in self._epoch_stream(epoch, position):
                pending.append(arrays)
                held += len(arrays["image"])
                while held >= self.batch_size and position < end:
                    batch, pending = _take(pending, self.batch_size)
                    held -= self.batch_size
                    position += self.batch_size
                    self._advance(epoch, position, end)
                    yield _to_tensors(batch)
            if position < end:  # the final partial batch (drop_last=False)
                batch, pending = _take(pending, end - position)
                self._advance(epoch, end, end)
                yield _to_tensors(batch)
            if self.epoch == epoch:  # an epoch with no batch left to yield
                self._advance(epoch, end, end)

    def _advance(self, epoch: int, position: int, end: int) -> None:
        self.epoch, self.position = (epoch + 1, 0) if position >= end else (epoch, position)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._stream is None:
            self._stream = self._generate()
        return next(self._stream)

    # -- resuming -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: the next batch is the one at ``position`` of ``epoch``."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`; the next batch is the one it names."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < max(self._epoch_end(), 1):
            raise ValueError(f"invalid data state {state} for {self.num_images} images")
        self.epoch, self.position = epoch, position
        self._stream = None


def _take(pending: list[Arrays], n: int) -> tuple[Arrays, list[Arrays]]:
    """The first n images of a list of array dicts, and what is left."""
    taken, rest, need = [], list(pending), n
    while need > 0:
        head = rest.pop(0)
        count = len(head["image"])
        if count <= need:
            taken.append(head)
            need -= count
        else:
            taken.append({k: v[:need] for k, v in head.items()})
            rest.insert(0, {k: v[need:] for k, v in head.items()})
            need = 0
    batch = {k: np.concatenate([t[k] for t in taken]) if len(taken) > 1 else taken[0][k] for k in taken[0]}
    return batch, rest
