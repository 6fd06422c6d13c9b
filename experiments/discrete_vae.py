"""A categorical VAE on MNIST trained with each discrete-latent gradient estimator, side by side.

Model (one stochastic layer, uniform categorical prior, Bernoulli decoder):

* encoder: MLP 784-200-200 (tanh) -> logits ``[batch, N, K]`` of N independent K-way
  categorical latents, q(z | x) = prod_n Cat(z_n | softmax(logits_n)); N = 20, K = 10 as in
  Jang, Gu & Poole (2017);
* prior: p(z) = prod_n Cat(z_n | 1/K) (uniform);
* decoder: MLP (N K)-200-200-784 (tanh) on the flattened one-hot z, Bernoulli pixels
  (:class:`vijax.nn.BernoulliDecoder`, output bias = logit of the training-pixel mean);
* data: dynamically binarized MNIST for training, the test set binarized once (seed 0).

Estimators (every bound is computed by :mod:`vijax.elbo`):

* ``score_loo``: ``elbo_analytic_kl`` with q = ``Independent(OneHotCategorical)``, the KL to
  the uniform prior in closed form, the likelihood term's gradient by the score function with
  the leave-one-out baseline (``ScoreFunction(LeaveOneOut())``, ``--sf-samples`` samples);
* ``gumbel_softmax``: the relaxed model of Maddison, Mnih & Teh (2017): q and the prior are
  both Concrete (``RelaxedOneHotCategorical``) at the same temperature, ``elbo`` with the
  pathwise gradient; temperature annealed as Jang et al. (2017),
  tau_t = max(tau_min, exp(-r t)) per step t, with r set so that tau reaches tau_min after
  two thirds of the steps;
* ``gumbel_softmax_catkl``: the variant of Jang et al. (2017): the likelihood term at a
  relaxed draw (pathwise), minus the closed-form KL of the *categorical* q to the uniform
  prior; same schedule;
* ``straight_through``: ``StraightThroughOneHotCategorical`` (hard one-hot forward value,
  relaxed backward pass, same schedule), ``elbo`` with the pathwise gradient;
* ``enumerate``: exact expectation (``Enumerate()``) on a smaller latent, one categorical of
  K = 10 classes (10 decoder passes per example);
* ``rebar``: ``elbo`` with q = ``Independent(OneHotCategorical)`` and ``REBAR`` (Tucker et al.
  2017): the score function with the Concrete relaxation as control variate, unbiased; its
  temperature and eta are tuned by ``vijax.elbo.tune_rebar`` (minimising the encoder
  gradient's variance at the current parameters on one training batch) before training and,
  with ``--rebar-retune-every N``, every N epochs, or, with ``--rebar-online-lr LR``, adapted
  at every step as in the paper (Adam on log temperature and eta along the gradient of that
  step's squared encoder-gradient norm). Three decoder passes per example and step (online:
  the variance gradient's second-order pass on top).

Every model is evaluated the same way, as the *discrete* model: the test ELBO with hard
categorical samples (exact for ``enumerate``), log p(x) by importance sampling with the
discrete q as proposal (``vijax.marginal.importance_sampling``; also exact for ``enumerate``),
the wall time per epoch, and the total variance sum_j Var(g_j) of the encoder-parameter
gradient over ``--grad-reps`` keys on one fixed batch of 100 test images, after the first and
the last epoch. On the one-categorical model, where the exact gradient is known, every
estimator's gradient is also compared with it (bias and variance at the same parameters).

The default budget (3 epochs per estimator, k = 5000 on the first 300 test images) runs in
about 20 minutes on a shared 2-core CPU: far shorter than the papers' training, so the numbers
compare the estimators at equal, small budgets, not against the published optima.

Usage::

    python experiments/discrete_vae.py --out outputs/discrete_vae
    python experiments/discrete_vae.py --quick --out /tmp/discrete_quick   # < 1 minute

Outputs in ``--out``: ``results.json`` (date, CPU, command, versions, all numbers),
``samples.png`` (decoded prior samples), ``training_curves.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import _cli  # noqa: E402  (experiments/_cli.py: sys.path[0] when run as a script)
from vijax import data as vdata  # noqa: E402
from vijax import discrete  # noqa: E402
from vijax import elbo as velbo  # noqa: E402
from vijax import marginal  # noqa: E402
from vijax import nn as vnn  # noqa: E402
from vijax import vae  # noqa: E402

REPO_ROOT = _cli.REPO_ROOT
ESTIMATORS = ("score_loo", "gumbel_softmax", "gumbel_softmax_catkl", "straight_through",
              "enumerate", "rebar")
RELAXED = ("gumbel_softmax", "gumbel_softmax_catkl", "straight_through")
LABELS = {"score_loo": "score function + leave-one-out",
          "gumbel_softmax": "Gumbel-softmax, relaxed q and prior",
          "gumbel_softmax_catkl": "Gumbel-softmax, categorical KL",
          "straight_through": "straight-through Gumbel",
          "enumerate": "exact enumeration",
          "rebar": "REBAR, temperature and eta tuned"}
HIDDEN = (200, 200)
DATA_DIM = 784


# ------------------------------------------------------------------------------------- model


class Encoder(nn.Module):
    """MLP -> logits ``[..., num_latents, num_classes]``."""

    num_latents: int
    num_classes: int
    hidden_sizes: tuple = HIDDEN

    @nn.compact
    def __call__(self, x):
        h = vnn.MLP(self.hidden_sizes, name="mlp")(x)
        out = nn.Dense(self.num_latents * self.num_classes, name="logits")(h)
        return out.reshape(out.shape[:-1] + (self.num_latents, self.num_classes))


class CategoricalVAE(nn.Module):
    encoder: Encoder
    decoder: vnn.BernoulliDecoder

    def __call__(self, x):  # creates every parameter (used by init)
        logits = self.encoder(x)
        return self.decoder(jax.nn.softmax(logits).reshape(logits.shape[:-2] + (-1,)))

    def encode(self, x):
        return self.encoder(x)

    def log_likelihood(self, z_flat, x):
        return self.decoder.log_likelihood(z_flat, x)

    def decode_mean(self, z_flat):
        return self.decoder.mean(z_flat)


def make_model(num_latents: int, num_classes: int, bias_init) -> CategoricalVAE:
    return CategoricalVAE(Encoder(num_latents, num_classes),
                          vnn.BernoulliDecoder(HIDDEN[::-1], DATA_DIM,
                                               output_bias_init=bias_init))


def _log_likelihood_fn(model, params, x, n, k):
    """``z [batch, N, K] -> log p(x | z) [batch]`` (z one-hot, relaxed or straight-through)."""

    def log_lik(z):
        flat = z.reshape(z.shape[:-2] + (n * k,)).astype(x.dtype)
        return model.apply(params, flat, x, method=CategoricalVAE.log_likelihood)

    return log_lik


def _discrete_q_and_prior(logits):
    n, k = logits.shape[-2:]
    q = distrax.Independent(distrax.OneHotCategorical(logits=logits), 1)
    prior = distrax.Independent(
        distrax.OneHotCategorical(logits=jnp.zeros((n, k), logits.dtype)), 1)
    return q, prior


def bound(kind: str, model, params, x, key, tau, sf_samples: int,
          rebar: velbo.REBAR | None = None):
    """Per-example training objective ``[batch]`` (nats) of estimator ``kind``; its gradient
    is that estimator's (``rebar``: the REBAR estimator of kind ``"rebar"``)."""
    logits = model.apply(params, x, method=CategoricalVAE.encode)
    n, k = logits.shape[-2:]
    log_lik = _log_likelihood_fn(model, params, x, n, k)
    log_prior = -n * math.log(k)  # uniform prior, any one-hot z
    if kind == "score_loo":
        q, prior = _discrete_q_and_prior(logits)
        return velbo.elbo_analytic_kl(key, log_lik, q, prior, num_samples=sf_samples,
                                      estimator=velbo.ScoreFunction(velbo.LeaveOneOut()))
    if kind == "gumbel_softmax":
        q = distrax.Independent(discrete.RelaxedOneHotCategorical(tau, logits), 1)
        prior = distrax.Independent(
            discrete.RelaxedOneHotCategorical(tau, jnp.zeros((n, k), logits.dtype)), 1)
        tiny = jnp.finfo(logits.dtype).tiny

        def log_joint(y):
            # the prior's density is read from y itself, where a coordinate may have
            # underflowed to 0: floored at the smallest normal float (as log_prob also does)
            return log_lik(y) + prior.log_prob(jnp.maximum(y, tiny))

        return velbo.elbo(key, log_joint, q)
    if kind == "gumbel_softmax_catkl":
        # E_{y ~ Concrete(tau, logits)} log p(x | y) - KL(Cat(logits) || uniform): the
        # likelihood term pathwise through the relaxed draw, the KL of the discrete q in closed
        # form (no vijax bound takes a relaxed q with a categorical KL, so it is written out)
        y = distrax.Independent(discrete.RelaxedOneHotCategorical(tau, logits), 1).sample(
            seed=key)
        q, prior = _discrete_q_and_prior(logits)
        with jax.numpy_rank_promotion("allow"):  # distrax broadcasts the batch-[] prior
            kl = q.kl_divergence(prior)
        return log_lik(y) - kl
    if kind == "straight_through":
        q = distrax.Independent(discrete.StraightThroughOneHotCategorical(tau, logits), 1)
        return velbo.elbo(key, lambda z: log_lik(z) + log_prior, q)
    if kind == "enumerate":
        q = distrax.OneHotCategorical(logits=logits[:, 0])
        return velbo.elbo(key, lambda z: log_lik(z[:, None, :]) + log_prior, q,
                          estimator=velbo.Enumerate())
    if kind == "rebar":
        # the ELBO of hard one-hot draws; the uniform prior's log mass, extended to the relaxed
        # points as sum_k x_k log(1/K), is the same constant there
        q, _ = _discrete_q_and_prior(logits)
        return velbo.elbo(key, lambda z: log_lik(z) + log_prior, q,
                          estimator=velbo.REBAR() if rebar is None else rebar)
    raise ValueError(kind)


