"""Dropout, driven by the dropout key of the forward's context.

``Dropout(rate)``: each value is dropped with probability ``rate`` and the kept
ones scaled by ``1/(1 − rate)`` ("inverted" dropout), so the layer is the
identity in expectation and at evaluation, when no key is given. The keep mask is
drawn over the whole input ``(batch, ...)``, one independent mask per example,
from the context's key (which every combinator folds with the child's index, so
two Dropout layers draw different masks). Given the key, the layer is a fixed
elementwise linear map: autodiff of the objective called with the same
``dropout_key`` sees the same masks, so verification is exact, and each
example's gradient is defined (its mask is part of the batch's draw).

δ rule: ``∂C/∂a = δ_out ⊙ keep / (1 − rate)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from .._checks import check_dtype
from ._base import NO_CONTEXT, Context, Layer, Params, Shape, walk_layers

Array = jax.Array


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Dropout(Layer):
    """Inverted dropout: drop each value with probability ``rate``, scale the rest.

    Args:
      rate: the probability of dropping a value, in ``[0, 1)``.

    Active only when the call is given a ``dropout_key`` (training); the identity
    otherwise (evaluation). Any shape; params ``{}``.
    """

    rate: float

    takes_context = True
    keeps_width = True

    def __post_init__(self) -> None:
        rate = self.rate
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
            raise ValueError(
                f"`rate` is the probability of dropping a value and must lie in [0, 1), got {rate!r}"
            )

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        check_dtype(dtype)
        return {}

    def output_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def forward(self, params: Params, a: Array, context: Context = NO_CONTEXT) -> tuple[Array, Any]:
        """``where(keep, a / (1 − rate), 0)``, ``keep ~ Bernoulli(1 − rate)`` from the
        context's key; the identity without one. The cache is the keep mask (or None)."""
        if context.key is None or self.rate == 0:
            return a, None
        keep = jr.bernoulli(context.key, 1.0 - self.rate, a.shape)
        return jnp.where(keep, a * (1.0 / (1.0 - self.rate)), 0), keep

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        if cache is None:
            return {}, delta_out
        return {}, jnp.where(cache, delta_out * (1.0 / (1.0 - self.rate)), 0)

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """The same masked scaling of ``a_dot`` (the layer is linear)."""
        if a_dot is None or cache is None:
            return a_dot
        return jnp.where(cache, a_dot * (1.0 / (1.0 - self.rate)), 0)


def has_dropout(net: Any) -> bool:
    """Whether a network holds a :class:`Dropout` anywhere (so a call draws masks when
    given a dropout key)."""
    return any(isinstance(layer, Dropout) for _, layer in walk_layers(net))
