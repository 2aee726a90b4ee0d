"""Datasets for IODINE: procedural generators, the on-disk zarr format, and batches.

* :func:`generate` writes a registered procedural dataset (:data:`GENERATORS`) to a chunked,
  compressed zarr store; :func:`open_dataset` opens one lazily and validates it.
* :class:`Batches` streams shuffled, resumable training batches; :func:`load_images` reads a
  contiguous range for evaluation.
* :func:`read_examples` reads DeepMind's official TFRecord files without TensorFlow;
  :func:`convert_tfrecords` (:mod:`iodine_pyro.data.convert`) turns one into a store.

Every file-level failure raises :class:`DatasetError` (a ``ValueError``) with a one-line
message naming the path.
"""

from .errors import DatasetError
from .store import (
    CHUNK_SIZE,
    FORMAT,
    FORMAT_VERSION,
    GENERATORS,
    Batches,
    GeneratorSpec,
    generate,
    load_images,
    open_dataset,
    write_chunks,
)
from .tfrecord import read_examples
from .convert import convert as convert_tfrecords

__all__ = [
    "DatasetError",
    "GENERATORS",
    "GeneratorSpec",
    "generate",
    "open_dataset",
    "Batches",
    "load_images",
    "read_examples",
    "convert_tfrecords",
    "write_chunks",
    "CHUNK_SIZE",
    "FORMAT",
    "FORMAT_VERSION",
]
