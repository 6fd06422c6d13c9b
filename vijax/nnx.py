"""The encoder, decoders and VAE of :mod:`vijax.nn` as Flax NNX modules.

The same networks as :mod:`vijax.nn` (same layers, initialisers, links and outputs) written
against ``flax.nnx``: a module is built eagerly with its parameters, from an explicit
``rngs=nnx.Rngs(seed)``, and its methods are called directly (``model.encode(x)``). The
parameters are laid out as the linen modules' are: ``nnx.split(model)`` gives a state whose
pure dict (``nnx.to_pure_dict(state)``) is, key for key and shape for shape, the ``"params"``
collection of the :mod:`vijax.nn` module with the same fields, so weights move between the
two APIs unchanged. The engine :mod:`vijax.vae` trains and evaluates these modules through
:func:`vijax.vae.from_nnx` / :func:`vijax.vae.to_nnx` (one implementation of every objective,
train step and evaluation, for both APIs).

Differences from :mod:`vijax.nn`, all from how NNX works: an NNX layer is built with its
input size, so :class:`GaussianEncoder` takes ``data_dim`` and the decoders take
``latent_dim`` (first, as ``nnx.Linear`` takes ``in_features`` first); ``rngs`` is a
required keyword. The log-likelihood functions, :func:`vijax.nn.pixel_mean_logit` and
:func:`vijax.nn.standard_normal_prior` are the linen module's own (no second copy).

Shapes: ``data_dim`` = D, ``latent_dim`` = L; every module works on any number of leading
axes (``[..., D]`` in, ``[..., L]`` out). Parameters are float32 (``nnx.Linear``'s default
``param_dtype``); outputs have the promoted dtype of input and parameters.

Decoder protocol used by :mod:`vijax.vae`: every decoder has
``log_likelihood(z [..., L], x [..., D]) -> [...]`` = ``log p(x | z)`` summed over the D
pixels, in nats (the log-likelihood itself, not its negative).
"""

from __future__ import annotations

from typing import Callable, Sequence

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vijax import nn as vnn
from vijax._checks import check_callable, check_int, check_int_sequence, check_real

__all__ = [
    "MLP",
    "GaussianEncoder",
    "BernoulliDecoder",
    "GaussianDecoder",
    "VAE",
    "iwae_mnist_vae",
]

Activation = Callable[[jax.Array], jax.Array]


def _check_rngs(rngs) -> None:
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be a flax.nnx.Rngs (e.g. nnx.Rngs(0)), got "
                        f"{type(rngs).__name__}")


class MLP(nnx.Module):
    """Linear layers ``hidden_0, hidden_1, ...`` with ``activation`` after each:
    ``[..., in_features] -> [..., hidden_sizes[-1]]`` (the identity for ``hidden_sizes=()``).

    Args:
      in_features: the input's last axis, an int >= 1.
      hidden_sizes: widths, a tuple/list of ints >= 1 (default (200, 200)).
      activation: the nonlinearity (default tanh).
      rngs: ``nnx.Rngs`` for the initial weights.

    Raises:
      TypeError: ``in_features`` not an int, ``hidden_sizes`` not a tuple/list of ints,
        ``activation`` not callable, ``rngs`` not an ``nnx.Rngs``.
      ValueError: ``in_features`` or a width < 1.
    """

    def __init__(self, in_features: int, hidden_sizes: Sequence[int] = (200, 200),
                 activation: Activation = jnp.tanh, *, rngs: nnx.Rngs):
        check_int(in_features, "in_features", minimum=1)
        self.hidden_sizes = check_int_sequence(hidden_sizes, "hidden_sizes")
        check_callable(activation, "activation")
        self.activation = activation
        _check_rngs(rngs)
        # named attributes hidden_i (not a list): the state's keys are linen's layer names
        for i, width in enumerate(self.hidden_sizes):
            setattr(self, f"hidden_{i}", nnx.Linear(in_features, width, rngs=rngs))
            in_features = width

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(len(self.hidden_sizes)):
            x = self.activation(getattr(self, f"hidden_{i}")(x))
        return x


