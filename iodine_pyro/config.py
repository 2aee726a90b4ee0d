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

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .fields import (FLOAT32_MAX, Rule, boolean, choice, integer, integers, names, number, odd, optional,
                     ruled, rules)
from .guides import ITERATIVE, guide_class, guide_kinds, guide_sections
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


DECODERS = ("broadcast", "deconv")     # the spatial broadcast decoder, and the ablation of Sec. 4.3


@dataclass
class ModelConfig:
    """The generative model p(x, z) = prod_k N(z_k; 0, prior_var I) p(x | z)."""

    image_channels: int = ruled(3, integer(1, 64))
    image_size: tuple[int, int] = ruled((35, 35), integers(2))
    num_slots: int = ruled(4, integer(1))                           # K
    latent_dim: int = ruled(32, integer(1))                         # n_z
    pixel: str = ruled("gaussian", choice("gaussian", "logistic"))
    pixel_scale: float = ruled(0.1, number(0))                      # sigma of the Gaussian / scale of the Logistic
    prior_var: float = ruled(1.0, number(0))                        # N(0, prior_var); deepmind: softplus(0) = ln 2
    decoder: str = ruled("broadcast", choice(*DECODERS))   # deconv: the ablation of Sec. 4.3
    decoder_channels: tuple[int, ...] = ruled((32, 32, 32, 32), integers(nonempty=False))
    decoder_kernel: int = ruled(5, odd())
    decoder_constant: float | None = ruled(None, optional(number(-FLOAT32_MAX, lo_open=False)))
                                                                    # deepmind appends a constant 5.0 to z
    deconv_mlp: tuple[int, ...] = ruled((512, 512), integers(nonempty=False))
    deconv_start: tuple[int, int, int] = ruled((8, 8, 8), integers(3))   # channels, height, width after reshape


@dataclass
class GuideConfig:
    """IODINE's iterative amortized posterior q(z | lambda_T)."""

    kind: str = ruled(ITERATIVE, lambda v: None if isinstance(v, str) else "a guide's name")
                                                                    # a registered guide (iodine_pyro.guides)
    num_iters: int = ruled(5, integer(1))                           # T
    loss_weights: str = ruled("paper", choice("paper", "deepmind"))
                                                                    # "paper": t/T, t=1..T; "deepmind": linspace(0,1,T+1)
    posterior_scale: str = ruled("softplus", choice("softplus", "sqrt_softplus"))
                                                                    # sigma = softplus(s) | sqrt(softplus(s))
    mask_posterior: str = ruled("responsibility", choice("responsibility", "normalized_likelihood"))
                                                                    # normalized_likelihood: deepmind
    conv_channels: tuple[int, ...] = ruled((32, 32, 32), integers())
    conv_kernel: int = ruled(5, integer(1))
    conv_stride: int = ruled(1, integer(1))                         # deepmind: 2 (SAME padding)
    mlp: tuple[int, ...] = ruled((128,), integers(nonempty=False))  # after pooling, ELU after each layer ...
    mlp_linear_last: bool = ruled(False, boolean)                   # ... but the last (CLEVR; deepmind everywhere)
    lstm: int | None = ruled(None, optional(integer(1)))            # hidden size; None = no LSTM (Tetrominoes)
    inputs: tuple[str, ...] = ruled(PAPER_INPUTS, names)            # rows of guides.inputs.INPUTS, by name
    stop_gradient: tuple[str, ...] = ruled(PAPER_STOP_GRADIENT, names)   # inputs the loss does not
                                                                    # differentiate through
    grad_reduction: str = ruled("image", choice("image", "batch_mean"))
                                                                    # gradient inputs of "image": each image's own
                                                                    # -ELBO | "batch_mean": the batch mean's (released code)
    disabled_inputs: tuple[str, ...] = ruled((), names)             # names from `inputs` left out (ablations)
    recompute: bool = ruled(False, boolean)                         # training: recompute each step's activations in
                                                                    # the backward pass (memory flat in T)
    grad_steps: int | None = ruled(None, optional(integer(1)))      # training: differentiate only the last this many
                                                                    # decoder passes, lambda detached before them
                                                                    # (None: all of them, the paper)
    first_slot_init: bool = ruled(False, boolean)                   # slot 1 starts from its own trainable lambda_1
                                                                    # (mean drawn from the prior), the others share
                                                                    # one (False: one for all slots, the paper)

    def active_inputs(self) -> tuple[str, ...]:
        return tuple(n for n in self.inputs if n not in self.disabled_inputs)


