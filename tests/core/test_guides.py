"""Guides are plug-ins: a third guide, defined here, trains and evaluates through the
package's own functions without any module outside `iodine_pyro.guides` knowing of it."""

import math

import pyro
import pytest
import torch
import torch.nn as nn

from iodine_pyro.config import make_config, resumed_config
from iodine_pyro.evaluate import evaluate
from iodine_pyro.guides import build_guide, guide_class, guide_kinds, register_guide
from iodine_pyro.guides.base import Guide, Step
from iodine_pyro.models.generative import site_plates
from iodine_pyro.posterior import sample_posterior
from iodine_pyro.run import Run
from iodine_pyro.system import Iodine

from ..helpers import TINY_OVERRIDES, tiny_run


class MeanFieldGuide(Guide):
    """One learned posterior for every image and slot: no encoder at all (a test guide)."""

    kind = "test-mean-field"
    description = "one learned q(z) shared by all images"

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.lam = nn.Parameter(torch.zeros(cfg.model.num_slots, 2 * self.n_z))

    def weights(self, num_iters=None, sequence=False):
        return [1.0]

    def forward(self, x, weights=None, batch_size=None, num_slots=None, kl_scale=1.0):
        pyro.module("guide", self)
        B = x.shape[0]
        lam = self.lam.expand(B, *self.lam.shape)                      # [B, K, 2 n_z]
        z = self.sample(0, 1.0, self.posterior(lam), site_plates(B, self.lam.shape[0]), kl_scale)
        return [Step(lam, z, self.hand_over(z, self.model.decode(z), torch.is_grad_enabled()))]


@pytest.fixture(scope="module")
def registered():
    register_guide(MeanFieldGuide)
    return MeanFieldGuide.kind


@pytest.mark.parametrize("kind", ["iterative", "slot_attention", "amortized", "registered"])
def test_a_resumed_run_changes_k_only_where_no_parameter_has_a_slot_dimension(kind, registered):
    kind = registered if kind == "registered" else kind
    stored = make_config("tetrominoes", "paper", {"guide.kind": kind})
    can = guide_class(kind).can_change_slots
    assert can == (kind in ("iterative", "slot_attention"))
    if can:
        cfg, changes = resumed_config(stored, {"model.num_slots": 6, "train.lr": 1e-4})
        assert cfg.model.num_slots == 6 and stored.model.num_slots == 4
        assert changes == ["model.num_slots 4 -> 6", "train.lr 0.0003 -> 0.0001"]
    else:
        with pytest.raises(ValueError, match="model.num_slots 4 -> 6 would change it"):
            resumed_config(stored, {"model.num_slots": 6})
    with pytest.raises(ValueError, match="model.latent_dim 32 -> 8"):
        resumed_config(stored, {"model.latent_dim": 8})


def test_a_registered_guide_is_a_configuration_choice(registered):
    assert registered in guide_kinds()
    cfg = make_config("tetrominoes", overrides={**TINY_OVERRIDES, "guide.kind": registered})
    system = Iodine(cfg)
    assert isinstance(system.guide, MeanFieldGuide) and isinstance(build_guide(system.model, cfg), MeanFieldGuide)
    loss = system.loss(torch.rand(2, 3, 35, 35))
    loss.backward()
    assert system.guide.lam.grad is not None and math.isfinite(float(loss.detach()))
    with pytest.raises(ValueError, match="unknown guide"):
        make_config("tetrominoes", overrides={"guide.kind": "no-such-guide"})


def test_a_registered_guide_trains_evaluates_and_samples(registered, tmp_path):
    out = tiny_run(tmp_path, steps=2, guide=registered)
    run = Run.open(out)
    assert run.cfg.guide.kind == registered and run.step == 2
    result = evaluate(run, num_images=4, batch_size=4, progress=False)
    assert result["num_iters"] == 1 and 0 <= result["mse"][0] <= 1
    with pytest.raises(ValueError, match="cannot|can change K"):
        sample_posterior(run.system, run.images(0, 2)[0]["image"], 2, num_slots=5)
    tree = sample_posterior(run.system, run.images(0, 2)[0]["image"], 2)
    assert tree["posterior"].attrs["posterior"] == MeanFieldGuide.description


