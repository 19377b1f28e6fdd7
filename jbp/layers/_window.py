"""Sliding windows over the spatial axes of channels-last arrays, and their transpose.

Shared by convolution (its unfolded patches, for per-example weight
gradients) and pooling (its forward window values and its δ routing). Arrays
are ``(batch, *spatial, channels)``; a window has one size, stride, dilation
and ``(lo, hi)`` padding per spatial axis.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

Array = jax.Array
Pads = tuple[tuple[int, int], ...]


def normalise_padding(padding: Any, rank: int, name: str = "padding") -> str | Pads:
    """``"SAME"``, ``"VALID"``, or explicit ``(lo, hi)`` pairs, one per spatial axis.

    An int pads every spatial axis by that much on both sides; a sequence of
    ints gives one per axis; a sequence of pairs gives ``(lo, hi)`` per axis.
    """
    if isinstance(padding, str):
        upper = padding.upper()
        if upper not in ("SAME", "VALID"):
            raise ValueError(
                f"`{name}` must be 'SAME', 'VALID', an int or (lo, hi) pairs, got {padding!r}"
            )
        return upper
    given = padding
    if isinstance(padding, int) and not isinstance(padding, bool):
        padding = [padding] * rank
    try:
        pairs = tuple(
            (p, p) if isinstance(p, int) else tuple(p)
            for p in padding  # type: ignore[union-attr]
        )
    except TypeError:
        pairs = ()
    ok = len(pairs) == rank and all(
        len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in p)
        for p in pairs
    )
    if not ok:
        raise ValueError(
            f"`{name}` must be 'SAME', 'VALID', a non-negative int, or a sequence of "
            f"{rank} non-negative ints or (lo, hi) pairs, one per spatial axis, got {given!r}"
        )
    return tuple((int(lo), int(hi)) for lo, hi in pairs)  # type: ignore[misc]


def effective(window: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """The dilated window extent ``(k − 1)·d + 1`` per axis."""
    return tuple((k - 1) * d + 1 for k, d in zip(window, dilation, strict=True))


def pads(
    spatial: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    padding: str | Pads,
) -> Pads:
    """Explicit ``(lo, hi)`` pads per spatial axis (SAME: output ``⌈n / s⌉``, the extra
    pad on the high side, as XLA and ``lax.padtype_to_pads``)."""
    if padding == "VALID":
        return tuple((0, 0) for _ in spatial)
    if padding == "SAME":
        out = []
        for n, k, s in zip(spatial, effective(window, dilation), stride, strict=True):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple(padding)  # type: ignore[arg-type]


def out_spatial(
    spatial: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pad: Pads,
) -> tuple[int, ...]:
    """Output sizes ``⌊(n + lo + hi − k_eff) / s⌋ + 1`` (≤ 0 means empty)."""
    return tuple(
        (n + lo + hi - k) // s + 1 if n + lo + hi >= k else 0
        for n, k, s, (lo, hi) in zip(spatial, effective(window, dilation), stride, pad, strict=True)
    )


def offsets(window: Sequence[int]) -> list[tuple[int, ...]]:
    """Every position inside a window, in row-major order (a kernel's layout)."""
    return list(itertools.product(*(range(k) for k in window)))


def slices(
    a: Array,
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pad: Pads,
    pad_value: Any = 0,
) -> list[Array]:
    """For each window offset (row-major), the strided view of the padded input
    that meets it: ``(batch, *out_spatial, channels)`` each.

    Offset ``k`` at output position ``o`` reads padded input ``o·s + k·d``.
    """
    spatial = a.shape[1:-1]
    out = out_spatial(spatial, window, stride, dilation, pad)
    zero = (0, 0, 0)
    padded = lax.pad(
        a,
        lax.convert_element_type(pad_value, a.dtype),
        [zero, *((lo, hi, 0) for lo, hi in pad), zero],
    )
    views = []
    for k in offsets(window):
        start = [0] + [ki * d for ki, d in zip(k, dilation, strict=True)] + [0]
        limit = (
            [a.shape[0]]
            + [st + (o - 1) * s + 1 for st, o, s in zip(start[1:-1], out, stride, strict=True)]
            + [a.shape[-1]]
        )
        views.append(lax.slice(padded, start, limit, [1, *stride, 1]))
    return views


def scatter(
    parts: Sequence[Array],
    spatial: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pad: Pads,
) -> Array:
    """The transpose of :func:`slices`: add each offset's part back where it was read.

    ``parts[j]`` is ``(batch, *out_spatial, channels)`` for offset ``j``; the
    result is ``(batch, *spatial, channels)`` (what fell on padding is dropped).
    """
    total = None
    for k, part in zip(offsets(window), parts, strict=True):
        config = [(0, 0, 0)]
        for ki, d, s, (lo, _), n, o in zip(
            k, dilation, stride, pad, spatial, part.shape[1:-1], strict=True
        ):
            low = ki * d - lo
            config.append((low, n - 1 - low - (o - 1) * s, s - 1))
        config.append((0, 0, 0))
        placed = lax.pad(part, lax.convert_element_type(0, part.dtype), config)
        total = placed if total is None else total + placed
    assert total is not None
    return total
