"""Convert DeepMind's official multi-object TFRecord files into the on-disk format.

:func:`convert` streams a TFRecord file of ``tf.train.Example`` messages (read without
TensorFlow by :mod:`iodine_pyro.data.tfrecord`), decodes each record in the layout of the
dataset named, validates it, and writes chunks of 256 images with the same writer as
:func:`iodine_pyro.data.store.generate`: the result opens with ``open_dataset`` like a
generated set (``converted_from`` names the source file). Only one chunk is held in memory.

Layouts (:data:`LAYOUTS`; E = mask groups, group 0 the background; masks are 0/255 in the
files and 0/1 in the store):

=================================  ===========  ==================  ====================
dataset name                       image        mask in the file    factors
=================================  ===========  ==================  ====================
``tetrominoes``                    35x35x3      [4, 35, 35, 1]      x, y, shape,
                                                                    visibility [4];
                                                                    color [4, 3]
``multi_dsprites`` (the            64x64x3      [64, 64, 6, 1]      x, y, shape,
colored_on_grayscale file)                      (transposed to      orientation, scale,
                                                [6, 64, 64])        visibility [E];
``multi_dsprites_colored_on_       64x64x3      [64, 64, 5, 1]      color [E, C]
colored``
``multi_dsprites_binarized``       64x64x1      [64, 64, 4, 1]
``objects_room`` (train)           64x64x3      [7, 64, 64, 1]      none
``objects_room_six_objects``,      64x64x3      [10, 64, 64, 1]     none
``objects_room_identical_color``
``objects_room_empty_room``        64x64x3      [4, 64, 64, 1]      none
``clevr`` (clevr_with_masks),      240x320x3    [11, 240, 320, 1]   x, y, z, rotation,
``clevr6`` (3 to 6 objects)        -> 128x128x3 -> [11, 128, 128]   visibility [11];
                                                                    pixel_coords [11, 3];
                                                                    size, material,
                                                                    shape, color uint8
                                                                    [11]
``cater`` (cater_with_masks,       33 frames    [33, 11, 64, 64, 1] camera_matrix
ZLIB, one raw byte string per      of 64x64x3                       [33, 4, 4];
feature)                                                            object_positions
                                                                    [11, 33, 3]
=================================  ===========  ==================  ====================

All files are GZIP-compressed except CATER's (ZLIB). In the official files an image or mask
is a BytesList of one 1-byte string per element; CATER stores one string per feature; both
are accepted.

CLEVR: rows 29:221 and columns 64:256 of the 240 x 320 image (a 192 x 192 crop) are resized
to 128 x 128, the image with ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False, antialias=False)`` rounded half to even (the sampling of TF2's
``tf.image.resize(..., "bilinear")`` without antialiasing), and the masks by nearest
neighbour at the same half-pixel sample positions (source index ``floor((i + 0.5) * 1.5)``,
torch's ``nearest-exact``), so masks stay one-hot and aligned with the image.
``clevr6`` keeps the scenes with 3 to 6 objects, counted as groups 1..10 with
``visibility > 0`` (not the released IODINE code's filter, which keeps only 5-object scenes);
the 11 groups are kept. Object counts refer to the whole 240 x 320 scene: an object outside
the crop keeps its visibility and has an empty mask.

CATER is stored as a sequence dataset: ``image`` (image, frame, height, width, channel),
``mask`` (image, frame, group, height, width), ``object_positions`` (image, group, frame,
xyz) as in the file, ``camera_matrix`` (image, frame, row, col).

Objects Room's first 4 groups are sky, floor and two wall halves: converted stores carry
``background_groups = 4`` (other datasets: 1), which ``iodine-pyro data info`` and ``data
show`` use.

Every record is checked (features present, byte and value counts, mask values 0/255, at most
one group per pixel); a mismatch raises :class:`DatasetError` naming the file and the record,
e.g. when a file is converted under the wrong dataset name.
"""

from __future__ import annotations

import gzip
import logging
import math
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import tfrecord
from .errors import DatasetError
from .store import (
    CHUNK_SIZE,
    FORMAT,
    FORMAT_VERSION,
    new_store,
    prepare_output,
    write_chunks,
)

__all__ = [
    "Layout",
    "LAYOUTS",
    "ALIASES",
    "CLEVR_CROP",
    "CLEVR_SIZE",
    "convert",
    "decode_record",
    "clevr_crop_resize",
    "encode_example",
    "bytes_feature",
    "write_tfrecords",
]

