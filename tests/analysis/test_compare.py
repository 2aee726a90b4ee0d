"""Guide comparison: ELBO, IWAE, amortization gap per step; scenes with more objects; `compare` CLI."""

import json
import math

import pytest
import torch

from iodine_pyro.compare import compare, importance_terms, markdown_table, merge_scenes, optimize_posterior
from iodine_pyro.run import Run

from ..helpers import FAILURE, run_main, status_of

METRICS = ["elbo", "iwae", "nll", "kl", "amortization_gap", "mse", "fg_ari", "ari"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def result(runs):
    return compare([runs["iterative"], runs["amortized"]], num_images=8, num_iters=6, iw_samples=16,
                   evidence_samples=100, gap_steps=60, gap_check_every=10, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def batch(runs):
    return Run.open(runs["iterative"]).images(0, 12)[0]


@pytest.mark.slow
def test_per_step_lists_for_iterative_single_step_for_amortized(result):
    iterative, amortized = result["runs"]["run-iterative"], result["runs"]["run-amortized"]
    assert iterative["steps"] == 6 and iterative["trained_step"] == 3      # --num-iters 6 beyond T = 3
    assert amortized["steps"] == 1 and amortized["trained_step"] == 1
    for r in (iterative, amortized):
        for key in METRICS:
            assert len(r[key]) == r["steps"], key
            assert all(isinstance(v, float) for v in r[key]), key
        for key in ("elbo", "iwae", "nll", "kl", "mse", "amortization_gap"):
            assert all(math.isfinite(v) for v in r[key]), key
        assert {k: r["final"][k] for k in METRICS} == {k: r[k][r["trained_step"] - 1] for k in METRICS}
        assert all(v >= 0 for v in r["kl"]) and all(0 <= v <= 1 for v in r["mse"])
        for t in range(r["steps"]):
            assert r["elbo"][t] == pytest.approx(-(r["nll"][t] + r["kl"][t]))
            assert r["amortization_gap"][t] == pytest.approx(r["optimized_elbo"] - r["elbo"][t])
    assert result["settings"]["num_images"] == 8 and result["settings"]["objects_per_image"] == 3.0


@pytest.mark.parametrize("num_iters, steps", [(None, 3), (2, 2)])
def test_steps_default_to_the_trained_t_and_may_stop_before_it(runs, num_iters, steps):
    """The default is T, as for evaluate and sample; fewer steps than T report the last."""
    out = compare([runs["iterative"]], num_images=2, num_iters=num_iters, iw_samples=2, gap_steps=2,
                  evidence_samples=0, generalize=False, progress=False)
    r = out["runs"]["run-iterative"]
    assert r["steps"] == steps and r["trained_step"] == 3 and r["final_step"] == steps
    assert {k: r["final"][k] for k in METRICS} == {k: r[k][steps - 1] for k in METRICS}


def test_importance_weighted_bound_is_above_the_elbo(result):
    for r in result["runs"].values():
        for t in range(r["steps"]):
            assert r["iwae"][t] >= r["elbo"][t] - 1.0, (t, r["iwae"][t], r["elbo"][t])
        assert r["optimized_iwae"] >= r["optimized_elbo"] - 1.0


def test_optimized_posterior_is_not_worse_than_the_guide(result):
    for r in result["runs"].values():
        assert r["optimized_elbo"] >= r["final"]["elbo"] - 1.0
        assert r["final"]["amortization_gap"] >= -1.0


def test_importance_weights_score_the_model_per_image(runs, batch):
    """log w from the Pyro traces equals a hand computation with the same draws."""
    system = Run.open(runs["iterative"]).system
    x = batch["image"][:3]
    q = torch.distributions.Normal(torch.randn(3, 4, 4), torch.rand(3, 4, 4) + 0.5)
    torch.manual_seed(5)
    log_w, log_lik = importance_terms(system, x, q, 2)                    # [2, 3]
    torch.manual_seed(5)
    z = torch.distributions.Normal(q.loc.repeat(2, 1, 1), q.scale.repeat(2, 1, 1)).sample()  # [6, K, n_z]
    with torch.no_grad():
        xs = x.repeat(2, 1, 1, 1)
        lp_x = system.model.likelihood(system.model.decode(z)).log_prob(xs)
        lp_z = system.model.prior(6, 4, like=xs).log_prob(z).sum((1, 2))
        lq = torch.distributions.Normal(q.loc.repeat(2, 1, 1), q.scale.repeat(2, 1, 1)).log_prob(z).sum((1, 2))
    torch.testing.assert_close(log_lik, lp_x.view(2, 3))
    torch.testing.assert_close(log_w, (lp_z + lp_x - lq).view(2, 3))


def test_gap_optimizer_keeps_the_decoder_fixed(runs, batch):
    system = Run.open(runs["iterative"]).system
    before = {k: v.clone() for k, v in system.state_dict().items()}
    q0 = torch.distributions.Normal(torch.zeros(2, 4, 4), torch.ones(2, 4, 4))
    q = optimize_posterior(system, batch["image"][:2], q0, steps=5, lr=0.05)
    assert not torch.equal(q.loc, q0.loc)
    for k, v in system.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in system.parameters())


def test_deepmind_preset_lists_every_pass():
    """T + 1 decoder passes per T iterations; the gap is measured from the last trained pass."""
    from iodine_pyro.compare import evaluate_guide
    from iodine_pyro.system import Iodine
    from tests.helpers import tiny_config

    system = Iodine(tiny_config("deepmind")).eval()
    out = evaluate_guide(system, torch.rand(2, 3, 12, 12), None, num_iters=6, iw_samples=2, gap_steps=0)
    assert out["elbo"].shape == (7, 2) and out["optimized_elbo"].shape == (2,)
    # with no optimisation q* from the guide is the posterior of the trained pass (index T = 3)
    torch.testing.assert_close(out["optimized_kl_from_guide"], out["kl"][3], rtol=1e-5, atol=1e-5)   # softplus
    assert (out["optimized_kl_from_prior"] == 0).all() and (out["gap_steps_from_guide"] == 0).all()


def test_merge_scenes_adds_objects(batch):
    x, masks = merge_scenes(batch["image"][:8], batch["mask"][:8], 2)
    assert x.shape == (4, 3, 35, 35) and masks.shape == (4, 7, 35, 35)
    torch.testing.assert_close(masks.sum(1), torch.ones(4, 35, 35))      # a partition of the pixels
    objects = (masks[:, 1:].flatten(2).amax(2) > 0).sum(1)
    assert (objects > 3).all()
    torch.testing.assert_close(x[:, :, masks[0, 0] > 0][0], torch.zeros(3, int((masks[0, 0] > 0).sum())))
    assert torch.equal(x[0][:, batch["mask"][0, 1] > 0], batch["image"][0][:, batch["mask"][0, 1] > 0])
    noisy = batch["image"][:2] + 0.1 * batch["mask"][:2, :1]                  # a non-uniform background
    noisy[0, :, 0, 0] = 0.5
    with pytest.raises(ValueError, match="uniform background"):
        merge_scenes(noisy, batch["mask"][:2], 2)


def test_generalisation_to_more_objects_and_more_slots(runs, batch):
    """The iterative guide, trained with K = 4 on 3 pieces, on scenes of ~6 pieces with K = 7,
    both from a stored set (merged) and from images in memory."""
    out = compare([runs["iterative"]], num_images=3, merge=2, num_slots=7, num_iters=4, iw_samples=4,
                  gap_steps=5, evidence_samples=0, generalize=False, progress=False)
    r = out["runs"]["run-iterative"]
    assert out["settings"]["objects_per_image"] > 3 and r["num_slots"] == 7 and r["steps"] == 4
    assert all(math.isfinite(v) for v in r["elbo"] + r["fg_ari"])
    memory = compare([runs["iterative"]], data={"image": batch["image"][:6], "mask": batch["mask"][:6]},
                     num_images=3, merge=2, num_slots=7, num_iters=4, iw_samples=4, gap_steps=5,
                     evidence_samples=0, generalize=False, progress=False)
    assert memory["settings"]["data"] == "in-memory images"
    assert memory["runs"]["run-iterative"]["elbo"] == pytest.approx(r["elbo"])   # the same scenes


def test_compare_command_writes_json_table_and_plot(runs, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = run_main("compare", runs["iterative"], runs["amortized"],
                                      "--num-images", 2, "--iw-samples", 4, "--gap-steps", 5,
                                      "--evidence-samples", 50, "--num-iters", 4, "--out", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert set(result["runs"]) == {"run-iterative", "run-amortized"}
    assert len(result["runs"]["run-iterative"]["fg_ari"]) == 4
    assert len(result["runs"]["run-amortized"]["fg_ari"]) == 1
    assert json.loads((out / "compare.json").read_text()) == result
    assert "| run-amortized | amortized |" in (out / "compare.md").read_text()
    import matplotlib.image as mpimg

    assert mpimg.imread(out / "compare.png").std() > 0.05


@pytest.mark.parametrize("args, needle", [
    (["--num-slots", 6], "K=4"),
    (["--iw-samples", 0], "'--iw-samples': Input should be greater than or equal to 1"),
    (["--gap-lr", 0], "--gap-lr must be positive"),
])
def test_compare_bad_arguments(runs, tmp_path, args, needle):
    code, _, err = run_main("compare", runs["iterative"], runs["amortized"],
                                 "--num-images", 2, "--out", tmp_path, *args)
    assert code == status_of(err) and needle in err and len(err.strip().splitlines()) == 1, err


def test_compare_missing_run(tmp_path):
    code, _, err = run_main("compare", tmp_path / "nope", "--out", tmp_path)
    assert code == FAILURE and "no checkpoint" in err


def test_protocol_reports_evidence_gaps_khat_cost_and_generalisation(result):
    s = result["settings"]
    assert s["evidence_samples"] == 100 and "adapts to its guide" in s["decoders"] and not s["reduced_for_time"]
    for r in result["runs"].values():
        assert r["approximation_gap"] == pytest.approx(r["log_px"] - r["optimized_elbo"])
        assert math.isfinite(r["log_px"]) and r["log_px_se"] > 0 and 0 <= r["khat_above_0.7"] <= 1
        assert "khat_se" not in r and r["khat"] > 0.7                        # untrained: far from the posterior
        assert len(r["khat_per_image"]) == 8
        assert r["log_px"] >= r["final"]["elbo"] - 1.0                       # an estimate above the bound
        assert len(r["elbo_se"]) == r["steps"] and all(v > 0 for v in r["elbo_se"])
        assert r["optimized_elbo"] >= max(r["optimized_elbo_from_guide"], r["optimized_elbo_from_prior"]) - 1e-9
        assert 0 < r["gap_steps_from_guide"] <= 60 and 0 < r["gap_steps_from_prior"] <= 60
        assert r["decoder_passes"] == list(range(1, r["steps"] + 1)) and r["cpu_seconds"][-1] > 0
        g = r["generalization"]
        assert g["objects_per_image"] > 3 and ("K=7" in g) == r["can_change_slots"] and "K=4" in g
    assert result["runs"]["run-iterative"]["can_change_slots"]
    table = markdown_table(result)
    assert "adapts to its guide" in table and "approximation gap" in table and "Generalisation" in table


def test_time_limit_lowers_the_samples_and_says_so(runs):
    out = compare([runs["amortized"]], num_images=2, iw_samples=64, evidence_samples=4000, gap_steps=2000,
                  time_limit=0.5, generalize=False, progress=False)
    s = out["settings"]
    assert s["reduced_for_time"] and s["evidence_samples"] < 4000 and s["gap_steps"] < 2000
    assert s["evidence_samples"] >= 32 and s["gap_steps"] >= 50 and s["iw_samples"] >= 4
    assert "Lowered to fit the time limit" in markdown_table(out)
    assert s["planned_seconds"] > 0 and ("exceed" in markdown_table(out)) == (s["planned_seconds"] > 0.5)


def test_a_tight_time_limit_fits_q_star_on_fewer_images(runs):
    out = compare([runs["amortized"]], num_images=8, batch_size=4, iw_samples=4, evidence_samples=32, gap_steps=50,
                  time_limit=1e-3, generalize=False, progress=False)
    s, r = out["settings"], out["runs"]["run-amortized"]
    assert s["gap_images"] == 4 and s["reduced_for_time"]
    assert math.isfinite(r["optimized_elbo"]) and math.isfinite(r["amortization_gap"][0])
    assert "on the first 4 images" in markdown_table(out)


@pytest.mark.parametrize("gap_steps,patience", [(60, 1), (60, 50), (0, 4)])
def test_progress_counts_exactly_the_planned_work(gap_steps, patience):
    """`evaluate_guide` reports its work in decodings, and q* stopped early reports the rest
    of its cap: the total is `work`'s whatever the convergence, so the bar's estimate holds."""
    from iodine_pyro.compare import evaluate_guide, work
    from iodine_pyro.system import Iodine
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    system = Iodine(tiny_config("paper")).eval()
    done = []
    evaluate_guide(system, torch.rand(3, 3, 12, 12), None, iw_samples=4, evidence_samples=20, gap_steps=gap_steps,
                   gap_check_every=10, gap_patience=patience, tick=done.append)
    L = len(system.weights())
    every, subset = work(L, True, 4, 20, gap_steps, 10, generalize=False)
    assert sum(done) == 3 * (every + subset)
