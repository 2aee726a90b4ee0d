"""Commands `fit` and `ablate`: training."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import (DatasetName, Device, PresetName, Quiet, UserError, at_least, choice, guide_names,
                      parse_duration, positive)

SUMMARY_KEYS = ("loss", "mse", "kl", "fg_ari")


def load_toml_overrides(path: Path) -> dict:
    """{"section.field": value} from a TOML file with [model], [guide] and [train] tables."""
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
    out = {}
    for section, fields in table.items():
        if section not in ("model", "guide", "train") or not isinstance(fields, dict):
            raise UserError(f"{path}: unknown table [{section}]; use [model], [guide] and [train]")
        out.update({f"{section}.{k}": v for k, v in fields.items()})
    return out


def summary(row: dict) -> str:
    return ", ".join(f"{k}={row[k]:.4g}" for k in SUMMARY_KEYS if isinstance(row.get(k), (int, float)))


def fit(
    dataset: DatasetName = "tetrominoes",
    preset: PresetName = "paper",
    steps: Annotated[Optional[int], typer.Option(callback=at_least("--steps", 1), help=(
        "Total optimisation steps of the run (a resumed run continues to this); default 200, or "
        "as many as --time-limit allows."))] = None,
    time_limit: Annotated[Optional[str], typer.Option(
        help="Stop after this much training time in this call (90s, 45m, 2h), with a checkpoint; "
             "running the command again continues.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(callback=at_least("--batch-size", 1), help="Images per step (default: the preset's).")] = None,
    out: Annotated[Path, typer.Option(help="Run directory (continued when it holds this run).")] = Path("runs/tetrominoes"),
    data: Annotated[Optional[Path], typer.Option(help="Stored dataset to train on (default: generate one in OUT/data).")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(
        help="Held-out dataset for evaluate (default: generated in OUT/data/test).")] = None,
    num_images: Annotated[int, typer.Option(callback=at_least("--num-images", 1), help="Images to generate when --data is not given.")] = 4096,
    guide: Annotated[Optional[str], typer.Option(
        help=f"Guide: {', '.join(guide_names())} (IODINE's iterative guide; the one-shot amortized VAE "
             f"baseline) (default: the configuration's).", callback=choice("--guide", guide_names, "guide"))] = None,
    decoder: Annotated[Optional[str], typer.Option(
        help="broadcast (default) or deconv (the ablation).", callback=choice("--decoder", lambda: ["broadcast", "deconv"], "decoder"))] = None,
    num_slots: Annotated[Optional[int], typer.Option(callback=at_least("--num-slots", 1), help="K (default: the dataset's).")] = None,
    num_iters: Annotated[Optional[int], typer.Option(callback=at_least("--num-iters", 1), help="T refinement iterations (default: 5).")] = None,
    ablate: Annotated[list[str], typer.Option(metavar="INPUT", help="Leave out a refinement input by name (repeatable).")] = [],
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: the preset's).",
                                                callback=positive("--lr"))] = None,
    config: Annotated[Optional[Path], typer.Option(
        help="TOML file of overrides: [model], [guide] and [train] tables (see the README).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of parameters, sampling, data generation and order.")] = 0,
    log_every: Annotated[int, typer.Option(callback=at_least("--log-every", 1), help="Log metrics every N steps.")] = 25,
    checkpoint_every: Annotated[int, typer.Option(callback=at_least("--checkpoint-every", 1), help="Write a checkpoint every N steps.")] = 250,
    max_bad_steps: Annotated[Optional[int], typer.Option(callback=at_least("--max-bad-steps", 1), help="Stop after N non-finite steps in a row (default 20).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help=(
        "Continue the run in OUT with its own settings; a learning-rate schedule given with it (--lr, or "
        "the [train] schedule fields of --config, listed in the README) applies from its step on; any "
        "other change is refused."))] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run in OUT (only the files it made).")] = False,
    device: Device = "cpu",
    quiet: Quiet = False,
    nproc: Annotated[int, typer.Option("--nproc", callback=at_least("--nproc", 1), help="Train data-parallel on N local processes (launches torchrun).")] = 1,
    amp: Annotated[Optional[bool], typer.Option(
        "--amp/--no-amp", help="bf16 autocast for the networks (default: on for cuda with bf16, and for CPUs with AMX-BF16).")] = None,
    channels_last: Annotated[Optional[bool], typer.Option(
        "--channels-last/--no-channels-last", help="Channels-last convolutions (default: on for cuda).")] = None,
    recompute: Annotated[Optional[bool], typer.Option(
        "--recompute/--no-recompute",
        help="Recompute each refinement step's activations in the backward pass instead of storing "
             "them: training memory flat in T, about 1.5x the compute (default: on for sequences).")] = None,
):
    """Train IODINE; writes OUT/checkpoint.pt, OUT/metrics.jsonl and pictures of the result.

    Sequence datasets (objects_room_sequences, multi_dsprites_sequences) train sequential
    IODINE: one refinement step per frame, with a next-step-prediction term."""
    from .. import distributed, figures
    from ..train import fit as run_fit

    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other", param_hint="--resume")
    limit = parse_duration(time_limit)
    if steps is None and limit is None:
        steps = 200
    overrides = load_toml_overrides(config) if config else {}
    for key, value in [("guide.kind", guide), ("train.batch_size", batch_size), ("model.num_slots", num_slots),
                       ("guide.num_iters", num_iters), ("train.lr", lr), ("model.decoder", decoder),
                       ("train.max_bad_steps", max_bad_steps), ("guide.recompute", recompute)]:
        if value is not None:
            overrides[key] = value
    if ablate:
        overrides["guide.disabled_inputs"] = tuple(ablate)
    if distributed.launched():
        world = int(os.environ["WORLD_SIZE"])
        if nproc not in (1, world):
            raise typer.BadParameter(f"{nproc} processes asked for under torchrun's {world}; leave --nproc out "
                                     f"under torchrun", param_hint="--nproc")
    elif nproc > 1:                                  # the same command on N processes
        raise typer.Exit(distributed.launch(nproc, distributed.strip_option(sys.argv[1:]), device))
    result = run_fit(out=out, data=data, eval_data=eval_data, num_images=num_images, steps=steps,
                     dataset=dataset, preset=preset, overrides=overrides, seed=seed,
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
    last = summary(rows[-1]) if rows else ""
    typer.echo(f"{how} step {result.step}{': ' + last if last else ''}{skipped}; run in {out}")
    for line in closing_lines(run, out, bool(rows), device):
        typer.echo(line)


def closing_lines(run, out: Path, curves: bool, device: str) -> list[str]:
    """What the pictures show: the held-out FG-ARI of the final step (64 images), and where
    segmentation is heading (how long it takes, and the shipped model) when it is not there yet."""
    from ..data import is_sequence
    from ..evaluate import evaluate
    from ..run import PRETRAINED, PRETRAINED_DIR, PRETRAINED_PREFIX

    lines = [f"pictures: {out / 'decomposition.png'} (4 held-out images split into slots, one column per slot)"
             + (f", {out / 'curves.png'} (training curves)" if curves else "")]
    try:
        ds, _ = run.dataset(need=None)
    except ValueError:                              # no held-out set recorded: nothing to score
        return lines
    if is_sequence(ds):
        return lines
    fg_ari = evaluate(run, num_images=64, batch_size=32, device=device, progress=False)["fg_ari"][-1]
    lines.append(f"held-out FG-ARI at the final refinement step: {fg_ari:.2f} (64 images; "
                 f"iodine-pyro evaluate {out} for every metric and step)")
    name = run.cfg.dataset
    if name in PRETRAINED and not fg_ari >= 0.8:
        shipped = PRETRAINED_DIR / f"{name}.json"
        known = ""
        if shipped.is_file():
            info = json.loads(shipped.read_text())
            known = f" (held-out FG-ARI {info['held_out']['fg_ari']:.2f} after {info['train_minutes'] / 60:.1f} h)"
        state = "have begun to separate objects" if fg_ari >= 0.15 else "do not separate objects yet"
        lines.append(f"the slots {state}; segmentation takes hours of training on a CPU (--preset fast, "
                     f"--time-limit 2h; docs/learning.md). The shipped model{known}: "
                     f"iodine-pyro plot decomposition {PRETRAINED_PREFIX}{name} --out shipped.png")
    return lines


def ablate_command(
    dataset: DatasetName = "tetrominoes",
    steps: Annotated[int, typer.Option(callback=at_least("--steps", 1), help="Optimisation steps of every run.")] = ...,
    out: Annotated[Path, typer.Option(help="Ablation directory: full/, no-<input>/ and data/ (resumed when there).")] = ...,
    inputs: Annotated[Optional[str], typer.Option(
        help="Comma-separated refinement inputs to leave out one at a time (default: all).")] = None,
    preset: PresetName = "paper",
    batch_size: Annotated[Optional[int], typer.Option(callback=at_least("--batch-size", 1), help="Images per step (default: the preset's).")] = None,
    num_images: Annotated[int, typer.Option(callback=at_least("--num-images", 1), help="Training images to generate (held-out: up to 1024).")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the data and of every run.")] = 0,
    log_every: Annotated[int, typer.Option(callback=at_least("--log-every", 1), help="Log metrics every N steps.")] = 25,
    checkpoint_every: Annotated[int, typer.Option(callback=at_least("--checkpoint-every", 1), help="Write a checkpoint every N steps.")] = 250,
    device: Device = "cpu",
    quiet: Quiet = False,
):
    """Train the full model and one model per refinement input left out (Figures 33 to 40).

    Then draws OUT/ablation.png. Running it again continues where it stopped. Each run
    shows its own progress bar; the lines between them count the runs done and left."""
    from ..ablate import AblationRun
    from ..ablate import ablate as run_ablate
    from ..figures import ablation as plot_ablation

    names = None
    if inputs is not None:
        names = [n.strip() for n in inputs.split(",") if n.strip()]
        if not names:
            raise UserError("--inputs names no refinement input")

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

    results = run_ablate(dataset, steps, out, names, seed, preset=preset, num_images=num_images,
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
