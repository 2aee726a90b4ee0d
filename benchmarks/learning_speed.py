"""How fast does IODINE learn? Variants trained side by side for a fixed time budget.

Every variant trains on the same generated Tetrominoes images with the project's own
`fit`, one thread per run, for ``--budget`` minutes of *CPU time* (thread-seconds: what an
idle core would take, whatever else runs on the machine), and is evaluated on the same
held-out images at ``--evals`` evenly spaced points of its budget (evaluation time is not
counted). Runs are resumable: run the same command again and finished points are kept,
unfinished runs continue exactly from their checkpoints. A run stopped by a signal
(Ctrl-C, SIGTERM) checkpoints where it stands and records no point; resumed, its next
point comes one full spacing (budget / evals) of CPU time later.

Writes under ``--out``:

* ``results.jsonl``: one row per (variant, seed, point): step, images seen, CPU and wall
  seconds, held-out FG-ARI, ARI, MSE and KL of the last refinement step;
* ``summary.md``: the table of every variant measured in ``--out`` (by this call or an
  earlier one) at the largest CPU time all its seeds reached (mean and per-seed values);
* ``curves.png`` / ``curves.json``: FG-ARI, ARI, MSE and KL against CPU time, per variant.

    python benchmarks/learning_speed.py --budget 30 --seeds 0 1 --parallel 2
    python benchmarks/learning_speed.py --budget 1 --evals 2 --variants paper fast --seeds 0   # a smoke run
    python benchmarks/learning_speed.py --rows docs/img/background_levers_results.jsonl \
        --variants fast-anneal-0.2-k6-goal fast-anneal-0.2-k6-goal-k5 --until 120 --out runs/kswitch   # kept rows

The variants are `VARIANTS` below: the `paper` preset, the study's `base` recipe, and the
base with one lever set back (to the paper's value, or to the other
choice), and the background levers against the ``fast`` preset; a variant in `LATER` changes
what a resume may change (the schedule, K) from one of its points on, each later point a
``fit --resume`` with those settings. Seeds may run to different
budgets (rerun with a larger ``--budget`` and the same ``--evals`` spacing to extend one):
the table compares each variant's seeds at the largest CPU time all of them reached, and
gives its longest run beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The study's base recipe: the fast preset as the study began (no learning-rate decay), with
# PyTorch's init. Every `base-*` variant changes one lever of it; `base-sonnet-init` is the
# fast preset without its decay, which starts at step 3,000 (after every run of the study).
BASE = ("fast", {"train.init": "torch", "train.lr_decay": 1.0})

# sigma 0.3 -> 0.1 over steps 1,000-2,000, the annealing the background levers build on
ANNEAL = {"train.pixel_scale_final": 0.1, "train.pixel_anneal_start": 1000, "train.pixel_anneal_steps": 1000}

# name: (what it is, preset, overrides on top of that preset, amp)
VARIANTS: dict[str, tuple[str, str, dict, bool]] = {
    "paper": ("the paper: sigma 0.1, lr 3e-4, batch 32, PyTorch init", "paper", {}, True),
    "base": ("sigma 0.3, lr 1e-3 (200-step warm-up), batch 8, GECO MSE 0.01", *BASE, True),
    "base-sigma0.1": ("base with the paper's pixel sigma 0.1", BASE[0], {**BASE[1], "model.pixel_scale": 0.1}, True),
    "base-lr3e-4": ("base with lr 3e-4, no warm-up", BASE[0],
                    {**BASE[1], "train.lr": 3e-4, "train.warmup_steps": 0}, True),
    "base-batch32": ("base at batch 32", BASE[0], {**BASE[1], "train.batch_size": 32}, True),
    "base-sonnet-init": ("base with the released code's init: the fast preset before step 3,000", BASE[0],
                         {**BASE[1], "train.init": "sonnet"}, True),
    "base-all-detached": ("base with every refinement input stop-gradient", BASE[0],
                          {**BASE[1], "guide.stop_gradient": "ALL"}, True),
    "base-batch-mean-grads": ("base with gradients of the batch mean", BASE[0],
                              {**BASE[1], "guide.grad_reduction": "batch_mean"}, True),
    "base-fp32": ("base in float32 (no bf16 autocast)", *BASE, False),
    "base-no-geco": ("base without GECO (the plain ELBO)", BASE[0], {**BASE[1], "train.geco_goal": None}, True),
    # The background levers, each against the fast preset as it is (with its decay). They act
    # once segmentation has begun: from step 1,000 (about 11 CPU-minutes on the AMX Xeon).
    "fast": ("the fast preset", "fast", {}, True),
    "fast-anneal": ("fast, pixel sigma 0.3 -> 0.1 over steps 1,000-2,000", "fast", ANNEAL, True),
    "fast-anneal-lr": ("fast-anneal with lr halved every 1,000 steps (5e-4 from step 1,000, 2.5e-4 from 2,000)", "fast",
                       {**ANNEAL, "train.lr_decay_steps": 1000}, True),
    "fast-anneal-0.15": ("fast, pixel sigma 0.3 -> 0.15 over steps 1,000-2,000", "fast",
                         {**ANNEAL, "train.pixel_scale_final": 0.15}, True),
    "fast-anneal-0.2": ("fast, pixel sigma 0.3 -> 0.2 over steps 1,000-2,000", "fast",
                        {**ANNEAL, "train.pixel_scale_final": 0.2}, True),
    "fast-anneal-0.15-const": ("fast-anneal-0.15 at a constant lr 1e-3 (no decay)", "fast",
                               {**ANNEAL, "train.pixel_scale_final": 0.15, "train.lr_decay": 1.0}, True),
    "fast-anneal-0.2-k5": ("fast-anneal-0.2 with 5 slots for Tetrominoes' 3 objects and background (K = 4)", "fast",
                           {**ANNEAL, "train.pixel_scale_final": 0.2, "model.num_slots": 5}, True),
    "fast-anneal-0.2-k6": ("fast-anneal-0.2 with 6 slots: two to spare", "fast",
                           {**ANNEAL, "train.pixel_scale_final": 0.2, "model.num_slots": 6}, True),
    "fast-anneal-0.2-k6-goal": ("fast-anneal-0.2-k6 with GECO's goal at MSE 0.005: beta kept at its floor longer",
                                "fast", {**ANNEAL, "train.pixel_scale_final": 0.2, "model.num_slots": 6,
                                         "train.geco_goal": 0.005}, True),
    "fast-anneal-0.25-k5": ("fast, pixel sigma 0.3 -> 0.25 over steps 1,000-2,000, with 5 slots", "fast",
                            {**ANNEAL, "train.pixel_scale_final": 0.25, "model.num_slots": 5}, True),
    "fast-anneal-return": ("fast-anneal with sigma back to 0.3 over steps 2,500-3,500: the background gathered, "
                           "then the objects separated", "fast", {**ANNEAL, "train.pixel_return_start": 2500}, True),
    "fast-anneal-release": ("fast-anneal with GECO's beta back to 1 from step 1,000: the paper's ELBO at sigma 0.1",
                            "fast", {**ANNEAL, "train.geco_release_step": 1000}, True),
    "fast-geco-release": ("fast, GECO's beta back to 1 from step 1,000", "fast",
                          {"train.geco_release_step": 1000}, True),
    "fast-last-2": ("fast, gradient through the last 2 decoder passes only (first-order before them)", "fast",
                    {"guide.grad_steps": 2}, True),
    "fast-first-slot": ("fast, slot 1 refined from its own trained lambda_1", "fast",
                        {"guide.first_slot_init": True}, True),
    "fast-anneal-0.2-k6-goal-k5": ("fast-anneal-0.2-k6-goal, then 5 slots from 88 CPU-minutes on (a resume with "
                                   "`--num-slots 5`)", "fast", {**ANNEAL, "train.pixel_scale_final": 0.2,
                                                              "model.num_slots": 6, "train.geco_goal": 0.005}, True),
}
# variant: (CPU minutes, overrides): from that much training on, each point resumes the run
# with the overrides, as `fit --resume` would (only what a resume may change: the schedule, K)
LATER: dict[str, tuple[float, dict]] = {
    "fast-anneal-0.2-k6-goal-k5": (88.0, {"model.num_slots": 5}),
}
METRICS = ("fg_ari", "ari", "bg_slots", "bg_share", "mse", "kl")


def overrides_of(variant: str) -> tuple[str, dict, bool]:
    from iodine_pyro.config import make_config

    _, preset, overrides, amp = VARIANTS[variant]
    overrides = dict(overrides)
    if overrides.get("guide.stop_gradient") == "ALL":
        overrides["guide.stop_gradient"] = make_config("tetrominoes", preset).guide.inputs
    return preset, overrides, amp


def applies(variant: str) -> bool:
    """A lever that the base already has at that value is not a variant."""
    from iodine_pyro.config import make_config

    if not variant.startswith("base-"):
        return True
    preset, overrides, amp = overrides_of(variant)
    base = make_config("tetrominoes", BASE[0], BASE[1]).to_dict()
    changed = make_config("tetrominoes", preset, overrides).to_dict()
    return changed != base or not amp


def worker(a) -> None:
    """Train one (variant, seed) to its budget, evaluating at each point (run in a subprocess)."""
    import torch

    from iodine_pyro.checkpoint import read_metrics
    from iodine_pyro.evaluate import evaluate
    from iodine_pyro.run import Run
    from iodine_pyro.training import fit

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    run = out / "runs" / f"{a.variant}-s{a.seed}"
    results = out / "results.jsonl"
    done = {r["point"] for r in read_rows(results) if (r["variant"], r["seed"]) == (a.variant, a.seed)}
    preset, overrides, amp = overrides_of(a.variant)
    spacing = a.budget / a.evals
    for point in range(1, a.evals + 1):
        if point in done:
            continue
        later_min, later = LATER.get(a.variant, (math.inf, {}))
        resume = (point - 1) * spacing >= later_min - 1e-9        # this point trains after the change
        result = fit(out=run, steps=10**9, dataset="tetrominoes", preset=preset,
                     overrides={**overrides, **later} if resume else overrides, resume=resume,
                     data=out / "data" / "train", eval_data=out / "data" / "test", seed=a.seed,
                     log_every=100, checkpoint_every=10**9, progress=False, amp=amp,
                     time_limit=spacing * 60, time_clock="cpu")
        if result.stopped == "signal":   # short of the point: its steps are in the checkpoint, and the
            # point is measured from there when the study is resumed
            print(f"{a.variant} seed {a.seed}: stopped at step {result.step} before point {point}; "
                  "resume to measure it", flush=True)
            return
        rows = read_metrics(run)
        trained = Run.open(run)                                       # the checkpoint, loaded once
        res = evaluate(trained, num_images=a.eval_images, batch_size=64, progress=False)
        spent = trained.ckpt["extra"]["spent"]
        row = {"variant": a.variant, "seed": a.seed, "point": point, "step": result.step,
               "images": result.step * make_batch(preset, overrides),
               "cpu_min": spent["cpu_time"] / 60, "wall_min": spent["time"] / 60,
               **{k: res[k][-1] for k in METRICS}, "logged": rows[-1] if rows else {}}
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{a.variant} seed {a.seed} point {point}/{a.evals}: step {result.step}, "
              f"{row['cpu_min']:.1f} CPU min, FG-ARI {row['fg_ari']:.3f}, MSE {row['mse']:.4f}", flush=True)


def make_batch(preset: str, overrides: dict) -> int:
    from iodine_pyro.config import make_config
    return make_config("tetrominoes", preset, overrides).train.batch_size


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_data(out: Path, num_images: int, eval_images: int) -> None:
    from iodine_pyro.data import generate

    for name, n, seed in (("train", num_images, 0), ("test", eval_images, 10_000)):
        path = out / "data" / name
        if not path.exists():
            generate("tetrominoes", n, path, seed=seed, progress=False)


def far(cpu_min: float, common: float) -> bool:
    """Whether an evaluation at `cpu_min` is not at the budget `common` (a tenth apart)."""
    return abs(cpu_min - common) > 0.1 * common


def summarize(out: Path, rows: list[dict] | None = None, variants: list[str] | None = None) -> None:
    """summary.md and curves.png from results.jsonl: every variant measured in `out`, by
    this call or an earlier one, in the order of VARIANTS; or from `rows` (read from a
    results file elsewhere, such as the rows kept in docs/img), the `variants` given, in
    their order.

    Each variant is compared at the largest CPU time that all of its seeds reached: each
    seed's evaluation nearest to it (its CPU minutes beside its value where they differ by
    more than a tenth: seeds run with other budgets), with the longest run's value beside it."""
    import numpy as np

    from iodine_pyro.figures import draw_learning_speed

    rows = read_rows(out / "results.jsonl") if rows is None else rows
    lines = ["| variant | what | seeds | CPU min | steps | FG-ARI | ARI | bg slots | bg share | MSE | KL | "
             "FG-ARI per seed | longest run |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    curves = {}
    for v in variants or VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        if not mine:
            continue
        seeds = sorted({r["seed"] for r in mine})
        common = min(max(r["cpu_min"] for r in mine if r["seed"] == s) for s in seeds)
        at = [min((r for r in mine if r["seed"] == s), key=lambda r: abs(r["cpu_min"] - common)) for s in seeds]
        mean = {k: float(np.mean([r.get(k, np.nan) for r in at])) for k in (*METRICS, "cpu_min", "step")}
        per_seed = ", ".join(f"{r['fg_ari']:.3f}" + (f" ({r['cpu_min']:.0f} min)" if far(r["cpu_min"], common) else "")
                             for r in at)
        last = max(mine, key=lambda r: (r["cpu_min"], -r["seed"]))
        longest = (f"{last['fg_ari']:.3f} at {last['cpu_min']:.0f} min (seed {last['seed']})"
                   if far(last["cpu_min"], common) else "")
        lines.append(f"| {v} | {VARIANTS[v][0] if v in VARIANTS else ''} | {len(seeds)} | {mean['cpu_min']:.0f} | {mean['step']:.0f} | "
                     f"{mean['fg_ari']:.3f} | {mean['ari']:.3f} | {mean['bg_slots']:.2f} | {mean['bg_share']:.3f} | "
                     f"{mean['mse']:.4f} | "
                     f"{mean['kl']:.1f} | {per_seed} | {longest} |")
        curves[v] = {str(s): sorted(([r["cpu_min"], r["step"], *[r.get(k, np.nan) for k in METRICS]]
                                     for r in mine if r["seed"] == s)) for s in seeds}
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if curves:
        draw_learning_speed(curves, METRICS, out / "curves.png")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=None, help=f"variants to run (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--budget", type=float, default=30.0, help="CPU minutes of training per run")
    p.add_argument("--evals", type=int, default=6, help="held-out evaluations per run, evenly over the budget")
    p.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--num-images", type=int, default=20_000, help="generated training images")
    p.add_argument("--eval-images", type=int, default=256, help="held-out images")
    p.add_argument("--out", default="runs/learning-speed")
    p.add_argument("--rows", type=Path, help="train nothing: summarize and draw the --variants (default: every "
                   "one) of this results file into --out")
    p.add_argument("--until", type=float, help="with --rows: only the points of the first this many CPU minutes "
                   "(a point taken at that budget, a few seconds past it, is kept)")
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    out = Path(a.out)
    if a.worker:
        a.variant, a.seed = a.worker[0], int(a.worker[1])
        return worker(a)
    if a.rows is not None:
        rows = [r for r in read_rows(a.rows) if a.until is None or r["cpu_min"] <= a.until * 1.05]
        present = list(dict.fromkeys(r["variant"] for r in rows))
        unknown = [v for v in a.variants or () if v not in present]
        if not rows or unknown:
            p.error(f"{a.rows} has no rows" + (f" of {', '.join(unknown)}" if unknown else ""))
        out.mkdir(parents=True, exist_ok=True)
        return summarize(out, rows, a.variants or present)
    unknown = [v for v in a.variants or () if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {', '.join(unknown)}: one of {', '.join(VARIANTS)}")
    a.variants = a.variants or list(VARIANTS)
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(out, a.num_images, a.eval_images)
    variants = [v for v in a.variants if applies(v)]
    skipped = sorted(set(a.variants) - set(variants))
    if skipped:
        print(f"not run (the base already has that setting): {', '.join(skipped)}")
    jobs = [(v, s) for s in a.seeds for v in variants]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    t0 = time.time()

    def run(job):
        v, s = job
        cmd = [sys.executable, __file__, "--worker", v, str(s), "--budget", str(a.budget), "--evals", str(a.evals),
               "--threads", str(a.threads), "--eval-images", str(a.eval_images), "--out", str(out)]
        return subprocess.run(cmd, env=env).returncode

    with ThreadPoolExecutor(a.parallel) as pool:
        codes = list(pool.map(run, jobs))
    print(f"{len(jobs)} runs in {(time.time() - t0) / 60:.1f} wall minutes; exit codes {sorted(set(codes))}")
    summarize(out)
    if any(codes):
        sys.exit(1)


if __name__ == "__main__":
    main()
