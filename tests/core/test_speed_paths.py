"""Mixed precision, channels-last, deferred (sync-free) steps and inference without training graphs."""

import math

import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iodine_pyro.checkpoint import load_checkpoint
from iodine_pyro.data import generate
from iodine_pyro.system import Iodine
from iodine_pyro.training import TrainingError, fit, make_optimizer, train_step
from iodine_pyro.training.ddp import Processes
from iodine_pyro.training.state import load_optimizer_state
from iodine_pyro.training.step import SyncFreeMeanFieldELBO, SyncFreeStep

from ..helpers import TINY_OVERRIDES, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is fastest


def _system(seed=0, **fast):
    torch.manual_seed(seed)
    return Iodine(tiny_config()).use_fast_paths(**fast)


def _loss(system, x, seed=1):
    torch.manual_seed(seed)
    return system.loss(x)


@pytest.fixture(scope="module")
def x():
    return torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate("tetrominoes", 48, tmp_path_factory.mktemp("data") / "tet", seed=0, progress=False,
                    workers=1)


def test_fast_paths_off_compute_exactly_what_they_always_did(x):
    plain, off = _system(), _system(amp=None, channels_last=False)
    assert torch.equal(_loss(plain, x), _loss(off, x))


def test_amp_runs_the_networks_in_bf16_and_the_likelihood_in_float32(x):
    full, amp = _system(), _system(amp=torch.bfloat16)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (output[0] if isinstance(output, tuple) else output).dtype
        return hook

    amp.model.decoder.register_forward_hook(record("decoder"))
    amp.guide.net.register_forward_hook(record("refinement"))
    loss = _loss(amp, x)
    assert seen == {"decoder": torch.bfloat16, "refinement": torch.bfloat16}
    assert loss.dtype == torch.float32
    with torch.no_grad():
        d = amp.model.decode(torch.randn(2, 3, 4))
    assert d.means.dtype == d.mask_logits.dtype == torch.float32        # what the likelihood reads
    torch.testing.assert_close(loss, _loss(full, x), rtol=2e-2, atol=0.0)
    loss.backward()
    grads = [p.grad for p in amp.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_channels_last_gives_the_same_loss_and_gradients(x):
    nchw, cl = _system(), _system(channels_last=True)
    assert cl.model.decoder.net[2].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = _loss(nchw, x), _loss(cl, x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    a.backward()
    b.backward()
    for (name, p), q in zip(nchw.named_parameters(), cl.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-2, msg=name)


@pyro.validation_enabled(False)                                       # as in fit: NaN reaches the step
def test_a_deferred_step_never_applies_a_non_finite_update(x):
    system = _system()
    opt = make_optimizer(system, system.cfg, fused=True)
    trainer = SyncFreeStep(system, opt, 5.0, Processes())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in system.state_dict().items()}
    loss, norm, applied, _ = trainer(bad, 0)
    assert applied is None and torch.is_tensor(loss)                  # nothing read on the host
    assert all(torch.equal(before[k], v) for k, v in system.state_dict().items())
    assert not opt.state or all(s["step"] == 0 for s in opt.state.values())
    trainer(x, 1)
    loss, _, skipped, longest = trainer.settle()
    assert (skipped, longest) == (1, 1) and math.isfinite(loss)      # one skip; the last step was good
    # the good step equals a host-checked step with the same (fused) optimizer
    ref = _system()
    ref_opt = make_optimizer(ref, ref.cfg, fused=True)
    torch.manual_seed(5)
    train_step(ref, ref_opt, x, 5.0)
    system.load_state_dict(before)
    trainer2 = SyncFreeStep(system, make_optimizer(system, system.cfg, fused=True), 5.0, Processes())
    torch.manual_seed(5)
    trainer2(x, 0)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(system.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)


def _faulty_loss(monkeypatch, bad_calls):
    real = Iodine.objective
    calls = {"n": 0}

    def objective(self, x, *args, **kwargs):
        calls["n"] += 1
        value, mse = real(self, x, *args, **kwargs)
        return (value * float("nan") if calls["n"] in bad_calls else value), mse

    monkeypatch.setattr(Iodine, "objective", objective)


def test_sync_free_fit_counts_skipped_steps(tmp_path, data, monkeypatch):
    _faulty_loss(monkeypatch, {2, 3})
    result = fit(out=tmp_path / "run", data=data, steps=5, overrides=TINY_OVERRIDES, progress=False,
                 log_every=100, sync_free=True)
    assert result.step == 5 and result.skipped == 2                   # skipped steps count as steps
    assert '"skipped": 2' in (result.out / "metrics.jsonl").read_text()
    assert all(torch.isfinite(v).all() for v in load_checkpoint(result.out)["system"].values())


def test_sync_free_fit_stops_on_a_run_of_faults_with_the_last_good_state(tmp_path, data, monkeypatch):
    good = fit(out=tmp_path / "good", data=data, steps=2, overrides=TINY_OVERRIDES, progress=False,
               sync_free=True)
    _faulty_loss(monkeypatch, set(range(3, 100)))
    # faults from step 3 on; read every 4 steps: at step 4 the run is 2 long, at step 8 it is 6
    with pytest.raises(TrainingError, match="6 non-finite steps in a row before step 8"):
        fit(out=tmp_path / "run", data=data, steps=20, progress=False, log_every=4, sync_free=True,
            overrides={**TINY_OVERRIDES, "train.max_bad_steps": 3})
    saved, ref = load_checkpoint(tmp_path / "run")["system"], load_checkpoint(good.out)["system"]
    assert all(torch.equal(saved[k], ref[k]) for k in ref)


def test_amp_channels_last_sync_free_run_resumes_on_the_default_path(tmp_path, data):
    out = tmp_path / "run"
    fit(out=out, data=data, steps=2, overrides=TINY_OVERRIDES, progress=False, amp=True,
        channels_last=True, sync_free=True)
    assert load_checkpoint(out)["optimizer"]["param_groups"][0]["fused"] is True
    result = fit(out=out, data=data, steps=3, overrides=TINY_OVERRIDES, progress=False)
    ckpt = load_checkpoint(out)
    assert result.step == 3 and ckpt["optimizer"]["param_groups"][0]["fused"] is None
    assert all(torch.isfinite(v).all() for v in ckpt["system"].values())


def test_optimizer_state_keeps_the_loading_optimizer_flags():
    a, b = _system(), _system()
    fused, plain = make_optimizer(a, a.cfg, fused=True), make_optimizer(b, b.cfg)
    a.guide.lambda0.grad = torch.ones_like(a.guide.lambda0)
    fused.step()
    load_optimizer_state(plain, fused.state_dict())
    assert plain.param_groups[0]["fused"] is None
    load_optimizer_state(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"] is True
    assert fused.state[a.guide.lambda0]["step"].dtype == torch.float32


def test_inference_builds_no_graph_for_the_refinement_network(x):
    system = _system()
    grad_out = []

    def hook(module, inputs, output):
        grad_out.append(output[0].requires_grad)

    system.guide.net.register_forward_hook(hook)
    steps = system.infer(x)
    assert grad_out and not any(grad_out)                             # no training graph at inference
    assert all(t.grad_fn is None for s in steps for t in s if torch.is_tensor(t))
    assert all(p.grad is None for p in system.parameters())
    grad_out.clear()
    system.loss(x)
    assert all(grad_out)                                              # training still differentiates it


@pytest.mark.parametrize("preset", ["paper", "deepmind"])
def test_the_sync_free_elbo_is_pyros_loss_and_gradient_exactly(x, preset):
    torch.manual_seed(0)
    a = Iodine(tiny_config(preset))
    b = Iodine(tiny_config(preset))
    b.load_state_dict(a.state_dict())
    b.elbo = SyncFreeMeanFieldELBO()
    la, lb = _loss(a, x), _loss(b, x)
    assert torch.equal(la, lb)
    la.backward()
    lb.backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))


class _HostReads(TorchDispatchMode):
    """Records every op that copies a tensor's value to the host (a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("_local_scalar_dense", "is_nonzero", "item", "equal"):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pyro.validation_enabled(False)
def test_a_deferred_step_reads_nothing_on_the_host(x):
    system = _system()
    trainer = SyncFreeStep(system, make_optimizer(system, system.cfg, fused=True), 5.0, Processes())
    with _HostReads() as reads:
        trainer(x, 0)
        trainer(x, 1)
    assert reads.seen == []
    ref = _system()
    with _HostReads() as reads:                                       # the reference: the host-checked step
        train_step(ref, make_optimizer(ref, ref.cfg), x, 5.0)
    assert reads.seen
