"""The training step of ``fit(..., shapley=...)``: in-run first-order data Shapley
(:class:`jbp.InRunShapley`) in the step's own forward and backward pass."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr

from ._attribution import _learning_rate
from ._backprop import prepare
from ._losses import Loss
from ._per_example import _forward, _like
from ._train import _apply
from .layers import Sequential
from .layers._dropout import has_dropout
from .layers._factors import (
    _leaves,
    _map,
    cross,
    cross_flops,
    is_factor,
    project,
    project_flops,
    take_rows,
    weighted,
)

Array = jax.Array


def _validation_dots(val: Any, train: Any, v: int, dtype: Any) -> Array:
    """``⟨g_val, g_i⟩`` over one leaf, ``(B,)``: ``g_val`` the mean of the ``v``
    validation rows' gradients. The cross-Gram mean where it is cheaper, else
    ``⟨g_i, g_val⟩`` with ``g_val`` formed once."""
    if is_factor(val) and is_factor(train):
        gram, _ = cross_flops(val, train)
        if gram < project_flops(train) + project_flops(val):
            return jnp.mean(cross(val, train, "gram"), axis=0)
    mean = jnp.full((v,), 1.0 / v, dtype)
    return project(train, weighted(val, mean, "gram"))


def shapley_step(net: Sequential, loss: Loss, optimizer: Any, learning_rate: Any) -> Any:
    """The training step of ``fit(..., shapley=...)`` on checked arguments:
    ``step(state, x, y, mask, x_val, y_val, mask_val) -> (state, metrics)``, metrics
    as :func:`jbp.make_step`'s plus ``values`` ``(B,)`` (the step's in-run values of
    the batch's examples, :class:`InRunShapley`) and ``val_loss``."""
    schedule = _learning_rate(learning_rate)
    dropout = has_dropout(net)

    def step(
        state: Any, x: Array, y: Array, mask: Any, xv: Array, yv: Array, mv: Any
    ) -> tuple[Any, dict[str, Array]]:
        key, step_key = jr.split(state.key)
        b, v = x.shape[0], xv.shape[0]
        both = None
        if mask is not None or mv is not None:
            ones = lambda a, m: jnp.ones(a.shape[:2], bool) if m is None else m  # noqa: E731
            both = jnp.concatenate([ones(x, mask), ones(xv, mv)])
        batch = prepare(
            net, loss, state.params, jnp.concatenate([x, xv]), jnp.concatenate([y, yv]),
            both, step_key if dropout else None,
        )  # fmt: skip
        run = _forward(net, state.params, batch)
        factors = run.factors()
        train = _map(lambda f: take_rows(f, 0, b), factors)
        val = _map(lambda f: take_rows(f, b, b + v), factors)
        per_example = batch.loss.per_example(run.out, batch.y)
        scale = loss.scale(b)
        c = jnp.full((b,), scale, per_example.dtype)
        # "gram": the re-weighted pass ãᵀ(c ⊙ δ), never the per-example g_i
        grads = _like(state.params, _map(lambda f: weighted(f, c, "gram"), train))
        pairs = zip(_leaves(val), _leaves(train), strict=True)
        dots = sum(_validation_dots(fv, ft, v, c.dtype) for fv, ft in pairs)
        values = schedule(state.step) * scale * dots
        metrics = {"loss": loss.reduce(per_example[:b])}
        new, metrics = _apply(optimizer, state, key, grads, metrics)
        return new, {**metrics, "values": values, "val_loss": jnp.mean(per_example[b:])}

    return step
