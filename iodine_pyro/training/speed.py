"""How the networks run on a device: bf16 autocast, channels-last convolutions, sync-free
steps, and batches moved without waiting.

These are per-device defaults, not part of distribution: a single CUDA process wants all
three, and a CPU wants bf16 only where it has the instructions for it (`speed_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Speed:
    """How the networks run: bf16 autocast, channels-last convolutions, deferred checks.

    Args:
        amp: the autocast dtype of the networks (None: full precision).
        channels_last: conv weights (and so activations) in channels-last layout.
        deferred: the sync-free step (`step.SyncFreeStep`): non-finite steps are skipped
            on the device and counted there, read once per logging interval.
    """

    amp: torch.dtype | None = None
    channels_last: bool = False
    deferred: bool = False


def speed_settings(device: str | torch.device, amp: bool | None = None,
                   channels_last: bool | None = None, deferred: bool | None = None) -> Speed:
    """Resolve the speed options of `fit`; None means the device's default.

    CUDA: bf16 autocast (where the GPU supports bf16), channels-last, deferred checks.
    CPU: bf16 autocast where the processor has bf16 instructions (`cpu_has_fast_bf16`),
    channels-last, the rest off. Channels-last: on a 2-core AMD EPYC (Zen 4, AVX512-BF16,
    no AMX), one thread, a `fast` Tetrominoes step at batch 8 takes 1.14 times fewer CPU
    seconds than in NCHW in bf16 (1.02 against 1.17 s), 1.16 times in float32
    (`benchmarks/bench_step_speed.py`, docs/performance.md): oneDNN convolves NCHW
    activations by reordering them to a blocked layout and back at every call. bf16
    autocast, measured on a 2-core Xeon with AMX, Tetrominoes preset: a training step is
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
                 channels_last=True if channels_last is None else channels_last,
                 deferred=cuda if deferred is None else deferred)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 products in hardware: AVX512-BF16 instructions (AMD
    Zen 4 and later, Intel from Cooper Lake; Intel's AMX-BF16 tiles come with them)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return probe is not None and bool(probe())
    except RuntimeError:
        return False


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a batch to `device`; to a GPU from pinned memory, without waiting for the copy."""
    if torch.device(device).type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}
