"""The layer protocol as the ground floor reads it: errors, context and attributes.

Everything here reads a layer with ``getattr`` only, so the argument checks
(:mod:`jbp._checks`) and the layers (:mod:`jbp.layers`) both build on it without
either reaching into the other: :class:`ShapeError`, the forward's
:class:`Context`, the walk over a network's layers, and the optional class
attributes that say how a layer constrains its input's rank and last axis.

Widths. The *width* of an array is the size of its last axis: features
(``fan_in``/``fan_out``, Dense and the layers like it) or channels (channels
last: ``in_channels``/``out_channels``, Conv). A layer that maps the last axis
from one declared width to another says so with those attributes; a layer
whose output's last axis is always its input's (an activation, a norm,
dropout, pooling) says ``keeps_width = True``. Any other layer, a user layer
above all, has an output width that is unknown until its ``output_shape`` is
asked for a whole shape: never assumed equal to its input's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax

Array = jax.Array

_AXES = {
    1: "(length, channels)",
    2: "(height, width, channels)",
    3: "(depth, height, width, channels)",
}


def example_axes(n: int) -> str:
    """How one example of ``n`` spatial axes reads, e.g. ``(height, width, channels)``."""
    return _AXES.get(n, f"({n} spatial axes, channels)")


class ShapeError(ValueError):
    """A layer cannot take an input of some shape.

    The message names the layer (and where it sits in the network, e.g.
    ``layers[1].block.layers[0]``), what it expects and what it was given.
    """

    def __init__(self, layer: Any, detail: str, where: tuple[str, ...] = ()) -> None:
        self.layer, self.detail, self.where = layer, detail, where
        name = f"`{'.'.join(where)}` ({layer!r})" if where else repr(layer)
        super().__init__(f"{name} {detail}")

    def within(self, part: str) -> ShapeError:
        """The same error, one level further out (``part`` names the child)."""
        return ShapeError(self.layer, self.detail, (part, *self.where))


class Context(NamedTuple):
    """What a forward pass needs besides its input.

    Attributes:
      mask: the padding mask ``(batch, T)``, boolean, True at real positions (each
        row a prefix: right padding), or None (every position is real).
      key: the dropout key (a PRNG key), or None (no dropout: evaluation).
    """

    mask: Array | None = None
    key: Array | None = None

    def child(self, index: int) -> Context:
        """The context of a combinator's ``index``-th child: the key folded with
        ``index`` (the mask is the batch's, the same for every layer)."""
        if self.key is None:
            return self
        return self._replace(key=jax.random.fold_in(self.key, index))


def is_layer(obj: Any) -> bool:
    """Whether ``obj`` has the layer protocol's three methods."""
    return all(callable(getattr(obj, m, None)) for m in ("init", "forward", "backward"))


def named_children(layer: Any) -> list[tuple[str, Any]]:
    """A combinator's child layers with their attribute paths (``layers[i]``,
    ``branches[j]``, ``block``, a wrapper's ``layer``); ``[]`` for a leaf layer."""
    for name in ("layers", "branches"):
        kids = getattr(layer, name, None)
        if isinstance(kids, tuple):
            return [(f"{name}[{i}]", kid) for i, kid in enumerate(kids)]
    for name in ("block", "layer"):
        kid = getattr(layer, name, None)
        if kid is not None and is_layer(kid):
            return [(name, kid)]
    return []


def children(layer: Any) -> tuple[Any, ...]:
    """A combinator's child layers; ``()`` for a leaf layer."""
    return tuple(kid for _, kid in named_children(layer))


def walk_layers(layer: Any, where: str = "net") -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` for the layer and every layer inside it, depth first
    (paths such as ``net.layers[1].block.layers[0]``)."""
    yield where, layer
    for name, kid in named_children(layer):
        yield from walk_layers(kid, f"{where}.{name}")


def in_rank(layer: Any) -> int | None:
    """The rank of one input example the layer needs (None: any)."""
    return getattr(layer, "in_rank", None)


def keeps_rank(layer: Any) -> bool:
    """Whether the layer's output has its input's rank (unknown layers: yes)."""
    return bool(getattr(layer, "keeps_rank", True))


def fits_in_shape(in_shape: tuple[int | None, ...] | None, shape: tuple[int, ...]) -> bool:
    """Whether an example of ``shape`` has the rank and the sizes that a network's
    stated ``in_shape`` gives (None: any shape; a None entry: any size)."""
    if in_shape is None:
        return True
    return len(shape) == len(in_shape) and all(
        want is None or want == got for want, got in zip(in_shape, shape, strict=True)
    )


def keeps_width(layer: Any) -> bool:
    """Whether the layer's output has its input's last axis whatever it is
    (``keeps_width = True``: activations, norms, dropout, pooling; unknown layers: no)."""
    return bool(getattr(layer, "keeps_width", False))


_IN_WIDTHS = ("in_width", "fan_in", "in_channels")
_OUT_WIDTHS = ("out_width", "fan_out", "out_channels")


def declared_in(layer: Any) -> tuple[str, int] | None:
    """The width the layer needs of its input's last axis and the attribute that
    declares it (``fan_in``, ``in_channels``, or a combinator's ``in_width``);
    None when it declares none."""
    for name in _IN_WIDTHS:
        width = getattr(layer, name, None)
        if width is not None:
            return name, int(width)
    return None


def in_width(layer: Any) -> int | None:
    """The declared width of the layer's input's last axis (None: not declared)."""
    found = declared_in(layer)
    return None if found is None else found[1]


def out_width(layer: Any, width: int | None) -> int | None:
    """The width of the layer's output's last axis for an input of ``width`` (None:
    unknown): the declared one (``fan_out``, ``out_channels``, a combinator's
    ``out_width``), else ``width`` for a layer that keeps it, else unknown."""
    for name in _OUT_WIDTHS:
        declared = getattr(layer, name, None)
        if declared is not None:
            return int(declared)
    return width if keeps_width(layer) else None
