"""Commands under `iodine-pyro data`: generate, inspect, convert and show datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(data_app: typer.Typer) -> None:
    """Add the data commands to the `data` sub-app."""
    from .cli import _positive

    @data_app.command("generate")
    def data_generate(
        name: str = typer.Argument(..., help="Dataset to generate."),
        num_images: int = typer.Option(..., help="Number of images."),
        out: Path = typer.Option(..., help="Output directory."),
        seed: int = typer.Option(0, help="Seed."),
        workers: Optional[int] = typer.Option(None, help="Processes (default: up to 4)."),
        overwrite: bool = typer.Option(False, help="Replace an existing dataset at OUT."),
    ):
        """Generate a dataset procedurally into the on-disk format."""
        from .data import GENERATORS, generate

        _positive("--num-images", num_images)
        if name not in GENERATORS:
            raise typer.BadParameter(f"unknown dataset {name!r}; choose from {', '.join(sorted(GENERATORS))}",
                                     param_hint="NAME")
        path = generate(name, num_images, out, seed=seed, workers=workers, overwrite=overwrite)
        typer.echo(f"wrote {num_images} {name} images to {path}")

    @data_app.command("info")
    def data_info(path: Path = typer.Argument(..., help="Dataset directory.")):
        """Counts, shapes and the object-count histogram of a stored dataset."""
        import numpy as np

        from .data import open_dataset

        ds = open_dataset(path)
        typer.echo(f"{path}: {ds.attrs.get('dataset', '?')}, {ds.sizes['image']} images of "
                   f"{ds.sizes['height']}x{ds.sizes['width']}x{ds.sizes['channel']}, {ds.sizes['group']} mask groups")
        if "visibility" in ds:
            counts = np.asarray(ds["visibility"][:, 1:].values > 0).sum(1)
            hist = np.bincount(counts.astype(int))
            typer.echo("objects per image: " + ", ".join(f"{i}: {c}" for i, c in enumerate(hist) if c))
        typer.echo("variables: " + ", ".join(f"{k} {tuple(v.dims)}" for k, v in ds.data_vars.items()))