log = logging.getLogger(__name__)

CLEVR_CROP = (slice(29, 221), slice(64, 256))  # rows, columns of the 240 x 320 image
CLEVR_SIZE = 128


@dataclass(frozen=True)
class Layout:
    """The layout of one official file.

    Args:
        image: shape of the image feature as stored (uint8).
        mask: shape of the mask feature as stored (uint8 0/255).
        mask_axes: where the group, height and width axes of the stored mask are:
            ``"ehw"`` [E, H, W, 1], ``"hwe"`` [H, W, E, 1] or ``"tehw"`` [T, E, H, W, 1].
        floats: float32 features and their shapes.
        bytes_factors: uint8 factors stored as bytes, and their shapes.
        factor_dims: store dims of factors with more than (image, group) dims.
        compression: ``"GZIP"`` or ``"ZLIB"``.
        crop_clevr: crop and resize CLEVR's 240 x 320 frames to 128 x 128.
        min_objects, max_objects: object-count filter (counted by visibility of groups 1..).
        background_groups: leading groups that are background (Objects Room: 4).
        official: the official file's name, for messages.
    """

    image: tuple[int, ...]
    mask: tuple[int, ...]
    mask_axes: str
    floats: dict[str, tuple[int, ...]] = field(default_factory=dict)
    bytes_factors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    factor_dims: dict[str, tuple[str, ...]] = field(default_factory=dict)
    compression: str = "GZIP"
    crop_clevr: bool = False
    min_objects: int | None = None
    max_objects: int | None = None
    background_groups: int = 1
    official: str = ""

    @property
    def num_groups(self) -> int:
        return self.mask[{"ehw": 0, "hwe": 2, "tehw": 1}[self.mask_axes]]


def _dsprites(groups: int, channels: int, variant: str) -> Layout:
    floats = {k: (groups,) for k in ("x", "y", "shape", "orientation", "scale", "visibility")}
    return Layout(image=(64, 64, channels), mask=(64, 64, groups, 1), mask_axes="hwe",
                  floats={**floats, "color": (groups, channels)},
                  factor_dims={"color": ("rgb",) if channels == 3 else ("gray",)},
                  official=f"multi_dsprites_{variant}.tfrecords")


def _objects_room(groups: int, official: str) -> Layout:
    return Layout(image=(64, 64, 3), mask=(groups, 64, 64, 1), mask_axes="ehw", background_groups=4,
                  official=official)


_CLEVR = dict(image=(240, 320, 3), mask=(11, 240, 320, 1), mask_axes="ehw",
              floats={"x": (11,), "y": (11,), "z": (11,), "rotation": (11,), "visibility": (11,),
                      "pixel_coords": (11, 3)},
              bytes_factors={k: (11,) for k in ("size", "material", "shape", "color")},
              factor_dims={"pixel_coords": ("coord",)}, crop_clevr=True,
              official="clevr_with_masks_train.tfrecords")

LAYOUTS: dict[str, Layout] = {
    "tetrominoes": Layout(image=(35, 35, 3), mask=(4, 35, 35, 1), mask_axes="ehw",
                          floats={"x": (4,), "y": (4,), "shape": (4,), "visibility": (4,), "color": (4, 3)},
                          factor_dims={"color": ("rgb",)}, official="tetrominoes_train.tfrecords"),
    "multi_dsprites": _dsprites(6, 3, "colored_on_grayscale"),
    "multi_dsprites_colored_on_colored": _dsprites(5, 3, "colored_on_colored"),
    "multi_dsprites_binarized": _dsprites(4, 1, "binarized"),
    "objects_room": _objects_room(7, "objects_room_train.tfrecords"),
    "objects_room_six_objects": _objects_room(10, "objects_room_test_six_objects.tfrecords"),
    "objects_room_identical_color": _objects_room(10, "objects_room_test_identical_color.tfrecords"),
    "objects_room_empty_room": _objects_room(4, "objects_room_test_empty_room.tfrecords"),
    "clevr": Layout(**_CLEVR),
    "clevr6": Layout(**_CLEVR, min_objects=3, max_objects=6),
    "cater": Layout(image=(33, 64, 64, 3), mask=(33, 11, 64, 64, 1), mask_axes="tehw",
                    floats={"camera_matrix": (33, 4, 4), "object_positions": (11, 33, 3)},
                    factor_dims={"camera_matrix": ("image", "frame", "row", "col"),
                                 "object_positions": ("frame", "xyz")},
                    compression="ZLIB", official="cater_with_masks_train.tfrecords"),
}
ALIASES = {
    "multi_dsprites_colored_on_grayscale": "multi_dsprites",
    "clevr_with_masks": "clevr",
    "cater_with_masks": "cater",
}


