"""Training: Pyro SVI on the T-step weighted ELBO with Adam and global-norm clipping.

    from iodine_pyro.training import fit
    result = fit(out="runs/tet", steps=1000, preset="fast")

`fit` owns a run directory: it resumes from its checkpoint when one is there, writes
``metrics.jsonl`` every ``log_every`` steps and checkpoints atomically every
``checkpoint_every`` steps, at the end, on SIGINT/SIGTERM, and when numerical faults or
damaged data stop the run. Under torchrun it trains data-parallel.

Nothing is lost (docs/robustness.md):

* A directory is a run only when its checkpoint or its manifest says so; ``--overwrite``
  removes what the manifest records and nothing else; run files are never written through
  symbolic links; one `fit` at a time holds the directory (`rundir`).
* A step is applied only when the batch, the loss, the gradient and the updated
  parameters are all finite; otherwise it is undone, skipped and counted (`step`).
* Data are checked as they are read; a missing or damaged chunk stops the run with a
  checkpoint of the last good step (`loop`).
* A kill at any moment (data generation, the first checkpoint, training) leaves a
  directory that the same command continues, bit for bit (`state`).

The modules, each importing only those above it:

    speed      device defaults: bf16 autocast, channels-last, sync-free steps
    ddp        data-parallel processes (DDP), per-step seeds, the torchrun launcher
    rundir     the run directory: manifest, lock, what --overwrite removes, recorded data
    step       one optimisation step, host-checked or sync-free, with one fault counter
    state      system, optimiser, GECO, data position, step, RNG, spent time; the checkpoint
    stops      the stopping rules: steps, time limit, signals, too many faults
    report     metrics.jsonl rows and the progress bar
    request    FitRequest (checked on construction) and FitResult
    loop       the training loop
    fitting    fit: request -> run directory and data -> state -> loop
"""

from .fitting import fit
from .request import FitRequest, FitResult
from .rundir import MANIFEST
from .speed import speed_settings
from .state import Geco, TrainingState, learning_rate, make_optimizer
from .step import train_step
from .stops import TrainingError

__all__ = ["MANIFEST", "FitRequest", "FitResult", "Geco", "TrainingError", "TrainingState", "fit",
           "learning_rate", "make_optimizer", "speed_settings", "train_step"]
