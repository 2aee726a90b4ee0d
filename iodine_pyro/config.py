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

# Names of the refinement network's inputs. Image-sized inputs are concatenated along
# channels and fed to the convolutional stack; vector inputs are concatenated with the
# pooled features. Any of them can be switched off by name (the paper's input ablations).
SPATIAL_INPUTS = (
    "image",           # x                        C channels
    "means",           # mu_k                     C
    "mask",            # pi_k                     1
    "mask_logits",     # m_k (decoder output)     1
    "mask_posterior",  # p(m_k | x, mu)           1
    "grad_means",      # dL/dmu_k       LN        C
    "grad_mask",       # dL/dm_k        LN        1
    "likelihood",      # log p(x | z)   LN        1
    "leave_one_out",   # log p(x|z) - log p(x|z_{i!=k})  LN  1
    "coordinates",     # row, column in [-1, 1]   2
    "capacity",        # constant 0.5 (deepmind)  1
    "cos_coordinates", # cos(i pi u) cos(j pi v)  8 (deepmind, dSprites/Tetrominoes)
)
VECTOR_INPUTS = ("posterior", "grad_posterior")  # lambda_k; dL/dlambda_k (LN)
ALL_INPUTS = SPATIAL_INPUTS + VECTOR_INPUTS
PAPER_INPUTS = SPATIAL_INPUTS[:10] + VECTOR_INPUTS  # the appendix's 17 channels + vectors
# Inputs that are layer-normed before use (all inputs are stop-gradient).
LAYER_NORMED = ("grad_means", "grad_mask", "likelihood", "leave_one_out", "grad_posterior")


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

    kind: str = "iterative"                  # "iterative" | "amortized" (VAE baseline)
    num_iters: int = 5                       # T
    loss_weights: str = "paper"              # "paper": t/T, t=1..T; "deepmind": linspace(0,1,T+1)
    posterior_scale: str = "softplus"        # sigma = softplus(s) | "sqrt_softplus": sqrt(softplus(s))
    mask_posterior: str = "responsibility"   # | "normalized_likelihood" (deepmind)
    conv_channels: tuple[int, ...] = (32, 32, 32)
    conv_kernel: int = 5
    conv_stride: int = 1                     # deepmind: 2 (SAME padding)
    mlp: tuple[int, ...] = (128,)
    lstm: int | None = None                  # hidden size; None = no LSTM (Tetrominoes)
    inputs: tuple[str, ...] = PAPER_INPUTS
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
    "guide.mlp": (256,),
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
        "guide.inputs": PAPER_INPUTS[:-2] + ("capacity",) + VECTOR_INPUTS,
        "train.beta1": 0.95,
        "train.lr_decay": 0.1,
    },
}
# DeepMind's per-dataset optimiser settings and extra inputs.
# For Multi-dSprites and Tetrominoes the released code's coordinate features are the 8
# cosines instead of the 2 linear coordinates: 17 - 2 + 1 + 8 = 24 channels.
_COSINE_INPUTS = SPATIAL_INPUTS[:9] + ("capacity", "cos_coordinates") + VECTOR_INPUTS
PRESET_DATASET: dict[tuple[str, str], dict[str, Any]] = {
    ("deepmind", "tetrominoes"): {"train.lr": 3e-4, "train.batch_size": 256, "guide.inputs": _COSINE_INPUTS},
    ("deepmind", "multi_dsprites"): {"train.lr": 3e-4, "train.batch_size": 128, "guide.inputs": _COSINE_INPUTS},
    ("deepmind", "clevr6"): {"train.lr": 1e-3, "train.batch_size": 32},
    ("deepmind", "clevr"): {"train.lr": 1e-3, "train.batch_size": 32},
}
# Every field a preset changes, for documentation and tests.
PRESET_FIELDS = sorted(
    set(PRESETS["deepmind"]) | {k for (p, _), v in PRESET_DATASET.items() for k in v}
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
        (g.kind in ("iterative", "amortized"), f"guide must be iterative or amortized, got {g.kind!r}"),
        (g.num_iters >= 1, f"num_iters must be >= 1, got {g.num_iters}"),
        (g.loss_weights in ("paper", "deepmind"), "loss_weights must be paper or deepmind"),
        (g.posterior_scale in ("softplus", "sqrt_softplus"), "posterior_scale must be softplus or sqrt_softplus"),
        (g.mask_posterior in ("responsibility", "normalized_likelihood"),
         "mask_posterior must be responsibility or normalized_likelihood"),
        (set(g.inputs) <= set(ALL_INPUTS), f"unknown refinement inputs {sorted(set(g.inputs) - set(ALL_INPUTS))}"),
        (set(g.disabled_inputs) <= set(g.inputs),
         f"cannot disable inputs not in use: {sorted(set(g.disabled_inputs) - set(g.inputs))}; "
         f"inputs are {list(g.inputs)}"),
        (any(n in SPATIAL_INPUTS for n in g.active_inputs()),
         "at least one image-sized refinement input must stay enabled"),
        (t.lr > 0 and t.batch_size >= 1 and t.clip_norm > 0, "lr, batch_size and clip_norm must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def loss_weights(kind: str, num_iters: int) -> list[float]:
    """Weights w_t of the per-step losses; one weight per decoder pass.

    ``paper``: sum_{t=1..T} (t/T) L_t (T decoder passes, T-1 refinements used).
    ``deepmind``: t = 0..T with weights linspace(0, 1, T+1) (T+1 passes, T refinements;
    the initial posterior's term has weight 0).
    """
    T = num_iters
    if kind == "paper":
        return [t / T for t in range(1, T + 1)]
    return [t / T for t in range(0, T + 1)]


def frame_weights(kind: str, num_frames: int) -> list[float]:
    """Weights of a sequence of `num_frames` frames: one decoder pass (one step) per frame.

    ``paper``: t/F, t = 1..F. ``deepmind``: linspace(0, 1, F), the initial posterior's
    guess of frame 0 weighted 0 (F - 1 refinements, as ``loss_weights("deepmind", F - 1)``).
    """
    if num_frames < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {num_frames}")
    return loss_weights(kind, num_frames if kind == "paper" else num_frames - 1)
