"""Tests of the Multi-dSprites and Shapes generators, their registry entries and presets,
and `fit` on a generated dataset through the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from iodine_pyro.config import make_config
from iodine_pyro.data import DATASETS, generate, open_dataset
from iodine_pyro.data import dsprites as ds_mod
from iodine_pyro.data import shapes as sh_mod

MY_DATASETS = {  # name -> (image shape, groups, sprites range)
    "multi_dsprites": ((64, 64, 3), 6, (2, 5)),
    "multi_dsprites_colored_on_colored": ((64, 64, 3), 5, (1, 4)),
    "multi_dsprites_binarized": ((64, 64, 1), 4, (2, 3)),
    "shapes": ((28, 28, 1), 4, (3, 3)),
}
VARIANT = {"multi_dsprites": "colored_on_grayscale", "multi_dsprites_colored_on_colored": "colored_on_colored",
           "multi_dsprites_binarized": "binarized"}


def _grid_index(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in a grid; asserts that every value is on the grid."""
    index = np.abs(values[..., None] - grid).argmin(-1)
    np.testing.assert_allclose(grid[index], values, atol=1e-6)
    return index


# ---------------------------------------------------------------------------------------
# Multi-dSprites
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANT))
def test_dsprites_follows_its_rules(name):
    (H, W, C), E, (lo, hi) = MY_DATASETS[name]
    data = DATASETS[name].make_chunk(np.random.default_rng(0), 300)
    image, mask = data["image"], data["mask"]  # [n, 64, 64, C], [n, E, 64, 64]
    n = len(image)
    assert image.shape == (n, H, W, C) and image.dtype == np.uint8
    assert mask.shape == (n, E, H, W) and mask.dtype == np.uint8
    assert (mask.sum(1) == 1).all(), "every pixel is the background or one sprite"
    visible = data["visibility"]  # [n, E]
    assert (visible[:, 0] == 1).all()
    count = visible[:, 1:].sum(1)
    assert set(count.astype(int).tolist()) == set(range(lo, hi + 1)), "every sprite count occurs"
    present = visible[:, 1:] > 0  # [n, E - 1]
    assert (present == (np.arange(E - 1)[None] < count[:, None])).all(), "sprites fill groups 1.. in order"
    assert (mask[:, 1:].sum((2, 3))[~present] == 0).all(), "absent sprites have empty masks"
    for key in ("x", "y", "shape", "orientation", "scale"):
        assert data[key].shape == (n, E) and data[key].dtype == np.float32
        assert (data[key][:, 1:][~present] == 0).all() and (data[key][:, 0] == 0).all()
    assert set(np.unique(data["shape"][:, 1:][present]).tolist()) == {1, 2, 3}
    for key, grid in (("scale", ds_mod.SCALES), ("orientation", ds_mod.ORIENTATIONS),
                      ("x", ds_mod.POSITIONS), ("y", ds_mod.POSITIONS)):
        _grid_index(grid, data[key][:, 1:][present])
    color = data["color"]  # [n, E, C] in [0, 1]
    assert color.shape == (n, E, C)
    expected = np.round(color * 255).astype(np.uint8)[np.arange(n)[:, None, None], mask.argmax(1)]
    np.testing.assert_array_equal(image, expected)  # every pixel has its group's colour
    sprites = color[:, 1:][present] * 255  # [m, C] sprite colours on the 0..255 scale
    if name == "multi_dsprites":
        assert (sprites.max(1) == 255).all() and (sprites.min(1) == 0).all(), "saturated, value 1"
        assert (color[:, 0, 0] == color[:, 0, 1]).all() and (color[:, 0, 1] == color[:, 0, 2]).all(), "grey"
        assert color[:, 0, 0].min() < 0.1 and color[:, 0, 0].max() > 0.9
    elif name == "multi_dsprites_binarized":
        assert (sprites == 255).all() and (color[:, 0] == 0).all()
        assert set(np.unique(image).tolist()) == {0, 255}
    else:
        assert (color[:, 0, 0] != color[:, 0, 1]).mean() > 0.9, "coloured background"
        assert len(np.unique(sprites, axis=0)) > 0.9 * len(sprites)


