"""The on-disk dataset format: writing, lazy opening and validation (reading is in
:mod:`iodine_pyro.data.batches`).

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
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from ..io import WriteError, missing_folders, remove_dir, replace_dir, temporary_dir
from .errors import DatasetError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CHUNK_SIZE",
    "is_sequence",
    "is_store",
    "new_store",
    "write_chunks",
    "open_store",
]

log = logging.getLogger(__name__)

FORMAT = "iodine-pyro-dataset"
FORMAT_VERSION = 1
CHUNK_SIZE = 256
ZSTD_LEVEL = 9

IMAGE_DIMS = ("image", "height", "width", "channel")
MASK_DIMS = ("image", "group", "height", "width")
# Sequence datasets (objects_room_sequences, multi_dsprites_sequences) insert a "frame" dim
# after "image".
SEQUENCE_IMAGE_DIMS = ("image", "frame", "height", "width", "channel")
SEQUENCE_MASK_DIMS = ("image", "frame", "group", "height", "width")


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


def is_store(path: str | Path) -> bool:
    """Whether `path` is a (possibly incomplete) dataset store: a zarr group's marker file."""
    path = Path(path)
    return (path / "zarr.json").is_file() or (path / ".zgroup").is_file()


def is_sequence(ds: xr.Dataset) -> bool:
    """Whether a store holds sequences ([image, frame, ...]) rather than single images."""
    return "frame" in ds["image"].dims


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to clobber existing data: `out` must be missing or empty, or with
    ``overwrite`` hold a store (never anything else). Nothing is removed here: `new_store`
    replaces the old store only once the new one is complete."""
    if out.is_symlink():
        raise DatasetError(f"{out} is a symbolic link; give the directory itself to write a dataset there")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a dataset directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DatasetError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    if not is_store(out):
        raise DatasetError(f"{out} is not empty and not a dataset store; refusing to delete it")


@contextlib.contextmanager
def new_store(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A store written whole or not at all.

    Yields a temporary directory next to `out` to write the store into. When the block
    completes it is renamed to `out` (an old store there is replaced only then, and only
    with ``overwrite``); when it fails (an error, Ctrl-C, a full disk) it is removed and
    `out` is as it was. A kill leaves the temporary directory, named after `out` and the
    writing process, and the next write of `out` removes it: a store at `out` is therefore
    always complete, and running the interrupted command again starts afresh.

    Raises:
        DatasetError: `out` holds something that must not be replaced (`prepare_output`).
        WriteError: the store could not be written (one line naming `out`).
    """
    out = Path(out)
    prepare_output(out, overwrite)
    made = missing_folders(out.parent)
    tmp = temporary_dir(out)
    try:
        yield tmp
        replace_dir(tmp, out, replace=overwrite)
    except BaseException as err:
        remove_dir(tmp, made)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(out, err.strerror or _first_line(err), err.errno) from None
        raise


@contextlib.contextmanager
def interrupt_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends, then raise it, for work that a Ctrl-C must
    not cut in the middle: starting a worker pool (a worker whose start it cut short would
    be unknown to the code that stops them, and fail noisily once this process left), or
    writing a chunk (zarr writes on its own event loop thread; a Ctrl-C in this thread left
    its write pending, and asyncio reported the destroyed task on stderr at exit). Both
    take well under a second. Outside the main thread (which alone receives signals) it
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt


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
        with interrupt_deferred():
            if i == 0:
                chunk.to_zarr(out, mode="w", encoding=_encoding(chunk, chunk_size), consolidated=False,
                              zarr_format=3, write_empty_chunks=True)
            else:
                chunk.to_zarr(out, append_dim="image", consolidated=False, write_empty_chunks=True)
        total += chunk.sizes["image"]
        if bar is not None:
            bar.update(chunk.sizes["image"])
    if total and not counted:
        with interrupt_deferred():
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
    for name, kind in (("num_images", "an integer"), ("seed", "an integer >= 0"),
                       ("background_groups", "an integer >= 0"), ("dataset", "a name")):
        value = ds.attrs.get(name)
        if value is None:
            continue
        ok = isinstance(value, str) if name == "dataset" else (
            isinstance(value, (int, np.integer)) and not isinstance(value, bool) and (name == "num_images" or value >= 0))
        if not ok:
            raise DatasetError(f"{path}: its attribute {name} must be {kind}, got {value!r}")


