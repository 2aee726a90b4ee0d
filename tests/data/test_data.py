"""Tests of iodine_pyro.data: the TFRecord reader, the Tetrominoes generator (checked against
DeepMind's official file when ../shared is present), the zarr store and the batch stream."""

from __future__ import annotations

import gzip
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from iodine_pyro.data import (
    FORMAT,
    DATASETS,
    Batches,
    DatasetError,
    generate,
    load_images,
    open_dataset,
    read_examples,
    tfrecord,
)
from iodine_pyro.data import tetrominoes as tet

from ..helpers import OFFICIAL, needs_official

N_IMAGES = 150  # 4 full chunks of 32 and a partial one of 22
CHUNK = 32


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        return key + _varint(payload)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload  # fixed32 / fixed64


def _example(features: dict[str, bytes]) -> bytes:
    """Serialize a tf.train.Example from already-encoded Feature messages."""
    entries = b"".join(_field(1, 2, _field(1, 2, k.encode()) + _field(2, 2, v)) for k, v in features.items())
    return _field(1, 2, entries)  # Example.features


def _sample_example() -> tuple[bytes, dict]:
    floats = np.array([1.5, -2.0, 3.25], dtype="<f4")
    features = {
        "raw": _field(1, 2, _field(1, 2, b"hello") + _field(1, 2, b"") + _field(1, 2, b"\x00\xff")),
        "packed_f": _field(2, 2, _field(1, 2, floats.tobytes())),
        "unpacked_f": _field(2, 2, b"".join(_field(1, 5, f.tobytes()) for f in floats)),
        "packed_i": _field(3, 2, _field(1, 2, b"".join(_varint(v) for v in (0, 300, -7)))),
        "unpacked_i": _field(3, 2, b"".join(_field(1, 0, v) for v in (5, -1, 2**40))),
        "pixels": _field(1, 2, b"".join(_field(1, 2, bytes([v])) for v in (0, 10, 255))),
    }
    expected = {
        "raw": [b"hello", b"", b"\x00\xff"],
        "packed_f": floats,
        "unpacked_f": floats,
        "packed_i": np.array([0, 300, -7]),
        "unpacked_i": np.array([5, -1, 2**40]),
        "pixels": [b"\x00", b"\x0a", b"\xff"],
    }
    return _example(features), expected


def _official_arrays() -> dict[str, np.ndarray]:
    """The official sample as arrays in the store's layout (mask 0/1, [N, G, H, W])."""
    records = list(read_examples(OFFICIAL))
    return {
        "image": np.stack([tfrecord.bytes_to_array(r["image"], shape=(35, 35, 3)) for r in records]),
        "mask": np.stack([tfrecord.bytes_to_array(r["mask"], shape=(4, 35, 35, 1))[..., 0] for r in records]) // 255,
        **{k: np.stack([r[k] for r in records]) for k in ("x", "y", "shape", "visibility")},
        "color": np.stack([r["color"].reshape(4, 3) for r in records]),
    }