# -- the slot-attention guide (a built-in plug-in with its own configuration section) ---------
SA_TINY = {"guide.kind": "slot_attention", "slot_attention.slot_size": 8, "slot_attention.mlp_size": 16,
           "slot_attention.encoder_channels": (8, 8), "slot_attention.encoder_kernel": 3}
SA_TOML = """
[slot_attention]
slot_size = 8
mlp_size = 16
encoder_channels = [8, 8]
encoder_kernel = 3
refine_steps = 1
"""


def sa_system(refine_steps=0, seed=0):
    from tests.helpers import tiny_config

    torch.manual_seed(seed)
    return Iodine(tiny_config(**SA_TINY, **{"slot_attention.refine_steps": refine_steps}))


def test_slot_attention_section_is_configured_stored_and_optional():
    from iodine_pyro.config import Config
    from iodine_pyro.guides.slot_attention import SlotAttentionConfig

    cfg = make_config("tetrominoes", overrides={**SA_TINY, "slot_attention.iters": 2})
    assert cfg.slot_attention.iters == 2 and cfg.to_dict()["slot_attention"]["slot_size"] == 8
    assert Config.from_dict(cfg.to_dict()) == cfg
    old = make_config("tetrominoes").to_dict()                      # stored before the section existed
    assert "slot_attention" not in old
    assert Config.from_dict(old).slot_attention == SlotAttentionConfig()
    with pytest.raises(ValueError, match="slot_attention.iters must be an integer"):
        make_config("tetrominoes", overrides={"slot_attention.iters": 0})
    with pytest.raises(ValueError, match="unknown configuration field 'slot_attention.nope'"):
        make_config("tetrominoes", overrides={"slot_attention.nope": 1})
    with pytest.raises(ValueError, match="unknown configuration section"):
        Config.from_dict({**old, "nope": {}})


@pytest.mark.parametrize("refine_steps", [0, 2])
def test_slot_attention_shapes_and_any_k(refine_steps):
    system = sa_system(refine_steps).eval()
    x = torch.rand(2, 3, 12, 12)
    assert system.guide.refines == (refine_steps > 0) and system.guide.can_change_slots
    with torch.no_grad():
        steps = system.infer(x, num_slots=5)
    assert len(steps) == 1 + refine_steps
    assert steps[-1].lam.shape == (2, 5, 8) and steps[-1].z.shape == (2, 5, 4)


def test_slot_attention_is_permutation_symmetric():
    """Permuting the slots' initial noise permutes the slots' posteriors."""
    guide = sa_system().guide
    x, noise = torch.rand(2, 3, 12, 12), torch.randn(2, 3, 8)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        lam, lam_p = guide.initial_lambda(x, 3, noise), guide.initial_lambda(x, 3, noise[:, perm])
    torch.testing.assert_close(lam_p, lam[:, perm], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lam[:, 0], lam[:, 1])


@pytest.mark.parametrize("refine_steps", [0, 1])
def test_slot_attention_loss_is_finite_and_decreases(refine_steps):
    system = sa_system(refine_steps, seed=1)
    x = torch.rand(4, 3, 12, 12).round() * 0.8                  # a fixed tiny batch
    opt = torch.optim.Adam(system.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = system.loss(x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]), losses


