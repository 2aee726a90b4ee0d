"""Tests of the rendered 3D datasets: CLEVR (Mitsuba 3) and Objects Room (MuJoCo).

The renderers come with the optional ``render`` extra; the tests that render skip cleanly
when it is not installed. They render a handful of small scenes (CLEVR at few samples per
pixel) and check shapes, one-hot masks, the scene rules, determinism, the frame dim of the
sequences and the store round trip.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from iodine_pyro.config import ARCHITECTURES, make_config
from iodine_pyro.data import (
    DATASETS,
    Batches,
    DatasetError,
    clevr,
    generate,
    load_images,
    objects_room,
    open_dataset,
)

# `pytest.importorskip("mujoco")` imports MuJoCo before the package would: choose its
# headless OpenGL platform first, as iodine_pyro.data.objects_room does.
os.environ.setdefault("MUJOCO_GL", "egl")

# ---------------------------------------------------------------------------------------
# without the renderers
# ---------------------------------------------------------------------------------------


def test_registry_and_architectures():
    for name, shape, groups in [("clevr6", (128, 128, 3), 11), ("clevr", (128, 128, 3), 11),
                                ("objects_room", (64, 64, 3), 7), ("objects_room_sequences", (64, 64, 3), 7)]:
        assert DATASETS[name].image_shape == shape and DATASETS[name].num_groups == groups
        assert name in ARCHITECTURES
    cfg = make_config("objects_room")
    assert cfg.model.image_size == (64, 64) and cfg.model.num_slots == 7 and cfg.guide.lstm == 128
    assert make_config("objects_room_sequences").model.num_slots == 7


def test_importing_the_package_does_not_import_renderers():
    code = ("import sys, iodine_pyro.data, iodine_pyro.cli; "
            "print(sorted(m for m in ('mitsuba', 'mujoco', 'pyoidn', 'drjit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module, make", [("mitsuba", clevr.make_clevr6_chunk), ("pyoidn", clevr.make_clevr_chunk),
                                          ("mujoco", objects_room.make_chunk)])
def test_missing_renderer_says_how_to_install(monkeypatch, module, make):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(DatasetError, match=r'pip install -e "\.\[render\]"'):
        make(np.random.default_rng(0), 1)


def _check_masks(mask: np.ndarray) -> None:
    """0/1 masks with exactly one group per pixel."""
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert (mask.sum(-3) == 1).all()


# ---------------------------------------------------------------------------------------
# Objects Room
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def room():
    pytest.importorskip("mujoco")
    return objects_room.make_chunk(np.random.default_rng(0), 8)


@pytest.fixture(scope="module")
def flights():
    pytest.importorskip("mujoco")
    return objects_room.make_sequence_chunk(np.random.default_rng(1), 3)


def test_objects_room_arrays(room):
    assert room["image"].shape == (8, 64, 64, 3) and room["image"].dtype == np.uint8
    assert room["mask"].shape == (8, 7, 64, 64)
    _check_masks(room["mask"])
    for key in ("x", "y", "z", "size", "orientation", "shape", "visibility"):
        assert room[key].shape == (8, 7) and room[key].dtype == np.float32, key
    assert room["color"].shape == (8, 7, 3) and ((room["color"] >= 0) & (room["color"] <= 1)).all()


def test_objects_room_scene_rules(room):
    pixels = room["mask"].sum((2, 3))  # [8, 7]
    present = pixels > 0
    np.testing.assert_array_equal(room["visibility"], present.astype(np.float32))
    objects = present[:, 4:].sum(1)
    assert ((objects >= 1) & (objects <= 3)).all()
    assert present[:, :4].any(axis=0).all()  # sky, floor and both wall halves all appear
    assert present[:, 1].mean() > 0.5  # the floor in most frames (looking up, it may be out of view)
    assert (room["shape"][:, :4] == 0).all() and np.isin(room["shape"][:, 4:], [1, 2, 3, 4, 5]).all()
    radius = np.hypot(room["x"][:, 4:], room["y"][:, 4:])
    assert (radius <= objects_room.OBJECT_RADIUS + 1e-6).all()
    assert (room["z"][:, 4:] > 0).all()  # resting on the floor


def test_objects_room_is_deterministic(room):
    again = objects_room.make_chunk(np.random.default_rng(0), 2)
    for key, value in again.items():
        np.testing.assert_array_equal(value, room[key][:2], err_msg=key)


def test_sequences(flights):
    image, mask = flights["image"], flights["mask"]
    assert image.shape == (3, 16, 64, 64, 3) and mask.shape == (3, 16, 7, 64, 64)
    _check_masks(mask)
    frame_visible = mask.any(axis=(3, 4))  # [3, 16, 7]
    np.testing.assert_array_equal(flights["frame_visibility"], frame_visible.transpose(0, 2, 1).astype(np.float32))
    objects = frame_visible[:, :, 4:].sum(-1)  # [3, 16]
    assert ((objects >= 1) & (objects <= 3)).all()
    np.testing.assert_array_equal(flights["visibility"], frame_visible.any(1).astype(np.float32))
    # a smooth flight: consecutive frames are far more alike than frames of different scenes
    frames = image.astype(np.float32)
    consecutive = np.abs(frames[:, 1:] - frames[:, :-1]).mean()
    across = np.mean([np.abs(frames[a] - frames[b]).mean() for a, b in [(0, 1), (1, 2), (0, 2)]])
    assert consecutive < 0.5 * across
    assert (np.abs(frames[:, 1:] - frames[:, :-1]).mean(axis=(2, 3, 4)) > 0).mean() > 0.9  # the camera moves


@pytest.mark.slow
def test_objects_room_fg_ari_drops_its_four_background_groups_everywhere(tmp_path, monkeypatch):
    """evaluate, compare and the training log score FG-ARI alike: without sky, floor and
    both wall halves (the dataset's 4 background groups), never just group 0."""
    pytest.importorskip("mujoco")
    import json

    import torch

    import iodine_pyro.training.report as training_report
    from iodine_pyro.compare import compare
    from iodine_pyro.evaluate import batch_metrics, evaluate
    from iodine_pyro.metrics import ari, summarize
    from iodine_pyro.run import Run
    from iodine_pyro.training import fit

    logged_with = []

    def recording(system, batch, background):
        logged_with.append(background)
        return batch_metrics(system, batch, background)

    monkeypatch.setattr(training_report, "batch_metrics", recording)

    data = generate("objects_room", 8, tmp_path / "room", seed=2, workers=1, progress=False)
    tiny = {"model.image_size": (64, 64), "model.latent_dim": 4, "model.decoder_channels": (8,),
            "model.decoder_kernel": 3, "guide.num_iters": 2, "guide.conv_channels": (8,), "guide.conv_kernel": 3,
            "guide.mlp": (8,), "guide.lstm": 8, "train.batch_size": 8}
    result = fit(out=tmp_path / "run", steps=1, dataset="objects_room", overrides=tiny, data=data, eval_data=data,
                 log_every=1, progress=False, amp=False)
    run = Run.open(result.out)
    batch, _ = run.images(0, 8)
    torch.manual_seed(0)
    last = run.system.infer(batch["image"])[-1]
    by_hand = {drop: summarize(ari(batch["mask"], last.masks, foreground_only=drop)) for drop in (1, 4)}
    assert by_hand[1] != by_hand[4]                      # the choice matters on these images
    assert logged_with == [4]                            # the training log
    assert "fg_ari" in json.loads((result.out / "metrics.jsonl").read_text().splitlines()[-1])
    evaluated = evaluate(run, num_images=8, batch_size=8, progress=False)
    compared = compare([run], num_images=8, batch_size=8, iw_samples=1, gap_steps=0, progress=False)
    assert evaluated["background_groups"] == compared["settings"]["background_groups"] == 4
    assert evaluated["fg_ari"][-1] == pytest.approx(by_hand[4])
    assert compared["runs"][run.name]["fg_ari"][-1] == pytest.approx(by_hand[4])


def test_sequence_store(tmp_path):
    pytest.importorskip("mujoco")
    out = generate("objects_room_sequences", 2, tmp_path / "seq", seed=1, workers=1, progress=False, chunk_size=1)
    ds = open_dataset(out)
    assert ds["image"].dims == ("image", "frame", "height", "width", "channel")
    assert ds["mask"].dims == ("image", "frame", "group", "height", "width")
    assert ds["frame_visibility"].dims == ("image", "group", "frame")
    assert ds.sizes["frame"] == 16 and ds.sizes["image"] == 2
    first = objects_room.make_sequence_chunk(np.random.default_rng(np.random.SeedSequence(1).spawn(2)[0]), 1)
    for key, value in first.items():
        np.testing.assert_array_equal(ds[key].values[:1], value, err_msg=key)
    batch = next(iter(Batches(ds, 1, shuffle=False)))             # sequences keep their frame axis
    assert batch["image"].shape == (1, 16, 3, 64, 64) and batch["mask"].shape == (1, 16, 7, 64, 64)
    loaded = load_images(ds, 0, 1)
    np.testing.assert_array_equal(loaded["image"].movedim(2, -1).mul(255).round().byte().numpy(), first["image"])
    np.testing.assert_array_equal(loaded["mask"].byte().numpy(), first["mask"])


# ---------------------------------------------------------------------------------------
# CLEVR
# ---------------------------------------------------------------------------------------

SPP = 4  # few samples: the tests check geometry, not noise


@pytest.fixture(scope="module")
def scenes():
    pytest.importorskip("mitsuba")
    pytest.importorskip("pyoidn")
    full_frames: list[np.ndarray] = []
    original = clevr._labels

    def recording(mi, scene, sensor_index, integrator):
        labels = original(mi, scene, sensor_index, integrator)
        if sensor_index == 0:
            full_frames.append(labels)
        return labels

    clevr._labels = recording
    try:
        chunk = clevr.render_chunk(np.random.default_rng(0), 2, clevr.CLEVR6_OBJECTS, spp=SPP)
    finally:
        clevr._labels = original
    return chunk, full_frames


def test_clevr_arrays(scenes):
    chunk, _ = scenes
    assert chunk["image"].shape == (2, 128, 128, 3) and chunk["image"].dtype == np.uint8
    assert chunk["mask"].shape == (2, 11, 128, 128)
    _check_masks(chunk["mask"])
    for key in ("x", "y", "z", "rotation", "visibility"):
        assert chunk[key].shape == (2, 11) and chunk[key].dtype == np.float32, key
    for key in ("size", "material", "shape", "color"):
        assert chunk[key].shape == (2, 11) and chunk[key].dtype == np.uint8, key
    assert chunk["pixel_coords"].shape == (2, 11, 3)
    assert 20 < chunk["image"].mean() < 235  # neither black nor blown out


def test_clevr_scene_rules(scenes):
    chunk, full_frames = scenes
    count = (chunk["shape"] > 0).sum(1)  # [2] objects per scene
    assert ((count >= 3) & (count <= 6)).all()
    pixels = chunk["mask"].sum((2, 3))  # [2, 11]
    assert (pixels[:, 0] > 0).all()  # the ground
    for i, n in enumerate(count):
        assert (chunk["shape"][i, 1 : n + 1] > 0).all() and (chunk["shape"][i, n + 1 :] == 0).all()
        assert (pixels[i, n + 1 :] == 0).all()  # absent objects: empty masks
        for key, top in (("size", 2), ("material", 2), ("shape", 3), ("color", 8)):
            assert (chunk[key][i, 1 : n + 1] >= 1).all() and (chunk[key][i, 1 : n + 1] <= top).all()
        np.testing.assert_allclose(chunk["z"][i, 1 : n + 1], [
            clevr.SIZES[s - 1] / (np.sqrt(2) if shape == 1 else 1)
            for s, shape in zip(chunk["size"][i, 1 : n + 1], chunk["shape"][i, 1 : n + 1])], rtol=1e-5)
        xy = np.stack([chunk["x"][i, 1 : n + 1], chunk["y"][i, 1 : n + 1]], 1)  # [n, 2]
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=-1) - chunk["z"][i, 1 : n + 1][:, None] \
            - chunk["z"][i, 1 : n + 1][None]  # [n, n] the radius of a sphere or cylinder is its z
        assert (gaps[np.triu_indices(n, 1)] >= clevr.MIN_DIST - 1e-5).all()
    np.testing.assert_array_equal(chunk["visibility"][:, 1:], (pixels[:, 1:] > 0).astype(np.float32))
    # the accepted scene of each image (the last full-frame id render before it) meets the
    # minimum of visible pixels per object in the full 240 x 320 frame
    remaining = list(full_frames)
    for n in count:  # each image's placements end with the first one that meets the rule
        while (np.bincount(remaining.pop(0).ravel(), minlength=11)[1 : n + 1] < clevr.MIN_PIXELS).any():
            pass
    assert not remaining


