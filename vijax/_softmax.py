"""Normalising log-weights along the mixture-component axis, with rows that sum to one.

The E-step of every mixture here turns unnormalised log-joints l_nk into responsibilities
r_nk = exp(l_nk) / sum_j exp(l_nj) and log p(x_n) = logsumexp_k l_nk. Writing r as
exp(l - logsumexp(l)) rounds logsumexp(l) once: where |l| is large (float32 at |l| ~ 1e6,
e.g. one far outlier) the log K-sized part of the normaliser is lost and a row's r can sum to
anything up to K. Dividing by the sum of the shifted exponentials keeps every row's sum at
one to rounding, and costs one ``exp`` per entry instead of two.

This module imports no other vijax module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def normalize_log_weights(log_weights: Array, axis: int = -1) -> tuple[Array, Array, Array]:
    """``(log_norm, log_probs, probs)`` of unnormalised log-weights ``l`` along ``axis``.

    ``log_norm`` = logsumexp(l) (the axis removed), ``log_probs`` = l - log_norm and
    ``probs`` = exp(l - max) / sum(exp(l - max)) (same shape as ``l``; sums to one to
    rounding). A slice whose entries are all -inf gives log_norm = -inf and NaN
    probabilities, as a softmax does. Unchecked; same dtype as ``log_weights``.
    """
    peak = jnp.max(log_weights, axis=axis, keepdims=True)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    shifted = log_weights - peak
    unnormalised = jnp.exp(shifted)
    total = jnp.sum(unnormalised, axis=axis, keepdims=True)
    log_total = jnp.log(total)
    return (jnp.squeeze(peak + log_total, axis), shifted - log_total, unnormalised / total)
