"""Procedural Multi-dSprites in the three variants of DeepMind's ``multi_dsprites`` files.

Each image is 64 x 64 and holds a few dSprites sprites drawn one after the other, later
sprites occluding earlier ones (Greff et al. 2019, appendix B.2; Burgess et al. 2019):

=========================  ==========  =========  ======  =================================
variant (dataset name)     sprites     groups E   image   colours
=========================  ==========  =========  ======  =================================
``colored_on_grayscale``   2 to 5      6          RGB     sprite: random hue, saturation 1,
(``multi_dsprites``)                                      value 1; background: uniform grey
                                                          of uniform random brightness
``colored_on_colored``     1 to 4      5          RGB     sprites and background: uniform
(``multi_dsprites_                                        random RGB (each channel uniform,
colored_on_colored``)                                     as the official README states)
``binarized``              2 to 3      4          gray    white sprites on black
(``multi_dsprites_
binarized``)
=========================  ==========  =========  ======  =================================

The number of sprites is uniform over its range. Every sprite takes its factors from the
dSprites grid, each uniform and independent: shape (square, ellipse, heart), scale (6 steps
over [0.5, 1]), orientation (40 steps over [0, 2 pi)), x and y (32 steps over [0, 1]).

Drawing (the dSprites archive itself is not available here, so the sprites are drawn
analytically; sizes are a stated choice, not a measurement of the archive):

* A sprite's size unit is ``SPRITE_SIZE`` x 64 x scale pixels (19.2 px at scale 1). In units
  of it the square has side 1, the ellipse has axes 1 x 0.5 (long axis horizontal at
  orientation 0), and the heart is a diamond (a square of side ``a`` turned 45 degrees) with
  two discs of diameter ``a`` centred on the midpoints of its two upper edges, ``a`` chosen
  so that the heart is 1 wide (``a = 1 / (1 + 1/sqrt 2)``; the heart is then 0.914 high),
  tip down at orientation 0. Each shape turns about the centre of its bounding box.
* The centre of a sprite lies at ``(m + (1 - 2 m) x, m + (1 - 2 m) y)`` x 64 pixels
  (column, row) with ``m = POSITION_MARGIN = 0.22``: the largest sprite reaches 13.6 px
  from its centre, so no sprite ever leaves the image, and one position step moves a
  sprite by 1.16 px. ``x`` is horizontal (left to right), ``y`` vertical (top to bottom).
* Orientation turns the sprite counter-clockwise as the image is displayed.
* A pixel belongs to a sprite when the pixel's centre lies inside the shape (no
  anti-aliasing): images are exactly piecewise constant.

Masks and factors follow the official layout: E groups, group 0 the background (the
pixels no sprite covers), groups 1.. the sprites in drawing order with only their visible
pixels; the groups of absent sprites are empty. Factors per group: ``x``, ``y`` (the grid
values in [0, 1]), ``shape`` (1 square, 2 ellipse, 3 heart: the dSprites archive's
values; 0 for the background and absent sprites), ``orientation`` (radians), ``scale``,
``color`` [E, C] in [0, 1] (the background's colour in group 0; exactly the stored pixel
value / 255), and ``visibility`` (1 for the background and every drawn sprite, 0 for absent
ones; a sprite that later sprites hide completely keeps visibility 1 and an empty mask).

Moving sprites (:func:`make_sequence_chunk`, dataset ``multi_dsprites_sequences``): 16-frame
sequences of ``colored_on_grayscale`` scenes whose sprites each move at a random constant
velocity, for sequential IODINE (the paper's appendix A.1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .spec import DatasetSpec

__all__ = [
    "IMAGE_SIZE",
    "SCALES",
    "ORIENTATIONS",
    "POSITIONS",
    "SHAPE_IDS",
    "SPRITE_SIZE",
    "POSITION_MARGIN",
    "Variant",
    "VARIANTS",
    "inside_shape",
    "sprite_mask",
    "make_chunk",
    "NUM_FRAMES",
    "make_sequence_chunk",
]

IMAGE_SIZE = 64
NUM_FRAMES = 16  # frames of a moving-sprites sequence (as Objects Room's camera flights)
SCALES = np.linspace(0.5, 1.0, 6)  # [6]
ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)  # [40]
POSITIONS = np.linspace(0.0, 1.0, 32)  # [32]
SHAPE_IDS = {"square": 1, "ellipse": 2, "heart": 3}
SPRITE_SIZE = 0.3  # side of the square at scale 1, as a fraction of the image
POSITION_MARGIN = 0.22  # sprite centres span [m, 1 - m] of the image

# Heart: a diamond of side a (half-diagonal h) plus two discs of radius a / 2 on the
# midpoints of its upper edges; width h + a = 1.
_HEART_A = 1.0 / (1.0 + 1.0 / np.sqrt(2.0))
_HEART_H = _HEART_A / np.sqrt(2.0)
_HEART_SHIFT = (_HEART_A / 2 - _HEART_H / 2) / 2  # bounding-box centre above the diamond's
_WINDOW = 29  # pixels around a sprite's centre that it can cover (radius <= 13.6 px)


@dataclass(frozen=True)
class Variant:
    """One Multi-dSprites variant.

    Args:
        min_sprites, max_sprites: range of the uniform number of sprites.
        num_groups: mask groups E (background included), as in the official files.
        channels: 3 (RGB) or 1 (binarized).
        colors: ``"hue"`` (saturated sprites on grey), ``"rgb"`` (uniform RGB sprites and
            background) or ``"white"`` (white on black).
    """

    min_sprites: int
    max_sprites: int
    num_groups: int
    channels: int
    colors: str


VARIANTS: dict[str, Variant] = {
    "colored_on_grayscale": Variant(2, 5, 6, 3, "hue"),
    "colored_on_colored": Variant(1, 4, 5, 3, "rgb"),
    "binarized": Variant(2, 3, 4, 1, "white"),
}


def inside_shape(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) lie in the unit shape (u right, v up, in sprite size units,
    origin at the bounding-box centre, before rotation); ``shape`` is a dSprites id and
    broadcasts against u and v."""
    square = (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    ellipse = (u / 0.5) ** 2 + (v / 0.25) ** 2 <= 1.0
    y = v + _HEART_SHIFT  # diamond-centred coordinates
    r2 = (_HEART_A / 2) ** 2
    heart = ((np.abs(u) + np.abs(y) <= _HEART_H)
             | ((u - _HEART_H / 2) ** 2 + (y - _HEART_H / 2) ** 2 <= r2)
             | ((u + _HEART_H / 2) ** 2 + (y - _HEART_H / 2) ** 2 <= r2))
    return np.where(shape == 1, square, np.where(shape == 2, ellipse, heart))


def _centre(position: np.ndarray) -> np.ndarray:
    """Grid position in [0, 1] -> pixel coordinate of the sprite's centre."""
    return IMAGE_SIZE * (POSITION_MARGIN + (1 - 2 * POSITION_MARGIN) * position)


def _inside(shape, scale, orientation, cx, cy, rows, cols) -> np.ndarray:
    """Coverage of pixels (rows, cols) (broadcast against the sprite arrays) by sprites."""
    dx = cols + 0.5 - cx  # right
    dy = cy - (rows + 0.5)  # up
    cos, sin = np.cos(orientation), np.sin(orientation)
    size = SPRITE_SIZE * IMAGE_SIZE * scale
    u = (cos * dx + sin * dy) / size  # rotate by -orientation into the sprite's frame
    v = (-sin * dx + cos * dy) / size
    return inside_shape(shape, u, v)


def sprite_mask(shape: int, scale: float, orientation: float, x: float, y: float) -> np.ndarray:
    """One sprite drawn on the whole 64 x 64 grid: a [64, 64] bool array (reference renderer)."""
    rows = np.arange(IMAGE_SIZE, dtype=np.float64)[:, None]  # [64, 1]
    cols = np.arange(IMAGE_SIZE, dtype=np.float64)[None, :]  # [1, 64]
    return _inside(np.asarray(shape), scale, orientation, _centre(np.float64(x)), _centre(np.float64(y)),
                   rows, cols)  # [64, 64]


def _hsv_to_rgb(hue: np.ndarray) -> np.ndarray:
    """Fully saturated colours of value 1: [...] hue in [0, 1) -> [..., 3] in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * hue[..., None]) % 6.0  # [..., 3]
    return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _to_uint8(colour: np.ndarray) -> np.ndarray:
    """Colours in [0, 1] -> uint8 levels, rounded to the nearest."""
    return np.round(255.0 * colour).astype(np.uint8)


def _pick(u: np.ndarray, k: int) -> np.ndarray:
    """Uniforms in [0, 1) -> uniform integers in 0..k-1."""
    return np.minimum(np.floor(u * k).astype(np.int64), k - 1)


def _shape_scale_orientation(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniforms [n, S, 3] -> a sprite's dSprites shape id (1 to 3), scale and orientation [n, S]."""
    shape = 1 + _pick(u[..., 0], 3)  # [n, S] dSprites id
    scale = SCALES[_pick(u[..., 1], len(SCALES))]  # [n, S]
    orientation = ORIENTATIONS[_pick(u[..., 2], len(ORIENTATIONS))]  # [n, S]
    return shape, scale, orientation


def _colors(variant: Variant, u_sprite: np.ndarray, u_background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 sprite colours [n, S, C] and background colours [n, C] from uniforms."""
    if variant.colors == "hue":
        sprite = _hsv_to_rgb(u_sprite[..., 0])  # [n, S, 3]
        background = np.repeat(u_background[:, :1], 3, axis=1)  # [n, 3] grey
    elif variant.colors == "rgb":
        sprite, background = u_sprite, u_background  # [n, S, 3], [n, 3]
    else:
        sprite = np.ones(u_sprite.shape[:2] + (1,))  # [n, S, 1] white
        background = np.zeros((len(u_background), 1))  # [n, 1] black
    return _to_uint8(sprite), _to_uint8(background)


def _draw(shape, scale, orientation, x, y, present) -> np.ndarray:
    """Label maps [n, 64, 64] (0 background, s + 1 sprite s) of sprites [n, S] drawn in order,
    later ones on top; x, y are positions in [0, 1]."""
    n, S = shape.shape
    cx, cy = _centre(x), _centre(y)  # [n, S] pixel coordinates (column, row)
    offsets = np.arange(_WINDOW) - _WINDOW // 2  # [29]
    top = np.floor(cy).astype(np.int64)[..., None] + offsets  # [n, S, 29] window rows
    left = np.floor(cx).astype(np.int64)[..., None] + offsets  # [n, S, 29] window columns
    covered = _inside(shape[..., None, None], scale[..., None, None], orientation[..., None, None],
                      cx[..., None, None], cy[..., None, None],
                      top[..., :, None].astype(np.float64), left[..., None, :].astype(np.float64))  # [n, S, 29, 29]
    covered &= present[..., None, None]
    labels = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)  # [n, 64, 64] 0 = background
    images = np.arange(n)[:, None, None]  # [n, 1, 1]
    for s in range(S):  # each sprite inside a window around its centre, in drawing order
        rows, cols = top[:, s, :, None], left[:, s, None, :]  # [n, 29, 1], [n, 1, 29]
        window = labels[images, rows, cols]  # [n, 29, 29]
        labels[images, rows, cols] = np.where(covered[:, s], s + 1, window)
    return labels


def make_chunk(rng: np.random.Generator, n: int, variant: str = "colored_on_grayscale") -> dict[str, np.ndarray]:
    """Generate ``n`` Multi-dSprites images of a variant with masks and factors.

    All random numbers of an image come from one row of ``rng.random((n, D))``, so
    ``make_chunk(rng, m)`` is a prefix of ``make_chunk(rng, n)`` for m < n.

    Returns numpy arrays: ``image`` [n, 64, 64, C] uint8, ``mask`` [n, E, 64, 64] uint8 0/1,
    ``x``, ``y``, ``shape``, ``orientation``, ``scale``, ``visibility`` [n, E] float32 and
    ``color`` [n, E, C] float32.
    """
    spec = VARIANTS[variant]
    S, E = spec.max_sprites, spec.num_groups
    u = rng.random((n, 1 + 8 * S + 3))  # [n, D] every random number of each image
    count = spec.min_sprites + _pick(u[:, 0], spec.max_sprites - spec.min_sprites + 1)  # [n]
    per = u[:, 1 : 1 + 8 * S].reshape(n, S, 8)  # [n, S, 8]
    shape, scale, orientation = _shape_scale_orientation(per[:, :, :3])  # [n, S] each
    x = POSITIONS[_pick(per[:, :, 3], len(POSITIONS))]  # [n, S]
    y = POSITIONS[_pick(per[:, :, 4], len(POSITIONS))]  # [n, S]
    sprite_rgb, background_rgb = _colors(spec, per[:, :, 5:8], u[:, -3:])  # [n, S, C], [n, C]
    present = np.arange(S)[None, :] < count[:, None]  # [n, S]

    labels = _draw(shape, scale, orientation, x, y, present)  # [n, 64, 64]
    images = np.arange(n)[:, None, None]  # [n, 1, 1]

    palette = np.concatenate([background_rgb[:, None], sprite_rgb], axis=1)  # [n, E, C] uint8
    palette[:, 1:][~present] = 0
    image = palette[images, labels]  # [n, 64, 64, C] uint8
    mask = (labels[:, None] == np.arange(E, dtype=np.uint8)[None, :, None, None]).astype(np.uint8)  # [n, E, 64, 64]

    def per_group(values: np.ndarray, background: float = 0.0) -> np.ndarray:
        out = np.zeros((n, E) + values.shape[2:], dtype=np.float32)
        out[:, 0] = background
        out[:, 1:] = np.where(present.reshape(present.shape + (1,) * (values.ndim - 2)), values, 0)
        return out

    color = palette.astype(np.float32) / 255.0  # [n, E, C]
    return {
        "image": image,
        "mask": mask,
        "x": per_group(x),  # [n, E]
        "y": per_group(y),  # [n, E]
        "shape": per_group(shape),  # [n, E]
        "orientation": per_group(orientation),  # [n, E]
        "scale": per_group(scale),  # [n, E]
        "color": color,  # [n, E, C]
        "visibility": per_group(np.ones((n, S)), background=1.0),  # [n, E]
    }



def make_sequence_chunk(rng: np.random.Generator, n: int, frames: int = NUM_FRAMES,
                        variant: str = "colored_on_grayscale") -> dict[str, np.ndarray]:
    """Moving sprites: ``n`` sequences of ``frames`` frames in which every sprite moves at
    its own constant velocity (the sequence counterpart of Multi-dSprites).

    A sequence draws its sprites as :func:`make_chunk` draws an image (number, shape,
    scale, orientation, colours), except for positions: each sprite gets a start and an end
    position, uniform in [0, 1]^2 (not on the dSprites grid), and moves by the constant
    velocity v = (end - start) / (frames - 1) per frame, position start + f v in frame f, so
    it never leaves the image. Sprites keep their drawing order (later ones occlude earlier
    ones) and their mask group (s + 1 for sprite s) in every frame: the identity a tracker
    has to keep.

    Returns numpy arrays: ``image`` [n, F, 64, 64, C] uint8, ``mask`` [n, F, E, 64, 64]
    uint8 0/1, ``x``, ``y`` (position in frame 0), ``velocity_x``, ``velocity_y`` (per
    frame), ``shape``, ``orientation``, ``scale``, ``visibility`` [n, E] float32, ``color``
    [n, E, C] float32 and ``frame_visibility`` [n, E, F] float32 (1 where the group has a
    pixel in that frame).
    """
    if frames < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {frames}")
    spec = VARIANTS[variant]
    S, E, F = spec.max_sprites, spec.num_groups, frames
    u = rng.random((n, 1 + 10 * S + 3))  # [n, D] every random number of each sequence
    count = spec.min_sprites + _pick(u[:, 0], spec.max_sprites - spec.min_sprites + 1)  # [n]
    per = u[:, 1 : 1 + 10 * S].reshape(n, S, 10)  # [n, S, 10]
    shape, scale, orientation = _shape_scale_orientation(per[:, :, :3])  # [n, S] each
    start, end = per[:, :, 3:5], per[:, :, 5:7]  # [n, S, 2] (x, y) in [0, 1]
    velocity = (end - start) / (F - 1)  # [n, S, 2] per frame
    sprite_rgb, background_rgb = _colors(spec, per[:, :, 7:10], u[:, -3:])  # [n, S, C], [n, C]
    present = np.arange(S)[None, :] < count[:, None]  # [n, S]

    pos = start[:, None] + np.arange(F)[None, :, None, None] * velocity[:, None]  # [n, F, S, 2]

    def every_frame(a: np.ndarray) -> np.ndarray:  # [n, S] -> [n * F, S]
        return np.repeat(a[:, None], F, axis=1).reshape(n * F, S)

    labels = _draw(every_frame(shape), every_frame(scale), every_frame(orientation),
                   pos[..., 0].reshape(n * F, S), pos[..., 1].reshape(n * F, S),
                   every_frame(present)).reshape(n, F, IMAGE_SIZE, IMAGE_SIZE)  # [n, F, 64, 64]
    palette = np.concatenate([background_rgb[:, None], sprite_rgb], axis=1)  # [n, E, C] uint8
    palette[:, 1:][~present] = 0
    image = palette[np.arange(n)[:, None, None, None], labels]  # [n, F, 64, 64, C] uint8
    groups = np.arange(E, dtype=np.uint8)[None, None, :, None, None]  # [1, 1, E, 1, 1]
    mask = (labels[:, :, None] == groups).astype(np.uint8)  # [n, F, E, 64, 64]

    def per_group(values: np.ndarray, background: float = 0.0) -> np.ndarray:
        out = np.zeros((n, E), dtype=np.float32)
        out[:, 0] = background
        out[:, 1:] = np.where(present, values, 0)
        return out

    return {
        "image": image,
        "mask": mask,
        "x": per_group(start[..., 0]),  # [n, E]
        "y": per_group(start[..., 1]),  # [n, E]
        "velocity_x": per_group(velocity[..., 0]),  # [n, E]
        "velocity_y": per_group(velocity[..., 1]),  # [n, E]
        "shape": per_group(shape),  # [n, E]
        "orientation": per_group(orientation),  # [n, E]
        "scale": per_group(scale),  # [n, E]
        "color": palette.astype(np.float32) / 255.0,  # [n, E, C]
        "visibility": per_group(np.ones((n, S)), background=1.0),  # [n, E]
        "frame_visibility": mask.any(axis=(3, 4)).transpose(0, 2, 1).astype(np.float32),  # [n, E, F]
    }


def _spec(name: str, variant: str, description: str, **kw) -> DatasetSpec:
    v = VARIANTS[variant]
    return DatasetSpec(name=name, image_shape=(IMAGE_SIZE, IMAGE_SIZE, v.channels), num_groups=v.num_groups,
                       make_chunk=functools.partial(make_chunk, variant=variant), description=description, **kw)


SPECS = (
    _spec("multi_dsprites", "colored_on_grayscale",
          "iodine_pyro.data.dsprites: 2-5 saturated dSprites on a grey background, 64x64, "
          "as multi_object_datasets' multi_dsprites colored_on_grayscale"),
    _spec("multi_dsprites_colored_on_colored", "colored_on_colored",
          "iodine_pyro.data.dsprites: 1-4 random-RGB dSprites on a random-RGB background, "
          "64x64, as multi_object_datasets' multi_dsprites colored_on_colored"),
    _spec("multi_dsprites_binarized", "binarized",
          "iodine_pyro.data.dsprites: 2-3 white dSprites on black, 64x64x1, "
          "as multi_object_datasets' multi_dsprites binarized", factor_dims={"color": ("gray",)}),
    DatasetSpec(
        name="multi_dsprites_sequences", image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        num_groups=VARIANTS["colored_on_grayscale"].num_groups, make_chunk=make_sequence_chunk,
        description="iodine_pyro.data.dsprites: 16-frame sequences of 2-5 saturated dSprites on grey, "
                    "each moving at its own constant velocity, 64x64",
        frames=NUM_FRAMES, factor_dims={"color": ("rgb",), "frame_visibility": ("frame",)}),
)
