"""Per-example gradient analysis from the δ equations, at the cost of one backward pass.

For a batch, the backward pass already holds every example's activation a_i
and δ_i at every layer. From them each parameterised layer forms, without
materialising g_i = ∂ℓ_i/∂θ:

- ‖g_i‖² (Dense: ‖a_i‖²‖δ_i‖² + ‖δ_i‖²; layers that sum over positions,
  such as Conv, take the Gram form or materialise g_i, whichever is cheaper),
- Σ_i g_i² elementwise (Dense: (a²)ᵀ(δ²)),
- Σ_i c_i g_i for per-example weights c (Dense: aᵀ(c ⊙ δ)), which gives
  clipping in one backward pass plus one re-weighted weight-gradient pass.

Per-example gradients are always unscaled, ``g_i = ∂ℓ_i/∂θ``; the batch
gradient is ``Σ_i g_i`` (``"sum"`` losses) or ``mean_i g_i`` (``"mean"``).
Wrap the returned functions in ``jax.jit``: the weight-gradient matmuls that
a quantity does not need are then removed by XLA.

Each built-in parameterised layer names the factorisation of each of its
leaves (``grad_factors``: outer products ``Σ_t ã_it ⊗ δ_it`` for Dense and
Conv, elementwise products for norm layers and biases) and every quantity
is written once per factorisation (:mod:`jbp.layers._factors`). Combinators
are transparent: the δ recursion of the whole tree visits every leaf layer.
A user layer takes part by implementing ``grad_factors``, or
``per_example_grads(params, cache, delta_out)`` with optional
``per_example_sq_norms``, ``sum_grad_squared`` and ``weighted_grads``
(without them jbp materialises that layer's g_i). ``delta_out`` holds the
per-example ``∂ℓ_i/∂out`` in row ``i``. A leaf shared by two layers
(:class:`jbp.Tied`) gets the factors of both uses, so its quantities are exact,
the cross term ``2⟨g_i¹, g_i²⟩`` of its squared norm included.

Every function returned here takes, after its positional arguments, the
keywords of :func:`jbp.backprop`: ``mask`` (a padding mask ``(batch, T)``: a
padded position contributes nothing to any example's quantity) and
``dropout_key``; and ``example_mask``, boolean ``(batch,)``, False at rows
that are padding rather than examples (a Poisson batch padded to a fixed
shape, :class:`jbp.PoissonSampler`): such a row contributes exactly zero to
every quantity whatever it holds (NaN included), its own gradient and norm
are zero, and the batch counts its real examples only.

Memory (``chunk_size``, a keyword of every factory here). A quantity that forms
g_i (``per_example_grads``; the norms of :func:`per_example_norms`,
:func:`clipped_grad` and :func:`dp_grad` with ``method="materialise"``, or
where ``"auto"`` picks it; ``sum_grad_squared`` and ``grad_variance`` for leaves
that sum over positions) holds B·P floats of them at once, besides the forward
pass's caches and δ, B·A (A: one example's activations). With
``chunk_size=K`` the batch goes through in ⌈B/K⌉ chunks of K examples
(``lax.map``; a last, partial chunk is padded with rows marked as padding, which
add exactly zero): about K·(P + A) at once, plus the result (B·P for
``per_example_grads`` whatever K; B norms; P for the sums). Every argument is
checked on the whole batch first; ``mask`` and ``example_mask`` are split with
the rows. With a ``dropout_key``, chunk k draws its masks from
``jax.random.fold_in(dropout_key, k)``, so the draws differ from an unchunked
call's (a ``chunk_size`` ≥ B is the unchunked call). ``None`` (the default): the
whole batch at once. Measured (XLA's compiled memory analysis, float32, CPU) on
the benchmark transformer ``transformer(128, 64, 128, 4, 2)`` (P = 437 888) at
B = 256, temporaries: ``per_example_norms(..., method="materialise")`` 0.56 GB,
0.065 GB with ``chunk_size=32``; ``clipped_grad(..., method="materialise")``
0.64 GB, 0.086 GB; ``sum_grad_squared`` 0.56 GB, 0.079 GB; ``per_example_grads``
0.32 GB, 0.070 GB (its result: 0.45 GB).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._backprop import Batch, check_net, keeps_positions, prepare
from ._checks import check_example_mask, params_dtype
from ._losses import Loss, get_loss
from .layers import Sequential
from .layers._base import Context, backward_walk, has_params
from .layers._factors import (
    Elementwise,
    check_method,
    is_leaf_factor,
    per_example_grad,
    sq_norm,
    sum_sq,
    weighted,
)

Array = jax.Array
Params = Any


def _grads_method(layer: Any) -> Callable[..., Any]:
    """The layer's ``per_example_grads``, which every layer with params needs
    unless it gives ``grad_factors``."""
    method = getattr(layer, "per_example_grads", None)
    if method is None:
        raise TypeError(
            f"layer {layer!r} has parameters but no per_example_grads(params, cache, delta_out); "
            "implement it (or grad_factors) to use per-example analysis"
        )
    return method


def _tree_sum(values: list[Array]) -> Array:
    return sum(values[1:], values[0])


class _Done(NamedTuple):
    """A quantity a layer without ``grad_factors`` formed by its own methods."""

    value: Any


def _own_quantity(name: str, layer: Any, p: Params, cache: Any, d: Array, *extra: Any) -> Any:
    """``name`` of a layer without factors: its own method, or from its g_i."""
    own = getattr(layer, name, None)
    if own is not None:
        return own(p, cache, d, *extra)
    g = _grads_method(layer)(p, cache, d)
    if name == "per_example_sq_norms":
        return _tree_sum(
            [jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in jtu.tree_leaves(g)]
        )
    if name == "sum_grad_squared":
        return jtu.tree_map(lambda leaf: jnp.sum(leaf * leaf, axis=0), g)
    return jtu.tree_map(partial(jnp.tensordot, extra[0], axes=1), g)


def _from_factor(name: str, f: Any, *extra: Any, method: str) -> Array:
    """``name`` of one leaf from its factor (a :class:`Sum` for a shared leaf)."""
    if name == "per_example_grads":
        return per_example_grad(f)
    if name == "per_example_sq_norms":
        return sq_norm(f, method)
    if name == "sum_grad_squared":
        return sum_sq(f)
    return weighted(f, extra[0], method)


def walk_quantity(
    net: Any, params: Params, caches: Any, delta: Array, name: str, *extra: Any, method: str
) -> Any:
    """``name`` for every leaf layer of ``net`` (a layer or combinator) by the δ
    recursion of the whole tree: a tree like params, ``{}`` where a layer has no params.

    A layer with ``grad_factors`` hands over its factors during the walk (so that a
    leaf shared by two layers gets both uses' factors, :class:`Sum`); the quantity is
    formed from them afterwards, leaf by leaf (``per_example_sq_norms``: one
    ``(batch,)`` array per leaf). A layer without them forms it by its own methods.
    """

    def at_leaf(layer: Any, p: Params, cache: Any, d: Array) -> Any:
        if not has_params(p):
            return p
        grad_factors = getattr(layer, "grad_factors", None)
        if grad_factors is not None:
            return grad_factors(p, cache, d)
        return _Done(_own_quantity(name, layer, p, cache, d, *extra))

    results, _ = backward_walk(net, params, caches, delta, at_leaf)

    def finish(x: Any) -> Any:
        if isinstance(x, _Done):
            return x.value
        return _from_factor(name, x, *extra, method=method)

    return jtu.tree_map(
        finish, results, is_leaf=lambda x: is_leaf_factor(x) or isinstance(x, _Done)
    )


def as_factors(layer: Any, p: Params, cache: Any, d: Array) -> Any:
    """The factors of a leaf layer's params: its ``grad_factors``, or else its
    materialised ``g_i``, each leaf as an :class:`Elementwise` factor of one position
    (``g_i = Σ_t 1 ⊙ δ_it`` with ``δ_i0 = g_i``), so every quantity written per factor
    kind takes it."""
    grad_factors = getattr(layer, "grad_factors", None)
    if grad_factors is not None:
        return grad_factors(p, cache, d)
    grads = _grads_method(layer)(p, cache, d)
    return jtu.tree_map(
        lambda g: Elementwise(None, g.reshape(g.shape[0], 1, -1), g.shape[1:]), grads
    )


def walk_factors(net: Any, params: Params, caches: Any, delta: Array) -> Any:
    """The factors of every leaf of ``net`` by the δ recursion of the whole tree
    (see :func:`as_factors`): a tree like params (``{}`` where a layer has none)."""

    def at_leaf(layer: Any, p: Params, cache: Any, d: Array) -> Any:
        return as_factors(layer, p, cache, d) if has_params(p) else p

    return backward_walk(net, params, caches, delta, at_leaf)[0]


class _Pass(NamedTuple):
    """One forward pass and the unscaled per-example output δ, ready for quantities."""

    net: Sequential
    params: Params
    caches: tuple[Any, ...]
    delta: Array
    out: Array
    batch: Batch
    example_mask: Array | None = None  # (batch,), False at padding rows

    def quantity(self, name: str, *extra: Any, method: str = "auto") -> tuple[Any, ...]:
        """``name`` for every leaf layer, in a tree like params (``{}`` where a layer
        has no params), by the δ recursion of the whole network."""
        return walk_quantity(
            self.net, self.params, self.caches, self.delta, name, *extra, method=method
        )

    def factors(self) -> tuple[Any, ...]:
        """Every leaf's factor (:func:`walk_factors`), one entry per top-level layer."""
        return walk_factors(self.net, self.params, self.caches, self.delta)


def _rows(m: Array, a: Array) -> Array:
    """The example mask ``(batch,)`` shaped to broadcast against ``a`` ``(batch, ...)``."""
    return m.reshape(m.shape + (1,) * (a.ndim - 1))


def _forward(net: Sequential, params: Params, batch: Batch, example_mask: Any = None) -> _Pass:
    """The forward pass and the per-example output δ. Rows where ``example_mask`` is
    False are padding: their ``x`` and ``y`` are replaced by zeros before the forward
    (so NaN or Inf there reach no number) and their δ is zero, so every per-example
    quantity of theirs is exactly zero."""
    if example_mask is not None:
        x, y = batch.x, batch.y
        zero = lambda a: jnp.where(_rows(example_mask, a), a, jnp.zeros((), a.dtype))  # noqa: E731
        batch = batch._replace(x=zero(x), y=zero(y))
    out, caches = net.forward(params, batch.x, batch.context)
    delta = batch.loss.delta(out, batch.y)
    if example_mask is not None:
        delta = jnp.where(_rows(example_mask, delta), delta, jnp.zeros((), delta.dtype))
    return _Pass(net, params, caches, delta, out, batch, example_mask)


def _start(
    net: Sequential,
    loss: Loss,
    params: Params,
    x: Any,
    y: Any,
    mask: Any,
    dropout_key: Any,
    example_mask: Any,
) -> tuple[_Pass, Array | None]:
    """Check every argument (:func:`_checked`), then the forward pass (:func:`_forward`)."""
    b, em = _checked(net, loss, params, x, y, mask, dropout_key, example_mask)
    return _forward(net, params, b, em), em


def check_chunk_size(chunk_size: Any) -> int | None:
    """``chunk_size`` is None (everything at once) or a positive int."""
    if chunk_size is None:
        return None
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or int(chunk_size) < 1
    ):
        raise ValueError(
            f"`chunk_size` must be None (all at once) or a positive int, got {chunk_size!r}"
        )
    return int(chunk_size)


