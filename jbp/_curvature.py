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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

from ._activations import get_activation
from ._backprop import check_net, prepare
from ._checks import check_key
from ._losses import Loss, get_loss
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


def _loss_columns(loss: Loss, out: Array, y: Array, mc_samples: int | None, key: Any) -> Array:
    """``(C, batch, *out)`` columns of the per-example loss Hessian's square root."""
    if mc_samples is None:
        assert loss.sqrt_hessian is not None
        return loss.sqrt_hessian(out, y)
    assert loss.sample_sqrt_hessian is not None
    return loss.sample_sqrt_hessian(key, out, y, mc_samples)


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
    _check_key_for(mc, key)
    b = prepare(net, loss, params, x, y, mask, dropout_key)
    out, caches = net.forward(params, b.x, b.context)
    cols = _loss_columns(b.loss, out, b.y, mc, key)
    structure, leaves = _column_walk(net, params, caches, cols)
    return _Columns(structure, leaves, loss.scale(b.x.shape[0]), b.context.mask)


CurvatureFn = Callable[..., Any]


def _over_columns(
    net: Sequential, loss: Loss, mc: int | None, finish: Callable[[_Columns], Any]
) -> CurvatureFn:
    """``fn(params, x, y, *, key=None, mask=None, dropout_key=None)``: the columns sent
    back through the network, then ``finish`` of them (shaped like params)."""

    def fn(
        params: Params,
        x: Any,
        y: Any,
        *,
        key: Any = None,
        mask: Any = None,
        dropout_key: Any = None,
    ) -> Params:
        return _like(params, finish(_columns(net, loss, params, x, y, mc, key, mask, dropout_key)))

    return fn


def _setup(net: Any, loss: str | Loss, mc_samples: Any) -> tuple[Sequential, Loss, int | None]:
    net, loss = check_net(net), get_loss(loss)
    mc = _check_mc(mc_samples)
    _check_curvature_loss(loss, mc)
    return net, loss, mc


def sqrt_ggn(net: Any, loss: str | Loss, *, mc_samples: int | None = None) -> CurvatureFn:
    """The backpropagated square-root columns of the GGN (BackPACK's SqrtGGN).

    Args:
      net, loss: the network and loss (a built-in one or a :class:`jbp.Loss`
        with ``sqrt_hessian`` / ``sample_sqrt_hessian``).
      mc_samples: ``None`` for the exact square root (C columns per example:
        the output size, or positions × classes for sequence ``softmax_xent``)
        or M Monte-Carlo columns sampled from the model's predictive.

    Returns:
      ``fn(params, x, y, *, key=None)`` → like params with two leading axes,
      ``(C, batch, *leaf)``: ``v_ic = √w ∂(s_icᵀ a_i)/∂θ``, so that the GGN
      block of each leaf is ``Σ_{c,i} v_ic v_icᵀ`` (exactly, or in
      expectation with MC columns). ``key`` is required with ``mc_samples``.
    """
    net, loss, mc = _setup(net, loss, mc_samples)

    def finish(run: _Columns) -> Any:
        root = run.scale**0.5
        return jtu.tree_map(lambda g: root * g, _fill(run, _column_grads))

    return _over_columns(net, loss, mc, finish)


def diag_ggn(net: Any, loss: str | Loss, *, mc_samples: int | None = None) -> CurvatureFn:
    """The diagonal of the generalised Gauss-Newton matrix ``G = Σ_i w J_iᵀ H_i J_i``.

    Exact (``mc_samples=None``, BackPACK's DiagGGNExact) or Monte-Carlo with M
    sampled columns (DiagGGNMC; unbiased). Dense on ``(batch, F)``: one matmul
    for all columns, ``(a²)ᵀ Σ_c s_c²``.

    Returns:
      ``fn(params, x, y, *, key=None)`` → like params. ``key`` is required
      with ``mc_samples``.
    """
    net, loss, mc = _setup(net, loss, mc_samples)

    def finish(run: _Columns) -> Any:
        values = _fill(run, lambda leaf, f: _leaf_diag(leaf, f, False))
        return jtu.tree_map(lambda d: run.scale * d, values)

    return _over_columns(net, loss, mc, finish)


