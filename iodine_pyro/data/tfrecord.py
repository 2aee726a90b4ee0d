"""Read TFRecord files of ``tf.train.Example`` messages without TensorFlow.

DeepMind's official multi-object datasets are GZIP-compressed TFRecord files. Reading them
needs only two small pieces, both implemented here so that TensorFlow is not a dependency:

* the record framing: ``uint64 length | uint32 masked_crc32c(length) | data |
  uint32 masked_crc32c(data)``, all little-endian; both checksums are verified;
* a minimal protobuf decoder for ``tf.train.Example``::

      Example  { Features features = 1; }
      Features { map<string, Feature> feature = 1; }   # entries: key = 1, value = 2
      Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                              Int64List int64_list = 3; } }
      BytesList { repeated bytes value = 1; }
      FloatList { repeated float value = 1; }           # packed or not
      Int64List { repeated int64 value = 1; }           # packed or not

CRC32C comes from the ``google-crc32c`` package (C) when it is installed, otherwise from a
table-driven pure-Python implementation (a few MB/s: fine for tests and small files).

Every failure (truncation, bad checksum, malformed message, bad compressed stream) raises
:class:`~iodine_pyro.data.errors.DatasetError` with a one-line message naming the file.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DatasetError

__all__ = [
    "read_examples",
    "read_records",
    "parse_example",
    "frame_record",
    "crc32c",
    "masked_crc32c",
    "bytes_to_array",
]

Feature = list[bytes] | np.ndarray

# ---------------------------------------------------------------------------------------
# CRC32C (Castagnoli), reflected polynomial 0x82F63B78.
# ---------------------------------------------------------------------------------------

_CRC32C_POLY = 0x82F63B78


def _make_crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _make_crc_table()


def _crc32c_python(data: bytes | memoryview) -> int:
    """CRC32C of ``data``, one table lookup per byte."""
    table = _CRC_TABLE
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:  # the C implementation is ~1000x faster; optional
    import google_crc32c as _google_crc32c

    def _crc32c_fast(data: bytes | memoryview) -> int:
        return _google_crc32c.value(bytes(data))

    crc32c = _crc32c_fast
except ImportError:  # pragma: no cover - depends on the environment
    crc32c = _crc32c_python


def masked_crc32c(data: bytes | memoryview) -> int:
    """The TFRecord checksum: CRC32C rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord frame around ``data`` (the inverse of :func:`read_records`' framing)."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


# ---------------------------------------------------------------------------------------
# Record framing and compression
# ---------------------------------------------------------------------------------------


class _ZlibReader(io.RawIOBase):
    """A readable stream that inflates a zlib-wrapped file on the fly."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._inflater = zlib.decompressobj()
        self._buffer = bytearray()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and not self._inflater.eof:
            compressed = self._raw.read(1 << 16)
            if not compressed:
                raise EOFError("zlib stream ended before its end marker")
            self._buffer += self._inflater.decompress(compressed)
        if size < 0:
            size = len(self._buffer)
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


def _open(path: Path, compression: str | None) -> tuple[BinaryIO, BinaryIO]:
    """(the record stream, the file under it)."""
    kind = (compression or "").upper()
    if kind not in ("", "NONE", "GZIP", "ZLIB"):
        raise ValueError(f"unknown TFRecord compression {compression!r} (GZIP, ZLIB or None)")
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise DatasetError(f"cannot open TFRecord file {path}: {err}") from err
    if kind == "GZIP":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if kind == "ZLIB":
        return _ZlibReader(raw), raw
    return raw, raw


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


MAX_RECORD = 1 << 30     # bytes of one record at most, whatever its length field says


def read_records(
    path: str | Path, compression: str | None = "GZIP", *, verify: bool = True,
    on_record: Callable[[int], None] | None = None, max_length: int = MAX_RECORD,
) -> Iterator[bytes]:
    """Yield the raw payload of each record of a TFRecord file, checking both CRCs.

    A record's length field is checked (after its CRC) before anything is read for it:
    memory stays bounded by what the file can hold, not by what it claims. It must be at
    most `max_length` (a reader knows how large its records can be) and, for an
    uncompressed file, at most what is left of the file.

    `on_record(position)` is called after each record with the bytes of the file read so far
    (compressed bytes for a compressed file: a measure of progress)."""
    path = Path(path)
    stream, raw = _open(path, compression)
    try:
        size = os.fstat(raw.fileno()).st_size if stream is raw else None
    except OSError:
        size = None
    index = 0
    try:
        with stream:
            while True:
                header = _read_exact(stream, 12)
                if not header:
                    return
                if len(header) < 12:
                    raise DatasetError(f"truncated TFRecord file {path}: record {index} header cut short")
                (length,) = struct.unpack("<Q", header[:8])
                (length_crc,) = struct.unpack("<I", header[8:])
                if verify and masked_crc32c(header[:8]) != length_crc:
                    raise DatasetError(f"corrupted TFRecord file {path}: bad length CRC in record {index}")
                if length > max_length:
                    raise DatasetError(f"TFRecord file {path}: record {index} declares {length} bytes, more than a "
                                       f"record can hold ({max_length}); not a file of this dataset, or damaged")
                if size is not None and length + 4 > size - raw.tell():
                    raise DatasetError(f"truncated TFRecord file {path}: record {index} declares {length} bytes "
                                       f"and {max(size - raw.tell() - 4, 0)} are left")
                body = _read_exact(stream, length + 4)
                if len(body) < length + 4:
                    raise DatasetError(f"truncated TFRecord file {path}: record {index} cut short")
                data = body[:length]
                (data_crc,) = struct.unpack("<I", body[length:])
                if verify and masked_crc32c(data) != data_crc:
                    raise DatasetError(f"corrupted TFRecord file {path}: bad data CRC in record {index}")
                if on_record is not None:
                    on_record(raw.tell())
                yield data
                index += 1
    except (EOFError, OSError, zlib.error) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetError(f"unreadable TFRecord file {path} at record {index}: {reason}") from err


# ---------------------------------------------------------------------------------------
# Minimal protobuf decoding
# ---------------------------------------------------------------------------------------


class _ProtoError(Exception):
    """Malformed protobuf; turned into a DatasetError naming the file by the caller."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise _ProtoError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _ProtoError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field_number, wire_type, value)``; value is an int (varint) or raw bytes."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise _ProtoError("length-delimited field runs past the message")
            value = buf[pos : pos + size]
            pos += size
        elif wire == 5:
            if pos + 4 > end:
                raise _ProtoError("truncated fixed32 field")
            value = buf[pos : pos + 4]
            pos += 4
        elif wire == 1:
            if pos + 8 > end:
                raise _ProtoError("truncated fixed64 field")
            value = buf[pos : pos + 8]
            pos += 8
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        yield number, wire, value


def _bytes_list(buf: memoryview) -> list[bytes]:
    raw = np.frombuffer(buf, dtype=np.uint8)
    # Fast path: the official files store one 1-byte string per element (0x0A 0x01 value).
    if raw.size and raw.size % 3 == 0 and (raw[0::3] == 0x0A).all() and (raw[1::3] == 1).all():
        values = raw[2::3].tobytes()
        return [values[i : i + 1] for i in range(len(values))]
    return [bytes(v) for n, w, v in _fields(buf) if n == 1 and w == 2]


def _float_list(buf: memoryview) -> np.ndarray:
    parts = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == 2:  # packed
            if len(value) % 4:
                raise _ProtoError("packed float list is not a multiple of 4 bytes")
            parts.append(np.frombuffer(value, dtype="<f4"))
        elif wire == 5:
            parts.append(np.frombuffer(value, dtype="<f4"))
        else:
            raise _ProtoError(f"float list with wire type {wire}")
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(parts).astype(np.float32)


def _int64_list(buf: memoryview) -> np.ndarray:
    values: list[int] = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if wire == 2:  # packed varints
            pos = 0
            while pos < len(value):
                item, pos = _varint(value, pos)
                values.append(item)
        elif wire == 0:
            values.append(value)
        else:
            raise _ProtoError(f"int64 list with wire type {wire}")
    # Varints are two's complement 64-bit: reinterpret unsigned as signed.
    return np.array([v & 0xFFFFFFFFFFFFFFFF for v in values], dtype=np.uint64).view(np.int64)


def _feature(buf: memoryview) -> Feature:
    kind: Feature = []
    for number, wire, value in _fields(buf):
        if wire != 2:
            continue
        if number == 1:
            kind = _bytes_list(value)
        elif number == 2:
            kind = _float_list(value)
        elif number == 3:
            kind = _int64_list(value)
    return kind


def parse_example(data: bytes | memoryview) -> dict[str, Feature]:
    """Decode one serialized ``tf.train.Example`` into ``{name: values}``.

    Bytes features become ``list[bytes]``, float features float32 arrays and int64 features
    int64 arrays. Raises ``_ProtoError`` on malformed input (see :func:`read_examples`).
    """
    features: dict[str, Feature] = {}
    for number, wire, value in _fields(memoryview(data)):
        if number != 1 or wire != 2:
            continue
        for f_number, f_wire, entry in _fields(value):  # Features.feature map entries
            if f_number != 1 or f_wire != 2:
                continue
            key, feature = "", memoryview(b"")
            for e_number, e_wire, e_value in _fields(entry):
                if e_number == 1 and e_wire == 2:
                    key = bytes(e_value).decode("utf-8")
                elif e_number == 2 and e_wire == 2:
                    feature = e_value
            features[key] = _feature(feature)
    return features


def read_examples(path: str | Path, compression: str | None = "GZIP",
                  on_record: Callable[[int], None] | None = None,
                  max_length: int = MAX_RECORD) -> Iterator[dict[str, Feature]]:
    """Yield each ``tf.train.Example`` of a TFRecord file as ``{feature name: values}``.

    Args:
        path: the TFRecord file.
        compression: ``"GZIP"`` (the official multi-object datasets), ``"ZLIB"`` or
            ``None``/``""`` for an uncompressed file.
        max_length: bytes of one record at most (`read_records`).
    """
    for index, record in enumerate(read_records(path, compression, on_record=on_record, max_length=max_length)):
        try:
            yield parse_example(record)
        except (_ProtoError, UnicodeDecodeError) as err:
            raise DatasetError(f"malformed tf.train.Example in {path}, record {index}: {err}") from err


def bytes_to_array(values: list[bytes], dtype=np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Join a BytesList feature (one string per element, as in the official files) into an array."""
    array = np.frombuffer(b"".join(values), dtype=dtype)
    return array.reshape(shape) if shape is not None else array
