"""Command group `plot`: the paper's figures of trained runs, one subcommand per figure.

    iodine-pyro plot KIND RUN... --out FILE.png [options]

Each subcommand takes only its own options (``iodine-pyro plot traversal --help``) and
writes FILE.png and the data behind it next to it: FILE.npz for the figures that run the
model (decomposition, sequence, mask-logits, traversal, projection), FILE.json for the
curves (curves, ablation); `iodine_pyro.figures` documents the arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import Data, Device, NumIters, RunRef, Seed, Threads, use_threads

Out = Annotated[Path, typer.Option(help="PNG to write; the data behind it goes to FILE.npz or FILE.json.")]
Smooth = Annotated[int, typer.Option(min=1, help="Moving average over this many logged points (1: none).")]


def _model_figure(draw, run: str, out: Path, *, seed: int, data: Optional[Path], num_iters: Optional[int],
                  device: str, threads: Optional[int], **options) -> None:
    """Run the model for a figure on the command's threads, and say what it wrote."""
    use_threads(threads, device)
    files = draw(run, out, seed=seed, data=data, num_iters=num_iters, device=device, **options)
    typer.echo(f"wrote {files.png} and {files.data}")


def decomposition(
    run: RunRef, out: Out,
    num_images: Annotated[Optional[int], typer.Option(min=1, help="Images shown (default: 4, or 2 with --all-steps).")] = None,
    all_steps: Annotated[bool, typer.Option("--all-steps", help="Every refinement step, not only the final one.")] = False,
    seed: Seed = 0, data: Data = None, num_iters: NumIters = None, device: Device = "cpu", threads: Threads = None,
):
    """Images, reconstructions, masks and each slot's masked means (Figure 2 of the paper)."""
    from .. import figures

    _model_figure(figures.decomposition, run, out, num_images=num_images or (2 if all_steps else 4),
                  all_steps=all_steps, seed=seed, data=data, num_iters=num_iters, device=device, threads=threads)


def sequence(
    run: RunRef, out: Out,
    image: Annotated[int, typer.Option(min=0, help="Sequence index in the dataset.")] = 0,
    seed: Seed = 0, data: Data = None, num_iters: NumIters = None, device: Device = "cpu", threads: Threads = None,
):
    """A sequence run's decomposition of one sequence, frame by frame."""
    from .. import figures

    _model_figure(figures.sequence, run, out, image=image, seed=seed, data=data, num_iters=num_iters,
                  device=device, threads=threads)


def mask_logits(
    run: RunRef, out: Out,
    num_images: Annotated[int, typer.Option(min=1, help="Images shown.")] = 4,
    seed: Seed = 0, data: Data = None, num_iters: NumIters = None, device: Device = "cpu", threads: Threads = None,
):
    """Each slot's mask logits before the softmax, beside the true masks."""
    from .. import figures

    _model_figure(figures.mask_logits, run, out, num_images=num_images, seed=seed, data=data,
                  num_iters=num_iters, device=device, threads=threads)


def traversal(
    run: RunRef, out: Out,
    image: Annotated[Optional[int], typer.Option(min=0, help="Image index (default: random, from --seed).")] = None,
    slot: Annotated[Optional[int], typer.Option(min=0, help="Slot (default: random, from --seed).")] = None,
    value_range: Annotated[tuple[float, float], typer.Option(
        "--range", help="LOW HIGH offsets from the posterior mean, in prior standard deviations.")] = (-2.0, 2.0),
    num_values: Annotated[int, typer.Option(min=2, help="Values per latent dimension.")] = 7,
    dims: Annotated[Optional[int], typer.Option(
        min=1, help="The N latent dimensions with the most KL (default: 8; all with a larger N).")] = None,
    seed: Seed = 0, data: Data = None, num_iters: NumIters = None, device: Device = "cpu", threads: Threads = None,
):
    """One slot's latent dimensions traversed, the rest of the scene held (Figure 5 of the paper)."""
    from .. import figures

    _model_figure(figures.traversal, run, out, image=image, slot=slot, value_range=value_range,
                  num_values=num_values, num_dims=dims or figures.TRAVERSAL_DIMS, seed=seed, data=data, num_iters=num_iters,
                  device=device, threads=threads)


def projection(
    run: RunRef, out: Out,
    num_images: Annotated[int, typer.Option(min=1, help="Images projected.")] = 256,
    seed: Seed = 0, data: Data = None, num_iters: NumIters = None, device: Device = "cpu", threads: Threads = None,
):
    """Every slot's posterior mean projected to 2-D, coloured by the object it explains."""
    from .. import figures

    _model_figure(figures.projection, run, out, num_images=num_images, seed=seed, data=data,
                  num_iters=num_iters, device=device, threads=threads)


def curves(
    runs: Annotated[list[str], typer.Argument(metavar="RUN...", help="Run directories, one line each.")],
    out: Out, smooth: Smooth = 1,
):
    """Training curves of one or more runs (loss, MSE, KL, FG-ARI against steps), from metrics.jsonl."""
    from .. import figures

    files = figures.curves([Path(r) for r in runs], out, smooth=smooth)
    typer.echo(f"wrote {files.png} and {files.data}")


def ablation(
    ablation_dir: Annotated[Path, typer.Argument(metavar="DIR", help="The directory `ablate` wrote.")],
    out: Out, smooth: Smooth = 1,
):
    """The input ablations' curves (Figure 7 of the paper): the full model against each input left out."""
    from .. import figures

    files = figures.ablation(ablation_dir, out, smooth=smooth)
    typer.echo(f"wrote {files.png} and {files.data}")


def register(plot_app: typer.Typer) -> None:
    for command in (decomposition, sequence, mask_logits, traversal, projection, curves, ablation):
        plot_app.command(command.__name__.replace("_", "-"))(command)