def _piece_blocks(piece: np.ndarray) -> tuple[int, int, list[tuple[int, int]]]:
    """Top row, left column and sorted block offsets of one piece's [35, 35] mask."""
    rows, cols = np.nonzero(piece)
    top, left = int(rows.min()), int(cols.min())
    blocks = sorted({((r - top) // tet.BLOCK, (c - left) // tet.BLOCK) for r, c in zip(rows, cols)})
    return top, left, blocks


def check_tetrominoes(data: dict[str, np.ndarray], known_ids=frozenset(tet.SHAPES)) -> None:
    """Assert every rule of the official Tetrominoes on a set of images."""
    image, mask = data["image"], data["mask"].astype(bool)  # [N, 35, 35, 3], [N, 4, 35, 35]
    n = len(image)
    assert image.shape == (n, 35, 35, 3) and image.dtype == np.uint8
    assert mask.shape == (n, 4, 35, 35)
    assert (mask.sum(1) == 1).all(), "masks are one-hot over 4 groups"
    assert (mask[:, 1:].sum((2, 3)) == 100).all(), "100 pixels per piece"
    assert (image[mask[:, 0]] == 0).all(), "black background"
    assert (data["visibility"] == 1).all()
    for key in ("x", "y", "shape", "color"):
        assert (data[key][:, 0] == 0).all(), f"background {key} is 0"
    colors = {tuple(c) for c in tet.COLORS.tolist()}
    for i in range(n):
        for k in range(1, 4):
            top, left, blocks = _piece_blocks(mask[i, k])
            assert (data["x"][i, k], data["y"][i, k]) == (top, left), "x = top row, y = left column"
            assert len(blocks) == 4
            shape_id = int(data["shape"][i, k])
            if shape_id in known_ids:
                assert blocks == sorted(tet.shape_blocks(shape_id)), f"shape id {shape_id}"
            rgb = data["color"][i, k]
            assert tuple(int(c) for c in rgb) in colors
            for br, bc in blocks:
                block = image[i, top + 5 * br : top + 5 * br + 5, left + 5 * bc : left + 5 * bc + 5]
                expected = rgb.astype(np.uint8)[None, None, :] * tet.BEVEL[..., None]  # [5, 5, 3]
                np.testing.assert_array_equal(block, expected)


# ---------------------------------------------------------------------------------------
# TFRecord reader
# ---------------------------------------------------------------------------------------


def test_crc32c_known_value():
    assert tfrecord.crc32c(b"123456789") == 0xE3069283
    assert tfrecord._crc32c_python(b"123456789") == 0xE3069283
    data = bytes(range(256)) * 5
    assert tfrecord._crc32c_python(data) == tfrecord.crc32c(data)


@pytest.mark.parametrize("compression", ["GZIP", "ZLIB", None])
def test_read_handmade_records(tmp_path, compression):
    payload, expected = _sample_example()
    framed = tfrecord.frame_record(payload) * 2
    path = tmp_path / "sample.tfrecords"
    if compression == "GZIP":
        framed = gzip.compress(framed)
    elif compression == "ZLIB":
        framed = zlib.compress(framed)
    path.write_bytes(framed)
    examples = list(read_examples(path, compression))
    assert len(examples) == 2
    for key, value in expected.items():
        got = examples[1][key]
        if isinstance(value, list):
            assert got == value
        else:
            np.testing.assert_array_equal(got, value)
    assert examples[0]["packed_f"].dtype == np.float32
    assert examples[0]["packed_i"].dtype == np.int64


def test_truncated_tfrecord(tmp_path):
    payload, _ = _sample_example()
    framed = tfrecord.frame_record(payload)
    for cut in (5, 20, len(framed) - 1):
        path = tmp_path / f"cut{cut}.tfrecords"
        path.write_bytes(framed + framed[:cut])
        with pytest.raises(DatasetError, match="truncated") as err:
            list(read_examples(path, None))
        assert str(path) in str(err.value)


def test_bad_crc_tfrecord(tmp_path):
    payload, _ = _sample_example()
    framed = bytearray(tfrecord.frame_record(payload))
    framed[20] ^= 0x01  # a byte of the data
    path = tmp_path / "bad.tfrecords"
    path.write_bytes(bytes(framed))
    with pytest.raises(DatasetError, match="CRC") as err:
        list(read_examples(path, None))
    assert str(path) in str(err.value)
    framed = bytearray(tfrecord.frame_record(payload))
    framed[0] ^= 0x01  # the length
    path.write_bytes(bytes(framed))
    with pytest.raises(DatasetError, match="length CRC"):
        list(read_examples(path, None))


def test_missing_tfrecord(tmp_path):
    with pytest.raises(DatasetError, match="nothing"):
        list(read_examples(tmp_path / "nothing.tfrecords"))


@needs_official
def test_read_official_file():
    records = list(read_examples(OFFICIAL))
    assert len(records) == 10
    for record in records:
        assert set(record) == {"image", "mask", "x", "y", "shape", "color", "visibility"}
        assert len(record["image"]) == 35 * 35 * 3 and all(len(b) == 1 for b in record["image"])
        assert len(record["mask"]) == 4 * 35 * 35
        for key in ("x", "y", "shape", "visibility"):
            assert record[key].shape == (4,) and record[key].dtype == np.float32
        assert record["color"].shape == (12,)
        mask = tfrecord.bytes_to_array(record["mask"])
        assert set(np.unique(mask)) <= {0, 255}


@needs_official
def test_official_file_damaged(tmp_path):
    raw = gzip.decompress(OFFICIAL.read_bytes())
    cut = tmp_path / "cut.tfrecords"
    cut.write_bytes(OFFICIAL.read_bytes()[:-100])  # a gzip stream without its end
    with pytest.raises(DatasetError) as err:
        list(read_examples(cut))
    assert str(cut) in str(err.value)
    flipped = bytearray(raw)
    flipped[5000] ^= 0x10
    bad = tmp_path / "bad.tfrecords"
    bad.write_bytes(gzip.compress(bytes(flipped)))
    with pytest.raises(DatasetError, match="CRC"):
        list(read_examples(bad))


# ---------------------------------------------------------------------------------------
# Tetrominoes
# ---------------------------------------------------------------------------------------


def _rotate(picture: tuple[str, ...]) -> tuple[str, ...]:
    return tuple("".join(row[c] for row in reversed(picture)) for c in range(len(picture[0])))


def test_shapes_are_the_19_fixed_tetrominoes():
    pictures = set(tet.SHAPES.values())
    assert len(pictures) == 19 and sorted(tet.SHAPES) == list(range(1, 20))
    for picture in pictures:
        assert sum(row.count("#") for row in picture) == 4
        assert _rotate(picture) in pictures, "closed under rotation"
    orbits = {frozenset({p, _rotate(p), _rotate(_rotate(p)), _rotate(_rotate(_rotate(p)))}) for p in pictures}
    assert len(orbits) == 7
    assert tet.ASSUMED_SHAPE_IDS == {1, 4, 8}


@needs_official
def test_official_sample_follows_the_rules():
    data = _official_arrays()
    check_tetrominoes(data, known_ids=tet.OBSERVED_SHAPE_IDS)
    observed = set(data["shape"][:, 1:].astype(int).ravel().tolist())
    assert observed <= tet.OBSERVED_SHAPE_IDS
    assert observed >= {2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}


def test_generator_follows_the_rules():
    data = tet.make_chunk(np.random.default_rng(0), 200)
    check_tetrominoes(data)
    assert data["mask"].dtype == np.uint8 and set(np.unique(data["mask"])) == {0, 1}
    colors = data["color"][:, 1:].reshape(-1, 3)
    assert len({tuple(c) for c in colors.tolist()}) == 6
    assert set(data["shape"][:, 1:].astype(int).ravel().tolist()) == set(tet.SHAPES)
    touches_border = (data["x"][:, 1:] == 0) | (data["y"][:, 1:] == 0)
    assert touches_border.any()


def test_generator_is_seeded():
    a = tet.make_chunk(np.random.default_rng(3), 20)
    b = tet.make_chunk(np.random.default_rng(3), 20)
    c = tet.make_chunk(np.random.default_rng(4), 20)
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["image"] == c["image"]).all()


# ---------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "tetro"
    return generate("tetrominoes", N_IMAGES, out, seed=7, workers=1, progress=False, chunk_size=CHUNK)


def _copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    return copy


def test_round_trip(store):
    ds = open_dataset(store)
    assert ds.attrs["format"] == FORMAT and ds.attrs["format_version"] == 1
    assert ds.attrs["dataset"] == "tetrominoes" and ds.attrs["seed"] == 7 and ds.attrs["generator"]
    assert dict(ds.sizes) == {"image": N_IMAGES, "height": 35, "width": 35, "channel": 3, "group": 4, "rgb": 3}
    assert ds["image"].dims == ("image", "height", "width", "channel") and ds["image"].dtype == np.uint8
    assert ds["mask"].dims == ("image", "group", "height", "width") and ds["mask"].dtype == np.uint8
    assert ds["color"].dims == ("image", "group", "rgb")
    assert {"x", "y", "shape", "visibility"} <= set(ds.data_vars)
    assert ds["image"].encoding["chunks"][0] == CHUNK
    for var in ds.data_vars.values():
        assert not var.variable._in_memory, "lazily indexed, not loaded"
    data = {k: ds[k].values for k in ds.data_vars}
    check_tetrominoes(data)
    assert not ds["image"].variable._in_memory


def test_same_seed_any_workers(store, tmp_path):
    other = generate("tetrominoes", N_IMAGES, tmp_path / "w2", seed=7, workers=2, progress=False, chunk_size=CHUNK)
    a, b = open_dataset(store), open_dataset(other)
    for key in a.data_vars:
        np.testing.assert_array_equal(a[key].values, b[key].values)
    prefix = generate("tetrominoes", 40, tmp_path / "prefix", seed=7, workers=1, progress=False, chunk_size=CHUNK)
    np.testing.assert_array_equal(open_dataset(prefix)["image"].values, a["image"][:40].values)


def test_different_seed(store, tmp_path):
    other = generate("tetrominoes", 40, tmp_path / "s8", seed=8, workers=1, progress=False, chunk_size=CHUNK)
    assert not np.array_equal(open_dataset(other)["image"].values, open_dataset(store)["image"][:40].values)


def test_generate_refuses_to_overwrite(tmp_path):
    out = generate("tetrominoes", 10, tmp_path / "d", workers=1, progress=False)
    with pytest.raises(DatasetError, match="overwrite"):
        generate("tetrominoes", 10, out, workers=1, progress=False)
    generate("tetrominoes", 12, out, seed=1, workers=1, progress=False, overwrite=True)
    assert open_dataset(out).sizes["image"] == 12
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="refusing"):
        generate("tetrominoes", 10, other, workers=1, progress=False, overwrite=True)
    assert (other / "keep.txt").exists()
    with pytest.raises(ValueError, match="unknown dataset"):
        generate("nope", 10, tmp_path / "n", progress=False)


def test_registry():
    spec = DATASETS["tetrominoes"]
    assert spec.image_shape == (35, 35, 3) and spec.num_groups == 4
    chunk = spec.make_chunk(np.random.default_rng(0), 3)
    assert chunk["image"].shape == (3, 35, 35, 3) and chunk["mask"].shape == (3, 4, 35, 35)


# ---------------------------------------------------------------------------------------
# open_dataset errors
# ---------------------------------------------------------------------------------------


def _assert_error(path: Path, match: str) -> None:
    with pytest.raises(DatasetError, match=match) as err:
        open_dataset(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_open_missing_path(tmp_path):
    _assert_error(tmp_path / "absent", "no dataset")


def test_open_random_directory(tmp_path):
    (tmp_path / "junk.txt").write_text("hello")
    _assert_error(tmp_path, "cannot open")


def test_open_foreign_zarr(tmp_path):
    path = tmp_path / "foreign.zarr"
    xr.Dataset({"a": ("i", np.arange(3))}).to_zarr(path, zarr_format=3, consolidated=False)
    _assert_error(path, "not an iodine-pyro dataset")


def test_open_missing_mask(store, tmp_path):
    copy = _copy(store, tmp_path)
    shutil.rmtree(copy / "mask")
    _assert_error(copy, "'mask'")


def test_open_missing_chunk(store, tmp_path):
    copy = _copy(store, tmp_path)
    chunk = sorted((copy / "image").glob("c*"))[-1]
    chunk.unlink()
    _assert_error(copy, "truncated")


def test_open_corrupt_metadata(store, tmp_path):
    copy = _copy(store, tmp_path)
    meta = copy / "mask" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    _assert_error(copy, "cannot open")


def test_open_incomplete(store, tmp_path):
    copy = _copy(store, tmp_path)
    meta = json.loads((copy / "zarr.json").read_text())
    meta["attributes"]["num_images"] = N_IMAGES + 100
    (copy / "zarr.json").write_text(json.dumps(meta))
    _assert_error(copy, "incomplete")


def test_read_corrupt_chunk(store, tmp_path):
    copy = _copy(store, tmp_path)
    chunk = sorted((copy / "image").glob("c*"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    ds = open_dataset(copy)
    with pytest.raises(DatasetError, match="cannot read") as err:
        load_images(ds, 0, 4)
    assert str(copy) in str(err.value)


# ---------------------------------------------------------------------------------------
# Batches and load_images
# ---------------------------------------------------------------------------------------


def _take(batches: Batches, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(n)]


def _keys(batch: dict[str, torch.Tensor]) -> list[bytes]:
    return [img.numpy().tobytes() for img in batch["image"]]


def test_load_images(store):
    ds = open_dataset(store)
    batch = load_images(ds, 30, 40)  # spans two chunks
    assert batch["image"].shape == (10, 3, 35, 35) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (10, 4, 35, 35) and batch["mask"].dtype == torch.float32
    expected = torch.from_numpy(ds["image"][30:40].values).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(batch["image"], expected)
    with pytest.raises(ValueError):
        load_images(ds, 140, 160)


def test_batches_shapes_and_ranges(store):
    batch = next(Batches(open_dataset(store), 16, seed=0))
    assert batch["image"].shape == (16, 3, 35, 35) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (16, 4, 35, 35) and batch["mask"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1 and batch["image"].max() == 1
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert (batch["mask"].sum(1) == 1).all()
    # image and mask stay paired through the shuffle: background pixels are black
    assert (batch["image"].sum(1)[batch["mask"][:, 0] == 1] == 0).all()


def test_batches_deterministic(store):
    ds = open_dataset(store)
    a = _take(Batches(ds, 16, seed=1), 12)  # more than one epoch
    b = _take(Batches(ds, 16, seed=1), 12)
    c = _take(Batches(ds, 16, seed=2), 12)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c))


@pytest.mark.parametrize("skip", [3, 8, 9])  # mid-epoch, at and after the epoch boundary
def test_batches_resume(store, skip):
    ds = open_dataset(store)
    first = Batches(ds, 16, seed=5, buffer_chunks=2)
    _take(first, skip)
    state = first.state_dict()
    assert set(state) == {"epoch", "position"}
    expected = _take(first, 2)
    resumed = Batches(ds, 16, seed=5, buffer_chunks=2)
    resumed.load_state_dict(dict(state))
    for x, y in zip(expected, _take(resumed, 2)):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])


@pytest.mark.parametrize("taken", [3, 8])  # mid-epoch; past the larger batch's last whole one
def test_batches_resume_with_another_batch_size(store, taken):
    """The state counts images: a stream of batch 32 resumed from one of batch 16 goes on
    from the same image of the same order, or at the next epoch where the rest of this one
    is less than a batch (150 images: 9 batches of 16, 4 of 32)."""
    ds = open_dataset(store)
    small = Batches(ds, 16, seed=5, buffer_chunks=2)
    _take(small, taken)
    state = small.state_dict()
    if taken == 8:
        _take(small, 1)                                  # the epoch's last batch of 16: 128 -> 144
        assert small.state_dict() == {"epoch": 1, "position": 0}
    expected = torch.cat([b["image"] for b in _take(small, 4)])
    large = Batches(ds, 32, seed=5, buffer_chunks=2)
    large.load_state_dict(dict(state))
    got = torch.cat([b["image"] for b in _take(large, 2)])
    assert torch.equal(got, expected)


def test_batches_epoch_coverage(store):
    ds = open_dataset(store)
    everything = set(_keys(load_images(ds, 0, N_IMAGES)))
    assert len(everything) == N_IMAGES
    batches = Batches(ds, 16, seed=3, drop_last=False, buffer_chunks=2)
    for epoch in range(2):
        sizes, seen = [], []
        for _ in range(10):  # ceil(150 / 16) batches per epoch
            batch = next(batches)
            sizes.append(len(batch["image"]))
            seen += _keys(batch)
        assert sizes == [16] * 9 + [6]
        assert sorted(seen) == sorted(everything), f"epoch {epoch}: every image once"
        assert batches.state_dict() == {"epoch": epoch + 1, "position": 0}


def test_batches_drop_last_and_order(store):
    ds = open_dataset(store)
    batches = Batches(ds, 16, seed=3)
    seen = [k for batch in _take(batches, 9) for k in _keys(batch)]
    assert len(set(seen)) == 144 and batches.state_dict() == {"epoch": 1, "position": 0}
    in_order = Batches(ds, 50, shuffle=False)
    stored = _keys(load_images(ds, 0, N_IMAGES))
    assert [k for batch in _take(in_order, 3) for k in _keys(batch)] == stored
    with pytest.raises(ValueError):
        Batches(ds, N_IMAGES + 1)
