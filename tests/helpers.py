"""Small configurations that keep the tests fast."""

from pathlib import Path

import pytest

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
