"""LayerNorm, RMSNorm and GroupNorm, with their full δ rules.

With F features, ``r = 1/√(v + eps)`` and the normalised ``x̂``:

- LayerNorm: ``μ = mean(a)``, ``v = mean((a − μ)²)`` (biased), ``x̂ = (a − μ)·r``,
  ``out = x̂ ⊙ scale + bias``;
  ``∂C/∂a = r·(g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))`` with ``g = δ_out ⊙ scale``.
- RMSNorm: ``v = mean(a²)``, ``x̂ = a·r``, ``out = x̂ ⊙ scale``;
  ``∂C/∂a = r·(g − x̂ ⊙ mean(g ⊙ x̂))``.
- GroupNorm (channels last): per example, the mean and biased variance over
  all of its positions and the ``features // groups`` channels of a group, the
  same rule with means over a group; with a padding mask, statistics over the
  real positions only, and x̂ = 0 at padded positions.

The ``mean(g)`` term comes from μ and the ``x̂ ⊙ mean(g ⊙ x̂)`` term from v;
dropping either is the classic bug. Per example, ``g_i(scale) = Σ_t x̂_it ⊙
δ_it`` and ``g_i(bias) = Σ_t δ_it``: elementwise factors.

Operation order. Where the normalisation is ill-conditioned (x̂ nearly ±1: two
features, or a group of two numbers), the input δ is a small difference of
large terms, and its float32 error depends on the order of the operations; the
rules are ordered to be as accurate as autodiff there (the one-line formula
above was 3-10x worse). LayerNorm and RMSNorm: the variance term first, ``d =
g·r − x̂·(r·mean(g ⊙ x̂))``, then (LayerNorm) ``d − mean(d)``. GroupNorm, whose
groups can span positions and which stacks badly (two-number groups in every
block), follows the chain rule through the forward's own steps exactly, as
autodiff does: ``d_c = g·r + c·k + k·c`` with ``c = a − μ`` and ``k = Σ(c ⊙
g)·(−½ r/(v + eps))/n``, then ``d_c − Σ d_c/n``; its cache keeps ``c`` and ``v +
eps`` for it. (LayerNorm in that form matched autodiff too, but keeping ``c``
for its backward made the benchmark transformer's ``jbp.backprop`` 1.6x slower
on XLA's CPU: a fusion lost, not flops; the form above costs what the one-line
formula did.)

BatchNorm is not here on purpose: its statistics mix the examples of a batch,
so an example's gradient is not a function of that example alone and
per-example gradients (the point of jbp's per-example analysis) are undefined.
GroupNorm, whose statistics stay inside one example, is what DP-trained CNNs
use in its place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

from .._checks import check_dtype, check_key
from .._precision import widen
from ._base import (
    NO_CONTEXT,
    Context,
    Layer,
    Params,
    Shape,
    ShapeError,
    add_tangents,
    last_axis,
    positive_int,
)
from ._factors import Elementwise, Factorised

Array = jax.Array


def _check_eps(eps: Any) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"`eps` must be a positive number, got {eps!r}")


class _Norm(Factorised, Layer):
    """Shared shape logic and factors of the norm layers (last axis, ``features``)."""

    features: int

    keeps_width = True

    @property
    def fan_in(self) -> int:
        return self.features

    @property
    def fan_out(self) -> int:
        return self.features

    def output_shape(self, in_shape: Shape) -> Shape:
        if not in_shape or in_shape[-1] != self.features:
            raise ShapeError(
                self,
                f"normalises {self.features} features on the last axis, got shape "
                f"{tuple(in_shape)}",
            )
        return tuple(in_shape)

    def _rows(self, x: Array) -> Array:
        return x.reshape(x.shape[0], -1, self.features)

    def _xhat_dot(self, cache: Any, a_dot: Array) -> Array:
        raise NotImplementedError

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``x̂_dot ⊙ scale + x̂ ⊙ scale_dot + bias_dot``, ``x̂_dot`` the linearised
        normalisation of ``a_dot``."""
        xhat = cache[0]
        nd = xhat.ndim
        out_dot = None
        if a_dot is not None:
            out_dot = self._xhat_dot(cache, a_dot)
            if "scale" in params:
                out_dot = out_dot * last_axis(params["scale"], nd)
        if params_dot is not None:
            if "scale" in params_dot:
                out_dot = add_tangents(out_dot, xhat * last_axis(params_dot["scale"], nd))
            if "bias" in params_dot:
                b_dot = last_axis(params_dot["bias"], nd)
                out_dot = (
                    jnp.broadcast_to(b_dot, xhat.shape) if out_dot is None else out_dot + b_dot
                )
        return out_dot

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Params:
        xhat = widen(cache[0])  # factors in float32 under mixed precision
        d = self._rows(widen(delta_out))
        factors: dict[str, Any] = {}
        if "scale" in params:
            factors["scale"] = Elementwise(self._rows(xhat), d, (self.features,))
        if "bias" in params:
            factors["bias"] = Elementwise(None, d, (self.features,))
        return factors