def _rebar_problem(model, params, x):
    """``(log_joint_fn, q_fn)`` of ``vijax.elbo.rebar_gradient_variance`` on the minibatch
    ``x``: the decoder's log p(x, z) at ``params``, and ``params -> q(z | x)``."""
    n, k = model.apply(params, x[:1], method=CategoricalVAE.encode).shape[-2:]
    log_lik = _log_likelihood_fn(model, params, x, n, k)

    def log_joint(z):
        return log_lik(z) - n * math.log(k)

    def q_fn(p):
        return _discrete_q_and_prior(model.apply(p, x, method=CategoricalVAE.encode))[0]

    return log_joint, q_fn


def tune_rebar(model, params, x, key, num_steps: int, num_samples: int):
    """``(REBAR, variance before, variance after)``: temperature and eta tuned by
    ``vijax.elbo.tune_rebar`` at ``params`` on the minibatch ``x`` (the total variance of the
    encoder gradient, sum_j Var(g_j), is E||g||^2 less ||E g||^2, which does not depend on
    them; both E||g||^2 are measured on 64 common keys)."""
    log_joint, q_fn = _rebar_problem(model, params, x)
    k_tune, k_measure = jax.random.split(key)
    tuned = velbo.tune_rebar(k_tune, log_joint, q_fn, params, num_steps=num_steps,
                             num_samples=num_samples)
    measure = jax.jit(lambda lam, eta: velbo.rebar_gradient_variance(
        k_measure, log_joint, q_fn, params, temperature=lam, eta=eta, num_samples=64))
    before = float(measure(velbo.REBAR().temperature, velbo.REBAR().eta))
    after = float(measure(tuned.temperature, tuned.eta))
    return tuned, before, after


