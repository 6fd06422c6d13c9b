"""vijax: variational inference in JAX.

Modules: ``vijax.elbo`` (objectives and gradient estimators), ``vijax.reparam``
(reparameterized sampling with log q by change of variables), ``vijax.marginal``
(log p(x) estimators), ``vijax.families`` (variational families), ``vijax.svi``
(stochastic VI for any model), ``vijax.amortized`` (per-datapoint, amortized and
semi-amortized inference; inference gaps), ``vijax.discrete`` (Concrete relaxations and
straight-through draws for discrete latents), ``vijax.em`` (Gaussian mixtures by EM), ``vijax.meanfield``
(coordinate-ascent VI), ``vijax.data`` (MNIST and small data sets), ``vijax.nn``
(Flax encoder/decoder modules), ``vijax.nnx`` (the same as Flax NNX modules), ``vijax.vae``
(amortized inference training), ``vijax.vae_train`` (the MNIST training driver),
``vijax.distributed`` (several processes over ``jax.distributed``),
``vijax.linear_gaussian`` (a conjugate model with exact posterior and evidence).

Submodules are imported on first use, so ``import vijax`` stays cheap and
``vijax.marginal`` works without a separate import.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ais", "amortized", "data", "discrete", "distributed", "elbo", "em", "families",
               "linear_gaussian", "marginal", "meanfield", "nn", "nnx", "reparam", "svi", "vae",
               "vae_train")

__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"vijax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'vijax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
