"""Training and evaluation throughput and peak memory across batch size, K, T and resolution.

For every configuration one run measures, alternating their repetitions so that all see
the same machine state:

    train  one optimisation step of the Pyro program (loss, backward, clip, Adam)
    plain  the same step written in plain PyTorch (`bench_train_step.plain_loss`)
    eval   `Iodine.infer` (T refinement steps; gradients only for the guide's inputs)
    dec    the decoder alone, forward and backward, at the step's B*K slots

and prints images/s, the peak memory of train and eval, the decoder's achieved GFLOP/s
(analytic convolution FLOPs over measured time) and the ratios eval/train and
train/plain. The sweep varies one factor at a time around a base point.

    python benchmarks/bench_throughput.py                      # default sweep, a few minutes on 2 cores
    python benchmarks/bench_throughput.py --quick              # tiny networks, seconds
    python benchmarks/bench_throughput.py --device cuda --dataset clevr6 --batch-sizes 32 \\
        --slots 7 --iters 5 --sizes 128 --amp --channels-last --peak-tflops 989
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import plain_loss  # noqa: E402

from iodine_pyro.config import make_config  # noqa: E402
from iodine_pyro.system import Iodine  # noqa: E402

QUICK = {"model.latent_dim": 4, "model.decoder_channels": (8, 8), "model.decoder_kernel": 3,
         "guide.conv_channels": (8, 8), "guide.conv_kernel": 3, "guide.mlp": (16,)}


# -- memory --------------------------------------------------------------------------------


def peak_mib(fn, device: torch.device) -> float:
    """Peak memory of tensors that `fn` allocates beyond what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the running sum of the allocations and frees
    the profiler records (allocator caches and the interpreter are not counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


# -- one configuration ---------------------------------------------------------------------


def decoder_flops(system: Iodine, z: torch.Tensor) -> float:
    """Forward FLOPs of the decoder's convolutions and of the broadcast decoder's first layer
    (a matmul over z, see `SpatialBroadcastDecoder.first_layer`) for the slots `z` [N, D]."""
    dec, flops = system.model.decoder, []

    def conv(layer, inputs, output):
        k = layer.kernel_size[0] * layer.kernel_size[1]
        if isinstance(layer, torch.nn.ConvTranspose2d):                 # per input pixel
            n_pix = inputs[0].shape[0] * inputs[0].shape[2] * inputs[0].shape[3]
        else:                                                           # per output pixel
            n_pix = output.shape[0] * output.shape[2] * output.shape[3]
        flops.append(2.0 * n_pix * layer.in_channels * layer.out_channels * k / layer.groups)

    first = getattr(dec, "first_layer", None)
    layers = [m for m in dec.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    if first is not None:                                               # net[0] is never called as a module
        C1 = dec.net[0].out_channels
        H, W = dec.image_size
        flops.append(2.0 * z.shape[0] * z.shape[1] * C1 * H * W)
    handles = [m.register_forward_hook(conv) for m in layers]
    try:
        with torch.no_grad():
            dec(z)
    finally:
        for h in handles:
            h.remove()
    return sum(flops)


def measure(cfg, a, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    system = Iodine(cfg).to(device).use_fast_paths(torch.bfloat16 if a.amp else None, a.channels_last)
    opt = torch.optim.Adam(system.parameters(), lr=cfg.train.lr, fused=True if device.type == "cuda" else None)
    B, K = cfg.train.batch_size, cfg.model.num_slots
    x = torch.rand(B, cfg.model.image_channels, *cfg.model.image_size, device=device)
    z = torch.randn(B * K, cfg.model.latent_dim + (cfg.model.decoder_constant is not None), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train(fn):
        opt.zero_grad(set_to_none=True)
        loss = fn(system, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(system.parameters(), cfg.train.clip_norm)
        opt.step()

    def decoder():
        from iodine_pyro.models.generative import autocast
        with autocast(z, system.model.amp_dtype):
            out = system.model.decoder(z)
        out.float().sum().backward()

    phases = {"train": lambda: train(lambda s, v: s.loss(v, check=False)),
              "plain": lambda: train(plain_loss),
              "eval": lambda: system.infer(x),
              "dec": decoder}
    if a.no_plain:
        del phases["plain"]
    times = {k: [] for k in phases}
    for i in range(a.warmup + a.reps):
        for name, fn in phases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"train_ips": B / med["train"], "eval_ips": B / med["eval"]}
    row["eval_over_train"] = row["eval_ips"] / row["train_ips"]
    if "plain" in med:
        row["train_over_plain"] = med["train"] / med["plain"]
    row["dec_gflops"] = 3.0 * decoder_flops(system, z) / med["dec"] / 1e9      # forward + 2x backward
    for name in ("train", "eval"):
        row[f"{name}_mib"] = peak_mib(phases[name], device)
    return row


# -- the sweep -----------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def sweep(a, base_cfg) -> list[tuple[int, int, int, int]]:
    """(B, K, T, size): the base point, then one factor at a time."""
    base = (a.batch_sizes[0], a.slots[0], a.iters[0], a.sizes[0])
    points = [base]
    for axis, values in enumerate((a.batch_sizes, a.slots, a.iters, a.sizes)):
        for v in values[1:]:
            p = list(base)
            p[axis] = v
            points.append(tuple(p))
    return list(dict.fromkeys(points))


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="tetrominoes")
    p.add_argument("--preset", default="paper")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=ints, default=None, help="comma-separated; the first is the base")
    p.add_argument("--slots", type=ints, default=None, help="K values (default: the dataset's K, then others)")
    p.add_argument("--iters", type=ints, default=None, help="T values (default: 5,2)")
    p.add_argument("--sizes", type=ints, default=None, help="square image sizes (default: the dataset's, ...)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the networks")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-plain", action="store_true", help="skip the plain-PyTorch step")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s, to report the decoder's fraction of it")
    p.add_argument("--quick", action="store_true", help="tiny networks and a small sweep")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pyro.enable_validation(False)
    device = torch.device(a.device)
    arch = make_config(a.dataset, a.preset)
    K0, S0 = arch.model.num_slots, arch.model.image_size[0]
    if a.quick:
        a.batch_sizes = a.batch_sizes or [4, 8]
        a.slots, a.iters, a.sizes = a.slots or [K0], a.iters or [3, 2], a.sizes or [S0]
        a.reps, a.warmup = min(a.reps, 2), min(a.warmup, 1)
    a.batch_sizes = a.batch_sizes or [8, 4, 16]
    a.slots = a.slots or [K0, max(2, K0 // 2), K0 + 3]
    a.iters = a.iters or [5, 2]
    a.sizes = a.sizes or [S0, max(16, round(S0 * 0.7)), round(S0 * 1.4)]

    print(f"device: {machine(device)}; torch {torch.__version__}; dataset={a.dataset} preset={a.preset} "
          f"amp={a.amp} channels_last={a.channels_last} reps={a.reps} warmup={a.warmup}"
          f"{' quick' if a.quick else ''}")
    cols = ["B", "K", "T", "HxW", "train img/s", "eval img/s", "eval/train", "train/plain",
            "train MiB", "eval MiB", "dec GFLOP/s"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    best_dec = 0.0
    for B, K, T, S in sweep(a, arch):
        over = {"train.batch_size": B, "model.num_slots": K, "guide.num_iters": T, "model.image_size": (S, S)}
        if a.quick:
            over.update(QUICK)
        cfg = make_config(a.dataset, a.preset, over)
        r = measure(cfg, a, device)
        best_dec = max(best_dec, r["dec_gflops"])
        print(" | ".join([str(B), str(K), str(T), f"{S}x{S}", f"{r['train_ips']:.2f}", f"{r['eval_ips']:.2f}",
                          f"{r['eval_over_train']:.2f}", f"{r.get('train_over_plain', math.nan):.3f}",
                          f"{r['train_mib']:.0f}", f"{r['eval_mib']:.0f}", f"{r['dec_gflops']:.1f}"]),
              flush=True)
    if a.peak_tflops:
        print(f"decoder convolutions reach {best_dec / 1e3 / a.peak_tflops:.1%} of {a.peak_tflops} TFLOP/s")


if __name__ == "__main__":
    main()
