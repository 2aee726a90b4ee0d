"""Every difference between the `paper` and `deepmind` presets, one test each."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iodine_pyro.config import PRESET_FIELDS, PRESETS, make_config
from iodine_pyro.system import Iodine
from iodine_pyro.models import PixelMixture
from iodine_pyro.training import learning_rate, make_optimizer

from ..helpers import tiny_config


def systems():
    return Iodine(tiny_config("paper")), Iodine(tiny_config("deepmind"))


def test_pixel_component_gaussian_0_1_vs_logistic_0_03():
    x = torch.full((1, 3, 1, 1), 0.6)
    means = torch.full((1, 1, 3, 1, 1), 0.5)
    logits = torch.zeros(1, 1, 1, 1)
    paper, deepmind = systems()
    for system, want in [
        (paper, 3 * (-0.5 * (0.1 / 0.1) ** 2 - math.log(0.1) - 0.5 * math.log(2 * math.pi))),
        (deepmind, 3 * (-(0.1 / 0.03) - math.log(0.03) - 2 * math.log1p(math.exp(-0.1 / 0.03)))),
    ]:
        m = system.model.cfg
        d = PixelMixture(means, logits, m.pixel, m.pixel_scale)
        assert float(d.log_prob(x)) == pytest.approx(want, rel=1e-5)


def test_prior_unit_vs_ln2_variance():
    paper, deepmind = systems()
    assert paper.model.prior(2).scale.pow(2).unique().item() == pytest.approx(1.0)
    assert deepmind.model.prior(2).scale.pow(2).unique().item() == pytest.approx(math.log(2))


def test_posterior_scale_softplus_vs_sqrt_softplus():
    paper, deepmind = systems()
    n_z = paper.cfg.model.latent_dim
    s = torch.linspace(-3, 3, n_z)
    lam = torch.cat([torch.zeros(n_z), s]).view(1, 1, -1)
    assert torch.allclose(paper.guide.posterior(lam).scale.flatten(), F.softplus(s) + 1e-4)
    assert torch.allclose(deepmind.guide.posterior(lam).scale.flatten(), torch.sqrt(F.softplus(s) + 1e-8))
    # each preset's initial posterior matches its prior
    for system in (paper, deepmind):
        q0 = system.guide.posterior(system.guide.lambda0.view(1, 1, -1))
        assert torch.allclose(q0.scale, system.model.prior(1, 1).scale, atol=1e-3)


def test_decoder_input_z_vs_z_plus_constant_5():
    paper, deepmind = systems()
    n_z = paper.cfg.model.latent_dim
    assert paper.model.decoder.net[0].in_channels == n_z + 2
    assert deepmind.model.decoder.net[0].in_channels == n_z + 3
    z = torch.randn(2, 3, n_z)
    got = deepmind.model.decode(z)
    flat = torch.cat([z.reshape(6, n_z), torch.full((6, 1), 5.0)], 1)
    want = deepmind.model.decoder(flat).view(2, 3, 4, 12, 12)
    assert torch.allclose(got.mask_logits, want[:, :, 0]) and torch.allclose(got.means, want[:, :, 1:])


def test_loss_weights_t_over_T_vs_linspace_from_zero():
    paper, deepmind = systems()
    assert paper.weights() == pytest.approx([1 / 3, 2 / 3, 1])
    assert deepmind.weights() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert deepmind.weights(5) == pytest.approx(torch.linspace(0, 1, 6).tolist())


def test_refinement_convs_stride_1_vs_2_with_elu_after_every_conv():
    paper, deepmind = systems()
    for system, stride in [(paper, 1), (deepmind, 2)]:
        layers = list(system.guide.net.convs)
        convs = [m for m in layers if isinstance(m, nn.Conv2d)]
        assert all(c.stride == (stride, stride) for c in convs)
        assert all(isinstance(layers[i + 1], nn.ELU) for i, m in enumerate(layers) if isinstance(m, nn.Conv2d))
    # SAME padding: stride 2 halves (ceil) the size at each conv
    h = deepmind.guide.net.convs(torch.zeros(1, deepmind.guide.net.convs[0].in_channels, 12, 12))
    assert h.shape[-1] == 3


@pytest.mark.parametrize("dataset,paper_c,deepmind_c", [
    ("tetrominoes", 17, 24), ("multi_dsprites", 17, 24), ("clevr6", 17, 18)])
def test_refinement_spatial_inputs_17_vs_18_or_24_channels(dataset, paper_c, deepmind_c):
    for preset, c in [("paper", paper_c), ("deepmind", deepmind_c)]:
        system = Iodine(make_config(dataset, preset))
        assert system.guide.net.convs[0].in_channels == c
    dm = Iodine(make_config(dataset, "deepmind")).guide
    assert "capacity" in dm.input_names
    assert ("cos_coordinates" in dm.input_names) == (dataset != "clevr6")


def test_mask_posterior_responsibility_vs_normalized_likelihood():
    paper, deepmind = systems()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 12, 12)
    means = torch.rand(1, 3, 3, 12, 12)
    logits = torch.randn(1, 3, 12, 12)
    from iodine_pyro.guides.inputs import INPUTS, Context
    from iodine_pyro.models import Decoded
    d = Decoded(means, logits)
    for system in (paper, deepmind):
        terms = system.model.terms(x, d)
        ctx = Context(x, None, means, logits, terms, {}, system.cfg.guide.mask_posterior)
        got = INPUTS["mask_posterior"].compute(ctx)[:, :, 0]
        comp = terms.comp
        if system is paper:
            want = (logits.log_softmax(1) + comp).softmax(1)
        else:
            want = comp.exp() / (comp.exp().sum(1, keepdim=True) + 1e-6)
        assert torch.allclose(got, want, atol=1e-6)


def test_optimizer_settings():
    for dataset, lr, batch in [("tetrominoes", 3e-4, 256), ("multi_dsprites", 3e-4, 128), ("clevr6", 1e-3, 32)]:
        cfg = make_config(dataset, "deepmind")
        assert (cfg.train.lr, cfg.train.batch_size, cfg.train.beta1) == (lr, batch, 0.95)
        assert learning_rate(cfg, 999_999) == pytest.approx(lr)
        assert learning_rate(cfg, 1_000_000) == pytest.approx(lr * 0.1)
        opt = make_optimizer(Iodine(tiny_config("deepmind")), cfg)
        assert opt.param_groups[0]["betas"][0] == 0.95
        paper = make_config(dataset, "paper")
        assert (paper.train.lr, paper.train.batch_size, paper.train.beta1) == (3e-4, 32, 0.9)
        assert learning_rate(paper, 5_000_000) == pytest.approx(3e-4)


def test_every_preset_field_differs_somewhere():
    for key in PRESET_FIELDS:
        section, name = key.split(".")
        values = {repr(getattr(getattr(make_config(ds, p), section), name))
                  for ds in ("tetrominoes", "clevr6") for p in PRESETS}
        assert len(values) > 1, key


@pytest.mark.parametrize("dataset, preset, layers", [
    ("clevr6", "paper", ["Linear 256", "ELU", "Linear 256"]),        # appendix C: 256 ELU, 256 linear
    ("clevr6", "deepmind", ["Linear 256", "ELU", "Linear 256"]),     # released: [256, 256], last linear
    ("tetrominoes", "paper", ["Linear 128", "ELU"]),
    ("tetrominoes", "deepmind", ["Linear 128"]),                     # released: linear
])
def test_refinement_mlp_after_pooling(dataset, preset, layers):
    cfg = make_config(dataset, preset, {"model.image_size": (16, 16)})
    mlp = Iodine(cfg).guide.net.mlp
    got = [f"Linear {m.out_features}" if isinstance(m, nn.Linear) else type(m).__name__ for m in mlp]
    assert got == layers
