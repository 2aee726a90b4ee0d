"""IODINE's iterative amortized posterior as a Pyro guide.

    lambda_1 = trainable vector, tiled over images and slots
    for t = 1..T:
        z_t ~ q(z | lambda_t)                     (site f"t{t-1}/z", scaled w_t / B)
        decode z_t; L_t = -ELBO_t (mean over images)
        lambda_{t+1} = lambda_t + f_phi(inputs(x, z_t, dL_t/d(lambda_t, mu, m)), h_t)

The refinement inputs are the rows of `iodine_pyro.guides.inputs.INPUTS` the preset names;
those in ``guide.stop_gradient`` are detached (the gradients, the likelihoods), the others
(means, masks, mask logits, mask posterior, lambda) carry gradient, as in the paper's
table. The gradient inputs are of each image's own -ELBO, so an image's inference does not
depend on the rest of its batch (``guide.grad_reduction = "batch_mean"``: the released
code's gradient of the batch mean). The chain of lambdas is not stop-gradient: training
backpropagates through every step. The last step's refinement is never scored and is not
computed.

At inference (grad disabled by the caller, as in `Predictive` or evaluation) each step
starts from a detached lambda and LSTM state, so no activations of earlier steps are kept,
and the refinement network runs without autograd: only the gradients the refinement
inputs need are computed.

Sequences (appendix A.1): given frames x [B, F, C, H, W], step t reads frame t (its image
input and the gradient of frame t's ELBO); lambda and the LSTM state carry over, so the
refinement network is what tracks the objects from frame to frame.

With ``guide.recompute`` each training step's networks run under `recompute`: their
activations are recomputed in the backward pass instead of stored (appendix A.2).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from torch.distributions import kl_divergence
from torch.distributions.utils import _standard_normal

from ..models.generative import Decoded, IodineModel, autocast, frame, frame_weights, loss_weights, sample_shape, site_plates
from . import ITERATIVE
from .base import Guide, Step
from .inputs import INPUTS, Context, leave_one_out
from .recompute import recompute
from .refinement import InputNorm, RefinementNetwork

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["IterativeGuide", "NoisyNormal", "Step", "leave_one_out"]


class NoisyNormal(dist.Normal):
    """The posterior site's Normal; its reparameterised sample keeps its standard-normal draw.

    ``rsample`` is torch's (z = loc + noise * scale, the same random stream), and stores
    ``noise``: a recomputed step rebuilds exactly this z from lambda. `expand` to the same
    shape (what the ``images`` plate asks) returns the instance itself, which keeps it.
    """

    noise: torch.Tensor | None = None

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) == self.batch_shape:
            return self
        return super().expand(batch_shape, _instance)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        self.noise = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.noise * self.scale


def initial_scale_param(kind: str, prior_var: float) -> float:
    """s such that the initial posterior's sigma equals the prior's."""
    target = prior_var if kind == "sqrt_softplus" else prior_var ** 0.5  # softplus(s) = target
    return math.log(math.expm1(target))


class IterativeGuide(Guide):
    """q(z | x) refined for T steps by a learned network reading the ELBO's gradients.

    Args:
        model: the `IodineModel` whose decoder and likelihood the guide differentiates
            (held by reference, not registered as a submodule).
        cfg: the full `Config`; uses ``cfg.guide`` and the model's shapes.
    """

    kind = ITERATIVE
    normal = NoisyNormal
    description = "q(z | lambda_T) of the final refinement step; each sample re-runs the refinement"
    refines = True
    can_change_slots = True
    reads_sequences = True

    def __init__(self, model: IodineModel, cfg: Config):
        super().__init__(model, cfg)
        g, m = cfg.guide, cfg.model
        rows = [INPUTS[n] for n in g.active_inputs()]
        self.spatial_inputs = [r for r in rows if r.spatial]    # concatenated in this order
        self.vector_inputs = [r for r in rows if not r.spatial]
        self.needs = {r.needs for r in rows if r.needs is not None}   # gradients to compute
        self.stop_gradient = set(g.stop_gradient)
        self.differentiated_gradients = {r.name for r in rows          # gradient inputs the loss
                                         if r.needs is not None and r.name not in self.stop_gradient}
        size = {r.name: r.channels(m.image_channels, self.n_z) for r in rows}
        self.norms = nn.ModuleDict({r.name: InputNorm(size[r.name]) for r in rows if r.layer_norm})
        s0 = initial_scale_param(g.posterior_scale, m.prior_var)
        self.lambda0 = nn.Parameter(torch.cat([torch.zeros(self.n_z), torch.full((self.n_z,), s0)]))
        if g.first_slot_init:                                   # slot 1's own start: a mean drawn from the prior
            mean = torch.randn(self.n_z) * m.prior_var ** 0.5
            self.lambda0_first = nn.Parameter(torch.cat([mean, torch.full((self.n_z,), s0)]))
        self.net = RefinementNetwork(
            spatial_channels=sum(size[r.name] for r in self.spatial_inputs),
            vector_dim=sum(size[r.name] for r in self.vector_inputs), out_dim=2 * self.n_z,
            conv_channels=g.conv_channels, kernel=g.conv_kernel, stride=g.conv_stride,
            mlp=g.mlp, lstm=g.lstm, mlp_linear_last=g.mlp_linear_last)

    def weights(self, num_iters: int | None = None, sequence: bool = False) -> list[float]:
        """``guide.loss_weights`` over `num_iters` steps (default T): `loss_weights`, or
        for a `sequence` of that many frames `frame_weights`."""
        n = num_iters or self.cfg.num_iters
        return frame_weights(self.cfg.loss_weights, n) if sequence else loss_weights(self.cfg.loss_weights, n)

    @property
    def input_names(self) -> list[str]:
        """The refinement inputs in use: image-sized ones in order, then the vectors."""
        return [r.name for r in self.spatial_inputs + self.vector_inputs]

    def initial_lambda(self, x: torch.Tensor, num_slots: int) -> torch.Tensor:
        """lambda_1 [N, K, 2 n_z] of images x [N, C, H, W] (frames [N, F, C, H, W]): the
        trained vector, tiled; with ``guide.first_slot_init`` slot 1 starts from its own.

        A slot of its own start is the guide's half of MONet's and GENESIS's first scope:
        the slots stay exchangeable under the prior, but one enters the refinement apart
        from the others, so one slot can learn to take what no object explains."""
        shared = self.lambda0.expand(x.shape[0], num_slots, 2 * self.n_z)
        if not self.cfg.first_slot_init:
            return shared
        first = self.lambda0_first.expand(x.shape[0], 1, 2 * self.n_z)
        return torch.cat([first, shared[:, 1:]], dim=1)

    def forward(self, x: torch.Tensor, weights: list[float] | None = None,
                batch_size: int | None = None, num_slots: int | None = None,
                kl_scale: float = 1.0) -> list[Step]:
        """Run the T steps on images x [B, C, H, W], or on sequences x [B, F, C, H, W] with
        step t reading frame t (the LSTM state carries over the frames). `kl_scale` scales
        the latent sites as the model's do (the KL's weight).

        Under enclosing vectorised plates of sizes [S...] each of the S x B images runs its
        own refinement: the networks see them as one batch, the sites and the returned
        steps have shape [S..., B, ...]."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("the guide differentiates its ELBO at every step: run it under "
                               "torch.no_grad(), not torch.inference_mode()")
        pyro.module(self.model.pyro_name("guide"), self)
        training = torch.is_grad_enabled()
        weights = weights or self.weights()
        B, K = x.shape[0], num_slots or self.model.cfg.num_slots
        lead = sample_shape()                                   # [S...]: () outside vectorised plates
        x = x.expand(*lead, *x.shape).reshape(-1, *x.shape[1:])   # [N, ...], N = S... x B
        shaped = lambda v: v.view(*lead, B, *v.shape[1:])         # [N, ...] -> [S..., B, ...]
        lam = self.initial_lambda(x, K)                         # lam: [N, K, 2 n_z]
        plates, state, steps = site_plates(B, K), None, []
        first = self.first_graph_step(len(weights)) if training else len(weights)
        for t, w in enumerate(weights):
            last = t == len(weights) - 1
            graph = t >= first                                  # feeds: its update starts the graph
            feeds = training and t == first - 1
            with torch.set_grad_enabled(graph or feeds or not last):   # refinement reads dL/dlambda
                if not graph:                                   # keep no earlier activations
                    lam = lam.detach().requires_grad_(not last)
                q = self.posterior(shaped(lam))                 # batch [S..., B, K, n_z]
                z = self.sample(t, w, q, plates, kl_scale)      # [S..., B, K, n_z]
                flat = lam.shape[:2] + (self.n_z,)              # [N, K, n_z]
                noise = getattr(q, "noise", None)               # the draw, when q drew it
                decoded, delta, state = self.step(frame(x, t), lam, z.reshape(flat),
                                                  None if noise is None else noise.reshape(flat),
                                                  state, last, graph, feeds)
            if not (graph or feeds):
                state = tuple(s.detach() for s in state) if state is not None else None
                delta = delta.detach() if not last else None
            decoded = self.hand_over(z, Decoded(*map(shaped, decoded)), graph)
            steps.append(Step(shaped(lam if graph else lam.detach()), z if graph else z.detach(), decoded))
            if not last:
                lam = lam + delta.view(lam.shape)               # [N, K, 2 n_z]
        return steps

    def first_graph_step(self, num_steps: int) -> int:
        """The first decoder pass that training differentiates: 0 (all of them, the paper),
        or with ``guide.grad_steps`` = n the last n only. The passes before run as at
        inference (no graph kept: cheaper, memory flat in T) and lambda enters the first
        differentiated pass detached, so no gradient crosses into the earlier steps; the
        refinement update that produces it is still trained (its inputs detached)."""
        n = self.cfg.grad_steps
        return 0 if n is None else max(0, num_steps - n)

    def step(self, x: torch.Tensor, lam: torch.Tensor, z: torch.Tensor, noise: torch.Tensor | None,
             state, last: bool, training: bool, feeds: bool = False):
        """One step's networks: decode z and, unless `last`, compute lambda's update.

        Args:
            x: [B, C, H, W] the image (or frame) this step reads.
            lam: [B, K, 2 n_z]; z: [B, K, n_z] its sample; noise: the standard-normal draw
                with z = loc + noise * scale (None when z was given, not drawn).
            state: the refinement network's LSTM state, or None.
            training: keep the graph of this step; `feeds`: not, but train the refinement
                network's update on detached inputs (`first_graph_step`).
        Returns:
            (Decoded, delta [B*K, 2 n_z] or None, state)
        With ``recompute`` (training only) the networks' activations are not kept: they run
        again in the backward pass, from lambda and the noise (`recompute`).
        """
        if not (training and self.cfg.recompute and noise is not None):
            return self.networks(x, lam, z, state, last, training, feeds)
        has_state = state is not None

        def rerun(x, lam, noise, *state):
            q = self.posterior(lam)
            z = q.loc + noise * q.scale                         # bit for bit the sampled z
            decoded, delta, state = self.networks(x, lam, z, state if has_state else None, last, True)
            return (*decoded, *(() if last else (delta, *(state or ()))))

        params = [*self.model.decoder.parameters(), *self.net.parameters(), *self.norms.parameters()]
        out = recompute(rerun, (x, lam, noise, *(state or ())), params)
        decoded = Decoded(*out[:2])                             # [B, K, C, H, W], [B, K, H, W]
        if last:
            return decoded, None, state
        return decoded, out[2], (tuple(out[3:]) or None)

    def networks(self, x, lam, z, state, last: bool, keep_graph: bool, feeds: bool = False):
        """decoder(z), then (unless `last`) f_phi on the stop-gradient refinement inputs
        (with `feeds`, f_phi keeps its graph though its inputs have none)."""
        decoded = self.model.decode(z)                          # [B, K, C, H, W], [B, K, H, W]
        if last:
            return decoded, None, state
        spatial, vector = self.refinement_inputs(x, lam, self.posterior(lam), decoded, keep_graph)
        with torch.set_grad_enabled(keep_graph or feeds):       # no graph at inference
            delta, state = self.refine(spatial, vector, state)  # [B*K, 2 n_z]
        return decoded, delta, state

    def refine(self, spatial: torch.Tensor, vector: torch.Tensor, state):
        """f_phi; under autocast when `amp_dtype` is set, with its outputs back in float32."""
        if self.amp_dtype is None:
            return self.net(spatial, vector, state)
        with autocast(spatial, self.amp_dtype):
            delta, state = self.net(spatial, vector, state)
        if state is not None:
            state = tuple(s.to(spatial.dtype) for s in state)
        return delta.to(spatial.dtype), state

    # -- refinement inputs ---------------------------------------------------------------
    def refinement_inputs(self, x: torch.Tensor, lam: torch.Tensor, q: torch.distributions.Normal, decoded: Decoded,
                          keep_graph: bool, terms=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs of f_phi: ([B*K, C_in, H, W], [B*K, V]), the rows of `INPUTS` in use.

        Rows in ``stop_gradient`` are detached; the others carry gradient when
        `keep_graph` (training). `terms` are the `mixture_terms` of (x, decoded) when the
        caller has them already.
        """
        B, K, C, H, W = decoded.means.shape
        if terms is None:
            terms = self.model.terms(x, decoded)                # log_px [B, H, W], comp, log_masks [B, K, H, W]
        grads = self._loss_gradients(x, lam, q, decoded, terms, keep_graph)
        ctx = Context(x, lam, decoded.means, decoded.mask_logits, terms, grads, self.cfg.mask_posterior)
        with torch.set_grad_enabled(keep_graph):               # at inference: no graph at all
            feats = []
            for row in self.spatial_inputs:
                f = self._compute(row, ctx)                     # [B, K|1, c, H, W]
                f = f.expand(B, K, *f.shape[2:]).reshape(B * K, *f.shape[2:])   # [B*K, c, H, W]
                feats.append(self.norms[row.name](f) if row.layer_norm else f)  # norms are trained
            spatial = torch.cat(feats, 1)                       # [B*K, C_in, H, W]
            vecs = []
            for row in self.vector_inputs:
                v = self._compute(row, ctx).reshape(B * K, -1)  # [B*K, c]
                vecs.append(self.norms[row.name](v) if row.layer_norm else v)
            vector = torch.cat(vecs, 1) if vecs else spatial.new_zeros(B * K, 0)   # [B*K, V]
        return spatial, vector

    def _compute(self, row, ctx: Context) -> torch.Tensor:
        """One input's value, detached when it is stop-gradient."""
        value = row.compute(ctx)
        return value.detach() if row.name in self.stop_gradient else value

    def _loss_gradients(self, x, lam, q, decoded, terms, keep_graph) -> dict[str, torch.Tensor]:
        """dL_t / d(lambda, mu, mask logits) for the inputs that need them.

        L_t is the sum over images of each image's -ELBO, -log p(x_b | z_b) + KL(q_b || p):
        image b's gradients are those of its own -ELBO. ``grad_reduction = "batch_mean"``
        differentiates the batch mean instead (each gradient carries 1/B), as the released
        code does. A gradient input left out of ``stop_gradient`` is differentiated through
        (second order: ``create_graph``); without it the input would carry no gradient
        whatever the configuration says. The graph is kept (``retain_graph``): the loss
        may still backpropagate through the sample's part of it (its KL term), even for a
        step training does not differentiate, and nothing else holds it once the step ends.
        """
        if not self.needs:
            return {}
        prior = self.model.prior(x.shape[0], lam.shape[1], like=lam)
        per_image = -terms.log_px.sum((1, 2)) + kl_divergence(q, prior).sum((1, 2))   # [B]
        loss = per_image.mean() if self.cfg.grad_reduction == "batch_mean" else per_image.sum()
        targets = {"lam": lam, "means": decoded.means, "mask_logits": decoded.mask_logits}
        wanted = sorted(self.needs)
        second_order = keep_graph and bool(self.differentiated_gradients)
        values = torch.autograd.grad(loss, [targets[k] for k in wanted], retain_graph=True,
                                     create_graph=second_order)
        return dict(zip(wanted, values))
