"""Curvature from the backward pass: GGN diagonals, Kronecker factors, Hessian diagonals.

Every layer's δ rule is linear in δ, so a matrix square root of the loss
Hessian with respect to the network output, ``H_i = Σ_c s_ic s_icᵀ`` (exact:
C columns per example; Monte-Carlo: M sampled columns, see
:mod:`jbp._losses`), can be sent backward through the same δ rules, one
column at a time (``vmap`` over the columns; no autodiff). At every
parameterised layer each column then gives a "gradient" ``g_ic`` through the
layer's weight-gradient factorisation (outer, elementwise, gather; see
:mod:`jbp.layers._factors`), and with ``C = Σ_i w ℓ_i`` (``w = 1`` or ``1/B``
by the loss's reduction) the generalised Gauss-Newton matrix is

    G = Σ_i w J_iᵀ H_i J_i = Σ_{i,c} (√w g_ic)(√w g_ic)ᵀ.

From the columns:

- :func:`sqrt_ggn`: the columns ``√w g_ic`` themselves, ``(C, batch, *leaf)``;
- :func:`diag_ggn`: ``diag(G) = w Σ_{i,c} g_ic²``; for Dense on ``(batch, F)``
  one matmul for all columns, ``(a²)ᵀ Σ_c s_c²``;
- :func:`per_example_diag_ggn`: ``Σ_c g_ic²`` per example (unscaled, like g_i);
- :func:`kfac`: per outer-product leaf (Dense, Conv, attention projections)
  the Kronecker factors ``A ⊗ G`` of its GGN block (K-FAC with MC columns,
  KFLR with the exact ones);

and by other routes through the same rules:

- :func:`ggn_vector_product`: ``G v`` by the forward of the linearised network
  (each layer's ``tangent`` rule), the loss Hessian, then the δ rules;
- :func:`diag_hessian`: the diagonal of the full Hessian of C for chains of
  Dense and elementwise layers, with the residual terms ``g ⊙ f''(z)`` of
  every activation sent backward as signed square-root columns.

Every function returns ``fn(params, x, y)`` (``ggn_vector_product``:
``fn(params, x, y, v)``); with Monte-Carlo columns (``mc_samples=M``) the
function takes ``key=`` as a keyword, and every one takes the keywords of
:func:`jbp.backprop`, ``mask`` (a padding mask: padded positions add nothing)
and ``dropout_key``. A leaf shared by two layers (:class:`jbp.Tied`) gets both
uses' columns. Wrap them in ``jax.jit``.

Memory (``chunk_size``). The exact quantities sum over the C columns of each
example's loss-Hessian root (C = the output size per example: T positions × V
classes for a sequence ``softmax_xent``, the elements for the other losses), and
every column is sent backward through the whole network. ``chunk_size=K`` sends
K columns at a time (``lax.scan`` over ⌈C/K⌉ chunks, the last padded with zero
columns, which add nothing; :func:`sqrt_ggn`: ``lax.map``); ``None`` (the
default) sends all C at once. Alive at once, in floats, about:

- the chunk: ``K·B·(T·V + D)``, D the floats of one example's δ at every layer of
  a backward pass (about 1.9·10⁵ for the benchmark transformer below); for
  :func:`diag_ggn` and :func:`per_example_diag_ggn` up to ``K·B·P_T`` more, the
  per-column per-example gradients of the leaves whose gradient sums over
  positions (P_T of the P parameters; XLA fuses most with their squares);
- the result: P (:func:`diag_ggn`), B·P (:func:`per_example_diag_ggn`), Σ(I² + O²)
  (:func:`kfac`), C·B·P (:func:`sqrt_ggn`, whatever the chunk);
- whatever the chunk: the forward pass's caches, and for ``softmax_xent`` its p and
  roots, 2·B·T·V.

The built-in losses' columns are made a chunk at a time from their structure: a
diagonal Hessian's from its diagonal, and ``softmax_xent``'s from its
per-position blocks (position t's V×V block ``w_t (diag p_t − p_t p_tᵀ)``,
positions independent; column ``(t, c)`` is ``√(w_t p_tc)(e_c − p_t)`` at t, zero
elsewhere), never as the dense ``T·V × T·V`` root. A user loss's ``sqrt_hessian``
and Monte-Carlo columns are made all at once (``C·B·T·V``) and only sent backward
by chunks. Measured (XLA's compiled memory analysis, float32, CPU) on the
benchmark transformer ``transformer(128, 64, 128, 4, 2)`` (P = 437 888, C = 8192)
at B = 16, temporaries: :func:`diag_ggn` 124.6 GB all at once, 3.93 GB with
``chunk_size=256``, 1.01 GB with 64; ``kfac(kind="kflr")`` 64.5 GB, 3.12 GB,
0.80 GB. :func:`diag_hessian` chunks each of its column sources the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

from ._activations import get_activation
from ._backprop import check_net, keeps_positions, prepare
from ._checks import check_key
from ._losses import HALF_SSE, MSE, SIGMOID_BCE, SOFTMAX_XENT, Loss, _token_weights, get_loss
from ._per_example import check_chunk_size
from .layers import Activation, Dense, Sequential
from .layers._base import has_params
from .layers._factors import (
    Elementwise,
    Outer,
    Sum,
    is_factor,
    is_leaf_factor,
    per_example_grad,
    transpose,
)

Array = jax.Array
Params = Any

KINDS = ("kfac", "kflr")


class KroneckerFactors(NamedTuple):
    """The Kronecker factors of one outer-product leaf's GGN block, ``G_block ≈ A ⊗ G``.

    With ã the leaf's inputs (Dense: ``a``; Conv: the unfolded patches, in the
    row order of ``w.reshape(-1, out)``), a 1 appended when the layer has the
    matching bias, T positions per example and s the backpropagated
    square-root columns at the layer's output (before ``f'``: its δ):

    - ``a = (1/(B·T)) Σ_{i,t} ã_it ã_itᵀ``, shape ``(I(+1), I(+1))``;
    - ``g = w Σ_{i,t,c} s_itc s_itcᵀ``, shape ``(O, O)``,

    so that ``a ⊗ g`` is the GGN block of ``[w; b]`` (rows of ``w``, then the
    bias, flattened row-major) exactly for one example with one position, and
    K-FAC's approximation of it otherwise (positions treated as extra
    examples: "K-FAC expand"). Grouped convolutions get a leading group axis
    on both, ``(groups, I, I)`` and ``(groups, O, O)``.
    """

    a: Array
    g: Array


# --- arguments --------------------------------------------------------------


def _check_mc(mc_samples: Any) -> int | None:
    if mc_samples is None:
        return None
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise ValueError(f"`mc_samples` must be None (exact) or a positive int, got {mc_samples!r}")
    return mc_samples


def _check_curvature_loss(loss: Loss, mc_samples: int | None) -> None:
    needed = "sqrt_hessian" if mc_samples is None else "sample_sqrt_hessian"
    if getattr(loss, needed) is None:
        raise ValueError(
            f"loss {loss.name!r} has no {needed}: give the jbp.Loss a "
            f"{needed}= (see jbp._losses) to use curvature functions"
        )


def _check_key_for(mc_samples: int | None, key: Any) -> None:
    if mc_samples is None:
        return
    if key is None:
        raise ValueError(
            f"mc_samples={mc_samples} draws Monte-Carlo columns: pass key=, e.g. "
            "fn(params, x, y, key=jax.random.key(0))"
        )
    check_key(key)


class _Source(NamedTuple):
    """The square-root columns of the loss Hessian, made a chunk at a time.

    ``make(ks)`` gives the columns with indices ``ks`` (``(K,)`` ints), shaped
    ``(K, batch, *out)``; an index ≥ ``total`` gives a zero column (the padding of a
    last, partial chunk), which adds nothing to any quantity.
    """

    total: int
    make: Callable[[Array], Array]


def _dense_source(cols: Array) -> _Source:
    """Columns given all at once, ``(C, batch, *out)``: a user loss's ``sqrt_hessian``,
    or Monte-Carlo samples."""
    count = cols.shape[0]

    def make(ks: Array) -> Array:
        if ks.shape[0] == count:  # one chunk of every column: no copy
            return cols
        valid = (ks < count).reshape((-1,) + (1,) * (cols.ndim - 1))
        got = jnp.take(cols, jnp.minimum(ks, count - 1), axis=0)
        return jnp.where(valid, got, jnp.zeros((), cols.dtype))

    return _Source(count, make)


def _diagonal_source(scale: Array) -> _Source:
    """A diagonal loss Hessian ``diag(scale²)`` per example (``half_sse``, ``mse``,
    ``sigmoid_bce``): column k is ``scale ⊙ e_k``, k over an example's K elements."""
    count = math.prod(scale.shape[1:])

    def make(ks: Array) -> Array:
        e = jax.nn.one_hot(ks, count, dtype=scale.dtype)  # (K, count); zero rows past count
        return e.reshape((ks.shape[0], 1, *scale.shape[1:])) * scale[None]

    return _Source(count, make)


