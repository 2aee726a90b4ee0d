"""The description of a dataset, which each generator module gives for its datasets.

Everything the rest of the package needs to know about a dataset is here: the image
shape, the mask groups and how many of them are background (dropped by FG-ARI), whether
it holds sequences, its factors and which of them are categorical, and how to generate a
chunk of it. `iodine_pyro.data.registry` collects the descriptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# How to install the renderers of the 3D datasets (the optional ``render`` extra).
RENDER_HINT = 'pip install -e ".[render]" in a clone of iodine-pyro (from an index: pip install "iodine-pyro[render]")'


@dataclass(frozen=True)
class DatasetSpec:
    """One procedural dataset.

    Args:
        name: its name (``--dataset``, the store's ``dataset`` attribute).
        image_shape: (height, width, channels) of one image (of one frame).
        num_groups: mask groups per image, background groups included.
        make_chunk: ``make_chunk(rng, n)`` -> dict of numpy arrays with a leading axis of
            length n: ``image`` [n, H, W, C] (or [n, F, H, W, C]) uint8, ``mask``
            [n, G, H, W] (or [n, F, G, H, W]) uint8 0/1, and per-group factors [n, G] or
            [n, G, k].
        description: a short description, stored as the ``generator`` attribute.
        background_groups: leading mask groups that are background (FG-ARI drops them).
        frames: frames per sequence, or None for single images.
        factor_dims: names of the trailing dims of factors with more than 2 dims.
        categorical: factors whose values are categories (drawn with a discrete palette).
    """

    name: str
    image_shape: tuple[int, int, int]
    num_groups: int
    make_chunk: Callable[[np.random.Generator, int], dict[str, np.ndarray]]
    description: str
    background_groups: int = 1
    frames: int | None = None
    factor_dims: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"color": ("rgb",)})
    categorical: frozenset[str] = frozenset({"shape", "color"})

    @property
    def sequence(self) -> bool:
        return self.frames is not None
