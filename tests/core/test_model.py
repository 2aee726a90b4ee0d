"""The generative model, the iterative guide and the T-step objective."""

import math

import pyro
import pyro.distributions as pdist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from iodine_pyro.config import make_config
from iodine_pyro.guides.inputs import leave_one_out
from iodine_pyro.system import Iodine
from iodine_pyro.models import PixelMixture, mixture_terms

from ..helpers import tiny_config


def hand_log_px(x, means, logits, pixel, scale):
    """log p(x | z) per image from torch/pyro's own mixture and component distributions."""
    B, K, C, H, W = means.shape
    comp_loc = means.permute(0, 3, 4, 1, 2)                          # [B, H, W, K, C]
    if pixel == "gaussian":
        comp = Independent(Normal(comp_loc, scale), 1)
    else:
        comp = Independent(pdist.Logistic(comp_loc, torch.full_like(comp_loc, scale)), 1)
    mix = Categorical(logits=logits.permute(0, 2, 3, 1))            # [B, H, W] over K
    lp = MixtureSameFamily(mix, comp).log_prob(x.permute(0, 2, 3, 1))  # [B, H, W]
    return lp.sum((1, 2))


def hand_kl(lam, n_z, posterior_scale, prior_var):
    mu, s = lam[..., :n_z], lam[..., n_z:]
    sigma = F.softplus(s) + 1e-4 if posterior_scale == "softplus" else torch.sqrt(F.softplus(s) + 1e-8)
    var = sigma ** 2
    kl = 0.5 * (var / prior_var + mu ** 2 / prior_var - 1.0 - torch.log(var / prior_var))
    return kl.sum((1, 2))                                             # [B]


@pytest.mark.parametrize("preset", ["paper", "deepmind"])
def test_training_loss_equals_weighted_sum_of_step_elbos(preset):
    """float64: the SVI loss is exactly sum_t w_t mean_b[-log p(x|z_t) + KL(q_t || p)]."""
    cfg = tiny_config(preset)
    torch.manual_seed(0)
    system = Iodine(cfg).double()
    x = torch.rand(5, 3, *cfg.model.image_size, dtype=torch.float64)
    weights = system.weights()
    expected_w = [t / 3 for t in (range(1, 4) if preset == "paper" else range(0, 4))]
    assert weights == pytest.approx(expected_w)

    pyro.set_rng_seed(1)
    loss = system.loss(x)
    pyro.set_rng_seed(1)
    steps = system.guide(x, weights)                                 # the same draws, in order

    total = torch.zeros((), dtype=torch.float64)
    for w, step in zip(weights, steps):
        B, K, n_z = step.z.shape
        flat = step.z.reshape(B * K, n_z)
        if cfg.model.decoder_constant is not None:
            flat = torch.cat([flat, torch.full((B * K, 1), cfg.model.decoder_constant, dtype=flat.dtype)], 1)
        out = system.model.decoder(flat).view(B, K, 4, *cfg.model.image_size)
        nll = -hand_log_px(x, out[:, :, 1:], out[:, :, 0], cfg.model.pixel, cfg.model.pixel_scale)
        kl = hand_kl(step.lam, n_z, cfg.guide.posterior_scale, cfg.model.prior_var)
        total = total + w * (nll.mean() + kl.mean())
    assert torch.allclose(loss, total, rtol=1e-10, atol=1e-8), (float(loss), float(total))


@pytest.mark.parametrize("preset,passes", [("paper", 3), ("deepmind", 4)])
def test_one_decoder_pass_per_sample(preset, passes):
    cfg = tiny_config(preset)
    system = Iodine(cfg)
    calls = []
    system.model.decoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = torch.rand(2, 3, *cfg.model.image_size)
    system.loss(x).backward()
    assert calls == [2 * cfg.model.num_slots] * passes               # all slots batched in one call


