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
import numpy as np

from ._checks import check_dtype, check_key
from ._per_example import walk_quantity
from ._verify import DEFAULT_RTOL, LeafRow, Report, _precision, compare
from .layers._base import (
    NO_CONTEXT,
    Context,
    forward,
    has_params,
    output_shape,
    takes_context,
    takes_tokens,
)
from .layers._factors import METHODS

Array = jax.Array

_NAMES = ("manual (the layer's rules)", "autodiff (jax.vjp)")


def _default_dtype() -> Any:
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _random_params(layer: Any, dtype: Any, rng: np.random.Generator) -> Any:
    """Params with the tree and shapes of ``layer.init`` (found without running it)
    and random values: Glorot normal for leaves of rank ≥ 2 (``fan_in`` the
    product of all axes but the last), N(0, 0.5²) for the rest, so that biases
    and norm scales are nonzero and not one constant (a rule that ignores such
    a leaf's value is caught)."""
    shapes = jax.eval_shape(lambda key: layer.init(key, dtype), jax.random.key(0))

    def fill(leaf: Any) -> Array:
        shape = tuple(leaf.shape)
        std = math.sqrt(2.0 / (math.prod(shape[:-1]) + shape[-1])) if len(shape) >= 2 else 0.5
        return jnp.asarray(rng.normal(0.0, std, shape), leaf.dtype)

    return jtu.tree_map(fill, shapes)


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
    padded: bool = False,
) -> Report:
    """Compare a layer's ``backward`` and per-example rules with autodiff.

    Args:
      layer: any object with the layer protocol (a combinator too).
      in_shape: the shape of one input example, without the batch axis.
      dtype: params, input and δ dtype; default float64 when
        ``jax_enable_x64`` is on, else float32.
      key: PRNG key; params, input, output δ and the weights of
        ``weighted_grads`` are drawn from it (default key 0). Params have the
        tree and shapes of ``layer.init`` and random values: Glorot normal for
        leaves of rank ≥ 2, N(0, 0.5²) for the rest.
      batch: examples in the random batch.
      rtol: relative tolerance (default by dtype, as :func:`jbp.compare`).
      padded: for a layer that takes a context on sequences ``(T, ...)``: also a
        random padding mask (right padding, each example at least one real
        position). A layer that takes a context always gets a dropout key
        drawn from ``key``, so a :class:`jbp.Dropout` drops.

    A layer that takes a context is checked per example against the Jacobian of
    its per-example outputs over the whole batch (``jax.jacrev``: one dropout
    draw, one mask, for the batch); any other layer against ``vmap`` of
    ``jax.vjp`` over single examples.

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

    # Values by numpy from a seed drawn with the key: jax.random would compile its
    # kernels for every new shape (seconds per layer on a CPU).
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    params = _random_params(layer, dtype, rng)
    if takes_tokens(layer):  # an Embedding: integer tokens in, no input δ out
        first = layer
        while hasattr(first, "layers"):
            first = first.layers[0]
        x = jnp.asarray(rng.integers(0, first.vocab, (batch, *in_shape)), jnp.int32)
    else:
        x = jnp.asarray(rng.standard_normal((batch, *in_shape)), dtype)
    delta_out = jnp.asarray(rng.standard_normal((batch, *out_shape)), dtype)
    c = jnp.asarray(rng.uniform(0.5, 1.5, batch), dtype)
    context = NO_CONTEXT
    if takes_context(layer):
        mask = None
        if padded:
            if not in_shape:
                raise ValueError("`padded=True` needs sequences: `in_shape` of rank ≥ 1 (T, ...)")
            t = in_shape[0]
            lengths = rng.integers(1, t + 1, batch)
            mask = jnp.asarray(np.arange(t)[None] < lengths[:, None])
        context = Context(mask, jax.random.fold_in(key, 1))
    with jax.default_matmul_precision("highest"):
        rows = _compare_rules(layer, params, x, delta_out, c, out_shape, rtol, context)
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


def _reference(
    layer: Any, params: Any, x: Array, delta_out: Array, c: Array, context: Context
) -> dict[str, Any]:
    """What autodiff says each rule should give: ``jax.vjp`` of ``forward`` for the
    batch and, for each example, ``vmap`` of it over single examples (a layer that
    takes a context: ``jax.jacrev`` of the per-example outputs of the batch)."""
    if takes_tokens(layer):
        _, vjp = jax.vjp(lambda p: forward(layer, p, x, context)[0], params)  # reference
        ref = {"backward grads": vjp(delta_out)[0]}
    else:
        _, vjp = jax.vjp(lambda p, a: forward(layer, p, a, context)[0], params, x)  # reference
        grads, delta_in = vjp(delta_out)
        ref = {"backward grads": grads, "backward delta_in": delta_in}
    if not has_params(params):
        return ref

    def one(a: Array, d: Array) -> Any:
        _, vjp = jax.vjp(lambda p: layer.forward(p, a[None])[0], params)  # reference
        return vjp(d[None])[0]

    def per_example_outputs(p: Any) -> Array:
        out = forward(layer, p, x, context)[0] * delta_out
        return jnp.sum(out.reshape(out.shape[0], -1), axis=1)

    if takes_context(layer):
        g = jax.jacrev(per_example_outputs)(params)  # reference
    else:
        g = jax.vmap(one)(x, delta_out)
    sq = _sum_leaves(g)
    return {
        **ref,
        "per_example_grads": g,
        **{_norm_label(m): sq for m in METHODS},
        "sum_grad_squared": jtu.tree_map(lambda v: jnp.sum(v * v, axis=0), g),
        "weighted_grads": jtu.tree_map(lambda v: jnp.tensordot(c, v, axes=1), g),
    }


def _norm_label(method: str) -> str:
    return "per_example_sq_norms" + ("" if method == "auto" else f"[{method}]")


def _manual(
    layer: Any,
    params: Any,
    x: Array,
    delta_out: Array,
    c: Array,
    methods: tuple[str, ...],
    context: Context,
) -> dict[str, Any]:
    """What the layer's own rules give, by the same names as :func:`_reference`."""
    _, cache = forward(layer, params, x, context)
    grads, delta_in = layer.backward(params, cache, delta_out)
    got = {"backward grads": grads, "backward delta_in": delta_in}
    if not has_params(params):
        return got

    def quantity(name: str, *extra: Any, method: str = "auto") -> Any:
        return walk_quantity(layer, params, cache, delta_out, name, *extra, method=method)

    got["per_example_grads"] = quantity("per_example_grads")
    for m in methods:
        got[_norm_label(m)] = _sum_leaves_of(quantity("per_example_sq_norms", method=m))
    got["sum_grad_squared"] = quantity("sum_grad_squared")
    got["weighted_grads"] = quantity("weighted_grads", c)
    return got


