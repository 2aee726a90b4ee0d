"""Commands `fit` and `ablate`: training."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import HELD_OUT_IMAGES

from .options import (Dataset, DatasetName, Decoder, Device, OptionError, Preset, PresetName, Quiet, Threads,
                      UserError, choice, guide_names, parse_duration, positive, use_threads)

SUMMARY_KEYS = ("loss", "mse", "kl", "fg_ari")
DEFAULT_TIME_LIMIT = "4m"   # bare `fit`: the fast preset for 4 minutes, the README's first command


def load_toml_overrides(path: Path) -> dict:
    """{"section.field": value} from a TOML file with [model], [guide] and [train] tables
    (and the sections guides declare, such as [slot_attention])."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    try:
        table = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no configuration file {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise UserError(f"{path}: cannot read it as a text file ({type(e).__name__})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    from ..guides import guide_sections

    out, tables = {}, ("model", "guide", "train", *guide_sections())
    for section, fields in table.items():
        if section not in tables or not isinstance(fields, dict):
            raise UserError(f"{path}: unknown table [{section}]; use {', '.join(f'[{t}]' for t in tables)}")
        out.update({f"{section}.{k}": v for k, v in fields.items()})
    return out


def summary(row: dict) -> str:
    return ", ".join(f"{k}={row[k]:.4g}" for k in SUMMARY_KEYS if isinstance(row.get(k), (int, float)))


def fit(
    dataset: DatasetName = Dataset.tetrominoes,
    preset: Annotated[Preset, typer.Option(
        help="fast (the paper's model and guide, trained to learn fastest per hour on a small "
             "machine), paper (the paper's recipe, appendix C: batch 32, lr 3e-4; learns little in "
             "minutes on a CPU) or deepmind (the released code's settings).")] = Preset.fast,
    steps: Annotated[Optional[int], typer.Option(min=1, help=(
        "Total optimisation steps of the run (a resumed run continues to this); default: as many "
        "as --time-limit allows."))] = None,
    time_limit: Annotated[Optional[str], typer.Option(
        help="Stop after this much training time in this call, with a unit: 90s, 45m, 2h (default "
             f"{DEFAULT_TIME_LIMIT} when --steps is not given); a checkpoint is written and running the "
             "command again continues.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per step (default: the preset's).")] = None,
    out: Annotated[Path, typer.Option(help="Run directory (continued when it holds this run).")] = Path("runs/tetrominoes"),
    data: Annotated[Optional[Path], typer.Option(help="Stored dataset to train on (default: generate one in OUT/data).")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(
        help="Held-out dataset for evaluate (default: generated in OUT/data/test).")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images to generate when --data is not given.")] = 4096,
    guide: Annotated[Optional[str], typer.Option(
        help=f"Guide: {', '.join(guide_names())} (iterative: IODINE's; amortized: the one-shot VAE baseline; "
             f"slot_attention: a slot-attention encoder, optionally refined) (default: the configuration's).", callback=choice("--guide", guide_names, "guide"))] = None,
    decoder: Annotated[Optional[Decoder], typer.Option(help="broadcast (default) or deconv (the ablation).")] = None,
    num_slots: Annotated[Optional[int], typer.Option(min=1, help="K (default: the dataset's; with --resume, the K trained with from the run's step on).")] = None,
    num_iters: Annotated[Optional[int], typer.Option(min=1, help="T refinement iterations (default: 5).")] = None,
    ablate: Annotated[list[str], typer.Option(metavar="INPUT", help="Leave out a refinement input by name (repeatable).")] = [],
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: the preset's).",
                                                callback=positive("--lr"))] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="TOML file of overrides: [model], [guide] and [train] tables (see the README).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of parameters, sampling, data generation and order.")] = 0,
    log_every: Annotated[int, typer.Option(min=1, help="Log metrics every N steps.")] = 25,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Write a checkpoint every N steps.")] = 250,
    max_bad_steps: Annotated[Optional[int], typer.Option(min=1, help="Stop after N non-finite steps in a row (default 20).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help=(
        "Continue the run in OUT with its own settings; a learning-rate schedule given with it (--lr, or "
        "the [train] schedule fields of --config, listed in the README) applies from its step on, as do "
        "--batch-size, --num-slots (with a guide that runs with any K: iterative, slot_attention) and "
        "--num-iters (iterative); any other change is refused."))] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in OUT (only the files it made).")] = False,
    device: Device = "cpu",
    threads: Threads = None,
    quiet: Quiet = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Train data-parallel on N local processes (launches torchrun).")] = 1,
    amp: Annotated[Optional[bool], typer.Option(
        "--amp/--no-amp", help="bf16 autocast for the networks (default: on for cuda with bf16, and for CPUs with bf16 instructions: AVX512-BF16 or AMX).")] = None,
    channels_last: Annotated[Optional[bool], typer.Option(
        "--channels-last/--no-channels-last", help="Channels-last convolutions (default: on).")] = None,
    recompute: Annotated[Optional[bool], typer.Option(
        "--recompute/--no-recompute",
        help="Recompute each refinement step's activations in the backward pass instead of storing "
             "them: training memory flat in T, about 1.5x the compute (default: on for sequences).")] = None,
):
    """Train IODINE; writes OUT/checkpoint.pt, OUT/metrics.jsonl and pictures of the result.

    Bare `fit` trains the fast preset on 4,096 generated Tetrominoes images for 4 minutes;
    --preset paper is the paper's recipe (appendix C). Sequence datasets
    (objects_room_sequences, multi_dsprites_sequences) train sequential IODINE: one
    refinement step per frame, with a next-step-prediction term."""
    from .. import figures
    from ..training import ddp
    from ..training import fit as run_fit

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other", param_hint="--resume")
    limit = parse_duration(time_limit if time_limit is not None or steps is not None else DEFAULT_TIME_LIMIT)
    overrides = load_toml_overrides(config) if config else {}
    for key, value in [("guide.kind", guide), ("train.batch_size", batch_size), ("model.num_slots", num_slots),
                       ("guide.num_iters", num_iters), ("train.lr", lr), ("model.decoder", decoder and decoder.value),
                       ("train.max_bad_steps", max_bad_steps), ("guide.recompute", recompute)]:
        if value is not None:
            overrides[key] = value
    if ablate:
        overrides["guide.disabled_inputs"] = tuple(ablate)
    if ddp.launched():
        world = int(os.environ["WORLD_SIZE"])
        if nproc not in (1, world):
            raise typer.BadParameter(f"{nproc} processes asked for under torchrun's {world}; leave --nproc out "
                                     f"under torchrun", param_hint="--nproc")
    elif nproc > 1:                                  # the same command on N processes
        raise typer.Exit(ddp.launch(nproc, ddp.strip_option(sys.argv[1:]), device))
    use_threads(threads, device)
    result = run_fit(out=out, data=data, eval_data=eval_data, num_images=num_images, steps=steps,
                     dataset=dataset.value, preset=preset.value, overrides=overrides, seed=seed,
                     log_every=log_every, checkpoint_every=checkpoint_every, device=device,
                     progress=not quiet, resume=resume, overwrite=overwrite, amp=amp,
                     channels_last=channels_last, time_limit=limit, report=typer.echo)
    if result.rank != 0:                             # rank 0 reports and draws
        return
    run = result.run()
    rows = run.metrics()
    figures.decomposition(run, out / "decomposition.png", num_images=4, device=device)
    if rows:
        figures.curves([out], out / "curves.png")
    how = {"signal": "stopped by signal at", "time": "reached the time limit at"}.get(result.stopped, "trained to")
    skipped = f" ({result.skipped} non-finite steps skipped)" if result.skipped else ""
    typer.echo(f"{how} step {result.step}{logged(rows, result.step)}{skipped}; run in {out}")
    for line in closing_lines(run, out, bool(rows), device):
        typer.echo(line)