def _pad_rows(a: Array | None, pad: int, fill: Any = 0) -> Array | None:
    if a is None or pad == 0:
        return a
    return jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)])


def _by_examples(
    net: Sequential,
    loss: Loss,
    params: Params,
    b: Batch,
    em: Array | None,
    chunk: int | None,
    body: Callable[[_Pass], tuple[Any, Any]],
) -> tuple[Any, Any]:
    """``body`` of the forward pass of every chunk of ``chunk`` examples, one chunk at a
    time (``lax.map``): ``body(run) -> (rows, sums)``, ``rows`` with a leading batch
    axis (concatenated over the chunks) and ``sums`` summed over them. A last, partial
    chunk is padded with rows that the example mask marks as padding (they add exactly
    zero and are cut off). ``loss`` is the unbound loss (each chunk binds its own rows of
    the padding mask); with a dropout key, chunk k draws with ``fold_in(key, k)``."""
    rows = b.x.shape[0]
    if chunk is None or chunk >= rows:
        return body(_forward(net, params, b, em))
    n = -(-rows // chunk)
    pad = n * chunk - rows
    if pad:  # the padding rows are marked as such
        em = jnp.ones((rows,), bool) if em is None else em
    keeps = keeps_positions((rows, *net.output_shape(tuple(b.x.shape[1:]))), tuple(b.x.shape))
    key = b.context.key

    def split(a: Array | None, fill: Any = 0) -> Array | None:
        a = _pad_rows(a, pad, fill)
        return None if a is None else a.reshape((n, chunk, *a.shape[1:]))

    def one(args: tuple[Any, ...]) -> tuple[Any, Any]:
        i, xc, yc, mc, ec = args
        context = Context(mc, None if key is None else jax.random.fold_in(key, i))
        batch = Batch(xc, yc, context, loss.with_mask(mc if keeps else None))
        return body(_forward(net, params, batch, ec))

    xs = (jnp.arange(n), split(b.x), split(b.y), split(b.context.mask, True), split(em, False))
    per_row, sums = jax.lax.map(one, xs)
    per_row = jtu.tree_map(lambda a: a.reshape((n * chunk, *a.shape[2:]))[:rows], per_row)
    return per_row, jtu.tree_map(lambda a: jnp.sum(a, axis=0), sums)


def _checked(
    net: Sequential,
    loss: Loss,
    params: Params,
    x: Any,
    y: Any,
    mask: Any,
    dropout_key: Any,
    example_mask: Any,
) -> tuple[Batch, Array | None]:
    """Check every argument (before any chunking): the whole batch and its example mask."""
    b = prepare(net, loss, params, x, y, mask, dropout_key)
    return b, check_example_mask(example_mask, b.x.shape[0])


def _dtype(params: Params, batch: Batch) -> Any:
    """The floating dtype of the computation: the params' (``x`` may be integer tokens)."""
    return params_dtype(params) or batch.x.dtype


def _like(params: Params, per_layer: tuple[Any, ...]) -> Params:
    return list(per_layer) if isinstance(params, list) else per_layer


def _setup(net: Any, loss: str | Loss) -> tuple[Sequential, Loss]:
    return check_net(net), get_loss(loss)


def _sq_norms(run: _Pass, batch: int, dtype: Any, method: str) -> Array:
    """Squared norms per top-level layer, ``(batch, layers)``."""
    per_layer = run.quantity("per_example_sq_norms", method=method)
    cols = []
    for q in per_layer:
        leaves = jtu.tree_leaves(q)
        cols.append(_tree_sum(leaves) if leaves else jnp.zeros((batch,), dtype))
    return jnp.stack(cols, axis=1)


def per_example_grads(
    net: Any, loss: str | Loss, *, chunk_size: int | None = None
) -> Callable[..., Params]:
    """Every example's gradient ``g_i = ∂ℓ_i/∂θ`` (unscaled).

    Args:
      net, loss: the network and loss.
      chunk_size: examples per chunk (``None``: the whole batch at once). The
        result holds ``B·P`` numbers whatever the chunk; the chunk bounds the
        rest (see "Memory" in :mod:`jbp._per_example`).

    Returns:
      ``fn(params, x, y) -> grads``: like ``params`` with a leading batch axis
      on every leaf (Dense ``w``: ``(batch, fan_in, fan_out)``). The batch
      gradient is the sum or mean over that axis, by the loss's reduction. A
      single example (no batch axis) gives a batch axis of 1.
    """
    net, loss = _setup(net, loss)
    chunk = check_chunk_size(chunk_size)

    def fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None,
        example_mask: Any = None,
    ) -> Params:  # fmt: skip
        b, em = _checked(net, loss, params, x, y, mask, dropout_key, example_mask)
        grads, _ = _by_examples(
            net, loss, params, b, em, chunk, lambda run: (run.quantity("per_example_grads"), ())
        )
        return _like(params, grads)

    return fn


