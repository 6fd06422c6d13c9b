"""Property-based checks (hypothesis) of the public functions that take a distribution.

For random shapes, dtypes, special values (NaN, inf, zero, negative and denormal scales) at
random positions, and random kinds of key, each function of vijax.elbo, vijax.reparam and
vijax.marginal must either raise a ValueError/TypeError whose message names an argument that
was drawn bad, or, when every argument is valid, return a finite result of the right shape.
Never a silent NaN/inf, never an error from deep inside JAX or distrax.

Bounded: few examples, small shapes (so that the op-by-op compilations are shared), no
deadline.
"""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vijax import elbo as velbo
from vijax import marginal, reparam

# valid and invalid values of each input
GOOD_KEYS, BAD_KEYS = ["typed", "raw"], ["typed-batch", "raw-batch", "int-seed", "float-array"]
LOCS = {"ok": 0.3, "nan": np.nan, "inf": np.inf, "-inf": -np.inf}
SCALES = {"ok": 0.7, "tiny": float(np.finfo(np.float32).tiny), "zero": 0.0, "negative": -1.0,
          "denormal": 1e-39, "nan": np.nan, "inf": np.inf}
GOOD_SCALES = ["ok", "tiny"]
BAD_SCALES = [name for name in SCALES if name not in GOOD_SCALES]
FAMILIES = ["mvn-diag", "independent-normal", "normal"]
FUNCTIONS = {  # name -> how its distribution (or its loc and scale) is named in messages
    "elbo": ("`q",), "elbo-score": ("`q",), "iwae": ("`q",), "renyi": ("`q",),
    "elbo-analytic-kl": ("`q",), "importance-sampling": ("`q",),
    "naive-monte-carlo": ("`prior",), "sample-diag-gaussian": ("`loc`", "`scale`"),
    "sample-transformed": ("`base",),
}


def _key(kind):
    return {
        "typed": lambda: jax.random.key(1),
        "raw": lambda: jax.random.PRNGKey(1),
        "typed-batch": lambda: jax.random.split(jax.random.key(1), 2),
        "raw-batch": lambda: jax.random.split(jax.random.PRNGKey(1), 2),
        "int-seed": lambda: 1,
        "float-array": lambda: np.zeros(2, np.float32),
    }[kind]()


def _array(shape, fill, special, position, dtype):
    values = np.full(shape, fill, np.float64)
    values.reshape(-1)[position % values.size] = special
    return jnp.asarray(values, dtype=dtype)


def _family(kind, loc, scale):
    if kind == "mvn-diag":
        return distrax.MultivariateNormalDiag(loc, scale)
    if kind == "independent-normal":
        return distrax.Independent(distrax.Normal(loc, scale), 1)
    return distrax.Normal(loc, scale)  # event shape (): batch is loc's whole shape


def _call(function, family, key, dist, loc, scale):
    """Run ``function``; returns its output arrays."""
    event_axes = 0 if isinstance(dist, distrax.Normal) else 1

    def log_joint(z):
        return -0.5 * (jnp.sum(z * z, axis=-1) if event_axes else z * z)

    if function == "elbo":
        return [velbo.elbo(key, log_joint, dist, num_samples=2)]
    if function == "elbo-score":
        return [velbo.elbo(key, log_joint, dist, num_samples=2,
                           estimator=velbo.ScoreFunction(velbo.LeaveOneOut()))]
    if function == "iwae":
        return [velbo.iwae_bound(key, log_joint, dist, num_samples=2,
                                 estimator=velbo.DReG())]
    if function == "renyi":
        return [velbo.renyi_bound(key, log_joint, dist, alpha=0.5, num_samples=2)]
    if function == "elbo-analytic-kl":
        dim = loc.shape[-1]
        prior = _family(family, jnp.zeros((dim,), jnp.float32), jnp.ones((dim,), jnp.float32))
        return [velbo.elbo_analytic_kl(key, log_joint, dist, prior)]
    if function == "importance-sampling":
        return [marginal.importance_sampling(key, log_joint, dist, num_samples=3,
                                             chunk_size=2)]
    if function == "naive-monte-carlo":
        return [marginal.naive_monte_carlo(key, log_joint, dist, num_samples=2)]
    if function == "sample-diag-gaussian":
        return list(reparam.sample_diag_gaussian(key, loc, scale, sample_shape=(2,)))
    bijector = distrax.Block(distrax.Tanh(), 1) if event_axes else distrax.Tanh()
    return list(reparam.sample_transformed(key, dist, bijector, sample_shape=(2,)))


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(function=st.sampled_from(list(FUNCTIONS)), family=st.sampled_from(FAMILIES),
       dim=st.integers(1, 2), dtype=st.sampled_from(["float32", "bfloat16"]),
       broken=st.sampled_from(["nothing", "nothing", "nothing", "rng_key", "loc", "scale",
                               "dtype"]),
       good_key=st.sampled_from(GOOD_KEYS), bad_key=st.sampled_from(BAD_KEYS),
       bad_loc=st.sampled_from([k for k in LOCS if k != "ok"]),
       good_scale=st.sampled_from(GOOD_SCALES), bad_scale=st.sampled_from(BAD_SCALES),
       position=st.integers(0, 3))
def test_a_named_error_or_a_finite_result(function, family, dim, dtype, broken, good_key,
                                          bad_key, bad_loc, good_scale, bad_scale, position):
    if function == "sample-diag-gaussian":
        family = "mvn-diag"  # loc and scale are passed as arrays
    shape = (2, dim)
    loc = _array(shape, LOCS["ok"], LOCS[bad_loc if broken == "loc" else "ok"], position, dtype)
    scale = _array(shape, SCALES["ok"], SCALES[bad_scale if broken == "scale" else good_scale],
                   position + 1, dtype)
    dist = _family(family, loc, scale)
    if broken == "dtype":  # leaves cast after construction (distrax's own check bypassed)
        dist = jax.tree.map(lambda a: a > 0, dist)
        loc, scale = loc > 0, scale > 0
    key = _key(bad_key if broken == "rng_key" else good_key)
    try:
        outputs = _call(function, family, key, dist, loc, scale)
    except (TypeError, ValueError) as err:
        assert broken != "nothing", f"valid arguments refused: {err!r}"
        names = ("rng_key",) if broken == "rng_key" else FUNCTIONS[function]
        assert any(name in str(err) for name in names), (
            f"{type(err).__name__} does not name {' or '.join(names)}: {err}")
        return
    assert broken == "nothing", f"bad {broken} accepted: {[np.asarray(o) for o in outputs]}"
    for out in outputs:
        values = np.asarray(out, dtype=np.float64)
        assert values.size and np.isfinite(values).all(), values
