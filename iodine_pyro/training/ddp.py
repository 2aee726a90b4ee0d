"""Training on many processes: data parallelism with PyTorch's own engine.

    torchrun --standalone --nproc_per_node 2 -m iodine_pyro fit ...   # or: iodine-pyro fit --nproc 2 ...

`DistributedDataParallel`, gloo on CPU, NCCL on GPU. Every process builds the same model
from the same seed, reads the same global batch from the same `Batches` stream and trains
on its own contiguous share of it (`Processes.shard`: the distributed sampler). The loss
is the per-image mean over the local share; DDP averages the gradients over processes
during `backward`, which with equal shares is the gradient of the per-image mean over the
global batch. Clipping (global norm) and Adam then run on identical gradients in every
process, so the parameters stay identical; `ensure_in_sync` checks that at every
checkpoint.

The guide calls `torch.autograd.grad` on its own step loss during the forward pass. That
computes gradients with respect to lambda and the decoder outputs only: the parameters'
gradient accumulators (where DDP's all-reduce hooks sit) do not run until the final
`backward`, so DDP sees each parameter's gradient exactly once per step.

Posterior samples: with more than one process the noise of step s on rank r comes from a
generator seeded by (seed, s, r) (`step_seed`), so a resumed run draws exactly what the
uninterrupted run drew, and a single process can reproduce any rank's draws.

Rank 0 alone writes checkpoints, metrics and pictures; every process resumes from the same
checkpoint, and every process takes the same decisions (stop on a signal, skip a
non-finite step) because those are agreed by all-reduce (`Processes.any`).
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

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
            raise ValueError(f"`batch_size` {batch_size} does not split evenly over {self.world} processes; "
                             f"choose a multiple of {self.world}")

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's contiguous share of a global batch: rows [r b, (r + 1) b), b = B / world."""
        if not self.distributed:
            return batch
        b = batch["image"].shape[0] // self.world
        return {k: v[self.rank * b:(self.rank + 1) * b] for k, v in batch.items()}


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


def teardown(processes: Processes, finished: bool = True) -> None:
    """End the process group `setup` started. After a run that `finished` on every process,
    the processes first wait for each other, so that none closes its connections while
    another may still be completing the last collective (a process that leaves early can
    make gloo abort the other at exit). After an error there is nothing to wait for: the
    others may be stopped inside a collective."""
    if processes.owns_group and dist.is_initialized():
        try:
            if finished and processes.distributed:
                dist.barrier(group=processes.host_group)
        finally:
            dist.destroy_process_group()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the posterior noise of optimisation step `step` on process `rank`."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# -- the model on every process --------------------------------------------------------


def _ddp_buffer_kwargs() -> dict[str, bool]:
    """Do not re-broadcast buffers every forward (the only buffer is a constant grid)."""
    names = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def data_parallel(system: nn.Module, processes: Processes) -> nn.Module:
    """`system` wrapped in `DistributedDataParallel` when there are several processes, and
    `system` itself otherwise; called like the system (its `forward` is the objective)."""
    if not processes.distributed:
        return system
    # with a single decoder pass the refinement network never runs
    unused = system.guide.refines and len(system.weights()) < 2
    ids = [processes.device.index] if processes.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(system, device_ids=ids, find_unused_parameters=unused,
                                               **_ddp_buffer_kwargs())


def ensure_in_sync(processes: Processes, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> bool:
    """Check that every process holds rank 0's parameters and Adam moments; if one does
    not, log it and copy rank 0's to all. True when they already agreed (and always on a
    single process)."""
    if not processes.distributed:
        return True
    tensors = [p.data for p in params]
    tensors += [v for s in optimizer.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    agreed = not processes.any(not torch.equal(ref, flat))
    if not agreed:
        log.warning("parameters differ across processes; copying rank 0's to all")
        for t in tensors:
            dist.broadcast(t, 0)
    return agreed


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


def exit_in_words(code: int) -> str:
    """How a process ended, in words: 'exited with status 3', 'was killed by SIGABRT'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def launch(nproc: int, argv: list[str], device: str = "cpu") -> int:
    """Run ``python -m iodine_pyro ARGV`` on `nproc` local processes with torchrun
    (``torch.distributed.run --standalone``); returns the exit status.

    On CPU each process gets cpu_count / nproc threads unless OMP_NUM_THREADS is set. The
    processes print for themselves (rank 0 alone prints results and errors); one killed by a
    fatal signal also prints its Python stacks (faulthandler).
    """
    # the launcher's machinery (elastic agents, rendezvous) only when launching: importing it
    # for every fit would slow the command line's start
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if torch.device(device).type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"`nproc` {nproc} needs {nproc} GPUs, {torch.cuda.device_count()} visible")
    if torch.device(device).type == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # a process that aborts (SIGABRT, SIGSEGV) prints where each of its threads stood
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the processes report for themselves
    args = torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "iodine_pyro", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        printed = [c for c in codes if c in (1, 2)]    # the command line's statuses for an error it
        if printed:                                     # printed (the other processes were stopped after it)
            return max(printed)
        log.error("training processes failed: %s", "; ".join(
            f"process {rank} {exit_in_words(f.exitcode)}" for rank, f in sorted(e.failures.items())))
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0