def per_example_norms(
    net: Any,
    loss: str | Loss,
    *,
    per_layer: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Callable[..., Array]:
    """‖g_i‖ for every example, without forming g_i where that is cheaper.

    Dense on ``(batch, features)``: ``‖g_i(w)‖² = ‖a_i‖²‖δ_i‖²``. Layers whose
    gradient sums over positions t (Conv, Dense on sequences) take the Gram
    ("ghost") form ``Σ_{t,s} (a_it·a_is)(δ_it·δ_is)`` or materialise g_i from
    their patches, whichever costs fewer flops (see :mod:`jbp.layers._factors`).

    Args:
      net, loss: the network and loss.
      per_layer: return one norm per top-level layer instead of the total.
      method: ``"auto"`` (the cheaper form per layer), ``"gram"`` or
        ``"materialise"`` (one form everywhere; both give the same norms).
      chunk_size: examples per chunk (``None``: the whole batch at once; see
        "Memory" in :mod:`jbp._per_example`).

    Returns:
      ``fn(params, x, y)``: ``(batch,)`` norms over all parameters, or
      ``(batch, layers)`` norms per entry of ``net.layers`` (0 for
      parameterless ones) whose squares add up to the squared total.
    """
    net, loss = _setup(net, loss)
    check_method(method)
    chunk = check_chunk_size(chunk_size)

    def fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None,
        example_mask: Any = None,
    ) -> Array:  # fmt: skip
        b, em = _checked(net, loss, params, x, y, mask, dropout_key, example_mask)

        def body(run: _Pass) -> tuple[Array, Any]:
            return _sq_norms(run, run.batch.x.shape[0], _dtype(params, b), method), ()

        sq, _ = _by_examples(net, loss, params, b, em, chunk, body)
        return jnp.sqrt(sq) if per_layer else jnp.sqrt(jnp.sum(sq, axis=1))

    return fn


