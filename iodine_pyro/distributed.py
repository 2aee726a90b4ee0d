"""Training on many processes, and a training step that never waits for the device.

    torchrun --standalone --nproc_per_node 2 -m iodine_pyro fit ...   # or: iodine-pyro fit --nproc 2 ...

Data parallelism with PyTorch's own engine (`DistributedDataParallel`, gloo on CPU, NCCL
on GPU). Every process builds the same model from the same seed, reads the same global
batch from the same `Batches` stream and trains on its own contiguous share of it
(`Processes.shard`: the distributed sampler). The loss is the per-image mean over the
local share; DDP averages the gradients over processes during `backward`, which with
equal shares is the gradient of the per-image mean over the global batch. Clipping
(global norm) and Adam then run on identical gradients in every process, so the
parameters stay identical; `Trainer.ensure_in_sync` checks that at every checkpoint.

The guide calls `torch.autograd.grad` on its own step loss during the forward pass. That
computes gradients with respect to lambda and the decoder outputs only: the parameters'
gradient accumulators (where DDP's all-reduce hooks sit) do not run until the final
`backward`, so DDP sees each parameter's gradient exactly once per step.

Posterior samples: with more than one process the noise of step s on rank r comes from a
generator seeded by (seed, s, r) (`step_seed`), so a resumed run draws exactly what the
uninterrupted run drew, and a single process can reproduce any rank's draws.

Rank 0 alone writes checkpoints, metrics and pictures; every process resumes from the same
checkpoint, and every process takes the same decisions (stop on a signal, skip a
non-finite step) because those are agreed by all-reduce.

The deferred step (`Trainer(deferred=True)`, the default on CUDA) keeps the loss, the
gradient norm and the finiteness check on the device: the ELBO is computed without host
reads (`SyncFreeMeanFieldELBO`), fused Adam skips a non-finite step by itself
(`found_inf`, as `torch.amp.GradScaler` does), and the counts of skipped steps are read
once per logging interval.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import kl_divergence

log = logging.getLogger(__name__)


# -- where this process stands ---------------------------------------------------------


def launched() -> bool:
    """True inside a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Processes:
    """This process's place among the processes of one training run.

    Args:
        rank, world, local_rank: as torchrun sets them (0, 1, 0 for a single process).
        device: the device this process trains on.
        owns_group: whether `setup` started the process group (and `teardown` ends it).
        host_group: the group for small host-side agreements (gloo; None = default group).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    host_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def main_first(self, fn: Callable, *args, **kwargs):
        """Run `fn` on rank 0 only and hand its result, or its exception, to every process."""
        if not self.distributed:
            return fn(*args, **kwargs)
        box: list[Any] = [None, None]
        if self.is_main:
            try:
                box[0] = fn(*args, **kwargs)
            except Exception as e:  # re-raised on every process below
                box[1] = _picklable(e)
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any one."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} does not split evenly over {self.world} processes; "
                             f"choose a multiple of {self.world}")

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's contiguous share of a global batch: rows [r b, (r + 1) b), b = B / world."""
        if not self.distributed:
            return batch
        b = batch["image"].shape[0] // self.world
        return {k: v[self.rank * b:(self.rank + 1) * b] for k, v in batch.items()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to `device`; to a GPU from pinned memory, without waiting for the copy."""
    if torch.device(device).type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _picklable(e: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def setup(device: str | torch.device = "cpu") -> Processes:
    """Join the run torchrun started (gloo on CPU, NCCL on CUDA); a single process otherwise.

    Under torchrun with CUDA each process takes the GPU of its local rank.
    """
    device = torch.device(device)
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return Processes(device=device)
    if not dist.is_available():
        raise RuntimeError("this build of torch has no torch.distributed")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"process {local} on this machine has no GPU "
                             f"({torch.cuda.device_count()} visible); use fewer processes")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return Processes(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local,
                     device=device, owns_group=owns, host_group=host_group)


def teardown(processes: Processes) -> None:
    if processes.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the posterior noise of optimisation step `step` on process `rank`."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# -- speed settings --------------------------------------------------------------------


@dataclass
class Speed:
    """How the networks run: bf16 autocast, channels-last convolutions, deferred checks."""

    amp: torch.dtype | None = None
    channels_last: bool = False
    deferred: bool = False


def speed_settings(device: str | torch.device, amp: bool | None = None,
                   channels_last: bool | None = None, deferred: bool | None = None) -> Speed:
    """Resolve the speed options of `fit`; None means the device's default.

    CUDA: bf16 autocast (where the GPU supports bf16), channels-last, deferred checks.
    CPU: bf16 autocast where the processor has bf16 instructions (`cpu_has_fast_bf16`), the
    rest off. Measured on a 2-core Xeon with AMX, Tetrominoes preset: a training step is
    2.9 times faster at batch 8 on one thread (0.60 s against 1.76 s) and 3.5 times at
    batch 32 on two (1.16 s against 4.05 s); on a 2-core AMD EPYC with AVX512-BF16 and no
    AMX, 1.75 times (1.45 s against 2.55 s of CPU time, batch 8, one thread, the two
    alternating in one run: `benchmarks/bench_bf16.py`). Without bf16 instructions torch emulates bf16 and a step is
    slower than float32, so it stays off there.
    """
    cuda = torch.device(device).type == "cuda"
    if amp is None:
        amp = (cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported()) or \
              (not cuda and cpu_has_fast_bf16())
    return Speed(amp=torch.bfloat16 if amp else None,
                 channels_last=cuda if channels_last is None else channels_last,
                 deferred=cuda if deferred is None else deferred)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 products in hardware: AVX512-BF16 instructions (AMD
    Zen 4 and later, Intel from Cooper Lake; Intel's AMX-BF16 tiles come with them)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return probe is not None and bool(probe())
    except RuntimeError:
        return False


# -- one optimisation step -------------------------------------------------------------


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



def _ddp_buffer_kwargs() -> dict[str, bool]:
    """Do not re-broadcast buffers every forward (the only buffer is a constant grid)."""
    names = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


class Trainer:
    """`fit`'s optimisation step on several processes and/or with deferred checks.

    One process with host checks does not need it (`train.train_step`). Here the loss is
    backpropagated on every process even when it is not finite (DDP's all-reduce needs
    every process), and the decision to skip is taken from the all-reduced loss and the
    clipped gradient norm, which are the same on every process.

    Args:
        system: the `Iodine` to train (wrapped in DDP when there are several processes).
        optimizer: `torch.optim.Adam`; with `deferred`, built with ``fused=True``.
        clip_norm: global gradient-norm clip.
        processes: from `setup`.
        deferred: no host synchronisation per step: skipping is done by the optimizer
            on the device; `settle` reads the outcome. The system's ELBO becomes
            `SyncFreeMeanFieldELBO` (the same loss, without Pyro's host reads).
        seed: the run's seed (per-step noise seeds on several processes).
    """

    def __init__(self, system: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float,
                 processes: Processes, *, deferred: bool = False, seed: int = 0):
        self.system, self.optimizer, self.clip_norm = system, optimizer, clip_norm
        self.processes, self.deferred, self.seed = processes, deferred, seed
        self.params = list(system.parameters())
        if deferred and not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("deferred steps need torch.optim.Adam(..., fused=True)")
        if deferred:
            system.elbo = SyncFreeMeanFieldELBO()
        if processes.distributed:
            # with a single decoder pass the refinement network never runs
            unused = system.guide.refines and len(system.weights()) < 2
            ids = [processes.device.index] if processes.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(
                system, device_ids=ids, find_unused_parameters=unused, **_ddp_buffer_kwargs())
        else:
            self.module = system
        device = processes.device
        self._faults = torch.zeros(3, dtype=torch.long, device=device)   # skipped, current run, longest run
        self._last = (torch.zeros((), device=device), torch.zeros((), device=device))

    def step(self, x: torch.Tensor, step: int, kl_scale: float | torch.Tensor = 1.0):
        """One step on this process's images `x` [b, C, H, W], the KL weighted `kl_scale`.

        Returns (loss, gradient norm, applied, reconstruction MSE): loss and MSE are means
        over all processes. With host checks loss and norm are floats and applied a bool;
        deferred, they are device tensors and applied is None (read them with `settle`;
        `last_applied` holds the step's outcome as a device tensor).
        """
        opt, world = self.optimizer, self.processes.world
        opt.zero_grad(set_to_none=True)
        if self.processes.distributed:
            torch.manual_seed(step_seed(self.seed, step, self.processes.rank))
        loss, mse = self.module(x, check=False, kl_scale=kl_scale)
        loss.backward()
        value = loss.detach()
        stats = torch.stack([value, (~torch.isfinite(value)).to(value.dtype), mse.to(value.dtype)])
        if self.processes.distributed:                               # [3]: loss, non-finite, MSE
            dist.all_reduce(stats)                                   # sums over processes
        mean, mse = stats[0] / world, stats[2] / world
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None],
                                              self.clip_norm)
        bad = (stats[1] > 0) | ~torch.isfinite(norm)
        self.last_applied = ~bad
        if not self.deferred:
            if bool(bad):
                opt.zero_grad(set_to_none=True)
                return float(mean), float(norm), False, mse
            opt.step()
            return float(mean), float(norm), True, mse
        opt.found_inf = bad.float()                                  # fused Adam skips the update
        try:
            opt.step()
        finally:
            del opt.found_inf
        b = bad.long()
        skipped, run, longest = self._faults.unbind()
        run = (run + b) * b
        self._faults = torch.stack([skipped + b, run, torch.maximum(longest, run)])
        self._last = (mean, norm)
        return mean, norm, None, mse

    def settle(self) -> tuple[float, float, int, int]:
        """(loss and gradient norm of the last step, steps skipped so far, longest run of
        non-finite steps since the previous call): one host synchronisation."""
        loss, norm = self._last
        values = torch.cat([torch.stack([loss.float(), norm.float()]), self._faults.float()]).tolist()
        skipped, run, _ = self._faults.unbind()
        self._faults = torch.stack([skipped, run, run])
        return values[0], values[1], int(values[2]), int(values[4])

    def ensure_in_sync(self) -> bool:
        """Check that every process holds rank 0's parameters and Adam moments; if one does
        not, log it and copy rank 0's to all. True when they already agreed."""
        if not self.processes.distributed:
            return True
        tensors = [p.data for p in self.params]
        tensors += [v for s in self.optimizer.state.values() for k, v in s.items()
                    if k != "step" and torch.is_tensor(v)]
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        agreed = not self.processes.any(not torch.equal(ref, flat))
        if not agreed:
            log.warning("parameters differ across processes; copying rank 0's to all")
            for t in tensors:
                dist.broadcast(t, 0)
        return agreed


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, keeping this optimizer's implementation flags.

    A state dict carries its optimizer's ``fused``/``foreach``/``capturable`` flags, which
    `load_state_dict` would adopt: a run resumed on another device keeps its own, and step
    counters move to where a fused or capturable optimizer needs them.
    """
    keep = [{k: g.get(k) for k in ("fused", "foreach", "capturable")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, keep):
        group.update(flags)
        if flags["fused"] or flags["capturable"]:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(dtype=torch.float32, device=p.device)


# -- the launcher ----------------------------------------------------------------------


def strip_option(argv: list[str], name: str = "--nproc") -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def launch(nproc: int, argv: list[str], device: str = "cpu") -> int:
    """Run ``python -m iodine_pyro ARGV`` on `nproc` local processes with torchrun
    (``torch.distributed.run --standalone``); returns the exit status.

    On CPU each process gets cpu_count / nproc threads unless OMP_NUM_THREADS is set. The
    processes print for themselves (rank 0 alone prints results and errors).
    """
    # the launcher's machinery (elastic agents, rendezvous) only when launching: importing it
    # for every fit would slow the command line's start
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if torch.device(device).type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} needs {nproc} GPUs, {torch.cuda.device_count()} visible")
    if torch.device(device).type == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the processes report for themselves
    args = torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "iodine_pyro", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if 2 in codes:          # an error the processes reported (the others were stopped after it)
            return 2
        log.error("training processes failed with exit status %s", ", ".join(map(str, codes)))
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0