def test_all_parameters_are_trained():
    cfg = tiny_config("paper", **{"guide.lstm": 8})
    system = Iodine(cfg)
    system.loss(torch.rand(2, 3, *cfg.model.image_size)).backward()
    untouched = [n for n, p in system.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert untouched == []


def _input_parts(guide, spatial, vector):
    """{input name: its slice of the concatenated refinement inputs}."""
    parts, offset = {}, 0
    for row, width in [(r, spatial) for r in guide.spatial_inputs] + [(r, vector) for r in guide.vector_inputs]:
        c = row.channels(3, guide.n_z)
        start = offset if width is spatial else offset - sum(r.channels(3, guide.n_z) for r in guide.spatial_inputs)
        parts[row.name] = width[:, start:start + c]
        offset += c
    return parts


CARRY_GRADIENT = {"means", "mask", "mask_logits", "mask_posterior", "posterior"}
CONSTANT = {"image", "coordinates", "capacity", "cos_coordinates"}


@pytest.mark.parametrize("preset", ["paper", "deepmind"])
def test_which_refinement_inputs_carry_gradient(preset):
    """Paper: the SG column of the inputs table; deepmind: the released DEFAULT_STOP_GRADIENT
    (dcomponents, dmask, dzp, log_prob, counterfactual). Checked through autograd: an input
    carries gradient when d(input)/d(decoder, lambda_1) is not all zero."""
    cfg = tiny_config(preset)
    torch.manual_seed(0)
    system = Iodine(cfg)
    guide, model = system.guide, system.model
    x = torch.rand(2, 3, *cfg.model.image_size)
    lam = guide.lambda0.expand(2, 3, -1)
    q = guide.posterior(lam)
    z = q.rsample()
    decoded = model.decode(z)
    spatial, vector = guide.refinement_inputs(x, lam, q, decoded, keep_graph=True)
    upstream = list(model.parameters()) + [guide.lambda0]
    carried = set()
    for name, part in _input_parts(guide, spatial, vector).items():
        if not part.requires_grad:                                  # constants, detached inputs
            continue
        grads = torch.autograd.grad(part.sum(), upstream, allow_unused=True, retain_graph=True)
        if any(g is not None and g.abs().sum() > 0 for g in grads):
            carried.add(name)
    names = set(cfg.guide.inputs)
    assert carried == CARRY_GRADIENT & names
    assert set(cfg.guide.stop_gradient) == {"grad_means", "grad_mask", "likelihood", "leave_one_out",
                                            "grad_posterior"}
    assert names - carried == set(cfg.guide.stop_gradient) | (CONSTANT & names)
    # at inference (the guide differentiates its ELBO, the inputs keep no graph)
    lam = lam.detach().requires_grad_()
    q = guide.posterior(lam)
    spatial, vector = guide.refinement_inputs(x, lam, q, model.decode(q.rsample()), keep_graph=False)
    assert not spatial.requires_grad and not vector.requires_grad


def test_layer_normed_inputs_are_standardised_per_image_slot():
    cfg = tiny_config("paper")
    system = Iodine(cfg)
    guide, model = system.guide, system.model
    x = torch.rand(2, 3, *cfg.model.image_size)
    lam = guide.lambda0.expand(2, 3, -1)
    q = guide.posterior(lam)
    decoded = model.decode(q.rsample())
    spatial, vector = guide.refinement_inputs(x, lam, q, decoded, keep_graph=True)
    assert spatial.shape == (2 * 3, 17, *cfg.model.image_size)       # the appendix's 17 channels
    assert vector.shape == (2 * 3, 4 * cfg.model.latent_dim)
    normed = {r.name for r in guide.spatial_inputs + guide.vector_inputs if r.layer_norm}
    assert set(guide.norms) == normed == {"grad_means", "grad_mask", "likelihood", "leave_one_out",
                                          "grad_posterior"}
    for name, part in _input_parts(guide, spatial, vector).items():
        if name in normed:
            part = part.detach().flatten(1)
            assert torch.allclose(part.mean(1), torch.zeros(6), atol=1e-4)
            var = part.var(1, unbiased=False)                      # var / (var + eps): eps = 1e-5
            assert ((var > 0.9) & (var <= 1.0 + 1e-4)).all(), name


def _inputs_and_update(guide, model, x, noise):
    """Refinement inputs and lambda's update at inference, from the given draws."""
    lam = guide.lambda0.detach().expand(x.shape[0], noise.shape[1], -1).requires_grad_()
    q = guide.posterior(lam)
    z = q.loc + noise * q.scale                                      # the given draws
    decoded = model.decode(z)
    spatial, vector = guide.refinement_inputs(x, lam, q, decoded, keep_graph=False)
    with torch.no_grad():
        delta, _ = guide.net(spatial, vector, None)
    return spatial, vector, delta


@pytest.mark.parametrize("init", ["torch", "sonnet"])
@pytest.mark.slow
def test_an_images_inference_does_not_depend_on_its_batch(init):
    """Gradient inputs are of each image's own -ELBO: image 0's refinement inputs and
    lambda update are the same alone and in a batch of 64 (same z draws)."""
    cfg = make_config("tetrominoes", overrides={"train.init": init})
    torch.manual_seed(0)
    system = Iodine(cfg)
    x = torch.rand(64, 3, 35, 35)
    noise = torch.randn(64, 4, cfg.model.latent_dim)
    K = 4
    big = _inputs_and_update(system.guide, system.model, x, noise)
    one = _inputs_and_update(system.guide, system.model, x[:1], noise[:1])
    for a, b in zip(big, one):
        assert torch.allclose(a[:K], b, atol=1e-4, rtol=1e-4)


def test_batch_mean_gradients_depend_on_the_batch_as_released():
    """The deepmind preset keeps the released code's gradient of the batch mean."""
    cfg = make_config("tetrominoes", "deepmind")
    assert cfg.guide.grad_reduction == "batch_mean"
    torch.manual_seed(0)
    system = Iodine(cfg)
    x = torch.rand(64, 3, 35, 35)
    noise = torch.randn(64, 4, cfg.model.latent_dim)
    big = _inputs_and_update(system.guide, system.model, x, noise)
    one = _inputs_and_update(system.guide, system.model, x[:1], noise[:1])
    assert not torch.allclose(big[2][:4], one[2], atol=1e-4, rtol=1e-4)


def test_sonnet_initialisation_makes_the_decoder_depend_more_on_z():
    """Truncated normal 1/sqrt(fan_in), zero biases: the decoder's output varies several
    times more with z at initialisation than under PyTorch's defaults."""
    spread = {}
    for init in ("torch", "sonnet"):
        torch.manual_seed(0)
        system = Iodine(make_config("tetrominoes", overrides={"train.init": init}))
        with torch.no_grad():
            out = system.model.decode(torch.randn(64, 1, 32))
        spread[init] = float(torch.cat([out.means, out.mask_logits.unsqueeze(2)], 2).std(0).mean())
        if init == "sonnet":
            for m in system.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    fan_in = m.weight[0].numel()
                    assert float(m.weight.detach().abs().max()) <= 2.0 / math.sqrt(fan_in) + 1e-6
                    assert m.bias is None or float(m.bias.detach().abs().max()) == 0.0
    assert spread["sonnet"] > 3 * spread["torch"]


def test_leave_one_out_matches_brute_force():
    torch.manual_seed(0)
    B, K, H, W = 2, 4, 3, 3
    logits, comp = torch.randn(B, K, H, W), torch.randn(B, K, H, W)
    got = leave_one_out(logits, comp)
    for k in range(K):
        keep = [j for j in range(K) if j != k]
        pi = logits[:, keep].softmax(1)
        want = torch.log((pi * comp[:, keep].exp()).sum(1))
        assert torch.allclose(got[:, k], want, atol=1e-5)


def test_pixel_mixture_log_prob_and_sampling():
    torch.manual_seed(0)
    means = torch.rand(3, 2, 3, 5, 5)
    logits = torch.randn(3, 2, 5, 5) * 3
    x = torch.rand(3, 3, 5, 5)
    d = PixelMixture(means, logits, "gaussian", 0.1)
    assert d.batch_shape == (3,) and d.event_shape == (3, 5, 5)
    assert torch.allclose(d.log_prob(x), hand_log_px(x, means, logits, "gaussian", 0.1), atol=1e-3)
    assert d.sample().shape == (3, 3, 5, 5)
    # one slot of mask ~1 everywhere: samples are that slot's mean plus sigma noise
    logits = torch.full((4000, 2, 1, 1), -30.0)
    logits[:, 1] = 30.0
    means = torch.zeros(4000, 2, 3, 1, 1)
    means[:, 1] = 0.5
    s = PixelMixture(means, logits, "gaussian", 0.1).sample()
    assert abs(float(s.mean()) - 0.5) < 0.01 and abs(float(s.std()) - 0.1) < 0.01
    s = PixelMixture(means, logits, "logistic", 0.03).sample()
    assert abs(float(s.std()) - 0.03 * math.pi / math.sqrt(3)) < 0.005  # logistic sd = s pi / sqrt 3


def test_pixel_mixture_takes_leading_sample_dims_and_validates_its_value():
    torch.manual_seed(0)
    means, logits = torch.rand(4, 3, 2, 3, 5, 5), torch.randn(4, 3, 2, 5, 5)   # [S, B, K, C, H, W]
    d = PixelMixture(means, logits, "gaussian", 0.1, validate_args=True)
    assert d.batch_shape == (4, 3) and d.event_shape == (3, 5, 5) and d.support.event_dim == 3
    x = torch.rand(3, 3, 5, 5)                                      # broadcast over the sample dim
    want = torch.stack([PixelMixture(means[s], logits[s]).log_prob(x) for s in range(4)])
    assert torch.allclose(d.log_prob(x), want)
    assert d.sample((2,)).shape == (2, 4, 3, 3, 5, 5)
    assert PixelMixture(means[0], logits[0]).sample((7,)).shape == (7, 3, 3, 5, 5)
    assert d.expand((6, 4, 3)).batch_shape == (6, 4, 3)
    with pytest.raises(ValueError):
        d.log_prob(torch.rand(3, 5, 5, 3))                          # not an image [C, H, W]
    with pytest.raises(ValueError):
        d.log_prob(torch.full((3, 3, 5, 5), math.nan))
    with pytest.raises(ValueError, match="means"):
        PixelMixture(torch.rand(2, 3, 5, 5), torch.rand(2, 5, 5))


def test_decode_and_the_model_take_leading_sample_dims():
    """`Predictive(parallel=True)` runs the model once for all draws: z [S, B, K, n_z]."""
    from pyro.infer import Predictive
    cfg = tiny_config("paper")
    torch.manual_seed(0)
    system = Iodine(cfg)
    z = torch.randn(5, 2, 3, cfg.model.latent_dim)
    d = system.model.decode(z)
    assert d.means.shape == (5, 2, 3, 3, *cfg.model.image_size) and d.masks.shape == (5, 2, 3, *cfg.model.image_size)
    one = system.model.decode(z[1])
    assert torch.allclose(d.means[1], one.means, atol=1e-6) and torch.allclose(d.reconstruction()[1], one.reconstruction(), atol=1e-6)
    draws = Predictive(system.model, num_samples=4, parallel=True)(None, batch_size=2)
    assert draws["t0/z"].shape == (4, 2, 3, cfg.model.latent_dim)
    assert draws["t0/x"].shape == (4, 2, 1, 3, *cfg.model.image_size)       # not in the slots plate


def test_model_samples_images_from_the_prior():
    cfg = tiny_config("paper")
    system = Iodine(cfg)
    tr = poutine.trace(system.model).get_trace(None, batch_size=4)
    assert tr.nodes["t0/z"]["value"].shape == (4, 3, cfg.model.latent_dim)
    assert tr.nodes["t0/x"]["value"].shape == (4, 1, 3, *cfg.model.image_size)
    assert tr.nodes["t0/z"]["fn"].event_shape == (cfg.model.latent_dim,)      # slots are a plate


def test_inference_keeps_no_graph_and_runs_at_other_k_and_t():
    cfg = tiny_config("paper", **{"guide.lstm": 8})
    system = Iodine(cfg)
    x = torch.rand(2, 3, *cfg.model.image_size)
    steps = system.infer(x, num_iters=6, num_slots=5)
    assert len(steps) == 6
    for s in steps:
        assert s.masks.shape == (2, 5, *cfg.model.image_size)
        assert not s.lam.requires_grad and not s.recon.requires_grad
        assert torch.allclose(s.masks.sum(1), torch.ones(2, *cfg.model.image_size), atol=1e-5)


@pytest.mark.parametrize("name", ["image", "means", "mask", "mask_logits", "mask_posterior",
                                  "grad_means", "grad_mask", "likelihood", "leave_one_out",
                                  "coordinates", "posterior", "grad_posterior"])
def test_each_input_can_be_switched_off(name):
    full = Iodine(tiny_config("paper"))
    cfg = tiny_config("paper", **{"guide.disabled_inputs": (name,)})
    system = Iodine(cfg)
    assert name not in system.guide.input_names
    c_full = full.guide.net.convs[0].in_channels
    c = system.guide.net.convs[0].in_channels
    v_full, v = full.guide.net.head.in_features, system.guide.net.head.in_features
    removed = {"image": 3, "means": 3, "grad_means": 3, "coordinates": 2}.get(name, 1)
    if name in ("posterior", "grad_posterior"):
        assert c == c_full and v == v_full - 2 * cfg.model.latent_dim
    else:
        assert c == c_full - removed
    loss = system.loss(torch.rand(2, 3, *cfg.model.image_size))
    assert torch.isfinite(loss)


def test_mixture_terms_is_the_one_likelihood():
    """The model's observation site scores exactly `mixture_terms` summed over pixels."""
    cfg = tiny_config("paper")
    system = Iodine(cfg)
    x = torch.rand(2, 3, *cfg.model.image_size)
    tr = poutine.trace(system.model).get_trace(x)
    site = tr.nodes["t0/x"]
    fn = site["fn"]                                                  # batch [B, 1]: not in the slots plate
    terms = mixture_terms(x, fn.means[:, 0], fn.mask_logits[:, 0], "gaussian", 0.1)
    assert torch.allclose(fn.log_prob(site["value"]), terms.log_px.sum((1, 2))[:, None])


def test_full_size_presets_build():
    for ds in ["tetrominoes", "multi_dsprites", "clevr6", "clevr"]:
        for preset in ["paper", "deepmind"]:
            cfg = make_config(ds, preset)
            system = Iodine(cfg)
            assert (system.guide.net.lstm is None) == (ds == "tetrominoes")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel,size", [(5, (35, 35)), (3, (16, 20)), (1, (7, 7)), (5, (3, 2))])
def test_broadcast_decoder_equals_convolving_the_tiled_input(kernel, size, channels_last):
    from iodine_pyro.models import SpatialBroadcastDecoder
    torch.manual_seed(0)
    dec = SpatialBroadcastDecoder(6, 3, size, (8, 8), kernel).double()
    if channels_last:                                   # Iodine.use_fast_paths(channels_last=True)
        dec = dec.to(memory_format=torch.channels_last)
    z = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    fast, ref = dec(z), dec.forward_tiled(z)
    assert torch.allclose(fast, ref, atol=1e-12)
    wrt = [z, dec.net[0].weight, dec.net[0].bias, dec.net[-1].weight, dec.net[-1].bias]
    g_fast = torch.autograd.grad(fast.square().sum(), wrt)
    g_ref = torch.autograd.grad(ref.square().sum(), wrt)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_fast, g_ref))


