"""Mixed precision: the activations' dtype computes, float32 accumulates.

jbp's mixed precision keeps the parameters in float32 (``net.init(key,
jnp.float32)``) and lets the *activations' dtype* choose the compute dtype: a
batch ``x`` given in bfloat16 (or float16), or a :class:`jbp.Cast` layer
(``jbp.Cast("bfloat16")``, needed after an ``Embedding``, whose input is
tokens), makes every layer after it compute in that dtype:

- matmuls and convolutions cast the float32 params to the activations' dtype
  and accumulate in float32 (``preferred_element_type=jnp.float32``); the
  result is rounded once to the compute dtype (after the bias is added);
- weight gradients ``aᵀδ`` and bias sums accumulate in float32 and come back
  in the params' dtype (float32);
- activations (``f``, ``f'``), norms' statistics, softmax (attention) and the
  losses compute in float32 from the low-precision values and hand back
  activations and δ in the compute dtype (losses from low-precision logits in
  their stable forms, their value in float32);
- per-example factors (ghost norms, ``Σ g_i²``, re-weighted gradients for
  clipping) are formed in float32.

A low-precision dtype is a floating dtype narrower than float32 (bfloat16,
float16). For float32 and float64 activations every helper here is the plain
operation (the same XLA program as without mixed precision).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

#: The low-precision compute dtypes jbp supports.
LOW_DTYPES = ("bfloat16", "float16")


def is_low(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype narrower than float32 (bfloat16, float16)."""
    dt = jnp.dtype(dtype)
    return bool(jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4)


def wide(dtype: Any) -> Any:
    """The dtype to compute in for values of ``dtype``: float32 for a low-precision
    dtype, else the dtype itself."""
    return jnp.float32 if is_low(dtype) else jnp.dtype(dtype)


def widen(x: Any) -> Any:
    """``x`` in float32 when it is low precision (None and other dtypes as they are)."""
    if x is None or not is_low(x.dtype):
        return x
    return x.astype(jnp.float32)


def accumulation(dtype: Any) -> Any:
    """``preferred_element_type`` for products of ``dtype`` operands: float32 for a
    low-precision dtype, None (the operands' own) otherwise."""
    return jnp.float32 if is_low(dtype) else None


def dot(x: Array, y: Array, dims: Any) -> Array:
    """``lax.dot_general(x, y, dims)`` with ``y`` cast to ``x``'s dtype and a float32
    accumulator when that dtype is low precision (the result is then float32: cast
    it where it is stored)."""
    return lax.dot_general(x, y.astype(x.dtype), dims, preferred_element_type=accumulation(x.dtype))


def total(x: Array, axis: Any) -> Array:
    """``jnp.sum(x, axis)``, accumulated (and returned) in float32 for a
    low-precision ``x``."""
    return jnp.sum(x, axis=axis, dtype=jnp.float32 if is_low(x.dtype) else None)


#: A mixed-precision check's tolerance in units of the compute dtype's unit round-off.
MIXED_RTOL_UNITS = 4


def unit_roundoff(dtype: Any) -> float:
    """``u = ε/2``, the unit round-off of ``dtype`` (bfloat16 ``2⁻⁸``, float16 ``2⁻¹¹``)."""
    return float(jnp.finfo(dtype).eps) / 2


def mixed_rtol(dtype: Any) -> float:
    """The default tolerance of a gradient check that computes in ``dtype``: ``4u``
    (bfloat16 ``2⁻⁶ ≈ 1.6e-2``, float16 ``2⁻⁹ ≈ 2.0e-3``).

    Why 4u. The check compares jbp's δ rules with autodiff of the *same*
    mixed-precision forward (the same roundings, so the same kinks and max-pool
    choices), both in float32 accumulation. What differs is where each backward
    rounds: jbp rounds a layer's δ to the compute dtype once, after its float32
    products; autodiff rounds the cotangent of every low-precision value. Each
    rounding is a relative error of at most ``u`` of that element, and the two
    backwards order their float32 operations differently on top (activation
    derivatives from the rounded output or the float32 value, the loss's ``δ_L``,
    a mean's ``1/T``): at most two differing roundings per side give ``4u``
    relative to the gradient's scale. Errors are measured leaf by leaf against
    each leaf's scale, and a leaf within ``100·ε`` of the largest (the zero rule
    of :func:`jbp.compare`, ε the *compute* dtype's) against the largest: a
    bias gradient, a sum over the batch and positions, cancels to far below the
    terms whose rounding it holds.
    """
    return MIXED_RTOL_UNITS * unit_roundoff(dtype)


def compute_dtype(net: Any, x: Any) -> Any:
    """The low-precision dtype a call of ``net`` on ``x`` computes in: of ``x``'s dtype
    (if low precision) and every :class:`jbp.Cast` layer's, the one of largest
    round-off; None when the whole call computes in float32 or float64."""
    from ._protocol import walk_layers
    from .layers._cast import Cast

    dtypes = [jnp.dtype(layer.dtype) for _, layer in walk_layers(net) if isinstance(layer, Cast)]
    if hasattr(x, "dtype"):
        dtypes.append(jnp.dtype(x.dtype))
    low = [d for d in dtypes if is_low(d)]
    return max(low, key=lambda d: float(jnp.finfo(d).eps)) if low else None