def sum_grad_squared(
    net: Any, loss: str | Loss, *, chunk_size: int | None = None
) -> Callable[..., Params]:
    """The elementwise second moment ``Σ_i g_i²`` (BackPACK's SumGradSquared).

    ``chunk_size``: examples per chunk (``None``: the whole batch at once; see
    "Memory" in :mod:`jbp._per_example`).

    Returns:
      ``fn(params, x, y)``: like ``params``; Dense ``w`` on ``(batch, features)``:
      ``(a²)ᵀ(δ²)``, no g_i formed. (Layers that sum over positions form g_i.)
    """
    net, loss = _setup(net, loss)
    chunk = check_chunk_size(chunk_size)

    def fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None,
        example_mask: Any = None,
    ) -> Params:  # fmt: skip
        b, em = _checked(net, loss, params, x, y, mask, dropout_key, example_mask)
        _, sq = _by_examples(
            net, loss, params, b, em, chunk, lambda run: ((), run.quantity("sum_grad_squared"))
        )
        return _like(params, sq)

    return fn


def grad_variance(
    net: Any, loss: str | Loss, *, ddof: int = 0, chunk_size: int | None = None
) -> Callable[..., Params]:
    """The elementwise variance of the per-example gradients g_i over the batch.

    ``Var = (Σ_i g_i² − B·ḡ²) / (B − ddof)`` with ``ḡ = mean_i g_i``
    (``ddof=0``: population variance, BackPACK's Variance; ``ddof=1``:
    unbiased). Clamped at 0 against round-off. ``chunk_size``: examples per
    chunk (``None``: the whole batch at once; see "Memory" in
    :mod:`jbp._per_example`).

    Returns:
      ``fn(params, x, y)``: like ``params``.
    """
    net, loss = _setup(net, loss)
    if ddof not in (0, 1):
        raise ValueError(f"`ddof` must be 0 or 1, got {ddof!r}")
    chunk = check_chunk_size(chunk_size)

    def fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None,
        example_mask: Any = None,
    ) -> Params:  # fmt: skip
        batch, em = _checked(net, loss, params, x, y, mask, dropout_key, example_mask)
        rows, dtype = batch.x.shape[0], _dtype(params, batch)
        if rows - ddof < 1:
            raise ValueError(
                f"`x` has batch {rows}; a variance with ddof={ddof} needs at least {ddof + 1}"
            )
        b = rows if em is None else jnp.sum(em).astype(dtype)  # the real examples

        def body(run: _Pass) -> tuple[Any, Any]:
            ones = jnp.ones((run.batch.x.shape[0],), dtype)
            return (), (run.quantity("sum_grad_squared"), run.quantity("weighted_grads", ones))

        _, (sq, total) = _by_examples(net, loss, params, batch, em, chunk, body)

        def var(s: Array, t: Array) -> Array:
            mean = t / b
            return jnp.maximum((s - b * mean * mean) / (b - ddof), 0)

        return _like(params, jtu.tree_map(var, sq, total))

    return fn