def _softmax_source(a: Array, y: Array, mask: Array | None) -> _Source:
    """``softmax_xent``'s per-position blocks: position t's V×V block of ``H_i`` is
    ``w_t (diag p_t − p_t p_tᵀ)`` and positions are independent, so column ``(t, c)``
    (index ``t·V + c``) is ``√(w_t p_tc) (e_c − p_t)`` at position t and zero elsewhere.
    Only ``p`` and the roots, ``(batch, T, V)`` each, are kept; a chunk's columns are
    made from them (never the dense ``T·V × T·V`` square root)."""
    v = a.shape[-1]
    positions = math.prod(a.shape[1:-1])
    p = jax.nn.softmax(a, axis=-1)
    root = jnp.sqrt(_token_weights(a, y, mask) * p)  # (batch, *pos, V)
    pf = p.reshape(a.shape[0], positions, v)
    rf = root.reshape(a.shape[0], positions, v)

    def make(ks: Array) -> Array:
        t, c = ks // v, ks % v
        tt = jnp.minimum(t, positions - 1)
        r = rf[:, tt, c]  # (batch, K)
        block = r[..., None] * (jax.nn.one_hot(c, v, dtype=a.dtype)[None] - pf[:, tt, :])
        at = jax.nn.one_hot(t, positions, dtype=a.dtype)  # (K, T); zero rows past T·V
        cols = at[:, None, :, None] * jnp.moveaxis(block, 1, 0)[:, :, None, :]
        return cols.reshape((ks.shape[0], *a.shape))

    return _Source(positions * v, make)


