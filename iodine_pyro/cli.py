"""The ``iodine-pyro`` command line: a thin layer over the package's functions."""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="IODINE (Greff et al., 2019) as a Pyro program: train, evaluate, sample, plot.")
data_app = typer.Typer(no_args_is_help=True, help="Generate and inspect datasets.")
app.add_typer(data_app, name="data")


class Preset(str, Enum):
    paper = "paper"
    deepmind = "deepmind"
    fast = "fast"


class GuideKind(str, Enum):
    iterative = "iterative"
    amortized = "amortized"


class DecoderKind(str, Enum):
    broadcast = "broadcast"
    deconv = "deconv"


class UserError(Exception):
    """An error the user can fix; printed as one line."""


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=name)


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "45m", "2h" or "1.5h"."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration (e.g. 90s, 45m, 2h)", param_hint="--time-limit")
    if not value > 0 or value == float("inf"):
        raise typer.BadParameter(f"must be a positive, finite duration, got {text!r}", param_hint="--time-limit")
    return value


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
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    out = {}
    for section, fields in table.items():
        if section not in ("model", "guide", "train") or not isinstance(fields, dict):
            raise UserError(f"{path}: unknown table [{section}]; use [model], [guide] and [train]")
        out.update({f"{section}.{k}": v for k, v in fields.items()})
    return out