def _compare_rules(
    layer: Any,
    params: Any,
    x: Array,
    delta_out: Array,
    c: Array,
    out_shape: tuple[int, ...],
    rtol: Any,
    context: Context,
) -> list[LeafRow]:
    shape = jax.eval_shape(lambda p, a: forward(layer, p, a, context)[0], params, x).shape
    if tuple(shape[1:]) != out_shape:
        return [
            _failed(
                "output_shape", f"forward gives {tuple(shape[1:])}, output_shape says {out_shape}"
            )
        ]
    factorised = getattr(layer, "grad_factors", None) is not None or hasattr(layer, "backward_walk")
    methods = METHODS if factorised else ("auto",)
    # Fresh closures, compiled anew: a rule edited since the last check is never
    # served from jit's cache.
    ref = jax.jit(lambda p, a, d, w, ctx: _reference(layer, p, a, d, w, ctx))(
        params, x, delta_out, c, context
    )
    try:
        got = jax.jit(lambda p, a, d, w, ctx: _manual(layer, p, a, d, w, methods, ctx))(
            params, x, delta_out, c, context
        )
    except Exception as e:  # a first draft that crashes is a failed check, not a crash
        return [_failed("backward", f"raised {type(e).__name__}: {e}")]
    names = ["backward grads"] if has_params(params) else []
    if not takes_tokens(layer):
        names.append("backward delta_in")
    if has_params(params):
        names += ["per_example_grads", *map(_norm_label, methods), "sum_grad_squared"]
        names.append("weighted_grads")
    rows: list[LeafRow] = []
    for name in names:
        rows += _rows(got[name], ref[name], name, rtol)
    return rows


def _sum_leaves_of(tree: Any) -> Array:
    """Add up the per-leaf-layer ``(batch,)`` squared norms a walk returns."""
    leaves: list[Array] = jtu.tree_leaves(tree)
    total = leaves[0]
    for leaf in leaves[1:]:
        total = total + leaf
    return total
