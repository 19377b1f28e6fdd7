"""N-dimensional convolution: forward, δ rules (transposed convolutions) and patches.

Channels last: inputs ``(batch, *spatial, in_channels)``, kernel ``w`` of shape
``(*kernel_size, in_channels // groups, out_channels)``. With padded input ``ā``
(``lo`` zeros before each spatial axis), stride ``s`` and dilation ``d``:

    z[o, c_out] = Σ_k Σ_c ā[o·s + k·d, c] · w[k, c, c_out]   (+ b[c_out])

within each channel group. Both backward products are convolutions too,
written with ``lax.conv_general_dilated`` and explicit dimension numbers:

- ``∂C/∂a``: δ dilated by the stride, convolved with the spatially flipped
  kernel whose in/out channel roles are swapped, padded ``(K−1)·d − lo`` low;
- ``∂C/∂w``: the input convolved with δ, the batch axis contracted: window
  strides are the dilation, kernel dilation the stride, channel groups become
  batch groups.

Per example, ``g_i(w) = Σ_t patch_it ⊗ δ_it`` over output positions t: an
outer factor of the unfolded patches (one per channel group).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jax import lax

from .._activations import get_activation
from .._checks import check_dtype, check_key
from .._precision import conv, total, widen
from .._protocol import example_axes
from . import _window as win
from ._base import Layer, Params, Shape, ShapeError, positive_int, positive_ints
from ._dense import Affine, he_or_glorot_std
from ._factors import Elementwise, Factorised, Outer

Array = jax.Array


def _dn(
    lhs: tuple[int, ...], rhs: tuple[int, ...], out: tuple[int, ...]
) -> lax.ConvDimensionNumbers:
    return lax.ConvDimensionNumbers(lhs, rhs, out)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Conv(Affine, Factorised, Layer):
    """Convolution over ``len(kernel_size)`` spatial axes, channels last.

    Args:
      in_channels, out_channels: channel counts (each divisible by ``groups``).
      kernel_size: an int (a 1-D kernel, Flax's rule) or a tuple, e.g. ``(3, 3)``.
      activation: name of a registered activation (default ``"identity"``).
      stride: an int (every spatial axis) or one per axis.
      padding: ``"SAME"`` (output ``⌈n / stride⌉``), ``"VALID"``, an int, or one
        int or ``(lo, hi)`` pair per spatial axis.
      dilation: kernel dilation, an int or one per axis.
      groups: channel groups (``groups == in_channels``: depthwise).
      bias: whether the layer has a bias ``b``.

    Shapes: ``(batch, *spatial, in_channels)`` → ``(batch, *out_spatial,
    out_channels)``. Params: ``{"w": (*kernel_size, in_channels // groups,
    out_channels), "b": (out_channels,)}``; ``w`` He or Glorot normal as for
    Dense with ``fan_in = prod(kernel_size)·in_channels/groups``, ``b = 0``.

    Example:
      >>> import jax, jax.numpy as jnp, jbp
      >>> conv = jbp.Conv(3, 8, (3, 3), "relu", stride=2)
      >>> conv.output_shape((32, 32, 3))
      (16, 16, 8)
    """

    in_channels: int
    out_channels: int
    kernel_size: Any
    activation: str = "identity"
    stride: Any = dataclasses.field(default=1, kw_only=True)
    padding: Any = dataclasses.field(default="SAME", kw_only=True)
    dilation: Any = dataclasses.field(default=1, kw_only=True)
    groups: int = dataclasses.field(default=1, kw_only=True)
    bias: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        positive_int(self.in_channels, "in_channels")
        positive_int(self.out_channels, "out_channels")
        kernel = positive_ints(self.kernel_size, "kernel_size")
        n = len(kernel)
        set_ = object.__setattr__
        set_(self, "kernel_size", kernel)
        set_(self, "stride", positive_ints(self.stride, "stride", n))
        set_(self, "dilation", positive_ints(self.dilation, "dilation", n))
        set_(self, "padding", win.normalise_padding(self.padding, n))
        positive_int(self.groups, "groups")
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % self.groups:
                raise ValueError(
                    f"`groups`={self.groups} does not divide `{name}`={getattr(self, name)}; "
                    "each group needs the same number of input and of output channels"
                )
        get_activation(self.activation)

    mixes_positions = True  # a kernel reads neighbouring positions: no padding mask

    @property
    def in_rank(self) -> int:  # type: ignore[override]
        return len(self.kernel_size) + 1

    def _pads(self, spatial: Shape) -> win.Pads:
        return win.pads(spatial, self.kernel_size, self.stride, self.dilation, self.padding)

    def output_shape(self, in_shape: Shape) -> Shape:
        n = len(self.kernel_size)
        in_shape = tuple(in_shape)
        if len(in_shape) != n + 1:
            raise ShapeError(
                self,
                f"has a {n}-D kernel, so it expects examples {example_axes(n)} of rank {n + 1}, "
                f"got shape {in_shape}",
            )
        if in_shape[-1] != self.in_channels:
            raise ShapeError(
                self,
                f"expects {self.in_channels} input channels (the last axis), got shape {in_shape}",
            )
        spatial = in_shape[:-1]
        out = win.out_spatial(
            spatial, self.kernel_size, self.stride, self.dilation, self._pads(spatial)
        )
        if min(out) < 1:
            raise ShapeError(
                self,
                f"leaves an empty output {out} for spatial size {spatial}: the dilated kernel "
                f"{win.effective(self.kernel_size, self.dilation)} does not fit in the padded "
                "input; use a smaller kernel, stride or dilation, more padding, or 'SAME'",
            )
        return (*out, self.out_channels)

    def _std(self) -> float:
        k = math.prod(self.kernel_size)
        return he_or_glorot_std(
            self.activation,
            k * self.in_channels // self.groups,
            k * self.out_channels // self.groups,
        )

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        shape = (*self.kernel_size, self.in_channels // self.groups, self.out_channels)
        params = {"w": self._std() * jr.normal(key, shape, dtype)}
        if self.bias:
            params["b"] = jnp.zeros((self.out_channels,), dtype)
        return params

    # Dimension numbers, channels last: a (B, *S, C), w (*K, I, O), out (B, *S, O).
    def _specs(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        n = len(self.kernel_size)
        spatial = tuple(range(1, n + 1))
        data = (0, n + 1, *spatial)  # (batch, channels, spatial)
        kernel = (n + 1, n, *range(n))  # (out channels, in channels, spatial)
        return data, kernel, data

    def _linear(self, a: Array, w: Array) -> Array:
        data, kernel, _ = self._specs()
        return conv(
            a,
            w,
            window_strides=self.stride,
            padding=self._pads(a.shape[1:-1]),
            rhs_dilation=self.dilation,
            dimension_numbers=_dn(data, kernel, data),
            feature_group_count=self.groups,
        )

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        return self._activate(params, a, self._linear(a, params["w"]))

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        a = cache[0]
        delta = self._delta(cache, delta_out)
        n = len(self.kernel_size)
        data, _, _ = self._specs()
        spatial, out_spatial = a.shape[1:-1], delta.shape[1:-1]
        pad = self._pads(spatial)
        k_eff = win.effective(self.kernel_size, self.dilation)

        # ∂C/∂w: batch ↔ channels swapped on both operands; the kernel comes out
        # in w's own layout (*K, I, O); channel groups pair up as batch groups.
        w_pad = tuple(
            (lo, (o - 1) * s + k - n_ - lo)
            for (lo, _), o, s, k, n_ in zip(
                pad, out_spatial, self.stride, k_eff, spatial, strict=True
            )
        )
        # Input rows past the last window read nothing: a negative high pad. Crop
        # them instead (XLA's CPU convolution mishandles negative padding in float32).
        a_read = lax.slice(
            a,
            (0,) * a.ndim,
            (
                a.shape[0],
                *(n_ + min(hi, 0) for n_, (_, hi) in zip(spatial, w_pad, strict=True)),
                a.shape[-1],
            ),
        )
        w_pad = tuple((lo, max(hi, 0)) for lo, hi in w_pad)
        swapped = (n + 1, 0, *range(1, n + 1))  # (channels as batch, batch as features, spatial)
        grads = {
            "w": conv(
                a_read,
                delta,
                window_strides=self.dilation,
                padding=w_pad,
                rhs_dilation=self.stride,
                dimension_numbers=_dn(swapped, swapped, (n, n + 1, *range(n))),
                batch_group_count=self.groups,
            ).astype(params["w"].dtype)
        }
        if self.bias:
            grads["b"] = total(delta, tuple(range(n + 1))).astype(params["b"].dtype)

        # ∂C/∂a: δ dilated by the stride, against the flipped kernel with its
        # channel roles swapped (the group axis moved into the output channels).
        w = params["w"].astype(delta.dtype)
        if self.groups > 1:
            g = self.groups
            w = w.reshape(*w.shape[:-1], g, w.shape[-1] // g)  # (*K, I/g, g, O/g)
            w = jnp.moveaxis(w, -2, -3)  # (*K, g, I/g, O/g)
            w = w.reshape(*w.shape[:-3], -1, w.shape[-1])  # (*K, I, O/g)
        w = lax.rev(w, tuple(range(n)))
        a_pad = tuple(
            (k - 1 - lo, n_ + k - 1 - ((o - 1) * s + 1) - (k - 1 - lo))
            for (lo, _), o, s, k, n_ in zip(
                pad, out_spatial, self.stride, k_eff, spatial, strict=True
            )
        )
        # A pad larger than the dilated kernel makes a negative pad here: pad by 0
        # and crop the result instead (as above, XLA's CPU convolution mishandles
        # negative padding in float32; JAX's own transpose rule hits that bug).
        delta_in = conv(
            delta,
            w,
            window_strides=(1,) * n,
            padding=tuple((max(lo, 0), max(hi, 0)) for lo, hi in a_pad),
            lhs_dilation=self.stride,
            rhs_dilation=self.dilation,
            dimension_numbers=_dn(data, (n, n + 1, *range(n)), data),
            feature_group_count=self.groups,
        ).astype(delta.dtype)
        if any(lo < 0 or hi < 0 for lo, hi in a_pad):
            start = (0, *(max(-lo, 0) for lo, _ in a_pad), 0)
            delta_in = lax.slice(
                delta_in,
                start,
                (
                    a.shape[0],
                    *(st + n_ for st, n_ in zip(start[1:-1], spatial, strict=True)),
                    a.shape[-1],
                ),
            )
        return grads, delta_in

    def patches(self, a: Array) -> tuple[Array, ...]:
        """The unfolded input as one block per kernel offset (row-major): block k is
        ``(batch, T, groups, in_channels // groups)``, the input that offset k of
        the kernel meets at each of the T output positions, so that ``z_t =
        Σ_k block_k[t] · w[k]`` per group. Their concatenation on the last axis
        is the patch matrix, in the layout of ``w``'s ``(*kernel, in)`` axes;
        kept apart, no copy of the stacked patches is ever made."""
        pad = self._pads(a.shape[1:-1])
        views = win.slices(a, self.kernel_size, self.stride, self.dilation, pad)
        b, g = a.shape[0], self.groups
        return tuple(v.reshape(b, -1, g, self.in_channels // g) for v in views)

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Params:
        a = widen(cache[0])  # factors in float32 under mixed precision
        delta = widen(self._delta(cache, delta_out))
        b = a.shape[0]
        d = delta.reshape(b, -1, self.groups, self.out_channels // self.groups)
        factors: dict[str, Any] = {"w": Outer(self.patches(a), d, tuple(params["w"].shape))}
        if self.bias:
            factors["b"] = Elementwise(
                None, delta.reshape(b, -1, self.out_channels), (self.out_channels,)
            )
        return factors
