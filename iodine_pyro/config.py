"""Configuration: one small dataclass per role, per-dataset architectures and presets.

Architectures (the paper's appendix C) live here as data, never as branches in the
networks. A configuration is built in three layers, later ones winning:

1. the per-dataset architecture (``ARCHITECTURES``),
2. the preset, ``paper`` (appendix C, the default) or ``deepmind`` (DeepMind's released
   code), which changes the likelihood, prior, posterior parameterisation, loss weights,
   refinement convolutions and inputs, and the optimiser (``PRESETS``),
3. explicit overrides (``make_config(..., num_slots=11)``).

Every field that differs between presets is listed in ``PRESET_FIELDS`` and documented
in ``docs/presets.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .guides import ITERATIVE, guide_kinds
from .guides.inputs import INPUTS, PAPER_INPUTS, PAPER_STOP_GRADIENT

# The refinement network's inputs are the rows of `iodine_pyro.guides.inputs.INPUTS`;
# presets choose them by name, and which of them are stop-gradient.
DEEPMIND_INPUTS = ("image", "means", "mask", "mask_logits", "mask_posterior", "grad_means", "grad_mask",
                   "likelihood", "leave_one_out", "coordinates", "capacity", "posterior", "grad_posterior")
# For Multi-dSprites and Tetrominoes the released code's coordinate features are the 8
# cosines instead of the 2 linear coordinates: 17 - 2 + 1 + 8 = 24 channels.
DEEPMIND_COSINE_INPUTS = ("image", "means", "mask", "mask_logits", "mask_posterior", "grad_means",
                          "grad_mask", "likelihood", "leave_one_out", "capacity", "cos_coordinates",
                          "posterior", "grad_posterior")


@dataclass
class ModelConfig:
    """The generative model p(x, z) = prod_k N(z_k; 0, prior_var I) p(x | z)."""

    image_channels: int = 3
    image_size: tuple[int, int] = (35, 35)
    num_slots: int = 4                       # K
    latent_dim: int = 32                     # n_z
    pixel: str = "gaussian"                  # "gaussian" | "logistic"
    pixel_scale: float = 0.1                 # sigma of the Gaussian / scale of the Logistic
    prior_var: float = 1.0                   # N(0, prior_var); deepmind: softplus(0) = ln 2
    decoder: str = "broadcast"               # "broadcast" | "deconv" (ablation, Sec. 4.3)
    decoder_channels: tuple[int, ...] = (32, 32, 32, 32)
    decoder_kernel: int = 5
    decoder_constant: float | None = None    # deepmind appends a constant 5.0 to z
    deconv_mlp: tuple[int, ...] = (512, 512)
    deconv_start: tuple[int, int, int] = (8, 8, 8)   # channels, height, width after reshape


@dataclass
class GuideConfig:
    """IODINE's iterative amortized posterior q(z | lambda_T)."""

    kind: str = ITERATIVE                    # a registered guide (iodine_pyro.guides): IODINE's
                                             # iterative guide, or the amortized VAE baseline
    num_iters: int = 5                       # T
    loss_weights: str = "paper"              # "paper": t/T, t=1..T; "deepmind": linspace(0,1,T+1)
    posterior_scale: str = "softplus"        # sigma = softplus(s) | "sqrt_softplus": sqrt(softplus(s))
    mask_posterior: str = "responsibility"   # | "normalized_likelihood" (deepmind)
    conv_channels: tuple[int, ...] = (32, 32, 32)
    conv_kernel: int = 5
    conv_stride: int = 1                     # deepmind: 2 (SAME padding)
    mlp: tuple[int, ...] = (128,)            # after pooling, ELU after each layer ...
    mlp_linear_last: bool = False            # ... but the last (CLEVR; the released code everywhere)
    lstm: int | None = None                  # hidden size; None = no LSTM (Tetrominoes)
    inputs: tuple[str, ...] = PAPER_INPUTS   # rows of guides.inputs.INPUTS, by name
    stop_gradient: tuple[str, ...] = PAPER_STOP_GRADIENT  # inputs the loss does not differentiate through
    grad_reduction: str = "image"            # gradient inputs of "image": each image's own -ELBO |
                                             # "batch_mean": the batch mean's (released code)
    disabled_inputs: tuple[str, ...] = ()    # names from `inputs` left out (ablations)
    recompute: bool = False                  # training: recompute each step's activations in the
                                             # backward pass instead of storing them (memory flat in T)

    def active_inputs(self) -> tuple[str, ...]:
        return tuple(n for n in self.inputs if n not in self.disabled_inputs)


@dataclass
class TrainConfig:
    """Optimisation: Adam, global gradient-norm clipping."""

    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    batch_size: int = 32
    clip_norm: float = 5.0
    lr_decay: float = 1.0                    # multiply lr by this every lr_decay_steps
    lr_decay_steps: int = 1_000_000
    max_bad_steps: int = 20                  # non-finite steps in a row before stopping
    warmup_steps: int = 0                    # lr rises linearly from 0 over this many steps
    init: str = "torch"                      # initial weights: "torch" (PyTorch's defaults) |
                                             # "sonnet" (truncated normal 1/sqrt(fan_in), zero bias)
    geco_goal: float | None = None           # GECO: target reconstruction MSE; None = the plain ELBO
    geco_rate: float = 0.01                  # GECO: step of log(beta) per unit relative violation
    geco_ema: float = 0.99                   # GECO: smoothing of the measured MSE


