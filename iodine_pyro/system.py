"""The IODINE system: model + guide + objective behind one small facade.

    system = Iodine(make_config("tetrominoes"))
    loss = system.loss(x)            # sum_t w_t L_t, differentiable (Pyro TraceMeanField_ELBO)
    steps = system.infer(x)          # per refinement step: posterior, masks, reconstruction, KL

Sequences x [B, F, C, H, W] take the same calls: one refinement step per frame (the first
len(weights) frames), each step scoring its frame and predicting the next (appendix A.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import PyroOptim
from torch.distributions import kl_divergence

from .guides import build_guide
from .guides.base import Guide, Step
from .models.generative import IodineModel, frame
from .nets import initialise

if TYPE_CHECKING:
    from .config import Config


class StepResult(NamedTuple):
    """Everything evaluation needs from one refinement step (all detached)."""

    lam: torch.Tensor          # [B, K, 2 n_z] posterior parameters
    z: torch.Tensor            # [B, K, n_z] the sample decoded at this step
    means: torch.Tensor        # [B, K, C, H, W]
    mask_logits: torch.Tensor  # [B, K, H, W]
    masks: torch.Tensor        # [B, K, H, W] softmax over slots
    recon: torch.Tensor        # [B, C, H, W] sum_k pi_k mu_k
    nll: torch.Tensor          # [B] -log p(x | z)
    kl: torch.Tensor           # [B] KL(q || p) summed over slots and dims


class Iodine(nn.Module):
    """Model, guide and loss of IODINE.

    Args:
        cfg: a `Config` (see `iodine_pyro.config.make_config`).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.model = IodineModel(cfg.model)
        self.guide: Guide = build_guide(self.model, cfg)
        self.elbo = TraceMeanField_ELBO()
        self.model.recompute = cfg.guide.recompute
        initialise(self, cfg.train.init)

    def weights(self, num_iters: int | None = None, sequence: bool = False) -> list[float]:
        """The per-decoder-pass loss weights of the guide for `num_iters` refinement
        iterations (default T); for a `sequence`, `num_iters` counts frames, one decoder
        pass each."""
        return self.guide.weights(num_iters, sequence)

    def clip(self, x: torch.Tensor, num_iters: int | None = None) -> tuple[torch.Tensor, list[float]]:
        """(x, weights) for images; for sequences the first frames, one per weight."""
        if x.dim() != 5:
            return x, self.weights(num_iters)
        if not self.guide.reads_sequences:
            raise ValueError(f"sequences need a guide that reads one frame per step (the iterative "
                             f"guide); the {self.guide.kind} guide does not")
        weights = self.weights(num_iters, sequence=True)
        if x.shape[1] < len(weights):
            raise ValueError(f"{len(weights)} frames needed ({self.cfg.guide.loss_weights} weights for "
                             f"{num_iters or self.cfg.guide.num_iters} steps), the sequences have "
                             f"{x.shape[1]}; pass fewer `num_iters`")
        return x[:, :len(weights)], weights

    def check_batch(self, x: torch.Tensor) -> None:
        """Raise ValueError (one line) unless x is a finite [B, C, H, W] batch (or a batch of
        sequences [B, F, C, H, W]) in [0, 1] of the configured channels and size."""
        m = self.cfg.model
        want = (m.image_channels, *m.image_size)
        if not torch.is_tensor(x) or x.dim() not in (4, 5) or tuple(x.shape[-3:]) != want:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"expected images of shape [B, {want[0]}, {want[1]}, {want[2]}] (or sequences "
                             f"[B, F, {want[0]}, {want[1]}, {want[2]}]) for {self.cfg.dataset}, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or infinite pixels")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")

    def loss(self, x: torch.Tensor, num_iters: int | None = None, check: bool = True,
             kl_scale: float = 1.0) -> torch.Tensor:
        """sum_t w_t L_t with L_t the per-image mean negative ELBO of step t (analytic KL).

        `check=False` skips `check_batch` (its value checks wait for the device);
        `kl_scale` weighs the KL terms (beta; 1 is the ELBO)."""
        return self.objective(x, num_iters, check, kl_scale)[0]

    def objective(self, x: torch.Tensor, num_iters: int | None = None, check: bool = True,
                  kl_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss of `loss`, the final step's reconstruction MSE on this batch, detached).

        The MSE comes from the decoder pass the loss scored: it costs no extra pass."""
        if check:
            self.check_batch(x)
        x, weights = self.clip(x, num_iters)
        scored = []

        def model(*args, **kwargs):
            scored.append(self.model(*args, **kwargs))   # the model's per-step `Decoded`

        loss = self.elbo.differentiable_loss(model, self.guide, x, weights, None, None, kl_scale)
        last = scored[-1][-1]
        with torch.no_grad():
            mse = (last.reconstruction() - frame(x, len(weights) - 1)).pow(2).mean()
        return loss, mse

    def forward(self, x: torch.Tensor, num_iters: int | None = None, check: bool = True,
                kl_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """`objective`, so that the system can be wrapped in `DistributedDataParallel`."""
        return self.objective(x, num_iters, check, kl_scale)

    def use_fast_paths(self, amp: torch.dtype | None = None, channels_last: bool = False) -> "Iodine":
        """Run the decoder and the guide's networks under autocast to `amp` (e.g.
        torch.bfloat16; None: full precision) and keep conv weights channels-last.

        Only the networks run in `amp`: their outputs are cast back to the input dtype,
        so the likelihood, the KL and the guide's gradient inputs stay in float32.
        """
        self.model.amp_dtype = amp
        self.guide.amp_dtype = amp
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    @property
    def precision(self) -> str:
        """What the networks compute in: ``"bfloat16"`` under autocast, else their
        parameters' dtype (the likelihood, KL and the guide's gradient inputs stay in that
        dtype either way)."""
        dtype = self.model.amp_dtype or next(self.parameters()).dtype
        return str(dtype).removeprefix("torch.")

    @torch.no_grad()
    def infer(self, x: torch.Tensor, num_iters: int | None = None,
              num_slots: int | None = None) -> list[StepResult]:
        """Run the guide on images `x` [B, C, H, W] and summarise every refinement step.

        `num_iters` may exceed the trained T and `num_slots` differ from the trained K.
        On sequences [B, F, C, H, W] step t is frame t and is summarised against it.
        The guide keeps no activations of earlier steps.
        """
        self.check_batch(x)
        x, weights = self.clip(x, num_iters)
        steps: list[Step] = self.guide(x, weights, num_slots=num_slots)
        return [self.summarize(frame(x, t), s) for t, s in enumerate(steps)]

    def summarize(self, x: torch.Tensor, step: Step) -> StepResult:
        """The results of one step against the image x [B, C, H, W] it was scored on."""
        d = step.decoded
        terms = self.model.terms(x, d)
        masks = terms.log_masks.exp()                                   # [B, K, H, W]
        recon = d.reconstruction(masks)                                 # [B, C, H, W]
        q = self.guide.posterior(step.lam)
        prior = self.model.prior(x.shape[0], step.lam.shape[1], like=x)
        kl = kl_divergence(q, prior).sum((1, 2))                        # [B]
        nll = -terms.log_px.sum((1, 2))                                 # [B]
        return StepResult(step.lam, step.z, d.means, d.mask_logits, masks, recon, nll, kl)


class GlobalClipAdam(PyroOptim):
    """Adam after clipping the global gradient norm of a step's parameters (appendix C).

    Pyro's ``ClippedAdam`` clips each parameter's gradient on its own; IODINE clips the norm
    of all of them together, so this clips first and then lets `PyroOptim` step one Adam per
    parameter (Adam is elementwise: the same update as one Adam over all of them)."""

    def __init__(self, optim_args: dict, clip_norm: float):
        super().__init__(torch.optim.Adam, optim_args)
        self.clip_norm = float(clip_norm)

    def __call__(self, params, *args, **kwargs) -> None:
        params = [p for p in params if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        super().__call__(params, *args, **kwargs)


def svi(system: Iodine, lr: float | None = None, num_iters: int | None = None) -> SVI:
    """A ``pyro.infer.SVI`` for `system`: its model and guide over T steps, its
    ``TraceMeanField_ELBO``, Adam (``train.lr``, betas) with ``train.clip_norm``.

    ``svi(system).step(x)`` is the update of `iodine_pyro.training.step.train_step` at a fixed
    learning rate; ``fit`` runs that lower-level form because it also needs the warm-up and
    decay of the learning rate, the non-finite guard, GECO's KL weight and DDP."""
    t = system.cfg.train

    def model(x: torch.Tensor):
        x, weights = system.clip(x, num_iters)
        return system.model(x, weights)

    def guide(x: torch.Tensor):
        x, weights = system.clip(x, num_iters)
        return system.guide(x, weights)

    optim = GlobalClipAdam({"lr": t.lr if lr is None else lr, "betas": (t.beta1, t.beta2)}, t.clip_norm)
    return SVI(model, guide, optim, loss=system.elbo)
