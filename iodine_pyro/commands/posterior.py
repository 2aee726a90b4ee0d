"""Commands `sample` and `compare` (posterior samples, guide comparison)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import (Amp, AsJson, BatchSize, Data, Device, NumIters, NumSlots, RunRef, Seed, Threads, OptionError,
                      parse_duration, positive, use_threads)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def sample(
    run: RunRef,
    num_images: Annotated[int, typer.Option(min=1, help="Images to sample for (the first N of the dataset).")] = 16,
    num_samples: Annotated[int, typer.Option(min=1, help="Posterior samples per image (each re-runs the refinement).")] = 100,
    out: Annotated[Optional[Path], typer.Option(
        help="netCDF file (default RUN/posterior.nc); with --multistability a picture "
             "(default RUN/multistability.png).")] = None,
    predictive: Annotated[bool, typer.Option("--predictive", help="Also store each draw's masks and reconstruction and sample posterior-predictive images.")] = False,
    multistability: Annotated[bool, typer.Option(
        "--multistability", help="Draw one image's decompositions from different initial samples.")] = False,
    image: Annotated[int, typer.Option(min=0, help="With --multistability: the dataset index of the image.")] = 0,
    data: Data = None,
    num_iters: NumIters = None,
    num_slots: NumSlots = None,
    batch_size: BatchSize = 32,
    seed: Seed = 0,
    device: Device = "cpu",
    threads: Threads = None,
    amp: Amp = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Posterior samples (draws of the guide's q) of every slot latent as an ArviZ
    InferenceData netCDF file (groups posterior, log_likelihood, sample_stats,
    observed_data, constant_data and, with --predictive, posterior_predictive; dims chain
    and draw): az.from_netcdf reads it, az.loo and az.waic run on it."""
    from ..posterior import plot_multistability, sample_posterior, write_samples
    from ..run import Run

    if multistability and out is not None and out.suffix.lower() not in IMAGE_SUFFIXES:
        raise OptionError(f"--multistability writes a picture; give --out a name ending in "
                        f"{', '.join(IMAGE_SUFFIXES)}, not {out.name}")
    use_threads(threads, device)
    opened = Run.open(run, device, amp)
    if multistability:
        batch, where = opened.images(image, image + 1, data, command="sample")
        out = out or opened.output("multistability.png")
        plot_multistability(opened.system, batch["image"], out, num_samples, num_iters=num_iters,
                            num_slots=num_slots, seed=seed,
                            title=f"image {image} of {where}: one row per posterior sample "
                                  f"({opened.cfg.guide.kind} guide, step {opened.step})")
        typer.echo(f"wrote {num_samples} decompositions of image {image} to {out}")
        return
    batch, where = opened.images(0, num_images, data, command="sample")
    tree = sample_posterior(
        opened.system, batch["image"], num_samples, num_iters=num_iters, num_slots=num_slots,
        predictive=predictive, seed=seed, true_masks=batch.get("mask"), batch_size=batch_size,
        attrs={"checkpoint": opened.ref, "step": opened.step, "data": where}, progress=not quiet)
    out = out or opened.output("posterior.nc")
    write_samples(tree, out)
    groups = ", ".join(node.name for node in tree.children.values())
    typer.echo(f"wrote {num_samples} samples for {tree['posterior'].sizes['image']} images ({groups}) to {out}")


def compare(
    runs: Annotated[list[str], typer.Argument(
        metavar="RUN...", help="Runs to compare: directories, checkpoint files or shipped models.")],
    num_images: Annotated[int, typer.Option(min=1, help="Images (scenes) to evaluate, the same for every run.")] = 64,
    data: Annotated[Optional[Path], typer.Option(help="Dataset (default: the first run's held-out set).")] = None,
    num_iters: NumIters = None,
    num_slots: NumSlots = None,
    iw_samples: Annotated[int, typer.Option(min=1, help="Samples of every per-step ELBO and IWAE estimate.")] = 16,
    evidence_samples: Annotated[int, typer.Option(min=0, help="S: importance samples of log p(x) (guide as proposal) and its k-hat; 0 for none.")] = 1000,
    gap_steps: Annotated[int, typer.Option(min=0, help="Most Adam steps of the per-image posterior q* (each start).")] = 1000,
    gap_lr: Annotated[float, typer.Option(help="Learning rate of the per-image posterior.",
                                          callback=positive("--gap-lr"))] = 0.01,
    gap_check_every: Annotated[int, typer.Option(min=1, help="q*: steps between checks of each image's ELBO.")] = 25,
    gap_patience: Annotated[int, typer.Option(min=1, help="q*: an image has converged after this many checks without improvement.")] = 4,
    generalize: Annotated[bool, typer.Option("--generalize/--no-generalize", help="Also score scenes merged from twice as many images, at K and (guides that can change K) 2K-1.")] = True,
    time_limit: Annotated[Optional[str], typer.Option(
        help="Time for the whole comparison (90s, 10m, 2h; 'none' for no limit): above it S, the q* step cap and "
             "--iw-samples are lowered together, and the report says so. On a 2-core CPU three Tetrominoes "
             "guides on 64 images then fit q* on a subset of the images (the report says so); give 'none' for the full protocol.")] = "10m",
    merge_scenes: Annotated[int, typer.Option(
        min=1, help="Merge the objects of M stored images into each scene "
                    "(more objects than training; uniform backgrounds only).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 16,
    seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(
        help="Directory for compare.json, compare.md and compare.png (default: compare/ beside the first run).")] = None,
    device: Device = "cpu",
    threads: Threads = None,
    amp: Amp = False,
    as_json: AsJson = False,
):
    """Each guide against its own decoder: ELBO, IWAE, log p(x) by importance sampling, the
    approximation and amortization gaps (q* fitted to convergence), Pareto k-hat, FG-ARI,
    ARI, MSE and KL at every step, with standard errors, cost and generalisation."""
    from ..compare import compare as run_compare
    from ..compare import markdown_table, write_report
    from ..run import Run

    limit = None if time_limit is not None and time_limit.strip().lower() == "none" else parse_duration(time_limit)
    use_threads(threads, device, err=as_json)
    opened = [Run.open(r, device, amp) for r in runs]        # every checkpoint read once, before any work
    result = run_compare(opened, num_images=num_images, num_iters=num_iters, num_slots=num_slots,
                         iw_samples=iw_samples, evidence_samples=evidence_samples, gap_steps=gap_steps,
                         gap_lr=gap_lr, gap_check_every=gap_check_every, gap_patience=gap_patience,
                         generalize=generalize, time_limit=limit, seed=seed, data=data, batch_size=batch_size,
                         merge=merge_scenes, device=device, progress=not as_json)
    first = opened[0]
    out = out or (first.home.resolve().parent / "compare" if first.home is not None else Path("compare"))
    paths = write_report(result, out)
    if as_json:
        typer.echo(json.dumps(result))
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        return
    typer.echo(markdown_table(result), nl=False)
    typer.echo(f"\nwrote {', '.join(str(p) for p in paths.values())}")


def register(app: typer.Typer) -> None:
    app.command()(sample)
    app.command()(compare)
