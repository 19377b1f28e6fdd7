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

from ._backprop import check_net, objective, prepare
from ._losses import Loss, get_loss

Array = jax.Array
Params = Any


class GGNReference(NamedTuple):
    """``G`` (P × P), each example's ``J_iᵀ H_i J_i`` diagonal ``(batch, P)``, and
    ``unravel`` (a flat vector to a params-like tree)."""

    ggn: Array
    per_example_diag: Array
    unravel: Any


def reference_ggn(net: Any, loss: str | Loss, params: Params, x: Any, y: Any) -> GGNReference:
    """The GGN by autodiff: ``J`` from ``jax.jacfwd`` of the network output, ``H_i`` from
    ``jax.hessian`` of each example's loss."""
    net, loss = check_net(net), get_loss(loss)
    x, y = prepare(net, loss, params, x, y)
    flat, unravel = ravel_pytree(params)

    def output(theta: Array) -> Array:
        return net.forward(unravel(theta), x)[0]

    out = output(flat)
    b = out.shape[0]
    jac = jax.jacfwd(output)(flat).reshape(b, -1, flat.size)  # reference

    def example_loss(a: Array, yi: Array) -> Array:
        return loss.per_example(a[None], yi[None])[0]

    hess = jax.vmap(jax.hessian(example_loss))(out, y)  # reference
    k = jac.shape[1]
    hess = hess.reshape(b, k, k)
    per_example = jnp.einsum("bkp,bkl,blq->bpq", jac, hess, jac)
    ggn = loss.scale(b) * jnp.sum(per_example, axis=0)
    diag = jnp.diagonal(per_example, axis1=1, axis2=2)
    return GGNReference(ggn, diag, unravel)


def reference_hessian(net: Any, loss: str | Loss, params: Params, x: Any, y: Any) -> Array:
    """``jax.hessian(objective)`` as a P × P matrix (flattened like ``ravel_pytree``)."""
    flat, unravel = ravel_pytree(params)
    fn = objective(net, loss)
    return jax.hessian(lambda theta: fn(unravel(theta), x, y))(flat)  # reference


def flat(tree: Any) -> Array:
    """A params-like tree as one vector (``ravel_pytree``'s order)."""
    return ravel_pytree(tree)[0]
