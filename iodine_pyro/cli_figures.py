"""Commands `plot` and `ablate` (the paper's figures and input ablations).

    iodine-pyro plot KIND RUN_DIR... --out FILE.png [options]
    iodine-pyro ablate --dataset NAME --steps N --out DIR [--inputs a,b] [options]

Each `plot` writes FILE.png and the data behind it next to it: FILE.npz for the kinds that
run the model (decomposition, sequence, mask-logits, traversal, projection), FILE.json for the
curves (curves, ablation); `iodine_pyro.figures` documents the arrays.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class PlotKind(str, Enum):
    decomposition = "decomposition"
    sequence = "sequence"
    mask_logits = "mask-logits"
    traversal = "traversal"
    projection = "projection"
    curves = "curves"
    ablation = "ablation"


_MODEL_KINDS = {PlotKind.decomposition, PlotKind.sequence, PlotKind.mask_logits, PlotKind.traversal,
                PlotKind.projection}
_CURVE_KINDS = {PlotKind.curves, PlotKind.ablation}
# Options that only some kinds use; giving one to another kind is an error.
_OPTION_KINDS = {
    "--num-images": {PlotKind.decomposition, PlotKind.mask_logits, PlotKind.projection},
    "--steps": {PlotKind.decomposition},
    "--image": {PlotKind.traversal, PlotKind.sequence},
    "--slot": {PlotKind.traversal},
    "--range": {PlotKind.traversal},
    "--num-values": {PlotKind.traversal},
    "--data": _MODEL_KINDS,
    "--num-iters": _MODEL_KINDS,
    "--smooth": _CURVE_KINDS,
}
_DEFAULT_IMAGES = {PlotKind.decomposition: 4, PlotKind.mask_logits: 4, PlotKind.projection: 256}


def _user_error(message: str) -> Exception:
    from .cli import UserError

    return UserError(message)


def plot(
    kind: PlotKind = typer.Argument(..., metavar="KIND", help="Which figure to draw."),
    run_dirs: Optional[list[Path]] = typer.Argument(
        None, show_default=False, metavar="RUN_DIR",
        help="Run directory; several for curves; the ablation directory (of `ablate`) for ablation."),
    out: Path = typer.Option(..., help="PNG to write; the data behind it goes to FILE.npz or FILE.json."),
    num_images: Optional[int] = typer.Option(
        None, help="Images shown (decomposition: 4, or 2 with --steps; mask-logits: 4) or "
                   "projected (projection: 256)."),
    seed: int = typer.Option(0, help="Seed of posterior samples, the traversal's image and slot, and t-SNE."),
    steps: bool = typer.Option(False, "--steps", help="decomposition: every refinement step, not only the final one."),
    image: Optional[int] = typer.Option(
        None, help="traversal: image index (default: random, from --seed); sequence: sequence index (default 0)."),
    slot: Optional[int] = typer.Option(None, help="traversal: slot (default: random, from --seed)."),
    value_range: Optional[tuple[float, float]] = typer.Option(
        None, "--range", show_default=False,
        help="traversal: LOW HIGH offsets from the posterior mean, in prior standard deviations "
             "(default: -2 2)."),
    num_values: Optional[int] = typer.Option(None, help="traversal: values per latent dimension (default: 7)."),
    data: Optional[Path] = typer.Option(None, help="Dataset (default: the run's held-out set)."),
    num_iters: Optional[int] = typer.Option(None, help="Refinement iterations (default: the trained T)."),
    smooth: Optional[int] = typer.Option(
        None, help="curves, ablation: moving average over this many logged points (default: 1, none)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
):
    """Draw one of the paper's figures of a trained run as a PNG (and the data behind it)."""
    from . import figures

    run_dirs = list(run_dirs or [])
    if kind == PlotKind.curves and not run_dirs:
        raise _user_error("plot curves needs at least one run directory")
    if kind != PlotKind.curves and len(run_dirs) != 1:
        what = "an ablation directory" if kind == PlotKind.ablation else "one run directory"
        raise _user_error(f"plot {kind.value} takes {what}, got {len(run_dirs)}")
    given = {"--num-images": num_images, "--steps": steps or None, "--image": image, "--slot": slot,
             "--range": value_range if value_range and None not in value_range else None,
             "--num-values": num_values, "--data": data, "--num-iters": num_iters, "--smooth": smooth}
    for option, value in given.items():
        if value is not None and kind not in _OPTION_KINDS[option]:
            raise _user_error(f"{option} does not apply to plot {kind.value}")
    for option, value in [("--num-images", num_images), ("--num-iters", num_iters),
                          ("--num-values", num_values), ("--smooth", smooth)]:
        if value is not None and value < 1:
            raise _user_error(f"{option} must be at least 1, got {value}")
    n = num_images or (2 if steps else _DEFAULT_IMAGES.get(kind, 0))
    common = {"seed": seed, "data": data, "num_iters": num_iters, "device": device}
    run = run_dirs[0]
    if kind == PlotKind.decomposition:
        files = figures.decomposition(run, out, num_images=n, all_steps=steps, **common)
    elif kind == PlotKind.sequence:
        files = figures.sequence(run, out, image=image or 0, **common)
    elif kind == PlotKind.mask_logits:
        files = figures.mask_logits(run, out, num_images=n, **common)
    elif kind == PlotKind.traversal:
        files = figures.traversal(run, out, image=image, slot=slot,
                                  value_range=given["--range"] or (-2.0, 2.0),
                                  num_values=num_values or 7, **common)
    elif kind == PlotKind.projection:
        files = figures.projection(run, out, num_images=n, **common)
    elif kind == PlotKind.curves:
        files = figures.curves(run_dirs, out, smooth=smooth or 1)
    else:
        files = figures.ablation(run, out, smooth=smooth or 1)
    typer.echo(f"wrote {files.png} and {files.data}")


