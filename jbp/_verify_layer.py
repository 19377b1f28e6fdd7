"""Check one layer's hand-written rules against autodiff: ``check_layer``.

For a random batch, random params and a random output δ, the layer's
``backward`` is compared with ``jax.vjp`` of its ``forward``, and each of its
per-example quantities with ``vmap`` of ``jax.vjp`` over single examples.
This is what a researcher runs on the first draft of a new backward rule.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._blame import rule_checks
from ._checks import check_dtype, check_key
from ._per_example import walk_quantity
from ._report import DEFAULT_RTOL, PRECISION, LeafRow, Report, RuleCheck, compare, current_precision
from .layers._base import (
    NO_CONTEXT,
    Context,
    children,
    forward,
    has_params,
    output_shape,
    takes_context,
    takes_tokens,
    walk_layers,
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


def _rows(tested: Any, reference: Any, prefix: str, rtol: float | None) -> tuple[LeafRow, ...]:
    if jtu.tree_structure(tested) != jtu.tree_structure(reference):  # type: ignore[operator]
        return (
            LeafRow.failure(
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
    ``jax.vjp`` over single examples. Both sides run under
    ``jax.default_matmul_precision("highest")``, whatever the global default
    (the report records it).

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
    with jax.default_matmul_precision(PRECISION):
        rows, notes = _compare_rules(layer, params, x, delta_out, c, out_shape, rtol, context)
        precision = current_precision()
    return Report(
        tuple(rows),
        _NAMES,
        float(rtol) if rtol is not None else DEFAULT_RTOL.get(jnp.dtype(dtype).name, 1e-4),
        jnp.dtype(dtype).name,
        precision,
        jax.default_backend(),
        layers=() if children(layer) else (repr(layer),),
        rules_fn=functools.partial(_layer_rules, layer, params, x, context, delta_out, rows, rtol),
        notes=tuple(notes),
    )


def _layer_rules(
    layer: Any,
    params: Any,
    x: Array,
    context: Context,
    delta_out: Array,
    rows: list[LeafRow],
    rtol: float | None,
) -> tuple[RuleCheck, ...]:
    """The rules behind a failed check's blame: a combinator's children checked in
    place (:func:`jbp._blame.rule_checks`); a leaf layer, its own backward rows."""
    backward = [r for r in rows if r.path.startswith("backward")]
    if children(layer) and backward:
        with jax.default_matmul_precision(PRECISION):
            return rule_checks(
                layer, params, x, context, lambda o: jnp.sum(o * delta_out),
                root_path="layer", rtol=rtol,
            )  # fmt: skip
    worst = max(backward, key=lambda r: r.rel_err if not math.isnan(r.rel_err) else math.inf,
                default=None)  # fmt: skip
    if worst is None:
        return ()
    ok = all(r.ok for r in backward)
    return (
        RuleCheck("layer", repr(layer), worst.rel_err, ok, worst.path.removeprefix("backward ")),
    )


def _reference_backward(
    layer: Any, params: Any, x: Array, delta_out: Array, context: Context
) -> Any:
    """``jax.vjp`` of ``forward`` for the batch: ``(grads, delta_in)`` (``delta_in``
    None for integer tokens)."""
    if takes_tokens(layer):
        _, vjp = jax.vjp(lambda p: forward(layer, p, x, context)[0], params)  # reference
        return vjp(delta_out)[0], None
    _, vjp = jax.vjp(lambda p, a: forward(layer, p, a, context)[0], params, x)  # reference
    return vjp(delta_out)


def _reference_per_example(
    layer: Any, params: Any, x: Array, delta_out: Array, c: Array, context: Context
) -> dict[str, Any]:
    """What autodiff says each per-example rule should give: for each example,
    ``vmap`` of ``jax.vjp`` over single examples (a layer that takes a context:
    ``jax.jacrev`` of the per-example outputs of the batch)."""

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
        "per_example_grads": g,
        **{_norm_label(m): sq for m in METHODS},
        "sum_grad_squared": jtu.tree_map(lambda v: jnp.sum(v * v, axis=0), g),
        "weighted_grads": jtu.tree_map(lambda v: jnp.tensordot(c, v, axes=1), g),
    }


def _norm_label(method: str) -> str:
    return "per_example_sq_norms" + ("" if method == "auto" else f"[{method}]")


def _manual_per_example(
    layer: Any,
    params: Any,
    x: Array,
    delta_out: Array,
    c: Array,
    methods: tuple[str, ...],
    context: Context,
) -> dict[str, Any]:
    """What the layer's own per-example rules give, by the names of
    :func:`_reference_per_example`."""
    _, cache = forward(layer, params, x, context)

    def quantity(name: str, *extra: Any, method: str = "auto") -> Any:
        return walk_quantity(layer, params, cache, delta_out, name, *extra, method=method)

    got = {"per_example_grads": quantity("per_example_grads")}
    for m in methods:
        got[_norm_label(m)] = _sum_leaves_of(quantity("per_example_sq_norms", method=m))
    got["sum_grad_squared"] = quantity("sum_grad_squared")
    got["weighted_grads"] = quantity("weighted_grads", c)
    return got


def _manual_backward(layer: Any, params: Any, x: Array, delta_out: Array, context: Context) -> Any:
    _, cache = forward(layer, params, x, context)
    grads, delta_in = layer.backward(params, cache, delta_out)
    return grads, (None if takes_tokens(layer) else delta_in)


def _manual_tangent(
    layer: Any, params: Any, x: Array, context: Context, p_dot: Any, a_dot: Any
) -> Array:
    _, cache = forward(layer, params, x, context)
    return layer.tangent(params, cache, a_dot, p_dot)


def _reference_tangent(
    layer: Any, params: Any, x: Array, context: Context, p_dot: Any, a_dot: Any
) -> Array:
    """``jax.jvp`` of the forward along ``(p_dot, a_dot)`` (``a_dot`` None: tokens)."""
    if a_dot is None:
        return jax.jvp(lambda p: forward(layer, p, x, context)[0], (params,), (p_dot,))[1]
    return jax.jvp(lambda p, a: forward(layer, p, a, context)[0], (params, x), (p_dot, a_dot))[
        1
    ]  # reference


def _missing(layer: Any, method: str) -> list[str]:
    """The leaf layers with params that lack ``method`` (per-example: ``grad_factors``
    or ``per_example_grads``)."""
    missing = []
    for _, node in walk_layers(layer):
        if children(node):
            continue
        if method == "tangent":
            ok = callable(getattr(node, "tangent", None))
        else:
            has = not jtu.tree_leaves(
                jax.eval_shape(lambda k, n=node: n.init(k), jax.random.key(0))
            )
            ok = has or any(
                callable(getattr(node, m, None)) for m in ("grad_factors", "per_example_grads")
            )
        if not ok:
            missing.append(repr(node))
    return missing


def _raised(name: str, e: Exception) -> LeafRow:
    return LeafRow.failure(name, f"raised {type(e).__name__}: {e}")


def _compare_rules(
    layer: Any,
    params: Any,
    x: Array,
    delta_out: Array,
    c: Array,
    out_shape: tuple[int, ...],
    rtol: Any,
    context: Context,
) -> tuple[list[LeafRow], list[str]]:
    """Each method the layer has, against autodiff: ``backward`` always; the
    per-example rules and ``tangent`` where implemented (else a note). A method
    that raises is a failed row with the exception's message."""
    try:
        shape = jax.eval_shape(lambda p, a: forward(layer, p, a, context)[0], params, x).shape
    except Exception as e:
        return [_raised("forward", e)], []
    if tuple(shape[1:]) != out_shape:
        note = f"forward gives {tuple(shape[1:])}, output_shape says {out_shape}"
        return [LeafRow.failure("output_shape", note)], []
    notes: list[str] = []
    parts = ["backward"]
    if has_params(params):
        missing = _missing(layer, "per_example")
        if missing:
            notes.append(
                "per-example rules: not implemented (no grad_factors or per_example_grads: "
                f"{', '.join(missing)}): not checked"
            )
        else:
            parts.append("per_example")
    missing = _missing(layer, "tangent")
    if missing:
        notes.append(f"tangent: not implemented ({', '.join(missing)}): not checked")
    else:
        parts.append("tangent")
    factorised = getattr(layer, "grad_factors", None) is not None or hasattr(layer, "backward_walk")
    methods = METHODS if factorised else ("auto",)
    rng = np.random.default_rng(1)
    p_dot = jtu.tree_map(lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), params)
    a_dot = None if takes_tokens(layer) else jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    args = (params, x, delta_out, c, context, p_dot, a_dot)

    def run(part: str, manual: bool, p: Any, a: Array, d: Array, w: Array, ctx: Context,
            pd: Any, ad: Any) -> Any:  # fmt: skip
        if part == "backward":
            backward = _manual_backward if manual else _reference_backward
            return backward(layer, p, a, d, ctx)
        if part == "per_example":
            if manual:
                return _manual_per_example(layer, p, a, d, w, methods, ctx)
            return _reference_per_example(layer, p, a, d, w, ctx)
        tangent = _manual_tangent if manual else _reference_tangent
        return tangent(layer, p, a, ctx, pd, ad)

    # One program for the references and one for the rules (fresh closures, compiled
    # anew: a rule edited since the last check is never served from jit's cache);
    # only if the rules raise, one program per method, to name the one that does.
    want = jax.jit(lambda *a: {part: run(part, False, *a) for part in parts})(*args)
    try:
        got = jax.jit(lambda *a: {part: run(part, True, *a) for part in parts})(*args)
    except Exception:  # a first draft that crashes is a failed row, not a crash
        got = {}
        for part in parts:
            try:
                got[part] = jax.jit(lambda *a, part=part: run(part, True, *a))(*args)
            except Exception as e:
                got[part] = e
    rows: list[LeafRow] = []
    for part in parts:
        if isinstance(got[part], Exception):
            rows.append(_raised(part, got[part]))
        elif part == "backward":
            if has_params(params):
                rows += _rows(got[part][0], want[part][0], "backward grads", rtol)
            if want[part][1] is not None:
                rows += _rows(got[part][1], want[part][1], "backward delta_in", rtol)
        elif part == "per_example":
            names = ["per_example_grads", *map(_norm_label, methods), "sum_grad_squared"]
            for name in [*names, "weighted_grads"]:
                rows += _rows(got[part][name], want[part][name], name, rtol)
        else:
            rows += _rows(got[part], want[part], "tangent", rtol)
    return rows, notes


def _sum_leaves_of(tree: Any) -> Array:
    """Add up the per-leaf-layer ``(batch,)`` squared norms a walk returns."""
    leaves: list[Array] = jtu.tree_leaves(tree)
    total = leaves[0]
    for leaf in leaves[1:]:
        total = total + leaf
    return total
