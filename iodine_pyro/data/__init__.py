"""Datasets for IODINE: procedural generators, the on-disk zarr format, and batches.

* :data:`DATASETS` (:mod:`iodine_pyro.data.registry`) describes every generated dataset
  (:class:`DatasetSpec`: shape, mask groups, background groups, sequences, factors);
  :func:`generate` writes one to a chunked, compressed zarr store.
* :func:`open_dataset` opens a store lazily and validates it (format, and the shape of
  the dataset it names); :class:`Batches` streams shuffled, resumable training batches;
  :func:`load_images` reads a contiguous range for evaluation.
* :func:`read_examples` reads DeepMind's official TFRecord files without TensorFlow;
  :func:`convert_tfrecords` (:mod:`iodine_pyro.data.convert`) turns one into a store.

Every file-level failure raises :class:`DatasetError` (a ``ValueError``) with a one-line
message naming the path.
"""

from pathlib import Path

import xarray as xr

from .batches import Batches, load_images, object_counts
from .convert import convert as convert_tfrecords
from .errors import DatasetError
from .generate import ensure as ensure_generated
from .generate import generate, generation
from .registry import DATASETS, background_groups, check_matches_spec, dataset_spec
from .spec import DatasetSpec
from .store import (
    CHUNK_SIZE,
    FORMAT,
    FORMAT_VERSION,
    is_sequence,
    is_store,
    open_store,
    write_chunks,
)
from .tfrecord import read_examples

__all__ = [
    "CHUNK_SIZE",
    "DATASETS",
    "FORMAT",
    "FORMAT_VERSION",
    "Batches",
    "DatasetError",
    "DatasetSpec",
    "background_groups",
    "convert_tfrecords",
    "dataset_spec",
    "ensure_generated",
    "generate",
    "generation",
    "is_sequence",
    "is_store",
    "load_images",
    "object_counts",
    "open_dataset",
    "read_examples",
    "write_chunks",
]


def open_dataset(path: str | Path) -> xr.Dataset:
    """Open a store lazily and validate it: its format (`open_store`) and, for a dataset
    generated here, the image shape and mask groups of its description."""
    ds = open_store(path)
    check_matches_spec(ds, str(path))
    return ds
