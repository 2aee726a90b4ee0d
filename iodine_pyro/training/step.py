"""One optimisation step: the T-step weighted ELBO, global-norm clipping, Adam, and the
guard that applies a step only when everything about it is finite.

    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x)   # sum_t w_t L_t
    loss.backward(); clip_grad_norm_(params, 5.0); adam.step()

``pyro.optim`` builds one optimiser per parameter and its ``ClippedAdam`` clips each
element, not the global norm, so the step uses ``torch.optim.Adam`` directly.

A step is applied only when the batch, the loss, the gradient and the updated parameters
are all finite; otherwise it is undone (`Snapshot`), skipped and counted (`Faults`). Two
implementations share that contract and one fault counter:

* `HostCheckedStep` reads the outcome on the host every step (`train_step` on one process;
  on several, every process backpropagates and the decision is all-reduced).
* `SyncFreeStep` (the default on CUDA) never waits for the device: the ELBO is computed
  without host reads (`SyncFreeMeanFieldELBO`), fused Adam skips a non-finite step by
  itself (``found_inf``, as `torch.amp.GradScaler` does), a non-finite update is undone
  with `torch.where`, and the counts are read once per logging interval (`Step.settle`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import kl_divergence

from ..system import Iodine
from .ddp import Processes, data_parallel, ensure_in_sync, step_seed


class Snapshot:
    """The parameters and optimiser state before a step, so that a step whose update is
    not finite can be undone.

    Adam with a finite gradient can still produce non-finite parameters (an enormous
    learning rate, an overflowing moment): checking the loss and the gradient is not
    enough for "the last good state" to be good. The copies are kept in buffers that are
    reused every step (a few times the size of the parameters)."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = params, optimizer
        self.saved: list[torch.Tensor] = []
        self.had_state: set[int] = set()

    def _tensors(self, only: set[int] | None = None) -> list[torch.Tensor]:
        tensors = list(self.params)
        for p in self.params:
            if only is None or id(p) in only:
                tensors += [v for _, v in sorted(self.optimizer.state.get(p, {}).items()) if torch.is_tensor(v)]
        return tensors

    @torch.no_grad()
    def save(self) -> None:
        self.had_state = {id(p) for p in self.params if self.optimizer.state.get(p)}
        tensors = self._tensors(self.had_state)
        if [t.shape for t in self.saved] != [t.shape for t in tensors]:
            self.saved = [t.detach().clone() for t in tensors]
        else:
            for buffer, t in zip(self.saved, tensors):
                buffer.copy_(t)

    @torch.no_grad()
    def finite(self) -> torch.Tensor:
        """Whether every parameter is finite, as a device bool (nothing read on the host)."""
        return torch.stack([torch.isfinite(p).all() for p in self.params]).all()

    @torch.no_grad()
    def restore(self, keep: torch.Tensor | None = None) -> None:
        """Put the saved state back; with `keep` (a device bool), only where it is false,
        without reading it on the host. Optimiser state that the step created is dropped
        (or, with `keep`, zeroed: Adam's state before its first step)."""
        for p in self.params:
            if id(p) not in self.had_state and self.optimizer.state.get(p):
                if keep is None:
                    self.optimizer.state.pop(p, None)
                else:
                    for v in self.optimizer.state[p].values():
                        if torch.is_tensor(v):
                            v.copy_(torch.where(keep, v, torch.zeros_like(v)))
        for t, buffer in zip(self._tensors(self.had_state), self.saved):
            t.copy_(buffer if keep is None else torch.where(keep, t, buffer))


