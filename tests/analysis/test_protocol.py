"""The comparison protocol's estimators on a model with a known answer.

z ~ N(0, I) over [K, D], x | z ~ N(W vec(z) + b, s^2 I): log p(x) = log N(x; b, W W^T + s^2 I),
the posterior is N(m, P^-1) with P = I + W^T W / s^2, m = P^-1 W^T (x - b) / s^2, and the best
diagonal Gaussian (the ELBO's optimum among them) has mean m and variances 1 / diag(P), its
ELBO being log p(x) - KL(q* || posterior). These are the very functions `compare` runs on
IODINE's model (`model_log_joint`).
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from iodine_pyro.compare import (decomposition, fit_gaussian, gaussian_elbo, importance_log_weights, log_mean_exp,
                                 mean_and_se, pareto_khat)

K, D, P, S2 = 2, 2, 6, 0.25          # slots, latent size, observations, noise variance


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def linear_gaussian(orthogonal: bool, B: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(P, K * D, generator=g, dtype=torch.float64)
    if orthogonal:                                     # orthogonal columns: a diagonal posterior
        W = torch.linalg.qr(W)[0] * torch.tensor([2.0, 1.0, 0.5, 1.5], dtype=torch.float64)
    b = torch.randn(P, generator=g, dtype=torch.float64)
    z = torch.randn(B, K * D, generator=g, dtype=torch.float64)
    x = z @ W.T + b + S2 ** 0.5 * torch.randn(B, P, generator=g, dtype=torch.float64)    # [B, P]
    log_px = MultivariateNormal(b, W @ W.T + S2 * torch.eye(P, dtype=torch.float64)).log_prob(x)   # [B]
    prec = torch.eye(K * D, dtype=torch.float64) + W.T @ W / S2
    cov = torch.linalg.inv(prec)
    mean = (x - b) @ W @ cov / S2                                                        # [B, K*D]

    def log_joint(zs):                                 # [n, B, K, D] -> [n, B]
        flat = zs.reshape(*zs.shape[:2], K * D)
        lik = Normal(flat @ W.T + b, S2 ** 0.5).log_prob(x).sum(-1)
        return lik + Normal(0.0, 1.0).log_prob(flat).sum(-1)

    posterior = MultivariateNormal(mean, cov)
    mean_field = Normal(mean.view(B, K, D), (1 / torch.diagonal(prec)).sqrt().expand(B, K * D).reshape(B, K, D))
    mf_flat = MultivariateNormal(mean, torch.diag_embed(mean_field.scale.reshape(B, -1) ** 2))
    best_elbo = log_px - torch.distributions.kl_divergence(mf_flat, posterior)            # [B]
    return log_joint, log_px, mean_field, best_elbo


def test_importance_sampling_is_exact_with_the_posterior_as_proposal():
    log_joint, log_px, posterior, best = linear_gaussian(orthogonal=True)
    torch.testing.assert_close(best, log_px)           # the posterior is diagonal: ELBO* = log p(x)
    log_w = importance_log_weights(log_joint, posterior, 64, chunk=10)
    assert log_w.shape == (64, 5)
    torch.testing.assert_close(log_mean_exp(log_w), log_px)
    torch.testing.assert_close(gaussian_elbo(log_joint, posterior, 8), log_px)


def test_importance_estimate_agrees_with_log_px_within_its_error():
    """A proposal wider than the posterior: the estimate is within a few SEs of the truth,
    and below the IS bound's limit never by more than its spread."""
    log_joint, log_px, mean_field, _ = linear_gaussian(orthogonal=False)
    torch.manual_seed(0)
    q = Normal(mean_field.loc, 1.5 * mean_field.scale)
    runs = torch.stack([log_mean_exp(importance_log_weights(log_joint, q, 1000)) for _ in range(8)])   # [8, B]
    err = (runs.mean(0) - log_px).abs()
    se = runs.std(0) / math.sqrt(8)
    assert (err < 4 * se + 1e-3).all(), (err, se)


def test_khat_separates_good_from_bad_proposals():
    """Wider than the (diagonal) posterior: k-hat < 0.5; much narrower: > 0.7."""
    log_joint, _, mean_field, _ = linear_gaussian(orthogonal=True)
    torch.manual_seed(1)
    wide = pareto_khat(importance_log_weights(log_joint, Normal(mean_field.loc, 1.5 * mean_field.scale), 2000))
    narrow = pareto_khat(importance_log_weights(log_joint, Normal(mean_field.loc, 0.3 * mean_field.scale), 2000))
    assert wide.shape == (5,) and (wide < 0.5).all(), wide
    assert (narrow > 0.7).all(), narrow


@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("start", ["prior", "shifted"])
@pytest.mark.slow
def test_q_star_reaches_the_best_diagonal_gaussian_and_says_when(orthogonal, start):
    log_joint, log_px, mean_field, best = linear_gaussian(orthogonal)
    ones = torch.ones_like(mean_field.loc)
    q0 = Normal(0 * ones, ones) if start == "prior" else Normal(mean_field.loc + 1.0, 2 * mean_field.scale)
    torch.manual_seed(2)
    q, steps = fit_gaussian(log_joint, q0, lr=0.01, check_every=50, patience=5, max_steps=5000,
                            check_samples=256, tol=0.001)
    assert steps.shape == (5,) and (0 < steps).all() and (steps < 5000).all()   # the rule, not the cap
    # one-sample gradients leave Adam a noise floor: near the optimum, within 0.1 nats of its ELBO
    torch.testing.assert_close(q.loc, mean_field.loc, atol=0.15, rtol=0)
    torch.testing.assert_close(q.scale, mean_field.scale, atol=0.1, rtol=0)
    elbo = gaussian_elbo(log_joint, q, 4000)
    assert ((elbo - best).abs() < 0.1).all(), elbo - best
    gaps = decomposition(log_px, elbo, gaussian_elbo(log_joint, q0, 4000))
    torch.testing.assert_close(gaps["approximation_gap"], log_px - best, atol=0.1, rtol=0)
    if not orthogonal:                                  # a correlated posterior: a real approximation gap
        assert (log_px - best > 0.2).all(), log_px - best
    torch.testing.assert_close(gaps["approximation_gap"] + gaps["amortization_gap"], gaps["inference_gap"])
    assert (gaps["amortization_gap"] > 0).all()


def test_fit_stops_after_patience_checks_without_improvement():
    """Started at the optimum nothing improves: it stops after exactly `patience` checks."""
    log_joint, _, posterior, _ = linear_gaussian(orthogonal=True)
    q, steps = fit_gaussian(log_joint, posterior, lr=1e-4, check_every=3, patience=2, max_steps=100,
                            check_samples=64, tol=0.01)
    assert (steps == 6).all()
    torch.testing.assert_close(q.loc, posterior.loc)


def test_mean_and_standard_error():
    mean, se = mean_and_se(torch.tensor([1.0, 2.0, 3.0, float("nan")]))
    assert mean == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(mean_and_se(torch.tensor([1.0]))[1])
