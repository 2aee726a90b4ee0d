"""Guides (variational posteriors) for the IODINE model."""

from .iodine import IterativeGuide, Step, leave_one_out
from .refinement import InputNorm, RefinementNetwork

__all__ = ["InputNorm", "IterativeGuide", "RefinementNetwork", "Step", "leave_one_out"]