@app.command()
def fit(
    dataset: str = typer.Option("tetrominoes", help="Dataset and its architecture preset (paper appendix C)."),
    preset: Preset = typer.Option(Preset.paper, help="paper (appendix C), deepmind (released code) or fast (learns fastest per hour)."),
    steps: int = typer.Option(200, help="Total optimisation steps of the run (a resumed run continues to this)."),
    time_limit: Optional[str] = typer.Option(
        None, help="Stop after this much training time in this call (90s, 45m, 2h), with a checkpoint; "
                   "running the command again continues."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step (default: the preset's)."),
    out: Path = typer.Option(Path("runs/tetrominoes"), help="Run directory (continued when it holds this run)."),
    data: Optional[Path] = typer.Option(None, help="Stored dataset to train on (default: generate one in OUT/data)."),
    eval_data: Optional[Path] = typer.Option(None, help="Held-out dataset for evaluate (default: generated)."),
    num_images: int = typer.Option(4096, help="Images to generate when --data is not given."),
    guide: GuideKind = typer.Option(GuideKind.iterative, help="iterative (IODINE) or amortized (VAE baseline)."),
    decoder: Optional[DecoderKind] = typer.Option(None, help="broadcast (default) or deconv (ablation)."),
    num_slots: Optional[int] = typer.Option(None, help="K (default: the dataset's)."),
    num_iters: Optional[int] = typer.Option(None, help="T refinement iterations (default: 5)."),
    ablate: list[str] = typer.Option([], help="Leave out a refinement input by name (repeatable)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: the preset's)."),
    config: Optional[Path] = typer.Option(None, help="TOML file of overrides: [model], [guide], [train] tables."),
    seed: int = typer.Option(0, help="Seed of parameters, sampling, data generation and order."),
    log_every: int = typer.Option(25, help="Log metrics every N steps."),
    checkpoint_every: int = typer.Option(250, help="Write a checkpoint every N steps."),
    max_bad_steps: Optional[int] = typer.Option(None, help="Stop after N non-finite steps in a row (default 20)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT with its own settings."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in OUT."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    nproc: int = typer.Option(1, "--nproc", help="Train data-parallel on N local processes (launches torchrun)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp",
                                       help="bf16 autocast for the networks (default: on for cuda with bf16, and for CPUs with AMX-BF16)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Channels-last convolutions (default: on for cuda)."),
    recompute: Optional[bool] = typer.Option(
        None, "--recompute/--no-recompute",
        help="Recompute each refinement step's activations in the backward pass instead of storing "
             "them: training memory flat in T, about 1.5x the compute (default: on for sequences)."),
):
    """Train IODINE; writes OUT/checkpoint.pt, OUT/metrics.jsonl and pictures of the result.

    Sequence datasets (objects_room_sequences, multi_dsprites_sequences) train sequential
    IODINE: one refinement step per frame, with a next-step-prediction term."""
    from . import distributed
    from .config import ARCHITECTURES
    from .train import fit as run_fit

    for name, value in [("--steps", steps), ("--batch-size", batch_size), ("--num-slots", num_slots),
                        ("--num-iters", num_iters), ("--num-images", num_images),
                        ("--log-every", log_every), ("--checkpoint-every", checkpoint_every),
                        ("--max-bad-steps", max_bad_steps), ("--nproc", nproc)]:
        _positive(name, value)
    if dataset not in ARCHITECTURES:
        raise typer.BadParameter(f"unknown dataset {dataset!r}; choose from {', '.join(sorted(ARCHITECTURES))}",
                                 param_hint="--dataset")
    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other", param_hint="--resume")
    overrides = load_toml_overrides(config) if config else {}
    overrides["guide.kind"] = guide.value
    for key, value in [("train.batch_size", batch_size), ("model.num_slots", num_slots),
                       ("guide.num_iters", num_iters), ("train.lr", lr),
                       ("model.decoder", decoder.value if decoder else None),
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
                     dataset=dataset, preset=preset.value, overrides=overrides, seed=seed,
                     log_every=log_every, checkpoint_every=checkpoint_every, device=device,
                     progress=not quiet, resume=resume, overwrite=overwrite, amp=amp,
                     channels_last=channels_last,
                     time_limit=parse_duration(time_limit) if time_limit is not None else None)
    if result.rank != 0:                             # rank 0 reports and draws
        return
    _finish_pictures(out, device)
    last = result.last_metrics
    summary = ", ".join(f"{k}={last[k]:.4g}" for k in ("loss", "mse", "kl", "fg_ari") if k in last)
    how = {"signal": "stopped by signal at", "time": "reached the time limit at"}.get(result.stopped, "trained to")
    skipped = f" ({result.skipped} non-finite steps skipped)" if result.skipped else ""
    typer.echo(f"{how} step {result.step}: {summary or 'no metrics logged'}{skipped}; run in {out}")


def _finish_pictures(out: Path, device: str) -> None:
    """decomposition.png and curves.png of a run directory."""
    import torch

    from .data import load_images, open_dataset
    from .evaluate import default_data, load_run
    from .models.iodine import frame
    from .plotting import plot_curves, plot_decomposition

    system, ckpt = load_run(out, device)
    ds = open_dataset(default_data(ckpt))
    batch = load_images(ds, 0, min(4, ds.sizes["image"]))
    torch.manual_seed(0)
    steps = system.infer(batch["image"].to(device))
    x = frame(batch["image"], len(steps) - 1)                   # sequences: the final step's frame
    plot_decomposition(x, steps[-1], out / "decomposition.png",
                       title=f"{ckpt['config'].dataset}, step {ckpt['step']}, final refinement step")
    records = _read_metrics(out)
    if records:
        plot_curves(records, out / "curves.png", title=str(out))


def _read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory (or checkpoint file)."),
    num_images: int = typer.Option(256, help="Number of images to evaluate."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    data: Optional[Path] = typer.Option(None, help="Dataset (default: the run's held-out set)."),
    num_iters: Optional[int] = typer.Option(None, help="Refinement iterations (may exceed the trained T)."),
    num_slots: Optional[int] = typer.Option(None, help="K at test time (may differ from training)."),
    seed: int = typer.Option(0, help="Seed of the posterior samples."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """FG-ARI, ARI, MSE, KL and NLL at every refinement step.

    On a sequence run: per frame, the NLL of the next frame, and the slot stability."""
    from .evaluate import evaluate as run_evaluate

    for name, value in [("--num-images", num_images), ("--batch-size", batch_size),
                        ("--num-iters", num_iters), ("--num-slots", num_slots)]:
        _positive(name, value)
    result = run_evaluate(run_dir, num_images=num_images, batch_size=batch_size, data=data,
                          num_iters=num_iters, num_slots=num_slots, seed=seed, device=device,
                          progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result))
        return
    if result.get("sequence"):
        _print_sequence_result(result)
        return
    typer.echo(f"{result['dataset']}/{result['preset']} run at step {result['step']}, "
               f"{result['num_images']} images of {result['data']}")
    typer.echo(f"{'t':>3} {'FG-ARI':>8} {'ARI':>8} {'MSE':>9} {'KL':>9} {'NLL':>11}")
    for t in range(result["num_iters"]):
        typer.echo(f"{t + 1:>3} {result['fg_ari'][t]:>8.4f} {result['ari'][t]:>8.4f} "
                   f"{result['mse'][t]:>9.5f} {result['kl'][t]:>9.3f} {result['nll'][t]:>11.1f}")


def _print_sequence_result(result: dict) -> None:
    typer.echo(f"{result['dataset']}/{result['preset']} run at step {result['step']}, "
               f"{result['num_images']} sequences of {result['data']}, one refinement step per frame")
    typer.echo(f"{'frame':>5} {'FG-ARI':>8} {'ARI':>8} {'MSE':>9} {'KL':>9} {'NLL':>11} {'next NLL':>11}")
    for t in range(result["num_iters"]):
        pred = result["pred_nll"][t] if t < len(result["pred_nll"]) else float("nan")
        typer.echo(f"{t + 1:>5} {result['fg_ari'][t]:>8.4f} {result['ari'][t]:>8.4f} {result['mse'][t]:>9.5f} "
                   f"{result['kl'][t]:>9.3f} {result['nll'][t]:>11.1f} {pred:>11.1f}")
    typer.echo(f"slot stability: {result['slot_stability']:.4f} (fraction of its visible frames an object "
               f"spends in its most frequent slot; FG-ARI without the first {result['background_groups']} "
               f"mask group(s), the background)")


def _register_commands() -> None:
    from . import cli_data, cli_figures, cli_posterior

    cli_data.register(data_app)
    cli_posterior.register(app)
    cli_figures.register(app)


_register_commands()


def main() -> None:
    """Entry point: known errors print one line and exit 2, never a traceback."""
    from .checkpoint import CheckpointError
    from .data import DatasetError
    from .train import TrainingError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        app()  # usage errors are reported by typer (exit 2)
    except (UserError, DatasetError, CheckpointError, TrainingError, ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if int(os.environ.get("RANK", "0")) == 0:    # under torchrun, rank 0 speaks for all
            typer.echo(f"error: {message}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