def per_example_diag_ggn(
    net: Any, loss: str | Loss, *, mc_samples: int | None = None
) -> CurvatureFn:
    """``diag(J_iᵀ H_i J_i)`` for every example, unscaled like ``g_i`` (BatchDiagGGN).

    ``diag_ggn`` is ``w`` times the sum over the batch axis. No Python loop
    over examples: the per-example diagonals are formed from each layer's
    cache and columns.

    Returns:
      ``fn(params, x, y, *, key=None)`` → like params with a leading batch axis.
    """
    net, loss, mc = _setup(net, loss, mc_samples)

    return _over_columns(
        net, loss, mc, lambda run: _fill(run, lambda leaf, f: _leaf_diag(leaf, f, True))
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


def kfac(net: Any, loss: str | Loss, *, kind: str = "kfac", mc_samples: int = 1) -> CurvatureFn:
    """Kronecker factors of the GGN blocks of every outer-product leaf.

    Args:
      net, loss: the network and loss.
      kind: ``"kfac"`` (the G factor from ``mc_samples`` Monte-Carlo columns,
        Martens & Grosse 2015) or ``"kflr"`` (from the exact square root,
        Botev et al. 2017).
      mc_samples: Monte-Carlo columns for ``kind="kfac"`` (default 1).

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

    return _over_columns(net, loss, mc, lambda run: _fill(run, lambda _, f: layer_factors(f, run)))


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


class _Curvature(NamedTuple):
    """The Hessian of C with respect to one activation ``(batch, F)``:
    ``Σ_k sign_k Σ_c cols_k[c] cols_k[c]ᵀ + Σ diag(r)`` per example."""

    cols: list[tuple[float, Array]]  # (sign, (C, batch, F))
    diags: list[Array]  # (batch, F), signed

    def through_elementwise(self, fp: Array, residual: Array | None) -> _Curvature:
        """Through ``out = f(z)``: columns ⊙ f'(z), diagonals ⊙ f'², plus ``g ⊙ f''``."""
        cols = [(s, c * fp[None]) for s, c in self.cols]
        diags = [d * fp * fp for d in self.diags]
        if residual is not None:
            diags.append(residual)
        return _Curvature(cols, diags)

    def diagonal(self) -> Array:
        parts = [s * jnp.sum(c * c, axis=0) for s, c in self.cols] + list(self.diags)
        return sum(parts[1:], parts[0])

    def through_weights(self, w: Array) -> _Curvature:
        """To the input of ``z = a w + b``: columns times wᵀ; each diagonal ``diag(r)``
        becomes signed columns ``√r±_c w[:, c]`` (one per output unit)."""
        cols = [(s, jnp.matmul(c, w.T)) for s, c in self.cols]
        for r in self.diags:
            for sign, part in ((1.0, jnp.maximum(r, 0)), (-1.0, jnp.maximum(-r, 0))):
                root = jnp.sqrt(part)  # (batch, O)
                cols.append((sign, jnp.moveaxis(root, 1, 0)[:, :, None] * w.T[:, None, :]))
        return _Curvature(cols, [])


def diag_hessian(net: Any, loss: str | Loss) -> CurvatureFn:
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
    residual adds one column per unit of its layer to every layer below.

    Returns:
      ``fn(params, x, y)`` → like params.
    """
    net, loss = check_net(net), get_loss(loss)
    _check_chain(net)
    _check_curvature_loss(loss, None)

    def fn(params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None) -> Params:
        b = prepare(net, loss, params, x, y, mask, dropout_key)  # a Dense chain: (batch, F)
        out, caches = net.forward(params, b.x, b.context)
        chain = _chain(net, params, caches)
        scale = loss.scale(b.x.shape[0])
        assert b.loss.sqrt_hessian is not None
        curv = _Curvature([(1.0, scale**0.5 * b.loss.sqrt_hessian(out, b.y))], [])
        g = b.loss.batch_delta(out, b.y)
        first = (
            min(i for i, (_, p, _) in enumerate(chain) if has_params(p))
            if any(has_params(p) for _, p, _ in chain)
            else len(chain)
        )
        values: list[Params] = [None] * len(chain)
        for i in reversed(range(len(chain))):
            layer, p, cache = chain[i]
            if i < first:
                values[i] = p
                continue
            if isinstance(layer, Activation):
                a, act_out = cache
                act = get_activation(layer.name)
                fp = act.derivative(a, act_out)
                residual = None if act.second_is_zero else g * act.second(a, act_out)
                curv = curv.through_elementwise(fp, residual)
                g = act.backward(g, a, act_out)
                values[i] = {}
                continue
            a, z, act_out = cache
            act = get_activation(layer.activation)
            fp = act.derivative(z, act_out)
            residual = None if act.second_is_zero else g * act.second(z, act_out)
            curv = curv.through_elementwise(fp, residual)
            g = act.backward(g, z, act_out)
            h = curv.diagonal()  # (batch, fan_out)
            value = {"w": lax.dot_general(a * a, h, (((0,), (0,)), ((), ())))}
            if layer.bias:
                value["b"] = jnp.sum(h, axis=0)
            values[i] = value
            if i > first:
                curv = curv.through_weights(p["w"])
                g = jnp.matmul(g, p["w"].T)
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