def logged(rows: list[dict], step: int) -> str:
    """': metrics' of the last logged row, naming its step when it is not `step`."""
    if not rows or not summary(rows[-1]):
        return ""
    at = rows[-1].get("step")
    return f": {summary(rows[-1])}" if at == step else f" (step {at}: {summary(rows[-1])})"


JUDGED_IMAGES = 64        # held-out images behind the closing lines
ONE_SLOT_SHARE = 0.9      # the background is one slot's when one slot holds this much of it (mean over images)


def segmentation_numbers(run, device: str, num_images: int = JUDGED_IMAGES) -> dict | None:
    """What the decomposition picture shows, measured on held-out images at the final
    refinement step: FG-ARI, ARI, the slots owning the background and the objects per
    image (`evaluate`'s ``bg_slots`` and ``fg_slots``), the largest share of the background
    one slot holds (``bg_share``), the objects per image, and the
    FG-ARI of cutting every image into K equal bands (the better of vertical and horizontal):
    a reference that knows nothing of objects. None for sequences or without a held-out set."""
    import torch

    from .. import metrics
    from ..data import is_sequence
    from ..evaluate import evaluate

    try:
        ds, _ = run.dataset(need=None)
    except ValueError:                              # no held-out set recorded: nothing to score
        return None
    if is_sequence(ds):
        return None
    result = evaluate(run, num_images=num_images, batch_size=32, device=device, progress=False)
    batch, _ = run.images(0, result["num_images"])
    true, background = batch.get("mask"), result["background_groups"]
    if true is None or "bg_slots" not in result:
        return None
    K, (H, W) = result["num_slots"], true.shape[-2:]
    bands = []
    for size, axis in ((W, -1), (H, -2)):
        owner = torch.div(torch.arange(size) * K, size, rounding_mode="floor")       # slot of each column/row
        cut = torch.nn.functional.one_hot(owner, K).T.float().to(true.device)         # [K, size]
        masks = (cut[:, None, :] if axis == -1 else cut[:, :, None]).expand(K, H, W)
        bands.append(metrics.summarize(metrics.ari(true, masks.expand(true.shape[0], K, H, W),
                                                   foreground_only=background)))
    objects = (true[:, background:].flatten(2).amax(2) > 0).sum(1).double().mean()
    return {"num_images": result["num_images"], "fg_ari": result["fg_ari"][-1], "ari": result["ari"][-1],
            "bg_slots": result["bg_slots"][-1], "bg_share": result["bg_share"][-1], "fg_slots": result["fg_slots"][-1],
            "objects": float(objects),
            "bands_fg_ari": max(bands), "num_slots": K}