_DIAGONAL_LOSSES = (HALF_SSE, MSE, SIGMOID_BCE)


def _source(loss: Loss, b: Any, out: Array, mc_samples: int | None, key: Any) -> _Source:
    """The columns of the per-example loss Hessian's square root for the checked batch
    ``b`` (its loss has the padding mask bound): built-in losses by their structure (a
    chunk at a time), a user loss's ``sqrt_hessian`` and MC samples all at once."""
    bound = b.loss
    if mc_samples is not None:
        assert bound.sample_sqrt_hessian is not None
        return _dense_source(bound.sample_sqrt_hessian(key, out, b.y, mc_samples))
    if loss is SOFTMAX_XENT:
        keeps = keeps_positions(tuple(out.shape), tuple(b.x.shape))
        return _softmax_source(out, b.y, b.context.mask if keeps else None)
    if any(loss is d for d in _DIAGONAL_LOSSES):  # H_i diagonal: its root from H_i · 1
        assert bound.hessian_vp is not None
        return _diagonal_source(jnp.sqrt(bound.hessian_vp(out, b.y, jnp.ones_like(out))))
    assert bound.sqrt_hessian is not None
    return _dense_source(bound.sqrt_hessian(out, b.y))


def _chunk_starts(count: int, chunk: int | None) -> tuple[int, int]:
    """``(chunks, size)``: ``count`` items in ``chunks`` chunks of ``size`` (the last
    padded), or one chunk of them all."""
    if chunk is None or chunk >= count:
        return 1, count
    return -(-count // chunk), chunk


def _add_parts(total: Any, part: Any) -> Any:
    """Sum two chunks' results; a :class:`KroneckerFactors`' ``a`` does not depend on
    the columns, so it is taken as it is (only ``g`` sums over chunks)."""

    def add(t: Any, p: Any) -> Any:
        if isinstance(t, KroneckerFactors):
            return KroneckerFactors(p.a, t.g + p.g)
        return t + p

    return jtu.tree_map(add, total, part, is_leaf=lambda x: isinstance(x, KroneckerFactors))


def _by_chunks(
    source: _Source, chunk: int | None, part: Callable[[Array], Any], stack: bool
) -> Any:
    """``part`` of every chunk of the source's columns, summed (``stack=False``) or
    concatenated on the leading column axis (``stack=True``), one chunk at a time
    (``lax.scan`` / ``lax.map``); ``part`` takes the chunk's columns ``(K, batch, *out)``."""
    n, size = _chunk_starts(source.total, chunk)
    if n == 1:
        return part(source.make(jnp.arange(source.total)))

    def one(i: Array) -> Any:
        return part(source.make(i * size + jnp.arange(size)))

    if stack:
        parts = lax.map(one, jnp.arange(n))
        return jtu.tree_map(lambda x: x.reshape((n * size, *x.shape[2:]))[: source.total], parts)
    zero = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, 0))
    total, _ = lax.scan(lambda t, i: (_add_parts(t, one(i)), None), zero, jnp.arange(n))
    return total


# --- columns through the δ rules ----------------------------------------------


class _Leaf(NamedTuple):
    layer: Any
    params: Params
    cache: Any
    columns: Array  # (C, batch, *out): the layer's ∂/∂out per column, unscaled


class _Tie(NamedTuple):
    """At a shared leaf's owner: the owner's walk result, the tied user's, and the tie."""

    owner: Any
    user: Any
    tied: Any


class _Stripped(NamedTuple):
    """At a tied user: its walk result without the shared leaves (they are the owner's)."""

    user: Any
    tied: Any


class _T(NamedTuple):
    """A use of a shared leaf that is transposed: transposed column by column."""

    f: Any


def _column_walk(
    net: Sequential, params: Params, caches: Any, cols: Array
) -> tuple[Any, list[_Leaf]]:
    """Send every column backward through the δ rules (``vmap`` over columns).

    Returns the walk's tree (leaf layers with params hold their index into the
    list, shared leaves a :class:`_Tie` at the owner and a :class:`_Stripped` at
    the user, parameterless ones their ``{}``) and, per parameterised leaf layer,
    its params, cache and the columns reaching its output.
    """
    seen: list[tuple[Any, Params, Any]] = []
    structure: list[Any] = []

    def walk(d: Array) -> list[Array]:
        reached: list[Array] = []

        def at_leaf(layer: Any, p: Params, cache: Any, dd: Array) -> Any:
            if not has_params(p):
                return p
            seen.append((layer, p, cache))
            reached.append(dd)
            return len(reached) - 1

        at_leaf.merge = lambda owner, user, tied: (  # type: ignore[attr-defined]
            _Tie(owner, user, tied),
            _Stripped(user, tied),
        )
        seen.clear()
        result, _ = net.backward_walk(params, caches, d, at_leaf)
        structure.append(result)
        return reached

    reached = jax.vmap(walk)(cols)
    leaves = [_Leaf(*s, c) for s, c in zip(seen, reached, strict=True)]
    return structure[-1], leaves


def _is_ref(x: Any) -> bool:
    return isinstance(x, (int, _Tie, _Stripped))


def _combine_columns(owner: Any, user: Any, transposed: bool) -> Sum:
    parts = owner.parts if isinstance(owner, Sum) else (owner,)
    return Sum((*parts, _T(user) if transposed else user))


