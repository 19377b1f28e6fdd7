"""Autodiff references for the curvature quantities, and their comparison.

References are built from autodiff on the network output and the loss, never
from the δ rules: the Jacobian ``J = ∂out/∂θ`` by ``jax.jacfwd``, each
example's loss Hessian ``H_i`` by ``jax.hessian``, ``G = Σ_i w J_iᵀ H_i J_i``,
its diagonal, its per-example diagonals and products, the Kronecker factors'
exact cases, and ``jax.hessian`` of the objective for the Hessian diagonal.
They cost O(P²) memory: for small networks (tests, ``jbp verify --curvature``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._backprop import check_net, keeps_positions, objective, prepare
from ._losses import Loss, get_loss

Array = jax.Array
Params = Any


class GGNReference(NamedTuple):
    """``G`` (P × P), each example's ``J_iᵀ H_i J_i`` diagonal ``(batch, P)``, and
    ``unravel`` (a flat vector to a params-like tree)."""

    ggn: Array
    per_example_diag: Array
    unravel: Any


def reference_ggn(
    net: Any,
    loss: str | Loss,
    params: Params,
    x: Any,
    y: Any,
    *,
    mask: Any = None,
    dropout_key: Any = None,
) -> GGNReference:
    """The GGN by autodiff: ``J`` from ``jax.jacfwd`` of the network output, ``H_i`` from
    ``jax.hessian`` of each example's loss (with its own row of the padding mask)."""
    net, loss = check_net(net), get_loss(loss)
    batch = prepare(net, loss, params, x, y, mask, dropout_key)
    vector, unravel = ravel_pytree(params)
    out_shape = jax.eval_shape(lambda: net.forward(params, batch.x, batch.context)[0]).shape
    rows = batch.context.mask if keeps_positions(out_shape, batch.x.shape) else None

    @jax.jit
    def run(theta: Array, x: Array, y: Array, rows: Any) -> tuple[Array, Array]:
        def output(theta: Array) -> Array:
            return net.forward(unravel(theta), x, batch.context)[0]

        out = output(theta)
        b = out.shape[0]
        jac = jax.jacfwd(output)(theta).reshape(b, -1, theta.size)  # reference

        def example_loss(a: Array, yi: Array, mi: Any) -> Array:
            extra = {} if mi is None else {"mask": mi[None]}
            return loss.per_example(a[None], yi[None], **extra)[0]

        hess = jax.vmap(jax.hessian(example_loss))(out, y, rows)  # reference
        k = jac.shape[1]
        per_example = jnp.einsum("bkp,bkl,blq->bpq", jac, hess.reshape(b, k, k), jac)
        ggn = loss.scale(b) * jnp.sum(per_example, axis=0)
        return ggn, jnp.diagonal(per_example, axis1=1, axis2=2)

    ggn, diag = run(vector, batch.x, batch.y, rows)
    return GGNReference(ggn, diag, unravel)


def reference_hessian(
    net: Any, loss: str | Loss, params: Params, x: Any, y: Any, **keywords: Any
) -> Array:
    """``jax.hessian(objective)`` as a P × P matrix (flattened like ``ravel_pytree``)."""
    vector, unravel = ravel_pytree(params)
    fn = objective(net, loss)
    hessian = jax.hessian(lambda theta: fn(unravel(theta), x, y, **keywords))  # reference
    return jax.jit(hessian)(vector)


def flat(tree: Any) -> Array:
    """A params-like tree as one vector (``ravel_pytree``'s order)."""
    return ravel_pytree(tree)[0]


class CurvatureRow(NamedTuple):
    """One quantity's relative error against its autodiff reference (max |Δ| over
    max |reference|; the absolute error where the reference is all zero)."""

    quantity: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(jnp.isfinite(self.error)) and self.error <= self.tolerance


class CurvatureReport(NamedTuple):
    """Every checked quantity of one problem; ``skipped`` names those that do not apply."""

    rows: tuple[CurvatureRow, ...]
    skipped: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def worst(self) -> float:
        return max((r.error for r in self.rows), default=0.0)

    def format(self) -> str:
        lines = [
            f"{r.quantity:22s} {r.error:9.2e}  (tol {r.tolerance:.0e})  "
            f"{'ok' if r.passed else 'MISMATCH'}"
            for r in self.rows
        ]
        if self.skipped:
            lines.append("skipped: " + ", ".join(self.skipped))
        return "\n".join(lines)


