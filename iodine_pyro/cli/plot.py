"""Command `plot`: the paper's figures of trained runs.

    iodine-pyro plot KIND RUN... --out FILE.png [options]

Each `plot` writes FILE.png and the data behind it next to it: FILE.npz for the kinds that
run the model (decomposition, sequence, mask-logits, traversal, projection), FILE.json for the
curves (curves, ablation); `iodine_pyro.figures` documents the arrays.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import Data, Device, NumIters, Seed, Threads, UserError, at_least, use_threads


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
    "--all-steps": {PlotKind.decomposition},
    "--image": {PlotKind.traversal, PlotKind.sequence},
    "--slot": {PlotKind.traversal},
    "--range": {PlotKind.traversal},
    "--num-values": {PlotKind.traversal},
    "--dims": {PlotKind.traversal},
    "--data": _MODEL_KINDS,
    "--num-iters": _MODEL_KINDS,
    "--smooth": _CURVE_KINDS,
    "--threads": _MODEL_KINDS,
}
_DEFAULT_IMAGES = {PlotKind.decomposition: 4, PlotKind.mask_logits: 4, PlotKind.projection: 256}


def plot(
    kind: Annotated[PlotKind, typer.Argument(metavar="KIND", help="Which figure to draw.")],
    runs: Annotated[Optional[list[str]], typer.Argument(
        show_default=False, metavar="RUN...",
        help="Run directory or shipped model (pretrained:tetrominoes); several for curves; the "
             "ablation directory (of `ablate`) for ablation.")] = None,
    out: Annotated[Path, typer.Option(help="PNG to write; the data behind it goes to FILE.npz or FILE.json.")] = ...,
    num_images: Annotated[Optional[int], typer.Option(
        callback=at_least("--num-images", 1), help="Images shown (decomposition: 4, or 2 with --all-steps; mask-logits: 4) or "
                    "projected (projection: 256).")] = None,
    seed: Seed = 0,
    all_steps: Annotated[bool, typer.Option(
        "--all-steps", help="decomposition: every refinement step, not only the final one.")] = False,
    image: Annotated[Optional[int], typer.Option(
        callback=at_least("--image", 0), help="traversal: image index (default: random, from --seed); sequence: sequence index (default 0).")] = None,
    slot: Annotated[Optional[int], typer.Option(callback=at_least("--slot", 0), help="traversal: slot (default: random, from --seed).")] = None,
    value_range: Annotated[Optional[tuple[float, float]], typer.Option(
        "--range", show_default=False,
        help="traversal: LOW HIGH offsets from the posterior mean, in prior standard deviations "
             "(default: -2 2).")] = None,
    num_values: Annotated[Optional[int], typer.Option(callback=at_least("--num-values", 2), help="traversal: values per latent dimension (default: 7).")] = None,
    dims: Annotated[Optional[int], typer.Option(
        callback=at_least("--dims", 1), help="traversal: the N latent dimensions with the most KL (default: 8; all with a larger N).")] = None,
    data: Data = None,
    num_iters: NumIters = None,
    smooth: Annotated[Optional[int], typer.Option(
        callback=at_least("--smooth", 1), help="curves, ablation: moving average over this many logged points (default: 1, none).")] = None,
    device: Device = "cpu",
    threads: Threads = None,
):
    """Draw one of the paper's figures of a trained run as a PNG (and the data behind it)."""
    from .. import figures

    runs = list(runs or [])
    if kind == PlotKind.curves and not runs:
        raise UserError("plot curves needs at least one run directory")
    if kind != PlotKind.curves and len(runs) != 1:
        what = "an ablation directory" if kind == PlotKind.ablation else "one run directory"
        raise UserError(f"plot {kind.value} takes {what}, got {len(runs)}")
    given = {"--num-images": num_images, "--all-steps": all_steps or None, "--image": image, "--slot": slot,
             "--range": value_range if value_range and None not in value_range else None,
             "--num-values": num_values, "--dims": dims, "--data": data, "--num-iters": num_iters,
             "--smooth": smooth, "--threads": threads}
    for option, value in given.items():
        if value is not None and kind not in _OPTION_KINDS[option]:
            raise UserError(f"{option} does not apply to plot {kind.value}")
    if kind in _MODEL_KINDS:                        # the kinds that run the model
        use_threads(threads, device)
    n = num_images or (2 if all_steps else _DEFAULT_IMAGES.get(kind, 0))
    common = {"seed": seed, "data": data, "num_iters": num_iters, "device": device}
    run = runs[0]
    if kind == PlotKind.decomposition:
        files = figures.decomposition(run, out, num_images=n, all_steps=all_steps, **common)
    elif kind == PlotKind.sequence:
        files = figures.sequence(run, out, image=image or 0, **common)
    elif kind == PlotKind.mask_logits:
        files = figures.mask_logits(run, out, num_images=n, **common)
    elif kind == PlotKind.traversal:
        files = figures.traversal(run, out, image=image, slot=slot,
                                  value_range=given["--range"] or (-2.0, 2.0),
                                  num_values=num_values or 7, num_dims=dims or figures.TRAVERSAL_DIMS,
                                  **common)
    elif kind == PlotKind.projection:
        files = figures.projection(run, out, num_images=n, **common)
    elif kind == PlotKind.curves:
        files = figures.curves([Path(r) for r in runs], out, smooth=smooth or 1)
    else:
        files = figures.ablation(run, out, smooth=smooth or 1)
    typer.echo(f"wrote {files.png} and {files.data}")


def register(app: typer.Typer) -> None:
    app.command()(plot)