def _fill(run: Any, fn: Callable[[_Leaf, Any], Any]) -> Any:
    """``fn(leaf, factors)`` at every parameterised leaf layer of the walk's tree:
    ``factors`` its column-batched factors (:func:`_column_factors`; a shared leaf's
    a :class:`Sum` of its uses), or None for a layer without ``grad_factors``."""
    memo: dict[int, Any] = {}

    def factors(i: int) -> Any:
        if i not in memo:
            memo[i] = _column_factors(run.leaves[i])
        return memo[i]

    def resolve(ref: Any) -> tuple[_Leaf, Any]:
        if isinstance(ref, int):
            return run.leaves[ref], factors(ref)
        leaf, f = resolve(ref.owner if isinstance(ref, _Tie) else ref.user)
        if isinstance(ref, _Stripped):
            shared = {k for k, _ in ref.tied.leaves}
            return leaf, {k: v for k, v in f.items() if k not in shared}
        user_leaf, fu = resolve(ref.user)
        if f is None or fu is None:
            raise TypeError(
                f"{ref.tied!r} shares leaves: curvature of a shared leaf needs grad_factors on "
                f"both {leaf.layer!r} and {user_leaf.layer!r}"
            )
        return leaf, ref.tied.share(f, fu, _combine_columns)[0]

    return jtu.tree_map(lambda r: fn(*resolve(r)), run.structure, is_leaf=_is_ref)


def _column_factors(leaf: _Leaf) -> Any:
    """The layer's factors with δ carrying a leading column axis ``(C, ...)``, or None
    for a layer without ``grad_factors``."""
    grad_factors = getattr(leaf.layer, "grad_factors", None)
    if grad_factors is None:
        return None
    base = grad_factors(leaf.params, leaf.cache, leaf.columns[0])
    flat, treedef = jtu.tree_flatten(base, is_leaf=is_factor)

    def deltas(d: Array) -> list[Array]:
        factors = grad_factors(leaf.params, leaf.cache, d)
        return [f.delta for f in jtu.tree_leaves(factors, is_leaf=is_factor)]

    cols = jax.vmap(deltas)(leaf.columns)
    return jtu.tree_unflatten(
        treedef, [f._replace(delta=d) for f, d in zip(flat, cols, strict=True)]
    )


def _per_column(f: Any, fn: Callable[[Any], Array]) -> Array:
    """``fn`` of each column's factor (``vmap`` over the column axis of every δ in
    ``f``; a transposed use of a shared leaf is transposed column by column)."""
    items = f.parts if isinstance(f, Sum) else (f,)
    base = [p.f if isinstance(p, _T) else p for p in items]

    def one(deltas: list[Array]) -> Array:
        parts = [
            transpose(b._replace(delta=d)) if isinstance(p, _T) else b._replace(delta=d)
            for p, b, d in zip(items, base, deltas, strict=True)
        ]
        return fn(Sum(tuple(parts)) if isinstance(f, Sum) else parts[0])

    return jax.vmap(one)([b.delta for b in base])


def _column_grads(leaf: _Leaf, factors: Any) -> Params:
    """``g_ic`` for every column and example: like params, leaves ``(C, batch, *leaf)``."""
    if factors is None:
        method = getattr(leaf.layer, "per_example_grads", None)
        if method is None:
            raise TypeError(
                f"layer {leaf.layer!r} has parameters but neither grad_factors nor "
                "per_example_grads: curvature needs one of them"
            )
        return jax.vmap(lambda d: method(leaf.params, leaf.cache, d))(leaf.columns)
    return jtu.tree_map(lambda f: _per_column(f, per_example_grad), factors, is_leaf=is_leaf_factor)


def _single_position_outer(f: Any) -> bool:
    return isinstance(f, Outer) and f.delta.shape[2] == 1


def _outer_diag(f: Outer, per_example: bool) -> Array:
    """``Σ_c g_ic²`` of a one-position outer factor with column-batched δ: ``(a²) ⊗ Σ_c δ_c²``,
    per example ``(batch, *shape)`` or summed over the batch (one matmul)."""
    d2 = jnp.sum(f.delta[:, :, 0] * f.delta[:, :, 0], axis=0)  # (batch, G, O)
    parts = []
    for a in f.blocks:
        a2 = a[:, 0] * a[:, 0]  # (batch, G, I_k)
        if per_example:
            parts.append(a2[..., :, None] * d2[..., None, :])  # (batch, G, I_k, O)
        else:
            parts.append(jnp.einsum("bgi,bgo->gio", a2, d2))
    g = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-2)
    g = jnp.moveaxis(g, -3, -2)  # (..., I, G, O)
    return g.reshape((g.shape[0], *f.shape) if per_example else f.shape)


def _leaf_diag(leaf: _Leaf, factors: Any, per_example: bool) -> Params:
    """``Σ_c g_ic²`` for every leaf of a layer, per example or summed over the batch."""

    def from_grads(g: Array) -> Array:
        g2 = jnp.sum(g * g, axis=0)
        return g2 if per_example else jnp.sum(g2, axis=0)

    if factors is None:
        return jtu.tree_map(from_grads, _column_grads(leaf, None))

    def one(f: Any) -> Array:
        if _single_position_outer(f):
            return _outer_diag(f, per_example)
        return from_grads(_per_column(f, per_example_grad))

    return jtu.tree_map(one, factors, is_leaf=is_leaf_factor)


