"""Blame the rule that is wrong: every layer's own ``backward``, checked in place.

When a network's gradients differ from autodiff, the first leaf that differs is
usually upstream of the wrong rule (a wrong δ flows down to every layer below
it). Here each layer is checked on its own, inside the network: given
autodiff's δ at its output (``∂C/∂out``, from autodiff of the network's tail),
its ``backward`` must return the ``δ_in`` and gradient that autodiff of
that layer's own forward gives. The reference δ at every layer's output comes
from one autodiff pass (vjp) of the objective with a zero *probe* added to each
layer's output (``∂C/∂probe`` is that δ); the same pass records each layer's
input, params and context.

Blame: walking backward from the loss, the first rule that differs and none
of whose children differ (a combinator is blamed only for its own rule). The
loss's δ (``∂C/∂out``) is checked first, as ``"loss"``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._report import PRECISION, RuleCheck, compare
from .layers import Parallel, Residual, Sequential, Tied
from .layers._base import NO_CONTEXT, Context, forward, output_shape, takes_tokens

Array = jax.Array


class _Registry:
    """What the probes see during one traced forward pass."""

    def __init__(self) -> None:
        self.probes: dict[str, Array] | None = None
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}
        self.seen: dict[str, tuple[Any, Array, Context]] = {}


@dataclasses.dataclass(frozen=True, eq=False)
class _Probe:
    """A layer that records its params, input and context and adds a zero probe to
    its output; everything else is the wrapped layer's."""

    inner: Any
    path: str
    registry: _Registry
    takes_context = True

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "path", "registry") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Any:
        return self.inner.init(key, dtype)

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return output_shape(self.inner, in_shape)

    def forward(self, params: Any, a: Array, context: Context = NO_CONTEXT) -> tuple[Any, Any]:
        out, cache = forward(self.inner, params, a, context)
        reg = self.registry
        reg.seen[self.path] = (params, a, context)
        if reg.probes is None:
            reg.shapes[self.path] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        else:
            out = out + reg.probes[self.path]
        return out, cache

    def backward(self, params: Any, cache: Any, delta_out: Array) -> tuple[Any, Array]:
        raise NotImplementedError("a probe only runs forward")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _rebuilt(node: Any, **children: Any) -> Any:
    """``node`` with new children, without re-running its build checks."""
    new = copy.copy(node)
    for name, value in children.items():
        object.__setattr__(new, name, value)
    return new


def _wrap(node: Any, path: str, reg: _Registry, nodes: dict[str, Any]) -> Any:
    """``node`` with a probe around it and around every layer its forward calls
    directly (the children of Sequential, Residual and Parallel; a Tied layer's
    inner layer). Other layers are checked whole."""
    if isinstance(node, Tied):  # never called itself: its Sequential calls node.layer
        return _rebuilt(node, layer=_wrap(node.layer, _join(path, "layer"), reg, nodes))
    nodes[path] = node
    if isinstance(node, Sequential):
        kids = tuple(
            _wrap(kid, _join(path, f"layers[{i}]"), reg, nodes) for i, kid in enumerate(node.layers)
        )
        node = _rebuilt(node, layers=kids)
    elif isinstance(node, Residual):
        node = _rebuilt(node, block=_wrap(node.block, _join(path, "block"), reg, nodes))
    elif isinstance(node, Parallel):
        kids = tuple(
            _wrap(kid, _join(path, f"branches[{j}]"), reg, nodes)
            for j, kid in enumerate(node.branches)
        )
        node = _rebuilt(node, branches=kids)
    return _Probe(node, path, reg)


def _rule(node: Any, params: Any, a: Array, context: Context, *, delta: Array) -> Any:
    """The layer's own ``(grads, δ_in)`` for ``delta`` at its output, and autodiff's."""
    _, cache = forward(node, params, a, context)
    grads, delta_in = node.backward(params, cache, delta)
    if takes_tokens(node):
        _, vjp = jax.vjp(lambda p: forward(node, p, a, context)[0], params)  # reference
        return (grads, None), (vjp(delta)[0], None)
    _, vjp = jax.vjp(lambda p, x: forward(node, p, x, context)[0], params, a)  # reference
    return (grads, delta_in), vjp(delta)


