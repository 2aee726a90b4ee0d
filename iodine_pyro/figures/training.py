"""Training curves and input ablations (Figures 33 to 40), learning speed
(benchmarks/learning_speed.py) and the branches of a resumed run (benchmarks/branch_curves.py):
`curves_data` reads the runs' metrics (no matplotlib), `draw_curves` draws them, `curves`
and `ablation` write both (`write_figure`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import figures  # the package: functions are called through it, so a patched one is the one called
from ..checkpoint import METRICS, read_metrics
from .files import FigureFiles, png_path

CURVE_KEYS = ("loss", "mse", "kl", "fg_ari")
# metrics.jsonl key -> (panel title, y-axis label); the metrics are of one training batch
# at the final refinement step, the loss is the training objective sum_t w_t L_t.
CURVE_LABELS = {
    "loss": ("total loss", "weighted negative ELBO (nats)"),
    "mse": ("reconstruction MSE", "MSE, final step"),
    "kl": ("KL divergence", "KL, final step (nats)"),
    "fg_ari": ("segmentation FG-ARI", "FG-ARI, final step"),
    "ari": ("segmentation ARI", "ARI, final step"),
    "bg_slots": ("slots holding background", "slots per image, final step"),
    "bg_share": ("background held by one slot", "largest share, final step"),
}
FEW_POINTS = 5     # curves of fewer logged points are drawn as points only

# ---------------------------------------------------------------------------------------
# Training curves and input ablations (Figures 33 to 40)
# ---------------------------------------------------------------------------------------


def _metrics_of(run_dir: str | Path) -> list[dict[str, Any]]:
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"no {METRICS} in {run_dir}, or no metrics logged in it yet")
    return rows


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    names = [Path(r).resolve().name for r in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(r) for r in run_dirs]


def _smoothed(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` logged points (NaN-aware)."""
    if window <= 1:
        return y
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        chunk = y[max(0, i - window + 1):i + 1]
        if np.isfinite(chunk).any():
            out[i] = np.nanmean(chunk)
    return out


def _json_number(v) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def curves(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
           smooth: int = 1, title: str | None = None, highlight: str | None = None) -> FigureFiles:
    """Training curves of one or several runs overlaid: total loss, MSE, KL and FG-ARI
    against training steps, read from each run's metrics.jsonl (one panel per metric, one
    line per run, a legend when there are several). ``smooth`` > 1 draws a trailing moving
    average over that many logged points."""
    png = png_path(out)
    data = figures.curves_data(run_dirs, labels=labels, smooth=smooth)
    runs = data["runs"]
    if title is None:
        title = "Training curves" + (f" of {runs[0]['label']}" if len(runs) == 1 else f" of {len(runs)} runs")
    if smooth > 1:
        title += f"\n(moving average over {smooth} logged points)"
    return figures.write_figure(json.dumps(data, indent=1) + "\n", png, lambda path: figures.draw_curves(
        runs, data["keys"], path, title=title, smooth=smooth, highlight=highlight))


def curves_data(run_dirs: Sequence[str | Path], *, labels: Sequence[str] | None = None,
                smooth: int = 1) -> dict[str, Any]:
    """The data of `curves` (its JSON file), read without drawing: ``{"keys", "smooth",
    "runs": [{"label", "run_dir", "step", "loss", ...}]}``, a metric None where a row
    lacks it or it is not finite, and only the keys some run has."""
    if not run_dirs:
        raise ValueError("plot curves needs at least one run directory")
    if smooth < 1:
        raise ValueError(f"--smooth must be at least 1, got {smooth}")
    run_dirs = [Path(r) for r in run_dirs]
    labels = list(labels) if labels is not None else _labels(run_dirs)
    runs = []
    for label, run_dir in zip(labels, run_dirs):
        rows = _metrics_of(run_dir)
        entry: dict[str, Any] = {"label": label, "run_dir": str(run_dir),
                                 "step": [int(r["step"]) for r in rows]}
        for key in CURVE_KEYS:
            entry[key] = [_json_number(r.get(key)) for r in rows]
        runs.append(entry)
    keys = [k for k in CURVE_KEYS if any(v is not None for run in runs for v in run[k])]
    return {"keys": keys, "smooth": smooth, "runs": runs}


def _spans_decades(runs: list[dict[str, Any]], key: str) -> bool:
    """Whether `key` is positive throughout and spans more than a factor of 20 (log axis)."""
    values = np.array([v for run in runs for v in run[key] if v is not None], float)
    return values.size > 0 and values.min() > 0 and values.max() / values.min() > 20


