"""Flax encoder/decoder networks for variational autoencoders (amortized inference).

The encoder maps a data point ``x`` to the parameters of a diagonal Gaussian
``q(z | x) = N(loc_phi(x), diag(scale_phi(x)^2))``; the decoder maps a latent ``z`` to the
parameters of ``p(x | z)`` (Bernoulli logits or a diagonal Gaussian). Sources: lecture 3,
"Amortized variational inference" and "Variational autoencoder (VAE)"; CENG796 notes, section 2.2
(VAEs) and 4.3 (amortized inference). The default architecture is the one-stochastic-layer MNIST
network of Burda, Grosse and Salakhutdinov, "Importance Weighted Autoencoders" (ICLR 2016,
appendix C): 784-200-200-50 with tanh hidden units, the encoder's standard deviation given by
``exp`` of a linear layer, and the decoder's output bias set to the logit of the training-set
pixel mean.

Shapes: ``data_dim`` = D (784 for MNIST), ``latent_dim`` = L. All modules work on any number of
leading axes (``[..., D]`` in, ``[..., L]`` out), so the same decoder serves ``[batch, L]`` and
``[num_samples, batch, L]`` latents. Parameters are float32 whatever the input's dtype (Flax's
``nn.Dense`` default ``param_dtype``; these modules do not expose ``param_dtype``); outputs have
the promoted dtype of input and parameters (float32 for float32 or bfloat16 input, float64 for
float64 input under ``jax_enable_x64``).

Decoder protocol used by :mod:`vijax.vae`: every decoder has
``log_likelihood(z [..., L], x [..., D]) -> [...]`` = ``log p(x | z)`` summed over the D pixels,
in nats.
"""

from __future__ import annotations

from typing import Callable, Sequence

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vijax._checks import check_callable, check_int, check_int_sequence, check_real

__all__ = [
    "MLP",
    "GaussianEncoder",
    "BernoulliDecoder",
    "GaussianDecoder",
    "VAE",
    "bernoulli_log_likelihood",
    "gaussian_log_likelihood",
    "pixel_mean_logit",
    "standard_normal_prior",
    "iwae_mnist_vae",
]

Activation = Callable[[jax.Array], jax.Array]


@jax.custom_jvp
def _bernoulli_log_prob_terms(logits: jax.Array, x: jax.Array) -> jax.Array:
    """Elementwise ``x l - softplus(l)``; its JVP shares one ``exp`` with the value."""
    return x * logits - (jnp.maximum(logits, 0) + jnp.log1p(jnp.exp(-jnp.abs(logits))))


@_bernoulli_log_prob_terms.defjvp
def _bernoulli_log_prob_terms_jvp(primals, tangents):
    logits, x = primals
    logits_dot, x_dot = tangents
    e = jnp.exp(-jnp.abs(logits))
    value = x * logits - (jnp.maximum(logits, 0) + jnp.log1p(e))
    # sigmoid(l) from the same e = exp(-|l|): 1 / (1 + e) for l >= 0, e / (1 + e) otherwise.
    probs = jnp.where(logits >= 0, jnp.ones_like(e), e) / (1 + e)
    return value, (x - probs) * logits_dot + logits * x_dot


def _check_event_axes(name_to_array: dict) -> int:
    """The common last-axis size D of the arrays of rank >= 1 (scalars broadcast); ValueError
    naming the arrays when their last axes differ (static shapes, so also under ``jit``)."""
    sizes = {name: np.shape(a)[-1] for name, a in name_to_array.items() if np.ndim(a) >= 1}
    if not sizes:
        raise ValueError(f"at least one of {', '.join(name_to_array)} must have rank >= 1 "
                         "(shape [..., D])")
    if len(set(sizes.values())) > 1:
        shapes = ", ".join(f"{name} {tuple(np.shape(name_to_array[name]))}" for name in sizes)
        raise ValueError(f"{', '.join(sizes)} must share the last axis D (only the leading "
                         f"axes broadcast), got shapes {shapes}")
    return next(iter(sizes.values()))


