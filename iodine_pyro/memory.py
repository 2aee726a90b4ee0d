"""Memory: requests that cannot fit are refused before any work starts.

`check_memory` compares a lower bound of what a request needs (`memory_needed`: the
decoded slots of every step kept for the backward pass, and the networks' parameters,
counted on PyTorch's meta device by `parameter_count`) with what the device has
(`memory_available`), so that an impossible batch, K or T is refused in one line instead
of failing in the allocator after work began.
"""

from __future__ import annotations

import os
from typing import Any

from .config import Config

def memory_needed(cfg: Config, *, batch: int | None = None, num_slots: int | None = None,
                  num_iters: int | None = None, training: bool = True) -> int:
    """A lower bound of the bytes one step holds at once: every slot's decoder activations
    at image size (2 bytes a value, as under bf16 autocast), kept for each refinement step
    when training without recomputation, and the networks' parameters (4 bytes each; in
    training also their gradients, Adam's two moments and the step guard's copy of the
    parameters and moments: 7 copies). Real steps need several times more; a request
    above this bound cannot run at all, whatever the allocator does."""
    m, g = cfg.model, cfg.guide
    B = batch or cfg.train.batch_size
    K = num_slots or m.num_slots
    T = num_iters or g.num_iters
    H, W = m.image_size
    channels = (sum(m.decoder_channels) if m.decoder == "broadcast" else 0) + m.image_channels + 1
    passes = min(T, g.grad_steps or T) if training and not g.recompute else 1
    return 2 * B * K * H * W * channels * passes + 4 * (7 if training else 1) * parameter_count(cfg)


def parameter_count(cfg: Config) -> int:
    """The number of parameters of the networks `cfg` describes, counted on PyTorch's meta
    device (shapes only: nothing is allocated, however large); 0 when they cannot be built
    that way (then the estimate counts activations only)."""
    import torch

    try:
        from .system import Iodine

        with torch.device("meta"):
            system = Iodine(cfg)
        return sum(p.numel() for p in system.parameters())
    except Exception:  # a network that needs real tensors to be built: no estimate of it
        return 0


def memory_available(device: Any = "cpu") -> int | None:
    """The memory of `device` in bytes (a GPU's, or this machine's RAM); None when unknown."""
    import torch

    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory) if torch.cuda.is_available() else None
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n / 2**40:,.0f} TiB"


def check_memory(cfg: Config, device: Any = "cpu", *, batch: int | None = None, num_slots: int | None = None,
                 num_iters: int | None = None, training: bool = True, what: str = "this command") -> None:
    """Refuse (ValueError, one line with the estimate) a step that cannot fit in the memory
    of `device` (`memory_needed` against `memory_available`)."""
    need = memory_needed(cfg, batch=batch, num_slots=num_slots, num_iters=num_iters, training=training)
    have = memory_available(device)
    if have is not None and need > have:
        m = cfg.model
        raise ValueError(
            f"{what} would need at least {_gib(need)} for one step (batch {batch or cfg.train.batch_size}, "
            f"{num_slots or m.num_slots} slots, {num_iters or cfg.guide.num_iters} refinement steps, "
            f"{m.image_size[0]}x{m.image_size[1]} images) and {device} has {_gib(have)}: "
            f"lower `batch_size`, `num_slots` or `num_iters`")
