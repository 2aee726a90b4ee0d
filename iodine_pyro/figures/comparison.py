"""The guide comparison's figure (``compare``): `iodine_pyro.compare` computes the result,
`draw_comparison` only draws it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import figures  # the package: functions are called through it, so a patched one is the one called


def draw_comparison(result: dict[str, Any], png: str | Path) -> Path:
    """ELBO, FG-ARI and MSE of `iodine_pyro.compare.compare` against the refinement step:
    guides that refine as lines with their trained T marked (dotted), one-shot guides as
    dashed horizontal lines, and each run's optimised per-image ELBO as a faint horizontal
    line in the ELBO panel."""
    from .drawing import plt

    runs = result["runs"]
    colors = figures.slot_colors(max(len(runs), 1))
    longest = max(r["steps"] for r in runs.values())
    panels = [("elbo", "ELBO (nats / image)"), ("fg_ari", "FG-ARI"), ("mse", "MSE")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False,
                             layout="constrained")
    for ax, (key, label) in zip(axes[0], panels):
        for c, (name, r) in zip(colors, runs.items()):
            values = r[key]
            if r["steps"] > 1:
                ax.plot(range(1, r["steps"] + 1), values, "o-", color=c, ms=3, label=name)
                ax.axvline(r["trained_step"], color=c, ls=":", lw=1)
            else:
                ax.axhline(values[0], color=c, ls="--", label=f"{name} ({r['guide']})")
            if key == "elbo" and r["optimized_elbo"] is not None and not math.isnan(r["optimized_elbo"]):
                ax.axhline(r["optimized_elbo"], color=c, ls="-", lw=0.8, alpha=0.4)
        ax.set_xlim(0.5, max(longest, 1) + 0.5)
        ax.set_xlabel("refinement step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['settings']['num_images']} images; dotted: trained T; faint: optimised ELBO",
                 fontsize=8)
    return figures.save_figure(fig, png)