@dataclass
class Config:
    dataset: str = "tetrominoes"
    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        def build(klass, values):
            names = {f.name: f for f in dataclasses.fields(klass)}
            unknown = set(values) - set(names)
            if unknown:
                raise ValueError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
            kw = {}
            for k, v in values.items():
                kw[k] = tuple(v) if isinstance(v, list) else v
            return klass(**kw)

        return cls(
            dataset=d["dataset"],
            preset=d["preset"],
            model=build(ModelConfig, d["model"]),
            guide=build(GuideConfig, d["guide"]),
            train=build(TrainConfig, d["train"]),
        )


# ---------------------------------------------------------------------------------------
# Per-dataset architectures (paper appendix C). Keys are "section.field".
# ---------------------------------------------------------------------------------------
_SMALL = {  # Multi-dSprites and Tetrominoes share the decoder and refinement convs
    "model.decoder_channels": (32, 32, 32, 32),
    "model.decoder_kernel": 5,
    "guide.conv_channels": (32, 32, 32),
    "guide.conv_kernel": 5,
    "guide.mlp": (128,),
}
_CLEVR = {
    "model.image_size": (128, 128),
    "model.latent_dim": 64,
    "model.decoder_channels": (64, 64, 64, 64),
    "model.decoder_kernel": 3,
    "guide.conv_channels": (64, 64, 64, 64),
    "guide.conv_kernel": 3,
    "guide.mlp": (256, 256),                 # 256 ELU, 256 linear (appendix C; the released config)
    "guide.mlp_linear_last": True,
    "guide.lstm": 256,
}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tetrominoes": {**_SMALL, "model.image_size": (35, 35), "model.num_slots": 4,
                    "model.latent_dim": 32, "guide.lstm": None},
    "multi_dsprites": {**_SMALL, "model.image_size": (64, 64), "model.num_slots": 6,
                       "model.latent_dim": 16, "guide.lstm": 128},
    # The other Multi-dSprites variants: the same network, K = their number of mask groups.
    "multi_dsprites_colored_on_colored": {**_SMALL, "model.image_size": (64, 64), "model.num_slots": 5,
                                          "model.latent_dim": 16, "guide.lstm": 128},
    "multi_dsprites_binarized": {**_SMALL, "model.image_size": (64, 64), "model.image_channels": 1,
                                 "model.num_slots": 4, "model.latent_dim": 16, "guide.lstm": 128},
    # Shapes: the paper gives no architecture; the Multi-dSprites one, K = 4 (3 shapes + background).
    "shapes": {**_SMALL, "model.image_size": (28, 28), "model.image_channels": 1, "model.num_slots": 4,
               "model.latent_dim": 16, "guide.lstm": 128},
    "clevr6": {**_CLEVR, "model.num_slots": 7},
    "clevr": {**_CLEVR, "model.num_slots": 11},
    # Objects Room: the paper gives no architecture; the Multi-dSprites one (with its LSTM),
    # K = 7 (sky, floor, two wall halves, 3 objects). The sequences use the same network.
    "objects_room": {**_SMALL, "model.image_size": (64, 64), "model.num_slots": 7,
                     "model.latent_dim": 16, "guide.lstm": 128},
    # Sequences (appendix A.1): one refinement step per frame, T = the 16 frames of the data;
    # recomputation keeps training memory flat over the 16 steps (appendix A.2).
    "objects_room_sequences": {**_SMALL, "model.image_size": (64, 64), "model.num_slots": 7,
                               "model.latent_dim": 16, "guide.lstm": 128,
                               "guide.num_iters": 16, "guide.recompute": True},
    # Moving sprites: Multi-dSprites scenes whose sprites move at a constant velocity.
    "multi_dsprites_sequences": {**_SMALL, "model.image_size": (64, 64), "model.num_slots": 6,
                                 "model.latent_dim": 16, "guide.lstm": 128,
                                 "guide.num_iters": 16, "guide.recompute": True},
}

