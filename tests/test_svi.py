"""IODINE as a Pyro user drives it: `pyro.infer.SVI`, one param store, several systems."""

import copy

import pyro
import pytest
import torch

from iodine_pyro.system import Iodine, svi
from iodine_pyro.train import make_optimizer, train_step

from .helpers import tiny_config


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