class GaussianEncoder(nnx.Module):
    """Amortized Gaussian posterior ``q(z | x) = N(loc(x), diag(scale(x)^2))``, as
    :class:`vijax.nn.GaussianEncoder`.

    ``h = MLP(x)``; one ``Linear(2L)(h)`` (attribute ``loc_and_raw_scale``) split into ``loc``
    and ``s``; ``scale = max(scale_fn(s) + min_scale, finfo.tiny)`` (as
    :class:`vijax.nn.GaussianEncoder`).

    Args:
      data_dim: D, the input's last axis, an int >= 1 (default 784).
      hidden_sizes: hidden widths, a tuple of ints >= 1 (default (200, 200); ``()``: linear).
      latent_dim: L, an int >= 1 (default 50).
      activation: hidden nonlinearity (default tanh).
      scale_fn: ``[..., L] -> [..., L]`` positive link (default ``jnp.exp``).
      min_scale: added to the scale, a finite real >= 0 (default 0).
      rngs: ``nnx.Rngs`` for the initial weights.

    ``__call__(x [..., D]) -> distrax.MultivariateNormalDiag`` (batch ``[...]``, event
    ``[L]``); ``loc_and_scale(x) -> (loc [..., L], scale [..., L])``.

    Raises:
      TypeError: an int field not an int, ``hidden_sizes`` not a tuple/list of ints,
        ``min_scale`` not a real number, ``activation`` or ``scale_fn`` not callable, ``rngs``
        not an ``nnx.Rngs``.
      ValueError: ``data_dim``, ``latent_dim`` or a width < 1; ``min_scale`` negative or not
        finite.
    """

    def __init__(self, data_dim: int = 784, hidden_sizes: Sequence[int] = (200, 200),
                 latent_dim: int = 50, activation: Activation = jnp.tanh,
                 scale_fn: Activation = jnp.exp, min_scale: float = 0.0, *, rngs: nnx.Rngs):
        hidden_sizes = check_int_sequence(hidden_sizes, "hidden_sizes")
        self.data_dim = check_int(data_dim, "data_dim", minimum=1)
        self.latent_dim = check_int(latent_dim, "latent_dim", minimum=1)
        check_callable(scale_fn, "scale_fn")
        self.scale_fn = scale_fn
        self.min_scale = check_real(min_scale, "min_scale", minimum=0.0)
        self.mlp = MLP(data_dim, hidden_sizes, activation, rngs=rngs)
        width = hidden_sizes[-1] if hidden_sizes else data_dim
        self.loc_and_raw_scale = nnx.Linear(width, 2 * latent_dim, rngs=rngs)

    def loc_and_scale(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        loc, raw_scale = jnp.split(self.loc_and_raw_scale(self.mlp(x)), 2, axis=-1)
        scale = self.scale_fn(raw_scale)
        if self.min_scale:
            scale = scale + self.min_scale
        # floored at the smallest normal number, as vijax.nn.GaussianEncoder (see its
        # "Numerical range")
        scale = jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
        return loc, scale

    def __call__(self, x: jax.Array) -> distrax.MultivariateNormalDiag:
        loc, scale = self.loc_and_scale(x)
        return distrax.MultivariateNormalDiag(loc, scale)


def _decoder_mlp(module, latent_dim, hidden_sizes, data_dim, activation, rngs) -> int:
    """Check the fields shared by the decoders, set ``latent_dim``, ``data_dim`` and ``mlp``;
    the MLP's output width."""
    hidden_sizes = check_int_sequence(hidden_sizes, "hidden_sizes")
    module.latent_dim = check_int(latent_dim, "latent_dim", minimum=1)
    module.data_dim = check_int(data_dim, "data_dim", minimum=1)
    module.mlp = MLP(latent_dim, hidden_sizes, activation, rngs=rngs)
    return hidden_sizes[-1] if hidden_sizes else latent_dim


class BernoulliDecoder(nnx.Module):
    """Bernoulli likelihood ``p(x | z) = prod_d Bernoulli(x_d | sigmoid(logits_d(z)))``, as
    :class:`vijax.nn.BernoulliDecoder` (output layer ``logits``).

    Args:
      latent_dim: L, the input's last axis, an int >= 1 (default 50).
      hidden_sizes: hidden widths, a tuple of ints >= 1 (default (200, 200)).
      data_dim: D, an int >= 1 (default 784).
      activation: hidden nonlinearity (default tanh).
      output_bias_init: ``None`` (zeros) or an array ``[D]``, the output layer's initial bias,
        normally :func:`vijax.nn.pixel_mean_logit` of the training images.
      rngs: ``nnx.Rngs`` for the initial weights.

    ``__call__(z [..., L]) -> logits [..., D]``; ``log_likelihood(z [..., L], x [..., D]) ->
    [...]`` = ``log p(x | z)`` in nats (:func:`vijax.nn.bernoulli_log_likelihood`, whose errors
    it raises); ``mean(z) -> [..., D]`` pixel probabilities.

    Raises:
      TypeError: an int field not an int, ``hidden_sizes`` not a tuple/list of ints,
        ``activation`` not callable, ``rngs`` not an ``nnx.Rngs``.
      ValueError: ``latent_dim``, ``data_dim`` or a width < 1; ``output_bias_init`` not of
        shape ``[data_dim]``.
    """

    def __init__(self, latent_dim: int = 50, hidden_sizes: Sequence[int] = (200, 200),
                 data_dim: int = 784, activation: Activation = jnp.tanh,
                 output_bias_init=None, *, rngs: nnx.Rngs):
        data_dim = check_int(data_dim, "data_dim", minimum=1)
        if output_bias_init is not None and np.shape(output_bias_init) != (data_dim,):
            raise ValueError(f"output_bias_init must have shape ({data_dim},) = [data_dim], "
                             f"got {np.shape(output_bias_init)}")
        width = _decoder_mlp(self, latent_dim, hidden_sizes, data_dim, activation, rngs)
        bias_init = (nnx.initializers.zeros if output_bias_init is None
                     else vnn._constant_init(output_bias_init))
        self.logits = nnx.Linear(width, data_dim, bias_init=bias_init, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.logits(self.mlp(z))

    def log_likelihood(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return vnn.bernoulli_log_likelihood(self(z), x)

    def mean(self, z: jax.Array) -> jax.Array:
        """``E[x | z] = sigmoid(logits(z))``, ``[..., D]`` pixel probabilities."""
        return jax.nn.sigmoid(self(z))


class GaussianDecoder(nnx.Module):
    """Diagonal Gaussian likelihood ``p(x | z) = N(x | loc(z), diag(scale(z)^2))``, as
    :class:`vijax.nn.GaussianDecoder`: ``Linear(2D)`` (attribute ``loc_and_raw_scale``) split
    into ``loc`` and ``s``, ``scale = scale_fn(s) + min_scale``.

    Args:
      latent_dim, hidden_sizes, data_dim, activation, rngs: as :class:`BernoulliDecoder`.
      scale_fn: positive link (default ``jax.nn.softplus``).
      min_scale: a finite real >= 0 (default 1e-3).

    ``__call__(z [..., L]) -> (loc [..., D], scale [..., D])``;
    ``distribution(z) -> distrax.MultivariateNormalDiag``; ``log_likelihood(z, x) -> [...]``
    = ``log p(x | z)`` in nats (:func:`vijax.nn.gaussian_log_likelihood`); ``mean(z) = loc(z)``.

    Raises:
      TypeError / ValueError: as :class:`GaussianEncoder` and :class:`BernoulliDecoder` for the
        same fields.
    """

    def __init__(self, latent_dim: int = 50, hidden_sizes: Sequence[int] = (200, 200),
                 data_dim: int = 784, activation: Activation = jnp.tanh,
                 scale_fn: Activation = jax.nn.softplus, min_scale: float = 1e-3, *,
                 rngs: nnx.Rngs):
        check_callable(scale_fn, "scale_fn")
        self.scale_fn = scale_fn
        self.min_scale = check_real(min_scale, "min_scale", minimum=0.0)
        width = _decoder_mlp(self, latent_dim, hidden_sizes, data_dim, activation, rngs)
        self.loc_and_raw_scale = nnx.Linear(width, 2 * data_dim, rngs=rngs)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        loc, raw_scale = jnp.split(self.loc_and_raw_scale(self.mlp(z)), 2, axis=-1)
        return loc, self.scale_fn(raw_scale) + self.min_scale

    def distribution(self, z: jax.Array) -> distrax.MultivariateNormalDiag:
        loc, scale = self(z)
        return distrax.MultivariateNormalDiag(loc, scale)

    def log_likelihood(self, z: jax.Array, x: jax.Array) -> jax.Array:
        loc, scale = self(z)
        return vnn.gaussian_log_likelihood(loc, scale, x)

    def mean(self, z: jax.Array) -> jax.Array:
        """``E[x | z] = loc(z)``, ``[..., D]``."""
        return self(z)[0]


class VAE(nnx.Module):
    """A VAE: ``encoder`` gives ``q(z | x)``, ``decoder`` gives ``p(x | z)``, prior ``N(0, I)``;
    the methods of :class:`vijax.nn.VAE`, called directly.

    * ``__call__(x [..., D])`` -> the decoder's output at ``z = loc(x)``.
    * ``encode(x [..., D]) -> distrax.MultivariateNormalDiag`` (batch ``[...]``, event ``[L]``).
    * ``decode(z [..., L])`` -> the decoder's output (logits, or (loc, scale)).
    * ``log_likelihood(z [..., L], x [..., D]) -> [...]`` = ``log p(x | z)`` in nats.
    * ``decode_mean(z [..., L]) -> [..., D]`` = ``E[x | z]``.
    * ``prior()`` -> ``N(0, I_L)``, batch shape [], event shape [L].

    Args:
      encoder: a :class:`GaussianEncoder` (or any NNX module with ``latent_dim`` and
        ``__call__(x)`` returning a distrax distribution with event shape [L]).
      decoder: a :class:`BernoulliDecoder` / :class:`GaussianDecoder` (any NNX module with
        ``data_dim``, ``log_likelihood(z, x)`` and ``mean(z)``).

    Raises:
      TypeError: ``encoder`` or ``decoder`` is not an ``nnx.Module`` (e.g. a linen module).
      ValueError: the encoder's and the decoder's ``data_dim``, or their ``latent_dim``,
        differ (checked when both modules have the attribute).
    """

    def __init__(self, encoder: nnx.Module, decoder: nnx.Module):
        for name, part in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(part, nnx.Module):
                raise TypeError(f"{name} must be a flax.nnx.Module (e.g. "
                                f"vijax.nnx.GaussianEncoder(..., rngs=nnx.Rngs(0))), got "
                                f"{type(part).__name__}")
        for field in ("data_dim", "latent_dim"):
            if hasattr(encoder, field) and hasattr(decoder, field) \
                    and getattr(encoder, field) != getattr(decoder, field):
                raise ValueError(f"encoder.{field} {getattr(encoder, field)} != decoder."
                                 f"{field} {getattr(decoder, field)}")
        self.encoder = encoder
        self.decoder = decoder

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    @property
    def data_dim(self) -> int:
        return self.decoder.data_dim

    def __call__(self, x: jax.Array):
        return self.decoder(self.encoder(x).loc)

    def encode(self, x: jax.Array):
        return self.encoder(x)

    def decode(self, z: jax.Array):
        return self.decoder(z)

    def log_likelihood(self, z: jax.Array, x: jax.Array) -> jax.Array:
        return self.decoder.log_likelihood(z, x)

    def decode_mean(self, z: jax.Array) -> jax.Array:
        return self.decoder.mean(z)

    def prior(self, dtype=jnp.float32) -> distrax.MultivariateNormalDiag:
        return vnn.standard_normal_prior(self.latent_dim, dtype)


def iwae_mnist_vae(
    output_bias_init=None,
    *,
    hidden_sizes: Sequence[int] = (200, 200),
    latent_dim: int = 50,
    data_dim: int = 784,
    activation: Activation = jnp.tanh,
    rngs: nnx.Rngs,
) -> VAE:
    """The IWAE paper's binarized-MNIST VAE (784-200-200-50, tanh) as an NNX module, as
    :func:`vijax.nn.iwae_mnist_vae` (Burda, Grosse and Salakhutdinov 2016, appendix C).

    Args:
      output_bias_init, hidden_sizes, latent_dim, data_dim, activation: as
        :func:`vijax.nn.iwae_mnist_vae` (the decoder uses ``hidden_sizes`` reversed).
      rngs: ``nnx.Rngs`` for the initial weights (e.g. ``nnx.Rngs(0)``).

    Returns:
      ``VAE(GaussianEncoder(...), BernoulliDecoder(...))``, parameters initialised.

    Raises:
      TypeError / ValueError: as :func:`vijax.nn.iwae_mnist_vae`; TypeError when ``rngs`` is
        not an ``nnx.Rngs``.
    """
    hidden_sizes = check_int_sequence(hidden_sizes, "hidden_sizes")
    _check_rngs(rngs)
    return VAE(
        encoder=GaussianEncoder(data_dim, hidden_sizes, latent_dim, activation, rngs=rngs),
        decoder=BernoulliDecoder(latent_dim, hidden_sizes[::-1], data_dim, activation,
                                 output_bias_init, rngs=rngs),
    )
