"""Side-by-side timing of jbp's gradients against their autodiff counterparts.

Each function is compiled first (compile time reported separately), then all
are timed interleaved, rotating the order each round, so that the noise of a
shared machine hits them alike; each timed call follows an untimed call of
the same function, so that one function's memory traffic does not land on the
next one's time. The functions that materialise per-example gradients
(gigabytes at batch 1024) are timed in a second phase, beside ``jax.grad``
again. Every ratio is to ``jax.grad`` timed in the same phase of the run.
Memory is XLA's static estimate for the compiled function (temporaries plus
outputs, excluding the arguments), the same measure for every row.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._backprop import backprop, objective
from ._per_example import (
    clipped_grad,
    per_example_grads,
    per_example_norms,
    sum_grad_squared,
)
from .layers import Conv, Dense, Flatten, Sequential, mlp, transformer

K = TypeVar("K", bound=Hashable)


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One function at one batch size."""

    batch: int
    name: str
    compile_s: float
    median_ms: float
    ratio: float
    memory_mib: float
    rounds: int


def _tree_norms(g: Any) -> jax.Array:
    leaves = jtu.tree_leaves(g)
    b = leaves[0].shape[0]
    return jnp.sqrt(sum(jnp.sum(leaf.reshape(b, -1) ** 2, axis=1) for leaf in leaves))


# Those that form every g_i, B·P numbers; timed in a phase of their own.
MATERIALISING = frozenset({"vmap(jax.grad)", "per_example_grads", "norms via vmap"})

# The functions :func:`benchmark` times, in table order.
BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad",
    "jbp.backprop",
    "vmap(jax.grad)",
    "per_example_grads",
    "norms via vmap",
    "per_example_norms",
    "sum_grad_squared",
    "clipped_grad",
)


# The CNN benchmark's rows (issue 9), a subset of BENCH_FUNCTIONS.
CNN_BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad",
    "jbp.backprop",
    "norms via vmap",
    "per_example_norms",
    "clipped_grad",
    "sum_grad_squared",
)
CNN_IN_SHAPE = (32, 32, 3)
# The transformer benchmark's rows (issue 10).
TRANSFORMER_BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad",
    "jbp.backprop",
    "norms via vmap",
    "per_example_norms",
    "clipped_grad",
)
TRANSFORMER_LENGTH = 64


def _transformer() -> Sequential:
    """The benchmark transformer, exactly the network of the PyTorch reference
    figures: vocab 128, length 64, 128 features, 4 heads, depth 2, MLP ratio 4,
    gelu, causal."""
    return transformer(128, TRANSFORMER_LENGTH, 128, 4, 2, mlp_ratio=4, activation="gelu")


def _cnn() -> Sequential:
    """The benchmark CNN, exactly the network of the PyTorch reference figures:
    (32, 32, 3) → Conv 3→32 3×3 SAME relu → Conv 32→64 3×3 stride 2 SAME relu →
    Conv 64→64 3×3 stride 2 SAME relu → Flatten → Dense 4096→10."""
    return Sequential(
        [
            Conv(3, 32, (3, 3), "relu"),
            Conv(32, 64, (3, 3), "relu", stride=2),
            Conv(64, 64, (3, 3), "relu", stride=2),
            Flatten(),
            Dense(4096, 10),
        ]
    )


def _functions(net: Any, loss: str, max_norm: float) -> dict[str, Callable[..., Any]]:
    ref = jax.grad(objective(net, loss))  # reference
    per_ex_ref = jax.vmap(ref, in_axes=(None, 0, 0))
    fns = {
        "jax.grad": ref,
        "jbp.backprop": backprop(net, loss),
        "vmap(jax.grad)": per_ex_ref,
        "per_example_grads": per_example_grads(net, loss),
        "norms via vmap": lambda p, x, y: _tree_norms(per_ex_ref(p, x, y)),
        "per_example_norms": per_example_norms(net, loss),
        "sum_grad_squared": sum_grad_squared(net, loss),
        "clipped_grad": clipped_grad(net, loss, max_norm),
    }
    assert tuple(fns) == BENCH_FUNCTIONS
    return fns