def ablate(
    dataset: str = typer.Option("tetrominoes", help="Dataset (generated) and its architecture preset."),
    steps: int = typer.Option(..., help="Optimisation steps of every run."),
    out: Path = typer.Option(..., help="Ablation directory: full/, no-<input>/ and data/ (resumed when there)."),
    inputs: Optional[str] = typer.Option(
        None, help="Comma-separated refinement inputs to leave out one at a time (default: all)."),
    preset: str = typer.Option("paper", help="paper (appendix C) or deepmind (released code)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step (default: the preset's)."),
    num_images: int = typer.Option(4096, help="Training images to generate (held-out: up to 1024)."),
    seed: int = typer.Option(0, help="Seed of the data and of every run."),
    log_every: int = typer.Option(25, help="Log metrics every N steps."),
    checkpoint_every: int = typer.Option(250, help="Write a checkpoint every N steps."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Train the full model and one model per refinement input left out (Figures 33 to 40).

    Then draws OUT/ablation.png. Running it again continues where it stopped.
    """
    from .ablate import AblationRun
    from .ablate import ablate as run_ablate
    from .config import ARCHITECTURES, PRESETS
    from .figures import ablation as plot_ablation

    for name, value in [("--steps", steps), ("--batch-size", batch_size), ("--num-images", num_images),
                        ("--log-every", log_every), ("--checkpoint-every", checkpoint_every)]:
        if value is not None and value < 1:
            raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=name)
    if dataset not in ARCHITECTURES:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; choose from {', '.join(sorted(ARCHITECTURES))}",
                                 param_hint="--dataset")
    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}",
                                 param_hint="--preset")
    names = None
    if inputs is not None:
        names = [n.strip() for n in inputs.split(",") if n.strip()]
        if not names:
            raise _user_error("--inputs names no refinement input")

    def report(run: AblationRun) -> None:
        head = f"[{run.index + 1}/{run.total}] {run.name}"
        if run.status == "start":
            typer.echo(f"{head}: training to step {steps}" + (f" from step {run.step}" if run.step else ""))
        elif run.status == "skipped":
            typer.echo(f"{head}: already at step {run.step}, skipped")
        else:
            m = run.last_metrics
            summary = ", ".join(f"{k}={m[k]:.4g}" for k in ("loss", "mse", "kl", "fg_ari") if k in m)
            how = "stopped by signal at" if run.status == "stopped" else "trained to"
            typer.echo(f"{head}: {how} step {run.step}" + (f": {summary}" if summary else ""))

    results = run_ablate(dataset, steps, out, names, seed, preset=preset, num_images=num_images,
                         batch_size=batch_size, log_every=log_every, checkpoint_every=checkpoint_every,
                         device=device, progress=not quiet, report=report)
    if results and results[-1].status == "stopped":
        typer.echo(f"stopped; run the same command again to continue in {out}")
        return
    files = plot_ablation(out, out / "ablation.png")
    typer.echo(f"wrote {files.png} and {files.data}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("plot")(plot)
    app.command("ablate")(ablate)
