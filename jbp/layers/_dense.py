"""Dense and Activation: forward, δ rule and per-example factors side by side."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from .._activations import get_activation
from .._checks import check_dtype, check_key
from .._precision import dot, matmul, total, widen
from ._base import Layer, Params, Shape, ShapeError, add_tangents, last_axis
from ._factors import Elementwise, Factorised, Outer

Array = jax.Array

HE_ACTIVATIONS = frozenset({"relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu"})


def contract_leading(ndim: int) -> Any:
    """dot_general numbers contracting every axis but the last of two rank-``ndim``
    arrays: ``aᵀδ`` summed over the batch and any positions."""
    axes = tuple(range(ndim - 1))
    return ((axes, axes), ((), ()))


def contract_last(ndim: int) -> Any:
    """dot_general numbers for ``δ wᵀ``: δ's last axis against w's ``fan_out``."""
    return (((ndim - 1,), (1,)), ((), ()))


def he_or_glorot_std(activation: str, fan_in: int, fan_out: int) -> float:
    """He ``√(2/fan_in)`` for the relu family, Glorot ``√(2/(fan_in + fan_out))`` otherwise."""
    if activation in HE_ACTIVATIONS:
        return math.sqrt(2.0 / fan_in)
    return math.sqrt(2.0 / (fan_in + fan_out))


class Affine:
    """What layers of the form ``out = f(linear(a) + b)`` share (Dense, Conv): the
    bias, the activation, the cache ``(a, z, out)`` and ``δ = ∂C/∂out ⊙ f'(z)``."""

    activation: str
    bias: bool

    def _activate(self, params: Params, a: Array, z: Array) -> tuple[Array, Any]:
        """``z`` is the linear part, accumulated in float32 for low-precision ``a``:
        the bias is added there and the sum rounded once to ``a``'s dtype."""
        if self.bias:
            z = z + last_axis(params["b"], z.ndim)
        z = z.astype(a.dtype)
        out = get_activation(self.activation).apply(z)
        return out, (a, z, out)

    def _delta(self, cache: Any, delta_out: Array) -> Array:
        _, z, out = cache
        return get_activation(self.activation).backward(delta_out, z, out)

    def _linear(self, a: Array, w: Array) -> Array:
        raise NotImplementedError

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``f'(z) ⊙ (linear(a_dot, w) + linear(a, w_dot) + b_dot)``."""
        a, z, out = cache
        z_dot = None if a_dot is None else self._linear(a_dot, params["w"])
        if params_dot is not None:
            z_dot = add_tangents(z_dot, self._linear(a, params_dot["w"]))
            if self.bias:
                z_dot = z_dot + last_axis(params_dot["b"], z.ndim)
        if z_dot is None:
            return None
        return z_dot * get_activation(self.activation).derivative(z, out)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Dense(Affine, Factorised, Layer):
    """Fully connected layer ``out = f(a @ w + b)`` on the last axis of any rank.

    Args:
      fan_in: input features (the last axis of ``a``).
      fan_out: output features.
      activation: name of a registered activation (default ``"identity"``).
      bias: whether the layer has a bias ``b``.

    Shapes: ``a`` ``(batch, ..., fan_in)`` → ``out`` ``(batch, ..., fan_out)``.
    Params: ``{"w": (fan_in, fan_out), "b": (fan_out,)}`` (no ``"b"`` without
    bias). Initialisation: ``w ~ N(0, 2/fan_in)`` (He) for the relu family
    (relu, leaky_relu, elu, gelu, gelu_tanh, silu), ``w ~ N(0, 2/(fan_in +
    fan_out))`` (Glorot) otherwise; ``b = 0``.

    δ rule: ``δ = ∂C/∂out ⊙ f'(z)``; ``∂C/∂w = Σ_{i,t} a_it ⊗ δ_it`` (the batch
    and every other leading axis contracted); ``∂C/∂b = Σ_{i,t} δ_it``;
    ``∂C/∂a = δ wᵀ``. Per example: ``g_i(w) = Σ_t a_it ⊗ δ_it`` (an outer
    factor), ``g_i(b) = Σ_t δ_it``.
    """

    fan_in: int
    fan_out: int
    activation: str = "identity"
    bias: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        for name in ("fan_in", "fan_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        get_activation(self.activation)  # unknown names fail here, listing the known ones

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        std = he_or_glorot_std(self.activation, self.fan_in, self.fan_out)
        params = {"w": std * jr.normal(key, (self.fan_in, self.fan_out), dtype)}
        if self.bias:
            params["b"] = jnp.zeros((self.fan_out,), dtype)
        return params

    def output_shape(self, in_shape: Shape) -> Shape:
        if not in_shape or in_shape[-1] != self.fan_in:
            got = f"{in_shape[-1]} features" if in_shape else "a scalar"
            raise ShapeError(
                self,
                f"expects fan_in={self.fan_in} features on the last axis, got {got} "
                f"(input shape {in_shape})",
            )
        return (*in_shape[:-1], self.fan_out)

    def _linear(self, a: Array, w: Array) -> Array:
        """``a @ w`` (``w`` cast to ``a``'s dtype, a float32 accumulator and result for
        low-precision ``a``)."""
        return matmul(a, w)

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        return self._activate(params, a, self._linear(a, params["w"]))

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        a = cache[0]
        delta = self._delta(cache, delta_out)
        w = params["w"]
        grads = {"w": dot(a, delta, contract_leading(a.ndim)).astype(w.dtype)}
        if self.bias:
            grads["b"] = total(delta, tuple(range(delta.ndim - 1))).astype(params["b"].dtype)
        delta_in = dot(delta, w, contract_last(delta.ndim)).astype(delta.dtype)
        return grads, delta_in

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Params:
        a = widen(cache[0])  # factors in float32 under mixed precision
        delta = widen(self._delta(cache, delta_out))
        b = a.shape[0]
        d = delta.reshape(b, -1, 1, self.fan_out)
        factors: dict[str, Any] = {
            "w": Outer(a.reshape(b, -1, 1, self.fan_in), d, (self.fan_in, self.fan_out))
        }
        if self.bias:
            factors["b"] = Elementwise(None, d[:, :, 0], (self.fan_out,))
        return factors


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Activation(Layer):
    """A parameterless elementwise layer ``out = f(a)``, on any shape.

    δ rule: ``∂C/∂a = ∂C/∂out ⊙ f'(a)``. Params are ``{}``.
    """

    name: str

    keeps_width = True

    def __post_init__(self) -> None:
        get_activation(self.name)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        check_dtype(dtype)
        return {}

    def output_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        out = get_activation(self.name).apply(a)
        return out, (a, out)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        a, out = cache
        return {}, get_activation(self.name).backward(delta_out, a, out)

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``f'(a) ⊙ a_dot``."""
        a, out = cache
        return None if a_dot is None else a_dot * get_activation(self.name).derivative(a, out)
