"""Datasets for IODINE: procedural generators, the on-disk zarr format, and batches.

* :func:`generate` writes a registered procedural dataset (:data:`GENERATORS`) to a chunked,
  compressed zarr store; :func:`open_dataset` opens one lazily and validates it.
* :class:`Batches` streams shuffled, resumable training batches; :func:`load_images` reads a
  contiguous range for evaluation.
* :func:`read_examples` reads DeepMind's official TFRecord files without TensorFlow.

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
)
from .tfrecord import read_examples

__all__ = [
    "DatasetError",
    "GENERATORS",
    "GeneratorSpec",
    "generate",
    "open_dataset",
    "Batches",
    "load_images",
    "read_examples",
    "CHUNK_SIZE",
    "FORMAT",
    "FORMAT_VERSION",
]