def _check_max_norm(max_norm: Any) -> None:
    if isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool):
        if math.isnan(max_norm) or max_norm <= 0:
            raise ValueError(f"`max_norm` must be positive (or math.inf), got {max_norm!r}")
    elif not hasattr(max_norm, "dtype"):
        raise TypeError(f"`max_norm` must be a positive number, got {type(max_norm).__name__}")


def clip_factors(norms: Array, max_norm: Any) -> Array:
    """``min(1, max_norm/‖g_i‖)``, written without dividing by zero or by inf."""
    over = norms > max_norm
    return jnp.where(over, max_norm / jnp.where(over, norms, 1), jnp.ones_like(norms))


class ClippedSum(NamedTuple):
    """One batch's clipped sum and what a DP step reports about it.

    Attributes:
      grads: ``Σ_i min(1, C/‖g_i‖) g_i`` over the real examples, unscaled, like params.
      norms: the unclipped ``‖g_i‖``, ``(batch,)`` (0 at padding rows).
      loss_sum: ``Σ_i ℓ_i`` over the real examples.
      examples: how many real examples the batch holds.
    """

    grads: Params
    norms: Array
    loss_sum: Array
    examples: Array


def clipped_sum(
    net: Sequential, loss: Loss, max_norm: Any, method: str, chunk: int | None = None
) -> Callable[..., ClippedSum]:
    """``fn(params, x, y, *, mask, dropout_key, example_mask) -> ClippedSum`` on checked
    ``net``, ``loss``, ``max_norm`` and ``chunk`` (examples per chunk, or None): one
    forward, one backward for the norms, one re-weighted weight-gradient pass."""

    def fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None,
        example_mask: Any = None,
    ) -> ClippedSum:  # fmt: skip
        b, em = _checked(net, loss, params, x, y, mask, dropout_key, example_mask)
        dtype = _dtype(params, b)

        def body(run: _Pass) -> tuple[Any, Any]:
            n = run.batch.x.shape[0]
            norms = jnp.sqrt(jnp.sum(_sq_norms(run, n, dtype, method), axis=1))
            grads = run.quantity("weighted_grads", clip_factors(norms, max_norm), method=method)
            per_example = run.batch.loss.per_example(run.out, run.batch.y)
            real = jnp.ones((n,), bool) if run.example_mask is None else run.example_mask
            loss_sum = jnp.sum(jnp.where(real, per_example, jnp.zeros((), per_example.dtype)))
            return norms, (grads, loss_sum, jnp.sum(real.astype(jnp.int32)))

        norms, (grads, loss_sum, examples) = _by_examples(net, loss, params, b, em, chunk, body)
        return ClippedSum(_like(params, grads), norms, loss_sum, examples)

    return fn


