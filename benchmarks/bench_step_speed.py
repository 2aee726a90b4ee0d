"""CPU seconds of one `fast` training step: this checkout against a git revision, interleaved.

Each variant is an `Iodine` system with its own Adam, built from the same seed (the same
initial parameters) and stepped on the same batch with the same random draws (the seed
is set before every step) by `train_step`, what `fit` runs on one CPU process. The
variants take turns within every round (the order rotates from round to round), so that
other work on the machine slows them alike; the time of a step is the CPU time of this
process (`time.process_time`, torch on one thread). Printed: the median CPU seconds per
step of each variant, its ratio of steps per CPU-second against the first variant (of
the medians, and the median of the per-round ratios).

A variant is ``PACKAGE[+OPTION...]``: PACKAGE ``ref`` is `iodine_pyro` as of the git
revision ``--ref`` (copied from git into a temporary folder and imported under another
name), ``new`` the working tree's; each as that version's `fit` sets it up on this CPU
(`speed_settings`: bf16 autocast where the CPU has AVX512-BF16 or AMX; channels-last
weights in ``new``, NCHW in revisions before it), unless OPTIONs say otherwise:

    cl, nchw    channels-last or NCHW weights (`Iodine.use_fast_paths(channels_last=...)`)
    f32         no bf16 autocast
    compile     torch.compile (inductor) of the decoder's and the refinement network's
                convolution stacks (the first step of the run pays the compilation)
    compile_elu the ELUs of those two as an autograd function whose forward is compiled by
                torch.compile (inductor) and whose backward is aten's (from the output)

    OMP_NUM_THREADS=1 python benchmarks/bench_step_speed.py --steps 20              # ref against new
    OMP_NUM_THREADS=1 python benchmarks/bench_step_speed.py --variants ref+cl,new --steps 20
    OMP_NUM_THREADS=1 python benchmarks/bench_step_speed.py --variants ref+f32,new+f32 --steps 8
    OMP_NUM_THREADS=1 python benchmarks/bench_step_speed.py --set 'guide.kind="amortized"'
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]


def ref_package(rev: str, into: Path):
    """`iodine_pyro` as of git revision `rev`, imported as ``iodine_pyro_ref``."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "iodine_pyro"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    shutil.move(str(into / "iodine_pyro"), str(into / "iodine_pyro_ref"))
    sys.path.insert(0, str(into))
    pkg = importlib.import_module("iodine_pyro_ref")
    gen = importlib.import_module("iodine_pyro_ref.models.generative")
    gen._systems = itertools.count(100_000)       # Pyro parameter names apart from the new package's
    return pkg


def package(name: str):
    return importlib.import_module("iodine_pyro" if name == "new" else "iodine_pyro_ref")


def build(spec: str, a: argparse.Namespace):
    """(system, optimizer, step function) of variant `spec`."""
    name, *opts = spec.split("+")
    config = importlib.import_module(package(name).__name__ + ".config")
    system_mod = importlib.import_module(package(name).__name__ + ".system")
    training = importlib.import_module(package(name).__name__ + ".training")
    speed = importlib.import_module(package(name).__name__ + ".training.speed")
    sets = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    cfg = config.make_config(a.dataset, a.preset, {"train.batch_size": a.batch_size, **sets})
    torch.manual_seed(0)
    system = system_mod.Iodine(cfg)
    fit = speed.speed_settings("cpu")                  # what fit does on this CPU
    amp = None if "f32" in opts else fit.amp
    cl = True if "cl" in opts else False if "nchw" in opts else fit.channels_last
    system.use_fast_paths(amp, channels_last=cl)
    if "compile" in opts:
        for m in (system.model.decoder, system.guide.net.convs):
            m.forward = torch.compile(m.forward)       # the bound method: the module keeps its names
    if "compile_elu" in opts:
        for net in (system.model.decoder, system.guide.net.convs):
            for m in net.modules():
                if isinstance(m, torch.nn.ELU):
                    m.forward = CompiledELU.apply
    opt = training.make_optimizer(system, cfg)
    return system, opt, lambda x: training.train_step(system, opt, x, cfg.train.clip_norm)


def image_shape(system) -> tuple[int, ...]:
    return (system.cfg.model.image_channels, *system.cfg.model.image_size)


_elu = torch.compile(torch.nn.functional.elu, dynamic=False)


class CompiledELU(torch.autograd.Function):
    """ELU (alpha 1) with an inductor-compiled forward and aten's backward from the output."""

    @staticmethod
    def forward(ctx, x):
        y = _elu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(g, 1.0, 1, 1, True, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="ref,new", help="comma-separated; the first is the reference")
    p.add_argument("--ref", default="HEAD", help="git revision of the `ref` package")
    p.add_argument("--dataset", default="tetrominoes")
    p.add_argument("--preset", default="fast")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="a configuration override, e.g. guide.kind='\"amortized\"'")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pyro.enable_validation(False)                      # as fit
    specs = a.variants.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench_step_speed_"))
    try:
        if any(s.split("+")[0] == "ref" for s in specs):
            ref_package(a.ref, tmp)
        built = {}
        for s in specs:
            t0 = os.times()
            built[s] = build(s, a)
            built[s][2](torch.rand(a.batch_size, *image_shape(built[s][0]), generator=torch.Generator().manual_seed(0)))
            t1 = os.times()
            print(f"{s}: built and first step in {t1.user + t1.system - t0.user - t0.system:.1f} CPU s, "
                  f"{t1.children_user + t1.children_system - t0.children_user - t0.children_system:.1f} CPU s "
                  f"of child processes (inductor's compiler), {t1.elapsed - t0.elapsed:.1f} s wall", flush=True)
        x = torch.rand(a.batch_size, *image_shape(built[specs[0]][0]), generator=torch.Generator().manual_seed(1))
        cpu = {s: [] for s in specs}
        for r in range(a.warmup + a.steps):
            order = specs[r % len(specs):] + specs[:r % len(specs)]
            for s in order:
                torch.manual_seed(1000 + r)
                c0 = time.process_time()
                loss, *_ = built[s][2](x)
                dt = time.process_time() - c0
                if r >= a.warmup:
                    cpu[s].append(dt)
        base = specs[0]
        print(f"{a.dataset} {a.preset} batch {a.batch_size}, {torch.get_num_threads()} thread(s), "
              f"{a.steps} rounds, ref = {a.ref}")
        print("| variant | CPU s/step (median) | min | max | speed vs first (medians) | paired median ratio |")
        print("|---|---:|---:|---:|---:|---:|")
        for s in specs:
            med = statistics.median(cpu[s])
            paired = statistics.median(b / v for b, v in zip(cpu[base], cpu[s]))
            print(f"| {s} | {med:.4f} | {min(cpu[s]):.4f} | {max(cpu[s]):.4f} | "
                  f"{statistics.median(cpu[base]) / med:.3f} | {paired:.3f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
