"""``jbp bench --dots``: per-example gradient dot products and the in-run Shapley step,
timed beside their autodiff and plain-training counterparts in one run."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._attribution import per_example_dots
from ._backprop import objective
from ._bench import (
    CNN_IN_SHAPE,
    DISPATCH_FLOOR,
    MIN_SAMPLE_S,
    TRANSFORMER_LENGTH,
    BenchRow,
    BenchTarget,
    _cnn,
    _dispatch_floor,
    _row,
    _time_interleaved,
    _transformer,
    check_precision,
    compile_calls,
    default_batches,
    format_benchmark,
    precision_context,
    warm_up,
)
from ._losses import get_loss
from ._train_shapley import shapley_step
from .layers import mlp

DOTS_BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad",
    "per_example_dots",
    "vmap(jax.grad) dots",
    "jbp step",
    "shapley step",
)

# Targets (issue 19), as ratios in one run: dots ≥ 10× faster than materialising both
# sides on the MLP; the in-run Shapley step ≤ 1.3× a plain step on the MLP and the CNN.
BENCH_TARGETS_DOTS: dict[str, tuple[BenchTarget, ...]] = {
    "mlp": (
        BenchTarget("per_example_dots", "vmap(jax.grad) dots", 0.1),
        BenchTarget("shapley step", "jbp step", 1.3),
    ),
    "cnn": (BenchTarget("shapley step", "jbp step", 1.3),),
    "transformer": (),
}


@dataclasses.dataclass(frozen=True)
class DotsBench:
    """One :func:`benchmark_dots` run: the network, the sizes and the rows."""

    arch: str
    batch: int  # B: training rows of the dots and of the steps
    query: int  # B_other: query rows of the dots
    validation: int  # V: validation rows of the Shapley step
    rows: tuple[BenchRow, ...]


def _data(arch: str, rows: int, seed: int, features: int, classes: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    if arch == "transformer":
        tokens = rng.integers(0, 128, (rows, TRANSFORMER_LENGTH)).astype(np.int32)
        return jnp.asarray(tokens), jnp.asarray(rng.integers(0, 128, tokens.shape).astype(np.int32))
    shape = CNN_IN_SHAPE if arch == "cnn" else (features,)
    x = rng.standard_normal((rows, *shape), dtype=np.float32)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, classes, rows).astype(np.int32))


def benchmark_dots(
    *,
    arch: str = "mlp",
    sizes: Sequence[int] = (784, 512, 512, 10),
    batch: int | None = None,
    query: int | None = None,
    validation: int = 32,
    rounds: int = 20,
    budget_s: float = 10.0,
    log: Callable[[str], None] | None = None,
    precision: str | None = None,
    sample_s: float = MIN_SAMPLE_S,
) -> DotsBench:
    """Time ``per_example_dots`` and the in-run Shapley step beside autodiff.

    The networks of :func:`jbp.benchmark` (``arch``: the MLP of ``sizes``, the CNN, the
    transformer), ``softmax_xent``, float32, random data. Rows (ratios to ``jax.grad``
    of ``batch`` rows):

    - ``jax.grad``: the batch gradient of ``batch`` rows (the ratio column's base);
    - ``per_example_dots``: the ``(batch, query)`` matrix ⟨g_i, g'_j⟩ from the factors;
    - ``vmap(jax.grad) dots``: both sides' per-example gradients by ``vmap(jax.grad)``,
      flattened and multiplied (``(batch + query)·P`` numbers);
    - ``jbp step``: a plain SGD training step (``jbp.make_step``, the δ equations);
    - ``shapley step``: the step of ``fit(..., shapley=...)`` with ``validation``
      validation rows joining its pass (the values of its ``batch`` examples);
    - :data:`DISPATCH_FLOOR`: a trivial function of ``jax.grad``'s arguments.

    ``batch`` and ``query`` default to 256 (1024 on an accelerator). Timing (K calls
    per sample), memory and ``precision`` as in :func:`jbp.benchmark`.
    """
    import optax

    from ._train import init_state, make_step

    if arch == "mlp":
        net = mlp(list(sizes), "relu")
    elif arch == "cnn":
        net, sizes = _cnn(), (0, 10)
    elif arch == "transformer":
        net = _transformer()
    else:
        raise ValueError(f"`arch` must be 'mlp', 'cnn' or 'transformer', got {arch!r}")
    check_precision(precision)
    batch = default_batches(arch, "dots")[0] if batch is None else batch
    query = batch if query is None else query
    loss = "softmax_xent"
    x, y = _data(arch, batch, 0, sizes[0], sizes[-1])
    xq, yq = _data(arch, query, 1, sizes[0], sizes[-1])
    xv, yv = _data(arch, validation, 2, sizes[0], sizes[-1])
    opt = optax.sgd(0.01)
    state = init_state(net, opt, jax.random.key(0))
    grad = jax.grad(objective(net, loss))  # reference

    def materialised(p: Any, x: Any, y: Any, xq: Any, yq: Any) -> Any:
        per = jax.vmap(grad, in_axes=(None, 0, 0))  # reference

        def flat(g: Any) -> Any:
            leaves = jax.tree_util.tree_leaves(g)
            return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], 1)

        return flat(per(p, x[:, None], y[:, None])) @ flat(per(p, xq[:, None], yq[:, None])).T

    calls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
        "jax.grad": (grad, (state.params, x, y)),
        "per_example_dots": (per_example_dots(net, loss), (state.params, x, y, xq, yq)),
        "vmap(jax.grad) dots": (materialised, (state.params, x, y, xq, yq)),
        "jbp step": (make_step(net, loss, opt, jit=False), (state, x, y)),
        "shapley step": (
            shapley_step(net, get_loss(loss), opt, 0.01),
            (state, x, y, None, xv, yv, None),
        ),
    }
    grad_args = (state.params, x, y)
    calls[DISPATCH_FLOOR] = (_dispatch_floor(grad_args), grad_args)
    names = [*DOTS_BENCH_FUNCTIONS, DISPATCH_FLOOR]
    with precision_context(precision):
        compiled, compile_s, bound = compile_calls(calls)
        peaks = warm_up(bound, compiled)
        times, k = _time_interleaved(bound, names, (), rounds, budget_s, sample_s)
    base = statistics.median(times["jax.grad"])
    rows = tuple(
        _row(batch, name, times[name], base, compile_s, compiled, k, peaks) for name in names
    )
    result = DotsBench(arch, batch, query, validation, rows)
    if log is not None:
        log(format_dots_benchmark(result))
    return result


def format_dots_benchmark(result: DotsBench) -> str:
    return (
        f"{result.arch}: B = {result.batch} training rows, B_other = {result.query} query "
        f"rows, V = {result.validation} validation rows in the Shapley step\n"
        + format_benchmark(result.rows)
    )