def _error(got: Array, want: Array) -> float:
    got, want = jnp.asarray(got), jnp.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    diff = float(jnp.max(jnp.abs(got - want))) if want.size else 0.0
    scale = float(jnp.max(jnp.abs(want))) if want.size else 0.0
    if not jnp.all(jnp.isfinite(got)):
        return float("inf")
    return diff / scale if scale > 0 else diff


def _default_rtol(dtype: Any) -> float:
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _has_tangents(net: Any) -> bool:
    from .layers._base import children, walk_layers

    return all(
        callable(getattr(layer, "tangent", None))
        for _, layer in walk_layers(net)
        if not children(layer)
    )


def _hessian_applies(net: Any, x: Any) -> bool:
    from ._activations import get_activation
    from .layers import Activation, Dense, Sequential

    def ok(layer: Any) -> bool:
        if isinstance(layer, Sequential):
            return all(ok(child) for child in layer.layers)
        if isinstance(layer, Dense):
            return get_activation(layer.activation).second_derivative is not None
        if isinstance(layer, Activation):
            return get_activation(layer.name).second_derivative is not None
        return False

    return ok(net) and jnp.ndim(x) in (1, 2)


def check_curvature(
    net: Any,
    loss: str | Loss,
    params: Params,
    x: Any,
    y: Any,
    *,
    rtol: float | None = None,
    seed: int = 0,
    mask: Any = None,
    dropout_key: Any = None,
) -> CurvatureReport:
    """Check every curvature quantity on one problem against its autodiff reference.

    Quantities (each jitted): ``diag_ggn`` and ``per_example_diag_ggn`` against
    the diagonals of ``Σ_i w J_iᵀ H_i J_i``; ``sqrt_ggn`` by ``Σ_{c,i} v_ic v_icᵀ
    = G``; ``ggn_vector_product`` against ``G v`` for a random ``v`` (where
    every layer has a ``tangent`` rule); ``diag_hessian`` against the diagonal
    of ``jax.hessian(objective)`` (chains of Dense and Activation layers whose
    activations have ``f''``). ``rtol``: 1e-9 in float64, 1e-4 in float32 by
    default. ``mask`` and ``dropout_key`` as for :func:`jbp.backprop`.
    References cost O(P²) memory: keep problems small.
    """
    from . import _curvature as curv

    net, loss = check_net(net), get_loss(loss)
    kw = {"mask": mask, "dropout_key": dropout_key}
    ref = reference_ggn(net, loss, params, x, y, **kw)
    flat_params, _ = ravel_pytree(params)
    tol = _default_rtol(flat_params.dtype) if rtol is None else rtol
    rows, skipped = [], []

    def row(name: str, got: Array, want: Array) -> None:
        rows.append(CurvatureRow(name, _error(got, want), tol))

    row(
        "diag_ggn",
        flat(jax.jit(curv.diag_ggn(net, loss))(params, x, y, **kw)),
        jnp.diagonal(ref.ggn),
    )
    per_example = jax.jit(curv.per_example_diag_ggn(net, loss))(params, x, y, **kw)
    row("per_example_diag_ggn", jax.vmap(flat)(per_example), ref.per_example_diag)
    columns = jax.vmap(jax.vmap(flat))(jax.jit(curv.sqrt_ggn(net, loss))(params, x, y, **kw))
    row("sqrt_ggn", jnp.einsum("cbp,cbq->pq", columns, columns), ref.ggn)
    if _has_tangents(net):
        v = jax.random.normal(jax.random.key(seed), flat_params.shape, flat_params.dtype)
        gv = jax.jit(curv.ggn_vector_product(net, loss))(params, x, y, ref.unravel(v), **kw)
        row("ggn_vector_product", flat(gv), ref.ggn @ v)
    else:
        skipped.append("ggn_vector_product (a layer has no tangent rule)")
    if _hessian_applies(net, x):
        hess = reference_hessian(net, loss, params, x, y, **kw)
        row(
            "diag_hessian",
            flat(jax.jit(curv.diag_hessian(net, loss))(params, x, y, **kw)),
            jnp.diagonal(hess),
        )
    else:
        skipped.append("diag_hessian (not a Dense/Activation chain with f'')")
    return CurvatureReport(tuple(rows), tuple(skipped))