def layout_of(name: str) -> Layout:
    """The layout of a dataset name or alias; ValueError naming the choices otherwise."""
    layout = LAYOUTS.get(ALIASES.get(name, name))
    if layout is None:
        raise ValueError(f"unknown dataset {name!r} for conversion; choose from "
                         f"{', '.join(sorted(LAYOUTS) + sorted(ALIASES))}")
    return layout


# ---------------------------------------------------------------------------------------
# Decoding and validation of one record
# ---------------------------------------------------------------------------------------


def _where(path: Path, index: int) -> str:
    return f"{path}, record {index}"


def _byte_feature(record: dict, key: str, shape: tuple[int, ...], name: str, where: str) -> np.ndarray:
    values = record[key]
    if not isinstance(values, list):
        raise DatasetError(f"{where}: feature {key!r} is not a bytes feature; "
                           f"wrong dataset {name!r} for this file?")
    array = tfrecord.bytes_to_array(values)  # [prod(shape)] uint8
    expected = math.prod(shape)
    if array.size != expected:
        dims = "x".join(map(str, shape))
        raise DatasetError(f"{where}: {key!r} holds {array.size} bytes, not the {expected} ({dims}) of "
                           f"{name}; wrong dataset {name!r} for this file?")
    return array.reshape(shape)


def _float_feature(record: dict, key: str, shape: tuple[int, ...], name: str, where: str) -> np.ndarray:
    values = record[key]
    if not isinstance(values, np.ndarray) or values.dtype != np.float32:
        raise DatasetError(f"{where}: feature {key!r} is not a float feature; "
                           f"wrong dataset {name!r} for this file?")
    if values.size != math.prod(shape):
        raise DatasetError(f"{where}: {key!r} holds {values.size} floats, not the {math.prod(shape)} "
                           f"{list(shape)} of {name}; wrong dataset {name!r} for this file?")
    return values.reshape(shape)


