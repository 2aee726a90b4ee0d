"""Procedural Tetrominoes, matching DeepMind's official ``tetrominoes`` dataset.

The official file holds 35 x 35 RGB images of 3 Tetris pieces on a black background (Greff
et al. 2019). This module regenerates the same distribution; every rule below was read off
the official records (see ``tests/data/test_data.py``, which checks them against the real file
when it is available):

* a piece is 4 blocks of 5 x 5 pixels (100 pixels) in one of the 19 fixed tetromino shapes
  (all rotations of the 7 pieces), placed at any pixel offset with the whole piece inside
  the image; pieces may touch each other and the border but never overlap;
* its colour is one of the 6 RGB colours whose channels are 0 or 1 and not all equal; colours
  may repeat within an image;
* each block is shaded with the same bevel pattern: pixel = colour (0/1) x :data:`BEVEL`;
* masks: 4 groups, group 0 the background, groups 1..3 the pieces in drawing order;
* factors per group (the background group gets zeros): ``x`` = top row of the piece's
  bounding box, ``y`` = its left column (x is the row), ``shape`` = official shape id,
  ``color`` = RGB in {0, 1}, ``visibility`` = 1 for all 4 groups, background included.

Shape ids: the official data numbers the 19 shapes 1..19 (0 is the background's value).
Ids 2, 3, 5, 6, 7, 9-19 appear in the official sample and their shapes are taken from it;
ids 1, 4 and 8 do not appear and are assigned to the 3 remaining shapes by the pattern of
the observed ids (1 and 2 the I piece, 3-6 the flat L/J pieces, 7-10 the upright ones):
see :data:`OBSERVED_SHAPE_IDS`. The paper speaks of 17 shapes; the data has 19.

Sampling: shape, colour and position of each piece are uniform and independent; an image
whose pieces overlap is redrawn as a whole (rejection sampling, vectorised over a chunk),
so the 3 pieces are exchangeable. How the original generator resolved overlaps is not
known.
"""

from __future__ import annotations

import numpy as np

from .spec import DatasetSpec

__all__ = [
    "IMAGE_SIZE",
    "NUM_PIECES",
    "NUM_GROUPS",
    "BLOCK",
    "BEVEL",
    "COLORS",
    "SHAPES",
    "OBSERVED_SHAPE_IDS",
    "ASSUMED_SHAPE_IDS",
    "make_chunk",
    "shape_blocks",
]

IMAGE_SIZE = 35
NUM_PIECES = 3
NUM_GROUPS = NUM_PIECES + 1
BLOCK = 5

# Shading of every 5 x 5 block, uint8 levels (rows top to bottom).
BEVEL = np.array(
    [
        [191, 255, 255, 255, 223],
        [127, 159, 159, 159, 191],
        [127, 159, 159, 159, 191],
        [127, 159, 159, 159, 191],
        [95, 63, 63, 63, 127],
    ],
    dtype=np.uint8,
)  # [5, 5]

# The 6 colours with channels in {0, 1}, not all equal.
COLORS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.uint8
)  # [6, 3]

# Official shape id -> picture of the piece in blocks ('#' filled), top row first.
SHAPES: dict[int, tuple[str, ...]] = {
    1: ("####",),
    2: ("#", "#", "#", "#"),
    3: ("###", "#.."),
    4: ("#..", "###"),
    5: ("..#", "###"),
    6: ("###", "..#"),
    7: ("##", ".#", ".#"),
    8: (".#", ".#", "##"),
    9: ("##", "#.", "#."),
    10: ("#.", "#.", "##"),
    11: ("##.", ".##"),
    12: (".##", "##."),
    13: (".#", "##", "#."),
    14: ("#.", "##", ".#"),
    15: (".#.", "###"),
    16: ("###", ".#."),
    17: (".#", "##", ".#"),
    18: ("#.", "##", "#."),
    19: ("##", "##"),
}
OBSERVED_SHAPE_IDS = frozenset({2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19})
ASSUMED_SHAPE_IDS = frozenset(SHAPES) - OBSERVED_SHAPE_IDS


def shape_blocks(shape_id: int) -> list[tuple[int, int]]:
    """(row, column) block offsets of a shape relative to its bounding box's top-left."""
    return [(r, c) for r, row in enumerate(SHAPES[shape_id]) for c, ch in enumerate(row) if ch == "#"]