def draw_curves(runs: list[dict[str, Any]], keys: Sequence[str], png: Path, title: str,
                smooth: int = 1, highlight: str | None = None) -> None:
    """Panels of `keys` against step, one line per run (``highlight`` drawn black and thick)."""
    from matplotlib.ticker import MaxNLocator

    from .drawing import plt

    cols = 2 if len(keys) > 1 else 1
    rows = math.ceil(len(keys) / cols)
    many = len(runs) > 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + (2.2 if many else 0), 3.0 * rows + 0.5),
                             squeeze=False, layout="constrained")
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        color_index = 0
        for run in runs:
            y = _smoothed(np.array([np.nan if v is None else v for v in run[key]], float), smooth)
            if run["label"] == highlight:
                style = {"color": "black", "linewidth": 2.2, "zorder": 3}
            else:
                style = {"color": palette(color_index % palette.N), "linewidth": 1.2}
                color_index += 1
            if len(y) < FEW_POINTS:  # a line through two or three points suggests a trend they cannot show
                style.update(marker="o", markersize=5, linestyle="none")
            elif len(y) <= 30:       # few logged points: mark them
                style.update(marker="o", markersize=3)
            ax.plot(run["step"], y, label=run["label"], **style)
        name, ylabel = CURVE_LABELS[key]
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "loss" and _spans_decades(runs, key):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if many:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=8, title="run", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    figures.save_figure(fig, png)


def ablation_runs(ablation_dir: str | Path) -> list[Path]:
    """The run directories of an ablation (``full`` first, then ``no-*`` by name)."""
    root = Path(ablation_dir)
    found = sorted(p for p in root.iterdir() if (p / METRICS).is_file()) if root.is_dir() else []
    if not found:
        raise ValueError(f"no ablation runs (*/{METRICS}) in {root}")
    return sorted(found, key=lambda p: (p.name != "full", p.name))


def ablation(ablation_dir: str | Path, out: str | Path, *, smooth: int = 1) -> FigureFiles:
    """Input ablations: total loss, MSE, KL and FG-ARI against training steps, one line per
    run of `iodine_pyro.ablate.ablate` (``full`` in black, ``no-<input>`` the model trained
    without that refinement input). Mirrors the paper's Figures 33 to 40 in one figure."""
    runs = figures.ablation_runs(ablation_dir)
    return figures.curves(runs, out, labels=[p.name for p in runs], smooth=smooth, highlight="full",
                          title=f"Refinement input ablations ({Path(ablation_dir).resolve().name}): "
                                f"the full model and one refinement input left out per run")


# ---------------------------------------------------------------------------------------
# Learning speed (benchmarks/learning_speed.py)
# ---------------------------------------------------------------------------------------


def draw_learning_speed(curves: dict[str, dict[str, list[list[float]]]], keys: Sequence[str],
                        png: str | Path, title: str = "Held-out metrics against training CPU time") -> FigureFiles:
    """Panels of held-out `keys` against CPU minutes, one colour per variant: each seed a
    thin line, their mean a thick one (``fast`` black, ``paper`` grey).

    Args:
        curves: {variant: {seed: [[cpu_min, step, *values of keys], ...]}}.
    """
    data = json.dumps({"keys": list(keys), "columns": ["cpu_min", "step", *keys], "curves": curves})
    return figures.write_figure(data, png, lambda path: _draw_learning_speed(curves, keys, path, title))


def _draw_learning_speed(curves: dict[str, dict[str, list[list[float]]]], keys: Sequence[str], png: Path,
                         title: str) -> None:
    from .drawing import plt

    cols = 2
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 2.6, 3.0 * rows + 0.5), squeeze=False,
                             layout="constrained")
    palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    fixed = {"fast": "black", "paper": "0.55"}
    others = iter(range(100))
    colors = {v: fixed.get(v) or palette(next(others) % palette.N) for v in curves}
    for ax, (j, key) in zip(axes.flat, enumerate(keys)):
        for v, seeds in curves.items():
            series = [np.array(points, float) for points in seeds.values()]
            for a in series:
                ax.plot(a[:, 0], a[:, 2 + j], color=colors[v], linewidth=0.7, alpha=0.45)
            n = min(len(a) for a in series)
            mean = np.mean([a[:n] for a in series], 0)
            ax.plot(mean[:, 0], mean[:, 2 + j], color=colors[v], linewidth=2.4 if v in fixed else 1.6,
                    marker="o", markersize=3, label=v)
        _held_out_panel(ax, key, "training CPU minutes (one thread)")
    _finish_panels(fig, axes, len(keys), "variant", title, png)


