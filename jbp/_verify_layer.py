"""Check one layer's hand-written rules against autodiff: ``check_layer``.

For a random batch, random params and a random output δ, the layer's
``backward`` is compared with ``jax.vjp`` of its ``forward``, and each of its
per-example quantities with ``vmap`` of ``jax.vjp`` over single examples.
This is what a researcher runs on the first draft of a new backward rule.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._checks import check_dtype, check_key
from ._per_example import _leaf_quantity
from ._verify import DEFAULT_RTOL, LeafRow, Report, _precision, compare
from .layers._base import backward_walk, has_params, output_shape
from .layers._factors import METHODS

Array = jax.Array

_NAMES = ("manual (the layer's rules)", "autodiff (jax.vjp)")


def _default_dtype() -> Any:
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _perturb(params: Any, key: Array) -> Any:
    """Noise on every leaf ``init`` filled with one constant (zero biases, unit
    scales), so that a rule that ignores such a leaf's value is caught."""
    leaves, treedef = jtu.tree_flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for leaf, k in zip(leaves, keys, strict=False):
        if leaf.size and bool(jnp.all(leaf == leaf.reshape(-1)[0])):
            leaf = leaf + 0.5 * jax.random.normal(k, leaf.shape, leaf.dtype)
        out.append(leaf)
    return jtu.tree_unflatten(treedef, out)


def _failed(name: str, note: str) -> LeafRow:
    return LeafRow(name, None, (), math.nan, math.nan, math.inf, False, False, note)


def _rows(tested: Any, reference: Any, prefix: str, rtol: float | None) -> tuple[LeafRow, ...]:
    if jtu.tree_structure(tested) != jtu.tree_structure(reference):  # type: ignore[operator]
        return (
            _failed(
                prefix,
                f"tree {jtu.tree_structure(tested)} vs reference {jtu.tree_structure(reference)}",
            ),
        )
    return compare(tested, reference, rtol=rtol, names=_NAMES, prefix=prefix).rows


def _sum_leaves(tree: Any) -> Array:
    """``Σ_leaves ‖g_i‖²`` of a tree of per-example leaves, ``(batch,)``."""
    sq = [jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in jtu.tree_leaves(tree)]
    return sum(sq[1:], sq[0])


def check_layer(
    layer: Any,
    in_shape: tuple[int, ...],
    *,
    dtype: Any = None,
    key: Array | None = None,
    batch: int = 3,
    rtol: float | None = None,
) -> Report:
    """Compare a layer's ``backward`` and per-example rules with autodiff.

    Args:
      layer: any object with the layer protocol (a combinator too).
      in_shape: the shape of one input example, without the batch axis.
      dtype: params, input and δ dtype; default float64 when
        ``jax_enable_x64`` is on, else float32.
      key: PRNG key for params, input, output δ and weights (default key 0).
      batch: examples in the random batch.
      rtol: relative tolerance (default by dtype, as :func:`jbp.compare`).

    Returns:
      A :class:`jbp.Report` whose rows are named by method and leaf:
      ``backward grads['w']`` and ``backward delta_in`` (against ``jax.vjp`` of
      ``forward``), and, for a layer with params, ``per_example_grads``,
      ``per_example_sq_norms`` (each form, ``[gram]`` and ``[materialise]``,
      for layers with ``grad_factors``), ``sum_grad_squared`` and
      ``weighted_grads`` (against ``vmap`` of ``jax.vjp`` over single examples).

    Example:
      >>> import jax, jbp
      >>> jbp.check_layer(jbp.Conv(2, 3, (3, 3), stride=2), (7, 7, 2),
      ...                 dtype="float32").ok
      True
    """
    dtype = check_dtype(_default_dtype() if dtype is None else dtype)
    key = jax.random.key(0) if key is None else key
    check_key(key)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"`batch` must be a positive int, got {batch!r}")
    in_shape = tuple(in_shape)
    out_shape = output_shape(layer, in_shape)
    k_init, k_noise, k_x, k_delta, k_c = jax.random.split(key, 5)
    params = _perturb(layer.init(k_init, dtype), k_noise)
    x = jax.random.normal(k_x, (batch, *in_shape), dtype)
    delta_out = jax.random.normal(k_delta, (batch, *out_shape), dtype)

    with jax.default_matmul_precision("highest"):
        rows = list(_backward_rows(layer, params, x, delta_out, out_shape, rtol))
        if has_params(params):
            c = jax.random.uniform(k_c, (batch,), dtype, 0.5, 1.5)
            rows += _per_example_rows(layer, params, x, delta_out, c, rtol)
        precision = _precision()
    return Report(
        tuple(rows),
        _NAMES,
        float(rtol) if rtol is not None else DEFAULT_RTOL.get(jnp.dtype(dtype).name, 1e-4),
        jnp.dtype(dtype).name,
        precision,
        jax.default_backend(),
        layers=(repr(layer),),
    )


