"""The one exception type raised for unreadable or invalid dataset files.

Kept in its own module so that every data module (TFRecord reader, generators, the zarr
store) can raise it without importing each other.
"""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """A dataset file or store is missing, truncated, corrupted or not in the expected format.

    The message is a single line that names the offending path.
    """
