"""The encoder, decoders and VAE of :mod:`vijax.nn` as Flax NNX modules.

The same networks as :mod:`vijax.nn` (same layers, initialisers, links and outputs) written
against ``flax.nnx``: a module is built eagerly with its parameters, from an explicit
``rngs=nnx.Rngs(seed)``, and its methods are called directly (``model.encode(x)``). The
parameters are laid out as the linen modules' are: ``nnx.split(model)`` gives a state whose
pure dict (``nnx.to_pure_dict(state)``) is, key for key and shape for shape, the ``"params"``
collection of the :mod:`vijax.nn` module with the same fields, so weights move between the
two APIs unchanged. The engine :mod:`vijax.vae` trains and evaluates these modules through
:func:`vijax.vae.from_nnx` / :func:`vijax.vae.to_nnx` (one implementation of every objective,
train step and evaluation, for both APIs). That adapter (:class:`vijax.vae.NNXModel` and the
two functions) is written at the end of this module and exported by :mod:`vijax.vae`, which
imports this module only when one of the three is first used.

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

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

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
Params = Any  # a parameter pytree {"params": {...}}, as vijax.vae.Params


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


# ----------------------------------------------------------------------------------------------
# The engine's NNX adapter: vijax.vae.NNXModel, vijax.vae.from_nnx, vijax.vae.to_nnx
# ----------------------------------------------------------------------------------------------
# Public as names of vijax.vae (its __getattr__ imports this module on their first use, so that
# ``import vijax.vae`` does not import flax.nnx) and documented on its page; not in this
# module's __all__. They need vijax.vae's parameter check, imported where it is used, so that
# ``import vijax.nnx`` does not import the engine either.

class _Sizes(NamedTuple):
    """The sizes the engine reads of a model's ``encoder`` and ``decoder``."""

    latent_dim: int
    data_dim: int