def _memory_mib(compiled: Any) -> float:
    try:
        m = compiled.memory_analysis()
        return (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
    except Exception:  # not every backend reports it
        return float("nan")


def _time_interleaved(
    compiled: Mapping[K, Callable[..., Any]],
    names: Sequence[K],
    args: tuple[Any, ...],
    rounds: int,
    budget_s: float,
) -> dict[K, list[float]]:
    """Seconds per call of each function, timed in rotating order, round by round."""
    times: dict[K, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = list(names[r % len(names) :]) + list(names[: r % len(names)])
        for name in order:
            if len(times[name]) >= 3 and sum(times[name]) > budget_s:
                continue
            # An untimed call first: the timed one then starts from this
            # function's own memory state, not from the previous function's.
            jax.block_until_ready(compiled[name](*args))
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            times[name].append(time.perf_counter() - t0)
    return times


def benchmark(
    sizes: Sequence[int] = (784, 512, 512, 10),
    *,
    arch: str = "mlp",
    batches: Sequence[int] | None = None,
    activation: str = "relu",
    loss: str = "softmax_xent",
    dtype: Any = jnp.float32,
    rounds: int = 30,
    budget_s: float = 10.0,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time jbp's gradient functions and their autodiff counterparts side by side.

    Args:
      sizes: MLP layer widths (``arch="mlp"``).
      arch: ``"mlp"`` (an MLP of ``sizes``), ``"cnn"``: the CNN on ``(B, 32, 32,
        3)`` images, Conv 3→32 3×3 SAME relu, Conv 32→64 3×3 stride 2 SAME relu,
        Conv 64→64 3×3 stride 2 SAME relu, Flatten, Dense 4096→10, timing
        :data:`CNN_BENCH_FUNCTIONS` by default; or ``"transformer"``:
        ``jbp.transformer(vocab=128, length=64, features=128, heads=4, depth=2,
        mlp_ratio=4, activation="gelu", causal=True)`` on tokens ``(B, 64)``
        with labels ``(B, 64)``, timing :data:`TRANSFORMER_BENCH_FUNCTIONS`
        (``sizes`` and ``activation`` unused for both).
      batches: batch sizes to run (default 64, 256, 1024 for the MLP; 32, 128
        for the CNN; 16, 64 for the transformer).
      activation, loss, dtype: the problem.
      rounds: interleaved timing rounds per batch size.
      budget_s: a function stops being timed once it has 3 rounds and its
        timed calls have used this many seconds (keeps ``vmap(jax.grad)`` at large batches short).
      only: restrict to these function names (``jax.grad`` is always run).
      log: called with a line per finished batch size.

    Returns:
      One :class:`BenchRow` per function and batch size.
    """
    if arch not in ("mlp", "cnn", "transformer"):
        raise ValueError(f"`arch` must be 'mlp', 'cnn' or 'transformer', got {arch!r}")
    in_shape: tuple[int, ...]
    if arch == "cnn":
        net, in_shape = _cnn(), CNN_IN_SHAPE
        batches = (32, 128) if batches is None else batches
        only = CNN_BENCH_FUNCTIONS if only is None else only
    elif arch == "transformer":
        net, in_shape = _transformer(), (TRANSFORMER_LENGTH,)
        batches = (16, 64) if batches is None else batches
        only = TRANSFORMER_BENCH_FUNCTIONS if only is None else only
    else:
        net, in_shape = mlp(list(sizes), activation), (sizes[0],)
        batches = (64, 256, 1024) if batches is None else batches
    out_shape = net.output_shape(in_shape)
    classes = out_shape[-1]
    params = net.init(jax.random.key(0), dtype)
    fns = _functions(net, loss, max_norm=1.0)
    if only is not None:
        unknown = set(only) - set(fns)
        if unknown:
            raise ValueError(f"unknown benchmark functions {sorted(unknown)}; known: {list(fns)}")
        fns = {k: v for k, v in fns.items() if k == "jax.grad" or k in only}
    rows = []
    for batch in batches:
        if arch == "transformer":  # token ids in, next-token labels out
            x = jax.random.randint(jax.random.key(1), (batch, *in_shape), 0, classes)
        else:
            x = jax.random.normal(jax.random.key(1), (batch, *in_shape), dtype)
        if loss == "softmax_xent":
            y = jax.random.randint(jax.random.key(2), (batch, *out_shape[:-1]), 0, classes)
        else:
            y = jax.random.uniform(jax.random.key(2), (batch, *out_shape), dtype)
        compiled, compile_s = {}, {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            compiled[name] = jax.jit(fn).lower(params, x, y).compile()
            compile_s[name] = time.perf_counter() - t0
            jax.block_until_ready(compiled[name](params, x, y))  # warm-up
        # Two phases, each with jax.grad as its own baseline: the functions
        # that materialise B·P numbers allocate and free gigabytes, whose page
        # faults would otherwise land on the fast functions timed beside them.
        names = list(fns)
        heavy = [n for n in names if n in MATERIALISING]
        light = [n for n in names if n not in MATERIALISING]
        for phase in (light, ["jax.grad", *heavy]) if heavy else (light,):
            times = _time_interleaved(compiled, phase, (params, x, y), rounds, budget_s)
            base = statistics.median(times["jax.grad"])
            for name in phase:
                if name == "jax.grad" and phase is not light:
                    continue
                med = statistics.median(times[name])
                rows.append(
                    BenchRow(
                        batch,
                        name,
                        compile_s[name],
                        med * 1e3,
                        med / base,
                        _memory_mib(compiled[name]),
                        len(times[name]),
                    )
                )
        rows[-len(names) :] = sorted(rows[-len(names) :], key=lambda r: names.index(r.name))
        if log is not None:
            log(format_benchmark([r for r in rows if r.batch == batch], header=False))
    return rows


@dataclasses.dataclass(frozen=True)
class BenchTarget:
    """A bound on the ratio of two functions' median times at one batch size.

    ``batch=None`` applies the bound at every batch size.
    """

    name: str
    baseline: str
    bound: float
    batch: int | None = None


# The cost model of DESIGN.md and the per-example issue, as ratios in one run.
BENCH_TARGETS: tuple[BenchTarget, ...] = (
    BenchTarget("jbp.backprop", "jax.grad", 1.05),
    BenchTarget("per_example_norms", "jax.grad", 0.8),
    BenchTarget("clipped_grad", "jax.grad", 1.15),
    BenchTarget("sum_grad_squared", "jax.grad", 1.4),
    BenchTarget("per_example_grads", "vmap(jax.grad)", 1.0),
    BenchTarget("per_example_norms", "norms via vmap", 1 / 30, 256),
)


# The CNN's targets (issue 9), as ratios in one run; PyTorch on the same network
# and kind of 2-core CPU: the best per-example norms 1.28–1.59× autograd.
BENCH_TARGETS_CNN: tuple[BenchTarget, ...] = (
    BenchTarget("jbp.backprop", "jax.grad", 1.05),
    BenchTarget("per_example_norms", "jax.grad", 1.2),
    BenchTarget("clipped_grad", "jax.grad", 1.35),
    BenchTarget("per_example_norms", "norms via vmap", 1.0),
)


# The transformer's targets (issue 10), as ratios in one run; PyTorch on the same
# network and kind of 2-core CPU: per-example norms 1.25–1.91× autograd, Opacus's
# full ghost-clipping step 2.14–2.42×.
BENCH_TARGETS_TRANSFORMER: tuple[BenchTarget, ...] = (
    BenchTarget("jbp.backprop", "jax.grad", 1.05),
    BenchTarget("per_example_norms", "jax.grad", 1.3),
    BenchTarget("clipped_grad", "jax.grad", 1.5),
    BenchTarget("per_example_norms", "norms via vmap", 1.0),
)


def check_targets(
    rows: Sequence[BenchRow], targets: Sequence[BenchTarget] = BENCH_TARGETS
) -> list[tuple[BenchTarget, int, float, bool]]:
    """Each target at each batch size that has both functions:
    ``(target, batch, measured ratio, met)``."""
    by = {(r.batch, r.name): r.ratio for r in rows}  # each to jax.grad of its own phase
    out = []
    for t in targets:
        for batch in sorted({r.batch for r in rows}):
            if t.batch is not None and batch != t.batch:
                continue
            if (batch, t.name) not in by or (batch, t.baseline) not in by:
                continue
            ratio = by[batch, t.name] / by[batch, t.baseline]
            out.append((t, batch, ratio, ratio <= t.bound))
    return out


def format_targets(checked: Sequence[tuple[BenchTarget, int, float, bool]]) -> str:
    """One line per :func:`check_targets` result."""
    return "\n".join(
        f"batch {batch:>5}: {t.name} / {t.baseline} = {ratio:.3f} "
        f"(target ≤ {t.bound:.3g}) {'met' if met else 'MISSED'}"
        for t, batch, ratio, met in checked
    )


def format_benchmark(rows: Sequence[BenchRow], *, header: bool = True) -> str:
    """A fixed-width table of :func:`benchmark` rows."""
    lines = []
    if header:
        lines.append(
            f"{'batch':>6}  {'function':<18} {'median ms':>10} {'× jax.grad':>10} "
            f"{'compile s':>9} {'memory MiB':>10} {'rounds':>6}"
        )
        lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r.batch:>6}  {r.name:<18} {r.median_ms:>10.3f} {r.ratio:>10.2f} "
            f"{r.compile_s:>9.2f} {r.memory_mib:>10.1f} {r.rounds:>6}"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ScalingRow:
    """One function on ``devices`` devices at a fixed global batch."""

    devices: int
    name: str
    median_ms: float
    speedup: float  # time on the first device count (1 by default) / time on ``devices``
    rounds: int


def benchmark_scaling(
    sizes: Sequence[int] = (784, 512, 512, 10),
    *,
    batch: int = 1024,
    devices: Sequence[int] | None = None,
    activation: str = "relu",
    loss: str = "softmax_xent",
    dtype: Any = jnp.float32,
    rounds: int = 20,
) -> list[ScalingRow]:
    """Data-parallel scaling: the same global batch split over 1, 2, 4, … devices.

    Times ``jbp.backprop``, ``per_example_norms``, ``clipped_grad`` and an adam
    training step (``jbp.make_step``) with params replicated and the batch
    sharded (:func:`jbp.shard_batch`), interleaved over device counts.

    Args:
      sizes: MLP layer widths.
      batch: the global batch; must divide by every device count.
      devices: device counts (default 1, 2, 4, … up to ``len(jax.devices())``).
      activation, loss, dtype: the problem.
      rounds: timing rounds.

    Returns:
      One :class:`ScalingRow` per device count and function.
    """
    import optax

    from ._sharding import make_mesh, replicate, shard_batch
    from ._train import init_state, make_step

    available = len(jax.devices())
    if devices is None:
        devices = [2**k for k in range(available.bit_length()) if 2**k <= available]
    for n in devices:
        if n > available or batch % n:
            raise ValueError(f"cannot split a batch of {batch} over {n} of the {available} devices")
    net = mlp(list(sizes), activation)
    opt = optax.adam(1e-3)
    state = init_state(net, opt, jax.random.key(0), dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]), dtype)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])
    fns = {
        "jbp.backprop": lambda s, a, b: backprop(net, loss)(s.params, a, b),
        "per_example_norms": lambda s, a, b: per_example_norms(net, loss)(s.params, a, b),
        "clipped_grad": lambda s, a, b: clipped_grad(net, loss, 1.0)(s.params, a, b),
        "train step (adam)": make_step(net, loss, opt, jit=False),
    }
    compiled, args = {}, {}
    for n in devices:
        mesh = make_mesh(n)
        args[n] = (replicate(state, mesh), *shard_batch((x, y), mesh))
        for name, fn in fns.items():
            compiled[n, name] = jax.jit(fn).lower(*args[n]).compile()
    keys = list(compiled)
    bound = {k: (lambda k=k: compiled[k](*args[k[0]])) for k in keys}
    times = _time_interleaved(bound, keys, (), rounds, budget_s=math.inf)
    rows = []
    for n, name in keys:
        med = statistics.median(times[n, name])
        one = statistics.median(times[devices[0], name])
        rows.append(ScalingRow(n, name, med * 1e3, one / med, len(times[n, name])))
    return rows


def format_scaling(rows: Sequence[ScalingRow]) -> str:
    """A fixed-width table of :func:`benchmark_scaling` rows."""
    lines = [f"{'devices':>7}  {'function':<18} {'median ms':>10} {'speedup':>8}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(f"{r.devices:>7}  {r.name:<18} {r.median_ms:>10.3f} {r.speedup:>8.2f}")
    return "\n".join(lines)