def _held_out_panel(ax, key: str, xlabel: str) -> None:
    """Title, axis labels and scale of a panel of held-out `key`."""
    name, ylabel = CURVE_LABELS[key]
    ax.set_title(f"held-out {name}", fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if key in ("mse", "kl"):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _finish_panels(fig, axes, used: int, legend_title: str, title: str, png: Path) -> None:
    """Blank the unused panels, put one legend beside them, title and write the figure."""
    for ax in axes.flat[used:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8, title=legend_title, title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    figures.save_figure(fig, png)


# ---------------------------------------------------------------------------------------
# Branches of a resumed run (benchmarks/branch_curves.py)
# ---------------------------------------------------------------------------------------
BRANCH_KEYS = ("fg_ari", "ari", "bg_share", "mse")


def branch_curves(rows: Sequence[dict[str, Any]], keys: Sequence[str] = BRANCH_KEYS) -> dict[str, list[list[float]]]:
    """The held-out evaluations of one run and of the copies resumed from it with other
    settings, as one curve per arm: ``{arm: [[step, cpu_min, *values of keys], ...]}`` by
    step, arms in the order they first appear.

    Each row names its ``arm``; the rows of an arm that branched from another name it and
    the step it left (``"parent": {"arm": ..., "step": ...}``, the same on each of them),
    and the parent's evaluation at that step starts the branch's curve, so a lever is seen
    leaving the line it was measured beside. Raises ValueError for a row without an arm or
    with one of the keys missing, a parent not given as an arm and a step, a parent that is
    not an arm of the rows, one arm given two parents, or a branch point the parent was not
    evaluated at."""
    curves: dict[str, list[list[float]]] = {}
    parents: dict[str, tuple[str, int]] = {}
    for i, r in enumerate(rows):
        arm = r.get("arm")
        if not isinstance(arm, str) or not arm:
            raise ValueError(f"row {i + 1} names no arm (an \"arm\" field)")
        missing = [k for k in ("step", "cpu_min", *keys) if k not in r]
        if missing:
            raise ValueError(f"row {i + 1} ({arm}) has no {', '.join(missing)}")
        curves.setdefault(arm, []).append([float(r["step"]), float(r["cpu_min"]), *(float(r[k]) for k in keys)])
        if r.get("parent") is not None:
            if not isinstance(r["parent"], dict) or not {"arm", "step"} <= set(r["parent"]):
                raise ValueError(f"row {i + 1} ({arm}): parent {r['parent']!r} is not {{\"arm\": ..., \"step\": ...}}")
            parent = (r["parent"]["arm"], int(r["parent"]["step"]))
            if parents.setdefault(arm, parent) != parent:
                raise ValueError(f"arm {arm!r} branches from both {parents[arm]} and {parent}")
    for arm, (parent, step) in parents.items():
        if parent not in curves or parent == arm:
            raise ValueError(f"arm {arm!r} branches from {parent!r}, which is not another arm of the rows")
        start = [p for p in curves[parent] if p[0] == step]
        if not start:
            raise ValueError(f"arm {arm!r} branches from {parent!r} at step {step:,}, where {parent!r} "
                             f"has no evaluation")
        curves[arm] = start[:1] + curves[arm]
    return {arm: sorted(points) for arm, points in curves.items()}


def draw_branches(rows: Sequence[dict[str, Any]], png: str | Path, keys: Sequence[str] = BRANCH_KEYS,
                  title: str = "Held-out metrics of a run and its branches") -> FigureFiles:
    """Panels of held-out `keys` against the training step, one line per arm of
    `branch_curves`, each branch drawn from its parent's point; ``PNG`` and its ``.json``
    (the plotted points) as a pair (`write_figure`)."""
    curves = branch_curves(rows, keys)
    data = json.dumps({"keys": list(keys), "columns": ["step", "cpu_min", *keys], "curves": curves})
    return figures.write_figure(data, png, lambda path: _draw_branches(curves, keys, path, title))


def _draw_branches(curves: dict[str, list[list[float]]], keys: Sequence[str], png: Path, title: str) -> None:
    from .drawing import plt

    cols = min(2, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols + 3.2, 3.0 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax, (j, key) in zip(axes.flat, enumerate(keys)):
        for arm, points in curves.items():
            a = np.array(points, float)
            ax.plot(a[:, 0], a[:, 2 + j], marker="o", markersize=3, linewidth=1.4, label=arm)
        _held_out_panel(ax, key, "training step")
    _finish_panels(fig, axes, len(keys), "arm", title, png)