def bernoulli_log_likelihood(logits: jax.Array, x: jax.Array) -> jax.Array:
    """``log p(x | logits) = sum_d [x_d log sigmoid(l_d) + (1 - x_d) log sigmoid(-l_d)]``, in nats.

    Computed as ``sum_d [x_d l_d - softplus(l_d)]`` with
    ``softplus(l) = max(l, 0) + log1p(exp(-|l|))``: the same quantity without overflow or
    cancellation for large ``|l_d|``. The derivative ``d/dl = x - sigmoid(l)`` is supplied by a
    custom JVP that reuses the forward ``exp(-|l|)``, so the training step evaluates two
    transcendentals per pixel instead of the several that autodiff of ``softplus`` emits.
    For binary ``x`` this is the Bernoulli log-probability mass (a log-likelihood, not its
    negative); for ``x`` in [0, 1] it is the negative binary cross-entropy (not a normalised
    density).

    Args:
      logits: ``[..., D]`` Bernoulli logits (log-odds of pixel = 1).
      x: ``[..., D]`` pixels in [0, 1]; its leading axes broadcast against ``logits``'
        (e.g. logits ``[num_samples, batch, D]`` with x ``[batch, D]``), its last axis must be
        ``logits``' D.

    Returns:
      ``[...]`` log-likelihood summed over the last axis (nats), in the dtype of floating
      ``logits`` (``x`` is cast to it); integer ``logits`` are first converted to JAX's default
      float dtype (float32, or float64 under x64).

    Raises:
      ValueError: ``logits`` or ``x`` has rank 0, or their last axes differ (e.g. ``x``
        ``[batch, 1]`` with ``logits`` ``[batch, D]``: checked from the static shapes, so also
        under ``jit``); for concrete (non-traced) ``x``, values outside [0, 1].

    Unchecked under ``jit``/``vmap`` (tracers): the values of ``x``. There ``x`` outside
    [0, 1] gives a finite number that is not a log-probability, and NaN propagates.
    """
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.result_type(float))
    if logits.ndim == 0 or np.ndim(x) == 0:
        raise ValueError(f"logits and x must have shape [..., D], got shapes {logits.shape} "
                         f"and {np.shape(x)}")
    _check_event_axes({"logits": logits, "x": x})
    if not isinstance(x, jax.core.Tracer):  # values: concrete arrays only (free under jit)
        values = np.asarray(x)
        if np.any((values < 0) | (values > 1)):
            raise ValueError(f"x must hold pixels in [0, 1], got values in "
                             f"[{np.nanmin(values):g}, {np.nanmax(values):g}]")
    x = jnp.asarray(x, dtype=logits.dtype)
    shape = jnp.broadcast_shapes(logits.shape, x.shape)
    terms = _bernoulli_log_prob_terms(jnp.broadcast_to(logits, shape), jnp.broadcast_to(x, shape))
    return jnp.sum(terms, axis=-1)


def gaussian_log_likelihood(loc: jax.Array, scale: jax.Array, x: jax.Array) -> jax.Array:
    """``log N(x | loc, diag(scale^2))`` summed over the last axis, in nats.

    ``sum_d [-(x_d - loc_d)^2 / (2 scale_d^2) - log scale_d - log(2 pi) / 2]``: the
    log-density itself (a log-likelihood, not its negative).

    Args:
      loc, scale: ``[..., D]``; ``scale > 0``.
      x: ``[..., D]``. The leading axes of the three broadcast; arrays of rank >= 1 must share
        the last axis D, a scalar (rank 0) broadcasts to all of it.

    Returns:
      ``[...]`` log-density (nats), in the promoted floating dtype of ``loc``, ``scale`` and
      ``x`` (float32 for float32 or integer inputs; float64 for float64 under x64).

    Raises:
      ValueError: all three are scalars, or the last axes of those of rank >= 1 differ
        (static shapes, checked also under ``jit``); for a concrete (non-traced) ``scale``,
        a value that is not > 0 (zero, negative or NaN).

    Unchecked under ``jit``/``vmap`` (tracers): the values of ``scale``; there a
    non-positive ``scale`` gives NaN or inf, silently.
    """
    _check_event_axes({"loc": loc, "scale": scale, "x": x})
    if not isinstance(scale, jax.core.Tracer):
        values = np.asarray(scale)
        if not np.all(values > 0):
            raise ValueError(f"scale must be > 0, got values in "
                             f"[{np.min(values):g}, {np.max(values):g}]")
    z = (x - loc) / scale
    log_norm = jnp.log(scale) + 0.5 * jnp.log(2.0 * jnp.pi).astype(z.dtype)
    return jnp.sum(-0.5 * jnp.square(z) - log_norm, axis=-1)