def train_step(system: Iodine, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               clip_norm: float, kl_scale: float | torch.Tensor = 1.0,
               snapshot: Snapshot | None = None) -> tuple[float, float, bool, torch.Tensor]:
    """One SVI step on one process. Returns (loss, gradient norm, applied, reconstruction MSE).

    The step is applied only when the batch, the loss, the gradient and the updated
    parameters are all finite; otherwise the parameters and the optimiser state are as
    before the call (an update that came out non-finite is undone from `snapshot`, made
    here when not given) and `applied` is False."""
    optimizer.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(x).all()):             # NaN or infinite pixels: nothing to learn from
        return math.nan, math.nan, False, torch.full((), math.nan, device=x.device)
    loss, mse = system.objective(x, kl_scale=kl_scale)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value, float("nan"), False, mse
    loss.backward()
    params = [p for p in system.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return value, float(norm), False, mse
    snapshot = snapshot or Snapshot(list(system.parameters()), optimizer)
    snapshot.save()
    optimizer.step()
    if not bool(snapshot.finite()):
        snapshot.restore()
        optimizer.zero_grad(set_to_none=True)
        return value, float(norm), False, mse
    return value, float(norm), True, mse


class SyncFreeMeanFieldELBO(TraceMeanField_ELBO):
    """`TraceMeanField_ELBO` whose differentiable loss never reads a value on the host.

    Pyro's reads the loss four times per step (``.item()`` of the particle's ELBO and of
    the surrogate, a NaN warning in the forward pass and another in the backward pass):
    each waits for the device. With every guide site reparametrized and every KL
    analytic, as in IODINE, the surrogate *is* the loss: this returns it directly, the
    same value with the same gradient. Non-finite values are the caller's to catch.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = 0.0
            for name, site in model_trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if site["is_observed"]:
                    elbo = elbo + site["log_prob_sum"]
                    continue
                q = guide_trace.nodes[name]
                kl = scale_and_mask(kl_divergence(q["fn"], site["fn"]), scale=q["scale"], mask=q["mask"])
                elbo = elbo - kl.sum()
            if any(site["type"] == "sample" and name not in model_trace.nodes
                   for name, site in guide_trace.nodes.items()):
                raise NotImplementedError("guide sites absent from the model are not supported")
            loss = loss - elbo / self.num_particles
        return loss


class Faults:
    """Steps skipped for non-finite values: how many, the current run of consecutive ones
    and the longest run since the last `settle`.

    Both step paths count here. The counts are a tensor on the device where the outcome
    is decided, so the sync-free step adds to them without a host read; the host-checked
    step keeps them on the CPU."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(3, dtype=torch.long, device=device)   # [3]: skipped, current run, longest run

    def add(self, applied: torch.Tensor | bool) -> None:
        """Count one step: `applied` (a bool, or a device bool never read here)."""
        b = (~torch.as_tensor(applied, device=self.counts.device)).long()
        skipped, run, longest = self.counts.unbind()
        run = (run + b) * b
        self.counts = torch.stack([skipped + b, run, torch.maximum(longest, run)])

    def settle(self) -> tuple[int, int]:
        """(steps skipped so far, longest run since the previous call): one host read."""
        skipped, run, longest = self.counts.tolist()
        self.counts = torch.tensor([skipped, run, run], dtype=torch.long, device=self.counts.device)
        return skipped, longest


class StepOutcome(NamedTuple):
    """What one step reports. The loss and the MSE are means over all processes."""

    loss: float | torch.Tensor        # a device tensor on the sync-free path
    grad_norm: float | torch.Tensor   # the global gradient norm, measured before clipping
    applied: bool | None              # None: decided on the device (`Step.last_applied`)
    mse: torch.Tensor                 # the final refinement step's reconstruction MSE


class Step:
    """`fit`'s optimisation step on this process's images: applied only when finite,
    otherwise undone and counted in `faults`.

    Args:
        system: the `Iodine` to train (wrapped in DDP when there are several processes).
        optimizer: `torch.optim.Adam` over the system's parameters.
        clip_norm: global gradient-norm clip.
        processes: from `ddp.setup` (one process: ``Processes()``).
        seed: the run's seed (per-step noise seeds on several processes).
    """

    host_checked = True               # whether `applied` is known on the host after each step

    def __init__(self, system: Iodine, optimizer: torch.optim.Optimizer, clip_norm: float,
                 processes: Processes, *, seed: int = 0, faults_device: torch.device | str = "cpu"):
        self.system, self.optimizer, self.clip_norm = system, optimizer, clip_norm
        self.processes, self.seed = processes, seed
        self.params = list(system.parameters())
        self.snapshot = Snapshot(self.params, optimizer)
        self.faults = Faults(faults_device)
        self.module: nn.Module = data_parallel(system, processes)
        self.last_applied: torch.Tensor | bool = True    # the last step's outcome, for GECO
        self._last: tuple = (math.nan, math.nan)          # the last step's loss and gradient norm

    def __call__(self, x: torch.Tensor, step: int, kl_scale: float | torch.Tensor = 1.0) -> StepOutcome:
        """One step on images `x` [b, C, H, W] (step `step` of the run), the KL weighted `kl_scale`."""
        raise NotImplementedError

    def settle(self) -> tuple[float, float, int, int]:
        """(loss and gradient norm of the last step, steps skipped so far, longest run of
        non-finite steps since the previous call)."""
        skipped, longest = self.faults.settle()
        loss, norm = self._last
        return float(loss), float(norm), skipped, longest

    def ensure_in_sync(self) -> bool:
        """Every process holds rank 0's parameters (`ddp.ensure_in_sync`)."""
        return ensure_in_sync(self.processes, self.params, self.optimizer)

    def _backward(self, x: torch.Tensor, step: int, kl_scale) -> tuple[torch.Tensor, ...]:
        """Forward and backward on every process, even when the loss is not finite (DDP's
        all-reduce needs every process); the skip decision comes from the all-reduced loss
        and the clipped gradient norm, the same numbers on every process.

        Returns device tensors (mean loss, gradient norm, bad, mean MSE), nothing read."""
        world = self.processes.world
        self.optimizer.zero_grad(set_to_none=True)
        if self.processes.distributed:
            torch.manual_seed(step_seed(self.seed, step, self.processes.rank))
        loss, mse = self.module(x, check=False, kl_scale=kl_scale)
        loss.backward()
        value = loss.detach()
        stats = torch.stack([value, (~torch.isfinite(value)).to(value.dtype), mse.to(value.dtype)])
        if self.processes.distributed:                               # [3]: loss, non-finite, MSE
            dist.all_reduce(stats)                                   # sums over processes
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.clip_norm)
        bad = (stats[1] > 0) | ~torch.isfinite(norm)
        return stats[0] / world, norm, bad, stats[2] / world


