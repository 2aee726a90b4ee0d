"""The training state: system, optimiser, GECO, data position, step, RNG and spent time,
and the checkpoint that holds them.

`TrainingState.save` writes, and `TrainingState.restore` reads, the checkpoint format of
`iodine_pyro.checkpoint` (format version 1); a run continued from it draws the same
numbers as the uninterrupted run, bit for bit. What changes with the step (the learning
rate's warm-up and decay, GECO's KL weight, the pixel scale, K) is set here too
(`TrainingState.schedule`), so that a restored state schedules exactly as the saved one.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pyro
import torch

from ..checkpoint import CheckpointError, save_checkpoint, set_rng_state
from ..config import GECO_BETA_MIN, Config, num_slots_at, pixel_scale_at
from ..data import Batches
from ..system import Iodine
from .speed import Speed

log = logging.getLogger(__name__)


def make_optimizer(system: Iodine, cfg: Config, fused: bool = False) -> torch.optim.Adam:
    t = cfg.train
    return torch.optim.Adam(system.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, keeping this optimizer's implementation flags.

    A state dict carries its optimizer's ``fused``/``foreach``/``capturable`` flags, which
    `load_state_dict` would adopt: a run resumed on another device keeps its own, and step
    counters move to where a fused or capturable optimizer needs them.
    """
    keep = [{k: g.get(k) for k in ("fused", "foreach", "capturable")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, keep):
        group.update(flags)
        if flags["fused"] or flags["capturable"]:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(dtype=torch.float32, device=p.device)


def learning_rate(cfg: Config, step: int) -> float:
    """The learning rate of optimisation step `step` (0-based): a linear warm-up over
    ``warmup_steps``, then ``lr`` times ``lr_decay`` per ``lr_decay_steps``."""
    t = cfg.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    return t.lr * warm * t.lr_decay ** (step // t.lr_decay_steps)


class Geco:
    """GECO (Rezende and Viola, 2018) as a weight beta on the KL terms.

    Minimise the KL subject to the reconstruction MSE staying below `goal`: beta falls
    while the (smoothed) MSE of the final refinement step is above the goal, so the
    networks first learn to reconstruct, and rises back to `beta_max` (1: the ELBO) once it
    is below:

        mse_ema <- ema * mse_ema + (1 - ema) * mse
        log beta <- clip(log beta + rate * clip(1 - mse_ema / goal, -1, 1), log BETA_MIN, log beta_max)

    The inner clip bounds a step's change of log beta by `rate`: at initialisation the
    MSE can be a hundred times the goal, which would otherwise drive beta to its floor
    within a few steps (seen: 1e-6 after 100 steps with rate 0.01).

    A ceiling above 1 weights the KL as a beta-VAE does. With a Gaussian pixel likelihood
    the reconstruction term scales as 1/sigma^2, so sigma 0.1 with beta_max 9 keeps the
    balance of likelihood and KL that sigma 0.3 has with beta 1, while the mixture's
    responsibilities are those of the sharper sigma.

    The state lives on the training device (no host read per step) and is checkpointed.
    """

    BETA_MIN = GECO_BETA_MIN

    def __init__(self, goal: float, rate: float, ema: float, device: torch.device | str = "cpu",
                 beta_max: float = 1.0):
        if not beta_max > self.BETA_MIN:
            raise ValueError(f"GECO's ceiling beta_max must be above its floor {self.BETA_MIN:g}, got {beta_max!r}")
        self.goal, self.rate, self.ema, self.beta_max = goal, rate, ema, beta_max
        self.log_beta = torch.zeros((), device=device)
        self.mse = torch.full((), float("nan"), device=device)   # NaN: nothing measured yet

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp()

    def update(self, mse: torch.Tensor, applied: torch.Tensor | bool = True, release: bool = False) -> None:
        """Take the MSE of a step; a step that was not `applied` changes nothing. With
        `release` beta rises towards `beta_max` at the full rate whatever the MSE (a final phase
        on the ELBO: ``train.geco_release_step``)."""
        mse = mse.detach().to(self.mse)
        smoothed = torch.where(torch.isnan(self.mse), mse, self.ema * self.mse + (1 - self.ema) * mse)
        violation = torch.ones_like(smoothed) if release else (1 - smoothed / self.goal).clamp(-1.0, 1.0)
        log_beta = (self.log_beta + self.rate * violation).clamp(math.log(self.BETA_MIN), math.log(self.beta_max))
        ok = torch.as_tensor(applied, device=self.mse.device) & torch.isfinite(smoothed)
        self.mse = torch.where(ok, smoothed, self.mse)
        self.log_beta = torch.where(ok, log_beta, self.log_beta)

    def state_dict(self) -> dict[str, float]:
        return {"log_beta": float(self.log_beta), "mse": float(self.mse)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.log_beta = torch.tensor(float(state["log_beta"]), device=self.log_beta.device)
        self.mse = torch.tensor(float(state["mse"]), device=self.mse.device)


class TrainingState:
    """Everything a run carries from one step to the next.

    Args:
        cfg: the run's configuration.
        system, optimizer: the `Iodine` being trained and its Adam.
        batches: the training stream (its position is checkpointed).
        geco: GECO's state, or None when ``train.geco_goal`` is not set.
        seed: the run's seed (recorded: a continued run keeps it).
        data: the datasets as the checkpoint records them ({"train", "eval", "generated"}).
    """

    def __init__(self, cfg: Config, system: Iodine, optimizer: torch.optim.Optimizer, batches: Batches,
                 geco: Geco | None, seed: int, data: dict[str, Any]):
        self.cfg, self.system, self.optimizer, self.batches = cfg, system, optimizer, batches
        self.geco, self.seed, self.data = geco, seed, data
        self.step = 0
        self.spent = {"time": 0.0, "cpu_time": 0.0}      # training seconds of earlier calls
        self.start_clock()

    @classmethod
    def start(cls, cfg: Config, ds, *, seed: int, device: torch.device, speed: Speed,
              data: dict[str, Any]) -> TrainingState:
        """A new run's state on `device`: every random number from `seed`, in this order
        (parameters, then the data order), so that the same seed gives the same run."""
        torch.manual_seed(seed)
        pyro.set_rng_seed(seed)
        system = Iodine(cfg).to(device).use_fast_paths(speed.amp, speed.channels_last)
        optimizer = make_optimizer(system, cfg, fused=speed.deferred)
        batches = Batches(ds, cfg.train.batch_size, seed=seed)
        t = cfg.train
        geco = Geco(t.geco_goal, t.geco_rate, t.geco_ema, device, t.beta_max) if t.geco_goal is not None else None
        return cls(cfg, system, optimizer, batches, geco, seed, data)

    def restore(self, ckpt: dict[str, Any], path: Path) -> None:
        """Continue from the checkpoint `ckpt` (read from `path`): parameters, optimiser,
        data position, spent time, GECO, the random-number generators and the step.
        CheckpointError (naming `path`) when it does not fit this model or is not finite."""
        try:
            self.system.load_state_dict(ckpt["system"])
            load_optimizer_state(self.optimizer, ckpt["optimizer"])
            self.batches.load_state_dict(ckpt["data_state"])
            extra = ckpt.get("extra", {})
            self.spent.update({k: float(v) for k, v in extra.get("spent", {}).items() if k in self.spent})
            if self.geco is not None and "geco" in extra:
                self.geco.load_state_dict(extra["geco"])
            set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
            text = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"{path} does not fit this model: {text[:200]}") from None
        if not all(torch.isfinite(v).all() for v in self.system.state_dict().values() if v.is_floating_point()):
            raise CheckpointError(f"{path} holds non-finite parameters; it cannot be resumed")
        self.step = int(ckpt["step"])

    def _follow_slots(self) -> None:
        """``model.num_slots`` := K of the coming step (`num_slots_at`): the K the model, the
        guide, the metrics row and an evaluation of the checkpoint use."""
        k = num_slots_at(self.cfg, self.step)
        if k != self.cfg.model.num_slots:
            log.info("step %d: training with %d slots from here on (train.num_slots_final)", self.step, k)
            for cfg in {id(c): c for c in (self.cfg, self.system.cfg)}.values():
                cfg.model.num_slots = k

    def save(self, path: Path) -> None:
        """Write the checkpoint (atomically: `checkpoint.save_checkpoint`), with the K of
        its next step: a checkpoint at step n holds K = `num_slots_at` (cfg, n)."""
        self._follow_slots()
        save_checkpoint(path, cfg=self.cfg, system_state=self.system.state_dict(),
                        optimizer_state=self.optimizer.state_dict(), step=self.step,
                        data_state=self.batches.state_dict(), data=self.data,
                        extra={"seed": self.seed, "spent": self.clock(),
                               **({"geco": self.geco.state_dict()} if self.geco is not None else {})})

    def start_clock(self) -> None:
        """Training time of this call counts from now."""
        self._started = (time.time(), time.process_time())

    def clock(self) -> dict[str, float]:
        """Training seconds of the run so far (wall and CPU), earlier calls included."""
        wall, cpu = self._started
        return {"time": self.spent["time"] + time.time() - wall,
                "cpu_time": self.spent["cpu_time"] + time.process_time() - cpu}

    def schedule(self) -> float | torch.Tensor:
        """Set the learning rate, the pixel scale and K of the coming step; its KL weight."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        self.system.model.pixel_scale = pixel_scale_at(self.cfg, self.step)
        self._follow_slots()
        return self.kl_weight

    @property
    def kl_weight(self) -> float | torch.Tensor:
        """The KL's weight in force: GECO's beta, or without GECO ``train.beta_max``."""
        return self.geco.beta if self.geco is not None else self.cfg.train.beta_max

    def observe(self, mse: torch.Tensor, applied: torch.Tensor | bool) -> None:
        """Take a step's reconstruction MSE (GECO's constraint); nothing when not `applied`."""
        if self.geco is None:
            return
        release = self.cfg.train.geco_release_step is not None and self.step >= self.cfg.train.geco_release_step
        self.geco.update(mse, applied, release)
