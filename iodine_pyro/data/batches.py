"""Reading stored datasets: images loaded by range, checked as they are read, and batches
for training.

Training reads whole chunks through :class:`Batches` (a shuffle buffer of a few chunks)
instead of one image at a time, since each random image access would decompress a chunk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .errors import DatasetError
from .store import CHUNK_SIZE, _check_frames, _chunk_files, _first_line, open_store

__all__ = ["verify_range", "Batches", "load_images", "object_counts"]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


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
        """Continue from a :meth:`state_dict`; the next batch is the one it names.

        The state counts images, so a stream of another batch size continues from the same
        image of the same epoch's order (a run resumed with a larger batch); where that is
        past the last whole batch of the epoch (``drop_last``), from the next epoch's first."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < max(self.num_images, 1):
            raise ValueError(f"invalid data state {state} for {self.num_images} images")
        self._advance(epoch, position, self._epoch_end())
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
