"""The layer protocol, shape errors, and the backward walk that combinators share.

A layer is a small immutable (hashable, static) object with:

- ``init(key, dtype) -> params``: a pytree, ``{}`` for parameterless layers;
- ``output_shape(in_shape) -> out_shape``: shapes of one example (no batch
  axis), computed without tracing; a mismatch raises :class:`ShapeError`;
- ``forward(params, a) -> (out, cache)``: ``a`` of shape ``(batch, *in_shape)``;
- ``backward(params, cache, delta_out) -> (grads, delta_in)``: the δ rule,
  ``delta_out = ∂C/∂out``, ``delta_in = ∂C/∂a``, ``grads`` shaped like params.

Optionally, ``tangent(params, cache, a_dot, params_dot) -> out_dot``: the forward
of the linearised layer, ``(∂out/∂a)·a_dot + (∂out/∂θ)·params_dot``, from the
forward's cache (``a_dot`` or ``params_dot`` may be None for zero; both None
gives None). :func:`jbp.ggn_vector_product` needs it of every layer.

What a forward pass needs besides its input travels in one :class:`Context`:
the batch's padding mask (``(batch, T)``, True at real positions) and the
dropout key. A layer that uses it says so with the class attribute
``takes_context = True`` and takes it as a third argument,
``forward(params, a, context)``; every other layer (any user layer that does not
declare it) keeps ``forward(params, a)`` and never sees it. Combinators hand
each child its own context (:meth:`Context.child`: the key folded with the
child's index, so that two dropout layers draw different masks). A layer whose
output at one position reads other positions (Conv, pooling, Flatten) and that
does not take the mask sets ``mixes_positions = True``: a padding mask given to
a network holding one is an error, not a silent leak of the pads.

Two optional class attributes say how a layer constrains the rank of its
input: ``in_rank`` (the rank of one example it needs, e.g. 3 for a 2-D
convolution on ``(height, width, channels)``; ``None``: any) and
``keeps_rank`` (``False`` for layers such as ``Flatten`` whose output rank
differs from their input's).

Combinators (``Sequential``, ``Residual``, ``Parallel``) also implement
``backward_walk(params, cache, delta_out, at_leaf)``: their δ recursion with
``at_leaf(layer, params, cache, delta_out)`` computed at every leaf layer in
place of its gradient. That one recursion gives the gradient (``at_leaf=None``)
and every per-example quantity (norms, Σg², re-weighted sums), so a combinator's
per-example quantities are its children's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._protocol import Context as Context
from .._protocol import ShapeError as ShapeError
from .._protocol import children as children
from .._protocol import declared_in as declared_in
from .._protocol import fits_in_shape as fits_in_shape
from .._protocol import in_rank as in_rank
from .._protocol import in_width as in_width
from .._protocol import is_layer as is_layer
from .._protocol import keeps_rank as keeps_rank
from .._protocol import keeps_width as keeps_width
from .._protocol import out_width as out_width
from .._protocol import walk_layers as walk_layers

Array = jax.Array
Params = Any
Shape = tuple[int, ...]
AtLeaf = Callable[[Any, Params, Any, Array], Any]


class Layer:
    """Base class for layers (optional: any object with the protocol works).

    Subclasses are frozen dataclasses implementing ``init``, ``forward`` and
    ``backward``, and ideally ``output_shape`` (the default finds it with
    ``jax.eval_shape`` of ``forward``, which traces). A layer that maps the
    last axis from ``fan_in`` to ``fan_out`` features may expose them, so that
    a :class:`Sequential` checks consecutive widths when it is built.
    """

    in_rank: int | None = None
    keeps_rank: bool = True
    keeps_width: bool = False

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        raise NotImplementedError

    def output_shape(self, in_shape: Shape) -> Shape:
        """The shape of one output example for one input example ``in_shape``."""
        return traced_output_shape(self, in_shape)

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        raise NotImplementedError

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        raise NotImplementedError


NO_CONTEXT = Context()


def takes_context(layer: Any) -> bool:
    """Whether the layer's forward takes a :class:`Context` (``takes_context = True``)."""
    return bool(getattr(layer, "takes_context", False))


def forward(layer: Any, params: Params, a: Array, context: Context = NO_CONTEXT) -> tuple[Any, Any]:
    """``layer.forward(params, a, context)`` for a layer that takes a context, else
    ``layer.forward(params, a)``."""
    if takes_context(layer):
        return layer.forward(params, a, context)
    return layer.forward(params, a)


def traced_output_shape(layer: Any, in_shape: Shape) -> Shape:
    """``output_shape`` by ``jax.eval_shape`` of ``init`` and ``forward`` (abstract,
    nothing runs), for layers that do not say their own."""

    def run(key: Array) -> Array:
        params = layer.init(key, jnp.float32)
        return layer.forward(params, jnp.zeros((1, *in_shape), jnp.float32))[0]

    try:
        out = jax.eval_shape(run, jax.random.key(0))
    except (TypeError, ValueError) as e:
        raise ShapeError(layer, f"cannot take inputs of shape {in_shape}: {e}") from None
    return tuple(out.shape[1:])


