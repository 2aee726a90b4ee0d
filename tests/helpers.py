"""Small configurations that keep the tests fast."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iodine_pyro.cli import FAILURE, USAGE  # the command line's exit statuses
from iodine_pyro.config import make_config

# A few records of DeepMind's official Tetrominoes file, where the project's shared notes are.
OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tetrominoes_mini.tfrecords"
needs_official = pytest.mark.skipif(not OFFICIAL.exists(), reason="official sample (../shared) not available")


def tiny_config(preset: str = "paper", dataset: str = "tetrominoes", **overrides):
    """The dataset's configuration shrunk to 12x12 images, K=3, n_z=4, T=3, narrow nets."""
    base = {
        "model.image_size": (12, 12), "model.num_slots": 3, "model.latent_dim": 4,
        "model.decoder_channels": (8, 8), "model.decoder_kernel": 3,
        "guide.num_iters": 3, "guide.conv_channels": (8, 8), "guide.conv_kernel": 3,
        "guide.mlp": (16,), "train.batch_size": 4,
    }
    base.update(overrides)
    return make_config(dataset, preset, base)


# TINY_OVERRIDES as a --config file; [guide] comes last so that a test can append keys to it.
TINY_TOML = """
[train]
batch_size = 4
[model]
latent_dim = 4
decoder_channels = [8, 8]
decoder_kernel = 3
[guide]
num_iters = 3
conv_channels = [8, 8]
conv_kernel = 3
mlp = [16]
"""

TINY_OVERRIDES = {  # full 35x35 Tetrominoes images, narrow nets: a step takes milliseconds
    "model.latent_dim": 4, "model.decoder_channels": (8, 8), "model.decoder_kernel": 3,
    "guide.num_iters": 3, "guide.conv_channels": (8, 8), "guide.conv_kernel": 3, "guide.mlp": (16,),
    "train.batch_size": 4,
}


def tiny_run(root, steps: int = 3, guide: str = "iterative", num_images: int = 48, seed: int = 0, **overrides):
    """Generate a small Tetrominoes set under `root` and train a tiny model on it.

    Returns the run directory (checkpoint.pt, metrics.jsonl; data in root/data)."""
    from pathlib import Path

    from iodine_pyro.data import generate
    from iodine_pyro.training import fit

    root = Path(root)
    data = root / "data"
    if not data.exists():
        generate("tetrominoes", num_images, data, seed=seed, progress=False, workers=1)
    out = root / f"run-{guide}"
    fit(out=out, data=data, steps=steps, dataset="tetrominoes",
        overrides={**TINY_OVERRIDES, "guide.kind": guide, **overrides}, seed=seed, log_every=1,
        checkpoint_every=steps, progress=False)
    return out


def params(run_dir):
    """A run's trained parameters, from its checkpoint."""
    from pathlib import Path

    from iodine_pyro.checkpoint import load_checkpoint
    return load_checkpoint(Path(run_dir))["system"]


def assert_same_params(a, b):
    import torch
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k




def status_of(error_line: str) -> int:
    """The exit status an error line must come with: usage errors send the user to the
    command's --help and exit 2; every failure at run time exits 1."""
    return USAGE if error_line.rstrip().endswith("--help") else FAILURE


ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """The command line in a new process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "iodine_pyro", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The command failed with one error line that names every needle, and the exit
    status of its kind (`status_of`), never a traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip()
    assert proc.returncode == status_of(err.splitlines()[-1]), (proc.returncode, err)
    for needle in needles:
        assert needle in err, err


def run_main(*args) -> tuple[int, str, str]:
    """The command line in this process, as `iodine_pyro.cli.main` runs it: (exit status,
    stdout, stderr)."""
    from iodine_pyro.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()
