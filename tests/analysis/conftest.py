"""Fixtures of the analysis tests (metrics, posterior, compare, figures)."""

import pytest


@pytest.fixture(scope="module")
def runs(tiny_runs):
    """The tiny iterative and amortized runs every analysis module reads."""
    return tiny_runs