# --- the public functions -------------------------------------------------------


def _like(params: Params, per_layer: Any) -> Params:
    return list(per_layer) if isinstance(params, list) else per_layer


class _Columns(NamedTuple):
    structure: Any
    leaves: list[_Leaf]
    scale: float
    mask: Array | None = None


def _columns(
    net: Sequential,
    loss: Loss,
    params: Params,
    x: Any,
    y: Any,
    mc: int | None,
    key: Any,
    mask: Any = None,
    dropout_key: Any = None,
) -> _Columns:
    """Every column sent back through the network at once (one chunk)."""
    _check_key_for(mc, key)
    b = prepare(net, loss, params, x, y, mask, dropout_key)
    out, caches = net.forward(params, b.x, b.context)
    source = _source(loss, b, out, mc, key)
    structure, leaves = _column_walk(net, params, caches, source.make(jnp.arange(source.total)))
    return _Columns(structure, leaves, loss.scale(b.x.shape[0]), b.context.mask)


CurvatureFn = Callable[..., Any]


def _over_columns(
    net: Sequential,
    loss: Loss,
    mc: int | None,
    finish: Callable[[_Columns], Any],
    chunk: int | None,
    stack: bool = False,
) -> CurvatureFn:
    """``fn(params, x, y, *, key=None, mask=None, dropout_key=None)``: one forward pass,
    then the loss's square-root columns sent back through the network ``chunk`` at a
    time and ``finish`` of each chunk (shaped like params), summed over the chunks
    (``stack``: concatenated on the leading column axis)."""

    def fn(
        params: Params,
        x: Any,
        y: Any,
        *,
        key: Any = None,
        mask: Any = None,
        dropout_key: Any = None,
    ) -> Params:
        _check_key_for(mc, key)
        b = prepare(net, loss, params, x, y, mask, dropout_key)
        out, caches = net.forward(params, b.x, b.context)
        source = _source(loss, b, out, mc, key)
        scale = loss.scale(b.x.shape[0])

        def part(cols: Array) -> Any:
            structure, leaves = _column_walk(net, params, caches, cols)
            return finish(_Columns(structure, leaves, scale, b.context.mask))

        return _like(params, _by_chunks(source, chunk, part, stack))

    return fn


def _setup(
    net: Any, loss: str | Loss, mc_samples: Any, chunk_size: Any
) -> tuple[Sequential, Loss, int | None, int | None]:
    net, loss = check_net(net), get_loss(loss)
    mc = _check_mc(mc_samples)
    _check_curvature_loss(loss, mc)
    return net, loss, mc, check_chunk_size(chunk_size)


def sqrt_ggn(
    net: Any, loss: str | Loss, *, mc_samples: int | None = None, chunk_size: int | None = None
) -> CurvatureFn:
    """The backpropagated square-root columns of the GGN (BackPACK's SqrtGGN).

    Args:
      net, loss: the network and loss (a built-in one or a :class:`jbp.Loss`
        with ``sqrt_hessian`` / ``sample_sqrt_hessian``).
      mc_samples: ``None`` for the exact square root (C columns per example:
        the output size, or positions × classes for sequence ``softmax_xent``)
        or M Monte-Carlo columns sampled from the model's predictive.
      chunk_size: columns sent backward at once (``None``: all; see the module's
        "Memory"). The result holds all ``C·B·P`` numbers whatever the chunk.

    Returns:
      ``fn(params, x, y, *, key=None)`` → like params with two leading axes,
      ``(C, batch, *leaf)``: ``v_ic = √w ∂(s_icᵀ a_i)/∂θ``, so that the GGN
      block of each leaf is ``Σ_{c,i} v_ic v_icᵀ`` (exactly, or in
      expectation with MC columns). ``key`` is required with ``mc_samples``.
    """
    net, loss, mc, chunk = _setup(net, loss, mc_samples, chunk_size)

    def finish(run: _Columns) -> Any:
        root = run.scale**0.5
        return jtu.tree_map(lambda g: root * g, _fill(run, _column_grads))

    return _over_columns(net, loss, mc, finish, chunk, stack=True)


def diag_ggn(
    net: Any, loss: str | Loss, *, mc_samples: int | None = None, chunk_size: int | None = None
) -> CurvatureFn:
    """The diagonal of the generalised Gauss-Newton matrix ``G = Σ_i w J_iᵀ H_i J_i``.

    Exact (``mc_samples=None``, BackPACK's DiagGGNExact) or Monte-Carlo with M
    sampled columns (DiagGGNMC; unbiased). Dense on ``(batch, F)``: one matmul
    for all columns, ``(a²)ᵀ Σ_c s_c²``. ``chunk_size``: columns sent backward
    at once (``None``: all; see the module's "Memory").

    Returns:
      ``fn(params, x, y, *, key=None)`` → like params. ``key`` is required
      with ``mc_samples``.
    """
    net, loss, mc, chunk = _setup(net, loss, mc_samples, chunk_size)

    def finish(run: _Columns) -> Any:
        values = _fill(run, lambda leaf, f: _leaf_diag(leaf, f, False))
        return jtu.tree_map(lambda d: run.scale * d, values)

    return _over_columns(net, loss, mc, finish, chunk)


