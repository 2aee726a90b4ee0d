"""The learning-speed levers: KL weight, GECO, warm-up, time limits, the fast preset."""

import json
import math

import pyro
import pytest
import torch
from torch.distributions import kl_divergence

from iodine_pyro.checkpoint import load_checkpoint
from iodine_pyro.config import make_config, num_slots_at, pixel_scale_at
from iodine_pyro.data import generate
from iodine_pyro.system import Iodine
from iodine_pyro.run import Run
from iodine_pyro.training import Geco, fit, learning_rate

from ..helpers import TINY_OVERRIDES, assert_same_params, params, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("learning") / "tet"
    generate("tetrominoes", 32, path, seed=0, progress=False, workers=1)
    return path


def test_kl_scale_weighs_only_the_kl_terms():
    """float64: loss(kl_scale=b) = sum_t w_t mean_b[-log p(x | z_t) + b KL_t]."""
    cfg = tiny_config("paper")
    torch.manual_seed(0)
    system = Iodine(cfg).double()
    x = torch.rand(3, 3, *cfg.model.image_size, dtype=torch.float64)
    weights = system.weights()
    pyro.set_rng_seed(1)
    loss = system.loss(x, kl_scale=0.25)
    pyro.set_rng_seed(1)
    steps = system.guide(x, weights)
    total = torch.zeros((), dtype=torch.float64)
    for w, step in zip(weights, steps):
        nll = -system.model.terms(x, step.decoded).log_px.sum((1, 2))
        kl = kl_divergence(system.guide.posterior(step.lam), system.model.prior(3, like=x)).sum((1, 2))
        total = total + w * (nll + 0.25 * kl).mean()
    assert torch.allclose(loss, total, rtol=1e-10)


def test_objective_reports_the_final_steps_reconstruction_mse():
    cfg = tiny_config("paper")
    torch.manual_seed(0)
    system = Iodine(cfg)
    x = torch.rand(2, 3, *cfg.model.image_size)
    pyro.set_rng_seed(3)
    loss, mse = system.objective(x)
    pyro.set_rng_seed(3)
    steps = system.guide(x, system.weights())
    want = (steps[-1].decoded.reconstruction() - x).pow(2).mean()
    assert not mse.requires_grad and torch.allclose(mse, want.detach())
    assert loss.requires_grad


def test_geco_lowers_beta_above_the_goal_and_raises_it_back_to_one():
    geco = Geco(goal=0.01, rate=0.1, ema=0.0)
    for _ in range(5):
        geco.update(torch.tensor(1.0))                    # 100 times the goal: one bounded step each
    assert float(geco.log_beta) == pytest.approx(-0.5)
    geco.update(torch.tensor(float("nan")))               # a non-finite measurement changes nothing
    geco.update(torch.tensor(0.5), applied=False)         # neither does a step that was not applied
    assert float(geco.log_beta) == pytest.approx(-0.5)
    for _ in range(100):
        geco.update(torch.tensor(0.0))
    assert float(geco.beta) == 1.0                        # never above the ELBO's weight
    for _ in range(1000):
        geco.update(torch.tensor(1.0))
    assert float(geco.beta) == pytest.approx(Geco.BETA_MIN)
    restored = Geco(goal=0.01, rate=0.1, ema=0.0)
    restored.load_state_dict(geco.state_dict())
    assert float(restored.log_beta) == pytest.approx(float(geco.log_beta))