@dataclasses.dataclass(frozen=True)
class NNXModel:
    """The functional form of a Flax NNX VAE, for every function of :mod:`vijax.vae` that takes
    a ``model``: made by :func:`from_nnx`, turned back into an NNX module by :func:`to_nnx`.

    It holds the module's ``nnx.GraphDef`` (its structure and static attributes, no arrays)
    and presents linen's interface, so that the engine runs one implementation for both APIs:
    ``apply(params, *args, method=NNXModel.encode)`` merges ``graphdef`` with ``params``
    (``nnx.merge``) and calls the module's method, a pure function of ``params`` that works
    under ``jax.jit``, ``jax.grad``, ``jax.vmap`` and ``jax.lax.scan``. It is immutable and
    hashable (it may be a static argument of ``jax.jit``).

    Attributes:
      graphdef: the ``nnx.GraphDef`` of the module.
      latent_dim, data_dim: L and D of the module.
      bernoulli: whether the decoder is a :class:`vijax.nnx.BernoulliDecoder` (then images
        are checked to lie in [0, 1], and ``sample_images(..., draw=True)`` draws 0/1 pixels).

    ``encoder`` and ``decoder`` give the sizes the engine reads (``encoder.latent_dim``,
    ``decoder.data_dim``), as on a :class:`vijax.nn.VAE`. ``init(rng_key, x)`` returns a copy
    of the parameters the module had when given to :func:`from_nnx` (an NNX module makes its
    parameters when it is built, from its ``nnx.Rngs``; ``rng_key`` and ``x`` are not used),
    so ``init_train_state`` starts from the module's own weights.
    """

    graphdef: Any = dataclasses.field(repr=False)
    latent_dim: int
    data_dim: int
    bernoulli: bool
    _params_treedef: Any = dataclasses.field(repr=False)
    _param_shapes: tuple = dataclasses.field(repr=False)
    _state_treedef: Any = dataclasses.field(repr=False)
    _initial_params: Any = dataclasses.field(repr=False, compare=False)

    # ``method=`` values for apply, as linen's ``method=VAE.encode``: each takes the merged
    # module first and calls the method of that name.
    @staticmethod
    def encode(module, x):
        return module.encode(x)

    @staticmethod
    def decode(module, z):
        return module.decode(z)

    @staticmethod
    def log_likelihood(module, z, x):
        return module.log_likelihood(z, x)

    @staticmethod
    def decode_mean(module, z):
        return module.decode_mean(z)

    @property
    def encoder(self) -> _Sizes:
        return _Sizes(self.latent_dim, self.data_dim)

    @property
    def decoder(self) -> _Sizes:
        return _Sizes(self.latent_dim, self.data_dim)

    def init(self, rng_key, x=None) -> Params:
        """A copy of the module's parameters ``{"params": {...}}`` (``rng_key``, ``x`` unused).

        Raises:
          ValueError: the module given to :func:`from_nnx` was abstract (``nnx.eval_shape``:
            shapes without values); build the state from loaded parameters instead.
        """
        del rng_key, x
        if not all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(self._initial_params)):
            raise ValueError("the module given to vijax.vae.from_nnx has no parameter values "
                             "(built by nnx.eval_shape?): pass a built module, or make the "
                             "TrainState from loaded params")
        return jax.tree.map(jnp.copy, self._initial_params)

    def _state(self, params, name: str = "params"):
        """``params`` as the module's ``nnx.State``; ValueError when its keys or shapes are not
        the module's (checked from the static structure, so also under ``jit``)."""
        from vijax import vae  # noqa: PLC0415 (see the comment above NNXModel)

        vae._check_params(params, name)
        if jax.tree.structure(params) != self._params_treedef:
            expected, got = ({jax.tree_util.keystr(path) for path, _
                              in jax.tree_util.tree_leaves_with_path(tree)}
                             for tree in (self._initial_params, params))
            raise ValueError(f"{name} must have the keys of the module's parameters: missing "
                             f"{sorted(expected - got)}, unexpected {sorted(got - expected)}")
        leaves = jax.tree.leaves(params)
        shapes = tuple(tuple(np.shape(leaf)) for leaf in leaves)
        if shapes != self._param_shapes:
            raise ValueError(f"{name} must have the module's parameter shapes "
                             f"{self._param_shapes}, got {shapes}")
        return jax.tree.unflatten(self._state_treedef, leaves)

    def apply(self, params: Params, *args, method=None, **kwargs):
        """``method(nnx.merge(graphdef, params), *args, **kwargs)``; ``method`` is a function
        taking the module first (``NNXModel.encode``, ...), a method name (``"encode"``), or
        ``None`` for ``__call__``.

        Raises:
          TypeError: ``params`` a :class:`vijax.vae.TrainState` or not a mapping; ``method``
            neither None, a string nor callable.
          ValueError: ``params`` without the module's keys or shapes.
        """
        module = nnx.merge(self.graphdef, self._state(params))
        if method is None:
            return module(*args, **kwargs)
        if isinstance(method, str):
            return getattr(module, method)(*args, **kwargs)
        check_callable(method, "method")
        return method(module, *args, **kwargs)


_NNX_METHODS = ("encode", "decode", "log_likelihood", "decode_mean")