# ------------------------------------------------------------------------------- training


def temperature(step, rate: float, tau_min: float):
    return jnp.maximum(tau_min, jnp.exp(-rate * step.astype(jnp.float32)))


def rebar_online_estimator(hyper) -> velbo.REBAR:
    """REBAR at the carried ``hyper = [log temperature, eta]`` (JAX scalars, traced inside the
    train step)."""
    return velbo.REBAR(temperature=jnp.exp(hyper[0]), eta=hyper[1])


def make_train_epoch(kind, model, optimizer, batch_size, rate, tau_min, sf_samples, rebar=None,
                     rebar_optimizer=None):
    """``(carry, images, key) -> (carry, losses [steps])``, one epoch of ``lax.scan``; carry
    ``(params, opt_state, step)``. With ``rebar_optimizer`` (kind ``rebar`` only), REBAR's
    temperature and eta are adapted online, as Tucker et al. (2017, §3): the carry also holds
    ``hyper = [log temperature, eta]`` and ``rebar_optimizer``'s state, and each step, after
    the model update with REBAR at the current ``hyper``, moves ``hyper`` along the gradient of
    the squared norm of that same step's encoder gradient (``rebar_gradient_variance`` at the
    step's key, one sample): an unbiased estimate of the gradient of the estimator's variance,
    since E g does not depend on them. ``hyper`` is read before it is updated, so each step's
    gradient stays unbiased."""
    if rebar_optimizer is not None and kind != "rebar":
        raise ValueError("online adaptation is for kind 'rebar'")

    def loss_fn(params, x, key, tau, estimator):
        return -jnp.mean(bound(kind, model, params, x, key, tau, sf_samples, estimator))

    grad_fn = jax.value_and_grad(loss_fn)

    def squared_norm(hyper, params, x, key):  # ||g||^2 of the encoder gradient (batch sum)
        log_joint, q_fn = _rebar_problem(model, params, x)
        estimator = rebar_online_estimator(hyper)
        return velbo.rebar_gradient_variance(key, log_joint, q_fn, params,
                                             temperature=estimator.temperature,
                                             eta=estimator.eta, num_samples=1)

    def train_epoch(carry, images, key):
        indices, step_keys = vae.epoch_plan(key, images.shape[0], batch_size)

        def body(carry, inputs):
            params, opt_state, step = carry[:3]
            idx, keys = inputs
            x = vdata.dynamic_binarize(keys[0], jnp.take(images, idx, axis=0))
            tau = temperature(step, rate, tau_min)
            if rebar_optimizer is None:
                loss, grads = grad_fn(params, x, keys[1], tau, rebar)
                extra = ()
            else:
                hyper, hyper_state = carry[3:]
                loss, grads = grad_fn(params, x, keys[1], tau, rebar_online_estimator(hyper))
                hyper_grad = jax.grad(squared_norm)(hyper, params, x, keys[1])
                hyper_updates, hyper_state = rebar_optimizer.update(hyper_grad, hyper_state,
                                                                    hyper)
                extra = (optax.apply_updates(hyper, hyper_updates), hyper_state)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, step + 1) + extra, loss

        return jax.lax.scan(body, carry, (indices, step_keys))

    return train_epoch


