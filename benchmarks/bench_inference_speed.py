"""Images per CPU-second of `evaluate`, `sample` and `compare`: this checkout against a git revision.

The three run the guide without a backward pass through the networks' weights: the
refinement's inner gradient reaches the latents only. Each is timed as its library
function runs it for the command, on ``pretrained:tetrominoes`` and its generated held-out
images, in this process on one thread (CPU seconds, `time.process_time`):

    evaluate   `evaluate.evaluate` of N images (batch 32)
    sample     `posterior.sample_posterior` of 16 images x S draws (batch 32)
    compare    `compare.compare` of M images, the IODINE guide alone, at fixed light settings
               (importance samples 100, per-step samples 4, q* capped at 50 steps, no
               generalisation, no time limit)

Variants: ``ref`` is `iodine_pyro` as of ``--ref`` (imported apart, as
`bench_step_speed.ref_package` does); ``new`` the working tree's, in float32; ``new+amp``
with bf16 autocast (``--amp``). Within each round the variants take turns (the order
rotates), so that other work on the machine slows them alike. Printed: images per CPU
second of each and the ratio against the first variant, with FG-ARI of `evaluate` so
that a change of the numbers shows. Nothing is asserted.

    OMP_NUM_THREADS=1 python benchmarks/bench_inference_speed.py                  # the issue's sizes
    OMP_NUM_THREADS=1 python benchmarks/bench_inference_speed.py --scale 0.25     # a quarter of each
    OMP_NUM_THREADS=1 python benchmarks/bench_inference_speed.py --tasks evaluate --ref 2d3bd59
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_speed import package, ref_package  # noqa: E402

RUN = "pretrained:tetrominoes"


def open_run(name: str, amp: bool):
    run_mod = importlib.import_module(package(name).__name__ + ".run")
    if name == "ref":
        return run_mod.Run.open(RUN)
    return run_mod.Run.open(RUN, amp=amp)


def task_evaluate(name: str, amp: bool, n: int) -> tuple[int, float]:
    evaluate = importlib.import_module(package(name).__name__ + ".evaluate").evaluate
    result = evaluate(open_run(name, amp), num_images=n, batch_size=32, progress=False)
    return n, result["fg_ari"][-1]


def task_sample(name: str, amp: bool, draws: int) -> tuple[int, float]:
    posterior = importlib.import_module(package(name).__name__ + ".posterior")
    run = open_run(name, amp)
    batch, _ = run.images(0, 16, command="sample")
    tree = posterior.sample_posterior(run.system, batch["image"], draws, batch_size=32, seed=0)
    return 16 * draws, float(tree["log_likelihood"]["x"].mean())


def task_compare(name: str, amp: bool, n: int) -> tuple[int, float]:
    compare = importlib.import_module(package(name).__name__ + ".compare").compare
    result = compare([open_run(name, amp)], num_images=n, iw_samples=4, evidence_samples=100, gap_steps=50,
                     generalize=False, time_limit=None, batch_size=16, progress=False)
    (r,) = result["runs"].values()
    return n, r["log_px"]


TASKS = {"evaluate": task_evaluate, "sample": task_sample, "compare": task_compare}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="ref,new,new+amp", help="comma-separated; the first is the reference")
    p.add_argument("--ref", default="HEAD", help="git revision of the `ref` package")
    p.add_argument("--tasks", default="evaluate,sample,compare")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of the sizes: evaluate 1,024 images, sample 100 draws, compare 64 images")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    specs, tasks = a.variants.split(","), a.tasks.split(",")
    sizes = {"evaluate": max(32, round(1024 * a.scale)), "sample": max(1, round(100 * a.scale)),
             "compare": max(16, round(64 * a.scale))}
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_speed_"))
    try:
        if any(s.split("+")[0] == "ref" for s in specs):
            ref_package(a.ref, tmp)
        for s in specs:                                 # the held-out set generated, untimed
            open_run(s.split("+")[0], False).dataset(need=None)
        cpu = {(t, s): [] for t in tasks for s in specs}
        value = {}
        for r in range(a.rounds):
            for t in tasks:
                order = specs[r % len(specs):] + specs[:r % len(specs)]
                for s in order:
                    name, *opts = s.split("+")
                    c0 = time.process_time()
                    images, value[t, s] = TASKS[t](name, "amp" in opts, sizes[t])
                    cpu[t, s].append(images / (time.process_time() - c0))
                    print(f"round {r + 1} {t} {s}: {cpu[t, s][-1]:.2f} images per CPU-second", flush=True)
        print(f"{RUN}, {torch.get_num_threads()} thread(s), {a.rounds} round(s), ref = {a.ref}; sizes {sizes}")
        print("| task | variant | images per CPU-second (median) | vs first | value |")
        print("|---|---|---:|---:|---:|")
        labels = {"evaluate": "FG-ARI", "sample": "mean log-lik", "compare": "log p(x)"}
        for t in tasks:
            base = statistics.median(cpu[t, specs[0]])
            for s in specs:
                med = statistics.median(cpu[t, s])
                print(f"| {t} | {s} | {med:.2f} | {med / base:.2f} | {labels[t]} {value[t, s]:.4f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
