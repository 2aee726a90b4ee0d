"""Commands under `iodine-pyro data`: generate, inspect, convert and show datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import SEED_MAX
from .options import Dataset, Quiet, choice


def _layouts() -> list[str]:
    """The official files' layouts, checked when given (the converter loads torch)."""
    from ..data.convert import ALIASES, LAYOUTS
    return [*LAYOUTS, *ALIASES]


def _histogram(counts) -> str:
    import numpy as np

    hist = np.bincount(counts.astype(int))
    return ", ".join(f"{i}: {c}" for i, c in enumerate(hist) if c)


def generate(
    name: Annotated[Dataset, typer.Argument(metavar="NAME", help="Dataset to generate.")],
    num_images: Annotated[int, typer.Option(min=1, help="Number of images.")] = ...,
    out: Annotated[Path, typer.Option(help="Output directory.")] = ...,
    seed: Annotated[int, typer.Option(help="Seed.", min=0, max=SEED_MAX)] = 0,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes (default: up to 4).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset at OUT.")] = False,
    quiet: Quiet = False,
):
    """Generate a dataset procedurally into the on-disk format.

    The store appears at OUT only once it is complete: a generation cut short (Ctrl-C, a
    kill, a full disk) leaves no store, and the same command starts it again."""
    name = name.value
    from ..data import ensure_generated, generate as run_generate

    if overwrite:
        path = run_generate(name, num_images, out, seed=seed, workers=workers, overwrite=True, progress=not quiet)
    else:
        path = ensure_generated(name, num_images, out, seed=seed, workers=workers, progress=not quiet)
    typer.echo(f"wrote {num_images} {name} images to {path}")


def info(path: Annotated[Path, typer.Argument(help="Dataset directory.")]):
    """Counts, shapes and the object-count histogram of a stored dataset (every mask is
    read and checked)."""
    from ..data import background_groups, object_counts, open_dataset

    ds = open_dataset(path)
    dataset = ds.attrs.get("dataset", "?")
    frames = f" x {ds.sizes['frame']} frames" if "frame" in ds.sizes else ""
    typer.echo(f"{path}: {dataset}, {ds.sizes['image']} images{frames} of "
               f"{ds.sizes['height']}x{ds.sizes['width']}x{ds.sizes['channel']}, {ds.sizes['group']} mask groups")
    if "converted_from" in ds.attrs:
        typer.echo(f"converted from {ds.attrs['converted_from']}")
    background = background_groups(ds.attrs)
    by_visibility, by_mask = object_counts(ds, background)
    skipped = f" (groups {background}.. ; the first {background} are background)" if background > 1 else ""
    if by_visibility is not None:
        typer.echo(f"objects per image (visibility){skipped}: {_histogram(by_visibility)}")
        if (by_mask != by_visibility).any():
            typer.echo(f"objects with visible pixels per image: {_histogram(by_mask)}")
    else:
        typer.echo(f"objects per image (non-empty masks){skipped}: {_histogram(by_mask)}")
    typer.echo("variables: " + ", ".join(f"{k} {tuple(v.dims)}" for k, v in ds.data_vars.items()))


def convert(
    file: Annotated[Path, typer.Argument(help="An official .tfrecords file.")],
    dataset: Annotated[str, typer.Option(
        help="Its dataset (layout): the official file's name without its suffix, e.g. tetrominoes, "
             "multi_dsprites_colored_on_grayscale, clevr_with_masks, objects_room.",
        callback=choice("--dataset", _layouts, "dataset"))] = ...,
    out: Annotated[Path, typer.Option(help="Output directory.")] = ...,
    max_objects: Annotated[Optional[int], typer.Option(
        min=0, help="Keep images with at most N objects (clevr with 6 is stored as clevr6).")] = None,
    min_objects: Annotated[Optional[int], typer.Option(min=0, help="Keep images with at least N objects.")] = None,
    num_images: Annotated[Optional[int], typer.Option(min=1, help="Stop after N images.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset at OUT.")] = False,
    quiet: Quiet = False,
):
    """Convert an official DeepMind multi-object TFRecord file into the on-disk format."""
    from ..data import open_dataset
    from ..data.convert import convert as run_convert

    path = run_convert(file, dataset, out, max_objects=max_objects, min_objects=min_objects,
                       max_images=num_images, overwrite=overwrite, progress=not quiet)
    ds = open_dataset(path)
    typer.echo(f"wrote {ds.sizes['image']} {ds.attrs['dataset']} images to {path}")


def show(
    path: Annotated[Path, typer.Argument(help="Dataset directory.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("grid.png"),
    num_images: Annotated[int, typer.Option(min=1, help="Images (rows).")] = 8,
    start: Annotated[int, typer.Option(min=0, help="First image.")] = 0,
    frame: Annotated[int, typer.Option(min=0, help="Frame shown of a sequence dataset.")] = 0,
):
    """Draw a grid of images beside their ground-truth masks (like the paper's Figures 13-15)."""
    from ..data import background_groups, open_dataset
    from ..data.batches import verify_range
    from ..figures import dataset_grid

    ds = open_dataset(path)
    verify_range(ds, start, start + num_images)          # missing or damaged chunks: one line naming the file
    written = dataset_grid(ds, out, num_images=num_images, start=start, frame=frame,
                           background=background_groups(ds.attrs))
    typer.echo(f"wrote {written}")


def register(data_app: typer.Typer) -> None:
    data_app.command("generate")(generate)
    data_app.command("info")(info)
    data_app.command("convert")(convert)
    data_app.command("show")(show)