LN2 = math.log(2.0)
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # the dataclass defaults are the paper's appendix C
    "deepmind": {
        "model.pixel": "logistic",
        "model.pixel_scale": 0.03,
        "model.prior_var": LN2,
        "model.decoder_constant": 5.0,
        "guide.loss_weights": "deepmind",
        "guide.posterior_scale": "sqrt_softplus",
        "guide.mask_posterior": "normalized_likelihood",
        "guide.conv_stride": 2,
        "guide.inputs": DEEPMIND_INPUTS,
        "guide.grad_reduction": "batch_mean",
        "guide.mlp_linear_last": True,
        "train.beta1": 0.95,
        "train.init": "sonnet",
        "train.lr_decay": 0.1,
    },
    # The paper's model and iterative guide, trained for speed of learning per hour on a
    # small machine: the levers measured in docs/learning.md (benchmarks/learning_speed.py).
    "fast": {
        "model.pixel_scale": 0.3,
        "train.lr": 1e-3,
        "train.warmup_steps": 200,
        "train.batch_size": 8,
        "train.geco_goal": 0.01,
        "train.geco_rate": 0.05,
    },
}
# DeepMind's per-dataset optimiser settings and extra inputs.
PRESET_DATASET: dict[tuple[str, str], dict[str, Any]] = {
    ("deepmind", "tetrominoes"): {"train.lr": 3e-4, "train.batch_size": 256, "guide.inputs": DEEPMIND_COSINE_INPUTS},
    ("deepmind", "multi_dsprites"): {"train.lr": 3e-4, "train.batch_size": 128, "guide.inputs": DEEPMIND_COSINE_INPUTS},
    ("deepmind", "clevr6"): {"train.lr": 1e-3, "train.batch_size": 32},
    ("deepmind", "clevr"): {"train.lr": 1e-3, "train.batch_size": 32},
}
# Every field a preset changes, for documentation and tests.
PRESET_FIELDS = sorted(
    {k for v in PRESETS.values() for k in v} | {k for (p, _), v in PRESET_DATASET.items() for k in v}
)


def _set(cfg: Config, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    target = getattr(cfg, section)
    if not hasattr(target, name):
        raise ValueError(f"unknown configuration field {key!r}")
    if isinstance(value, list):
        value = tuple(value)
    setattr(target, name, value)


def make_config(dataset: str = "tetrominoes", preset: str = "paper",
                overrides: dict[str, Any] | None = None) -> Config:
    """Build the configuration of `dataset` under `preset`, then apply `overrides`.

    Args:
        dataset: a key of ``ARCHITECTURES``.
        preset: ``"paper"`` or ``"deepmind"``.
        overrides: ``{"section.field": value}``, e.g. ``{"model.num_slots": 11}``.
    """
    if dataset not in ARCHITECTURES:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = Config(dataset=dataset, preset=preset)
    layers = [ARCHITECTURES[dataset], PRESETS[preset], PRESET_DATASET.get((preset, dataset), {}),
              overrides or {}]
    for layer in layers:
        for key, value in layer.items():
            _set(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise ValueError (one line) on an inconsistent configuration."""
    m, g, t = cfg.model, cfg.guide, cfg.train
    checks = [
        (m.num_slots >= 1, f"num_slots must be >= 1, got {m.num_slots}"),
        (m.latent_dim >= 1, f"latent_dim must be >= 1, got {m.latent_dim}"),
        (m.pixel in ("gaussian", "logistic"), f"pixel must be gaussian or logistic, got {m.pixel!r}"),
        (m.pixel_scale > 0, f"pixel_scale must be > 0, got {m.pixel_scale}"),
        (m.prior_var > 0, f"prior_var must be > 0, got {m.prior_var}"),
        (m.decoder in ("broadcast", "deconv"), f"decoder must be broadcast or deconv, got {m.decoder!r}"),
        (g.kind in guide_kinds(), f"unknown guide {g.kind!r}; choose from {', '.join(guide_kinds())}"),
        (g.num_iters >= 1, f"num_iters must be >= 1, got {g.num_iters}"),
        (g.loss_weights in ("paper", "deepmind"), "loss_weights must be paper or deepmind"),
        (g.posterior_scale in ("softplus", "sqrt_softplus"), "posterior_scale must be softplus or sqrt_softplus"),
        (g.mask_posterior in ("responsibility", "normalized_likelihood"),
         "mask_posterior must be responsibility or normalized_likelihood"),
        (set(g.inputs) <= set(INPUTS), f"unknown refinement inputs {sorted(set(g.inputs) - set(INPUTS))}; "
                                       f"choose from {list(INPUTS)}"),
        (set(g.stop_gradient) <= set(INPUTS),
         f"unknown stop-gradient inputs {sorted(set(g.stop_gradient) - set(INPUTS))}"),
        (g.grad_reduction in ("image", "batch_mean"), "grad_reduction must be image or batch_mean"),
        (set(g.disabled_inputs) <= set(g.inputs),
         f"cannot disable inputs not in use: {sorted(set(g.disabled_inputs) - set(g.inputs))}; "
         f"inputs are {list(g.inputs)}"),
        (any(INPUTS[n].spatial for n in g.active_inputs() if n in INPUTS),
         "at least one image-sized refinement input must stay enabled"),
        (t.lr > 0 and t.batch_size >= 1 and t.clip_norm > 0, "lr, batch_size and clip_norm must be positive"),
        (t.warmup_steps >= 0, f"warmup_steps must be >= 0, got {t.warmup_steps}"),
        (t.init in ("torch", "sonnet"), f"init must be torch or sonnet, got {t.init!r}"),
        (t.geco_goal is None or t.geco_goal > 0, f"geco_goal must be > 0 (a reconstruction MSE), got {t.geco_goal}"),
        (t.geco_rate > 0 and 0 <= t.geco_ema < 1, "geco_rate must be > 0 and geco_ema in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
