"""Multi-process (multi-host) runs on JAX's multi-controller runtime (``jax.distributed``).

One Python process per host runs the same program; :func:`initialize` connects them, after
which ``jax.devices()`` lists the devices of every process and a mesh over them
(:func:`global_mesh`) lets ``jax.jit`` and ``jax.shard_map`` programs span all hosts. Each
process feeds only its own rows of a global array (:func:`global_rows`, :func:`epoch_batches`),
and XLA's collectives (gloo on CPUs, NCCL on GPUs) sum what must be summed.

Typical use (the same script on every host)::

    from vijax import distributed, em
    distributed.initialize("10.0.0.1:12345", num_processes=2, process_id=rank)
    mesh = distributed.global_mesh()                         # axis "batch", all devices
    x = distributed.global_rows(my_rows, mesh)               # [N, D] from each host's rows
    state, info = jax.jit(lambda k, x: em.fit(k, x, 3, mesh=mesh))(key, x)

:func:`vijax.vae_train.train_and_evaluate` (and ``experiments/vae.py --coordinator ...``) do
this for the VAE driver; see docs/vae.md, section "Several processes (multi-host)".

Nothing here runs at import, and nothing initialises JAX's backends except
:func:`initialize`'s call of ``jax.distributed.initialize``.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vijax import vae
from vijax._checks import check_int

__all__ = [
    "parse_coordinator",
    "check_process_args",
    "initialize",
    "is_multi_process",
    "is_main_process",
    "global_mesh",
    "global_rows",
    "epoch_batches",
    "make_train_epoch_from_batches",
    "sync",
    "replicated",
    "host_copy",
]

#: Defaults of :func:`initialize`'s timeouts (seconds), JAX's own.
HEARTBEAT_TIMEOUT_S = 100
SHUTDOWN_TIMEOUT_S = 300
INITIALIZATION_TIMEOUT_S = 300


def parse_coordinator(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (IPv6 as ``"[::1]:PORT"``) as ``(host, port)``.

    Raises:
      TypeError: ``address`` is not a str.
      ValueError: no ``:PORT`` part, an empty host, or a port that is not an integer in
        [1, 65535]; the message names ``coordinator``.
    """
    if not isinstance(address, str):
        raise TypeError(f"coordinator must be a 'HOST:PORT' string, got {address!r}")
    host, sep, port = address.strip().rpartition(":")
    if not sep:
        raise ValueError(f"coordinator must be HOST:PORT (e.g. 127.0.0.1:12345), got "
                         f"{address!r}: no port")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"coordinator must be HOST:PORT with an IPv6 host in brackets "
                         f"([::1]:12345), got {address!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"coordinator port must be an integer in [1, 65535], got {port!r} in "
                         f"{address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"coordinator must be HOST:PORT, got {address!r}: empty host")
    return host, int(port)


def check_process_args(coordinator: str | None, num_processes: int | None,
                       process_id: int | None) -> tuple[str, int, int] | None:
    """Check the three launch arguments together: all None (one process, nothing to
    initialise: returns None) or all given (returns ``(coordinator, num_processes,
    process_id)``).

    Raises:
      TypeError: ``num_processes`` or ``process_id`` given and not an int.
      ValueError: only some of the three given (the message names the missing ones);
        ``num_processes < 1``; ``process_id`` outside [0, num_processes - 1]; a
        ``coordinator`` that :func:`parse_coordinator` refuses.
    """
    given = {"coordinator": coordinator, "num_processes": num_processes,
             "process_id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"a multi-process launch needs coordinator, num_processes and "
                         f"process_id together; missing {', '.join(missing)}")
    parse_coordinator(coordinator)
    num_processes = check_int(num_processes, "num_processes", minimum=1)
    process_id = check_int(process_id, "process_id", minimum=0)
    if process_id >= num_processes:
        raise ValueError(f"process_id must be in [0, num_processes - 1] = [0, "
                         f"{num_processes - 1}], got {process_id}")
    return coordinator.strip(), num_processes, process_id