def clipped_grad(
    net: Any,
    loss: str | Loss,
    max_norm: float,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Callable[..., tuple[Params, Array]]:
    """The per-example-clipped gradient in one backward pass (ghost clipping).

    ``Σ_i min(1, max_norm/‖g_i‖) g_i`` for ``"sum"`` losses, and that over B
    for ``"mean"`` losses (B: the real examples, with an ``example_mask``). The
    norms come from (a_i, δ_i) as in :func:`per_example_norms`; the clipped sum
    is one re-weighted weight-gradient pass ``aᵀ(c ⊙ δ)`` per layer, or, for a
    layer whose norm materialised g_i, ``Σ_i c_i g_i`` from them.

    Args:
      net, loss: the network and loss.
      max_norm: the clipping threshold (``math.inf`` gives the plain gradient).
      method: how squared norms are formed (see :func:`per_example_norms`).
      chunk_size: examples per chunk (``None``: the whole batch at once; see
        "Memory" in :mod:`jbp._per_example`).

    Returns:
      ``fn(params, x, y) -> (grads, norms)``: ``grads`` like ``params``;
      ``norms`` the unclipped ``‖g_i‖``, ``(batch,)``.
    """
    net, loss = _setup(net, loss)
    _check_max_norm(max_norm)
    check_method(method)
    clipped = clipped_sum(net, loss, max_norm, method, check_chunk_size(chunk_size))

    def fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None,
        example_mask: Any = None,
    ) -> tuple[Params, Array]:  # fmt: skip
        r = clipped(params, x, y, mask=mask, dropout_key=dropout_key, example_mask=example_mask)
        if loss.reduction == "sum":
            return r.grads, r.norms
        count = jnp.maximum(r.examples, 1).astype(r.norms.dtype)
        return jtu.tree_map(lambda g: g / count.astype(g.dtype), r.grads), r.norms

    return fn


