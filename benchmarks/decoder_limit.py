"""What the decoder can draw: whether a run's segmentation is held back by its inference or
by its decoder.

For the first `--num-images` held-out images of each run (a run directory, checkpoint or
`pretrained:NAME`) this takes the guide's last refinement step (`evaluate`'s seeded draw)
and then fits each image's latents directly: Adam on z, started from the guide's posterior
mean, maximising log p(x | z) under the run's own decoder and pixel likelihood (no prior,
no guide; the decoder is fixed). The best z found is the decoder's best drawing of the
image from anywhere near where the guide put it, so its reconstruction and segmentation are
what better inference alone could reach with these weights. Printed for the guide's
sample (what `evaluate` scores), the guide's mean, and the fitted z: MSE, FG-ARI, ARI,
the largest background share and -log p(x | z).

If the fitted z reconstructs far better and segments better, inference is what limits the
run (more or better refinement); if it stays where the guide is, the decoder is.

    python benchmarks/decoder_limit.py weights/multi_dsprites-bg --num-images 32 --steps 300
"""

from __future__ import annotations

import argparse
import json

import torch

from iodine_pyro.evaluate import inferred_batches, score_steps
from iodine_pyro.guides.base import Step
from iodine_pyro.metrics import summarize
from iodine_pyro.run import IMAGES, Run
from iodine_pyro.system import StepResult

ROWS = ("guide sample", "guide mean", "fitted z")
SCORED = ["mse", "fg_ari", "ari", "bg_share", "nll"]                # rows of evaluate's METRICS table


def _scores(system, x: torch.Tensor, true: torch.Tensor, step: StepResult, background: int) -> dict[str, torch.Tensor]:
    """Per-image MSE, FG-ARI, ARI, background share and NLL of `step`, as `evaluate` scores them."""
    return {k: v[0] for k, v in score_steps(system, x, [step], true, background, SCORED).items()}


def _drawn(system, x: torch.Tensor, lam: torch.Tensor, z: torch.Tensor) -> StepResult:
    """The step that decodes z [B, K, n_z] (`lam` the guide's posterior, for its KL)."""
    return system.summarize(x, Step(lam, z, system.model.decode(z)))


def fit_latents(model, x: torch.Tensor, z0: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The z [B, K, n_z] of highest log p(x | z) met in `steps` Adam steps from `z0`, per image."""
    z = z0.detach().clone().requires_grad_()
    opt = torch.optim.Adam([z], lr=lr)
    best, best_z = torch.full((x.shape[0],), -float("inf"), dtype=torch.float64), z0.detach().clone()
    with torch.enable_grad():
        for _ in range(steps + 1):
            opt.zero_grad()
            lp = model.likelihood(model.decode(z)).log_prob(x)          # [B]
            better = lp.detach().double() > best
            best = torch.where(better, lp.detach().double(), best)
            best_z = torch.where(better.view(-1, 1, 1), z.detach(), best_z)
            (-lp.sum()).backward()
            opt.step()
    return best_z


def limit(ref: str, num_images: int, steps: int, lr: float, batch_size: int) -> dict:
    run = Run.of(ref, "cpu", None)
    ds, where = run.dataset(None, need=IMAGES, command="decoder_limit")
    background = run.background_groups(ds)
    system = run.system
    for p in system.parameters():
        p.requires_grad_(False)                                         # the decoder is fixed
    model = system.model
    parts: dict[str, dict[str, list[torch.Tensor]]] = {r: {} for r in ROWS}
    for x, true, inferred in inferred_batches(run, ds, num_images=num_images, batch_size=batch_size,
                                              progress=True, desc="fit z"):
        if true is None:
            raise SystemExit(f"{where} has no ground-truth masks: nothing to segment against")
        last = inferred[-1]
        mean = system.guide.posterior(last.lam).loc                      # [B, K, n_z]
        with torch.no_grad():
            fitted = fit_latents(model, x, mean, steps, lr)
            rows = {"guide sample": _scores(system, x, true, last, background),
                    "guide mean": _scores(system, x, true, _drawn(system, x, last.lam, mean), background),
                    "fitted z": _scores(system, x, true, _drawn(system, x, last.lam, fitted), background)}
        for r, values in rows.items():
            for k, v in values.items():
                parts[r].setdefault(k, []).append(v.cpu())
    return {"run": ref, "step": run.step, "images": min(num_images, ds.sizes["image"]), "data": str(where),
            "steps": steps, "lr": lr,
            "rows": {r: {k: summarize(torch.cat(v)) for k, v in values.items()} for r, values in parts.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories, checkpoints or pretrained:NAME")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--steps", type=int, default=300, help="Adam steps on each image's latents")
    p.add_argument("--lr", type=float, default=0.02, help="Adam's learning rate on the latents")
    p.add_argument("--batch-size", type=int, default=16, help="images per inference call (as evaluate's)")
    p.add_argument("--json", help="write the results to this file")
    a = p.parse_args()
    if a.num_images < 1 or a.steps < 0 or a.lr <= 0 or a.batch_size < 1:
        p.error("--num-images and --batch-size must be at least 1, --steps at least 0 and --lr positive")
    results = []
    for ref in a.runs:
        r = limit(ref, a.num_images, a.steps, a.lr, a.batch_size)
        results.append(r)
        print(f"{ref} at step {r['step']}: {r['images']} held-out images, last refinement step, "
              f"{a.steps} Adam steps on z (lr {a.lr})")
        print(f"  {'latents':<13} {'MSE':>8} {'FG-ARI':>7} {'ARI':>6} {'bg share':>8} {'-log p(x|z)':>12}")
        for name, v in r["rows"].items():
            print(f"  {name:<13} {v['mse']:>8.5f} {v['fg_ari']:>7.3f} {v['ari']:>6.3f} {v['bg_share']:>8.3f} "
                  f"{v['nll']:>12.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