# GECO's floor for beta (`training.Geco`): the KL keeps a weight of at least this
GECO_BETA_MIN = 1e-6


@dataclass
class TrainConfig:
    """Optimisation: Adam, global gradient-norm clipping."""

    lr: float = ruled(3e-4, number(0))
    beta1: float = ruled(0.9, number(0, 1, lo_open=False, hi_open=True))
    beta2: float = ruled(0.999, number(0, 1, lo_open=False, hi_open=True))
    batch_size: int = ruled(32, integer(1))
    clip_norm: float = ruled(5.0, number(0))
    lr_decay: float = ruled(1.0, number(0, 1))                      # multiply lr by this every lr_decay_steps
    lr_decay_steps: int = ruled(1_000_000, integer(1))
    max_bad_steps: int = ruled(20, integer(1))                      # non-finite steps in a row before stopping
    warmup_steps: int = ruled(0, integer(0))                        # lr rises linearly from 0 over this many steps
    init: str = ruled("torch", choice("torch", "sonnet"))           # initial weights: PyTorch's defaults |
                                                                    # truncated normal 1/sqrt(fan_in), zero bias
    geco_goal: float | None = ruled(None, optional(number(0)))      # GECO: target reconstruction MSE; None = the ELBO
    geco_rate: float = ruled(0.01, number(0))                       # GECO: step of log(beta) per unit violation
    geco_ema: float = ruled(0.99, number(0, 1, lo_open=False, hi_open=True))   # GECO: smoothing of the MSE
    geco_release_step: int | None = ruled(None, optional(integer(0)))   # GECO: from this step on beta returns
                                                                    # to beta_max at geco_rate per step
    beta_max: float = ruled(1.0, number(0))                         # the KL's largest weight: GECO's ceiling, or
                                                                    # without GECO its weight (1: the ELBO)
    pixel_scale_final: float | None = ruled(None, optional(number(0)))  # anneal model.pixel_scale geometrically
    pixel_anneal_start: int = ruled(0, integer(0))                  # ... from this step ...
    pixel_anneal_steps: int = ruled(1, integer(1))                  # ... over this many steps (`pixel_scale_at`)
    pixel_return_start: int | None = ruled(None, optional(integer(0)))  # from this step back to model.pixel_scale,
                                                                    # over pixel_anneal_steps again
    num_slots_final: int | None = ruled(None, optional(integer(1)))  # train with this K (model.num_slots) ...
    num_slots_step: int = ruled(0, integer(0))                      # ... from this step on (`num_slots_at`)


@dataclass
class Config:
    dataset: str = "tetrominoes"
    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # sections that guides declare (`iodine_pyro.guides.guide_sections`), by name; one is
    # made with its defaults when first read (``cfg.slot_attention``), so a configuration
    # stored before its guide existed still loads
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        """A guide's own section (`sections`), made with its defaults on first use."""
        sections = self.__dict__.get("sections")
        if sections is None or name.startswith("_") or name not in guide_sections():
            raise AttributeError(name)
        if name not in sections:
            sections[name] = section_class(name)()
        return sections[name]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "sections"}
        d.update({name: dataclasses.asdict(v) for name, v in sorted(self.sections.items())})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """The configuration a checkpoint stores (`to_dict`), checked by `validate`: a
        stored file is user input like any other. Fields it lacks take their defaults
        (a checkpoint of an earlier version); unknown fields are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"the configuration is a {type(d).__name__}, not a table")
        missing = [k for k in ("dataset", "preset", "model", "guide", "train") if k not in d]
        if missing:
            raise ValueError(f"the configuration lacks {', '.join(missing)}")

        def build(section, klass, values):
            if not isinstance(values, dict):
                raise ValueError(f"{section} is a {type(values).__name__}, not a table")
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = sorted(str(k) for k in set(values) - names)
            if unknown:
                raise ValueError(f"unknown {section} field(s) {', '.join(unknown)}")
            return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        extra = [k for k in d if k not in ("dataset", "preset", "model", "guide", "train")]
        unknown = sorted(str(k) for k in extra if k not in guide_sections())
        if unknown:
            raise ValueError(f"unknown configuration section(s) {', '.join(unknown)}")
        cfg = cls(
            dataset=d["dataset"],
            preset=d["preset"],
            model=build("model", ModelConfig, d["model"]),
            guide=build("guide", GuideConfig, d["guide"]),
            train=build("train", TrainConfig, d["train"]),
            sections={k: build(k, section_class(k), d[k]) for k in extra},
        )
        validate(cfg)
        return cfg


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
        "train.init": "sonnet",
        "train.geco_goal": 0.01,
        "train.geco_rate": 0.05,
        "train.lr_decay": 0.5,
        "train.lr_decay_steps": 3000,
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


def section_class(name: str) -> type:
    """The dataclass of a guide's own configuration section (`guide_sections`)."""
    kind = guide_sections().get(name)
    klass = getattr(guide_class(kind), "Section", None) if kind is not None else None
    if klass is None:
        raise ValueError(f"unknown configuration section {name!r}")
    return klass