def _check_variables(ds: xr.Dataset, path: Path) -> None:
    sequence = "image" in ds.data_vars and is_sequence(ds)
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
    expected = int(ds.attrs.get("num_images", n))
    background = int(ds.attrs.get("background_groups", 0))
    if background >= ds.sizes["group"] and background > 0:
        raise DatasetError(f"{path}: background_groups {background} leaves none of its {ds.sizes['group']} "
                           f"mask groups as objects")
    if expected < 0:
        raise DatasetError(f"{path} is incomplete: writing stopped after {n} images")
    if n == 0 or n != expected:
        raise DatasetError(f"{path} is incomplete: {n} of {expected} images")


def _check_chunks(path: Path) -> dict[str, tuple[Path, int, Callable[[int], str]]]:
    """Every chunk file is present (zarr would silently read a missing one as zeros).

    Returns, per variable chunked along ``image``, what `_chunk_files` needs to name the
    file of each chunk: (its folder, images per chunk, the key of chunk i)."""
    try:
        arrays = dict(zarr.open_group(path, mode="r").arrays())
        counts = {name: (array.nchunks_initialized, array.nchunks) for name, array in arrays.items()}
    except Exception as err:
        raise DatasetError(f"cannot open dataset {path}: {_first_line(err)}") from err
    for name, (present, total) in counts.items():
        if present != total:
            raise DatasetError(f"{path} is truncated: {name!r} has {present} of {total} chunks")
    for name, array in arrays.items():        # images and masks: their frames are checked as read
        _check_codecs(path / name, array.metadata)
        _check_chunk_sizes(path / name, math.prod(array.chunks) * array.dtype.itemsize,
                           frames=name not in ("image", "mask"))
    files = {}
    for name in ("image", "mask"):
        array = arrays.get(name)
        if array is None or not hasattr(array.metadata, "encode_chunk_key"):
            continue
        rest = (0,) * (array.ndim - 1)
        files[name] = (path / name, int(array.chunks[0]),
                       lambda i, meta=array.metadata, rest=rest: meta.encode_chunk_key((i, *rest)),
                       math.prod(array.chunks) * array.dtype.itemsize)
    return files


MAX_RATIO = 2048            # decoded bytes per stored byte of a chunk, at most (real stores: 4 to 130)
MAX_FLOOR = 256 * 2**20     # ... or this many decoded bytes, whatever the ratio: the largest chunk the
                            # generators write, 256 Objects Room sequences' masks, is 117 MB from 10 kB


CODECS = {"BytesCodec", "ZstdCodec"}      # what stores are written with (`_encoding`)


def _check_codecs(folder: Path, metadata: Any) -> None:
    """A chunk is decoded only by the codecs stores are written with (bytes, then zstd),
    whose sizes `_check_frames` can check before decoding: another compressor named in a
    store's metadata (a gzip or blosc bomb) is refused. Stores of zarr's format 2 name
    theirs as ``compressor`` and ``filters``."""
    if getattr(metadata, "zarr_format", 3) == 2:
        compressor, filters = getattr(metadata, "compressor", None), getattr(metadata, "filters", None)
        names = [] if compressor is None else [getattr(compressor, "codec_id", type(compressor).__name__)]
        bad = [n for n in names if n != "zstd"] + [getattr(f, "codec_id", "filter") for f in filters or ()]
    else:
        bad = [type(c).__name__ for c in getattr(metadata, "codecs", ()) if type(c).__name__ not in CODECS]
    if bad:
        raise DatasetError(f"{folder} is encoded with {', '.join(bad)}, which iodine-pyro stores never use "
                           f"(bytes and zstd only); convert or generate the data again")


