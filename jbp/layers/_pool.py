"""Pooling and reshaping: parameterless layers with their δ rules.

- ``MaxPool``: δ goes to each window's arg-max (the first, on ties), added
  where windows overlap;
- ``AvgPool``: δ spread evenly over each window (divided by the full window
  size: padding counts, as Flax's ``avg_pool``);
- ``GlobalAvgPool``: the mean over every spatial axis; δ spread evenly;
- ``Flatten``: one example's axes into one; δ reshaped back.

A window given as an int is 1-D (as a kernel: Flax's rule); pass a tuple,
e.g. ``(2, 2)``, for images.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax import lax

from .._checks import check_dtype
from .._precision import widen
from .._protocol import example_axes
from . import _window as win
from ._base import NO_CONTEXT, Context, Layer, Params, Shape, ShapeError, positive_ints

Array = jax.Array


class _Pool(Layer):
    """Shared shape logic of window pooling (MaxPool, AvgPool)."""

    window: Any
    stride: Any
    padding: Any

    mixes_positions = True  # a window reads neighbouring positions: no padding mask
    keeps_width = True  # pooling keeps the channels

    def _setup(self) -> None:
        window = positive_ints(self.window, "window")
        n = len(window)
        object.__setattr__(self, "window", window)
        stride = window if self.stride is None else positive_ints(self.stride, "stride", n)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "padding", win.normalise_padding(self.padding, n))

    @property
    def in_rank(self) -> int:  # type: ignore[override]
        return len(self.window) + 1

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        check_dtype(dtype)
        return {}

    def _dilation(self) -> tuple[int, ...]:
        return (1,) * len(self.window)

    def _pads(self, spatial: Shape) -> win.Pads:
        return win.pads(spatial, self.window, self.stride, self._dilation(), self.padding)

    def output_shape(self, in_shape: Shape) -> Shape:
        n = len(self.window)
        in_shape = tuple(in_shape)
        if len(in_shape) != n + 1:
            hint = (
                f"; give window={(self.window[0],) * (len(in_shape) - 1)}"
                if len(in_shape) > 1
                else ""
            )
            raise ShapeError(
                self,
                f"pools {n} spatial axes, so it expects examples {example_axes(n)} of rank "
                f"{n + 1}, got shape {in_shape}{hint}",
            )
        spatial = in_shape[:-1]
        out = win.out_spatial(
            spatial, self.window, self.stride, self._dilation(), self._pads(spatial)
        )
        if min(out) < 1:
            raise ShapeError(
                self,
                f"leaves an empty output {out} for spatial size {spatial}: the window "
                f"{self.window} does not fit in the padded input; use a smaller window or "
                "'SAME' padding",
            )
        return (*out, in_shape[-1])

    def _reduce(self, a: Array, init: Any, op: Any) -> Array:
        pad = self._pads(a.shape[1:-1])
        return lax.reduce_window(
            a,
            np.array(init, a.dtype),  # a concrete monoid identity: lax picks the max/add primitive
            op,
            (1, *self.window, 1),
            (1, *self.stride, 1),
            ((0, 0), *pad, (0, 0)),
        )


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class MaxPool(_Pool):
    """The maximum over each window, per channel.

    Args:
      window: an int (1-D) or a tuple, e.g. ``(2, 2)``.
      stride: an int or one per axis; ``None`` (default) means ``stride = window``.
      padding: ``"VALID"`` (default), ``"SAME"``, an int or ``(lo, hi)`` pairs
        (padded positions hold −∞, so they are never the maximum).

    δ rule: each window's δ goes to the first position holding its maximum.
    """

    window: Any
    stride: Any = None
    padding: Any = "VALID"

    def __post_init__(self) -> None:
        self._setup()

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        return self._reduce(a, -jnp.inf, lax.max), a

    def _first(self, a: Array) -> Array:
        """Which window offset holds each window's first maximum (row-major index)."""
        dil, pad = self._dilation(), self._pads(a.shape[1:-1])
        views = jnp.stack(win.slices(a, self.window, self.stride, dil, pad, -jnp.inf))
        return jnp.argmax(views, axis=0)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        a = cache
        dil, pad = self._dilation(), self._pads(a.shape[1:-1])
        first = self._first(a)  # the first maximum of every window
        parts = [
            jnp.where(first == j, delta_out, jnp.zeros_like(delta_out))
            for j in range(math.prod(self.window))
        ]
        return {}, win.scatter(parts, a.shape[1:-1], self.window, self.stride, dil, pad)

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``a_dot`` at each window's first maximum (where backward routes δ)."""
        if a_dot is None:
            return None
        a = cache
        dil, pad = self._dilation(), self._pads(a.shape[1:-1])
        dots = jnp.stack(win.slices(a_dot, self.window, self.stride, dil, pad))
        return jnp.take_along_axis(dots, self._first(a)[None], axis=0)[0]


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class AvgPool(_Pool):
    """The mean over each window, per channel (padding counts toward the window size).

    Args:
      window: an int (1-D) or a tuple, e.g. ``(2, 2)``.
      stride: an int or one per axis; ``None`` (default) means ``stride = window``.
      padding: ``"VALID"`` (default), ``"SAME"``, an int or ``(lo, hi)`` pairs.

    δ rule: each window's δ divided by the window size, added to every position in it.
    """

    window: Any
    stride: Any = None
    padding: Any = "VALID"

    def __post_init__(self) -> None:
        self._setup()

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        mean = self._reduce(widen(a), 0, lax.add) / math.prod(self.window)  # float32 sums if mixed
        return mean.astype(a.dtype), a.shape

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        spatial = cache[1:-1]
        dil, pad = self._dilation(), self._pads(spatial)
        share = delta_out / math.prod(self.window)
        parts = [share] * math.prod(self.window)
        return {}, win.scatter(parts, spatial, self.window, self.stride, dil, pad)

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """The same window mean of ``a_dot`` (the layer is linear)."""
        if a_dot is None:
            return None
        return self._reduce(a_dot, 0, lax.add) / math.prod(self.window)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class GlobalAvgPool(Layer):
    """The mean over every spatial axis: ``(batch, *spatial, C)`` → ``(batch, C)``.

    δ rule: ``∂C/∂a = δ_out / T`` at each of the T spatial positions. With a
    padding mask (sequences ``(batch, T, C)``): the mean over each example's n real
    positions, ``∂C/∂a_t = m_t δ_out / n``.
    """

    keeps_rank = False
    keeps_width = True  # the channels stay, the spatial axes go
    takes_context = True

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        check_dtype(dtype)
        return {}

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) < 2:
            raise ShapeError(
                self,
                f"averages over spatial axes, so it expects examples (*spatial, channels) "
                f"of rank ≥ 2, got shape {tuple(in_shape)}",
            )
        return (in_shape[-1],)

    def forward(self, params: Params, a: Array, context: Context = NO_CONTEXT) -> tuple[Array, Any]:
        """With a padding mask on sequences ``(batch, T, C)``: the mean over each
        example's real positions (weights ``m_t / n``; the cache holds them)."""
        mask = context.mask
        if mask is None or a.ndim != 3:
            return jnp.mean(a, axis=tuple(range(1, a.ndim - 1))), (a.shape, None)
        x = widen(a)  # float32 sums under mixed precision
        w = mask.astype(x.dtype) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
        return jnp.sum(x * w[:, :, None], axis=1).astype(a.dtype), (a.shape, w)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        shape, w = cache
        if w is not None:
            return {}, (delta_out[:, None, :] * w[:, :, None]).astype(delta_out.dtype)
        t = math.prod(shape[1:-1])
        return {}, lax.broadcast_in_dim(delta_out / t, shape, (0, len(shape) - 1))

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """The same spatial mean of ``a_dot`` (the layer is linear)."""
        if a_dot is None:
            return None
        w = cache[1]
        if w is not None:
            return jnp.sum(a_dot * w[:, :, None], axis=1)
        return jnp.mean(a_dot, axis=tuple(range(1, a_dot.ndim - 1)))


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    """One example's axes into one: ``(batch, *shape)`` → ``(batch, prod(shape))``.

    Row-major (C order), so a flattened image ``(h, w, c)`` reads channel
    fastest. δ rule: ``∂C/∂a`` is ``δ_out`` reshaped back.
    """

    keeps_rank = False
    mixes_positions = True  # positions become features: no padding mask

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        check_dtype(dtype)
        return {}

    def output_shape(self, in_shape: Shape) -> Shape:
        return (math.prod(in_shape),)

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        return a.reshape(a.shape[0], -1), a.shape

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        return {}, delta_out.reshape(cache)

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """The same reshape."""
        return None if a_dot is None else a_dot.reshape(a_dot.shape[0], -1)
