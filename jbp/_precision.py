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


def is_low(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype narrower than float32 (bfloat16, float16)."""
    dt = jnp.dtype(dtype)
    return bool(jnp.issubdtype(dt, jnp.floating) and dt.itemsize < 4)


def widen(x: Any) -> Any:
    """``x`` in float32 when it is low precision (None and other dtypes as they are)."""
    if x is None or not is_low(x.dtype):
        return x
    return x.astype(jnp.float32)


def accumulation(dtype: Any) -> Any:
    """``preferred_element_type`` for products of ``dtype`` operands: float32 for a
    low-precision dtype, None (the operands' own) otherwise."""
    return jnp.float32 if is_low(dtype) else None


def product_dtype(dtype: Any) -> Any:
    """The dtype the operands of a product of ``dtype`` values are given in: ``dtype``
    itself (with a float32 accumulator when it is low precision), except for a
    low-precision dtype on CPU, where they are upcast to float32: XLA:CPU has no
    kernel for some bfloat16 × bfloat16 → float32 products ("Unsupported element
    type for DotThunk"), and the upcast gives the same numbers (the product of two
    bfloat16 or float16 numbers is exact in float32; the sum accumulates in float32
    either way). On GPU and TPU the products run on the low-precision operands."""
    if is_low(dtype) and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def dot(x: Array, y: Array, dims: Any) -> Array:
    """``lax.dot_general(x, y, dims)`` in ``x``'s dtype (``y`` cast to it) with a
    float32 accumulator when that dtype is low precision (the result is then
    float32: cast it where it is stored)."""
    t = product_dtype(x.dtype)
    return lax.dot_general(
        x.astype(t), y.astype(t), dims, preferred_element_type=accumulation(x.dtype)
    )


def matmul(a: Array, w: Array) -> Array:
    """``a @ w`` as :func:`dot` computes it (``w`` cast to ``a``'s dtype; float32
    accumulator and result for low-precision ``a``)."""
    t = product_dtype(a.dtype)
    return jnp.matmul(a.astype(t), w.astype(t), preferred_element_type=accumulation(a.dtype))


def conv(a: Array, w: Array, **kw: Any) -> Array:
    """``lax.conv_general_dilated(a, w, **kw)`` as :func:`dot` computes products."""
    t = product_dtype(a.dtype)
    return lax.conv_general_dilated(
        a.astype(t), w.astype(t), preferred_element_type=accumulation(a.dtype), **kw
    )


def total(x: Array, axis: Any) -> Array:
    """``jnp.sum(x, axis)``, accumulated (and returned) in float32 for a
    low-precision ``x``."""
    return jnp.sum(x, axis=axis, dtype=jnp.float32 if is_low(x.dtype) else None)


#: A mixed-precision check's tolerance in units of the compute dtype's unit round-off.
MIXED_RTOL_UNITS = 8


def unit_roundoff(dtype: Any) -> float:
    """``u = ε/2``, the unit round-off of ``dtype`` (bfloat16 ``2⁻⁸``, float16 ``2⁻¹¹``)."""
    return float(jnp.finfo(dtype).eps) / 2


def mixed_rtol(dtype: Any) -> float:
    """The default tolerance of a gradient check that computes in ``dtype``: ``8u``
    (bfloat16 ``2⁻⁵ ≈ 3.1e-2``, float16 ``2⁻⁸ ≈ 3.9e-3``).

    Where it comes from. The check compares jbp's δ rules with autodiff of the
    *same* mixed-precision forward (the same roundings, so the same relu kinks and
    max-pool choices; against the float64 gradient of the unrounded network both
    err by many u, see the tests), both accumulating in float32. What differs is
    where each backward rounds: jbp rounds a layer's δ to the compute dtype once,
    after its float32 products; autodiff rounds the cotangent of every
    low-precision value, and orders its float32 operations differently
    (activation derivatives from the rounded output or the float32 value, the
    loss's δ_L, a mean's ``1/T``). Each rounding is a relative error of at most
    ``u`` of that element, and those of the layers above a parameter add up in
    its gradient: ``8u`` allows about four differing roundings on each side along
    the way (the worst seen in jbp's tests: about ``2u`` in bfloat16 and ``4u``
    in float16, whose zero rule below is stricter), while a wrong δ rule errs by
    O(1). Errors are measured leaf by leaf against each leaf's scale, and a leaf
    within ``100·ε`` of the largest (the zero rule of :func:`jbp.compare`, ε the
    *compute* dtype's: for bfloat16 every leaf under 0.78 of the largest) against
    the largest: a bias gradient, a float32 sum over the batch and positions,
    cancels to far below the terms whose rounding it holds.
    """
    return MIXED_RTOL_UNITS * unit_roundoff(dtype)