@pytest.mark.slow
def test_slot_attention_checkpoint_round_trip_and_fit_command(tmp_path):
    """`fit --guide slot_attention` with a [slot_attention] table; the run reopens as it was."""
    import subprocess
    import sys

    from tests.helpers import TINY_TOML
    from tests.helpers import ENV

    from iodine_pyro.commands.options import guide_names

    assert "slot_attention" in guide_names()
    (tmp_path / "sa.toml").write_text(TINY_TOML.replace("[guide]", SA_TOML + "[guide]"))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "iodine_pyro", "fit", "--guide", "slot_attention", "--steps", "2",
                           "--num-images", "8", "--config", str(tmp_path / "sa.toml"), "--out", str(out),
                           "--quiet", "--threads", "1"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = Run.open(out)
    assert run.cfg.guide.kind == "slot_attention" and run.cfg.slot_attention.refine_steps == 1
    assert run.cfg.slot_attention.encoder_channels == (8, 8) and run.step == 2
    x = run.images(0, 2)[0]["image"]
    again = Run.open(out)
    torch.manual_seed(0)
    with torch.no_grad():
        a = run.system.infer(x)[-1].lam
    torch.manual_seed(0)
    with torch.no_grad():
        b = again.system.infer(x)[-1].lam
    torch.testing.assert_close(a, b)
    result = evaluate(run, num_images=4, batch_size=4, num_slots=5, progress=False)
    assert 0 <= result["mse"][-1] <= 1
    tree = sample_posterior(run.system, x, 2, num_slots=5)
    assert tree["posterior"].attrs["posterior"].startswith("q(z | lambda) of slot attention")


def test_slot_attention_runs_compare_like_the_others(tmp_path):
    from iodine_pyro.compare import compare

    out = tiny_run(tmp_path, steps=2, guide="slot_attention", **{**SA_TINY, "slot_attention.refine_steps": 1})
    result = compare([out], num_images=4, iw_samples=4, evidence_samples=20, gap_steps=10, gap_check_every=5,
                     batch_size=4, num_slots=5, progress=False)
    r = result["runs"]["run-slot_attention"]
    assert r["guide"] == "slot_attention" and r["steps"] == 2 and r["trained_step"] == 2 and r["num_slots"] == 5
    assert all(math.isfinite(v) for v in r["elbo"] + r["iwae"]) and math.isfinite(r["log_px"])
    assert "K=7" in r["generalization"]                         # slots are sampled: any K


def test_a_registered_guide_declares_its_own_section(registered):
    """Any registered guide may declare a section: defaults, rules, overrides, checkpoints."""
    from dataclasses import dataclass

    from iodine_pyro.config import Config
    from iodine_pyro.fields import integer, ruled

    @dataclass
    class Width:
        width: int = ruled(2, integer(1))

    class Sectioned(MeanFieldGuide):
        kind, section, Section = "test-sectioned", "test_sectioned", Width

    register_guide(Sectioned)
    cfg = make_config("tetrominoes", overrides={"guide.kind": Sectioned.kind, "test_sectioned.width": 5})
    assert cfg.test_sectioned.width == 5 and Config.from_dict(cfg.to_dict()) == cfg
    default = make_config("tetrominoes", overrides={"guide.kind": Sectioned.kind})
    assert default.to_dict()["test_sectioned"] == {"width": 2}
    with pytest.raises(ValueError, match="test_sectioned.width must be an integer >= 1"):
        make_config("tetrominoes", overrides={"test_sectioned.width": 0})


def test_a_gradient_input_left_out_of_stop_gradient_carries_gradient():
    """Second order: leaving grad_means out of stop_gradient changes the decoder's gradient
    (its gradient input is differentiated through), not the loss."""
    from ..helpers import tiny_config
    base = tiny_config()
    assert "grad_means" in base.guide.active_inputs() and "grad_means" in base.guide.stop_gradient
    through = tiny_config(**{"guide.stop_gradient": tuple(n for n in base.guide.stop_gradient
                                                          if n != "grad_means")})
    x = torch.rand(2, *([base.model.image_channels] + list(base.model.image_size)))
    losses, grads = [], []
    for cfg in (base, through):
        torch.manual_seed(0)
        system = Iodine(cfg)
        torch.manual_seed(1)
        loss = system.loss(x)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in system.model.decoder.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert not torch.allclose(grads[0], grads[1])