def test_dsprites_chunk_equals_the_reference_renderer():
    data = ds_mod.make_chunk(np.random.default_rng(1), 40, "colored_on_grayscale")
    for i in range(40):
        labels = np.zeros((64, 64), dtype=int)
        for g in range(1, 6):
            if data["visibility"][i, g] == 0:
                continue
            args = [int(data["shape"][i, g])]
            for key, grid in (("scale", ds_mod.SCALES), ("orientation", ds_mod.ORIENTATIONS),
                              ("x", ds_mod.POSITIONS), ("y", ds_mod.POSITIONS)):
                args.append(grid[_grid_index(grid, data[key][i, g])])
            labels[ds_mod.sprite_mask(*args)] = g  # later sprites occlude earlier ones
        np.testing.assert_array_equal(data["mask"][i].argmax(0), labels)


def test_dsprites_shapes_and_sizes():
    square = ds_mod.sprite_mask(1, 1.0, 0.0, 0.5, 0.5)
    rows, cols = np.nonzero(square)
    assert square.sum() == 400 and np.ptp(rows) + 1 == 20 and np.ptp(cols) + 1 == 20
    ellipse = ds_mod.sprite_mask(2, 1.0, 0.0, 0.5, 0.5)
    rows, cols = np.nonzero(ellipse)
    assert np.ptp(cols) + 1 == 20 and np.ptp(rows) + 1 == 10, "long axis horizontal"
    turned = ds_mod.sprite_mask(2, 1.0, np.pi / 2, 0.5, 0.5)
    rows, cols = np.nonzero(turned)
    assert np.ptp(rows) + 1 == 20 and np.ptp(cols) + 1 == 10
    heart = ds_mod.sprite_mask(3, 1.0, 0.0, 0.5, 0.5)
    rows, cols = np.nonzero(heart)
    assert np.ptp(cols) + 1 == 20 and 16 <= np.ptp(rows) + 1 <= 18
    assert heart[rows.max(), :].sum() <= 2, "tip down"
    small = ds_mod.sprite_mask(1, 0.5, 0.0, 0.5, 0.5)
    assert 90 <= small.sum() <= 110
    for x, y in ((0, 0), (1, 1), (0, 1)):  # at the grid's corners the largest sprites stay inside
        for shape in (1, 3):
            corner = ds_mod.sprite_mask(shape, 1.0, np.pi / 4, x, y)
            assert not (corner[0].any() or corner[-1].any() or corner[:, 0].any() or corner[:, -1].any())


def test_dsprites_seeded_and_prefix():
    a = ds_mod.make_chunk(np.random.default_rng(5), 30, "colored_on_colored")
    b = ds_mod.make_chunk(np.random.default_rng(5), 12, "colored_on_colored")
    c = ds_mod.make_chunk(np.random.default_rng(6), 12, "colored_on_colored")
    for key in a:
        np.testing.assert_array_equal(a[key][:12], b[key])
    assert not np.array_equal(b["image"], c["image"])


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------


def test_shape_templates():
    assert sh_mod.SQUARE.shape == (7, 7) and sh_mod.SQUARE.sum() == 49 - 9
    assert not sh_mod.SQUARE[2:5, 2:5].any()
    assert sh_mod.TRIANGLE_UP.shape == (7, 12)
    np.testing.assert_array_equal(sh_mod.TRIANGLE_UP, sh_mod.TRIANGLE_UP[:, ::-1])  # symmetric
    assert sh_mod.TRIANGLE_UP[0].sum() == 2 and sh_mod.TRIANGLE_UP[-1].all(), "apex up, base down"
    np.testing.assert_array_equal(sh_mod.TRIANGLE_DOWN, sh_mod.TRIANGLE_UP[::-1])


