"""Procedural Shapes: 28 x 28 binary images of three outlined shapes (Reichert & Serre 2013).

Greff et al. (2019, appendix B.4) use the shapes dataset of Reichert & Serre: 60,000
binary 28 x 28 images, each with three random shapes. This module draws it:

* each of the 3 shapes is, uniformly and independently, one of
  - ``square``: a 7 x 7 square outline, 2 pixels wide (a 3 x 3 hole),
  - ``triangle_up``: a hollow upward triangle 7 rows high and 12 columns wide: rows
    0..5 span columns ``5 - r .. 6 + r`` and row 6 repeats the 12-pixel base; the interior
    left by a 2-pixel wall (rows 2..4) is empty (:data:`TRIANGLE_UP`),
  - ``triangle_down``: the upward triangle flipped vertically;
* its top-left corner is uniform over the positions at which the whole shape fits;
* shapes may overlap; the image is the OR of the three (0 or 255, one channel);
* masks: 4 groups, group 0 the background (pixels no shape covers), groups 1..3 the
  shapes in drawing order; a pixel covered by two or more shapes belongs to no group (an
  all-zero mask vector: it is not scored), as in Greff et al.;
* factors per group (0 for the background): ``x`` = left column, ``y`` = top row,
  ``shape`` = 1 square, 2 upward triangle, 3 downward triangle; ``visibility`` = 1 for all
  4 groups (every image has 3 shapes).

The exact pixel pictures of the original shapes are not published; the ones here follow
the description "square, upward triangle, downward triangle outlines" at those sizes.
"""

from __future__ import annotations

import numpy as np

from .spec import DatasetSpec

__all__ = ["IMAGE_SIZE", "NUM_SHAPES", "NUM_GROUPS", "SQUARE", "TRIANGLE_UP", "TRIANGLE_DOWN",
           "TEMPLATES", "make_chunk"]

IMAGE_SIZE = 28
NUM_SHAPES = 3
NUM_GROUPS = NUM_SHAPES + 1


def _picture(rows: tuple[str, ...]) -> np.ndarray:
    return np.array([[ch == "#" for ch in row] for row in rows], dtype=bool)


SQUARE = _picture((
    "#######",
    "#######",
    "##...##",
    "##...##",
    "##...##",
    "#######",
    "#######",
))  # [7, 7]
TRIANGLE_UP = _picture((
    ".....##.....",
    "....####....",
    "...##..##...",
    "..##....##..",
    ".##......##.",
    "############",
    "############",
))  # [7, 12]
TRIANGLE_DOWN = TRIANGLE_UP[::-1].copy()  # [7, 12]
TEMPLATES = (SQUARE, TRIANGLE_UP, TRIANGLE_DOWN)  # shape id - 1 -> picture


def _placed(template: np.ndarray, top: np.ndarray, left: np.ndarray) -> np.ndarray:
    """Pictures of one template at per-image offsets: [n] top, left -> [n, 28, 28] bool."""
    n = len(top)
    h, w = template.shape
    out = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)  # [n, 28, 28]
    rows = top[:, None, None] + np.arange(h)[None, :, None]  # [n, h, 1]
    cols = left[:, None, None] + np.arange(w)[None, None, :]  # [n, 1, w]
    out[np.arange(n)[:, None, None], rows, cols] = template[None]
    return out


def make_chunk(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Generate ``n`` Shapes images with masks and factors.

    All random numbers of an image come from one row of ``rng.random((n, 9))``, so
    ``make_chunk(rng, m)`` is a prefix of ``make_chunk(rng, n)`` for m < n.

    Returns numpy arrays: ``image`` [n, 28, 28, 1] uint8 (0 or 255), ``mask`` [n, 4, 28, 28]
    uint8 0/1 (overlap pixels in no group), ``x``, ``y``, ``shape``, ``visibility`` [n, 4]
    float32.
    """
    u = rng.random((n, NUM_SHAPES, 3))  # [n, 3 shapes, (kind, row, column)]
    kind = np.minimum(np.floor(u[..., 0] * len(TEMPLATES)).astype(np.int64), len(TEMPLATES) - 1)  # [n, 3]
    heights = np.array([t.shape[0] for t in TEMPLATES])[kind]  # [n, 3]
    widths = np.array([t.shape[1] for t in TEMPLATES])[kind]  # [n, 3]
    top = np.floor(u[..., 1] * (IMAGE_SIZE - heights + 1)).astype(np.int64)  # [n, 3]
    left = np.floor(u[..., 2] * (IMAGE_SIZE - widths + 1)).astype(np.int64)  # [n, 3]

    covered = np.zeros((n, NUM_SHAPES, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)  # [n, 3, 28, 28]
    for s in range(NUM_SHAPES):
        for k, template in enumerate(TEMPLATES):
            rows = np.flatnonzero(kind[:, s] == k)
            covered[rows, s] = _placed(template, top[rows, s], left[rows, s])
    count = covered.sum(1)  # [n, 28, 28] shapes per pixel
    mask = np.zeros((n, NUM_GROUPS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)  # [n, 4, 28, 28]
    mask[:, 0] = count == 0
    mask[:, 1:] = covered & (count == 1)[:, None]

    def per_group(values: np.ndarray) -> np.ndarray:  # background group 0 gets zeros
        out = np.zeros((n, NUM_GROUPS), dtype=np.float32)
        out[:, 1:] = values
        return out

    return {
        "image": np.where(count > 0, 255, 0).astype(np.uint8)[..., None],  # [n, 28, 28, 1]
        "mask": mask,
        "x": per_group(left),  # [n, 4] left column
        "y": per_group(top),  # [n, 4] top row
        "shape": per_group(kind + 1),  # [n, 4]
        "visibility": np.ones((n, NUM_GROUPS), dtype=np.float32),  # [n, 4]
    }


SPEC = DatasetSpec(
    name="shapes", image_shape=(IMAGE_SIZE, IMAGE_SIZE, 1), num_groups=NUM_GROUPS, make_chunk=make_chunk,
    description="iodine_pyro.data.shapes: 3 outlined squares and triangles, 28x28 binary, "
                "overlaps unscored (Reichert & Serre 2013)",
    categorical=frozenset({"shape"}))