def test_edge_patterns_say_which_taps_fall_inside():
    from iodine_pyro.models.decoders import edge_patterns
    taps, pattern = edge_patterns(35, 5)
    assert taps.shape == (5, 5) and pattern.shape == (35,)
    for h in range(35):
        inside = [float(0 <= h + i - 2 < 35) for i in range(5)]
        assert taps[pattern[h]].tolist() == inside


def test_grad_steps_differentiates_the_last_passes_only():
    """``guide.grad_steps`` = 1: the same loss value, but lambda_1 (used before the last
    pass) gets no gradient, while the refinement network (its update into the last pass)
    and the decoder still do; without it every pass is differentiated."""
    grads = {}
    for n in (None, 1):
        cfg = tiny_config("paper", **{"guide.grad_steps": n})
        torch.manual_seed(0)
        system = Iodine(cfg)
        x = torch.rand(2, 3, *cfg.model.image_size)
        pyro.set_rng_seed(1)
        loss = system.loss(x)
        loss.backward()
        grads[n] = (float(loss.detach()), system.guide.lambda0.grad,
                    [p.grad for p in system.guide.net.parameters()], [p.grad for p in system.model.decoder.parameters()])
    (full, lam_full, _, dec_full), (last, lam_last, net_last, dec_last) = grads[None], grads[1]
    assert last == pytest.approx(full, rel=1e-6)
    assert lam_full is not None and lam_full.abs().sum() > 0
    assert lam_last is None or lam_last.abs().sum() == 0
    assert all(g is not None and g.abs().sum() > 0 for g in net_last + dec_last)
    assert not torch.allclose(dec_last[0], dec_full[0])


