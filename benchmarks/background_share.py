"""Who holds the background: the share of each image's background pixels each slot holds.

`bg_slots` counts the slots that hold at least 1% of the background, so it cannot tell a
background split evenly over four slots from one held 97% by one slot with a few stray
pixels elsewhere; `bg_share` (`evaluate`, the training log) is the largest share one slot
holds, at every refinement step. This adds which slot holds it: for each run (a run
directory, checkpoint or `pretrained:NAME`), on the first `--num-images` images of its
held-out set, last refinement step, the mean share held by each slot index (a slot that a
guide sets apart, e.g. with ``guide.first_slot_init``, shows as its index), beside
`bg_share` (the mean over images of the largest share; 1.0: the background in one slot) and
`bg_slots`. The inference is `evaluate`'s seeded draw (`--batch-size` is part of it).

It also prints what the slots draw there: for the slots of each image ranked by their
share of its background (largest first), the mean over its background pixels and channels
of |mu_k - x|, each slot's own mean against the image. Where every slot draws the
background's colour, the mixture's likelihood is the same however the background is shared
out (each component scores those pixels alike), so no sigma moves it from slot to slot;
where the slots that do not hold it draw something else (their object's colour), a sharp
sigma holds it in the one that draws it.

    python benchmarks/background_share.py pretrained:tetrominoes runs/study-anneal/runs/fast-anneal-s0
"""

from __future__ import annotations

import argparse

import torch

from iodine_pyro.evaluate import inferred_batches
from iodine_pyro.metrics import owners, region_errors, region_shares
from iodine_pyro.run import IMAGES, Run


def shares(ref: str, num_images: int, batch_size: int = 32) -> dict:
    run = Run.of(ref, "cpu", False)
    ds, where = run.dataset(None, need=IMAGES, command="background_share")
    background = run.background_groups(ds)
    n = min(num_images, ds.sizes["image"])
    held, drawn = [], []
    for x, true, steps in inferred_batches(run, ds, num_images=n, batch_size=batch_size, progress=True,
                                           desc="shares"):
        if true is None:
            raise SystemExit(f"{where} has no ground-truth masks: nothing to say who holds the background")
        share = region_shares(true, steps[-1].masks, background)        # [B, K]
        held.append(share)
        drawn.append(region_errors(x, true, steps[-1].means, background)
                     .gather(1, share.nan_to_num(-1).argsort(1, descending=True)))
    held, drawn = torch.cat(held), torch.cat(drawn)                      # [n, K] each
    return {"run": ref, "step": run.step, "images": n, "data": str(where),
            "per_slot": held.nanmean(0).tolist(),
            "error_by_rank": drawn.nanmean(0).tolist(),
            "largest": float(held.max(1).values.nanmean()),
            "bg_slots": float(owners(held).nanmean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories, checkpoints or pretrained:NAME")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="images per inference call (as evaluate's)")
    a = p.parse_args()
    print(f"{'run':<48} {'step':>6} {'largest share':>13} {'bg slots':>8}  mean share by slot  |  "
          f"|mu - x| on the background, slots by share")
    for ref in a.runs:
        r = shares(ref, a.num_images, a.batch_size)
        per = " ".join(f"{v:.3f}" for v in r["per_slot"])
        err = " ".join(f"{v:.3f}" for v in r["error_by_rank"])
        print(f"{ref:<48} {r['step']:>6} {r['largest']:>13.3f} {r['bg_slots']:>8.2f}  {per}  |  {err}")


if __name__ == "__main__":
    main()
