"""IODINE as a Pyro user drives it: `pyro.infer.SVI`, one param store, several systems."""

import copy

import pyro
from pyro.infer import Predictive, TraceMeanField_ELBO
import pytest
import torch

from iodine_pyro.system import Iodine, svi
from iodine_pyro.training import make_optimizer, train_step

from ..helpers import tiny_config


def _system(seed=0, **overrides):
    torch.manual_seed(seed)
    return Iodine(tiny_config(**{"train.warmup_steps": 0, **overrides}))


def _images(seed=5, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 12, 12, generator=g)


def _flat(system):
    return torch.cat([p.detach().flatten() for p in system.parameters()])


def test_svi_steps_match_the_training_step():
    """Same seed, same batches: `svi(system).step` and `train_step` (Adam after a global-norm
    clip) leave the same parameters after three steps."""
    a, b = _system(), _system()
    assert torch.equal(_flat(a), _flat(b))
    run, opt = svi(a), make_optimizer(b, b.cfg)
    for step in range(3):
        x = _images(step)
        torch.manual_seed(100 + step)
        loss_a = run.step(x)
        torch.manual_seed(100 + step)
        loss_b, norm, applied, _ = train_step(b, opt, x, b.cfg.train.clip_norm)
        assert applied and loss_a == pytest.approx(loss_b, rel=1e-5)
    assert not torch.equal(_flat(a), _flat(_system()))                # it trained
    assert torch.allclose(_flat(a), _flat(b), atol=1e-5)


def test_clipping_is_of_the_global_norm():
    a, b = _system(**{"train.clip_norm": 1e-3}), _system(**{"train.clip_norm": 1e-3})
    run, opt = svi(a), make_optimizer(b, b.cfg)
    x = _images()
    torch.manual_seed(1)
    run.step(x)
    torch.manual_seed(1)
    train_step(b, opt, x, b.cfg.train.clip_norm)
    assert torch.allclose(_flat(a), _flat(b), atol=1e-6)


def test_two_systems_train_independently_under_svi():
    """The param store is global: after system A's SVI step, system B's step changes B."""
    a, b = _system(0), _system(1)
    svi(a).step(_images())
    before_a, before_b = _flat(a), _flat(b)
    svi(b).step(_images(6))
    assert not torch.equal(_flat(b), before_b)
    assert torch.equal(_flat(a), before_a)
    c = copy.deepcopy(b)                                              # a copy is a third system
    assert c.model.pyro_name("decoder") != b.model.pyro_name("decoder")
    before_b = _flat(b)
    svi(c).step(_images(7))
    assert not torch.equal(_flat(c), before_b) and torch.equal(_flat(b), before_b)


def test_run_open_twice_gives_two_independent_systems():
    from iodine_pyro.run import Run
    a, b = Run.open("pretrained:tetrominoes").system, Run.open("pretrained:tetrominoes").system
    assert torch.equal(_flat(a), _flat(b))
    m = a.cfg.model
    x = torch.rand(1, m.image_channels, *m.image_size, generator=torch.Generator().manual_seed(0))
    before = _flat(b)
    svi(a, num_iters=2).step(x)
    assert torch.equal(_flat(b), before) and not torch.equal(_flat(a), before)
    svi(b, num_iters=2).step(x)
    assert not torch.equal(_flat(b), before)


def test_the_model_is_the_pyro_model_and_the_old_name_warns():
    system = _system()
    tr = pyro.poutine.trace(system.model).get_trace(None, batch_size=2)
    assert tr.nodes["t0/z"]["value"].shape == (2, 3, 4)
    with pytest.warns(DeprecationWarning, match="system.model"):
        system.model.model(None, batch_size=2)


def test_the_guide_under_inference_mode_says_so_in_one_line():
    system = _system()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        system.guide(_images())
    with torch.no_grad():
        assert len(system.guide(_images())) == 3


def _plates(site):
    return {f.name: (f.dim, f.size) for f in site["cond_indep_stack"]}


