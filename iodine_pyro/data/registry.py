"""The datasets this package generates: one description (`DatasetSpec`) per dataset.

A new dataset is its generator module (with its `DatasetSpec`), one line here and its
architecture in `iodine_pyro.config.ARCHITECTURES` (a test checks that the registries
agree). Importing the generator modules is cheap: the renderers of Objects Room (MuJoCo)
and CLEVR (Mitsuba) are imported only when a chunk is generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import clevr, dsprites, objects_room, shapes, tetrominoes
from .errors import DatasetError
from .spec import DatasetSpec

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    tetrominoes.SPEC,
    *dsprites.SPECS,
    shapes.SPEC,
    *objects_room.SPECS,
    *clevr.SPECS,
)}

__all__ = ["DATASETS", "background_groups", "dataset_spec", "check_matches_spec"]


def dataset_spec(name: str) -> DatasetSpec:
    """The description of dataset `name`; DatasetError naming the choices otherwise."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def background_groups(attrs: Mapping[str, Any]) -> int:
    """Leading mask groups of a store that are background (FG-ARI drops them): the store's
    ``background_groups`` attribute (converted official files record it), else its
    dataset's description, else 1 (group 0)."""
    if "background_groups" in attrs:
        return int(attrs["background_groups"])
    spec = DATASETS.get(str(attrs.get("dataset", "")))
    return spec.background_groups if spec is not None else 1


def check_matches_spec(ds, where: str) -> None:
    """A store of a generated dataset has that dataset's image shape and mask groups (a
    converted official file keeps its own number of groups, e.g. CLEVR6: 11)."""
    spec = DATASETS.get(str(ds.attrs.get("dataset", "")))
    if spec is None:
        return
    shape = (ds.sizes["height"], ds.sizes["width"], ds.sizes["channel"])
    groups_differ = ds.sizes["group"] != spec.num_groups and "converted_from" not in ds.attrs
    if shape != spec.image_shape or groups_differ:
        raise DatasetError(f"{where}: images {shape} with {ds.sizes['group']} groups do not match "
                           f"{spec.name} ({spec.image_shape}, {spec.num_groups} groups)")
