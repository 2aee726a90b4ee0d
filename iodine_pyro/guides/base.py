"""What every guide of the IODINE model is: the contract the rest of the package relies on.

A guide is an `nn.Module` and a Pyro guide program. Built as ``cls(model, cfg)`` with the
`IodineModel` it serves (held by reference: the model owns the decoder and its memo), it

* samples one latent site per decoder pass, ``t{t}/z`` of batch shape [B, K] and event
  [n_z], in the plates ``images`` x ``slots`` (`site_plates`), scaled by `step_scale`
  (the model's own sites match) (`Guide.sample`);
* runs under enclosing vectorised plates (``Predictive(..., parallel=True)``, vectorised
  particles): its sites and outputs then have their dimensions on the left, and each
  sample is its own run of the guide;
* hands each decoding of its samples to the model (`IodineModel.remember`), so that the
  model's `decode` of the same sample tensor costs nothing;
* returns one `Step` per decoder pass: the posterior parameters, the sample, its decoding.

Its class attributes say what it can do, and commands ask them instead of its name:
`refines` (its number of steps is chosen at run time, beyond the trained T),
`can_change_slots` (it runs with another K than it was trained with), `reads_sequences`
(it takes [B, F, C, H, W] sequences, one step per frame).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch
import torch.nn as nn
from torch.distributions import Normal

import pyro
from pyro.contrib.autoname import scope

from ..models.generative import Decoded, IodineModel, Plates, step_scale
from .refinement import posterior_scale

if TYPE_CHECKING:
    from ..config import Config


class Step(NamedTuple):
    """What one step of a guide saw: its posterior parameters, sample and decoding."""

    lam: torch.Tensor          # [B, K, 2 n_z]
    z: torch.Tensor            # [B, K, n_z]
    decoded: Decoded           # means [B, K, C, H, W], mask_logits [B, K, H, W]


class Guide(nn.Module):
    """Base class of the guides: the contract (see the module docstring).

    Subclasses set `kind` and the capability flags, and implement `weights` and `forward`
    (and `posterior` when theirs is not a diagonal Normal of ``guide.posterior_scale``).
    """

    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""          # what its posterior is, in a line (posterior files)
    refines: ClassVar[bool] = False
    can_change_slots: ClassVar[bool] = False
    reads_sequences: ClassVar[bool] = False
    amp_dtype: torch.dtype | None = None     # autocast dtype of the guide's networks (Iodine.use_fast_paths)

    normal: ClassVar[type] = pyro.distributions.Normal         # the posterior's distribution class

    def __init__(self, model: IodineModel, cfg: "Config"):
        super().__init__()
        self.__dict__["model"] = model        # a reference, not a child module
        self.cfg, self.n_z = cfg.guide, cfg.model.latent_dim

    def weights(self, num_iters: int | None = None, sequence: bool = False) -> list[float]:
        """The loss weight of each of the guide's decoder passes (`num_iters` refinement
        steps, or frames of a `sequence`; default: as trained)."""
        raise NotImplementedError

    def posterior(self, lam: torch.Tensor) -> Normal:
        """q(z | lambda) with batch shape [B, K, n_z]: lambda = (mean, scale parameter s)."""
        loc, s = lam.split(self.n_z, -1)                        # [B, K, n_z] each
        return self.normal(loc, posterior_scale(s, self.cfg.posterior_scale))

    @staticmethod
    def sample(t: int, weight: float, q: Normal, plates: Plates, kl_scale: float = 1.0) -> torch.Tensor:
        """The latent site ``t{t}/z`` of step t, drawn from q (batch [..., B, K, n_z]) in the
        run's `Plates`, scaled as the model's (`step_scale`): its value, [..., B, K, n_z]."""
        B = plates.images.size
        with plates.images, plates.slots, scope(prefix=f"t{t}"), step_scale(weight, B, kl_scale):
            return pyro.sample("z", q.to_event(1))

    def hand_over(self, z: torch.Tensor, decoded: Decoded, training: bool) -> Decoded:
        """Give the model the decoding of sample `z` (its `decode(z)` then costs nothing);
        at inference, detached, so that no step keeps another's graph."""
        if not training:
            decoded = Decoded(decoded.means.detach(), decoded.mask_logits.detach())
        self.model.remember(z, decoded)
        return decoded

    def forward(self, x: torch.Tensor, weights: list[float] | None = None, batch_size: int | None = None,
                num_slots: int | None = None, kl_scale: float = 1.0) -> list[Step]:
        raise NotImplementedError
