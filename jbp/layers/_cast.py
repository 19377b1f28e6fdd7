"""Cast: the layer that switches a network's compute dtype (mixed precision).

Parameters stay in float32; the dtype of the activations decides in which
dtype every later layer computes (see :mod:`jbp._precision`). ``Cast(dtype)``
rounds the activations to ``dtype`` in the forward and casts δ back to the
input's dtype in the backward, so the layers before it (an ``Embedding``,
whose input is tokens) keep theirs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._checks import check_dtype
from ._base import Layer, Params, Shape

Array = jax.Array


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Cast(Layer):
    """Round activations to ``dtype``: the switch for mixed precision.

    Args:
      dtype: a floating dtype, e.g. ``"bfloat16"`` or ``jnp.bfloat16`` (kept by name).

    Shapes: any ``(batch, ...)`` → the same shape in ``dtype``. Params ``{}``.
    δ rule: ``∂C/∂a = δ_out`` cast to the input's dtype (the cache is an empty
    array of that dtype).

    With float32 params, ``Cast("bfloat16")`` first (or after an ``Embedding``)
    makes every later layer compute in bfloat16 with float32 accumulation
    (parameter gradients come back in float32); giving ``x`` in bfloat16 is the
    same as a ``Cast`` first. ``Cast("float32")`` later switches back, e.g.
    before a layer that has no mixed precision (the recurrent layers).

    Example:
      >>> import jax, jax.numpy as jnp, jbp
      >>> net = jbp.Sequential([jbp.Cast("bfloat16"), jbp.Dense(3, 2, "tanh")])
      >>> params = net.init(jax.random.key(0), jnp.float32)
      >>> net.apply(params, jnp.ones((4, 3), jnp.float32)).dtype
      dtype(bfloat16)
      >>> jbp.backprop(net, "half_sse")(params, jnp.ones((4, 3), jnp.float32),
      ...                               jnp.zeros((4, 2), jnp.float32))[1]["w"].dtype
      dtype('float32')
    """

    dtype: Any

    keeps_width = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", check_dtype(self.dtype).name)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        check_dtype(dtype)
        return {}

    def output_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        return a.astype(self.dtype), jnp.zeros((0,), a.dtype)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        return {}, delta_out.astype(cache.dtype)

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``a_dot`` in ``dtype`` (the layer is linear)."""
        return None if a_dot is None else a_dot.astype(self.dtype)
