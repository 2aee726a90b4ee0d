"""Tests of iodine_pyro.data.convert: small files written in each official layout are
converted and read back pixel-exact; the real Tetrominoes sample (when ../shared is present)
converts to exactly its raw records; mismatched or corrupt files give one-line errors; and
the `data convert`, `info` and `show` commands."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from iodine_pyro.cli import app
from iodine_pyro.data import (
    DATASETS,
    DatasetError,
    open_dataset,
    read_examples,
    tfrecord,
)
from iodine_pyro.data.convert import (
    LAYOUTS,
    bytes_feature,
    clevr_crop_resize,
    convert,
    encode_example,
    write_tfrecords,
)

from ..helpers import FAILURE, OFFICIAL, needs_official

RUNNER = CliRunner()


def official_example(name: str, arrays: dict[str, np.ndarray], per_element: bool = True) -> bytes:
    """One image's store arrays (mask [E, H, W] 0/1) as a tf.train.Example in the official layout."""
    layout = LAYOUTS[name]
    mask = arrays["mask"].astype(np.uint8) * 255
    if layout.mask_axes == "hwe":
        mask = mask.transpose(1, 2, 0)  # [E, H, W] -> [H, W, E]
    features = {"image": bytes_feature(arrays["image"], per_element),
                "mask": bytes_feature(mask[..., None], per_element)}
    for key in layout.floats:
        features[key] = np.asarray(arrays[key], dtype=np.float32).ravel()
    for key in layout.bytes_factors:
        features[key] = bytes_feature(arrays[key])
    return encode_example(features)


def write_official(path: Path, name: str, records: list[dict[str, np.ndarray]]) -> Path:
    layout = LAYOUTS[name]
    per_element = layout.compression == "GZIP"
    return write_tfrecords(path, [official_example(name, r, per_element) for r in records], layout.compression)


def split(chunk: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{k: v[i] for k, v in chunk.items()} for i in range(len(chunk["image"]))]


def one_hot(labels: np.ndarray, groups: int) -> np.ndarray:
    return (labels[..., None, :, :] == np.arange(groups)[:, None, None]).astype(np.uint8)


def assert_one_line(err: BaseException, *needles: str) -> None:
    message = str(err)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------------------------------
# Round trips through the official layouts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tetrominoes", "multi_dsprites", "multi_dsprites_colored_on_colored",
                                  "multi_dsprites_binarized"])
def test_generated_images_round_trip_through_the_official_layout(name, tmp_path):
    chunk = DATASETS[name].make_chunk(np.random.default_rng(0), 7)
    path = write_official(tmp_path / f"{name}.tfrecords", name, split(chunk))
    out = convert(path, name, tmp_path / "store", progress=False, chunk_size=3)
    ds = open_dataset(out)
    assert ds.attrs["dataset"] == name and ds.attrs["converted_from"] == str(path)
    assert set(ds.data_vars) == set(chunk) and ds["image"].encoding["chunks"][0] == 3
    for key, value in chunk.items():
        assert ds[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ds[key].values, value, err_msg=key)