def output_shape(layer: Any, in_shape: Shape) -> Shape:
    """The layer's ``output_shape``, or the traced one for a bare protocol object."""
    method = getattr(layer, "output_shape", None)
    shape = method(tuple(in_shape)) if method is not None else traced_output_shape(layer, in_shape)
    return tuple(int(s) for s in shape)


def first_rank(layers: Sequence[Any]) -> int | None:
    """The input rank a chain of layers needs: the first fixed ``in_rank`` reached
    through rank-keeping layers (None if none is, or a rank-changing layer comes first)."""
    for layer in layers:
        rank = in_rank(layer)
        if rank is not None:
            return rank
        if not keeps_rank(layer):
            return None
    return None


def takes_tokens(layer: Any) -> bool:
    """Whether the layer's input is integer tokens (an Embedding first)."""
    return bool(getattr(layer, "takes_tokens", False))


def check_no_tokens(layers: Any, name: str, start: int = 0) -> None:
    """Only a network's first layer may take integer tokens: a clear error for any
    other place (there is no ``∂C/∂a`` to hand back through integers). ``layers``
    are ``name[start:]``, so the message gives each one's own index."""
    for i, layer in enumerate(layers, start):
        if takes_tokens(layer):
            raise ValueError(
                f"`{name}[{i}]` ({layer!r}) takes integer tokens, so it has no input δ and "
                "can only be a network's first layer"
            )


def backward_walk(
    layer: Any, params: Params, cache: Any, delta_out: Array, at_leaf: AtLeaf | None
) -> tuple[Any, Array]:
    """``layer.backward``, with ``at_leaf(layer, params, cache, delta_out)`` at every
    leaf layer in place of its gradient (``at_leaf=None``: the gradient itself)."""
    walk = getattr(layer, "backward_walk", None)
    if walk is not None:
        return walk(params, cache, delta_out, at_leaf)
    grads, delta_in = layer.backward(params, cache, delta_out)
    return (grads if at_leaf is None else at_leaf(layer, params, cache, delta_out)), delta_in


def tangent(layer: Any, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
    """``layer.tangent(...)``: the forward of the linearised layer (JVP by its own rules),
    or a clear error for a layer without one. ``None`` tangents are zero."""
    method = getattr(layer, "tangent", None)
    if method is None:
        raise TypeError(
            f"layer {layer!r} has no tangent(params, cache, a_dot, params_dot): "
            "ggn_vector_product needs one (the forward of the linearised network)"
        )
    return method(params, cache, a_dot, params_dot)


def add_tangents(a: Any, b: Any) -> Any:
    """The sum of two tangents, either of which may be None (zero)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def check_layers(layers: Any, name: str) -> tuple[Any, ...]:
    """A non-empty tuple of hashable layers, or a clear error naming ``name``."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"`{name}` must be a sequence of layers, got {type(layers).__name__}")
    layers = tuple(layers)
    if not layers:
        raise ValueError(f"`{name}` is empty: a network needs at least one layer")
    for i, layer in enumerate(layers):
        if not is_layer(layer):
            raise TypeError(
                f"`{name}[{i}]` is {layer!r}, which is not a layer: a layer needs "
                "init(key, dtype), forward(params, a) and backward(params, cache, delta_out)"
            )
        try:
            hash(layer)
        except TypeError:
            raise TypeError(
                f"`{name}[{i}]` ({type(layer).__name__}) is not hashable; make it a "
                "frozen dataclass"
            ) from None
    return layers


def positive_ints(value: Any, name: str, rank: int | None = None) -> tuple[int, ...]:
    """An int or a sequence of ints, each ≥ 1, as a tuple (an int is repeated
    ``rank`` times, or taken as one entry when ``rank`` is None)."""
    items = (value,) * (rank or 1) if isinstance(value, int) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {value!r}")
    items = tuple(items)
    if (
        not items
        or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in items)
        or (rank is not None and len(items) != rank)
    ):
        want = f"{rank} positive ints" if rank is not None else "positive ints"
        raise ValueError(f"`{name}` must be a positive int or a tuple of {want}, got {value!r}")
    return items


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is an int ≥ 1, else a clear error naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def last_axis(v: Array, ndim: int) -> Array:
    """A ``(features,)`` vector shaped to broadcast against a rank-``ndim`` array
    (explicitly: jbp runs under ``jax_numpy_rank_promotion="raise"``)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def has_params(params: Params) -> bool:
    """Whether a params pytree has any leaves."""
    return bool(jax.tree_util.tree_leaves(params))