def decode_record(record: dict, name: str, *, where: str = "record") -> dict[str, np.ndarray]:
    """Decode and check one parsed record (:func:`tfrecord.parse_example`) of dataset ``name``.

    Returns the store's arrays for one image, without the leading image axis: ``image``
    [H, W, C] (CATER [T, H, W, C]) uint8, ``mask`` [E, H, W] (CATER [T, E, H, W]) uint8 0/1,
    and the factors with their official shapes; CLEVR's are cropped and resized.

    Raises:
        DatasetError: naming ``where`` when a feature is missing or mis-sized, or the mask is
            not 0/255 with at most one group per pixel.
    """
    layout = layout_of(name)
    required = {"image", "mask", *layout.floats, *layout.bytes_factors}
    missing = sorted(required - set(record))
    if missing:
        raise DatasetError(f"{where}: no {', '.join(map(repr, missing))} feature (it has "
                           f"{', '.join(sorted(record)) or 'none'}); wrong dataset {name!r} for this file?")
    image = _byte_feature(record, "image", layout.image, name, where)
    raw = _byte_feature(record, "mask", layout.mask, name, where)[..., 0]
    if layout.mask_axes == "hwe":
        raw = raw.transpose(2, 0, 1)  # [H, W, E] -> [E, H, W]
    if ((raw != 0) & (raw != 255)).any():
        raise DatasetError(f"{where}: mask values {np.unique(raw)[:5].tolist()} are not 0/255")
    mask = (raw // 255).astype(np.uint8)  # [E, H, W] or [T, E, H, W] 0/1
    group_axis = 1 if layout.mask_axes == "tehw" else 0
    if (mask.sum(group_axis, dtype=np.int64) > 1).any():
        raise DatasetError(f"{where}: a pixel belongs to more than one mask group")
    arrays = {"image": image, "mask": mask}
    for key, shape in layout.floats.items():
        arrays[key] = _float_feature(record, key, shape, name, where)
    for key, shape in layout.bytes_factors.items():
        arrays[key] = _byte_feature(record, key, shape, name, where)
    if layout.crop_clevr:
        arrays["image"], arrays["mask"] = clevr_crop_resize(image, mask)
    return arrays


def clevr_crop_resize(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop a CLEVR frame to rows 29:221, columns 64:256 and resize it to 128 x 128.

    Args:
        image: [240, 320, 3] uint8.
        mask: [E, 240, 320] uint8 0/1.

    Returns:
        image [128, 128, 3] uint8 (bilinear, half-pixel centres, no antialiasing, rounded
        half to even) and mask [E, 128, 128] (nearest at the same sample positions).
    """
    rows, cols = CLEVR_CROP
    crop = torch.from_numpy(np.ascontiguousarray(image[rows, cols])).permute(2, 0, 1)[None].float()  # [1, 3, 192, 192]
    resized = torch.nn.functional.interpolate(crop, size=(CLEVR_SIZE, CLEVR_SIZE), mode="bilinear",
                                              align_corners=False, antialias=False)  # [1, 3, 128, 128]
    out = resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()  # [128, 128, 3]
    size = rows.stop - rows.start
    index = np.floor((np.arange(CLEVR_SIZE) + 0.5) * size / CLEVR_SIZE).astype(np.int64)  # [128]
    small = mask[:, rows, cols][:, index][:, :, index]  # [E, 128, 128]
    return out, np.ascontiguousarray(small)


def _object_count(arrays: dict[str, np.ndarray], layout: Layout) -> int:
    """Objects in a record: groups past the background with visibility > 0, else with
    a non-empty mask."""
    if "visibility" in arrays:
        return int((arrays["visibility"][layout.background_groups:] > 0).sum())
    mask = arrays["mask"]
    group_axis = 1 if mask.ndim == 4 else 0
    pixels = mask.sum(tuple(a for a in range(mask.ndim) if a != group_axis))  # [E]
    return int((pixels[layout.background_groups:] > 0).sum())


# ---------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------


def record_bound(layout: Layout) -> int:
    """The most bytes a record of `layout` can take: its features' values, each byte of a
    bytes feature stored as its own string (3 bytes with its tag and length, as in the
    official files), each float as 5, with room for names and framing. A longer record is
    refused before it is read (`tfrecord.read_records`)."""
    values = math.prod(layout.image) + math.prod(layout.mask) + \
        sum(math.prod(s) for s in layout.bytes_factors.values())
    floats = sum(math.prod(s) for s in layout.floats.values())
    return 4 * values + 8 * floats + (1 << 20)


def _records(path: Path, name: str, layout: Layout, min_objects: int | None, max_objects: int | None,
             max_images: int | None, bar) -> Iterator[dict[str, np.ndarray]]:
    """Decoded records that pass the object-count filter, at most ``max_images``."""
    if max_images is not None and max_images < 1:
        return
    kept, done = 0, [0]

    def advance(position: int) -> None:                   # bytes of the file read so far
        bar.update(position - done[0])
        done[0] = position

    for index, record in enumerate(tfrecord.read_examples(path, layout.compression, on_record=advance,
                                                          max_length=record_bound(layout))):
        arrays = decode_record(record, name, where=_where(path, index))
        count = _object_count(arrays, layout)
        if (min_objects is not None and count < min_objects) or (max_objects is not None and count > max_objects):
            continue
        kept += 1
        yield arrays
        if max_images is not None and kept >= max_images:
            return


def _chunks(records: Iterable[dict[str, np.ndarray]], chunk_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Stack records into chunks of ``chunk_size`` (the last one smaller)."""
    buffer: list[dict[str, np.ndarray]] = []
    for arrays in records:
        buffer.append(arrays)
        if len(buffer) == chunk_size:
            yield {k: np.stack([b[k] for b in buffer]) for k in buffer[0]}  # [chunk, ...] each
            buffer = []
    if buffer:
        yield {k: np.stack([b[k] for b in buffer]) for k in buffer[0]}


def convert(path: str | Path, name: str, out: str | Path, *, max_objects: int | None = None,
            min_objects: int | None = None, max_images: int | None = None, overwrite: bool = False,
            progress: bool = True, chunk_size: int = CHUNK_SIZE) -> Path:
    """Convert an official TFRecord file of dataset ``name`` into a new store at ``out``.

    Args:
        path: the ``.tfrecords`` file (GZIP; CATER: ZLIB).
        name: a key of :data:`LAYOUTS` or :data:`ALIASES`.
        out: the store directory; must not exist or be empty unless ``overwrite``.
        max_objects, min_objects: keep only images with that many objects (counted by
            ``visibility > 0`` of groups past the background, or by non-empty masks);
            default: the layout's (``clevr6``: 3 to 6). ``clevr`` with ``max_objects=6`` is
            stored as ``clevr6``.
        max_images: stop after this many kept images.
        overwrite: replace an existing store at ``out``.
        progress: show a progress bar of the file read, with an estimate of the time left.
        chunk_size: images per chunk.

    Returns:
        the store's path.

    Raises:
        DatasetError: one line naming the file (and record) when it is unreadable, does not
            match the layout, or no record is kept. The partial store is removed.
    """
    layout = layout_of(name)
    name = ALIASES.get(name, name)
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise DatasetError(f"no TFRecord file {path}")
    max_objects = layout.max_objects if max_objects is None else max_objects
    min_objects = layout.min_objects if min_objects is None else min_objects
    if name == "clevr" and max_objects == 6:
        name = "clevr6"
    prepare_output(out, overwrite)
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "generator": f"iodine_pyro.data.convert: the official {layout.official or name} layout",
        "converted_from": str(path),
        "background_groups": layout.background_groups,
    }
    if min_objects is not None:
        attrs["min_objects"] = int(min_objects)
    if max_objects is not None:
        attrs["max_objects"] = int(max_objects)
    with new_store(out, overwrite) as tmp:            # the store appears at `out` only once complete
        with tqdm(total=path.stat().st_size, disable=not progress, desc=f"convert {path.name}", unit="B",
                  unit_scale=True, dynamic_ncols=True) as bar:
            records = _records(path, name, layout, min_objects, max_objects, max_images, bar)
            total = write_chunks(tmp, _chunks(records, chunk_size), attrs, factor_dims=layout.factor_dims,
                                 chunk_size=chunk_size)
        if total == 0:
            raise DatasetError(f"{path}: no record to convert (empty file, or none with "
                               f"{min_objects or 0} to {max_objects or 'any'} objects)")
    log.info("converted %d %s images from %s to %s", total, name, path, out)
    return out


# ---------------------------------------------------------------------------------------
# Writing files in the official layout (tests, small samples)
# ---------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bytes_feature(array: np.ndarray, per_element: bool = True) -> list[bytes]:
    """A uint8 array as a BytesList: one 1-byte string per element (the official files) or
    one string for the whole array (CATER)."""
    data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return [data[i : i + 1] for i in range(len(data))] if per_element else [data]


def encode_example(features: dict[str, list[bytes] | np.ndarray]) -> bytes:
    """Serialize a ``tf.train.Example``: ``list[bytes]`` -> BytesList, float arrays ->
    packed FloatList, integer arrays -> packed Int64List (the inverse of
    :func:`tfrecord.parse_example`)."""
    entries = []
    for key, values in features.items():
        if isinstance(values, list) and values and all(len(v) == 1 for v in values):
            entries_1 = np.empty((len(values), 3), dtype=np.uint8)  # [N, (tag, length, byte)]
            entries_1[:, 0], entries_1[:, 1] = 0x0A, 1
            entries_1[:, 2] = np.frombuffer(b"".join(values), dtype=np.uint8)
            feature = _field(1, entries_1.tobytes())
        elif isinstance(values, list):
            feature = _field(1, b"".join(_field(1, v) for v in values))
        elif np.issubdtype(np.asarray(values).dtype, np.floating):
            feature = _field(2, _field(1, np.asarray(values, dtype="<f4").tobytes()))
        else:
            feature = _field(3, _field(1, b"".join(_varint(int(v)) for v in np.asarray(values).ravel())))
        entries.append(_field(1, _field(1, key.encode()) + _field(2, feature)))
    return _field(1, b"".join(entries))


def write_tfrecords(path: str | Path, examples: Iterable[bytes], compression: str | None = "GZIP") -> Path:
    """Write serialized examples as a TFRecord file (``"GZIP"``, ``"ZLIB"`` or None)."""
    data = b"".join(tfrecord.frame_record(e) for e in examples)
    kind = (compression or "").upper()
    if kind == "GZIP":
        data = gzip.compress(data)
    elif kind == "ZLIB":
        data = zlib.compress(data)
    from ..io import write_bytes

    return write_bytes(path, data)                   # whole or not at all (iodine_pyro.io)