def _backward_rows(
    layer: Any, params: Any, x: Array, delta_out: Array, out_shape: tuple[int, ...], rtol: Any
) -> list[LeafRow]:
    out, cache = layer.forward(params, x)
    rows: list[LeafRow] = []
    if tuple(out.shape[1:]) != out_shape:
        rows.append(
            _failed(
                "output_shape",
                f"forward gives {tuple(out.shape[1:])}, output_shape says {out_shape}",
            )
        )
        return rows
    grads, delta_in = layer.backward(params, cache, delta_out)
    _, vjp = jax.vjp(lambda p, a: layer.forward(p, a)[0], params, x)  # reference
    ref_grads, ref_delta_in = vjp(delta_out)
    if has_params(params):
        rows += _rows(grads, ref_grads, "backward grads", rtol)
    rows += _rows(delta_in, ref_delta_in, "backward delta_in", rtol)
    return rows


def _per_example_rows(
    layer: Any, params: Any, x: Array, delta_out: Array, c: Array, rtol: Any
) -> list[LeafRow]:
    def one(a: Array, d: Array) -> Any:
        _, vjp = jax.vjp(lambda p: layer.forward(p, a[None])[0], params)  # reference
        return vjp(d[None])[0]

    ref = jax.vmap(one)(x, delta_out)
    _, cache = layer.forward(params, x)

    def quantity(name: str, *extra: Any, method: str = "auto") -> Any:
        def at_leaf(leaf: Any, p: Any, cache: Any, d: Array) -> Any:
            return _leaf_quantity(name, leaf, p, cache, d, *extra, method=method)

        return backward_walk(layer, params, cache, delta_out, at_leaf)[0]

    rows = _rows(quantity("per_example_grads"), ref, "per_example_grads", rtol)
    ref_sq = _sum_leaves(ref)
    factorised = getattr(layer, "grad_factors", None) is not None or hasattr(layer, "backward_walk")
    for method in METHODS if factorised else ("auto",):
        got = _sum_leaves_of(quantity("per_example_sq_norms", method=method))
        label = "per_example_sq_norms" + ("" if method == "auto" else f"[{method}]")
        rows += _rows(got, ref_sq, label, rtol)
    rows += _rows(
        quantity("sum_grad_squared"),
        jtu.tree_map(lambda g: jnp.sum(g * g, axis=0), ref),
        "sum_grad_squared",
        rtol,
    )
    rows += _rows(
        quantity("weighted_grads", c),
        jtu.tree_map(lambda g: jnp.tensordot(c, g, axes=1), ref),
        "weighted_grads",
        rtol,
    )
    return rows


def _sum_leaves_of(tree: Any) -> Array:
    """Add up the per-leaf-layer ``(batch,)`` squared norms a walk returns."""
    leaves = jtu.tree_leaves(tree)
    return sum(leaves[1:], leaves[0])