def pixel_mean_logit(train_images, *, eps: float = 1e-3) -> jax.Array:
    """Logit of the per-pixel mean of the training images, for the decoder's output bias.

    ``logit(clip(mean_n x_nd, eps, 1 - eps))`` (Burda et al. 2016, IWAE, appendix C; the clip keeps
    always-black border pixels at a finite logit, ``logit(1e-3) = -6.9``).

    Args:
      train_images: ``[N, D]`` floating pixels in [0, 1].
      eps: clip level in (0, 0.5).

    Returns:
      ``[D]`` logits, in the dtype of ``train_images``.

    Raises:
      TypeError: ``train_images`` is not floating.
      ValueError: wrong rank, empty, ``eps`` outside (0, 0.5), or (concrete arrays) NaN/inf
        values or values outside [0, 1].
    """
    train_images = jnp.asarray(train_images)
    if not jnp.issubdtype(train_images.dtype, jnp.floating):
        raise TypeError(
            f"train_images must be floating pixels in [0, 1], got dtype {train_images.dtype}")
    if train_images.ndim != 2 or train_images.shape[0] == 0:
        raise ValueError(
            f"train_images must have shape [N, D] with N > 0, got {train_images.shape}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if not isinstance(train_images, jax.core.Tracer):  # values: concrete arrays only
        values = np.asarray(train_images)
        if not np.all(np.isfinite(values)):
            raise ValueError("train_images contains NaN or infinite values")
        if values.min() < 0.0 or values.max() > 1.0:
            raise ValueError(f"train_images must be pixels in [0, 1], got values in "
                             f"[{values.min():g}, {values.max():g}] (scale uint8 by 1/255)")
    mean = jnp.clip(jnp.mean(train_images, axis=0), eps, 1.0 - eps)
    return jnp.log(mean) - jnp.log1p(-mean)


def standard_normal_prior(latent_dim: int, dtype=jnp.float32) -> distrax.MultivariateNormalDiag:
    """``p(z) = N(0, I_L)`` as a distrax distribution with batch shape [] and event shape [L].

    Args:
      latent_dim: L, an int >= 1.
      dtype: floating dtype of the mean and scale (float32 by default).

    Raises:
      TypeError: ``latent_dim`` is not an int (e.g. ``2.0``).
      ValueError: ``latent_dim < 1``.
    """
    check_int(latent_dim, "latent_dim", minimum=1)
    return distrax.MultivariateNormalDiag(
        jnp.zeros((latent_dim,), dtype), jnp.ones((latent_dim,), dtype))


class MLP(nn.Module):
    """Dense layers with ``activation`` after each: ``[..., in] -> [..., hidden_sizes[-1]]``.

    With ``hidden_sizes=()`` it is the identity.

    Raises (at construction):
      TypeError: ``hidden_sizes`` is not a tuple/list of ints (e.g. ``200`` instead of
        ``(200,)``), or ``activation`` is not callable.
      ValueError: a width < 1 (the message names ``hidden_sizes[i]``).
    """

    hidden_sizes: Sequence[int] = (200, 200)
    activation: Activation = nn.tanh

    def __post_init__(self):
        check_int_sequence(self.hidden_sizes, "hidden_sizes")
        check_callable(self.activation, "activation")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden_sizes):
            x = self.activation(nn.Dense(width, name=f"hidden_{i}")(x))
        return x


