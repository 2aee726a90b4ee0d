"""What became of each object: where a run's FG-ARI below 1 comes from.

FG-ARI averages every failure into one number. This sorts the objects of the first
`--num-images` held-out images of each run (a run directory, checkpoint or
`pretrained:NAME`; last refinement step, the same seeded inference as `evaluate`) by
`iodine_pyro.metrics.object_fates`: `merged` (one slot for two objects), `cut` (its slot
holds less than `--clean-share` of it) or `clean`, with each fate's median area in
pixels, the mean share its slot holds, where the rest went on average (the background's
slots, other objects' slots, spare slots) and how many share their own slot with the
background; then the mean FG-ARI of the images by their number of objects.
`--batch-size` is part of the seeded draw: `evaluate` with the same batch size gives the
same FG-ARI (0.01 apart between batch sizes 32 and 64 on Multi-dSprites).

    python benchmarks/object_fates.py weights/multi_dsprites-bg --num-images 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import json

import torch

from iodine_pyro.evaluate import inferred_batches
from iodine_pyro.metrics import FATES, ari, object_fates, summarize
from iodine_pyro.run import IMAGES, Run


def fates(ref: str, num_images: int, clean_share: float = 0.8, batch_size: int = 32) -> dict:
    run = Run.of(ref, "cpu", None)
    ds, where = run.dataset(None, need=IMAGES, command="object_fates")
    background = run.background_groups(ds)
    n = min(num_images, ds.sizes["image"])
    parts: dict[str, list[torch.Tensor]] = {}
    fg_ari = []
    for _, true, steps in inferred_batches(run, ds, num_images=n, batch_size=batch_size, progress=True, desc="fates"):
        if true is None:
            raise SystemExit(f"{where} has no ground-truth masks: no objects to follow")
        masks = steps[-1].masks                                                     # [b, K, H, W]
        for k, v in object_fates(true, masks, background, clean_share)._asdict().items():
            parts.setdefault(k, []).append(v)
        fg_ari.append(ari(true, masks, foreground_only=background))
    f = {k: torch.cat(v) for k, v in parts.items()}
    fate, area, fg_ari = f["fate"], f["area"], torch.cat(fg_ari)
    present = fate >= 0
    total = int(present.sum())
    rows = {}
    for i, name in enumerate(FATES):
        sel = fate == i
        rows[name] = {"objects": int(sel.sum()), "fraction": int(sel.sum()) / max(total, 1),
                      "median_area": float(area[sel].median()) if sel.any() else float("nan"),
                      **{k: float(f[k][sel].mean()) if sel.any() else float("nan")
                         for k in ("share", "to_background", "to_objects", "to_spare")},
                      "with_background": int((sel & f["with_background"]).sum())}
    count = present.sum(1)
    by_count = {int(c): {"images": int((count == c).sum()), "fg_ari": summarize(fg_ari[count == c])}
                for c in count.unique()}
    return {"run": ref, "step": run.step, "images": n, "data": str(where), "objects": total,
            "clean_share": clean_share, "fates": rows, "fg_ari": summarize(fg_ari), "by_objects": by_count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories, checkpoints or pretrained:NAME")
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--clean-share", type=float, default=0.8,
                   help="the share of its pixels an object's slot must hold to be clean")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference call (as evaluate's)")
    p.add_argument("--json", help="write the results to this file")
    a = p.parse_args()
    results = []
    for ref in a.runs:
        r = fates(ref, a.num_images, a.clean_share, a.batch_size)
        results.append(r)
        print(f"{ref} at step {r['step']}: {r['objects']} objects in {r['images']} images, "
              f"FG-ARI {r['fg_ari']:.3f}")
        print(f"  {'fate':<7} {'objects':>8} {'of all':>7} {'median area':>11} {'held':>6} "
              f"{'to bg':>6} {'to objs':>7} {'to spare':>8} {'own slot is bg':>14}")
        for name, v in r["fates"].items():
            print(f"  {name:<7} {v['objects']:>8} {v['fraction']:>7.1%} {v['median_area']:>11.0f} "
                  f"{v['share']:>6.3f} {v['to_background']:>6.3f} {v['to_objects']:>7.3f} {v['to_spare']:>8.3f} "
                  f"{v['with_background']:>14}")
        print("  " + ", ".join(f"{c} objects: {v['images']} images, FG-ARI {v['fg_ari']:.3f}"
                               for c, v in r["by_objects"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