def _sum_leading(x: Array) -> Array:
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))


def _grads_like(grads: dict[str, Array], params: Params) -> dict[str, Array]:
    """Parameter gradients (computed in float32 under mixed precision) in the params' dtype."""
    return {k: v.astype(params[k].dtype) for k, v in grads.items()}


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class LayerNorm(_Norm):
    """Layer normalisation over the last axis.

    Args:
      features: the size of the last axis.
      eps: added to the (biased) variance.
      scale, bias: whether to learn ``scale`` (init 1) and ``bias`` (init 0).

    Params: ``{"scale": (features,), "bias": (features,)}`` (each optional).
    """

    features: int
    eps: float = dataclasses.field(default=1e-5, kw_only=True)
    scale: bool = dataclasses.field(default=True, kw_only=True)
    bias: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        positive_int(self.features, "features")
        _check_eps(self.eps)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        params = {}
        if self.scale:
            params["scale"] = jnp.ones((self.features,), dtype)
        if self.bias:
            params["bias"] = jnp.zeros((self.features,), dtype)
        return params

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        x = widen(a)  # statistics in float32 under mixed precision
        mu = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mu
        r = lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        xhat = centred * r
        out = xhat
        if self.scale:
            out = out * last_axis(params["scale"], a.ndim)
        if self.bias:
            out = out + last_axis(params["bias"], a.ndim)
        return out.astype(a.dtype), (xhat.astype(a.dtype), r)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        xhat, r = widen(cache[0]), cache[1]
        d_out = widen(delta_out)  # float32 under mixed precision
        grads = {}
        g = d_out
        if self.scale:
            grads["scale"] = _sum_leading(d_out * xhat)
            g = d_out * last_axis(params["scale"], d_out.ndim)
        if self.bias:
            grads["bias"] = _sum_leading(d_out)
        # through x̂ = c·r and v = mean(c²), then through μ
        d_centred = g * r - xhat * (r * jnp.mean(g * xhat, axis=-1, keepdims=True))
        delta = d_centred - jnp.mean(d_centred, axis=-1, keepdims=True)
        return _grads_like(grads, params), delta.astype(delta_out.dtype)

    def _xhat_dot(self, cache: Any, a_dot: Array) -> Array:
        """``r·(ȧ − mean(ȧ) − x̂ ⊙ mean(x̂ ⊙ ȧ))`` (the δ rule's operator: it is symmetric)."""
        xhat, r = cache[:2]
        mean_a = jnp.mean(a_dot, axis=-1, keepdims=True)
        mean_ax = jnp.mean(a_dot * xhat, axis=-1, keepdims=True)
        return r * (a_dot - mean_a - xhat * mean_ax)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class RMSNorm(_Norm):
    """Root-mean-square normalisation over the last axis (no centring, no bias).

    Args:
      features: the size of the last axis.
      eps: added to the mean square.

    Params: ``{"scale": (features,)}``, init 1.
    """

    features: int
    eps: float = dataclasses.field(default=1e-6, kw_only=True)

    def __post_init__(self) -> None:
        positive_int(self.features, "features")
        _check_eps(self.eps)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        return {"scale": jnp.ones((self.features,), dtype)}

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        x = widen(a)  # statistics in float32 under mixed precision
        r = lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        xhat = x * r
        out = xhat * last_axis(params["scale"], a.ndim)
        return out.astype(a.dtype), (xhat.astype(a.dtype), r)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        xhat, r = widen(cache[0]), cache[1]
        d_out = widen(delta_out)  # float32 under mixed precision
        grads = {"scale": _sum_leading(d_out * xhat)}
        g = d_out * last_axis(params["scale"], d_out.ndim)
        # through x̂ = a·r and v = mean(a²)
        delta = g * r - xhat * (r * jnp.mean(g * xhat, axis=-1, keepdims=True))
        return _grads_like(grads, params), delta.astype(delta_out.dtype)

    def _xhat_dot(self, cache: Any, a_dot: Array) -> Array:
        """``r·(ȧ − x̂ ⊙ mean(x̂ ⊙ ȧ))`` (the δ rule's operator: it is symmetric)."""
        xhat, r = cache[:2]
        return r * (a_dot - xhat * jnp.mean(a_dot * xhat, axis=-1, keepdims=True))


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class GroupNorm(_Norm):
    """Group normalisation, channels last: ``(batch, *positions, features)``.

    Args:
      groups: the number of channel groups; must divide ``features``.
      features: the size of the last (channel) axis.
      eps: added to the (biased) variance.

    Per example and group: ``μ``, ``v`` over every position and the
    ``features // groups`` channels of the group, ``x̂ = (a − μ)/√(v + eps)``,
    ``out = x̂ ⊙ scale + bias``. δ rule: ``∂C/∂a = r·(g − mean(g) − x̂ ⊙ mean(g ⊙
    x̂))`` with ``g = δ ⊙ scale`` and means over the group. With a padding mask
    on sequences ``(batch, T, features)`` the statistics run over the real
    positions only (n of them) and a padded position's x̂ is 0 (its output is
    the bias: a group of padding is never amplified by ``1/√eps``, even in an
    example that is all padding): ``∂C/∂a = w·r·(g − Σ(w g)/n − x̂·Σ(w g ⊙
    x̂)/n)``, w = 1 at real positions and 0 at padded ones.

    Params: ``{"scale": (features,), "bias": (features,)}``, init 1 and 0.
    """

    groups: int
    features: int
    eps: float = dataclasses.field(default=1e-5, kw_only=True)

    takes_context = True

    def __post_init__(self) -> None:
        positive_int(self.groups, "groups")
        positive_int(self.features, "features")
        _check_eps(self.eps)
        if self.features % self.groups:
            raise ValueError(
                f"`features`={self.features} is not divisible by `groups`={self.groups}: groups "
                "split the channels evenly"
            )

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        return {
            "scale": jnp.ones((self.features,), dtype),
            "bias": jnp.zeros((self.features,), dtype),
        }

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) < 2:
            raise ShapeError(
                self,
                f"normalises over positions and channels, so it expects examples (*positions, "
                f"{self.features}) of rank ≥ 2, got shape {tuple(in_shape)}",
            )
        return super().output_shape(in_shape)

    def _grouped(self, x: Array) -> Array:
        """``(batch, *positions, F)`` → ``(batch, N, groups, F / groups)``."""
        return x.reshape(x.shape[0], -1, self.groups, self.features // self.groups)

    def _count(self, x: Array, w: Array | None) -> Array | int:
        """A group's (real) elements n: ``(batch, 1, groups, 1)``, or an int."""
        if w is None:
            return x.shape[1] * x.shape[3]
        return jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1) * x.shape[3]

    def _mean(self, x: Array, w: Array | None) -> Array:
        """The mean over a group's (real) elements, ``(batch, 1, groups, 1)``."""
        if w is None:
            return jnp.mean(x, axis=(1, 3), keepdims=True)
        return jnp.sum(x * w, axis=(1, 3), keepdims=True) / self._count(x, w)

    def forward(self, params: Params, a: Array, context: Context = NO_CONTEXT) -> tuple[Array, Any]:
        x = self._grouped(widen(a))  # statistics in float32 under mixed precision
        mask = context.mask
        w = None
        if mask is not None and a.ndim == 3:  # sequences: statistics of real positions only
            w = mask.astype(x.dtype)[:, :, None, None]
        centred = x - self._mean(x, w)
        ve = self._mean(centred * centred, w) + self.eps
        r = lax.rsqrt(ve)
        xhat = centred * r
        if w is not None:  # padded positions: x̂ = 0, so their output is the bias
            xhat = xhat * w
        xhat = xhat.reshape(a.shape)
        out = xhat * last_axis(params["scale"], a.ndim) + last_axis(params["bias"], a.ndim)
        low = a.dtype  # the cache's activations in the compute dtype, statistics in float32
        return out.astype(low), (xhat.astype(low), r, w, centred.astype(low), ve)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        """``r·(g − w·Σg/n − w·x̂·Σ(g ⊙ x̂)/n)`` with ``g`` zero at padded positions (their
        output is the bias), in the chain rule's order (see the module docs)."""
        xhat, r, w, centred, ve = cache
        xhat, centred, d_out = widen(xhat), widen(centred), widen(delta_out)
        grads = {"scale": _sum_leading(d_out * xhat), "bias": _sum_leading(d_out)}
        g = self._grouped(d_out * last_axis(params["scale"], d_out.ndim))
        if w is not None:
            g = g * w
        n = self._count(centred, w)
        k = jnp.sum(centred * g, axis=(1, 3), keepdims=True) * (-0.5 * (r / ve)) / n
        kw = k if w is None else k * w
        d_centred = (g * r + centred * kw) + kw * centred
        back = jnp.sum(-d_centred, axis=(1, 3), keepdims=True) / n
        delta = d_centred + (back if w is None else back * w)
        return _grads_like(grads, params), delta.reshape(delta_out.shape).astype(delta_out.dtype)

    def _xhat_dot(self, cache: Any, a_dot: Array) -> Array:
        """``r·(ȧ − mean(ȧ) − x̂ ⊙ mean(x̂ ⊙ ȧ))``, means over each group's real elements."""
        xhat, r, w = cache[:3]
        ad, xg = self._grouped(a_dot), self._grouped(xhat)
        out = r * (ad - self._mean(ad, w) - xg * self._mean(ad * xg, w))
        if w is not None:
            out = out * w
        return out.reshape(a_dot.shape)