# ----------------------------------------------------------------------------- evaluation


def _batched(fn, x, batch_size, key):
    """``fn(x_batch, key) -> pytree of [batch_size]`` over the rows of ``x`` (``lax.map``)."""
    nb = x.shape[0] // batch_size
    xb = x.reshape((nb, batch_size) + x.shape[1:])
    out = jax.lax.map(lambda a: fn(*a), (xb, jax.random.split(key, nb)))
    return jax.tree.map(lambda a: a.reshape(-1), out)


def make_test_elbo(model, eval_batch: int):
    """``(params, x [N, D], key) -> dict of [N]``: the discrete test ELBO with one hard sample
    per image and the KL in closed form (for a one-categorical model also the exact ELBO and
    the exact log p(x), summing over the K classes)."""

    def one(params, x, key):
        logits = model.apply(params, x, method=CategoricalVAE.encode)
        n, k = logits.shape[-2:]
        log_lik = _log_likelihood_fn(model, params, x, n, k)
        q, prior = _discrete_q_and_prior(logits)
        # the value does not depend on the estimator; ScoreFunction() accepts a discrete q
        out = {"elbo": velbo.elbo_analytic_kl(key, log_lik, q, prior,
                                              estimator=velbo.ScoreFunction())}
        if n == 1:
            log_prior = -math.log(k)
            q1 = distrax.OneHotCategorical(logits=logits[:, 0])
            out["elbo_exact"] = velbo.elbo(key, lambda z: log_lik(z[:, None]) + log_prior, q1,
                                           estimator=velbo.Enumerate())
            eye = jnp.eye(k, dtype=x.dtype)
            per_class = jax.vmap(lambda z: log_lik(jnp.broadcast_to(z, (x.shape[0], 1, k))))(eye)
            out["log_px_exact"] = jax.nn.logsumexp(per_class, axis=0) + log_prior
        return out

    return lambda params, x, key: _batched(lambda xb, kb: one(params, xb, kb), x, eval_batch,
                                           key)


def make_log_px_is(model, eval_batch: int, num_samples: int, chunk: int):
    """``(params, x [N, D], key) -> [N]`` log p(x) by importance sampling with the discrete q
    as proposal (``vijax.marginal.importance_sampling``)."""

    def one(params, x, key):
        logits = model.apply(params, x, method=CategoricalVAE.encode)
        n, k = logits.shape[-2:]
        log_lik = _log_likelihood_fn(model, params, x, n, k)
        q, _ = _discrete_q_and_prior(logits)
        return marginal.importance_sampling(key, lambda z: log_lik(z) - n * math.log(k), q,
                                            num_samples=num_samples,
                                            chunk_size=min(chunk, num_samples))

    return lambda params, x, key: _batched(lambda xb, kb: one(params, xb, kb), x, eval_batch,
                                           key)