def test_objects_room_layout(tmp_path):
    rng = np.random.default_rng(1)
    records = []
    for objects in (1, 3, 0):
        labels = rng.integers(0, 4, (64, 64))  # sky, floor, walls
        for k in range(objects):
            labels[10 * k : 10 * k + 6, 20:30] = 4 + k
        records.append({"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "mask": one_hot(labels, 7)})
    path = write_official(tmp_path / "room.tfrecords", "objects_room", records)
    ds = open_dataset(convert(path, "objects_room", tmp_path / "store", progress=False))
    np.testing.assert_array_equal(ds["image"].values, np.stack([r["image"] for r in records]))
    np.testing.assert_array_equal(ds["mask"].values, np.stack([r["mask"] for r in records]))
    assert ds.attrs["background_groups"] == 4
    result = RUNNER.invoke(app, ["data", "info", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "objects per image (non-empty masks) (groups 4.." in result.output
    assert "0: 1, 1: 1, 3: 1" in result.output


def _clevr_record(rng: np.random.Generator, objects: int) -> dict[str, np.ndarray]:
    labels = np.zeros((240, 320), dtype=np.int64)
    for k in range(1, objects + 1):
        top, left = rng.integers(20, 200), rng.integers(40, 260)
        labels[top : top + 25, left : left + 30] = k
    visibility = np.zeros(11, dtype=np.float32)
    visibility[1 : objects + 1] = 1
    return {
        "image": rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
        "mask": one_hot(labels, 11),
        **{k: rng.normal(size=11).astype(np.float32) for k in ("x", "y", "z", "rotation")},
        "visibility": visibility,
        "pixel_coords": rng.normal(size=(11, 3)).astype(np.float32),
        **{k: rng.integers(0, 8, 11, dtype=np.uint8) for k in ("size", "material", "shape", "color")},
    }


def _bilinear_reference(image: np.ndarray) -> np.ndarray:
    """192 -> 128 bilinear with half-pixel centres, written out: sample 1.5 i + 0.25."""
    src = 1.5 * np.arange(128) + 0.25
    i0 = np.floor(src).astype(int)
    f = src - i0
    i1 = np.minimum(i0 + 1, 191)
    x = image.astype(np.float64)
    rows = x[i0] * (1 - f)[:, None, None] + x[i1] * f[:, None, None]  # [128, 192, 3]
    both = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i1] * f[None, :, None]  # [128, 128, 3]
    return np.round(both).astype(np.uint8)


@pytest.fixture(scope="module")
def clevr_file(tmp_path_factory):
    rng = np.random.default_rng(2)
    records = [_clevr_record(rng, k) for k in (3, 7, 6, 10)]
    path = write_official(tmp_path_factory.mktemp("clevr") / "clevr.tfrecords", "clevr", records)
    return path, records


@pytest.mark.slow
def test_clevr_crop_resize(clevr_file, tmp_path):
    path, records = clevr_file
    ds = open_dataset(convert(path, "clevr_with_masks", tmp_path / "clevr", progress=False))
    assert ds.attrs["dataset"] == "clevr" and ds.sizes["image"] == 4
    assert (ds.sizes["height"], ds.sizes["width"], ds.sizes["group"]) == (128, 128, 11)
    for i, record in enumerate(records):
        crop = record["image"][29:221, 64:256]  # [192, 192, 3]
        np.testing.assert_array_equal(ds["image"][i].values, _bilinear_reference(crop))
        mask = torch.from_numpy(record["mask"][:, 29:221, 64:256]).float()[None]  # [1, 11, 192, 192]
        nearest = torch.nn.functional.interpolate(mask, size=(128, 128), mode="nearest-exact")[0]
        np.testing.assert_array_equal(ds["mask"][i].values, nearest.to(torch.uint8).numpy())
        for key in ("x", "visibility", "pixel_coords", "size", "color"):
            np.testing.assert_array_equal(ds[key][i].values, record[key])
    assert ds["size"].dtype == np.uint8 and ds["pixel_coords"].dims == ("image", "group", "coord")
    result = RUNNER.invoke(app, ["data", "info", str(tmp_path / "clevr")])
    assert "objects per image (visibility): 3: 1, 6: 1, 7: 1, 10: 1" in result.output, result.output


def test_clevr6_filter_counts_objects_by_visibility(clevr_file, tmp_path):
    path, records = clevr_file
    for name, kw in (("clevr6", {}), ("clevr", {"max_objects": 6})):
        ds = open_dataset(convert(path, name, tmp_path / name, progress=False, **kw))
        assert ds.attrs["dataset"] == "clevr6" and ds.attrs["max_objects"] == 6
        assert ds.sizes["image"] == 2  # the scenes with 3 and 6 objects, not 7 or 10
        np.testing.assert_array_equal(ds["visibility"].values, np.stack([records[0]["visibility"],
                                                                         records[2]["visibility"]]))
    first = convert(path, "clevr", tmp_path / "first", max_images=1, progress=False)
    assert open_dataset(first).sizes["image"] == 1


def test_clevr_resize_keeps_masks_one_hot():
    rng = np.random.default_rng(3)
    record = _clevr_record(rng, 10)
    image, mask = clevr_crop_resize(record["image"], record["mask"])
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert mask.shape == (11, 128, 128) and (mask.sum(0) == 1).all()


@pytest.mark.slow
def test_cater_sequences(tmp_path):
    rng = np.random.default_rng(4)
    records = []
    for _ in range(2):
        labels = rng.integers(0, 11, (33, 64, 64))
        records.append({
            "image": rng.integers(0, 256, (33, 64, 64, 3), dtype=np.uint8),
            "mask": (labels[:, None] == np.arange(11)[None, :, None, None]).astype(np.uint8),  # [33, 11, 64, 64]
            "camera_matrix": rng.normal(size=(33, 4, 4)).astype(np.float32),
            "object_positions": rng.normal(size=(11, 33, 3)).astype(np.float32),
        })
    path = write_official(tmp_path / "cater.tfrecords", "cater", records)
    assert path.read_bytes()[:1] == b"\x78", "zlib stream"
    ds = open_dataset(convert(path, "cater_with_masks", tmp_path / "cater", progress=False))
    assert ds["image"].dims == ("image", "frame", "height", "width", "channel")
    assert ds["mask"].dims == ("image", "frame", "group", "height", "width")
    assert ds["camera_matrix"].dims == ("image", "frame", "row", "col")
    assert ds["object_positions"].dims == ("image", "group", "frame", "xyz")
    for key in records[0]:
        np.testing.assert_array_equal(ds[key].values, np.stack([r[key] for r in records]), err_msg=key)
    result = RUNNER.invoke(app, ["data", "show", str(tmp_path / "cater"), "--out", str(tmp_path / "c.png"),
                                 "--frame", "32"])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "c.png").convert("L")).std() > 10


# ---------------------------------------------------------------------------------------
# The real official sample
# ---------------------------------------------------------------------------------------


@needs_official
def test_official_tetrominoes_sample_converts_exactly(tmp_path):
    ds = open_dataset(convert(OFFICIAL, "tetrominoes", tmp_path / "t", progress=False))
    records = list(read_examples(OFFICIAL))
    assert ds.sizes["image"] == len(records) == 10
    for i, r in enumerate(records):
        np.testing.assert_array_equal(ds["image"][i].values, tfrecord.bytes_to_array(r["image"], shape=(35, 35, 3)))
        raw = tfrecord.bytes_to_array(r["mask"], shape=(4, 35, 35, 1))[..., 0]
        np.testing.assert_array_equal(ds["mask"][i].values * 255, raw)
        for key in ("x", "y", "shape", "visibility"):
            np.testing.assert_array_equal(ds[key][i].values, r[key])
        np.testing.assert_array_equal(ds["color"][i].values, r["color"].reshape(4, 3))


@needs_official
@pytest.mark.slow
def test_wrong_dataset_name_is_a_one_line_error(tmp_path):
    for name, needle in (("multi_dsprites", "no 'orientation', 'scale' feature"), ("clevr", "'material'"),
                         ("objects_room", "'image' holds 3675 bytes, not the 12288 (64x64x3)")):
        with pytest.raises(DatasetError) as err:
            convert(OFFICIAL, name, tmp_path / name, progress=False)
        assert_one_line(err.value, str(OFFICIAL), "record 0", needle, f"wrong dataset '{name}' for this file?")
        assert not (tmp_path / name).exists(), "no partial store is left"
    with pytest.raises(DatasetError) as err:  # a GZIP file read as CATER's ZLIB
        convert(OFFICIAL, "cater", tmp_path / "cater", progress=False)
    assert_one_line(err.value, str(OFFICIAL))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "iodine_pyro", "data", "convert", str(OFFICIAL), "--dataset",
                           "multi_dsprites_binarized", "--out", str(tmp_path / "cli"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == FAILURE and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "wrong dataset 'multi_dsprites_binarized' for this file?" in proc.stderr


# ---------------------------------------------------------------------------------------
# Corrupt files
# ---------------------------------------------------------------------------------------


@pytest.fixture()
def tetro_records():
    return split(DATASETS["tetrominoes"].make_chunk(np.random.default_rng(5), 3))


def test_bad_mask_values_name_the_record(tmp_path, tetro_records):
    examples = [official_example("tetrominoes", r) for r in tetro_records]
    bad = dict(tetro_records[1])
    bad["mask"] = bad["mask"].copy()
    bad["mask"][0, 0, 0] = 2  # 510 after scaling, wraps to 254 in uint8: neither 0 nor 255
    examples[1] = official_example("tetrominoes", bad)
    path = write_tfrecords(tmp_path / "bad.tfrecords", examples)
    with pytest.raises(DatasetError) as err:
        convert(path, "tetrominoes", tmp_path / "out", progress=False)
    assert_one_line(err.value, str(path), "record 1", "0/255")
    assert not (tmp_path / "out").exists()


def test_overlapping_masks_and_short_features(tmp_path, tetro_records):
    record = dict(tetro_records[0])
    record["mask"] = np.ones_like(record["mask"])  # every pixel in every group
    path = write_tfrecords(tmp_path / "overlap.tfrecords", [official_example("tetrominoes", record)])
    with pytest.raises(DatasetError) as err:
        convert(path, "tetrominoes", tmp_path / "a", progress=False)
    assert_one_line(err.value, "record 0", "more than one mask group")
    record = dict(tetro_records[0])
    record["x"] = record["x"][:3]
    path = write_tfrecords(tmp_path / "short.tfrecords", [official_example("tetrominoes", record)])
    with pytest.raises(DatasetError) as err:
        convert(path, "tetrominoes", tmp_path / "b", progress=False)
    assert_one_line(err.value, "'x' holds 3 floats, not the 4")


def test_truncated_and_missing_files(tmp_path, tetro_records):
    path = write_official(tmp_path / "t.tfrecords", "tetrominoes", tetro_records)
    raw = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.tfrecords"
    cut.write_bytes(gzip.compress(raw[:-50]))
    with pytest.raises(DatasetError) as err:
        convert(cut, "tetrominoes", tmp_path / "out", progress=False)
    assert_one_line(err.value, str(cut), "truncated")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DatasetError, match="no TFRecord file"):
        convert(tmp_path / "absent.tfrecords", "tetrominoes", tmp_path / "out", progress=False)
    empty = write_tfrecords(tmp_path / "empty.tfrecords", [])
    with pytest.raises(DatasetError, match="no record"):
        convert(empty, "tetrominoes", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        convert(path, "mnist", tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def test_convert_info_and_show_commands(tmp_path):
    chunk = DATASETS["multi_dsprites"].make_chunk(np.random.default_rng(6), 5)
    path = write_official(tmp_path / "md.tfrecords", "multi_dsprites", split(chunk))
    store = tmp_path / "md"
    result = RUNNER.invoke(app, ["data", "convert", str(path), "--dataset", "multi_dsprites_colored_on_grayscale",
                                 "--out", str(store), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"wrote 5 multi_dsprites images to {store}" in result.output
    counts = np.bincount(chunk["visibility"][:, 1:].sum(1).astype(int))
    expected = ", ".join(f"{i}: {c}" for i, c in enumerate(counts) if c)
    result = RUNNER.invoke(app, ["data", "info", str(store)])
    assert f"objects per image (visibility): {expected}" in result.output, result.output
    assert f"converted from {path}" in result.output
    pngs = [tmp_path / "grid.png", tmp_path / "again.png"]
    for png in pngs:
        result = RUNNER.invoke(app, ["data", "show", str(store), "--out", str(png), "--num-images", "3"])
        assert result.exit_code == 0, result.output
    assert pngs[0].read_bytes() == pngs[1].read_bytes(), "deterministic"
    picture = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert picture.std() > 10 and picture.shape[0] > picture.shape[1] / 3
    result = RUNNER.invoke(app, ["data", "convert", str(path), "--dataset", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "unknown dataset 'nope'" in result.output


def test_show_shapes_marks_overlaps_unscored(tmp_path):
    from iodine_pyro.figures import dataset_grid
    from iodine_pyro.data import generate

    store = generate("shapes", 4, tmp_path / "s", workers=1, progress=False)
    png = dataset_grid(open_dataset(store), tmp_path / "s.png", num_images=4)
    assert np.asarray(Image.open(png).convert("L")).std() > 10