class HostCheckedStep(Step):
    """The step that reads its outcome on the host: `train_step` on one process; on
    several, every process backpropagates, the decision to skip is all-reduced, and an
    update that came out non-finite on any process is undone on all."""

    def __call__(self, x: torch.Tensor, step: int, kl_scale: float | torch.Tensor = 1.0) -> StepOutcome:
        if self.processes.distributed:
            loss, norm, applied, mse = self._on_every_process(x, step, kl_scale)
        else:
            loss, norm, applied, mse = train_step(self.system, self.optimizer, x, self.clip_norm, kl_scale,
                                                  self.snapshot)
        self.faults.add(applied)
        self.last_applied, self._last = applied, (loss, norm)
        return StepOutcome(loss, norm, applied, mse)

    def _on_every_process(self, x: torch.Tensor, step: int, kl_scale) -> tuple[float, float, bool, torch.Tensor]:
        self.snapshot.save()
        mean, norm, bad, mse = self._backward(x, step, kl_scale)
        if bool(bad):
            self.optimizer.zero_grad(set_to_none=True)
            return float(mean), float(norm), False, mse
        self.optimizer.step()
        if self.processes.any(not bool(self.snapshot.finite())):
            self.snapshot.restore()
            return float(mean), float(norm), False, mse
        return float(mean), float(norm), True, mse


class SyncFreeStep(Step):
    """The step that never waits for the device: no host read per step.

    The optimizer must be fused Adam (``fused=True``): it skips a step whose ``found_inf``
    is set, on the device. The system's ELBO becomes `SyncFreeMeanFieldELBO` (the same
    loss, without Pyro's host reads). Skipped steps still count as steps of the run."""

    host_checked = False

    def __init__(self, system: Iodine, optimizer: torch.optim.Optimizer, clip_norm: float,
                 processes: Processes, *, seed: int = 0):
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("deferred steps need torch.optim.Adam(..., fused=True)")
        system.elbo = SyncFreeMeanFieldELBO()
        super().__init__(system, optimizer, clip_norm, processes, seed=seed, faults_device=processes.device)
        nan = torch.full((), math.nan, device=processes.device)
        self._last = (nan, nan)

    def __call__(self, x: torch.Tensor, step: int, kl_scale: float | torch.Tensor = 1.0) -> StepOutcome:
        opt = self.optimizer
        self.snapshot.save()
        mean, norm, bad, mse = self._backward(x, step, kl_scale)
        opt.found_inf = bad.float()                                  # fused Adam skips the update
        try:
            opt.step()
        finally:
            del opt.found_inf
        ok = self.snapshot.finite()                                  # an update that overflowed: undone
        self.snapshot.restore(keep=ok)
        self.last_applied = ~bad & ok
        self.faults.add(self.last_applied)
        self._last = (mean, norm)
        return StepOutcome(mean, norm, None, mse)

    def settle(self) -> tuple[float, float, int, int]:
        loss, norm = torch.stack([t.float() for t in self._last]).tolist()   # one host read
        skipped, longest = self.faults.settle()
        return loss, norm, skipped, longest


def make_step(system: Iodine, optimizer: torch.optim.Optimizer, clip_norm: float, processes: Processes,
              *, sync_free: bool, seed: int = 0) -> Step:
    """The step `fit` runs: sync-free (`SyncFreeStep`) or host-checked (`HostCheckedStep`)."""
    kind = SyncFreeStep if sync_free else HostCheckedStep
    return kind(system, optimizer, clip_norm, processes, seed=seed)