def initialize(coordinator: str, num_processes: int, process_id: int, *,
               heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_S,
               shutdown_timeout_seconds: int = SHUTDOWN_TIMEOUT_S,
               initialization_timeout: int = INITIALIZATION_TIMEOUT_S) -> None:
    """Connect this process to the others (``jax.distributed.initialize``); call it before
    any other JAX work (the first computation fixes the device list).

    Process 0 also runs the coordination service at ``coordinator``, which must be an
    address of process 0's host that the others can reach. A process that stops sending
    heartbeats for ``heartbeat_timeout_seconds`` is declared dead and the others terminate
    with an error naming the JAX distributed service; a collective (gloo) whose peer has
    gone fails at once with "Connection closed by peer". On CPUs the collectives are JAX's
    ``jax_cpu_collectives_implementation`` (``"gloo"``, the default of jax 0.10).

    Args:
      coordinator: ``"HOST:PORT"`` of process 0's coordination service.
      num_processes: N >= 1 processes in all.
      process_id: this process, in [0, N - 1].
      heartbeat_timeout_seconds, shutdown_timeout_seconds, initialization_timeout: ints
        >= 1, passed to ``jax.distributed.initialize`` (JAX's defaults 100, 300, 300 s).

    Raises:
      TypeError / ValueError: as :func:`check_process_args`, or a timeout not an int >= 1.
      RuntimeError: from JAX: already initialised, or a JAX computation ran before.
    """
    coordinator, num_processes, process_id = check_process_args(coordinator, num_processes,
                                                                process_id)
    for name, value in (("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
                        ("shutdown_timeout_seconds", shutdown_timeout_seconds),
                        ("initialization_timeout", initialization_timeout)):
        check_int(value, name, minimum=1)
    jax.distributed.initialize(coordinator, num_processes=num_processes,
                               process_id=process_id,
                               heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
                               shutdown_timeout_seconds=int(shutdown_timeout_seconds),
                               initialization_timeout=int(initialization_timeout))


def is_multi_process() -> bool:
    """Whether more than one JAX process takes part (``jax.process_count() > 1``)."""
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs, metrics and figures."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process has reached ``sync(name)`` (no-op in one process)."""
    if is_multi_process():
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(name)


def global_mesh() -> Mesh:
    """The 1-D mesh with axis ``"batch"`` over ``jax.devices()`` (every process's devices),
    as :func:`vijax.vae.data_parallel_mesh` builds it; in one process, over its devices."""
    return vae.data_parallel_mesh(jax.devices())


def _rows_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows (axis 0) split over all axes of ``mesh``, the rest whole."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}")
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names), *([None] * (ndim - 1))))


def global_rows(local_rows, mesh: Mesh) -> jax.Array:
    """The global ``[N, ...]`` array whose rows are the processes' ``local_rows`` in process
    order (``jax.make_array_from_process_local_data``), split over all devices of ``mesh``.

    Every process passes the same number ``n`` of rows, so N = n * process count; each
    process's devices of ``mesh`` then hold its rows (``n`` divisible by its device count).
    In one process this is ``jax.device_put`` of ``local_rows`` split over ``mesh``.

    Args:
      local_rows: this process's rows, ``[n, ...]`` (NumPy or JAX, n >= 1).
      mesh: a ``jax.sharding.Mesh`` over devices of all processes (:func:`global_mesh`).

    Raises:
      TypeError: ``mesh`` is not a ``Mesh``.
      ValueError: ``local_rows`` is a scalar or has no rows; ``n`` is not divisible by this
        process's number of devices in ``mesh``.
    """
    local_rows = np.asarray(local_rows)
    if local_rows.ndim < 1 or local_rows.shape[0] == 0:
        raise ValueError(f"local_rows must be [n, ...] with n >= 1 rows, got shape "
                         f"{local_rows.shape}")
    sharding = _rows_sharding(mesh, local_rows.ndim)
    local_devices = len(sharding.addressable_devices)
    if local_rows.shape[0] % local_devices:
        raise ValueError(f"local_rows has {local_rows.shape[0]} rows, not divisible by this "
                         f"process's {local_devices} devices of the mesh")
    global_shape = (local_rows.shape[0] * jax.process_count(), *local_rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


def epoch_batches(images: np.ndarray, rng_key: jax.Array, *, batch_size: int,
                  mesh: Mesh) -> jax.Array:
    """One epoch's training batches ``[S, B, D]`` as a global array on ``mesh``, each process
    holding only its devices' share of every batch (``jax.make_array_from_callback`` reads
    just those rows of ``images``).

    Batch ``i`` is ``images[indices[i]]`` with ``indices`` of :func:`vijax.vae.epoch_plan`
    ``(rng_key, N, batch_size)``: the batches :func:`vijax.vae.make_train_epoch` draws inside
    its scan, so :func:`make_train_epoch_from_batches` trains on the same examples.

    Args:
      images: the training images ``[N, D]`` on this host (NumPy; every process has the same).
      rng_key: the epoch's key (the same on every process).
      batch_size: B, divisible by the size of ``mesh``'s ``"batch"`` axis.
      mesh: a mesh with axis ``"batch"`` (:func:`global_mesh`).

    Raises:
      TypeError: ``rng_key`` not a key, ``batch_size`` not an int, ``mesh`` not a Mesh.
      ValueError: ``images`` not 2-D, ``batch_size`` outside [1, N] or not divisible by the
        ``"batch"`` axis (the message names ``batch_size``); ``mesh`` has no ``"batch"`` axis.
    """
    images = np.asarray(images)
    if images.ndim != 2:
        raise ValueError(f"images must be [N, D], got shape {images.shape}")
    vae._check_mesh(mesh)
    shards = mesh.shape[vae.BATCH_AXIS]
    check_int(batch_size, "batch_size", minimum=1)
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {shards} devices "
                         "of the mesh")
    indices, _ = vae.epoch_plan(rng_key, images.shape[0], batch_size)
    indices = np.asarray(indices)
    sharding = NamedSharding(mesh, PartitionSpec(None, vae.BATCH_AXIS, None))
    shape = (*indices.shape, images.shape[1])

    def rows(index):  # index: (steps, batch columns, pixels) slices of this device's block
        return np.take(images, indices[index[0], index[1]], axis=0)[..., index[2]]

    return jax.make_array_from_callback(shape, sharding, rows)


