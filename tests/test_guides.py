"""Guides are plug-ins: a third guide, defined here, trains and evaluates through the
package's own functions without any module outside `iodine_pyro.guides` knowing of it."""

import math

import pyro
import pytest
import torch
import torch.nn as nn
from pyro.contrib.autoname import scope

from iodine_pyro.config import make_config
from iodine_pyro.evaluate import evaluate
from iodine_pyro.guides import build_guide, guide_kinds, register_guide
from iodine_pyro.guides.base import Guide, Step
from iodine_pyro.models.generative import step_scale
from iodine_pyro.posterior import sample_posterior
from iodine_pyro.run import Run
from iodine_pyro.system import Iodine

from .helpers import TINY_OVERRIDES, tiny_run


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
        q = self.posterior(lam)
        with pyro.plate("images", B), scope(prefix="t0"), step_scale(1.0, B, kl_scale):
            z = pyro.sample("z", pyro.distributions.Normal(q.loc, q.scale).to_event(2))
        return [Step(lam, z, self.hand_over(z, self.model.decode(z), torch.is_grad_enabled()))]


@pytest.fixture(scope="module")
def registered():
    register_guide(MeanFieldGuide)
    return MeanFieldGuide.kind


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
