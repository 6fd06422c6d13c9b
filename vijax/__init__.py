"""vijax: variational inference in JAX.

Modules: ``vijax.elbo`` (objectives and gradient estimators), ``vijax.reparam``
(reparameterized sampling with log q by change of variables), ``vijax.marginal``
(log p(x) estimators), ``vijax.em`` (Gaussian mixtures by EM), ``vijax.meanfield``
(coordinate-ascent VI), ``vijax.data`` (MNIST and small data sets), ``vijax.nn``
(Flax encoder/decoder modules), ``vijax.vae`` (amortized inference training).
"""

__version__ = "0.1.0"
