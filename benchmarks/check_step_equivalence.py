"""Does this checkout compute the training step's loss and gradients as a git revision does?

The `fast` system of the working tree (``new``) and of git revision ``--ref`` (``ref``,
imported apart as in `bench_step_speed`) are built from the same seed, so with the same
parameters, and each computes the loss of one batch and its gradient with the same random
draws. Per setting (float64, float32, bf16 autocast; NCHW or channels-last weights) it
prints the relative difference of the loss and the largest over parameters of
||g_new - g_ref|| / ||g_ref||. In float64 a pure reformulation must agree to rounding
(``--tol64``, 1e-10). Under bf16 the two may round differently, so both are also
compared with the float32 step of the reference: the new step's error against it must be
of the size of the reference's own bf16 error (at most ``--bf16-factor`` times it), and
its loss within bf16's resolution of the float32 loss (``--bf16-loss``, 2^-9 relative).

    OMP_NUM_THREADS=1 python benchmarks/check_step_equivalence.py
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_speed import ref_package  # noqa: E402


def step(pkg: str, a, dtype: torch.dtype, amp: torch.dtype | None, cl: bool, seed: int):
    """(loss, {name: gradient}) of one step of package `pkg` (``iodine_pyro`` or ``iodine_pyro_ref``)."""
    config = importlib.import_module(pkg + ".config")
    system_mod = importlib.import_module(pkg + ".system")
    cfg = config.make_config(a.dataset, a.preset, {"train.batch_size": a.batch_size})
    torch.manual_seed(0)
    system = system_mod.Iodine(cfg).to(dtype).use_fast_paths(amp, channels_last=cl)
    x = torch.rand(a.batch_size, 3, 35, 35, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.manual_seed(seed)
    loss = system.loss(x.to(dtype), check=False)
    loss.backward()
    grads = {n: p.grad.detach().double().contiguous() for n, p in system.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def difference(a, b) -> tuple[float, float, str]:
    """(relative loss difference, largest relative gradient difference, its parameter)."""
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys(), "different parameters have gradients"
    worst = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-300), n) for n in gb)
    return abs(la - lb) / abs(lb), float(worst[0]), worst[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="HEAD")
    p.add_argument("--dataset", default="tetrominoes")
    p.add_argument("--preset", default="fast")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tol64", type=float, default=1e-10)
    p.add_argument("--bf16-factor", type=float, default=1.5)
    p.add_argument("--bf16-loss", type=float, default=2 ** -9, help="relative, against float32: bf16's resolution")
    a = p.parse_args()
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    tmp = Path(tempfile.mkdtemp(prefix="check_step_equivalence_"))
    ok = True
    try:
        ref_package(a.ref, tmp)
        for seed in a.seeds:
            print(f"seed {seed}:")
            for cl in (False, True):
                layout = "channels-last" if cl else "NCHW"
                for dtype in (torch.float64, torch.float32):
                    new, ref = (step(pkg, a, dtype, None, cl, seed) for pkg in ("iodine_pyro", "iodine_pyro_ref"))
                    dl, dg, name = difference(new, ref)
                    tol = a.tol64 if dtype == torch.float64 else 1e-4
                    good = dl <= tol and dg <= tol
                    ok &= good
                    print(f"  {str(dtype)[6:]:8s} {layout:13s} new vs ref: loss {dl:.2e}, gradients {dg:.2e} ({name})"
                          f"  {'ok' if good else 'DIFFERENT'} (tolerance {tol:g})")
                f32 = step("iodine_pyro_ref", a, torch.float32, None, False, seed)
                new, ref = (step(pkg, a, torch.float32, torch.bfloat16, cl, seed)
                            for pkg in ("iodine_pyro", "iodine_pyro_ref"))
                (nl, ng, nn_), (rl, rg, rn), (dl, dg, _) = difference(new, f32), difference(ref, f32), difference(new, ref)
                good = ng <= a.bf16_factor * rg and nl <= a.bf16_loss
                ok &= good
                print(f"  bf16     {layout:13s} against float32: new loss {nl:.2e}, gradients {ng:.2e} ({nn_}); "
                      f"ref loss {rl:.2e}, gradients {rg:.2e} ({rn}); new vs ref: loss {dl:.2e}, gradients {dg:.2e}"
                      f"  {'ok' if good else 'WORSE'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("equivalent" if ok else "NOT equivalent")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