def test_inference_runs_the_last_pass_without_autograd():
    """Under no_grad the earlier passes need autograd for the refinement's gradient inputs;
    the last pass feeds no refinement, so it runs without any graph."""
    cfg = tiny_config("paper")
    system = Iodine(cfg)
    seen = []
    hook = lambda module, inputs, output: seen.append(output.requires_grad)
    system.model.decoder.register_forward_hook(hook)
    with torch.no_grad():
        system.guide(torch.rand(2, 3, *cfg.model.image_size))
    assert len(seen) == 3 and seen[-1] is False              # the last pass needs no gradient at all


def test_first_slot_init_gives_slot_one_its_own_trained_start():
    """``guide.first_slot_init``: slot 1 starts from its own lambda_1, the others share
    the paper's; both are trained, any number of slots works, and a run without it has
    no such parameter (stored weights of the paper's guide load as they are)."""
    torch.manual_seed(0)
    plain = Iodine(tiny_config("paper"))
    assert not any("lambda0_first" in n for n in plain.state_dict())
    cfg = tiny_config("paper", **{"guide.first_slot_init": True})
    torch.manual_seed(0)
    system = Iodine(cfg)
    guide = system.guide
    x = torch.rand(2, 3, *cfg.model.image_size)
    for k in (1, cfg.model.num_slots, cfg.model.num_slots + 2):
        lam = guide.initial_lambda(x, k)
        assert lam.shape == (2, k, 2 * guide.n_z)
        assert torch.equal(lam[:, 0], guide.lambda0_first.expand(2, -1))
        assert torch.equal(lam[:, 1:], guide.lambda0.expand(2, k - 1, -1))
    assert not torch.allclose(guide.lambda0_first, guide.lambda0)       # a mean drawn from the prior
    pyro.set_rng_seed(1)
    system.loss(x).backward()
    assert guide.lambda0_first.grad.abs().sum() > 0 and guide.lambda0.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="first_slot_init"):
        tiny_config("paper", **{"guide.first_slot_init": True, "guide.kind": "amortized"})