def per_example_diag_ggn(
    net: Any, loss: str | Loss, *, mc_samples: int | None = None, chunk_size: int | None = None
) -> CurvatureFn:
    """``diag(J_iᵀ H_i J_i)`` for every example, unscaled like ``g_i`` (BatchDiagGGN).

    ``diag_ggn`` is ``w`` times the sum over the batch axis. No Python loop
    over examples: the per-example diagonals are formed from each layer's
    cache and columns. ``chunk_size``: columns sent backward at once (``None``:
    all; see the module's "Memory").

    Returns:
      ``fn(params, x, y, *, key=None)`` → like params with a leading batch axis.
    """
    net, loss, mc, chunk = _setup(net, loss, mc_samples, chunk_size)

    return _over_columns(
        net, loss, mc, lambda run: _fill(run, lambda leaf, f: _leaf_diag(leaf, f, True)), chunk
    )


def _bias_key(weight_key: str) -> str:
    return "b" + weight_key[1:]


def _kronecker(f: Outer, bias: bool, scale: float, mask: Array | None) -> KroneckerFactors:
    a = f.blocks[0] if len(f.blocks) == 1 else jnp.concatenate(f.blocks, axis=-1)
    if bias:
        a = jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), a.dtype)], axis=-1)
    b, t = a.shape[0], a.shape[1]
    if mask is not None and mask.shape[1] == t:  # positions of a padded batch: real ones only
        a = a * mask.astype(a.dtype)[:, :, None, None]
        factor_a = jnp.einsum("btgi,btgj->gij", a, a) / jnp.maximum(jnp.sum(mask), 1)
    else:
        factor_a = jnp.einsum("btgi,btgj->gij", a, a) / (b * t)
    s = f.delta  # (C, batch, T, G, O)
    factor_g = scale * jnp.einsum("cbtgo,cbtgp->gop", s, s)
    if factor_a.shape[0] == 1:
        return KroneckerFactors(factor_a[0], factor_g[0])
    return KroneckerFactors(factor_a, factor_g)


def kfac(
    net: Any,
    loss: str | Loss,
    *,
    kind: str = "kfac",
    mc_samples: int = 1,
    chunk_size: int | None = None,
) -> CurvatureFn:
    """Kronecker factors of the GGN blocks of every outer-product leaf.

    Args:
      net, loss: the network and loss.
      kind: ``"kfac"`` (the G factor from ``mc_samples`` Monte-Carlo columns,
        Martens & Grosse 2015) or ``"kflr"`` (from the exact square root,
        Botev et al. 2017).
      mc_samples: Monte-Carlo columns for ``kind="kfac"`` (default 1).
      chunk_size: columns sent backward at once (``None``: all; see the
        module's "Memory"); G sums over the chunks.

    Returns:
      ``fn(params, x, y, *, key=None)`` → a tree like params in which each
      parameterised layer's dict holds a :class:`KroneckerFactors` under each
      outer-product weight key (Dense and Conv ``"w"``; attention ``"wq"``,
      ``"wk"``, ``"wv"``, ``"wo"``; recurrent layers ``"wi"``, ``"wh"``, time
      steps taken as positions, "K-FAC expand"), covering the matching bias
      (``"b"``, ``"bq"``, ..., the GRU's ``"bi"``, ``"bh"``; not the one bias of an
      RNN or LSTM, which both projections share) as A's last row and column. Leaves of other forms (norm
      scales, embedding tables) have no Kronecker factors and are absent, and so
      are shared leaves (:class:`jbp.Tied`: their GGN block sums the blocks of two
      uses of different forms, not one Kronecker product; take their
      :func:`diag_ggn`); parameterless layers give ``{}``. With a padding mask A
      averages over the real positions only. ``key`` is required for ``"kfac"``.
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    mc = _check_mc(mc_samples) if kind == "kfac" else None
    if kind == "kfac" and mc is None:
        raise ValueError("kind='kfac' needs mc_samples ≥ 1; use kind='kflr' for exact columns")
    net, loss = check_net(net), get_loss(loss)
    _check_curvature_loss(loss, mc)
    chunk = check_chunk_size(chunk_size)

    def layer_factors(factors: Any, run: _Columns) -> dict[str, KroneckerFactors]:
        if not isinstance(factors, dict):
            return {}
        result = {}
        for k, f in factors.items():
            if not isinstance(f, Outer):  # other forms, and shared leaves (a Sum of uses)
                continue
            b = factors.get(_bias_key(k))
            bias = isinstance(b, Elementwise) and b.u is None and k.startswith("w")
            result[k] = _kronecker(f, bias, run.scale, run.mask)
        return result

    return _over_columns(
        net, loss, mc, lambda run: _fill(run, lambda _, f: layer_factors(f, run)), chunk
    )


def _check_like(v: Any, params: Params) -> None:
    """``v`` has params' tree structure and leaf shapes (a clear error otherwise)."""
    p_leaves, p_tree = jtu.tree_flatten(params)
    try:
        v_leaves = p_tree.flatten_up_to(v)  # type: ignore[attr-defined]
    except (ValueError, TypeError):
        raise ValueError(
            f"`v` must be shaped like params (tree {p_tree}), got tree {jtu.tree_structure(v)}"
        ) from None
    for (path, p), leaf in zip(jtu.tree_leaves_with_path(params), v_leaves, strict=True):
        shape = getattr(leaf, "shape", None)
        if shape is None or tuple(shape) != tuple(p.shape):
            raise ValueError(
                f"`v{jtu.keystr(path)}` must have shape {tuple(p.shape)} like params, got "
                f"{shape if shape is None else tuple(shape)}"
            )
    del p_leaves