def section_rules(name: str) -> dict[str, Rule]:
    """``{field: rule}`` of a guide's own section: the rules declared with its fields."""
    return rules(section_class(name))


def _set(cfg: Config, key: str, value: Any) -> None:
    section, _, name = str(key).partition(".")
    own = {"model": ModelConfig, "guide": GuideConfig, "train": TrainConfig}
    klass = own.get(section) or (section_class(section) if section in guide_sections() else None)
    if klass is None or name not in {f.name for f in dataclasses.fields(klass)}:
        raise ValueError(f"unknown configuration field {key!r}")
    target = getattr(cfg, section)
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


def field_differences(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """``(section.field, a's value, b's value)`` for every field where two configurations differ."""
    for name in {*a.sections, *b.sections}:                # a section one lacks: its defaults
        getattr(a, name), getattr(b, name)
    da, db = a.to_dict(), b.to_dict()
    return [(f"{section}.{k}", da[section][k], db[section][k])
            for section in ("model", "guide", "train", *sorted(a.sections))
            for k in da[section] if da[section][k] != db[section][k]]


# What a resumed run may change: how it is optimised from its step on, never what it is
# (model, guide, data). Lowering the learning rate of a long run is the common case; the
# batch grows the same way (the data stream goes on from the image it stands at,
# `Batches.load_state_dict`).
SCHEDULE_FIELDS = ("train.lr", "train.lr_decay", "train.lr_decay_steps", "train.warmup_steps", "train.batch_size",
                   "train.clip_norm", "train.max_bad_steps", "train.geco_goal", "train.geco_rate",
                   "train.geco_release_step", "train.beta_max",
                   "train.pixel_scale_final", "train.pixel_anneal_start", "train.pixel_anneal_steps",
                   "train.pixel_return_start", "train.num_slots_final", "train.num_slots_step")
# ... and, with a guide that runs with any K (`can_change_slots`: no parameter has a slot
# dimension), the number of slots: trained on from the run's step on, as `evaluate
# --num-slots` tests with it. Measured on Tetrominoes (docs/learning.md): 5 or 4 slots after
# 6 gather objects that were cut across the spare slots (slots per image owning part of its
# 3 objects 4.4 -> 4.0 or 3.7; FG-ARI 0.84 -> 0.85-0.86 in 24 CPU-minutes).
SLOT_FIELDS = ("model.num_slots",)
# ... and, with a guide whose refinement steps share one network (`refines`), T: the loss
# weights t / T and the steps run follow it from the run's step on. Measured on Tetrominoes
# (docs/learning.md): the shipped model trained with T = 5 goes on separating objects at
# test past its fifth step (FG-ARI 0.946 -> 0.966 at the seventh on 512 held-out images).
ITER_FIELDS = ("guide.num_iters",)


def pixel_scale_at(cfg: Config, step: int) -> float:
    """The pixel likelihood's sigma (Logistic scale) in force at optimisation step `step`:
    ``model.pixel_scale``, or with ``train.pixel_scale_final`` set, moved from it to the
    final value geometrically over ``pixel_anneal_steps`` from ``pixel_anneal_start`` on.

    A wide sigma (0.3) learns to segment within minutes on a CPU but leaves the background
    shared by every slot (a slightly wrong slot pays almost nothing on a background pixel);
    the anchors that give the background to one slot use a sharp one (0.05-0.1). The
    schedule is a function of the step, so a resumed run and an evaluation of a checkpoint
    use the sigma its step was trained with.

    With ``train.pixel_return_start`` set, sigma goes back from wherever the anneal has
    brought it to ``model.pixel_scale``, geometrically over ``pixel_anneal_steps`` from
    that step on: a sharp phase that gathers the background between two wide ones that
    separate the objects."""
    t, start = cfg.train, float(cfg.model.pixel_scale)
    if t.pixel_scale_final is None or step <= t.pixel_anneal_start:
        return start

    def annealed(s: int) -> float:
        done = min(1.0, (s - t.pixel_anneal_start) / t.pixel_anneal_steps)
        return start * (t.pixel_scale_final / start) ** done

    if t.pixel_return_start is None or step <= t.pixel_return_start:
        return annealed(step)
    low = annealed(max(t.pixel_return_start, t.pixel_anneal_start))
    back = min(1.0, (step - t.pixel_return_start) / t.pixel_anneal_steps)
    return low * (start / low) ** back


def num_slots_at(cfg: Config, step: int) -> int:
    """K of optimisation step `step`: ``train.num_slots_final`` from ``train.num_slots_step``
    on, else ``model.num_slots``. Training keeps ``model.num_slots`` equal to it
    (`TrainingState.schedule`), so a checkpoint, an evaluation and the metrics row of a
    step all have the K it was trained with.

    Every parameter of the model and of the guides that allow it (`can_change_slots`) is
    shared by the slots, so a run can change K at a step of its schedule as a resume with
    ``--num-slots`` does. Measured on Tetrominoes (docs/learning.md): trained with two
    spare slots while the objects separate and the background gathers, then with one,
    the pieces of objects cut across the spare slots gather (slots per image owning part
    of its 3 objects 4.4 -> 4.0, FG-ARI 0.84 -> 0.85-0.86 within 12 CPU-minutes); switched
    at the 88th of the 2 CPU-hours, FG-ARI 0.825 and 0.800 with ARI 0.888 and 0.884 at their
    end (two seeds), against 0.806 and 0.812 with ARI 0.854 and 0.912 with six throughout:
    the background kept, the objects within the seed-to-seed spread."""
    t = cfg.train
    return t.num_slots_final if t.num_slots_final is not None and step >= t.num_slots_step else cfg.model.num_slots


def resumable_fields(stored: Config) -> tuple[str, ...]:
    """The fields a resumed run of `stored` may change: its schedule (`SCHEDULE_FIELDS`),
    K (`SLOT_FIELDS`) when its guide runs with any number of slots, and T (`ITER_FIELDS`)
    when its guide's refinement steps share their parameters."""
    guide = guide_class(stored.guide.kind)
    return SCHEDULE_FIELDS + (SLOT_FIELDS if guide.can_change_slots else ()) + (ITER_FIELDS if guide.refines else ())


def resumed_config(stored: Config, overrides: dict[str, Any] | None) -> tuple[Config, list[str]]:
    """The configuration a resumed run trains with: the stored one, with the `overrides`
    that change its schedule, or its number of slots (`resumable_fields`), applied.
    Returns it and a line per field changed (``"train.lr 0.001 -> 0.00025"``); overrides
    equal to the stored values change nothing. Any other field that would change raises
    ValueError naming it: a run keeps its parameters' shapes, guide and data to the end.

    The schedule is a function of the run's step (`learning_rate`), so a decay given at
    step 9,000 with ``lr_decay_steps`` 3,000 applies three decays at once."""
    cfg = copy.deepcopy(stored)
    for key, value in (overrides or {}).items():
        _set(cfg, key, value)
    validate(cfg)
    changed, refused, allowed = [], [], resumable_fields(stored)
    for key, a, b in field_differences(stored, cfg):
        (changed if key in allowed else refused).append(f"{key} {a!r} -> {b!r}")
    if refused:
        raise ValueError(f"a resumed run keeps its settings, and {'; '.join(refused)} would change it; "
                         f"a resumed run may change only {', '.join(allowed)} "
                         f"(train a new run in another `out` for the rest)")
    return cfg, changed


# ---------------------------------------------------------------------------------------
# Validation: every field by type and range, then the fields together
# ---------------------------------------------------------------------------------------
HELD_OUT_IMAGES = 1024                   # a generated held-out set: at most this many images,
HELD_OUT_SEED = 10_000                   # generated from the run's seed plus this
SEED_MAX = 2**32 - 1 - HELD_OUT_SEED     # numpy's seeds, with room for the held-out set's


def held_out(num_images: int, seed: int) -> tuple[int, int]:
    """(images, seed) of the held-out set generated for a run trained on `num_images`
    generated images from `seed`: the one convention of `fit`, `ablate` and the shipped
    models."""
    return min(HELD_OUT_IMAGES, num_images), seed + HELD_OUT_SEED


# {"section.field": rule}: each declared with its field (`iodine_pyro.fields.ruled`)
FIELD_RULES: dict[str, Rule] = {f"{section}.{name}": rule
                                for section, cls in (("model", ModelConfig), ("guide", GuideConfig),
                                                     ("train", TrainConfig))
                                for name, rule in rules(cls).items()}


def validate(cfg: Config) -> None:
    """Raise ValueError (one line naming the field) unless every field has its type and
    range (the rule declared with it, `FIELD_RULES`) and the fields agree with each other.

    Every configuration passes here before it is used: those of `make_config` (presets,
    overrides from the command line and TOML files) and those stored in checkpoints
    (`Config.from_dict`), so that a bad value stops a command before any work starts."""
    for name, value in (("dataset", cfg.dataset), ("preset", cfg.preset)):
        choices = ARCHITECTURES if name == "dataset" else PRESETS
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")
    for key, rule in FIELD_RULES.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        what = rule(value)
        if what is not None:
            raise ValueError(f"{key} must be {what}, got {_shown(value)}")
    own = {kind: name for name, kind in guide_sections().items()}.get(cfg.guide.kind)
    if own is not None:
        getattr(cfg, own)                                    # the guide's section is stored with it
    for section, values in cfg.sections.items():
        for name, rule in section_rules(section).items():
            what = rule(getattr(values, name))
            if what is not None:
                raise ValueError(f"{section}.{name} must be {what}, got {_shown(getattr(values, name))}")
    m, g = cfg.model, cfg.guide
    checks = [
        (g.kind in guide_kinds(), f"unknown guide {g.kind!r} (guide.kind); choose from {', '.join(guide_kinds())}"),
        (set(g.inputs) <= set(INPUTS), f"guide.inputs: unknown refinement inputs "
                                       f"{sorted(set(g.inputs) - set(INPUTS))}; choose from {list(INPUTS)}"),
        (set(g.stop_gradient) <= set(INPUTS),
         f"guide.stop_gradient: unknown stop-gradient inputs {sorted(set(g.stop_gradient) - set(INPUTS))}"),
        (set(g.disabled_inputs) <= set(g.inputs),
         f"guide.disabled_inputs: cannot disable inputs not in use: "
         f"{sorted(set(g.disabled_inputs) - set(g.inputs))}; inputs are {list(g.inputs)}"),
        (any(INPUTS[n].spatial for n in g.active_inputs() if n in INPUTS),
         "guide.disabled_inputs: at least one image-sized refinement input must stay enabled"),
        (not g.first_slot_init or g.kind == ITERATIVE,
         f"guide.first_slot_init: only the iterative guide starts from a trained lambda_1, not {g.kind!r}"),
        (cfg.train.num_slots_final is None or g.kind not in guide_kinds() or guide_class(g.kind).can_change_slots,
         f"train.num_slots_final: the {g.kind} guide has parameters for each of its {m.num_slots} slots "
         "and trains with that K throughout"),
        (cfg.train.geco_goal is None or cfg.train.beta_max > GECO_BETA_MIN,
         f"train.beta_max: GECO's ceiling must be above its floor {GECO_BETA_MIN:g}, "
         f"got {_shown(cfg.train.beta_max)}"),
        (cfg.train.pixel_return_start is None or cfg.train.pixel_scale_final is not None,
         "train.pixel_return_start: sigma returns from an anneal; set train.pixel_scale_final too"),
        (m.decoder != "deconv" or len(m.decoder_channels) >= 1,
         "model.decoder_channels: the deconv decoder needs at least one layer"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _shown(value: Any) -> str:
    """A value in an error message: short, with its type when that is the problem."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})" if not isinstance(value, (int, float)) or isinstance(value, bool) \
        else text
