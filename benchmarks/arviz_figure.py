"""The picture of docs/posterior.md's ArviZ workflow: ArviZ's own plots of a posterior file.

    python benchmarks/arviz_figure.py                       # the shipped Tetrominoes model
    python benchmarks/arviz_figure.py --run runs/tet --out my.png

Samples the run's posterior (as ``iodine-pyro sample --predictive``) into a netCDF file,
reads it back with ``arviz.from_netcdf`` and draws ``plot_posterior``, ``plot_trace`` and
``plot_ppc`` into one PNG: nothing between the file and ArviZ but ArviZ.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from iodine_pyro.posterior import sample_posterior, write_samples  # noqa: E402
from iodine_pyro.run import Run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="pretrained:tetrominoes")
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "arviz_workflow.png"))
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--slot", type=int, default=1)
    a = p.parse_args()
    run = Run.open(a.run)
    batch, _ = run.images(0, 4)
    tree = sample_posterior(run.system, batch["image"], a.num_samples, predictive=True,
                            true_masks=batch["mask"], progress=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_samples(tree, Path(tmp) / "post.nc")
        idata = az.from_netcdf(path).load()
    one = {"image": 0, "slot": a.slot, "latent": [0, 1, 2]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(az.summary(idata, var_names=["z"], coords=one, kind="stats"))
        fig = plt.figure(figsize=(13, 8), layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
        left, right = bottom.subfigures(1, 2, width_ratios=[1.6, 1])
        az.plot_posterior(idata, var_names=["z"], coords=one, ax=top.subplots(1, 3), textsize=9)
        top.suptitle(f"az.plot_posterior: slot {a.slot}'s first three latents, image 0", fontsize=10)
        az.plot_trace(idata, var_names=["z"], coords=one, axes=left.subplots(1, 2, squeeze=False))
        left.suptitle("az.plot_trace: the draws (independent runs of the refinement)", fontsize=10)
        az.plot_ppc(idata, var_names=["x"], coords={"image": [0], "channel": [0]}, kind="cumulative",
                    num_pp_samples=min(50, a.num_samples), ax=right.subplots())
        right.suptitle("az.plot_ppc (cumulative): red channel of image 0", fontsize=10)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
