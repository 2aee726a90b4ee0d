"""Small configurations that keep the tests fast."""

from iodine_pyro.config import make_config


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
