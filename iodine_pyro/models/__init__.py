"""The generative model: prior over slot latents, decoders, pixel mixture likelihood."""

from .decoders import DeconvDecoder, SpatialBroadcastDecoder, coordinate_grid
from .iodine import Decoded, IodineModel, step_scale, step_weights
from .likelihood import PixelMixture, mixture_terms

__all__ = ["Decoded", "DeconvDecoder", "IodineModel", "PixelMixture", "SpatialBroadcastDecoder",
           "coordinate_grid", "mixture_terms", "step_scale", "step_weights"]
