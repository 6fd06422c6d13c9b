"""Small dense linear algebra from matrix products only (no LAPACK custom calls).

Used by :mod:`vijax.em` for the K small [D, D] factorisations of a mixture's M-step when the
rows are split over devices (``mesh=``). Why not ``jnp.linalg.cholesky`` and
``jax.scipy.linalg.solve_triangular``: on the CPU those are LAPACK custom calls whose
batched kernels hand work to XLA's intra-op thread pool and wait for it. Inside a program
that runs on several host devices at once (``jax.shard_map`` over
``--xla_force_host_platform_device_count`` devices) the devices' kernels then wait on each
other's pool threads, and the program deadlocks on a machine with few cores (jaxlib 0.10.2,
2 cores: the 2-device EM step hung in about half of the runs at D = 32 and in all 8 runs at
D = 64 and 128; a native stack showed both devices' threads inside ``lapack_dpotrf_ffi``).
Matrix products also batch well over the leading axes and run on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _blocks(upper_left: Array, lower_left: Array, lower_right: Array) -> Array:
    """[[A, 0], [C, B]] from its three blocks (batched over leading axes)."""
    zeros = jnp.zeros(upper_left.shape[:-1] + lower_right.shape[-1:], upper_left.dtype)
    return jnp.concatenate([jnp.concatenate([upper_left, zeros], axis=-1),
                            jnp.concatenate([lower_left, lower_right], axis=-1)], axis=-2)


def cholesky_and_inverse(matrix: Array) -> tuple[Array, Array]:
    """Lower Cholesky factor L of symmetric positive-definite ``matrix [..., D, D]`` (only its
    lower triangle is read) and L^{-1}, both ``[..., D, D]`` lower triangular.

    Recursive blocking (the right-looking blocked Cholesky of LAPACK's ``potrf``): for
    S = [[A, .], [B, C]] with A = L_A L_A^T, W = B L_A^{-T} (from the explicit inverse plus one
    refinement step), C - W W^T = L_C L_C^T,
    L = [[L_A, 0], [W, L_C]] and L^{-1} = [[L_A^{-1}, 0], [-L_C^{-1} W L_A^{-1}, L_C^{-1}]];
    1 x 1 blocks are square roots. A matrix that is not positive definite gives NaN entries
    (like ``jnp.linalg.cholesky``), never an exception.
    """
    d = matrix.shape[-1]
    if d == 1:
        chol = jnp.sqrt(matrix)
        return chol, 1.0 / chol
    h = d // 2
    chol_a, inv_a = cholesky_and_inverse(matrix[..., :h, :h])
    lower_left = matrix[..., h:, :h]
    w = lower_left @ jnp.swapaxes(inv_a, -1, -2)
    # one step of refinement, W += (B - W L_A^T) L_A^{-T}: the explicit inverse alone left W
    # inaccurate enough, for float32 covariances of condition ~1e7, that the Schur complement
    # below lost positive definiteness (NaN) where LAPACK's triangular solve did not
    w = w + (lower_left - w @ jnp.swapaxes(chol_a, -1, -2)) @ jnp.swapaxes(inv_a, -1, -2)
    schur = matrix[..., h:, h:] - w @ jnp.swapaxes(w, -1, -2)
    chol_c, inv_c = cholesky_and_inverse(schur)
    return (_blocks(chol_a, w, chol_c),
            _blocks(inv_a, -(inv_c @ (w @ inv_a)), inv_c))


def tril_inverse(tril: Array) -> Array:
    """Inverse of lower-triangular ``tril [..., D, D]`` (non-singular), lower triangular.

    The same recursion as :func:`cholesky_and_inverse`: for L = [[A, 0], [C, B]],
    L^{-1} = [[A^{-1}, 0], [-B^{-1} C A^{-1}, B^{-1}]]; the entries above the diagonal of
    ``tril`` are not read.
    """
    d = tril.shape[-1]
    if d == 1:
        return 1.0 / tril
    h = d // 2
    inv_a = tril_inverse(tril[..., :h, :h])
    inv_b = tril_inverse(tril[..., h:, h:])
    return _blocks(inv_a, -(inv_b @ (tril[..., h:, :h] @ inv_a)), inv_b)
