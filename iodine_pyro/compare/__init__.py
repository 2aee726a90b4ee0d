"""Compare guides on the same images, each against its own decoder (docs/comparison.md).

Per guide and step t (t = 1..L decoder passes), in nats per image with standard errors
over images:

* ELBO_t = E_{q_t}[log p(x | z)] - KL(q_t || p) (S' = ``iw_samples`` samples, closed-form
  KL, as training's `TraceMeanField_ELBO`), NLL, KL, and IWAE_t = log (1/S') sum_s
  p(x, z_s) / q_t(z_s), from Pyro traces of the proposal and the replayed model.
* log p(x): importance sampling with the guide's posterior at the trained step as
  proposal, S = ``evidence_samples``, the per-image log-mean-exp computed directly; the
  Pareto k-hat of the weights (PSIS, ArviZ) says how far the proposal is from the
  posterior (Yao et al., 2018).
* q*: a per-image diagonal Gaussian fitted to the image's ELBO with the decoder fixed,
  from the guide's posterior and from the prior, until a stopping rule says it has
  converged (`fit_gaussian`); per image the better of the two.
* Cremer et al. (2018): approximation gap log p(x) - ELBO(q*), amortization gap
  ELBO(q*) - ELBO_t, inference gap log p(x) - ELBO_t.
* MSE, FG-ARI, ARI of the step's own sample, exactly as ``evaluate`` reports them; the
  cost (decoder passes, CPU seconds per image); generalisation to scenes with more
  objects and, for guides that can change it, another K.

The estimators are functions of a log-joint and a proposal, checked on a linear-Gaussian
model with exact answers (tests/analysis/test_protocol.py). Each guide was trained with its own
decoder, which adapted to it: the gaps say how well a guide serves its own model.

`merge_scenes` builds scenes with more objects than training (for the generalisation
experiment) from a stored dataset with a uniform background, such as Tetrominoes.

The package: `estimators` (functions of a log-joint and a proposal), `scenes` (the images),
`protocol` (`compare` itself, one guide's estimates, the plan for a time limit) and
`report` (compare.md and compare.json).
"""

from .estimators import (
                         decomposition,
                         fit_cost,
                         fit_gaussian,
                         gaussian_elbo,
                         importance_log_weights,
                         importance_terms,
                         log_mean_exp,
                         mean_and_se,
                         model_log_joint,
                         optimize_posterior,
                         pareto_khat,
)
from .protocol import (
                         DECODERS,
                         GUIDE_PASS,
                         METRICS,
                         compare,
                         evaluate_guide,
                         plan,
                         step_cost,
                         work,
)
from .report import markdown_table, write_report
from .scenes import load_images_for, merge_scenes

__all__ = ["compare", "importance_terms", "optimize_posterior", "merge_scenes", "load_images_for",
           "write_report", "markdown_table", "importance_log_weights", "log_mean_exp", "mean_and_se",
           "pareto_khat", "gaussian_elbo", "fit_gaussian", "decomposition", "model_log_joint",
           "evaluate_guide", "work", "plan", "step_cost", "fit_cost", "GUIDE_PASS", "METRICS", "DECODERS"]
