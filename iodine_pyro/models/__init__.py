"""The generative model: prior over slot latents, decoders, pixel mixture likelihood."""

from .decoders import DeconvDecoder, SpatialBroadcastDecoder, coordinate_grid
from .generative import Decoded, IodineModel, frame_weights, loss_weights, step_scale
from .likelihood import PixelMixture, mixture_terms

__all__ = ["Decoded", "DeconvDecoder", "IodineModel", "PixelMixture", "SpatialBroadcastDecoder",
           "coordinate_grid", "frame_weights", "loss_weights", "mixture_terms", "step_scale"]