def ggn_vector_product(net: Any, loss: str | Loss) -> CurvatureFn:
    """``G v`` for a vector ``v`` shaped like params, without forming G.

    The forward of the linearised network by every layer's own ``tangent``
    rule gives ``J v``, the loss Hessian ``H_i (J v)_i`` per example (times
    ``w``), and the δ rules give ``Jᵀ`` of that: about one forward and one
    backward pass more than a gradient.

    Returns:
      ``fn(params, x, y, v)`` → like params.
    """
    net, loss = check_net(net), get_loss(loss)
    if loss.hessian_vp is None:
        raise ValueError(
            f"loss {loss.name!r} has no hessian_vp: give the jbp.Loss a hessian_vp= to use "
            "ggn_vector_product"
        )

    def fn(
        params: Params, x: Any, y: Any, v: Params, *, mask: Any = None, dropout_key: Any = None
    ) -> Params:
        b = prepare(net, loss, params, x, y, mask, dropout_key)
        _check_like(v, params)
        out, caches = net.forward(params, b.x, b.context)
        from .layers._base import tangent

        out_dot = tangent(net, params, caches, None, tuple(v))
        assert b.loss.hessian_vp is not None
        if out_dot is None:
            out_dot = jnp.zeros_like(out)
        h = b.loss.hessian_vp(out, b.y, out_dot) * loss.scale(b.x.shape[0])
        grads, _ = net.backward(params, caches, h)
        return _like(params, grads)

    return fn


# --- the Hessian diagonal --------------------------------------------------------


def _chain(net: Any, params: Params, caches: Any, where: str = "net") -> list[tuple[Any, Any, Any]]:
    """(layer, params, cache) of a chain of Dense and Activation layers in nested
    Sequentials, in order; a clear error for anything else."""
    flat = []
    for i, (layer, p, c) in enumerate(zip(net.layers, params, caches, strict=True)):
        if isinstance(layer, Sequential):
            flat.extend(_chain(layer, p, c, f"{where}.layers[{i}]"))
        elif isinstance(layer, (Dense, Activation)):
            flat.append((layer, p, c))
        else:
            raise TypeError(
                f"`{where}.layers[{i}]` is {layer!r}: jbp.diag_hessian takes chains of Dense "
                "and Activation layers (nested Sequentials allowed)"
            )
    return flat


def _check_chain(net: Any, where: str = "net") -> None:
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Sequential):
            _check_chain(layer, f"{where}.layers[{i}]")
        elif not isinstance(layer, (Dense, Activation)):
            raise TypeError(
                f"`{where}.layers[{i}]` is {layer!r}: jbp.diag_hessian takes chains of Dense "
                "and Activation layers (nested Sequentials allowed)"
            )
        else:
            act = get_activation(layer.activation if isinstance(layer, Dense) else layer.name)
            if act.second_derivative is None:
                act.second(jnp.zeros(()), jnp.zeros(()))  # raises the clear error


class _Op(NamedTuple):
    """One step of :func:`diag_hessian`'s walk down a Dense chain, for its columns:
    ``"elementwise"`` (times ``f'``, ``value`` ``(batch, F)``), ``"record"`` (the
    Hessian diagonal at layer ``value``'s pre-activation) or ``"weights"`` (times
    ``wᵀ``, ``value`` the weight)."""

    kind: str
    value: Any


class _SignedSource(NamedTuple):
    """Columns that enter the walk before ``ops[start]``, each with a sign ±1."""

    start: int
    total: int
    make: Callable[[Array], tuple[Array, Array]]  # ks → (columns (K, batch, F), signs (K,))


def _residual_source(start: int, d: Array, w: Array) -> _SignedSource:
    """A signed diagonal ``diag(d)`` at the output of ``z = a w + b``, sent to its input:
    ``w diag(d) wᵀ = Σ_o ±(√d±_o w[:, o])(√d±_o w[:, o])ᵀ``, 2·O signed columns
    (the positive part of ``d``, then the negative)."""
    o = d.shape[1]
    roots = jnp.concatenate([jnp.sqrt(jnp.maximum(d, 0)), jnp.sqrt(jnp.maximum(-d, 0))], axis=1)
    ws = jnp.concatenate([w, w], axis=1)  # (I, 2·O)
    signs = jnp.concatenate([jnp.ones((o,), d.dtype), -jnp.ones((o,), d.dtype)])

    def make(ks: Array) -> tuple[Array, Array]:
        valid = ks < 2 * o
        kk = jnp.minimum(ks, 2 * o - 1)
        cols = jnp.moveaxis(roots[:, kk], 1, 0)[:, :, None] * ws[:, kk].T[:, None, :]
        return cols, jnp.where(valid, signs[kk], jnp.zeros((), d.dtype))

    return _SignedSource(start, 2 * o, make)