@pytest.mark.parametrize("kind", ["iterative", "amortized", "slot_attention"])
def test_slots_are_a_plate_in_model_and_guide(kind):
    """Each ``t{t}/z`` sits in the plates images (dim -2) x slots (dim -1); an image site in
    images only, its batch shape [B, 1] (Pyro's nested-plate convention)."""
    system, x = _system(**{"guide.kind": kind}), _images(n=2)
    guide_tr = pyro.poutine.trace(system.guide).get_trace(x, system.weights())
    model_tr = pyro.poutine.trace(pyro.poutine.replay(system.model, trace=guide_tr)).get_trace(x, system.weights())
    for t in range(len(system.weights())):
        for tr in (guide_tr, model_tr):
            z = tr.nodes[f"t{t}/z"]
            assert _plates(z) == {"images": (-2, 2), "slots": (-1, 3)}
            assert z["fn"].batch_shape == (2, 3) and z["fn"].event_shape == (4,)
        obs = model_tr.nodes[f"t{t}/x"]
        assert _plates(obs) == {"images": (-2, 2)} and obs["fn"].batch_shape == (2, 1)
        assert obs["value"].shape == (2, 1, 3, 12, 12)
    model_tr.compute_log_prob()                                       # Pyro's shape checks pass


@pytest.mark.parametrize("kind", ["iterative", "amortized", "slot_attention"])
def test_predictive_in_parallel_and_vectorised_particles(kind):
    system, x = _system(**{"guide.kind": kind}), _images(n=2)
    T = len(system.weights())
    with torch.no_grad():
        draws = Predictive(system.model, guide=system.guide, num_samples=5, parallel=True)(x, system.weights())
    assert draws[f"t{T - 1}/z"].shape == (5, 2, 3, 4) and draws[f"t{T - 1}/x"].shape == (5, 2, 1, 3, 12, 12)
    elbo = TraceMeanField_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=2)
    loss = elbo.differentiable_loss(system.model, system.guide, x, system.weights())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in system.guide.parameters())


def test_each_vectorised_sample_is_its_own_run_of_the_refinement(monkeypatch):
    """Under a vectorised plate of S samples, sample s's refinement path is exactly the
    guide's run on the images alone with the same standard-normal draws."""
    from iodine_pyro.guides import iterative

    system, x = _system(), _images(n=2)
    weights = system.weights()
    noise = [torch.randn(3, 2, 3, 4) for _ in weights]                # per step: [S, B, K, n_z]

    def draws(picks):
        it = iter(picks)
        return lambda shape, dtype, device: next(it)

    monkeypatch.setattr(iterative, "_standard_normal", draws(noise))
    with torch.no_grad(), pyro.plate("samples", 3, dim=-3):
        steps = system.guide(x, weights)                              # lam, z: [S, B, K, ...]
    for s in range(3):
        monkeypatch.setattr(iterative, "_standard_normal", draws([n[s] for n in noise]))
        with torch.no_grad():
            alone = system.guide(x, weights)
        for t in range(len(weights)):
            assert torch.allclose(alone[t].lam, steps[t].lam[s], atol=1e-5)
            assert torch.allclose(alone[t].z, steps[t].z[s], atol=1e-5)
            assert torch.allclose(alone[t].decoded.means, steps[t].decoded.means[s], atol=1e-5)


def test_the_decoding_is_handed_over_once_and_dies_with_its_sample():
    """The model's memo lives on the sample: the model reuses the guide's pass for that very
    tensor, once; a copy of z is decoded afresh; no system keeps anything."""
    system, x = _system(), _images(n=2)
    calls = []
    system.model.decoder.register_forward_hook(lambda *a: calls.append(1))
    steps = system.guide(x, system.weights())                         # training: steps hold the sites
    n = len(calls)
    z = steps[-1].z
    with torch.no_grad():
        system.model.decode(z)
        assert len(calls) == n                                        # the guide's pass
        system.model.decode(z)
        system.model.decode(z.clone())
        assert len(calls) == n + 2                                    # used once; copies decode
    assert not hasattr(system.model, "_memo") and not hasattr(system.model, "forget")