def from_nnx(model) -> tuple[NNXModel, Params]:
    """Split a Flax NNX VAE into the engine's ``(model, params)``.

    ``graphdef, state = nnx.split(model)``; ``params = {"params": nnx.to_pure_dict(state)}``,
    the layout of a linen module's ``model.init`` output (for :mod:`vijax.nnx` modules, the
    same keys and shapes as the :mod:`vijax.nn` module with the same fields, so linen weights
    load into the NNX model with :func:`to_nnx` and back). The returned :class:`NNXModel` goes
    wherever :mod:`vijax.vae` takes a ``model`` (``objective_value``, ``init_train_state``,
    ``make_train_step``, ``make_train_epoch``, ``log_likelihood_is``, ``evaluate_bounds``,
    ...), with ``params`` (or ``state.params``) as its parameters. Use::

        model, params = vae.from_nnx(vijax.nnx.iwae_mnist_vae(rngs=nnx.Rngs(0)))
        state = vae.init_train_state(key, model, optimizer, 784)   # the module's weights
        ...                                                         # train as with linen
        trained = vae.to_nnx(model, state.params)                   # an NNX module again

    Args:
      model: a ``flax.nnx.Module`` with the methods of :class:`vijax.nnx.VAE` (``encode``,
        ``decode``, ``log_likelihood``, ``decode_mean``) and int attributes ``latent_dim``
        and ``data_dim``, normally a :class:`vijax.nnx.VAE`; its state must be parameters
        only (``nnx.Param``: no batch statistics or stored RNG state, which the functional
        train step would not update).

    Returns:
      ``(NNXModel, params)``: ``params`` is ``{"params": {...}}`` with float arrays of the
      layers' shapes; they share the module's arrays (``init`` / ``init_train_state`` copy
      them).

    Raises:
      TypeError: ``model`` is not an ``nnx.Module`` (e.g. a linen :class:`vijax.nn.VAE`,
        which the engine takes as it is), lacks one of the four methods, or has a
        ``latent_dim`` / ``data_dim`` that is not an int.
      ValueError: ``model`` has state other than ``nnx.Param``.
    """
    if not isinstance(model, nnx.Module):
        hint = (" (a flax.linen module: pass it to vijax.vae's functions as it is)"
                if isinstance(model, linen.Module) else "")
        raise TypeError(f"model must be a flax.nnx.Module (e.g. vijax.nnx.iwae_mnist_vae("
                        f"rngs=nnx.Rngs(0))), got {type(model).__name__}{hint}")
    missing = [name for name in _NNX_METHODS if not callable(getattr(model, name, None))]
    if missing:
        raise TypeError(f"model must have the methods {', '.join(_NNX_METHODS)} (as "
                        f"vijax.nnx.VAE), {type(model).__name__} lacks {', '.join(missing)}")
    latent_dim = check_int(getattr(model, "latent_dim", None), "model.latent_dim", minimum=1)
    data_dim = check_int(getattr(model, "data_dim", None), "model.data_dim", minimum=1)
    others = nnx.state(model, nnx.Not(nnx.Param))
    if jax.tree.leaves(others):
        kinds = sorted({type(v).__name__ for v in jax.tree.leaves(
            others, is_leaf=lambda v: isinstance(v, nnx.Variable))})
        raise ValueError(f"model must hold only nnx.Param state (the train step updates "
                         f"parameters only), got {', '.join(kinds)}")
    graphdef, state = nnx.split(model)
    params = {"params": nnx.to_pure_dict(state)}
    leaves = jax.tree.leaves(params)
    state_leaves, state_treedef = jax.tree.flatten(state)
    if len(leaves) != len(state_leaves) or any(a is not b for a, b in zip(leaves, state_leaves)):
        raise RuntimeError("the pure dict of the module's state does not list its arrays in "
                           "the state's order; vijax.vae.from_nnx needs updating for this "
                           "Flax version")
    return NNXModel(
        graphdef=graphdef, latent_dim=latent_dim, data_dim=data_dim,
        bernoulli=isinstance(getattr(model, "decoder", None), BernoulliDecoder),
        _params_treedef=jax.tree.structure(params),
        _param_shapes=tuple(tuple(np.shape(leaf)) for leaf in leaves),
        _state_treedef=state_treedef, _initial_params=params), params


def to_nnx(model: NNXModel, params: Params):
    """The NNX module of ``model`` (:func:`from_nnx`) with parameters ``params``:
    ``nnx.merge(model.graphdef, params)``, e.g. the trained ``state.params``, or the
    ``model.init`` output of a linen :mod:`vijax.nn` VAE with the same fields.

    The module's arrays are those of ``params`` (no copy): do not donate ``params`` to a
    jitted step afterwards (``jax.tree.map(jnp.copy, params)`` first if you must).

    Returns:
      a new NNX module (a :class:`vijax.nnx.VAE` for one), ``module.encode(x)`` etc.

    Raises:
      TypeError: ``model`` is not an :class:`NNXModel` (e.g. the NNX module itself);
        ``params`` is a :class:`vijax.vae.TrainState` (pass ``state.params``) or not a mapping.
      ValueError: ``params`` does not have the module's keys or shapes.
    """
    if not isinstance(model, NNXModel):
        raise TypeError(f"model must be a vijax.vae.NNXModel (the first output of "
                        f"vijax.vae.from_nnx), got {type(model).__name__}")
    return nnx.merge(model.graphdef, model._state(params))