def test_shapes_follows_its_rules():
    data = sh_mod.make_chunk(np.random.default_rng(0), 300)
    image, mask = data["image"], data["mask"]  # [n, 28, 28, 1], [n, 4, 28, 28]
    n = len(image)
    assert image.shape == (n, 28, 28, 1) and set(np.unique(image).tolist()) == {0, 255}
    assert mask.shape == (n, 4, 28, 28) and (data["visibility"] == 1).all()
    assert set(np.unique(data["shape"][:, 1:]).tolist()) == {1, 2, 3}
    overlaps = 0
    for i in range(n):
        covered = np.zeros((3, 28, 28), dtype=bool)
        for g in range(1, 4):
            template = sh_mod.TEMPLATES[int(data["shape"][i, g]) - 1]
            top, left = int(data["y"][i, g]), int(data["x"][i, g])
            h, w = template.shape
            assert 0 <= top <= 28 - h and 0 <= left <= 28 - w, "the shape fits"
            covered[g - 1, top : top + h, left : left + w] = template
        count = covered.sum(0)
        np.testing.assert_array_equal(image[i, ..., 0] > 0, count > 0)  # image = OR
        np.testing.assert_array_equal(mask[i, 0], count == 0)  # background
        np.testing.assert_array_equal(mask[i, 1:], covered & (count == 1))  # overlaps in no group
        overlaps += (count > 1).any()
    assert 0 < overlaps < n
    assert (data["x"][:, 1:] == 0).any() and (data["y"][:, 1:] == 21).any(), "positions reach the edges"


def test_shapes_seeded_and_prefix():
    a = sh_mod.make_chunk(np.random.default_rng(2), 20)
    b = sh_mod.make_chunk(np.random.default_rng(2), 7)
    for key in a:
        np.testing.assert_array_equal(a[key][:7], b[key])


# ---------------------------------------------------------------------------------------
# Registry, store, presets
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MY_DATASETS))
def test_registered_generator_round_trip(name, tmp_path):
    shape, groups, _ = MY_DATASETS[name]
    spec = DATASETS[name]
    assert spec.image_shape == shape and spec.num_groups == groups
    out = generate(name, 40, tmp_path / name, seed=3, workers=1, progress=False, chunk_size=16)
    ds = open_dataset(out)
    assert ds.attrs["dataset"] == name and ds.sizes["image"] == 40
    assert (ds.sizes["height"], ds.sizes["width"], ds.sizes["channel"]) == shape and ds.sizes["group"] == groups
    direct = [spec.make_chunk(np.random.default_rng(s), 16 if i < 2 else 8)
              for i, s in enumerate(np.random.SeedSequence(3).spawn(3))]
    for key in ds.data_vars:
        np.testing.assert_array_equal(ds[key].values, np.concatenate([d[key] for d in direct]))


@pytest.mark.parametrize("name", list(MY_DATASETS))
def test_architecture_matches_the_generator(name):
    (H, W, C), groups, _ = MY_DATASETS[name]
    for preset in ("paper", "deepmind"):
        cfg = make_config(name, preset)
        assert cfg.model.image_size == (H, W) and cfg.model.image_channels == C
        assert cfg.model.num_slots == groups
        assert cfg.model.decoder_channels == (32, 32, 32, 32) and cfg.guide.lstm == 128  # Multi-dSprites net


@pytest.mark.slow
def test_fit_generates_shapes_through_the_cli(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "iodine_pyro", "fit", "--dataset", "shapes", "--steps", "1",
                           "--batch-size", "2", "--num-images", "8", "--out", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "trained to step 1" in proc.stdout
    ds = open_dataset(tmp_path / "run" / "data" / "train")
    assert ds.attrs["dataset"] == "shapes" and ds.sizes["image"] == 8
