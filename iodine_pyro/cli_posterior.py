"""Commands `sample` and `compare` (posterior samples, guide comparison)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _load_images(system, ckpt, data: Optional[Path], start: int, stop: int):
    """Images start:stop (clipped to the dataset) of `data` or the run's held-out set."""
    from .data import load_images, open_dataset
    from .evaluate import default_data
    from .train import check_images, check_single_images

    where = str(data) if data else default_data(ckpt)
    ds = open_dataset(where)
    check_images(ds, system.cfg, where)
    check_single_images(ds, where, "sample")
    n = ds.sizes["image"]
    if start >= n:
        raise ValueError(f"image {start} is outside {where}, which holds {n} images")
    return load_images(ds, start, min(stop, n)), where


def _home(run_dir: Path) -> Path:
    """The run directory of a run directory or checkpoint file."""
    return run_dir if run_dir.is_dir() or run_dir.suffix != ".pt" else run_dir.parent


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    from .cli import UserError

    def _positive(name: str, value: Optional[int | float], low: int = 1) -> None:
        if value is not None and not value >= low:
            raise UserError(f"{name} must be at least {low}, got {value}")

    @app.command()
    def sample(
        run_dir: Path = typer.Argument(..., help="Run directory (or checkpoint file)."),
        num_images: int = typer.Option(16, help="Images to sample for (the first N of the dataset)."),
        num_samples: int = typer.Option(100, help="Posterior samples per image (each re-runs the refinement)."),
        out: Optional[Path] = typer.Option(
            None, help="netCDF file (default RUN_DIR/posterior.nc); with --multistability a picture "
                       "(default RUN_DIR/multistability.png)."),
        predictive: bool = typer.Option(False, "--predictive", help="Also sample posterior-predictive images and masks."),
        multistability: bool = typer.Option(False, "--multistability",
                                            help="Draw one image's decompositions from different initial samples."),
        image: int = typer.Option(0, help="With --multistability: the dataset index of the image."),
        data: Optional[Path] = typer.Option(None, help="Dataset (default: the run's held-out set)."),
        num_iters: Optional[int] = typer.Option(None, help="Refinement iterations (default: the trained T)."),
        num_slots: Optional[int] = typer.Option(None, help="K at test time (iterative guide only)."),
        batch_size: int = typer.Option(32, help="Images per guide run."),
        seed: int = typer.Option(0, help="Seed of the samples."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
    ):
        """Posterior samples of every slot latent, written as netCDF groups posterior,
        posterior_predictive and observed_data (xarray.open_datatree, arviz.from_datatree)."""
        from .evaluate import load_run
        from .posterior import plot_multistability, sample_posterior, write_samples

        for name, value in [("--num-images", num_images), ("--num-samples", num_samples),
                            ("--batch-size", batch_size), ("--num-iters", num_iters), ("--num-slots", num_slots)]:
            _positive(name, value)
        _positive("--image", image, 0)
        if multistability and out is not None and out.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"--multistability writes a picture; give --out a name ending in "
                            f"{', '.join(IMAGE_SUFFIXES)}, not {out.name}")
        system, ckpt = load_run(run_dir, device)
        if multistability:
            batch, where = _load_images(system, ckpt, data, image, image + 1)
            out = out or _home(run_dir) / "multistability.png"
            plot_multistability(system, batch["image"].to(device), out, num_samples,
                                num_iters=num_iters, num_slots=num_slots, seed=seed,
                                title=f"image {image} of {where}: one row per posterior sample "
                                      f"({system.cfg.guide.kind} guide, step {ckpt['step']})")
            typer.echo(f"wrote {num_samples} decompositions of image {image} to {out}")
            return
        batch, where = _load_images(system, ckpt, data, 0, num_images)
        tree = sample_posterior(
            system, batch["image"].to(device), num_samples, num_iters=num_iters, num_slots=num_slots,
            predictive=predictive, seed=seed, true_masks=batch.get("mask"), batch_size=batch_size,
            attrs={"checkpoint": str(Path(run_dir).resolve()), "step": int(ckpt["step"]), "data": where})
        out = out or _home(run_dir) / "posterior.nc"
        write_samples(tree, out)
        groups = ", ".join(node.name for node in tree.children.values())
        typer.echo(f"wrote {num_samples} samples for {tree['posterior'].sizes['image']} images ({groups}) to {out}")

    @app.command()
    def compare(
        run_dirs: list[Path] = typer.Argument(..., help="Run directories (or checkpoint files) to compare."),
        num_images: int = typer.Option(64, help="Images (scenes) to evaluate, the same for every run."),
        data: Optional[Path] = typer.Option(None, help="Dataset (default: the first run's held-out set)."),
        num_iters: Optional[int] = typer.Option(None, help="Refinement iterations of iterative guides (default 2T)."),
        num_slots: Optional[int] = typer.Option(None, help="K at test time (iterative guides only)."),
        iw_samples: int = typer.Option(16, help="Samples of every ELBO and importance-weighted estimate."),
        gap_steps: int = typer.Option(200, help="Adam steps of the per-image posterior (amortization gap)."),
        gap_lr: float = typer.Option(0.01, help="Learning rate of the per-image posterior."),
        merge_scenes: int = typer.Option(1, help="Merge the objects of M stored images into each scene "
                                                 "(more objects than training; uniform backgrounds only)."),
        batch_size: int = typer.Option(16, help="Images per batch."),
        seed: int = typer.Option(0, help="Seed of the refinement and of the estimates."),
        out: Optional[Path] = typer.Option(None, help="Directory for compare.json, compare.md and compare.png "
                                                      "(default: compare/ beside the first run)."),
        device: str = typer.Option("cpu", help="cpu or cuda."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ):
        """ELBO, importance-weighted log p(x), amortization gap, FG-ARI, MSE and KL per guide,
        at every refinement step (beyond the trained T) for iterative guides."""
        from .compare import compare as run_compare
        from .compare import markdown_table, write_report

        for name, value in [("--num-images", num_images), ("--iw-samples", iw_samples),
                            ("--batch-size", batch_size), ("--merge-scenes", merge_scenes),
                            ("--num-iters", num_iters), ("--num-slots", num_slots)]:
            _positive(name, value)
        _positive("--gap-steps", gap_steps, 0)
        if not gap_lr > 0:
            raise UserError(f"--gap-lr must be positive, got {gap_lr}")
        result = run_compare(run_dirs, num_images=num_images, num_iters=num_iters, num_slots=num_slots,
                             iw_samples=iw_samples, gap_steps=gap_steps, gap_lr=gap_lr, seed=seed,
                             data=data, batch_size=batch_size, merge=merge_scenes, device=device,
                             progress=not as_json)
        out = out or _home(run_dirs[0]).resolve().parent / "compare"
        paths = write_report(result, out)
        if as_json:
            typer.echo(json.dumps(result))
            log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
            return
        typer.echo(markdown_table(result), nl=False)
        typer.echo(f"\nwrote {', '.join(str(p) for p in paths.values())}")