def what_it_shows(m: dict) -> str:
    """The judgement of `segmentation_numbers` in words, from the numbers alone: objects are
    separated when FG-ARI beats cutting the images into K bands; the background is one
    slot's when one slot holds at least `ONE_SLOT_SHARE` of it (``bg_share``; stray pixels
    in other slots, which ``bg_slots`` counts, do not split it)."""
    if m["fg_ari"] > m["bands_fg_ari"]:
        objects = (f"the slots separate objects better than cutting each image into {m['num_slots']} bands would "
                   f"(FG-ARI {m['fg_ari']:.2f} against {m['bands_fg_ari']:.2f})")
    else:
        objects = (f"the slots cut the images into regions, not objects: FG-ARI {m['fg_ari']:.2f} is no better than "
                   f"the {m['bands_fg_ari']:.2f} of cutting each image into {m['num_slots']} bands")
    if m["bg_share"] >= ONE_SLOT_SHARE:
        background = f"the background is one slot's ({m['bg_share']:.0%} of it in one slot per image)"
    else:
        background = (f"the background is split over {m['bg_slots']:.1f} slots per image (the largest part "
                      f"one slot holds: {m['bg_share']:.0%})")
    return f"what the pictures show: {objects}; {background}"


def closing_lines(run, out: Path, curves: bool, device: str) -> list[str]:
    """What the pictures show, judged from numbers measured on held-out images
    (`segmentation_numbers`), and where segmentation is heading (the shipped model) when the
    run is still below it."""
    from ..run import PRETRAINED_DIR, PRETRAINED_PREFIX, pretrained_models

    lines = [f"pictures: {out / 'decomposition.png'} (4 held-out images split into slots, one column per slot)"
             + (f", {out / 'curves.png'} (training curves)" if curves else "")]
    m = segmentation_numbers(run, device)
    if m is None:
        return lines
    lines.append(f"held-out, {m['num_images']} images, final refinement step: FG-ARI {m['fg_ari']:.2f}, "
                 f"ARI {m['ari']:.2f}; per image {m['bg_slots']:.1f} of the {m['num_slots']} slots own part of the "
                 f"background and {m['fg_slots']:.1f} part of the {m['objects']:.1f} objects (iodine-pyro evaluate "
                 f"{out} for every metric and step)")
    lines.append(what_it_shows(m))
    name = run.cfg.dataset
    shipped = PRETRAINED_DIR / f"{name}.json"
    if name in pretrained_models():
        info = json.loads(shipped.read_text())
        best = info["held_out"]["fg_ari"]
        if not m["fg_ari"] >= best:
            lines.append(f"segmentation takes hours of training on a CPU (--time-limit 2h, run again to continue; "
                         f"docs/learning.md). The shipped model (held-out FG-ARI {best:.2f} after "
                         f"{info['train_minutes'] / 60:.1f} h): iodine-pyro plot decomposition "
                         f"{PRETRAINED_PREFIX}{name} --out shipped.png")
    return lines