def test_clevr_masks_match_ray_casting(scenes):
    """The id render (crop window) agrees with rays traced through pixel centres, and with
    the full-frame id render sampled at the crop's pixel centres."""
    mi = clevr._mitsuba()
    renderer = clevr._Renderer.create()
    rng = np.random.default_rng(3)
    objects = clevr._place(rng, 6)
    camera = np.array(clevr.CAMERA)
    lamps = {name: np.array(p) for name, (p, *_) in clevr.LAMPS.items()}
    scene = clevr._scene(mi, camera, lamps, objects, SPP, renderer.bsdfs)
    crop = clevr._labels(mi, scene, 1, renderer.ids)  # [128, 128]
    full = clevr._labels(mi, scene, 0, renderer.ids)  # [240, 320]
    sensor = scene.sensors()[1]
    for row, col in np.random.default_rng(4).integers(0, 128, size=(40, 2)):
        ray, _ = sensor.sample_ray(0.0, 0.5, mi.ScalarPoint2f((col + 0.5) / 128, (row + 0.5) / 128),
                                   mi.ScalarPoint2f(0.5, 0.5))
        hit = scene.ray_intersect(ray)
        expected = clevr._group_of_id(hit.shape.id()) if hit.is_valid() else 0
        assert crop[row, col] == expected
    centres = (np.arange(128) + 0.5) * 1.5  # crop pixel centres in full-frame pixels
    rows = (29 + centres).astype(int)
    cols = (64 + centres).astype(int)
    agreement = (full[rows[:, None], cols[None, :]] == crop).mean()
    assert agreement > 0.97
    assert len(np.unique(crop)) > 2  # the test scene shows objects


def test_clevr_is_deterministic(scenes):
    chunk, _ = scenes
    again = clevr.render_chunk(np.random.default_rng(0), 1, clevr.CLEVR6_OBJECTS, spp=SPP)
    for key, value in again.items():
        np.testing.assert_array_equal(value, chunk[key][:1], err_msg=key)


def test_clevr_store(tmp_path, scenes):
    out = generate("clevr", 1, tmp_path / "clevr", seed=0, workers=1, progress=False)
    ds = open_dataset(out)
    assert ds["image"].shape == (1, 128, 128, 3) and ds["pixel_coords"].dims == ("image", "group", "coord")
    batch = load_images(ds, 0, 1)
    assert batch["image"].shape == (1, 3, 128, 128) and batch["mask"].shape == (1, 11, 128, 128)