def check_noise_multiplier(noise_multiplier: Any) -> float:
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, (int, float))
        or not noise_multiplier >= 0
        or not math.isfinite(noise_multiplier)
    ):
        raise ValueError(f"`noise_multiplier` must be a number ≥ 0, got {noise_multiplier!r}")
    return float(noise_multiplier)


def check_dp_max_norm(max_norm: Any) -> float:
    _check_max_norm(max_norm)
    if not math.isfinite(max_norm):
        raise ValueError("`max_norm` must be finite for DP-SGD: the noise scales with it")
    return float(max_norm)


def check_expected_batch_size(expected_batch_size: Any) -> float | None:
    if expected_batch_size is None:
        return None
    e = expected_batch_size
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not (0 < e < math.inf):
        raise ValueError(
            f"`expected_batch_size` must be a positive number (q·N), got {expected_batch_size!r}"
        )
    return float(e)


def check_divisor(who: str, expected: float | None, loss: Loss, example_mask: Any) -> None:
    """A padded batch with a mean loss needs the public divisor q·N: the realised
    number of examples would leak it."""
    if expected is None and example_mask is not None and loss.reduction == "mean":
        raise ValueError(
            f"{who} with an `example_mask` and a mean loss needs `expected_batch_size` "
            "(q·N): dividing by the realised number of examples would leak it"
        )


def noisy_mean(
    grads: Params, rows: int, key: Array, std: float, expected: float | None, loss: Loss
) -> Params:
    """``(grads + N(0, std² I)) / E``: independent Gaussian noise in every coordinate
    (one key per leaf) on a clipped sum, divided by ``E = expected``, or without it by
    the loss's own divisor for ``rows`` rows (1 or the batch)."""
    divisor = expected if expected is not None else 1 / loss.scale(rows)
    leaves, treedef = jtu.tree_flatten(grads)
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = [
        (g + jnp.asarray(std, g.dtype) * jax.random.normal(k, g.shape, g.dtype))
        / jnp.asarray(divisor, g.dtype)
        for g, k in zip(leaves, keys, strict=False)
    ]
    return jtu.tree_unflatten(treedef, noisy)


