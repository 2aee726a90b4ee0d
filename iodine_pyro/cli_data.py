"""Commands under `iodine-pyro data`: generate, inspect, convert and show datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer


def object_counts(ds, background: int = 1, chunk: int = 256) -> tuple[np.ndarray | None, np.ndarray]:
    """Objects per image of a stored dataset: by ``visibility > 0`` of the groups past the
    ``background`` ones (None without a visibility factor), and by non-empty masks of those
    groups (in any frame of a sequence), read chunk by chunk.

    Returns:
        (by_visibility [N] or None, by_mask [N]) int arrays.
    """
    n = ds.sizes["image"]
    by_visibility = None
    if "visibility" in ds and ds["visibility"].dims == ("image", "group"):
        by_visibility = (ds["visibility"].values[:, background:] > 0).sum(1)  # [N]
    by_mask = np.zeros(n, dtype=np.int64)  # [N]
    group_axis = ds["mask"].dims.index("group")
    for start in range(0, n, chunk):
        mask = ds["mask"][start : start + chunk].values  # [n, G, H, W] or [n, T, G, H, W]
        pixels = mask.sum(tuple(a for a in range(1, mask.ndim) if a != group_axis), dtype=np.int64)  # [n, G]
        by_mask[start : start + chunk] = (pixels[:, background:] > 0).sum(1)
    return by_visibility, by_mask


def _histogram(counts: np.ndarray) -> str:
    hist = np.bincount(counts.astype(int))
    return ", ".join(f"{i}: {c}" for i, c in enumerate(hist) if c)


def show_grid(ds, out: Path, *, num_images: int = 8, start: int = 0, frame: int = 0,
              title: Optional[str] = None) -> Path:
    """Draw images beside their ground-truth masks (as the paper's Figures 13 to 15): one row
    per image; columns: the image, then every mask group white on black (background groups
    first). Pixels in no group (e.g. Shapes' overlaps) are black in every mask column.

    Args:
        ds: a dataset from ``open_dataset``.
        out: the PNG file to write.
        num_images: rows (at most the dataset's images from ``start``).
        start: the first image.
        frame: the frame shown of a sequence dataset.
        title: figure title (default: the dataset name and image range).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import DatasetError
    from .data.convert import background_groups

    n_all = ds.sizes["image"]
    if not 0 <= start < n_all:
        raise ValueError(f"--start {start} is outside the {n_all} images")
    stop = min(start + num_images, n_all)
    image = ds["image"][start:stop].values  # [n, H, W, C] or [n, T, H, W, C] uint8
    mask = ds["mask"][start:stop].values  # [n, G, H, W] or [n, T, G, H, W] uint8
    if "frame" in ds["image"].dims:
        if not 0 <= frame < ds.sizes["frame"]:
            raise ValueError(f"--frame {frame} is outside the {ds.sizes['frame']} frames")
        image, mask = image[:, frame], mask[:, frame]  # [n, H, W, C], [n, G, H, W]
    if (mask > 1).any():
        raise DatasetError(f"{ds.encoding.get('source', 'dataset')}: mask values are not 0/1")
    n, G = mask.shape[:2]
    dataset = ds.attrs.get("dataset", "dataset")
    background = background_groups(dataset, ds.attrs)
    fig, axes = plt.subplots(n, G + 1, figsize=(1.3 * (G + 1), 1.3 * n + 0.5), squeeze=False)
    for i in range(n):
        picture = image[i, ..., 0] if image.shape[-1] == 1 else image[i]  # [H, W] or [H, W, 3]
        axes[i, 0].imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        for g in range(G):
            axes[i, g + 1].imshow(mask[i, g], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for column in range(G + 1):
        g = column - 1  # mask group of the column
        if column == 0:
            label = "image"
        elif g < background:
            label = "background" if background == 1 else f"background {g}"
        else:
            label = f"group {g}"
        axes[0, column].set_title(label, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(n):
        axes[i, 0].set_ylabel(str(start + i), fontsize=7)
    frame_note = f", frame {frame}" if "frame" in ds["image"].dims else ""
    fig.suptitle(title or f"{dataset}: images {start} to {stop - 1}{frame_note} and ground-truth masks",
                 fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return out


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
        from .data import open_dataset
        from .data.convert import background_groups

        ds = open_dataset(path)
        dataset = ds.attrs.get("dataset", "?")
        frames = f" x {ds.sizes['frame']} frames" if "frame" in ds.sizes else ""
        typer.echo(f"{path}: {dataset}, {ds.sizes['image']} images{frames} of "
                   f"{ds.sizes['height']}x{ds.sizes['width']}x{ds.sizes['channel']}, {ds.sizes['group']} mask groups")
        if "converted_from" in ds.attrs:
            typer.echo(f"converted from {ds.attrs['converted_from']}")
        background = background_groups(dataset, ds.attrs)
        by_visibility, by_mask = object_counts(ds, background)
        skipped = f" (groups {background}.. ; the first {background} are background)" if background > 1 else ""
        if by_visibility is not None:
            typer.echo(f"objects per image (visibility){skipped}: {_histogram(by_visibility)}")
            if (by_mask != by_visibility).any():
                typer.echo(f"objects with visible pixels per image: {_histogram(by_mask)}")
        else:
            typer.echo(f"objects per image (non-empty masks){skipped}: {_histogram(by_mask)}")
        typer.echo("variables: " + ", ".join(f"{k} {tuple(v.dims)}" for k, v in ds.data_vars.items()))

    @data_app.command("convert")
    def data_convert(
        file: Path = typer.Argument(..., help="An official .tfrecords file."),
        dataset: str = typer.Option(..., help="Its dataset (layout), e.g. tetrominoes, multi_dsprites, clevr6."),
        out: Path = typer.Option(..., help="Output directory."),
        max_objects: Optional[int] = typer.Option(None, help="Keep images with at most N objects "
                                                  "(clevr with 6 is stored as clevr6)."),
        min_objects: Optional[int] = typer.Option(None, help="Keep images with at least N objects."),
        num_images: Optional[int] = typer.Option(None, help="Stop after N images."),
        overwrite: bool = typer.Option(False, help="Replace an existing dataset at OUT."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ):
        """Convert an official DeepMind multi-object TFRecord file into the on-disk format."""
        from .data import open_dataset
        from .data.convert import ALIASES, LAYOUTS, convert

        _positive("--num-images", num_images)
        if dataset not in LAYOUTS and dataset not in ALIASES:
            raise typer.BadParameter(f"unknown dataset {dataset!r}; choose from "
                                     f"{', '.join(sorted(LAYOUTS) + sorted(ALIASES))}", param_hint="--dataset")
        path = convert(file, dataset, out, max_objects=max_objects, min_objects=min_objects,
                       max_images=num_images, overwrite=overwrite, progress=not quiet)
        ds = open_dataset(path)
        typer.echo(f"wrote {ds.sizes['image']} {ds.attrs['dataset']} images to {path}")

    @data_app.command("show")
    def data_show(
        path: Path = typer.Argument(..., help="Dataset directory."),
        out: Path = typer.Option(Path("grid.png"), help="PNG file to write."),
        num_images: int = typer.Option(8, help="Images (rows)."),
        start: int = typer.Option(0, help="First image."),
        frame: int = typer.Option(0, help="Frame shown of a sequence dataset."),
    ):
        """Draw a grid of images beside their ground-truth masks (like the paper's Figures 13-15)."""
        from .data import open_dataset

        _positive("--num-images", num_images)
        written = show_grid(open_dataset(path), out, num_images=num_images, start=start, frame=frame)
        typer.echo(f"wrote {written}")
