"""Peak memory of one training step over the number of refinement steps T (appendix A.2).

Each configuration runs in a fresh Python process: it builds the system and a batch of
random inputs (sequences of T frames for sequence datasets, images otherwise), records its
resident memory (VmRSS), resets the peak (``/proc/self/clear_refs``; without it the
process's lifetime peak ``ru_maxrss`` is used), runs inference (``Iodine.infer``, no
gradients) and records its peak, resets the peak again and runs one training step (loss,
backward, gradient clipping, Adam). The peak resident memory (VmHWM) of that step is the
figure. Both peaks include the process's baseline (Python, torch, the model).

    python benchmarks/bench_memory.py --dataset objects_room_sequences --iters 16 --batch-size 4
    python benchmarks/bench_memory.py --dataset objects_room_sequences --iters 16 --batch-size 4 \\
        --compare-iters 4 --both          # T = 4 and 16, recomputation on and off, ratios

The last line is ``peak_rss_mb=<peak resident memory of one training step>`` of the
configuration given by --iters, --batch-size and --recompute (default: the dataset's).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch

from iodine_pyro.config import make_config
from iodine_pyro.system import Iodine


def _status_mb(field: str) -> float | None:
    """A VmRSS / VmHWM line of /proc/self/status, in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(reset: bool) -> float:
    hwm = _status_mb("VmHWM") if reset else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(dataset: str, iters: int, batch_size: int, recompute: bool | None, frames: bool,
            threads: int | None) -> dict:
    """One configuration, in this process."""
    if threads:
        torch.set_num_threads(threads)
    pyro.enable_validation(False)
    torch.manual_seed(0)
    overrides = {"guide.num_iters": iters, "train.batch_size": batch_size}
    if recompute is not None:
        overrides["guide.recompute"] = recompute
    cfg = make_config(dataset, overrides=overrides)
    m = cfg.model
    system = Iodine(cfg)
    opt = torch.optim.Adam(system.parameters(), lr=cfg.train.lr)
    shape = (batch_size, iters) if frames else (batch_size,)
    x = torch.rand(*shape, m.image_channels, *m.image_size)     # [B, (T,) C, H, W]
    gc.collect()
    baseline = _status_mb("VmRSS") or 0.0
    reset = _reset_peak()
    with torch.no_grad():                                         # inference first: its peak is
        system.infer(x)                                           # not inflated by training's heap
    infer_peak = _peak_mb(reset)
    gc.collect()
    reset = _reset_peak()
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = system.loss(x)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(system.parameters(), cfg.train.clip_norm)
    opt.step()
    step_s = time.perf_counter() - start
    peak = _peak_mb(reset)
    return {"dataset": dataset, "iters": iters, "batch_size": batch_size, "recompute": cfg.guide.recompute,
            "frames": frames, "image_size": list(m.image_size), "num_slots": m.num_slots,
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
            "infer_peak_rss_mb": round(infer_peak, 1), "step_s": round(step_s, 3),
            "peak_reset": reset, "threads": torch.get_num_threads()}


def run_child(args, iters: int, recompute: bool | None) -> dict:
    """`measure` in a fresh process."""
    cmd = [sys.executable, __file__, "--child", "--dataset", args.dataset, "--iters", str(iters),
           "--batch-size", str(args.batch_size), "--frames" if args.frames else "--no-frames"]
    if recompute is not None:
        cmd.append("--recompute" if recompute else "--no-recompute")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="objects_room_sequences")
    p.add_argument("--iters", type=int, default=16, help="T (for sequences: frames, one step each)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (default: the dataset's setting)")
    p.add_argument("--frames", action=argparse.BooleanOptionalAction, default=None,
                   help="feed sequences [B, T, C, H, W] (default: for *_sequences datasets)")
    p.add_argument("--compare-iters", type=int, nargs="*", default=[],
                   help="also measure these T and print the ratios to them")
    p.add_argument("--both", action="store_true", help="measure with recomputation on and off")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.frames is None:
        args.frames = args.dataset.endswith("_sequences")
    if args.child:
        print(json.dumps(measure(args.dataset, args.iters, args.batch_size, args.recompute, args.frames,
                                 args.threads)))
        return
    settings = [args.recompute] if not args.both else [True, False]
    rows = {}
    for recompute in settings:
        for iters in sorted({*args.compare_iters, args.iters}):
            r = run_child(args, iters, recompute)
            rows[(iters, recompute)] = r
            print(f"T={iters:<3} B={r['batch_size']:<3} recompute={'on ' if r['recompute'] else 'off'} "
                  f"baseline_rss_mb={r['baseline_rss_mb']:<8} peak_rss_mb={r['peak_rss_mb']:<8} "
                  f"above_baseline_mb={r['peak_rss_mb'] - r['baseline_rss_mb']:<8.1f} "
                  f"infer_peak_rss_mb={r['infer_peak_rss_mb']:<8} step_s={r['step_s']}", flush=True)
    for recompute in settings:
        top = rows[(args.iters, recompute)]
        for iters in args.compare_iters:
            r = rows[(iters, recompute)]
            above = (top["peak_rss_mb"] - top["baseline_rss_mb"]) / max(r["peak_rss_mb"] - r["baseline_rss_mb"], 1e-9)
            print(f"ratio T={args.iters}/T={iters} recompute={'on' if top['recompute'] else 'off'}: "
                  f"peak {top['peak_rss_mb'] / r['peak_rss_mb']:.3f}x, above baseline {above:.3f}x, "
                  f"inference peak {top['infer_peak_rss_mb'] / r['infer_peak_rss_mb']:.3f}x")
    if args.both:
        on, off = rows[(args.iters, True)], rows[(args.iters, False)]
        print(f"recompute at T={args.iters}: step time {on['step_s'] / off['step_s']:.2f}x, "
              f"peak {on['peak_rss_mb'] / off['peak_rss_mb']:.3f}x of not recomputing")
    main_row = rows[(args.iters, settings[0])]
    print(f"peak_rss_mb={main_row['peak_rss_mb']}")


if __name__ == "__main__":
    main()
