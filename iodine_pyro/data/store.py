"""The on-disk dataset format: writing, lazy opening and validation, and batches for training.

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

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
    "verify_range",
    "open_store",
    "Batches",
    "load_images",
    "object_counts",
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
# Reading
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


def _read_var(ds: xr.Dataset, name: str, start: int, stop: int) -> np.ndarray:
    """Variable `name` of images [start, stop), read from its chunk files, which must all
    be there and decode: zarr would return its fill value (zeros) for a chunk file deleted
    after the store was opened, so their presence is checked after the read. Errors are
    one-line DatasetErrors that name the chunk file."""
    source = ds.encoding.get("source", "dataset")
    _check_frames(ds, name, start, stop)
    try:
        values = ds[name][start:stop].values
    except Exception as err:  # codec or OS errors of a damaged store
        raise _read_error(ds, name, start, stop, err) from err
    for file in _chunk_files(ds, name, start, stop):
        if not file.is_file():
            raise DatasetError(f"{file} is missing: {source} is damaged (images {start} to {stop - 1} "
                               f"cannot be read); generate or convert it again")
    return values


def _read_error(ds: xr.Dataset, name: str, start: int, stop: int, err: Exception) -> DatasetError:
    """The first chunk file of [start, stop) that is missing or does not decode, named."""
    source = ds.encoding.get("source", "dataset")
    info = ds.encoding.get("chunk_files", {}).get(name)
    if info is not None:
        length = info[1]
        for file, first in zip(_chunk_files(ds, name, start, stop), range(start - start % length, stop, length)):
            if not file.is_file():
                return DatasetError(f"{file} is missing: {source} is damaged; generate or convert it again")
            try:
                ds[name][first:min(first + length, ds.sizes["image"])].values
            except Exception as chunk_err:
                return DatasetError(f"cannot read {file} (images {first} to {first + length - 1} of {source}): "
                                    f"{_first_line(chunk_err)}")
    return DatasetError(f"cannot read images {start}:{stop} of {source}: {_first_line(err)}")


def _read(ds: xr.Dataset, start: int, stop: int) -> dict[str, np.ndarray]:
    """Images and masks [start, stop) as numpy; read errors become DatasetError."""
    source = ds.encoding.get("source", "dataset")
    arrays = {
        "image": _read_var(ds, "image", start, stop),  # [n, H, W, C] (sequences [n, F, H, W, C]) uint8
        "mask": _read_var(ds, "mask", start, stop),  # [n, G, H, W] (sequences [n, F, G, H, W]) uint8
    }
    _check_masks(arrays["mask"], start, source)
    return arrays


def verify_range(ds: xr.Dataset, start: int, stop: int) -> None:
    """Read images [start, stop) as training does and raise DatasetError (one line naming
    the file) when a chunk is missing or damaged or a mask is not one-hot."""
    n = ds.sizes["image"]
    if 0 <= start < n and start < stop:
        _read(ds, start, min(stop, n))


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
        ds: an opened store (or a path to one).
        batch_size: images per batch.
        seed: seed of the order.
        shuffle: shuffle chunks and images; otherwise images come in stored order.
        drop_last: drop each epoch's final partial batch.
        buffer_chunks: chunks read and shuffled together.
    """

    def __init__(self, ds: xr.Dataset | str | Path, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, buffer_chunks: int = 4):
        self.ds = ds if isinstance(ds, xr.Dataset) else open_store(ds)
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


def object_counts(ds: xr.Dataset, background: int = 1, chunk: int = CHUNK_SIZE) -> tuple[np.ndarray | None, np.ndarray]:
    """Objects per image of a store: by ``visibility > 0`` of the groups past the
    `background` ones (None without a visibility factor), and by non-empty masks of those
    groups (in any frame of a sequence), read chunk by chunk.

    Returns:
        (by_visibility [N] or None, by_mask [N]) int arrays.
    """
    n = ds.sizes["image"]
    source = ds.encoding.get("source", "dataset")
    by_visibility = None
    if "visibility" in ds and ds["visibility"].dims == ("image", "group"):
        try:
            visibility = ds["visibility"].values  # [N, G]
        except Exception as err:
            raise DatasetError(f"cannot read the visibility of {source}: {_first_line(err)}") from err
        by_visibility = (visibility[:, background:] > 0).sum(1)  # [N]
    by_mask = np.zeros(n, dtype=np.int64)  # [N]
    group_axis = ds["mask"].dims.index("group")
    for start in range(0, n, chunk):
        mask = _read_var(ds, "mask", start, min(start + chunk, n))  # [n, G, H, W] or [n, T, G, H, W]
        _check_masks(mask, start, source)
        pixels = mask.sum(tuple(a for a in range(1, mask.ndim) if a != group_axis), dtype=np.int64)  # [n, G]
        by_mask[start:start + chunk] = (pixels[:, background:] > 0).sum(1)
    return by_visibility, by_mask