def ablate_command(
    dataset: DatasetName = Dataset.tetrominoes,
    steps: Annotated[int, typer.Option(min=1, help="Optimisation steps of every run.")] = ...,
    out: Annotated[Path, typer.Option(help="Ablation directory: full/, no-<input>/ and data/ (resumed when there).")] = ...,
    inputs: Annotated[Optional[str], typer.Option(
        help="Comma-separated refinement inputs to leave out one at a time (default: all).")] = None,
    preset: PresetName = Preset.paper,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per step (default: the preset's).")] = None,
    num_images: Annotated[int, typer.Option(min=1, help=f"Training images to generate (held-out: up to {HELD_OUT_IMAGES}).")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the data and of every run.")] = 0,
    log_every: Annotated[int, typer.Option(min=1, help="Log metrics every N steps.")] = 25,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Write a checkpoint every N steps.")] = 250,
    device: Device = "cpu",
    threads: Threads = None,
    quiet: Quiet = False,
):
    """Train the full model and one model per refinement input left out (Figures 33 to 40).

    Then draws OUT/ablation.png. Running it again continues where it stopped. Each run
    shows its own progress bar; the lines between them count the runs done and left."""
    from ..ablate import AblationRun
    from ..ablate import ablate as run_ablate
    from ..figures import ablation as plot_ablation

    use_threads(threads, device)
    names = None
    if inputs is not None:
        names = [n.strip() for n in inputs.split(",") if n.strip()]
        if not names:
            raise OptionError("--inputs names no refinement input")

    spent: list[float] = []                 # wall seconds of the runs trained in this call
    started = [0.0]

    def report(run: AblationRun) -> None:
        head = f"[{run.index + 1}/{run.total}] {run.name}"
        if run.status == "start":
            started[0] = time.time()
            typer.echo(f"{head}: training to step {steps}" + (f" from step {run.step}" if run.step else ""))
        elif run.status == "skipped":
            typer.echo(f"{head}: already at step {run.step}, skipped")
        else:
            spent.append(time.time() - started[0])
            how = "stopped by signal at" if run.status == "stopped" else "trained to"
            last = summary(run.last_metrics)
            left = run.total - run.index - 1
            eta = f"; about {left * sum(spent) / len(spent) / 60:.0f} min left for {left} more" if left else ""
            typer.echo(f"{head}: {how} step {run.step}" + (f": {last}" if last else "") + eta)

    results = run_ablate(dataset.value, steps, out, names, seed, preset=preset.value, num_images=num_images,
                         batch_size=batch_size, log_every=log_every, checkpoint_every=checkpoint_every,
                         device=device, progress=not quiet, report=report)
    if results and results[-1].status == "stopped":
        typer.echo(f"stopped; run the same command again to continue in {out}")
        return
    files = plot_ablation(out, out / "ablation.png")
    typer.echo(f"wrote {files.png} and {files.data}")


def register(app: typer.Typer) -> None:
    app.command()(fit)
    app.command("ablate")(ablate_command)