def _source_diagonals(source: _SignedSource, ops: list[_Op], chunk: int | None) -> dict[int, Array]:
    """``Σ_c sign_c col_c²`` at every record below the source's entry, its columns sent
    down ``ops`` a chunk at a time (summed over the chunks)."""

    def part(ks: Array) -> dict[int, Array]:
        cols, signs = source.make(ks)
        found = {}
        for op in ops[source.start :]:
            if op.kind == "elementwise":
                cols = cols * op.value[None]
            elif op.kind == "weights":
                cols = jnp.matmul(cols, op.value.T)
            else:
                found[op.value] = jnp.sum(signs[:, None, None] * cols * cols, axis=0)
        return found

    indices = _Source(source.total, lambda ks: ks)  # ``part`` makes the columns itself
    return _by_chunks(indices, chunk, part, stack=False)


def diag_hessian(net: Any, loss: str | Loss, *, chunk_size: int | None = None) -> CurvatureFn:
    """The diagonal of the Hessian of C (BackPACK's DiagHessian), by the δ rules.

    For chains of Dense and Activation layers on ``(batch, features)``. The
    Hessian with respect to each pre-activation z is sent backward as signed
    square-root columns: through ``f``, ``H_z = f'(z) H_out f'(z) + diag(g ⊙
    f''(z))`` with ``g = ∂C/∂out`` (the residual term; split into positive
    and negative parts when sent through a weight matrix), through ``z = a w
    + b``, ``H_a = w H_z wᵀ``; each weight's diagonal is ``(a²)ᵀ diag(H_z)``.
    Activations need a second derivative (``register_activation(...,
    second_derivative=...)``); piecewise-linear ones (relu) have none to send,
    so for them the result equals the exact GGN diagonal. Each non-zero
    residual adds 2·O signed columns (O the units of its layer) to every layer
    below.

    Args:
      net, loss: the chain and the loss.
      chunk_size: columns sent backward at once, per source (the loss's C
        columns; each residual's 2·O): ``None`` sends each source's columns all
        at once. Alive at once: ``K·B·F_max`` floats for the chunk (``F_max`` the
        widest layer), plus the forward's caches and the diagonals ``B·Σ F_l``.

    Returns:
      ``fn(params, x, y)`` → like params.
    """
    net, loss = check_net(net), get_loss(loss)
    _check_chain(net)
    _check_curvature_loss(loss, None)
    chunk = check_chunk_size(chunk_size)

    def fn(params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None) -> Params:
        b = prepare(net, loss, params, x, y, mask, dropout_key)  # a Dense chain: (batch, F)
        out, caches = net.forward(params, b.x, b.context)
        chain = _chain(net, params, caches)
        root = loss.scale(b.x.shape[0]) ** 0.5
        loss_source = _source(loss, b, out, None, None)
        sources = [
            _SignedSource(
                0,
                loss_source.total,
                lambda ks: (root * loss_source.make(ks), jnp.ones(ks.shape, out.dtype)),
            )
        ]
        g = b.loss.batch_delta(out, b.y)
        first = (
            min(i for i, (_, p, _) in enumerate(chain) if has_params(p))
            if any(has_params(p) for _, p, _ in chain)
            else len(chain)
        )
        # One pass down the chain: g, f', the residuals' signed diagonal d (summed
        # within each stretch between two weight matrices) and the column sources.
        ops: list[_Op] = []
        diagonals: dict[int, Array | None] = {}
        values: list[Params] = [None] * len(chain)
        d: Array | None = None
        for i in reversed(range(len(chain))):
            layer, p, cache = chain[i]
            if i < first:
                values[i] = p
                continue
            if isinstance(layer, Activation):
                z, act_out = cache
                act = get_activation(layer.name)
            else:
                _, z, act_out = cache
                act = get_activation(layer.activation)
            fp = act.derivative(z, act_out)
            ops.append(_Op("elementwise", fp))
            d = None if d is None else d * fp * fp
            if not act.second_is_zero:
                residual = g * act.second(z, act_out)
                d = residual if d is None else d + residual
            g = act.backward(g, z, act_out)
            if isinstance(layer, Activation):
                values[i] = {}
                continue
            ops.append(_Op("record", i))
            diagonals[i] = d
            if i > first:
                ops.append(_Op("weights", p["w"]))
                if d is not None:
                    sources.append(_residual_source(len(ops), d, p["w"]))
                d = None
                g = jnp.matmul(g, p["w"].T)
        h: dict[int, Array] = {}
        for source in sources:
            for i, part in _source_diagonals(source, ops, chunk).items():
                h[i] = h[i] + part if i in h else part
        for i, d_i in diagonals.items():
            hi = h[i] if d_i is None else h[i] + d_i
            a = chain[i][2][0]
            value = {"w": lax.dot_general(a * a, hi, (((0,), (0,)), ((), ())))}
            if chain[i][0].bias:
                value["b"] = jnp.sum(hi, axis=0)
            values[i] = value
        return _like(params, _rebuild(net, iter(values)))

    return fn


def _rebuild(net: Sequential, values: Any) -> tuple[Any, ...]:
    """Per-layer values in the nesting of ``net`` (the order of :func:`_chain`)."""
    return tuple(
        _rebuild(layer, values) if isinstance(layer, Sequential) else next(values)
        for layer in net.layers
    )


__all__ = [
    "KroneckerFactors",
    "diag_ggn",
    "diag_hessian",
    "ggn_vector_product",
    "kfac",
    "per_example_diag_ggn",
    "sqrt_ggn",
]
