"""The layer protocol, shape errors, and the backward walk that combinators share.

The protocol (required and optional methods and class attributes, each with a
worked example) is documented once, on :class:`Layer`: ``help(jbp.Layer)``.
What the argument checks read of it (:class:`ShapeError`, :class:`Context`,
the rank and width attributes) lives below the layers, in :mod:`jbp._protocol`,
and is re-exported here.

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
    """The layer protocol, and a base class for layers (subclassing it is optional).

    A layer is a small immutable object: make it a frozen dataclass (hashable:
    a network is static under ``jit``); any object with the required methods
    is a layer. Shapes: ``a`` is a batch ``(batch,
    *in_shape)``, ``in_shape`` one example's shape without the batch axis; a
    layer must also take a batch of one (that is what ``vmap`` and single
    examples become).

    **Required methods**

    - ``init(key, dtype=jnp.float32) -> params``: a pytree of arrays (``{}``
      without parameters).
    - ``forward(params, a) -> (out, cache)``: the output and what ``backward``
      needs (any pytree of arrays, or None).
    - ``backward(params, cache, delta_out) -> (grads, delta_in)``: the δ rule:
      ``delta_out = ∂C/∂out``, ``grads = ∂C/∂params`` (like params, summed over
      the batch), ``delta_in = ∂C/∂a``. No autodiff: the rule
      is written by hand, and :func:`jbp.check_layer` and :func:`jbp.verify`
      compare it with autodiff.
    - ``output_shape(in_shape) -> out_shape``: one example's output shape,
      without tracing; a :class:`ShapeError` for an input it cannot take. This
      base class's default traces ``forward`` with ``jax.eval_shape``.

    **Optional methods** (jbp uses each where a function needs it):

    - ``grad_factors(params, cache, delta_out) -> factors``: the per-example
      functions (:func:`jbp.per_example_norms`, ``per_example_grads``,
      ``sum_grad_squared``, ``clipped_grad``, private training, the curvature
      functions). A pytree like params whose leaves name the form of that
      leaf's per-example gradient ``g_i``: :class:`jbp.layers.Outer` (``g_i =
      Σ_t ã_it ⊗ δ_it``: Dense, Conv), :class:`jbp.layers.Elementwise` (``g_i =
      Σ_t u_it ⊙ δ_it``: biases, norm scales) or :class:`jbp.layers.Gather`
      (``g_i = Σ_t onehot(tok_it) ⊗ δ_it``: embeddings), t running over an
      example's positions; jbp forms every quantity from them without
      materialising ``g_i`` where it need not. Here ``delta_out`` holds each
      example's unscaled ``∂ℓ_i/∂out`` in its row.
    - ``per_example_grads(params, cache, delta_out) -> g``: instead of
      ``grad_factors``, ``g_i`` itself, like params with a leading batch axis;
      optionally with ``per_example_sq_norms(params, cache, delta_out) ->
      (batch,)``, ``sum_grad_squared(params, cache, delta_out) -> Σ_i g_i²`` and
      ``weighted_grads(params, cache, delta_out, c) -> Σ_i c_i g_i`` (jbp forms
      the missing ones from ``per_example_grads``).
    - ``tangent(params, cache, a_dot, params_dot) -> out_dot``: the forward of
      the linearised layer, ``(∂out/∂a)·a_dot + (∂out/∂params)·params_dot``,
      from the forward's cache; ``a_dot`` or ``params_dot`` may be None (zero),
      and both None give None. :func:`jbp.ggn_vector_product` needs it of
      every layer.

    **Optional class attributes**

    - ``in_rank`` (default None: any): the rank of one example the layer needs
      (a 2-D Conv: 3, ``(height, width, channels)``; attention: 2, ``(T,
      features)``); a network's first such layer fixes the rank of its ``x``.
    - ``keeps_rank`` (default True): False when the output's rank is not the
      input's (Flatten, GlobalAvgPool).
    - ``fan_in``/``fan_out``: the features of the input's and the output's last
      axis (Dense, norms, attention); or ``in_channels``/``out_channels`` for
      channels (channels last: Conv). :class:`jbp.Sequential` checks
      consecutive widths with them when it is built.
    - ``keeps_width`` (default False): True when the output's last axis is
      always the input's (activations, norms, dropout, pooling), so the width
      checks reach through the layer. A layer that declares neither a width nor
      ``keeps_width`` may change the last axis: what follows it is checked when
      shapes are (``Sequential(..., in_shape=...)``, ``init(..., in_shape=...)``,
      every call), never assumed.
    - ``takes_context`` (default False): True for a ``forward(params, a,
      context)`` that takes the call's :class:`Context`: ``context.mask``, the
      padding mask ``(batch, T)`` (True at real positions) or None, and
      ``context.key``, the dropout key or None (evaluation).
    - ``mixes_positions`` (default False): True when an output position reads
      other positions and the layer takes no padding mask (Conv, pooling,
      Flatten): a ``mask`` given to a network holding one is an error.
    - ``takes_tokens`` (default False): its input is integer tokens (Embedding);
      only a network's first layer may take them.

    Example: the required methods and the width attribute (``fan_in`` and
    ``fan_out`` would do as well, here both ``features``):

    >>> import dataclasses
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import jbp
    >>> @dataclasses.dataclass(frozen=True)
    ... class Scale(jbp.Layer):
    ...     '''out = a ⊙ s: one learned scale per feature of (batch, features) inputs.'''
    ...
    ...     features: int
    ...     keeps_width = True  # the last axis stays: width checks reach through
    ...
    ...     def init(self, key, dtype=jnp.float32):
    ...         return {"s": jnp.ones((self.features,), dtype)}
    ...
    ...     def output_shape(self, in_shape):
    ...         if tuple(in_shape) != (self.features,):
    ...             raise jbp.ShapeError(self, f"takes ({self.features},), got {in_shape}")
    ...         return tuple(in_shape)
    ...
    ...     def forward(self, params, a):
    ...         return a * params["s"][None, :], a  # (out, cache: the input)
    ...
    ...     def backward(self, params, cache, delta_out):
    ...         grads = {"s": jnp.sum(delta_out * cache, axis=0)}  # Σ_i δ_i ⊙ a_i
    ...         return grads, delta_out * params["s"][None, :]  # δ ⊙ s
    >>> jbp.Sequential([jbp.Dense(2, 3), Scale(3), jbp.Dense(4, 1)])
    Traceback (most recent call last):
    ...
    ValueError: `layers[2]` (Dense(fan_in=4, ...)) expects fan_in=4 but the layers before it give 3 features

    The optional methods, each a few lines for this layer: ``g_i(s) = a_i ⊙ δ_i``
    is an elementwise factor with one position per example (or, materialised,
    ``per_example_grads``); the tangent is ``ȧ ⊙ s + a ⊙ ṡ``:

    >>> class FullScale(Scale):
    ...     def grad_factors(self, params, cache, delta_out):
    ...         u, d = cache[:, None, :], delta_out[:, None, :]  # (batch, T=1, features)
    ...         return {"s": jbp.layers.Elementwise(u, d, (self.features,))}
    ...
    ...     def tangent(self, params, cache, a_dot, params_dot):
    ...         out = None if a_dot is None else a_dot * params["s"][None, :]
    ...         if params_dot is not None:
    ...             more = cache * params_dot["s"][None, :]
    ...             out = more if out is None else out + more
    ...         return out
    >>> class MaterialisedScale(Scale):
    ...     def per_example_grads(self, params, cache, delta_out):
    ...         return {"s": cache * delta_out}  # g_i, (batch, features)
    >>> nets = [jbp.Sequential([jbp.Dense(2, 3, "tanh"), layer(3), jbp.Dense(3, 1)])
    ...         for layer in (FullScale, MaterialisedScale)]
    >>> params = nets[0].init(jax.random.key(0))
    >>> x, y = jnp.ones((4, 2), jnp.float32), jnp.zeros((4, 1), jnp.float32)
    >>> @jax.jit
    ... def quantities(params, x, y):
    ...     norms = [jbp.per_example_norms(net, "half_sse")(params, x, y) for net in nets]
    ...     gv = jbp.ggn_vector_product(nets[0], "half_sse")(params, x, y, params)
    ...     return norms, gv
    >>> (by_factors, materialised), gv = quantities(params, x, y)
    >>> by_factors.shape, bool(np.allclose(by_factors, materialised))
    ((4,), True)
    >>> jax.tree.map(jnp.shape, gv) == jax.tree.map(jnp.shape, params)
    True

    A layer that takes the call's context (here: zeroes the padded positions of
    sequences, so it also fixes the example rank at 2):

    >>> @dataclasses.dataclass(frozen=True)
    ... class ZeroPads(jbp.Layer):
    ...     in_rank = 2  # (T, features)
    ...     keeps_width = True
    ...     takes_context = True
    ...
    ...     def init(self, key, dtype=jnp.float32):
    ...         return {}
    ...
    ...     def output_shape(self, in_shape):
    ...         return tuple(in_shape)
    ...
    ...     def forward(self, params, a, context):
    ...         if context.mask is None:
    ...             return a, None
    ...         keep = context.mask[:, :, None]
    ...         return jnp.where(keep, a, 0), keep
    ...
    ...     def backward(self, params, cache, delta_out):
    ...         return {}, delta_out if cache is None else jnp.where(cache, delta_out, 0)
    >>> net = jbp.Sequential([ZeroPads(), jbp.Dense(2, 1)])
    >>> seqs = jnp.ones((1, 3, 2), jnp.float32)  # one sequence of 3 steps, the last one padding
    >>> net.apply(net.init(jax.random.key(0)), seqs, mask=jnp.array([[True, True, False]]))[0, 2]
    Array([0.], dtype=float32)
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
