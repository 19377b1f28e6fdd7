"""Data parallelism over a device mesh: the batch sharded, the parameters replicated.

jbp brings no distributed engine of its own: XLA's SPMD partitioner is it.
Put the parameters on every device with :func:`replicate` and split the
batch along the mesh's data axis with :func:`shard_batch`; every jbp function
under ``jax.jit`` then runs on all devices, with the batch reductions of the
δ equations (``aᵀδ``, ``Σ_batch δ``) turned into cross-device sums by XLA::

    mesh = jbp.make_mesh(4)                       # 4 devices, axis "data"
    params = jbp.replicate(params, mesh)
    x, y = jbp.shard_batch((x, y), mesh)          # batch divisible by 4
    grads = jax.jit(jbp.backprop(net, loss))(params, x, y)      # replicated
    norms = jax.jit(jbp.per_example_norms(net, loss))(params, x, y)  # sharded

Results equal the single-device ones up to the order of the batch sums:
float64 to ~1e-13 relative, float32 to ~1e-6.

Multi-host: call ``jax.distributed.initialize()`` first in every process;
``jax.devices()`` then lists every process's devices and :func:`make_mesh`
spans them. Give :func:`shard_batch` each process's own rows of the global
batch (:func:`process_rows` says which), and it assembles the global array
with ``jax.make_array_from_process_local_data``. Print and write files from
process 0 only (:func:`is_main_process`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: int | Sequence[Any] | None = None, *, axis: str = DATA_AXIS) -> Mesh:
    """A one-dimensional mesh for data parallelism.

    Args:
      devices: how many devices (the first ``devices`` of ``jax.devices()``),
        the devices themselves, or None for all of them.
      axis: the mesh axis name the batch is split along.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(n,)`` with axis ``axis``.

    Raises:
      ValueError: if more devices are asked for than there are (on a CPU,
        ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before
        JAX starts simulates N devices).
    """
    available = jax.devices()
    if devices is None:
        chosen = list(available)
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"`devices` must be at least 1, got {devices}")
        if devices > len(available):
            raise ValueError(
                f"`devices` is {devices} but JAX sees {len(available)} "
                f"{jax.default_backend()} device(s); on a CPU, set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before JAX starts"
            )
        chosen = list(available[:devices])
    elif isinstance(devices, Sequence) and not isinstance(devices, str) and devices:
        chosen = list(devices)
    else:
        raise TypeError(f"`devices` must be an int, a list of devices or None, got {devices!r}")
    return Mesh(np.array(chosen), (axis,))


def _check_mesh(mesh: Any) -> Mesh:
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise TypeError(
            f"`mesh` must be a one-axis jax.sharding.Mesh (jbp.make_mesh), got {mesh!r}"
        )
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a whole copy on every device of ``mesh``."""
    return NamedSharding(_check_mesh(mesh), P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding that splits the leading (batch) axis over ``mesh``."""
    mesh = _check_mesh(mesh)
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy every leaf of ``tree`` (params, optimiser state) to every device of ``mesh``.

    With several processes every process must pass the same values (as they
    do when every process initialises from the same seed).
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf: Any) -> Any:
        if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jtu.tree_map(put, tree)


def is_main_process() -> bool:
    """Whether this is process 0, the one that prints and writes files."""
    return jax.process_index() == 0


def process_rows(batch: int, mesh: Mesh) -> slice:
    """The rows of a global batch of ``batch`` examples that this process loads.

    Each process owns the rows that go to its own devices in the mesh
    (contiguous when, as :func:`make_mesh` does, each process's devices are
    contiguous in the mesh). With one process, all of them.
    """
    mesh = _check_mesh(mesh)
    n = mesh.devices.size
    if batch % n:
        raise ValueError(
            f"the batch of {batch} examples does not split evenly over {n} devices; use a batch "
            f"size that is a multiple of {n}"
        )
    per_device = batch // n
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(
            "this process's devices are not contiguous in `mesh`; build it with make_mesh"
        )
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Split the leading axis of every leaf of ``tree`` (``x``, ``y``) over ``mesh``.

    Args:
      tree: arrays with a common leading batch axis, e.g. ``(x, y)``. With one
        process, the whole batch; with several, this process's rows of the
        global batch (:func:`process_rows`).
      mesh: a mesh from :func:`make_mesh`.

    Returns:
      ``tree`` with every leaf a global ``jax.Array`` sharded along its
      leading axis.

    Raises:
      ValueError: if a leaf has no batch axis, the leaves' batch sizes differ,
        or the batch does not split evenly over the devices.
    """
    sharding = batch_sharded(mesh)
    n = mesh.devices.size
    leaves, treedef = jtu.tree_flatten(tree)
    sizes = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError("`tree` holds a scalar; every leaf needs a leading batch axis")
        sizes.add(shape[0])
    if len(sizes) > 1:
        raise ValueError(f"the leaves of `tree` have different batch sizes {sorted(sizes)}")
    if jax.process_count() == 1:
        for size in sizes:
            if size % n:
                raise ValueError(
                    f"the batch of {size} examples does not split evenly over {n} devices; use a "
                    f"batch size that is a multiple of {n}"
                )
        return jax.device_put(tree, sharding)
    out = [jax.make_array_from_process_local_data(sharding, np.asarray(leaf)) for leaf in leaves]
    return jtu.tree_unflatten(treedef, out)


def data_parallel_step(step: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """Run a training step ``(state, x, y[, mask]) -> (state, metrics)`` on ``mesh``.

    The state stays replicated on every device; each global batch is split
    along the mesh's data axis (this process's rows, :func:`process_rows`),
    or, when its size does not divide by the number of devices (the last
    batch of an epoch), replicated whole, which gives the same result without
    the parallelism.

    Args:
      step: the pure step, e.g. ``jbp.make_step(..., jit=False)``.
      mesh: a mesh from :func:`make_mesh`.

    Returns:
      ``fn(state, x, y, mask=None)`` taking the global batch (and its padding mask,
      split like ``x``) as host arrays and returning
      the next state (replicated) and the metrics (replicated).
    """
    repl, split = replicated(mesh), batch_sharded(mesh)
    on_split = jax.jit(step, in_shardings=(repl, split, split), out_shardings=(repl, repl))
    on_whole = jax.jit(step, in_shardings=(repl, repl, repl), out_shardings=(repl, repl))
    masked_split = jax.jit(step, in_shardings=(repl,) + (split,) * 3, out_shardings=(repl, repl))
    masked_whole = jax.jit(step, in_shardings=(repl,) * 4, out_shardings=(repl, repl))
    n = mesh.devices.size

    def run(state: Any, x: Any, y: Any, mask: Any = None) -> Any:
        arrays = (x, y) if mask is None else (x, y, mask)
        if np.shape(x)[0] % n == 0:
            rows = process_rows(np.shape(x)[0], mesh)
            parts = shard_batch(tuple(np.asarray(a)[rows] for a in arrays), mesh)
            return (on_split if mask is None else masked_split)(state, *parts)
        whole = replicate(tuple(np.asarray(a) for a in arrays), mesh)
        return (on_whole if mask is None else masked_whole)(state, *whole)

    return run