def _templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-shape pixel offsets, bevel levels, and bounding-box sizes in pixels."""
    ids = sorted(SHAPES)
    offsets = np.zeros((len(ids), 4 * BLOCK * BLOCK, 2), dtype=np.int64)  # [19, 100, (row, col)]
    levels = np.zeros((len(ids), 4 * BLOCK * BLOCK), dtype=np.uint8)  # [19, 100]
    sizes = np.zeros((len(ids), 2), dtype=np.int64)  # [19, (height, width)]
    rows, cols = np.mgrid[:BLOCK, :BLOCK]  # [5, 5] each
    for i, shape_id in enumerate(ids):
        blocks = shape_blocks(shape_id)
        for b, (br, bc) in enumerate(blocks):
            pixels = slice(b * BLOCK * BLOCK, (b + 1) * BLOCK * BLOCK)
            offsets[i, pixels, 0] = (br * BLOCK + rows).ravel()
            offsets[i, pixels, 1] = (bc * BLOCK + cols).ravel()
            levels[i, pixels] = BEVEL.ravel()
        sizes[i] = [BLOCK * len(SHAPES[shape_id]), BLOCK * len(SHAPES[shape_id][0])]
    return offsets, levels, sizes, np.array(ids, dtype=np.int64)


_OFFSETS, _LEVELS, _SIZES, _IDS = _templates()
_DRAW = 128  # candidate images drawn per rejection round


def _candidates(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Draw n images' worth of pieces independently (overlaps not yet rejected)."""
    shape = rng.integers(0, len(_IDS), size=(n, NUM_PIECES))  # [n, 3] template index
    color = rng.integers(0, len(COLORS), size=(n, NUM_PIECES))  # [n, 3]
    span = IMAGE_SIZE - _SIZES[shape]  # [n, 3, 2] largest top-left row / column
    top_left = rng.integers(0, span + 1)  # [n, 3, 2] uniform, piece inside the image
    pixels = top_left[:, :, None, :] + _OFFSETS[shape]  # [n, 3, 100, 2]
    flat = pixels[..., 0] * IMAGE_SIZE + pixels[..., 1]  # [n, 3, 100]
    return {"shape": shape, "color": color, "top_left": top_left, "flat": flat}


def _no_overlap(flat: np.ndarray) -> np.ndarray:
    """True for the images whose pieces cover distinct pixels."""
    ordered = np.sort(flat.reshape(len(flat), -1), axis=1)  # [n, 300]
    return (np.diff(ordered, axis=1) != 0).all(axis=1)  # [n]


def _render(pieces: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Images, masks and factors of accepted pieces."""
    n = len(pieces["shape"])
    rows = np.arange(n)[:, None]  # [n, 1]
    flat = pieces["flat"].reshape(n, -1)  # [n, 300]
    rgb = COLORS[pieces["color"]]  # [n, 3, 3]
    values = rgb[:, :, None, :] * _LEVELS[pieces["shape"]][..., None]  # [n, 3, 100, 3] uint8
    image = np.zeros((n, IMAGE_SIZE * IMAGE_SIZE, 3), dtype=np.uint8)  # [n, 1225, 3]
    image[rows, flat] = values.reshape(n, -1, 3)
    labels = np.zeros((n, IMAGE_SIZE * IMAGE_SIZE), dtype=np.uint8)  # [n, 1225]
    labels[rows, flat] = np.repeat(np.arange(1, NUM_GROUPS, dtype=np.uint8), 4 * BLOCK * BLOCK)
    labels = labels.reshape(n, IMAGE_SIZE, IMAGE_SIZE)  # [n, 35, 35]
    mask = (labels[:, None] == np.arange(NUM_GROUPS, dtype=np.uint8)[None, :, None, None])  # [n, 4, 35, 35]

    def per_group(values: np.ndarray) -> np.ndarray:  # background group 0 gets zeros
        out = np.zeros((n, NUM_GROUPS) + values.shape[2:], dtype=np.float32)
        out[:, 1:] = values
        return out

    return {
        "image": image.reshape(n, IMAGE_SIZE, IMAGE_SIZE, 3),  # [n, 35, 35, 3] uint8
        "mask": mask.astype(np.uint8),  # [n, 4, 35, 35] uint8 0/1
        "x": per_group(pieces["top_left"][..., 0]),  # [n, 4] top row
        "y": per_group(pieces["top_left"][..., 1]),  # [n, 4] left column
        "shape": per_group(_IDS[pieces["shape"]]),  # [n, 4] official id, 0 = background
        "color": per_group(rgb),  # [n, 4, 3]
        "visibility": np.ones((n, NUM_GROUPS), dtype=np.float32),  # [n, 4]
    }


def make_chunk(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Generate ``n`` Tetrominoes images with masks and factors.

    Returns numpy arrays: ``image`` [n, 35, 35, 3] uint8, ``mask`` [n, 4, 35, 35] uint8 0/1,
    ``x``, ``y``, ``shape``, ``visibility`` [n, 4] float32 and ``color`` [n, 4, 3] float32.
    """
    accepted: list[dict[str, np.ndarray]] = []
    missing = n
    while missing > 0:  # fixed-size draws: make_chunk(rng, m) is a prefix of make_chunk(rng, n > m)
        batch = _candidates(rng, _DRAW)
        keep = np.flatnonzero(_no_overlap(batch["flat"]))[:missing]
        accepted.append({k: v[keep] for k, v in batch.items()})
        missing -= len(keep)
    pieces = {k: np.concatenate([a[k] for a in accepted]) for k in accepted[0]}
    return _render(pieces)


SPEC = DatasetSpec(
    name="tetrominoes", image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), num_groups=NUM_GROUPS, make_chunk=make_chunk,
    description="iodine_pyro.data.tetrominoes: 3 non-overlapping bevelled tetrominoes, 35x35, "
                "as DeepMind's multi_object_datasets")