def _check_chunk_sizes(folder: Path, decoded: int, frames: bool = False) -> None:
    """Memory stays bounded by what a store holds, not by what its metadata claims: a
    chunk decodes to `decoded` bytes (its declared shape), which must be at most
    `MAX_RATIO` times its file's size (or `MAX_FLOOR`). A few kilobytes declaring gigabytes
    (a huge chunk shape, a compression bomb) are refused before anything is decoded. With
    `frames`, each file's zstd frame must also declare `decoded` bytes (`_check_frames`)."""
    if decoded <= MAX_FLOOR and not frames:
        return
    try:
        entries = [e for e in os.scandir(folder) if e.name != "zarr.json" and not e.name.startswith(".")]
    except OSError:
        return                                           # read errors are named when read
    for entry in entries:
        if frames:
            _check_frame(Path(entry.path), decoded)
        with contextlib.suppress(OSError):
            size = entry.stat(follow_symlinks=False).st_size
            if decoded > max(MAX_RATIO * size, MAX_FLOOR):
                raise DatasetError(f"{entry.path} would decode to {decoded:,} bytes from {size:,}: the store's "
                                   f"metadata does not fit its data (damaged, or not written by iodine-pyro)")


def open_store(path: str | Path) -> xr.Dataset:
    """Open a stored dataset lazily (nothing is read until indexed) and validate its format.

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
    files = _check_chunks(path)
    ds = ds[["image", "mask", *sorted(k for k in ds.data_vars if k not in ("image", "mask"))]]
    ds.encoding["source"] = str(path)
    ds.encoding["chunk_files"] = files
    return ds


# ---------------------------------------------------------------------------------------
# Chunk files checked before they are decoded
# ---------------------------------------------------------------------------------------


def _chunk_files(ds: xr.Dataset, name: str, start: int, stop: int) -> list[Path]:
    """The files of the chunks of variable `name` that hold images [start, stop)."""
    info = ds.encoding.get("chunk_files", {}).get(name)
    if info is None:
        return []
    folder, length, key = info[:3]
    return [folder / key(i) for i in range(start // length, -(-stop // length))]


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _frame_size(head: bytes) -> int | None:
    """The content size a zstd frame header declares (None when it declares none)."""
    if len(head) < 6 or head[:4] != _ZSTD_MAGIC:
        return None
    fhd = head[4]
    single, dict_bytes = fhd >> 5 & 1, (0, 1, 2, 4)[fhd & 3]
    fcs_bytes = (single, 2, 4, 8)[fhd >> 6]
    at = 5 + (0 if single else 1) + dict_bytes
    if fcs_bytes == 0 or len(head) < at + fcs_bytes:
        return None
    size = int.from_bytes(head[at:at + fcs_bytes], "little")
    return size + 256 if fcs_bytes == 2 else size


def _check_frames(ds: xr.Dataset, name: str, start: int, stop: int) -> None:
    """Each chunk file of images [start, stop) declares (in its zstd frame header) the
    size its chunk decodes to, and the decoder allocates that much: it must be the size
    of the chunk's shape, checked before anything is decoded."""
    info = ds.encoding.get("chunk_files", {}).get(name)
    if info is None or len(info) < 4:
        return
    for file in _chunk_files(ds, name, start, stop):
        _check_frame(file, info[3])


def _check_frame(file: Path, decoded: int) -> None:
    try:
        with open(file, "rb") as f:
            head = f.read(18)
    except OSError:
        return                                            # missing or unreadable: named by the read
    size = _frame_size(head)
    if size is not None and size != decoded or size is None and head[:4] == _ZSTD_MAGIC:
        raise DatasetError(f"cannot read {file}: its compressed frame declares "
                           f"{'no size' if size is None else f'{size:,} bytes'}, and its chunk holds "
                           f"{decoded:,} (damaged, or not written by iodine-pyro)")
