"""Shared weights: one parameter leaf used in two places (``Tied``).

``Tied(layer, source, leaves, transpose=False)`` is ``layer`` with some of its
parameter leaves taken from an earlier layer of the same :class:`Sequential`,
``layers[source]``: ``leaves`` maps the layer's leaf names to the source's
(``{"w": "table"}``). With ``transpose=True`` each shared 2-D leaf is used
transposed: ``w = tableᵀ``. The tied layer's own params entry holds only the
leaves it does not share (``{}`` for a tied output projection without bias).

The forward runs ``layer`` on the source's leaves; the δ rule is ``layer``'s
own, and the shared leaf's gradient is the sum of both uses, ``∂C/∂table =
(∂C/∂table)_embedding + (∂C/∂w)ᵀ``. Per example the same holds leaf by leaf,
``g_i = g_i¹ + g_i²``: the two uses' factors are kept side by side
(:class:`~jbp.layers._factors.Sum`), so ``‖g_i‖²`` includes the cross term
``2⟨g_i¹, g_i²⟩``, formed from the factors (for tied embeddings a gather factor
against an outer-product one) without materialising g_i.

The enclosing :class:`Sequential` does the sharing: it hands ``layer`` the
source's leaves in the forward, the tangent and the backward, and adds what the
backward gives for them into the source's entry (:meth:`Tied.share`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._base import (
    Params,
    Shape,
    check_layers,
    in_rank,
    in_width,
    keeps_rank,
    keeps_width,
    out_width,
    output_shape,
)
from ._factors import is_leaf_factor, shared, transpose

Array = jax.Array


def _leaf_items(leaves: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(leaves, Mapping) or not leaves:
        raise TypeError(
            f"`leaves` must be a non-empty mapping {{layer's leaf: source's leaf}}, e.g. "
            f"{{'w': 'table'}}, got {leaves!r}"
        )
    items = tuple(leaves.items())
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"`leaves` maps leaf names (str) to leaf names, got {k!r}: {v!r}")
    return items


def combine_leaf(owner: Any, user: Any, transposed: bool) -> Any:
    """One shared leaf's two values: gradients added (the user's transposed back to
    the owner's layout), or factors kept side by side in a :class:`Sum`."""
    if is_leaf_factor(owner) or is_leaf_factor(user):
        return shared(owner, transpose(user) if transposed else user)
    return owner + (jnp.swapaxes(user, -1, -2) if transposed else user)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Tied:
    """A layer some of whose parameter leaves belong to an earlier layer (shared weights).

    Args:
      layer: the layer that uses the shared leaves, e.g.
        ``Dense(features, vocab, bias=False)`` for an output projection.
      source: the index, in the enclosing :class:`Sequential`, of the earlier
        layer that owns the leaves (e.g. 0 for the token ``Embedding``).
      leaves: ``{layer's leaf name: source's leaf name}``, e.g. ``{"w": "table"}``.
      transpose: whether every shared leaf is used transposed (2-D leaves:
        ``w = tableᵀ``).

    Params: ``layer``'s, without the shared leaves (``{}`` when all are shared).
    Gradient of a shared leaf: the sum over its uses (transposed back where the
    use is transposed). Per-example quantities are exact, cross terms included.
    A ``Tied`` layer can only sit in a :class:`Sequential` (which checks the
    source and the shapes when it is built).

    Example:
      >>> import jbp
      >>> net = jbp.Sequential([
      ...     jbp.Embedding(10, 4),
      ...     jbp.Tied(jbp.Dense(4, 10, bias=False), source=0, leaves={"w": "table"},
      ...              transpose=True),
      ... ])
      >>> import jax; net.init(jax.random.key(0))[1]
      {}
    """

    layer: Any
    source: int
    leaves: tuple[tuple[str, str], ...]
    transpose: bool = False

    def __init__(
        self, layer: Any, source: int, leaves: Mapping[str, str], transpose: bool = False
    ) -> None:
        (layer,) = check_layers([layer], "layer")
        if not isinstance(source, int) or isinstance(source, bool) or source < 0:
            raise ValueError(f"`source` must be the index (an int ≥ 0) of a layer, got {source!r}")
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "leaves", _leaf_items(leaves))
        object.__setattr__(self, "transpose", bool(transpose))
        shapes = jax.eval_shape(lambda key: layer.init(key, jnp.float32), jax.random.key(0))
        if not isinstance(shapes, dict):
            raise TypeError(f"`layer` ({layer!r}) must have a dict of params to share leaves")
        for k, _ in self.leaves:
            if k not in shapes:
                raise ValueError(
                    f"`leaves` names {k!r}, but `layer` ({layer!r}) has leaves {sorted(shapes)}"
                )
            if self.transpose and len(shapes[k].shape) != 2:
                raise ValueError(
                    f"`transpose=True` needs 2-D leaves, but {k!r} of {layer!r} has shape "
                    f"{tuple(shapes[k].shape)}"
                )

    @property
    def fan_in(self) -> int | None:
        return getattr(self.layer, "fan_in", None)

    @property
    def fan_out(self) -> int | None:
        return getattr(self.layer, "fan_out", None)

    @property
    def in_width(self) -> int | None:
        return in_width(self.layer)

    @property
    def out_width(self) -> int | None:
        return out_width(self.layer, None)

    @property
    def keeps_width(self) -> bool:
        return keeps_width(self.layer)

    @property
    def in_rank(self) -> int | None:
        return in_rank(self.layer)

    @property
    def keeps_rank(self) -> bool:
        return keeps_rank(self.layer)

    @property
    def mixes_positions(self) -> bool:
        return bool(getattr(self.layer, "mixes_positions", False))

    def needed_shapes(self, dtype: Any = jnp.float32) -> dict[str, tuple[int, ...]]:
        """The shape each shared leaf must have in the source (transposed if used so)."""
        shapes = jax.eval_shape(lambda key: self.layer.init(key, dtype), jax.random.key(0))
        out = {}
        for k, s in self.leaves:
            shape = tuple(shapes[k].shape)
            out[s] = shape[::-1] if self.transpose else shape
        return out

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        """The layer's own params: ``layer.init`` without the shared leaves."""
        params = self.layer.init(key, dtype)
        return {k: v for k, v in params.items() if k not in dict(self.leaves)}

    def output_shape(self, in_shape: Shape) -> Shape:
        return output_shape(self.layer, in_shape)

    def expand(self, own: Params, source: Params) -> Params:
        """The layer's full params: its own leaves and the source's shared ones
        (transposed where used so)."""
        full = dict(own)
        for k, s in self.leaves:
            v = source[s]
            full[k] = jnp.swapaxes(v, -1, -2) if self.transpose else v
        return full

    def share(
        self, owner: Any, user: Any, combine: Callable[[Any, Any, bool], Any] | None = None
    ) -> tuple[Any, Any]:
        """Move what one walk gives for the shared leaves from the user's entry into the
        owner's: ``(owner', user')``, with ``combine(owner_leaf, user_leaf, transposed)``
        (default :func:`combine_leaf`)."""
        combine = combine_leaf if combine is None else combine
        owner, user = dict(owner), dict(user)
        for k, s in self.leaves:
            owner[s] = combine(owner[s], user.pop(k), self.transpose)
        return owner, user

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        raise TypeError(
            f"{self!r} shares leaves with `layers[{self.source}]` of its Sequential; it can "
            "only run inside that Sequential"
        )

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        raise TypeError(
            f"{self!r} shares leaves with `layers[{self.source}]` of its Sequential; it can "
            "only run inside that Sequential"
        )