def _check(path: str, layer: str, got: Any, want: Any, rtol: float | None) -> RuleCheck:
    """One rule's :class:`RuleCheck` from its ``(grads, δ_in)`` and the reference's."""
    (g, d), (gr, dr) = got, want
    leaves = [("grads" + jtu.keystr(p), v) for p, v in jtu.tree_leaves_with_path(g)]
    refs = [("grads" + jtu.keystr(p), v) for p, v in jtu.tree_leaves_with_path(gr)]
    if dr is not None:
        leaves.append(("delta_in", d))
        refs.append(("delta_in", dr))
    if len(leaves) != len(refs):
        return RuleCheck(path, layer, math.inf, False, f"{len(leaves)} leaves vs {len(refs)}")
    if not refs:
        return RuleCheck(path, layer, 0.0, True)
    report = compare([v for _, v in leaves], [v for _, v in refs], rtol=rtol)
    worst = max(
        range(len(refs)),
        key=lambda k: (
            report.rows[k].rel_err if not math.isnan(report.rows[k].rel_err) else math.inf
        ),
    )
    return RuleCheck(path, layer, report.max_rel_err, report.ok, refs[worst][0])


def rule_checks(
    root: Any,
    params: Any,
    x: Array,
    context: Context,
    tail: Callable[[Array], Array],
    *,
    root_path: str,
    rtol: float | None = None,
) -> tuple[RuleCheck, ...]:
    """Every layer's own rule inside ``root``, given autodiff's δ at its output.

    ``tail(out)`` is the scalar downstream of ``root``'s output (the loss, or
    ``⟨δ_out, out⟩``). Returns one :class:`RuleCheck` per layer, in the order
    their forwards finish (children before their parent; the root last).
    """
    reg = _Registry()
    nodes: dict[str, Any] = {}
    wrapped = _wrap(root, "", reg, nodes)

    def objective(probes: dict[str, Array] | None) -> tuple[Array, Any]:
        reg.probes, reg.seen = probes, {}
        out, _ = wrapped.forward(params, x, context)
        return tail(out), dict(reg.seen)

    with jax.default_matmul_precision(PRECISION):
        jax.eval_shape(lambda: objective(None))
        order = list(reg.seen)  # the order the forwards finish (jit's dicts are sorted)
        zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in reg.shapes.items()}

        def run(zeros: dict[str, Array]) -> Any:
            value, vjp, seen = jax.vjp(objective, zeros, has_aux=True)  # reference: ∂C/∂probe
            (deltas,) = vjp(jnp.ones_like(value))
            return seen, deltas

        def rules(zeros: dict[str, Array], paths: tuple[str, ...]) -> Any:
            seen, deltas = run(zeros)
            return {path: _rule(nodes[path], *seen[path], delta=deltas[path]) for path in paths}

        # One program for the probes' pass and every layer's rule; only if a rule
        # raises, one program per layer, to name the layer that does.
        try:
            results: dict[str, Any] = jax.jit(rules, static_argnums=1)(zeros, tuple(order))
        except Exception:
            results = {}
            for path in order:
                try:
                    results[path] = jax.jit(rules, static_argnums=1)(zeros, (path,))[path]
                except Exception as e:  # a draft that raises is a failed rule, not a crash
                    results[path] = e
        checks = []
        for path in order:
            name, node = root_path if not path else path, nodes[path]
            if isinstance(results[path], Exception):
                checks.append(
                    RuleCheck(name, repr(node), math.inf, False, f"raised {results[path]!r}")
                )
            else:
                got, want = results[path]
                checks.append(_check(name, repr(node), got, want, rtol))
    return tuple(checks)


def loss_check(loss: Any, out: Array, y: Array, rtol: float | None) -> RuleCheck:
    """The loss's hand-written ``∂C/∂out`` against autodiff of the loss."""
    with jax.default_matmul_precision(PRECISION):
        got = loss.batch_delta(out, y)
        want = jax.grad(lambda o: loss(o, y))(out)  # reference
    report = compare(got, want, rtol=rtol)
    return RuleCheck("loss", repr(loss), report.max_rel_err, report.ok, "delta")