def _flat(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.concatenate([a.reshape(a.shape[0], -1) for a in leaves], axis=1)


def make_encoder_gradients(kind, model, sf_samples, rebar=None):
    """``(params, x, keys, tau) -> [R, P]`` encoder-parameter gradients of the minibatch loss,
    one row per key (the estimator's own objective)."""

    def grads(params, x, keys, tau):
        def one(key):
            g = jax.grad(lambda p: -jnp.mean(bound(kind, model, p, x, key, tau, sf_samples,
                                                   rebar)))(params)
            return g["params"]["encoder"]

        return _flat(jax.lax.map(one, keys))

    return grads


def gradient_stats(g: np.ndarray, exact: np.ndarray | None = None) -> dict:
    g = np.asarray(g, np.float64)
    mean = g.mean(0)
    out = {"total_variance": float(g.var(0, ddof=1).sum()),
           "mean_grad_sq_norm": float(mean @ mean), "reps": int(g.shape[0])}
    if exact is not None:
        err = mean - exact
        # E||mean - exact||^2 = ||bias||^2 + tr(Cov) / R: subtract the Monte Carlo part
        bias_sq = float(err @ err) - out["total_variance"] / g.shape[0]
        out["exact_grad_sq_norm"] = float(exact @ exact)
        out["bias_sq_norm_estimate"] = bias_sq
        out["relative_bias"] = math.sqrt(max(bias_sq, 0.0) / float(exact @ exact))
        cos = float(mean @ exact) / math.sqrt(float(mean @ mean) * float(exact @ exact))
        out["cosine_mean_vs_exact"] = cos
    return out


# -------------------------------------------------------------------------------- figures


def plot_samples(models_params: dict, path: pathlib.Path, key) -> None:
    kinds = list(models_params)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8, 1.25 * len(kinds) + 0.4))
    axes = np.atleast_1d(axes)
    for ax, kind in zip(axes, kinds):
        model, params, n, k = models_params[kind]
        cls = jax.random.randint(jax.random.fold_in(key, n), (16, n), 0, k)
        z = jax.nn.one_hot(cls, k).reshape(16, n * k)
        img = np.asarray(model.apply(params, z, method=CategoricalVAE.decode_mean))
        ax.imshow(np.hstack(img.reshape(16, 28, 28)), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(f"{LABELS[kind]} ({n} x {k} latent): E[x | z], z ~ uniform prior",
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curves: dict, path: pathlib.Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind, c in curves.items():
        steps = np.arange(1, len(c["train_objective_per_step"]) + 1)
        obj = np.asarray(c["train_objective_per_step"])
        w = max(1, len(obj) // 50)
        smooth = np.convolve(obj, np.ones(w) / w, mode="valid")
        ax1.plot(steps[w - 1:], smooth, label=LABELS[kind])
        ax2.plot(np.arange(1, len(c["test_elbo_per_epoch"]) + 1), c["test_elbo_per_epoch"],
                 "o-", label=LABELS[kind])
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training objective (nats, running mean)")
    ax1.set_title("training objective (relaxed for Gumbel-softmax)", fontsize=9)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test ELBO, discrete z (nats)")
    ax2.set_title("test ELBO (1 hard sample per image)", fontsize=9)
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main


def make_parser() -> argparse.ArgumentParser:
    p = _cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "outputs" / "discrete_vae",
                   help="output folder (default outputs/discrete_vae)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST IDX files (default: vijax.data.load_mnist's)")
    p.add_argument("--quick", action="store_true",
                   help="a < 1 minute smoke run (2000 images, 1 epoch, small evaluation)")
    p.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help=f"comma-separated subset of {','.join(ESTIMATORS)}")
    p.add_argument("--epochs", type=int, default=None, help="epochs per estimator (default 3)")
    p.add_argument("--num-train", type=int, default=None,
                   help="first N training images (default all 60000)")
    p.add_argument("--num-latents", type=int, default=20, help="N categorical latents (20)")
    p.add_argument("--num-classes", type=int, default=10, help="K classes each (10)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--sf-samples", type=int, default=4,
                   help="samples of the score-function estimator (>= 2, default 4)")
    p.add_argument("--tau-min", type=float, default=0.5,
                   help="final temperature of the annealing (default 0.5, as Jang et al.)")
    p.add_argument("--eval-num-test", type=int, default=None,
                   help="test images for the importance-sampling log p(x) (default 300)")
    p.add_argument("--eval-num-samples", type=int, default=None,
                   help="k of the importance-sampling log p(x) (default 5000)")
    p.add_argument("--grad-reps", type=int, default=None,
                   help="keys for the gradient-variance estimates (default 32)")
    p.add_argument("--rebar-tune-steps", type=int, default=None,
                   help="Adam steps of REBAR's temperature/eta tuning (default 200; 20 with "
                        "--quick)")
    p.add_argument("--rebar-retune-every", type=int, default=0,
                   help="re-tune REBAR's temperature/eta every N epochs at the current "
                        "parameters (default 0: only before training)")
    p.add_argument("--rebar-online-lr", type=float, default=0.0,
                   help="adapt REBAR's log temperature and eta at every step by Adam with this "
                        "learning rate on the gradient of the step's squared encoder-gradient "
                        "norm (Tucker et al. 2017, sec. 3), starting from the values tuned "
                        "before training (default 0: off)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _check_args(p, args) -> list[str]:
    kinds = [s.strip() for s in args.estimators.split(",") if s.strip()]
    bad = [s for s in kinds if s not in ESTIMATORS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        p.error(f"--estimators takes distinct names among {','.join(ESTIMATORS)}; "
                f"got {args.estimators!r}")
    quick = args.quick
    defaults = dict(epochs=1 if quick else 3, num_train=2000 if quick else 60000,
                    eval_num_test=50 if quick else 300, eval_num_samples=200 if quick else 5000,
                    grad_reps=4 if quick else 32, rebar_tune_steps=20 if quick else 200)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("epochs", "num_train", "num_latents", "batch_size", "eval_num_test",
                 "eval_num_samples", "rebar_tune_steps", "rebar_retune_every", "seed"):
        minimum = 0 if name in ("seed", "rebar_retune_every") else 1
        if getattr(args, name) < minimum:
            p.error(f"--{name.replace('_', '-')} must be >= {minimum}; got {getattr(args, name)}")
    if args.num_classes < 2:
        p.error(f"--num-classes must be >= 2; got {args.num_classes}")
    if args.grad_reps < 2:
        p.error(f"--grad-reps must be >= 2; got {args.grad_reps}")
    if args.sf_samples < 2:
        p.error(f"--sf-samples must be >= 2 (the leave-one-out baseline); got {args.sf_samples}")
    for name in ("learning_rate", "tau_min"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number > 0; got {value}")
    if not (math.isfinite(args.rebar_online_lr) and args.rebar_online_lr >= 0):
        p.error(f"--rebar-online-lr must be a finite number >= 0; got {args.rebar_online_lr}")
    if args.rebar_online_lr > 0 and args.rebar_retune_every:
        p.error("--rebar-online-lr and --rebar-retune-every are alternatives; give one")
    if args.tau_min >= 1:
        p.error(f"--tau-min must be < 1 (the schedule starts at 1); got {args.tau_min}")
    if not 1 <= args.num_train <= 60000 or args.num_train < args.batch_size:
        p.error(f"--num-train must be in [--batch-size, 60000]; got {args.num_train}")
    if args.eval_num_test > 10000 or args.eval_num_test % 50:
        p.error(f"--eval-num-test must be a multiple of 50 and <= 10000; got {args.eval_num_test}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file")
    return kinds


def main(argv=None) -> dict:
    p = make_parser()
    args = p.parse_args(argv)
    kinds = _check_args(p, args)
    if args.quick and "XLA_FLAGS" not in os.environ:
        # a smoke run is dominated by compilation: skip XLA's backend optimisation (set before
        # the first computation creates the CPU client)
        os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    try:  # read before anything is written
        mnist = vdata.load_mnist(args.data_dir)
    except (FileNotFoundError, ValueError) as err:
        p.error(f"--data-dir: {err}")
    started, cpu_started = time.perf_counter(), time.process_time()
    load_before = os.getloadavg()[0]
    train = jnp.asarray(mnist.train_images[: args.num_train])
    test_bin = vdata.fixed_binarize(mnist.test_images, seed=0)
    elbo_test = jnp.asarray(test_bin[: 1000 if args.quick else 10000])
    is_test = jnp.asarray(test_bin[: args.eval_num_test])
    grad_batch = jnp.asarray(test_bin[:100])
    bias_init = vnn.pixel_mean_logit(train)
    steps_per_epoch = args.num_train // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    rate = math.log(1.0 / args.tau_min) / max(1.0, (2.0 / 3.0) * total_steps)
    optimizer = optax.adam(args.learning_rate)
    key = jax.random.key(args.seed)

    results: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    trained: dict[str, Any] = {}
    for kind in kinds:
        n, k = (1, args.num_classes) if kind == "enumerate" else (args.num_latents,
                                                                   args.num_classes)
        model = make_model(n, k, bias_init)
        # keys by the estimator's place in ESTIMATORS: a run of a subset gives the same numbers
        k_init, k_train, k_eval, k_grad = jax.random.split(
            jax.random.fold_in(key, ESTIMATORS.index(kind)), 4)
        params = model.init(k_init, train[:1])
        rebar, rebar_info = None, None

        def retune(params, epoch):
            """REBAR tuned at ``params`` on one training batch (``epoch`` 0: the initial
            parameters); appended to ``rebar_info["tunings"]``."""
            t0 = time.perf_counter()
            batch = vdata.dynamic_binarize(jax.random.fold_in(k_grad, 1000 + epoch),
                                           train[: args.batch_size])
            tuned, var_before, var_after = tune_rebar(
                model, params, batch, jax.random.fold_in(k_grad, 2000 + epoch),
                args.rebar_tune_steps, 4 if args.quick else 16)
            rebar_info["tunings"].append({
                "after_epoch": epoch, "temperature": tuned.temperature, "eta": tuned.eta,
                "mean_squared_gradient_norm_default": var_before,
                "mean_squared_gradient_norm_tuned": var_after,
                "tune_wall_s": time.perf_counter() - t0})
            print(f"rebar: tuned after epoch {epoch}: temperature {tuned.temperature:.3f}, eta "
                  f"{tuned.eta:.3f}; E||g||^2 at (0.5, 1) {var_before:.4g}, tuned "
                  f"{var_after:.4g}", flush=True)
            return tuned

        online = kind == "rebar" and args.rebar_online_lr > 0
        rebar_optimizer = optax.adam(args.rebar_online_lr) if online else None
        if kind == "rebar":  # tuned at the initial parameters, then every --rebar-retune-every
            # epochs or (--rebar-online-lr) at every step
            rebar_info = {"tune_steps": args.rebar_tune_steps,
                          "retune_every": args.rebar_retune_every, "tunings": []}
            rebar = retune(params, 0)
        carry = (params, optimizer.init(params), jnp.zeros((), jnp.int32))
        if online:
            hyper = jnp.array([math.log(rebar.temperature), rebar.eta], jnp.float32)
            carry = carry + (hyper, rebar_optimizer.init(hyper))
            rebar_info["online"] = {"learning_rate": args.rebar_online_lr, "per_epoch": []}
        epoch_fn = jax.jit(make_train_epoch(kind, model, optimizer, args.batch_size, rate,
                                            args.tau_min, args.sf_samples, rebar,
                                            rebar_optimizer))
        grads_fn = jax.jit(make_encoder_gradients(kind, model, args.sf_samples, rebar))
        test_elbo_fn = jax.jit(make_test_elbo(model, 100))
        log_px_is_fn = jax.jit(make_log_px_is(model, 50, args.eval_num_samples, 100))
        t0 = time.perf_counter()
        compiled = epoch_fn.lower(carry, train, k_train).compile()
        compile_s = time.perf_counter() - t0
        epoch_s, step_obj, test_curve, grad_ckpt = [], [], [], {}
        grad_keys = jax.random.split(k_grad, args.grad_reps)
        for epoch in range(1, args.epochs + 1):
            if (rebar is not None and args.rebar_retune_every and epoch > 1
                    and (epoch - 1) % args.rebar_retune_every == 0):
                rebar = retune(carry[0], epoch - 1)  # a new estimator: compile its epoch
                epoch_fn = jax.jit(make_train_epoch(kind, model, optimizer, args.batch_size,
                                                    rate, args.tau_min, args.sf_samples, rebar))
                grads_fn = jax.jit(make_encoder_gradients(kind, model, args.sf_samples, rebar))
                compiled = epoch_fn.lower(carry, train, k_train).compile()
            t0 = time.perf_counter()
            carry, losses = compiled(carry, train, jax.random.fold_in(k_train, epoch))
            losses = np.asarray(jax.block_until_ready(losses))
            epoch_s.append(time.perf_counter() - t0)
            if not np.all(np.isfinite(losses)):
                raise FloatingPointError(f"{kind}: non-finite loss in epoch {epoch}")
            step_obj.extend((-losses).tolist())
            if online:  # the estimator the next step will use; the gradient checkpoints too
                log_lam, eta = (float(v) for v in carry[3])
                rebar = velbo.REBAR(temperature=math.exp(log_lam), eta=eta)
                rebar_info["online"]["per_epoch"].append(
                    {"epoch": epoch, "temperature": rebar.temperature, "eta": rebar.eta})
                print(f"rebar: after epoch {epoch}: temperature {rebar.temperature:.3f}, eta "
                      f"{rebar.eta:.3f}", flush=True)
            ev = jax.tree.map(np.asarray, test_elbo_fn(carry[0], elbo_test,
                                                       jax.random.fold_in(k_eval, epoch)))
            test_curve.append(float(ev["elbo"].mean()))
            if epoch in (1, args.epochs):
                tau = temperature(carry[2], rate, args.tau_min)
                if online:  # at the adapted temperature and eta
                    grads_fn = jax.jit(make_encoder_gradients(kind, model, args.sf_samples,
                                                              rebar))
                g = np.asarray(grads_fn(carry[0], grad_batch, grad_keys, tau))
                grad_ckpt[f"epoch_{epoch}"] = {**gradient_stats(g), "temperature": float(tau)}
            print(f"{kind}: epoch {epoch}/{args.epochs} {epoch_s[-1]:.1f} s, train objective "
                  f"{-losses.mean():.2f}, test ELBO {test_curve[-1]:.2f}", flush=True)
        params = carry[0]
        t0 = time.perf_counter()
        log_px = np.asarray(log_px_is_fn(params, is_test, k_eval))
        eval_s = time.perf_counter() - t0
        row = {
            "label": LABELS[kind], "latent": f"{n} x {k}", "epochs": args.epochs,
            "steps": int(carry[2]), "final_temperature": (float(temperature(
                carry[2], rate, args.tau_min)) if kind in RELAXED else None),
            "test_elbo": float(ev["elbo"].mean()),  # 1 hard sample per image
            "test_elbo_se": float(ev["elbo"].std(ddof=1) / math.sqrt(ev["elbo"].size)),
            "test_elbo_num_images": int(ev["elbo"].size),
            "test_nll_is": float(-log_px.mean()),
            "test_nll_is_se": float(log_px.std(ddof=1) / math.sqrt(log_px.size)),
            "test_nll_num_images": int(log_px.size),
            "is_num_samples": args.eval_num_samples,
            "compile_s": compile_s, "epoch_wall_s": epoch_s,
            "epoch_wall_s_mean": float(np.mean(epoch_s)), "eval_wall_s": eval_s,
            "encoder_gradient": grad_ckpt,
        }
        if rebar_info is not None:
            row["rebar"] = rebar_info
        if "elbo_exact" in ev:
            row["test_elbo_exact"] = float(ev["elbo_exact"].mean())
            row["test_nll_exact"] = float(-ev["log_px_exact"].mean())
            row["test_nll_exact_is_subset"] = float(
                -ev["log_px_exact"][: log_px.size].mean())
        results[kind] = row
        curves[kind] = {"train_objective_per_step": step_obj, "test_elbo_per_epoch": test_curve}
        trained[kind] = (model, params, n, k)
        print(json.dumps({kind: {k_: v for k_, v in row.items() if k_ != "epoch_wall_s"}}),
              flush=True)

    # every estimator's gradient against the exact one, at the same parameters (the trained
    # one-categorical model; the relaxed ones at tau_min)
    comparison = {}
    if "enumerate" in trained:
        model, params, n, k = trained["enumerate"]
        keys = jax.random.split(jax.random.fold_in(key, 99), args.grad_reps * 4)
        exact = np.asarray(jax.jit(make_encoder_gradients("enumerate", model, 2))(
            params, grad_batch, keys[:1], jnp.float32(1.0)))[0].astype(np.float64)
        for kind in ("score_loo",) + RELAXED + ("rebar",):
            g = jax.jit(make_encoder_gradients(kind, model, args.sf_samples))(
                params, grad_batch, keys, jnp.float32(args.tau_min))
            comparison[kind] = gradient_stats(np.asarray(g), exact)
        if not args.quick:  # REBAR tuned at these parameters on this batch (the --quick run
            # tunes it before training; a second tuning would compile the tuning loop again)
            tuned, _, _ = tune_rebar(model, params, grad_batch, jax.random.fold_in(key, 98),
                                     args.rebar_tune_steps, 16)
            g = jax.jit(make_encoder_gradients("rebar", model, args.sf_samples, tuned))(
                params, grad_batch, keys, jnp.float32(args.tau_min))
            comparison["rebar_tuned"] = {**gradient_stats(np.asarray(g), exact),
                                         "temperature": tuned.temperature, "eta": tuned.eta}
        comparison["_setup"] = (f"trained exact-enumeration model (1 x {k}); fixed batch of 100 "
                                f"test images; {len(keys)} keys; relaxed estimators at "
                                f"temperature {args.tau_min}; rebar: REBAR() at its defaults "
                                f"(temperature 0.5, eta 1); rebar_tuned: tuned at these "
                                f"parameters on this batch")

    args.out.mkdir(parents=True, exist_ok=True)
    plot_samples(trained, args.out / "samples.png", jax.random.fold_in(key, 7))
    plot_curves(curves, args.out / "training_curves.png")
    summary = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cli.cpu_model(), "cpu_count": os.cpu_count(),
        "load_average_at_start": load_before,
        "command": _cli.command("discrete_vae.py", argv),
        "jax_version": jax.__version__, "python": platform.python_version(),
        "backend": jax.default_backend(),
        "config": {k_: (str(v) if isinstance(v, pathlib.Path) else v)
                   for k_, v in vars(args).items() if k_ not in ("out", "data_dir")},
        "temperature_schedule": f"tau_t = max({args.tau_min}, exp(-{rate:.3g} t)), t = step",
        "results": results, "gradient_vs_exact": comparison, "curves": curves,
        "total_wall_s": time.perf_counter() - started,
        "total_cpu_s": time.process_time() - cpu_started,
    }
    _cli.write_json(args.out / "results.json", summary)
    for name in ("results.json", "samples.png", "training_curves.png"):
        print("wrote", args.out / name)
    return summary


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as err:
        sys.exit(f"discrete_vae.py: error: {err}")