class GaussianEncoder(nn.Module):
    """Amortized Gaussian posterior ``q(z | x) = N(loc(x), diag(scale(x)^2))``.

    ``h = MLP(x)``; one ``Dense(2L)(h)`` split into ``loc`` and ``s``; ``scale = scale_fn(s)`` with
    ``scale_fn = jnp.exp`` by default (the linear layer outputs ``log scale``, as in the IWAE
    paper); pass ``scale_fn=jax.nn.softplus`` for a softplus link. ``min_scale`` is added to the
    scale (0 by default).

    Numerical range: the scale is floored at ``jnp.finfo(dtype).tiny`` (1.2e-38 in float32), the
    smallest scale vijax's objectives accept. Below it (e.g. ``exp`` of a log-scale under
    -87.3 in float32, such as -100) q is N(loc, tiny^2): the bounds stay finite, with log q
    computed at the floor, and the gradient through the floored scale entries is zero (the
    floor is a ``jnp.maximum``); the value then differs from the exact one, which would use
    log scale = -100, by (87.3 - 100) nats per such latent entry. Without the floor the scale
    is a denormal: the gradient was NaN (an inf times a denormal flushed to 0), and where the
    denormal itself is flushed to 0, log q is +inf and the bound -inf.

    Attributes:
      hidden_sizes: widths of the deterministic hidden layers, a tuple of ints >= 1 (default
        (200, 200); ``()`` for a linear encoder).
      latent_dim: L, an int >= 1 (default 50).
      activation: hidden nonlinearity (default tanh).
      scale_fn: ``[..., L] -> [..., L]`` positive link for the scale.
      min_scale: added to the scale, a finite real >= 0.

    ``__call__(x [..., D]) -> distrax.MultivariateNormalDiag`` with batch shape ``[...]`` and event
    shape ``[L]``. ``loc_and_scale(x) -> (loc [..., L], scale [..., L])`` gives the raw parameters.

    Raises (at construction):
      TypeError: ``hidden_sizes`` not a tuple/list of ints, ``latent_dim`` not an int,
        ``min_scale`` not a real number, ``activation`` or ``scale_fn`` not callable.
      ValueError: a hidden width or ``latent_dim`` < 1, ``min_scale`` negative or not finite.
    """

    hidden_sizes: Sequence[int] = (200, 200)
    latent_dim: int = 50
    activation: Activation = nn.tanh
    scale_fn: Activation = jnp.exp
    min_scale: float = 0.0

    def __post_init__(self):
        check_int_sequence(self.hidden_sizes, "hidden_sizes")
        check_int(self.latent_dim, "latent_dim", minimum=1)
        check_callable(self.activation, "activation")
        check_callable(self.scale_fn, "scale_fn")
        check_real(self.min_scale, "min_scale", minimum=0.0)
        super().__post_init__()

    @nn.compact
    def loc_and_scale(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = MLP(self.hidden_sizes, self.activation, name="mlp")(x)
        # One [.., H] x [H, 2L] matmul for loc and log-scale together.
        out = nn.Dense(2 * self.latent_dim, name="loc_and_raw_scale")(h)
        loc, raw_scale = jnp.split(out, 2, axis=-1)
        scale = self.scale_fn(raw_scale)
        if self.min_scale:
            scale = scale + self.min_scale
        # floor at the smallest normal number: exp(-100) (or softplus(-100)) is a float32
        # denormal, which gave NaN gradients (and log q = +inf where flushed to 0)
        scale = jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
        return loc, scale

    def __call__(self, x: jax.Array) -> distrax.MultivariateNormalDiag:
        loc, scale = self.loc_and_scale(x)
        return distrax.MultivariateNormalDiag(loc, scale)


def _check_decoder_fields(module) -> None:
    """The fields shared by :class:`BernoulliDecoder` and :class:`GaussianDecoder`."""
    check_int_sequence(module.hidden_sizes, "hidden_sizes")
    check_int(module.data_dim, "data_dim", minimum=1)
    check_callable(module.activation, "activation")


def _constant_init(value) -> Callable:
    value = np.asarray(value)

    def init(rng_key, shape, dtype=jnp.float32):
        del rng_key, shape  # the shape [data_dim] is checked by BernoulliDecoder
        return jnp.asarray(value, dtype)

    return init


class BernoulliDecoder(nn.Module):
    """Bernoulli likelihood ``p(x | z) = prod_d Bernoulli(x_d | sigmoid(logits_d(z)))``.

    Attributes:
      hidden_sizes: widths of the hidden layers, a tuple of ints >= 1 (default (200, 200)).
      data_dim: D, an int >= 1 (default 784).
      activation: hidden nonlinearity (default tanh).
      output_bias_init: ``None`` (zeros) or an array ``[D]`` for the output layer's initial bias,
        normally :func:`pixel_mean_logit` of the training images (IWAE paper, appendix C).

    ``__call__(z [..., L]) -> logits [..., D]``;
    ``log_likelihood(z [..., L], x [..., D]) -> [...]`` = ``log p(x | z)`` in nats, the
    log-likelihood itself (:func:`bernoulli_log_likelihood`, whose errors it raises).

    Raises (at construction):
      TypeError: ``hidden_sizes`` not a tuple/list of ints, ``data_dim`` not an int,
        ``activation`` not callable.
      ValueError: a hidden width or ``data_dim`` < 1; ``output_bias_init`` not of shape
        ``[data_dim]``.
    """

    hidden_sizes: Sequence[int] = (200, 200)
    data_dim: int = 784
    activation: Activation = nn.tanh
    output_bias_init: object = None

    def __post_init__(self):
        _check_decoder_fields(self)
        if self.output_bias_init is not None \
                and np.shape(self.output_bias_init) != (self.data_dim,):
            raise ValueError(f"output_bias_init must have shape ({self.data_dim},) "
                             f"= [data_dim], got {np.shape(self.output_bias_init)}")
        super().__post_init__()

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = MLP(self.hidden_sizes, self.activation, name="mlp")(z)
        bias_init = (nn.initializers.zeros if self.output_bias_init is None
                     else _constant_init(self.output_bias_init))
        return nn.Dense(self.data_dim, bias_init=bias_init, name="logits")(h)

    def log_likelihood(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return bernoulli_log_likelihood(self(z), x)

    def mean(self, z: jax.Array) -> jax.Array:
        """``E[x | z] = sigmoid(logits(z))``, ``[..., D]`` pixel probabilities."""
        return jax.nn.sigmoid(self(z))


class GaussianDecoder(nn.Module):
    """Diagonal Gaussian likelihood ``p(x | z) = N(x | loc(z), diag(scale(z)^2))``.

    ``scale = scale_fn(Dense(D)(h)) + min_scale`` with ``scale_fn = softplus`` and
    ``min_scale = 1e-3`` by default (the floor keeps the density bounded on near-constant
    pixels).

    ``__call__(z [..., L]) -> (loc [..., D], scale [..., D])``;
    ``distribution(z) -> distrax.MultivariateNormalDiag``;
    ``log_likelihood(z [..., L], x [..., D]) -> [...]`` = ``log p(x | z)`` in nats, the
    log-density itself (:func:`gaussian_log_likelihood`).

    Attributes:
      hidden_sizes: a tuple of ints >= 1; data_dim: D, an int >= 1; activation: callable;
      scale_fn: callable positive link; min_scale: a finite real >= 0.

    Raises (at construction):
      TypeError / ValueError: as :class:`GaussianEncoder` and :class:`BernoulliDecoder` for
        the same fields.
    """

    hidden_sizes: Sequence[int] = (200, 200)
    data_dim: int = 784
    activation: Activation = nn.tanh
    scale_fn: Activation = jax.nn.softplus
    min_scale: float = 1e-3

    def __post_init__(self):
        _check_decoder_fields(self)
        check_callable(self.scale_fn, "scale_fn")
        check_real(self.min_scale, "min_scale", minimum=0.0)
        super().__post_init__()

    @nn.compact
    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = MLP(self.hidden_sizes, self.activation, name="mlp")(z)
        out = nn.Dense(2 * self.data_dim, name="loc_and_raw_scale")(h)
        loc, raw_scale = jnp.split(out, 2, axis=-1)
        return loc, self.scale_fn(raw_scale) + self.min_scale

    def distribution(self, z: jax.Array) -> distrax.MultivariateNormalDiag:
        loc, scale = self(z)
        return distrax.MultivariateNormalDiag(loc, scale)

    def log_likelihood(self, z: jax.Array, x: jax.Array) -> jax.Array:
        loc, scale = self(z)
        return gaussian_log_likelihood(loc, scale, x)

    def mean(self, z: jax.Array) -> jax.Array:
        """``E[x | z] = loc(z)``, ``[..., D]``."""
        return self(z)[0]


class VAE(nn.Module):
    """A VAE: ``encoder`` gives ``q(z | x)``, ``decoder`` gives ``p(x | z)``, prior ``N(0, I)``.

    Methods (call with ``model.apply(params, ..., method=...)`` or use :mod:`vijax.vae`):

    * ``__call__(x [..., D]) -> decoder output at z = loc(x)`` (used by ``init`` to create all
      parameters; for a Bernoulli decoder it is ``[..., D]`` logits of the posterior-mean
      reconstruction).
    * ``encode(x [..., D]) -> distrax.MultivariateNormalDiag`` (batch ``[...]``, event ``[L]``).
    * ``decode(z [..., L])`` -> the decoder's output (logits, or (loc, scale)).
    * ``log_likelihood(z [..., L], x [..., D]) -> [...]`` = ``log p(x | z)`` in nats.
    * ``decode_mean(z [..., L]) -> [..., D]`` = ``E[x | z]`` (pixel probabilities for Bernoulli).
    * ``prior()`` -> ``N(0, I_L)``, batch shape [], event shape [L].

    Attributes:
      encoder: a :class:`GaussianEncoder` (or any module with ``latent_dim`` and returning a
        distrax distribution with event shape [L]).
      decoder: a :class:`BernoulliDecoder` / :class:`GaussianDecoder` (any module with
        ``data_dim``, a ``log_likelihood(z, x)`` and a ``mean(z)`` method).
    """

    encoder: nn.Module
    decoder: nn.Module

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    @property
    def data_dim(self) -> int:
        return self.decoder.data_dim

    def __call__(self, x: jax.Array):
        q = self.encoder(x)
        return self.decoder(q.loc)

    def encode(self, x: jax.Array):
        return self.encoder(x)

    def decode(self, z: jax.Array):
        return self.decoder(z)

    def log_likelihood(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return self.decoder.log_likelihood(z, x)

    def decode_mean(self, z: jax.Array) -> jax.Array:
        return self.decoder.mean(z)

    def prior(self, dtype=jnp.float32) -> distrax.MultivariateNormalDiag:
        return standard_normal_prior(self.latent_dim, dtype)


def iwae_mnist_vae(
    output_bias_init=None,
    *,
    hidden_sizes: Sequence[int] = (200, 200),
    latent_dim: int = 50,
    data_dim: int = 784,
    activation: Activation = nn.tanh,
) -> VAE:
    """The IWAE paper's one-stochastic-layer binarized-MNIST VAE (784-200-200-50, tanh).

    Burda, Grosse and Salakhutdinov 2016, "Importance Weighted Autoencoders", appendix C: a
    Gaussian encoder (``scale = exp`` of a linear layer) and a Bernoulli decoder.

    Args:
      output_bias_init: ``None`` or ``[data_dim]`` initial decoder output bias, normally
        ``pixel_mean_logit(train_images)``.
      hidden_sizes: hidden widths, a tuple/list of ints >= 1, used by the encoder and, reversed,
        by the decoder (default (200, 200)).
      latent_dim: L, the number of latent dimensions, an int >= 1 (default 50).
      data_dim: D, the number of pixels, an int >= 1 (default 784 = 28 x 28).
      activation: the hidden nonlinearity of both networks (default ``flax.linen.tanh``).

    Returns:
      ``VAE(GaussianEncoder(...), BernoulliDecoder(...))``.

    Raises:
      TypeError: ``hidden_sizes`` is not a tuple/list of ints (e.g. ``200``), ``latent_dim`` or
        ``data_dim`` is not an int, or ``activation`` is not callable.
      ValueError: a width, ``latent_dim`` or ``data_dim`` < 1, or ``output_bias_init`` not of
        shape ``[data_dim]``.
    """
    hidden_sizes = check_int_sequence(hidden_sizes, "hidden_sizes")
    return VAE(
        encoder=GaussianEncoder(hidden_sizes, latent_dim, activation),
        decoder=BernoulliDecoder(hidden_sizes[::-1], data_dim, activation, output_bias_init),
    )