def make_train_epoch_from_batches(model, optimizer, objective, *, binarize: bool,
                                  mesh: Mesh) -> Callable:
    """Build ``train_epoch(state, batches, rng_key) -> (state, metrics)``: the steps of
    :func:`vijax.vae.make_train_epoch` over batches made beforehand (:func:`epoch_batches`),
    for a mesh that spans several processes (no process holds the whole training set on its
    devices).

    Step ``i`` binarizes ``batches[i]`` (when ``binarize``) with ``step_keys[i, 0]`` and takes
    :func:`vijax.vae.make_train_step`'s step with ``step_keys[i, 1]``, ``step_keys`` from
    :func:`vijax.vae.epoch_plan` ``(rng_key, N, B)``: the same keys and examples as
    ``make_train_epoch`` on the same ``rng_key``, so the updates agree with it up to float
    summation order. Jit it with ``donate_argnums=0``.

    Args:
      model, optimizer, objective: as :func:`vijax.vae.make_train_step`.
      binarize: a bool (dynamic binarization).
      mesh: a mesh with axis ``"batch"`` (:func:`global_mesh`).

    Returns:
      ``train_epoch(state, batches [S, B, D], rng_key, num_examples)`` with ``num_examples``
      N (static: the size of the training set the batches were drawn from); ``metrics`` as
      ``make_train_epoch``'s, each value ``[S]``.

    Raises:
      TypeError / ValueError (at construction): as :func:`vijax.vae.make_train_step`;
        ``binarize`` not a bool.
    """
    from vijax._checks import check_bool  # noqa: PLC0415

    check_bool(binarize, "binarize")
    epoch_step = vae._epoch_step(vae.make_train_step(model, optimizer, objective, mesh=mesh),
                                 bool(binarize))

    def train_epoch(state, batches, rng_key, num_examples: int):
        num_batches, batch_size = batches.shape[:2]
        _, step_keys = vae.epoch_plan(rng_key, num_examples, batch_size)
        if step_keys.shape[0] != num_batches:
            raise ValueError(f"batches holds {num_batches} batches of {batch_size}, but an "
                             f"epoch over {num_examples} examples has {step_keys.shape[0]}")

        def body(state, inputs):
            batch, keys = inputs
            return epoch_step(state, batch, keys)

        return jax.lax.scan(body, state, (batches, step_keys))

    return train_epoch


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole by every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def host_copy(x) -> np.ndarray:
    """A NumPy copy of a fully replicated (or fully addressable) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)

