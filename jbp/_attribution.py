"""Data attribution from the backward pass: dot products of per-example gradients.

The δ equations give, for every example, its layer inputs ã_i and its δ_i; the
same factors that give per-example gradient norms give the dot products between
the gradients of two different examples without materialising either:
``⟨g_i, g'_j⟩ = Σ_{t,s} (ã_it·ã'_js)(δ_it·δ'_js)`` for an outer-product leaf (and
the matching forms for elementwise and gather leaves, :func:`jbp.layers._factors.cross`).
That one quantity is the core of gradient-based data attribution: TracIn
(:class:`jbp.TracIn`), in-run data Shapley (``jbp.fit(..., shapley=...)``) and
gradient similarity between examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._losses import Loss
from ._per_example import _setup, _start
from .layers._factors import check_method, cross, is_leaf_factor, sq_norm

Array = jax.Array
Params = Any


def _per_layer(fn: Callable[..., Array], *trees: Any) -> dict[str, Array]:
    """``fn`` over the leaf factors of each top-level layer with params, summed per
    layer: ``{"layers[i]": value}``."""
    out = {}
    for i, parts in enumerate(zip(*trees, strict=True)):
        leaves = [jtu.tree_leaves(t, is_leaf=is_leaf_factor) for t in parts]
        if leaves[0]:
            values = [fn(*fs) for fs in zip(*leaves, strict=True)]
            out[f"layers[{i}]"] = sum(values[1:], values[0])
    return out


def _cosine(dots: Array, sq: Array, sq_other: Array) -> Array:
    """``dots / (‖g_i‖‖g'_j‖)``, 0 where either norm is 0."""
    scale = jnp.sqrt(sq[:, None] * sq_other[None, :])
    return jnp.where(scale > 0, dots / jnp.where(scale > 0, scale, 1), 0)


def per_example_dots(
    net: Any,
    loss: str | Loss,
    *,
    per_layer: bool = False,
    cosine: bool = False,
    method: str = "auto",
) -> Callable[..., Any]:
    """``⟨g_i, g'_j⟩`` between the per-example gradients of two batches, never materialised.

    ``g_i = ∂ℓ(x_i, y_i)/∂θ`` (unscaled, as everywhere in jbp). Per leaf, the dot
    products are formed from the two batches' factors (:mod:`jbp.layers._factors`):
    an outer-product leaf (Dense, Conv, attention projections) by the cross-Gram
    ("ghost") form ``Σ_{t,s} (ã_it·ã'_js)(δ_it·δ'_js)`` or by forming this one leaf's
    ``g`` on both sides and multiplying, whichever costs fewer flops (Dense on
    ``(batch, features)``: the Gram form, ``(ã_i·ã'_j)(δ_i·δ'_j)``, about
    ``2·B·B'·(I + O)`` flops against ``2·B·B'·I·O``); an embedding table by the
    token-equality form ``Σ_{t,s} [tok_it = tok'_js](δ_it·δ'_js)`` or per-example
    tables; an elementwise leaf (biases, norm scales) from its ``(batch, F)``
    gradients. A leaf shared by two layers (:class:`jbp.Tied`) sums over the pairs
    of uses, cross terms included. Memory: ``O(B·B')`` plus the activations (and
    one leaf's per-example gradients where that form is taken).

    Args:
      net, loss: the network and loss.
      per_layer: return ``{"layers[i]": (B, B')}``, one matrix per top-level layer
        with params (they add up to the total).
      cosine: return ``⟨g_i, g'_j⟩ / (‖g_i‖‖g'_j‖)`` instead (0 where a gradient is 0;
        per layer with ``per_layer``: each layer's own cosine).
      method: ``"auto"``, ``"gram"`` or ``"materialise"`` (one form everywhere).

    Returns:
      ``fn(params, x, y, x_other=None, y_other=None, *, mask=None, mask_other=None)``:
      the ``(B, B_other)`` matrix (or the dict). ``x_other=None``: the batch against
      itself (``(B, B)``, the squared norms on its diagonal). ``mask`` /
      ``mask_other``: padding masks ``(batch, T)`` of sequence batches.

    Example:
      >>> import jax, jax.numpy as jnp, jbp
      >>> net = jbp.mlp([3, 4, 2])
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.ones((5, 3)), jnp.zeros((5, 2))
      >>> dots = jbp.per_example_dots(net, "mse")(params, x, y, x[:2], y[:2])
      >>> dots.shape
      (5, 2)
    """
    net, loss = _setup(net, loss)
    check_method(method)

    def fn(
        params: Params, x: Any, y: Any, x_other: Any = None, y_other: Any = None, *,
        mask: Any = None, mask_other: Any = None,
    ) -> Any:  # fmt: skip
        if (x_other is None) != (y_other is None):
            raise ValueError(
                "`x_other` and `y_other` go together: give both (another batch) or neither "
                f"(the batch against itself); got x_other={'None' if x_other is None else 'an array'}"
                f" and y_other={'None' if y_other is None else 'an array'}"
            )
        run, _ = _start(net, loss, params, x, y, mask, None, None)
        factors = run.factors()
        other = factors
        if x_other is not None:
            other = _start(net, loss, params, x_other, y_other, mask_other, None, None)[0].factors()
        dots = _per_layer(lambda f, g: cross(f, g, method), factors, other)
        if cosine:
            sq = _per_layer(lambda f: sq_norm(f, method), factors)
            sq_other = sq if x_other is None else _per_layer(lambda f: sq_norm(f, method), other)
            if not per_layer:
                total = lambda d: sum(d.values())  # noqa: E731
                return _cosine(total(dots), total(sq), total(sq_other))
            return {k: _cosine(dots[k], sq[k], sq_other[k]) for k in dots}
        return dots if per_layer else sum(dots.values())

    return fn
