"""Mean-field variational inference by coordinate ascent (CAVI).

Source: lecture 3, "Mean field approximation" and "EM algorithm (special case)": for
q(T) = prod_j q_j(T_j) the ELBO-optimal block is ``log q_j = E_{i != j} log p(X, T) + const``;
restricting q(theta) to a Dirac delta turns the same updates into (MAP-)EM.

* :func:`cavi` -- generic driver (``lax.while_loop``; jit- and vmap-able) with an ELBO trace.
* :mod:`~vijax.meanfield.normal_gamma` -- q(mu) q(tau) for a Gaussian with unknown mean and
  precision (PRML §10.1.3), with the exact Normal-Gamma posterior for comparison.
* :mod:`~vijax.meanfield.bayesian_gmm` -- Bayesian Gaussian mixture (PRML §10.2), matching
  scikit-learn's ``BayesianGaussianMixture``; ``bgmm_step`` is its per-iteration function.
* :mod:`~vijax.meanfield.known_variance_gmm` -- the known-variance mixture of Blei,
  Kucukelbir & McAuliffe (2017), Algorithm 2.
* :mod:`~vijax.meanfield.dirac_em` -- EM as the special case q(theta) = delta(theta - theta_0).
"""

from vijax.meanfield import bayesian_gmm, dirac_em, known_variance_gmm, normal_gamma
from vijax.meanfield._cavi import CAVIInfo, cavi, sweep

bgmm_step = bayesian_gmm.step
"""Alias of :func:`vijax.meanfield.bayesian_gmm.step`: one jit-able Bayesian-GMM CAVI iteration."""

__all__ = ["CAVIInfo", "cavi", "sweep", "bgmm_step", "normal_gamma", "bayesian_gmm",
           "known_variance_gmm", "dirac_em"]
