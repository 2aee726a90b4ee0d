"""Command `evaluate`: the evaluation table at every refinement step."""

from __future__ import annotations

import json

import typer

from .options import Amp, AsJson, BatchSize, Data, Device, NumImages, NumIters, NumSlots, RunRef, Seed, Threads, use_threads


def evaluate(
    run: RunRef,
    num_images: NumImages = 256,
    batch_size: BatchSize = 32,
    data: Data = None,
    num_iters: NumIters = None,
    num_slots: NumSlots = None,
    seed: Seed = 0,
    device: Device = "cpu",
    threads: Threads = None,
    amp: Amp = False,
    as_json: AsJson = False,
):
    """FG-ARI, ARI, MSE, KL and NLL at every refinement step, on the run's held-out set.

    On a sequence run: per frame, the NLL of the next frame, and the slot stability."""
    from ..evaluate import evaluate as run_evaluate
    from ..evaluate import table

    use_threads(threads, device, err=as_json)
    result = run_evaluate(run, num_images=num_images, batch_size=batch_size, data=data, num_iters=num_iters,
                          num_slots=num_slots, seed=seed, device=device, amp=amp,
                          progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result))
        return
    sequence = result.get("sequence", False)
    unit = "sequences" if sequence else "images"
    typer.echo(f"{result['dataset']}/{result['preset']} run at step {result['step']}, "
               f"{result['num_images']} {unit} of {result['data']}"
               + (", one refinement step per frame" if sequence else "")
               + (f", networks in {result['precision']}" if result["precision"] != "float32" else ""))
    for line in table(result, first="frame" if sequence else "t"):
        typer.echo(line)
    background = result["background_groups"]
    note = f"FG-ARI without the first {background} mask groups (the background)"
    if sequence:
        typer.echo(f"slot stability: {result['slot_stability']:.4f} (fraction of its visible frames an object "
                   f"spends in its most frequent slot); {note}")
    elif background > 1:
        typer.echo(note)


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