def dp_grad(
    net: Any,
    loss: str | Loss,
    max_norm: float,
    noise_multiplier: float,
    *,
    expected_batch_size: float | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Callable[..., tuple[Params, Array]]:
    """A DP-SGD gradient: clip each g_i to ``max_norm``, sum, add Gaussian noise.

    ``(Σ_i clip(g_i) + N(0, (σ·C)² I)) / E`` with ``C = max_norm``, ``σ =
    noise_multiplier`` and ``E = expected_batch_size``, the expected batch size
    ``q·N`` of Poisson sampling, a public constant: never the realised batch
    size, which depends on the data and would leak it (the convention of Abadi
    et al. 2016, Opacus and jax-privacy). The result estimates the *mean*
    gradient whatever the loss's reduction. Without ``expected_batch_size`` (the
    older convention, for fixed-size batches without an example mask): ``E = 1``
    for ``"sum"`` losses and ``B`` for ``"mean"`` losses. The sum's sensitivity
    to adding or removing one example is ``C`` (see :mod:`jbp._privacy` for the
    guarantee and :func:`jbp.dp_epsilon` for its ε). Feed the result to any
    optax optimiser's ``update``. ``chunk_size``: examples per chunk of the
    clipped sum (``None``: the whole batch at once; see "Memory" in
    :mod:`jbp._per_example`).

    Returns:
      ``fn(params, x, y, key, *, example_mask=None, ...) -> (grads, norms)``.
    """
    net, loss = _setup(net, loss)
    max_norm = check_dp_max_norm(max_norm)
    sigma = check_noise_multiplier(noise_multiplier)
    expected = check_expected_batch_size(expected_batch_size)
    check_method(method)
    clipped = clipped_sum(net, loss, max_norm, method, check_chunk_size(chunk_size))

    def fn(
        params: Params,
        x: Any,
        y: Any,
        key: Array,
        *,
        mask: Any = None,
        dropout_key: Any = None,
        example_mask: Any = None,
    ) -> tuple[Params, Array]:
        check_divisor("dp_grad", expected, loss, example_mask)
        r = clipped(params, x, y, mask=mask, dropout_key=dropout_key, example_mask=example_mask)
        rows = r.norms.shape[0]
        return noisy_mean(r.grads, rows, key, sigma * max_norm, expected, loss), r.norms

    return fn


class NoiseScale(NamedTuple):
    """The simple gradient noise scale and its parts (McCandlish et al. 2018).

    Attributes:
      b_simple: ``trace_cov / grad_sq_norm``, the critical-batch-size estimate.
      trace_cov: unbiased ``tr(Σ) = B/(B−1) (mean_i ‖g_i‖² − ‖ḡ‖²)``.
      grad_sq_norm: unbiased ``‖G‖² = ‖ḡ‖² − tr(Σ)/B``.
    """

    b_simple: Array
    trace_cov: Array
    grad_sq_norm: Array


def gradient_noise_scale(
    net: Any, loss: str | Loss, *, unbiased: bool = True, chunk_size: int | None = None
) -> Callable[..., NoiseScale]:
    """B_simple = tr(Σ)/‖G‖² from per-example norms and the mean gradient.

    ``unbiased=True`` (default): the batch is a sample of a larger data
    distribution. The two-batch-size estimators of McCandlish et al. (2018,
    App. A.1) with B_small = 1 (each example's ‖g_i‖², from the δ equations)
    and B_big = B (the mean gradient ḡ of the batch): ``tr(Σ) = B/(B−1)
    (mean_i ‖g_i‖² − ‖ḡ‖²)`` and ``‖G‖² = ‖ḡ‖² − tr(Σ)/B`` are unbiased;
    their ratio is not (and ``‖G‖²`` may come out negative on small batches,
    or whenever the true gradient is small: average the two parts over steps
    before dividing, as the paper does).

    ``unbiased=False``: the batch *is* the distribution, e.g. a whole
    training set, whose noise scale is then exact: ``tr(Σ) = mean_i ‖g_i‖² −
    ‖ḡ‖²`` and ``‖G‖² = ‖ḡ‖²``, both ≥ 0.

    ``chunk_size``: examples per chunk (``None``: the whole batch at once; see
    "Memory" in :mod:`jbp._per_example`).

    Returns:
      ``fn(params, x, y) -> NoiseScale``; needs a batch of at least 2.
    """
    net, loss = _setup(net, loss)
    chunk = check_chunk_size(chunk_size)

    def fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None,
        example_mask: Any = None,
    ) -> NoiseScale:  # fmt: skip
        batch, em = _checked(net, loss, params, x, y, mask, dropout_key, example_mask)
        rows, dtype = batch.x.shape[0], _dtype(params, batch)
        if rows < 2:
            raise ValueError(f"`x` has batch {rows}; the gradient noise scale needs at least 2")
        b = rows if em is None else jnp.sum(em).astype(dtype)  # the real examples

        def body(run: _Pass) -> tuple[Any, Any]:
            n = run.batch.x.shape[0]
            sq = _sq_norms(run, n, dtype, "auto")
            return sq, run.quantity("weighted_grads", jnp.ones((n,), dtype) / b)

        sq, mean = _by_examples(net, loss, params, batch, em, chunk, body)
        mean_sq = _tree_sum([jnp.sum(leaf * leaf) for leaf in jtu.tree_leaves(mean)])
        spread = jnp.sum(sq) / b - mean_sq
        if unbiased:
            trace = b / (b - 1) * spread
            g2 = mean_sq - trace / b
        else:
            trace, g2 = jnp.maximum(spread, 0), mean_sq
        return NoiseScale(trace / g2, trace, g2)

    return fn