def test_warm_up_rises_linearly_then_decays():
    cfg = make_config("tetrominoes", overrides={"train.lr": 1e-3, "train.warmup_steps": 4,
                                                "train.lr_decay": 0.5, "train.lr_decay_steps": 10})
    assert [learning_rate(cfg, s) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert learning_rate(cfg, 10) == pytest.approx(5e-4)
    assert learning_rate(make_config("tetrominoes"), 0) == pytest.approx(3e-4)   # no warm-up: lr at once


def test_fit_with_geco_logs_beta_and_resumes_it_exactly(tmp_path, data):
    overrides = {**TINY_OVERRIDES, "train.geco_goal": 1e-4, "train.geco_rate": 0.5}
    full = fit(out=tmp_path / "full", data=data, steps=4, overrides=overrides, progress=False, log_every=1)
    fit(out=tmp_path / "cut", data=data, steps=2, overrides=overrides, progress=False, log_every=1)
    cut = fit(out=tmp_path / "cut", data=data, steps=4, overrides=overrides, progress=False, log_every=1)
    rows = [json.loads(line) for line in (full.out / "metrics.jsonl").read_text().splitlines()]
    betas = [r["beta"] for r in rows]
    assert betas[0] < 1.0 and all(b2 < b1 for b1, b2 in zip(betas, betas[1:]))   # MSE far above 1e-4
    a, b = load_checkpoint(full.out), load_checkpoint(cut.out)
    assert a["extra"]["geco"] == b["extra"]["geco"]
    for k, v in a["system"].items():
        assert torch.equal(v, b["system"][k]), k


def test_a_run_stopped_between_logged_steps_resumes_exactly(tmp_path, data):
    """The log's metrics sample posteriors on their own stream: the extra row written where a
    run stops (a time limit, a signal) takes nothing from training's noise."""
    full = fit(out=tmp_path / "full", data=data, steps=4, overrides=TINY_OVERRIDES, progress=False, log_every=2)
    fit(out=tmp_path / "cut", data=data, steps=3, overrides=TINY_OVERRIDES, progress=False, log_every=2)
    cut = fit(out=tmp_path / "cut", data=data, steps=4, overrides=TINY_OVERRIDES, progress=False, log_every=2)
    assert_same_params(params(full.out), params(cut.out))
    rows = {r["step"]: r for r in map(json.loads, (cut.out / "metrics.jsonl").read_text().splitlines())}
    last = json.loads((full.out / "metrics.jsonl").read_text().splitlines()[-1])
    assert sorted(rows) == [2, 3, 4]
    assert {k: rows[4][k] for k in ("loss", "fg_ari", "ari", "per_step")} == \
        {k: last[k] for k in ("loss", "fg_ari", "ari", "per_step")}


def test_time_limit_stops_with_a_checkpoint_and_the_run_continues(tmp_path, data):
    first = fit(out=tmp_path / "run", data=data, steps=10**6, overrides=TINY_OVERRIDES, progress=False,
                log_every=1, time_limit=0.5)
    assert first.stopped == "time" and 0 < first.step < 10**6
    ckpt = load_checkpoint(first.out)
    assert ckpt["step"] == first.step and ckpt["extra"]["spent"]["time"] >= 0.5
    second = fit(out=tmp_path / "run", data=data, steps=10**6, overrides=TINY_OVERRIDES, progress=False,
                 log_every=1, time_limit=0.2, time_clock="cpu")
    assert second.stopped == "time" and second.step > first.step
    rows = [json.loads(line) for line in (first.out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows]
    assert times == sorted(times) and times[-1] > ckpt["extra"]["spent"]["time"]   # adds up over the calls
    assert all(r["cpu_time"] > 0 for r in rows)


def test_fast_preset_is_the_papers_model_trained_differently():
    paper, fast = make_config("tetrominoes", "paper"), make_config("tetrominoes", "fast")
    assert fast.model.pixel == paper.model.pixel == "gaussian"
    assert (fast.model.num_slots, fast.model.latent_dim, fast.guide.num_iters) == (4, 32, 5)
    assert fast.guide.inputs == paper.guide.inputs and fast.guide.stop_gradient == paper.guide.stop_gradient
    assert fast.model.decoder_channels == paper.model.decoder_channels
    assert fast.guide.conv_channels == paper.guide.conv_channels
    assert fast.model.pixel_scale == 0.3 and fast.train.batch_size == 8
    assert fast.train.lr == 1e-3 and fast.train.warmup_steps > 0
    assert math.isclose(learning_rate(fast, fast.train.warmup_steps - 1), 1e-3)
    assert math.isclose(learning_rate(fast, 2999), 1e-3) and math.isclose(learning_rate(fast, 3000), 5e-4)
    assert math.isclose(learning_rate(fast, 6000), 2.5e-4)


def test_pixel_scale_anneals_geometrically_from_its_start_step():
    cfg = make_config("tetrominoes", "fast", {"train.pixel_scale_final": 0.075, "train.pixel_anneal_start": 100,
                                              "train.pixel_anneal_steps": 200})
    assert pixel_scale_at(cfg, 0) == pixel_scale_at(cfg, 100) == 0.3
    assert pixel_scale_at(cfg, 200) == pytest.approx(0.15)          # halfway: the geometric mean
    assert pixel_scale_at(cfg, 300) == pixel_scale_at(cfg, 10**6) == pytest.approx(0.075)
    assert pixel_scale_at(make_config("tetrominoes", "fast"), 10**6) == 0.3   # no anneal: constant


def test_pixel_scale_returns_to_its_start_after_the_sharp_phase():
    cfg = make_config("tetrominoes", "fast", {"train.pixel_scale_final": 0.075, "train.pixel_anneal_start": 100,
                                              "train.pixel_anneal_steps": 200, "train.pixel_return_start": 400})
    assert pixel_scale_at(cfg, 300) == pixel_scale_at(cfg, 400) == pytest.approx(0.075)   # held until the return
    assert pixel_scale_at(cfg, 500) == pytest.approx(0.15)          # halfway back: the geometric mean
    assert pixel_scale_at(cfg, 600) == pixel_scale_at(cfg, 10**6) == pytest.approx(0.3)
    # a return that starts mid-anneal goes back from the sigma reached there
    early = make_config("tetrominoes", "fast", {"train.pixel_scale_final": 0.075, "train.pixel_anneal_start": 100,
                                                "train.pixel_anneal_steps": 200, "train.pixel_return_start": 200})
    assert pixel_scale_at(early, 200) == pytest.approx(0.15)
    assert pixel_scale_at(early, 300) == pytest.approx((0.15 * 0.3) ** 0.5)
    assert pixel_scale_at(early, 400) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="set train.pixel_scale_final too"):   # a return from no anneal
        make_config("tetrominoes", "fast", {"train.pixel_return_start": 400})


def test_the_number_of_slots_changes_at_its_step():
    cfg = make_config("tetrominoes", "fast", {"model.num_slots": 6, "train.num_slots_final": 5,
                                              "train.num_slots_step": 100})
    assert [num_slots_at(cfg, s) for s in (0, 99, 100, 10**6)] == [6, 6, 5, 5]
    assert num_slots_at(make_config("tetrominoes", "fast"), 10**6) == 4      # no schedule: the model's K
    with pytest.raises(ValueError, match="train.num_slots_final: the amortized guide has parameters for each"):
        make_config("tetrominoes", "fast", {"guide.kind": "amortized", "train.num_slots_final": 5})


def test_a_run_that_changes_k_at_a_step_is_the_run_resumed_with_that_k(tmp_path, data):
    """`train.num_slots_final` from step 2 trains exactly the run that `--resume --num-slots`
    at step 2 trains; the checkpoint, the metrics rows and the evaluation have the K of their
    step, and the same call again continues the run instead of calling it another."""
    scheduled = {**TINY_OVERRIDES, "train.num_slots_final": 5, "train.num_slots_step": 2}
    a = fit(out=tmp_path / "a", data=data, steps=4, overrides=scheduled, progress=False, log_every=1)
    fit(out=tmp_path / "b", data=data, steps=2, overrides=TINY_OVERRIDES, progress=False, log_every=1)
    fit(out=tmp_path / "b", data=data, steps=4, overrides={"model.num_slots": 5}, resume=True, progress=False,
        log_every=1)
    assert_same_params(params(tmp_path / "a"), params(tmp_path / "b"))
    rows = [json.loads(line) for line in (a.out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["num_slots"]) for r in rows] == [(1, 4), (2, 4), (3, 5), (4, 5)]
    assert load_checkpoint(a.out)["config"].model.num_slots == 5
    assert Run.open(a.out).cfg.model.num_slots == 5
    more = fit(out=tmp_path / "a", data=data, steps=5, overrides=scheduled, progress=False, log_every=1)
    assert more.step == 5 and load_checkpoint(a.out)["config"].model.num_slots == 5
    with pytest.raises(ValueError, match="trains with train.num_slots_final 5"):   # K is the schedule's past it
        fit(out=tmp_path / "a", data=data, steps=6, overrides={"model.num_slots": 6}, resume=True, progress=False)
    # a checkpoint before the step keeps the K it trained with, and its resume changes K at the step
    fit(out=tmp_path / "c", data=data, steps=1, overrides=scheduled, progress=False)
    assert load_checkpoint(tmp_path / "c")["config"].model.num_slots == 4
    fit(out=tmp_path / "c", data=data, steps=4, overrides=scheduled, progress=False, log_every=1)
    assert_same_params(params(tmp_path / "c"), params(tmp_path / "b"))


def test_a_resumed_run_may_change_t_with_the_iterative_guide_only(tmp_path, data):
    """T of the iterative guide (one refinement network for every step) may change on
    resume: the loss runs and weighs the new number of steps, the metrics rows and the
    checkpoint record it; a one-shot guide has no T to change."""
    fit(out=tmp_path / "run", data=data, steps=2, overrides=TINY_OVERRIDES, progress=False, log_every=1)
    done = fit(out=tmp_path / "run", data=data, steps=3, overrides={"guide.num_iters": 5}, resume=True,
               progress=False, log_every=1)
    rows = [json.loads(line) for line in (done.out / "metrics.jsonl").read_text().splitlines()]
    assert [len(r["per_step"]["mse"]) for r in rows] == [3, 3, 5]
    assert load_checkpoint(done.out)["config"].guide.num_iters == 5 and Run.open(done.out).system.weights() == \
        pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    one_shot = {**TINY_OVERRIDES, "guide.kind": "amortized"}
    fit(out=tmp_path / "vae", data=data, steps=1, overrides=one_shot, progress=False)
    with pytest.raises(ValueError, match="guide.num_iters 3 -> 5"):
        fit(out=tmp_path / "vae", data=data, steps=2, overrides={"guide.num_iters": 5}, resume=True, progress=False)


def test_geco_release_returns_beta_to_one_whatever_the_mse():
    geco = Geco(goal=0.01, rate=0.1, ema=0.0)
    for _ in range(20):
        geco.update(torch.tensor(1.0))                    # far above the goal: beta falls
    assert float(geco.log_beta) == pytest.approx(-2.0)
    for _ in range(10):
        geco.update(torch.tensor(1.0), release=True)      # released: rises at the full rate
    assert float(geco.log_beta) == pytest.approx(-1.0)
    for _ in range(20):
        geco.update(torch.tensor(1.0), release=True)
    assert float(geco.beta) == 1.0


def test_geco_rises_to_its_ceiling_and_no_further():
    geco = Geco(goal=0.01, rate=0.5, ema=0.0, beta_max=9.0)
    for _ in range(10):
        geco.update(torch.tensor(0.0))                    # the goal met: beta rises past 1 ...
    assert float(geco.beta) == pytest.approx(9.0)         # ... to the ceiling, where it stays
    for _ in range(40):
        geco.update(torch.tensor(1.0))
    assert float(geco.beta) == pytest.approx(Geco.BETA_MIN)
    with pytest.raises(ValueError, match="beta_max"):
        Geco(goal=0.01, rate=0.5, ema=0.0, beta_max=1e-7)
    # a configuration with that ceiling is refused before any work (fast: GECO on), not at the first step
    with pytest.raises(ValueError, match="train.beta_max: GECO's ceiling must be above its floor"):
        make_config("tetrominoes", "fast", {"train.beta_max": 1e-7})
    assert make_config("tetrominoes", "paper", {"train.beta_max": 1e-7}).train.beta_max == 1e-7   # no GECO: a weight


def test_beta_max_weights_the_kl_with_geco_and_without(tmp_path, data):
    """A resumed run may raise the KL's ceiling; without GECO it is the KL's fixed weight."""
    geco = {**TINY_OVERRIDES, "train.geco_goal": 1e-4}
    fit(out=tmp_path / "g", data=data, steps=2, overrides=geco, progress=False, log_every=1)
    done = fit(out=tmp_path / "g", data=data, steps=6, resume=True, progress=False, log_every=1,
               overrides={"train.geco_release_step": 2, "train.geco_rate": 2.0, "train.beta_max": 3.0})
    rows = [json.loads(line) for line in (done.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["beta"] < 1 and rows[-1]["beta"] == pytest.approx(3.0)
    # without GECO beta_max is the KL's weight: same seed and batch, a larger loss
    elbo = fit(out=tmp_path / "e", data=data, steps=1, overrides=TINY_OVERRIDES, progress=False, log_every=1)
    beta = fit(out=tmp_path / "b", data=data, steps=1, overrides={**TINY_OVERRIDES, "train.beta_max": 3.0},
               progress=False, log_every=1)
    (e,), (b,) = ([json.loads(line) for line in (r.out / "metrics.jsonl").read_text().splitlines()]
                  for r in (elbo, beta))
    assert "beta" not in e and b["beta"] == 3.0 and b["loss"] > e["loss"]


def test_a_resumed_run_may_start_annealing_and_is_evaluated_at_its_sigma(tmp_path, data):
    overrides = {**TINY_OVERRIDES, "model.pixel_scale": 0.3, "train.geco_goal": 1e-4}
    fit(out=tmp_path / "run", data=data, steps=2, overrides=overrides, progress=False, log_every=1)
    anneal = {"train.pixel_scale_final": 0.1, "train.pixel_anneal_start": 2, "train.pixel_anneal_steps": 2,
              "train.geco_release_step": 2, "train.geco_rate": 1e-3, "train.geco_goal": 2e-4}
    done = fit(out=tmp_path / "run", data=data, steps=5, overrides=anneal, resume=True, progress=False,
               log_every=1)
    rows = [json.loads(line) for line in (done.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [round(r["pixel_scale"], 4) for r in rows[2:]] == [0.3, 0.1732, 0.1]   # the sigma of each step
    assert rows[3]["beta"] > rows[2]["beta"]              # released: beta rises although MSE >> goal
    assert rows[4]["beta"] / rows[3]["beta"] == pytest.approx(math.exp(1e-3))   # at the new rate
    assert Run.open(done.out).system.model.pixel_scale == pytest.approx(0.1)
    per_step, T = rows[-1]["per_step"], done.system.cfg.guide.num_iters      # every refinement step's metrics
    assert set(per_step) >= {"fg_ari", "ari", "bg_slots", "mse", "kl"} and len(per_step["mse"]) == T
    assert per_step["mse"][-1] == pytest.approx(rows[-1]["mse"], abs=1e-5)
    with pytest.raises(ValueError, match="model.pixel_scale"):  # sigma itself stays the run's
        fit(out=tmp_path / "run", data=data, steps=6, overrides={"model.pixel_scale": 0.1}, resume=True,
            progress=False)
    # a schedule field that completes the stored anneal is checked against the run's own
    # configuration (a new run's default has no anneal for sigma to return from)
    back = fit(out=tmp_path / "run", data=data, steps=8, overrides={"train.pixel_return_start": 5}, resume=True,
               progress=False, log_every=1)
    rows = [json.loads(line) for line in (back.out / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["pixel_scale"], 4) for r in rows[5:]] == [0.1, 0.1732, 0.3]   # back over 2 steps
    with pytest.raises(ValueError, match="pixel_return_start"):   # and refused where it completes nothing
        fit(out=tmp_path / "fresh", data=data, steps=1, overrides={**TINY_OVERRIDES, "train.pixel_return_start": 5},
            progress=False)
