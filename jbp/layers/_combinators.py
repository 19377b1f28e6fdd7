"""Combinators: networks as trees of layers (stax's serial, residual and fan-out).

| combinator | forward | params | δ rule |
|---|---|---|---|
| ``Sequential(layers)`` | children in order | tuple, one per child | children in reverse |
| ``Residual(block)`` | ``a + block(a)`` | the block's | ``δ_out + block.backward(δ_out)`` |
| ``Parallel(branches, merge)`` | every branch on the same input, outputs summed, concatenated on the last axis or multiplied | tuple, one per branch | δ split by the merge (product: δ times the other branch), the branches' input δs summed |

Every combinator's per-example quantities are its children's: each implements
``backward_walk`` (see :mod:`jbp.layers._base`), its δ recursion with a
per-leaf computation in place of the gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from .._checks import check_dtype, check_key
from ._base import (
    NO_CONTEXT,
    AtLeaf,
    Context,
    Params,
    Shape,
    ShapeError,
    add_tangents,
    backward_walk,
    check_layers,
    check_no_tokens,
    declared_in,
    first_rank,
    fits_in_shape,
    forward,
    in_rank,
    in_width,
    keeps_rank,
    keeps_width,
    out_width,
    output_shape,
    takes_tokens,
    tangent,
)
from ._dense import Dense
from ._shared import Tied

Array = jax.Array


def _split_init(layers: Sequence[Any], key: Array, dtype: Any) -> tuple[Params, ...]:
    dtype = check_dtype(dtype)
    check_key(key)
    keys = jr.split(key, len(layers))
    return tuple(layer.init(k, dtype) for layer, k in zip(layers, keys, strict=True))


@jtu.register_static
@dataclasses.dataclass(frozen=True, repr=False)
class Sequential:
    """Layers applied in order; backward runs their δ rules in reverse. Nests.

    Args:
      layers: a non-empty sequence of layers (any of which may be a combinator).
      in_shape: optional, the shape of one input example (no batch axis), each
        entry an int or None (any size), e.g. ``(None, 16)`` for sequences of 16
        features of any length. It fixes the rank of the examples the network
        takes where its first layers do not (Dense acts on the last axis of any
        rank, so an MLP alone takes vectors ``(fan_in,)``); a call with examples
        of another shape is an error, and with every entry an int every layer's
        shape is checked when the network is built.

    ``params`` is a tuple with one entry per layer. ``apply`` takes a batch
    ``(batch, *in_shape)`` or a single example ``in_shape``. The widths of
    consecutive layers (the last axis: ``fan_in``/``fan_out`` features,
    ``in_channels``/``out_channels`` channels) are checked when the network is
    built, wherever the layers between them declare them or keep the last axis
    (``keeps_width``); a layer that declares neither (a user layer, say) may
    change it, so what follows it is checked when shapes are (``init`` given
    ``in_shape``, every call).

    Example:
      >>> import jbp
      >>> net = jbp.Sequential([jbp.Dense(4, 8, "tanh"), jbp.Dense(8, 2)], in_shape=(None, 4))
      >>> net.output_shape((10, 4))
      (10, 2)
      >>> jbp.Sequential([jbp.Conv(3, 4, (3, 3)), jbp.Conv(5, 2, (3, 3))])
      Traceback (most recent call last):
      ...
      ValueError: `layers[1]` (Conv(in_channels=5, ...)) expects in_channels=5 but the layers before it give 4 channels
    """

    layers: tuple[Any, ...]
    in_shape: tuple[int | None, ...] | None = None

    def __init__(
        self, layers: Sequence[Any], *, in_shape: Sequence[int | None] | None = None
    ) -> None:
        layers = check_layers(layers, "layers")
        check_no_tokens(layers[1:], "layers", start=1)
        shape = _check_in_shape(in_shape, layers)
        _check_widths(layers, None if shape is None else shape[-1])
        for i, layer in enumerate(layers):
            if isinstance(layer, Tied):
                _check_tie(layers, i, layer)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "in_shape", shape)
        if shape is not None and all(s is not None for s in shape):
            self.output_shape(shape)  # type: ignore[arg-type]  # every entry is an int

    def __repr__(self) -> str:
        shape = "" if self.in_shape is None else f", in_shape={self.in_shape}"
        return f"Sequential(layers={self.layers!r}{shape})"

    takes_context = True

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def fan_in(self) -> int | None:
        """Input features (last axis) of the first layer that declares ``fan_in``,
        when the layers before it keep the last axis and the rank (activations,
        norms, dropout); None otherwise."""
        for layer in self.layers:
            fan_in = getattr(layer, "fan_in", None)
            if fan_in is not None:
                return int(fan_in)
            if not (keeps_width(layer) and keeps_rank(layer) and in_rank(layer) is None):
                return None
        return None

    @property
    def fan_out(self) -> int | None:
        """Output features (last axis) of the last layer that declares ``fan_out``,
        when the layers after it keep the last axis; None otherwise."""
        for layer in reversed(self.layers):
            fan_out = getattr(layer, "fan_out", None)
            if fan_out is not None:
                return int(fan_out)
            if not keeps_width(layer):
                return None
        return None

    @property
    def in_width(self) -> int | None:
        """The width (last axis: features or channels) the input needs: ``in_shape``'s,
        else that of the first layer that declares one, when the layers before it keep
        the last axis; None otherwise."""
        if self.in_shape is not None and self.in_shape[-1] is not None:
            return self.in_shape[-1]
        for layer in self.layers:
            width = in_width(layer)
            if width is not None:
                return width
            if not keeps_width(layer):
                return None
        return None

    @property
    def out_width(self) -> int | None:
        """The width (last axis) of the output, when the layers declare it or keep
        a declared one; None otherwise."""
        width = self.in_width
        for layer in self.layers:
            width = out_width(layer, width)
        return width

    @property
    def keeps_width(self) -> bool:
        """Whether every layer keeps the last axis."""
        return all(keeps_width(layer) for layer in self.layers)

    @property
    def in_rank(self) -> int | None:
        """The rank of one input example: ``in_shape``'s, else the one the layers need
        (None: not fixed by them)."""
        if self.in_shape is not None:
            return len(self.in_shape)
        return first_rank(self.layers)

    @property
    def takes_tokens(self) -> bool:
        """Whether the input is integer tokens (the first layer is an Embedding)."""
        return takes_tokens(self.layers[0])

    @property
    def keeps_rank(self) -> bool:
        return all(keeps_rank(layer) for layer in self.layers)

    def output_shape(self, in_shape: Shape) -> Shape:
        """The output shape of one example; a :class:`ShapeError` names the first
        layer that cannot take what the layers before it give (or, with ``in_shape``
        given when the network was built, an example of another shape)."""
        shape = tuple(in_shape)
        if not fits_in_shape(self.in_shape, shape):
            raise ShapeError(
                self,
                f"was built with in_shape={self.in_shape} (None: any size), so it cannot take "
                f"examples of shape {shape}",
            )
        for i, layer in enumerate(self.layers):
            try:
                shape = output_shape(layer, shape)
            except ShapeError as e:
                raise e.within(f"layers[{i}]") from None
        return shape

    def init(
        self, key: Array, dtype: Any = jnp.float32, *, in_shape: Shape | None = None
    ) -> tuple[Params, ...]:
        """Initial params: a tuple, one entry per layer; ``key`` split once per layer.

        With ``in_shape`` (one example's shape, no batch axis) every layer's
        shape is checked first.
        """
        if in_shape is not None:
            self.output_shape(tuple(in_shape))
        return _split_init(self.layers, key, dtype)

    def _child(self, params: Sequence[Params], i: int) -> tuple[Any, Params]:
        """Layer ``i`` and its params (a :class:`Tied` layer: its inner layer, with the
        source's shared leaves)."""
        layer, p = self.layers[i], params[i]
        if isinstance(layer, Tied):
            return layer.layer, layer.expand(p, params[layer.source])
        return layer, p

    def forward(
        self, params: Sequence[Params], a: Array, context: Context = NO_CONTEXT
    ) -> tuple[Array, tuple[Any, ...]]:
        """Run every layer on a batch; returns the output and the per-layer caches.
        Layer ``i`` gets ``context.child(i)`` (if it takes a context)."""
        caches = []
        for i in range(len(self.layers)):
            layer, p = self._child(params, i)
            a, cache = forward(layer, p, a, context.child(i))
            caches.append(cache)
        return a, tuple(caches)

    def backward_walk(
        self,
        params: Sequence[Params],
        caches: Sequence[Any],
        delta_out: Array,
        at_leaf: AtLeaf | None,
    ) -> tuple[tuple[Any, ...], Array]:
        results: list[Any] = [None] * len(self.layers)
        delta: Any = delta_out
        for i in reversed(range(len(self.layers))):
            layer, p = self._child(params, i)
            results[i], delta = backward_walk(layer, p, caches[i], delta, at_leaf)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Tied):
                src = layer.source
                results[src], results[i] = _share(at_leaf, layer, results[src], results[i])
        return tuple(results), delta

    def backward(
        self, params: Sequence[Params], caches: Sequence[Any], delta_out: Array
    ) -> tuple[tuple[Params, ...], Array]:
        """Run the δ rules in reverse; returns per-layer grads and ``∂C/∂x``."""
        return self.backward_walk(params, caches, delta_out, None)

    def tangent(self, params: Any, caches: Any, a_dot: Any, params_dot: Any) -> Any:
        """The children's tangents in order."""
        for i in range(len(self.layers)):
            layer, p = self._child(params, i)
            p_dot = None if params_dot is None else self._child(params_dot, i)[1]
            a_dot = tangent(layer, p, caches[i], a_dot, p_dot)
        return a_dot

    def apply(
        self, params: Sequence[Params], x: Array, *, mask: Any = None, dropout_key: Any = None
    ) -> Array:
        """Network output for a batch ``(batch, *in_shape)`` or one example ``in_shape``.

        ``mask``: the padding mask ``(batch, T)`` (True at real positions) of a batch of
        padded sequences; ``dropout_key``: a PRNG key that switches dropout on (default:
        off, evaluation).
        """
        from .._checks import check_context, check_params, check_x

        check_params(self, params)
        x, single = check_x(self, params, x)
        context = check_context(self, x, mask, dropout_key, single)
        out, _ = self.forward(params, x, context)
        return out[0] if single else out


def _check_tie(layers: tuple[Any, ...], i: int, tied: Tied) -> None:
    """A :class:`Tied` layer at ``layers[i]`` names an earlier layer with leaves of the
    shapes it needs."""
    src = tied.source
    if src >= i:
        raise ValueError(
            f"`layers[{i}]` ({tied!r}) shares leaves of `layers[{src}]`, which must come "
            f"before it (source < {i})"
        )
    owner = layers[src]
    if isinstance(owner, Tied):
        raise ValueError(f"`layers[{i}]` names `layers[{src}]`, itself a Tied layer, as its source")
    have = jax.eval_shape(lambda key: owner.init(key, jnp.float32), jax.random.key(0))
    for name, shape in tied.needed_shapes().items():
        if not isinstance(have, dict) or name not in have:
            leaves = sorted(have) if isinstance(have, dict) else have
            raise ValueError(
                f"`layers[{i}]` shares leaf {name!r} of `layers[{src}]` ({owner!r}), which has "
                f"leaves {leaves}"
            )
        if tuple(have[name].shape) != shape:
            raise ValueError(
                f"`layers[{i}]` ({tied!r}) needs `layers[{src}]`'s {name!r} of shape {shape}"
                f"{' (transposed)' if tied.transpose else ''}, but it has shape "
                f"{tuple(have[name].shape)}"
            )


def _share(at_leaf: Any, tied: Tied, owner: Any, user: Any) -> tuple[Any, Any]:
    """Fold what a walk gave a tied layer for its shared leaves into the owner's entry:
    gradients added, per-example factors kept side by side, or, for a walk whose
    ``at_leaf`` has a ``merge(owner, user, tied)``, whatever that returns."""
    merge = getattr(at_leaf, "merge", None)
    if merge is not None:
        return merge(owner, user, tied)
    if not isinstance(owner, dict) or not isinstance(user, dict):
        raise TypeError(
            f"{tied!r} shares leaves with `layers[{tied.source}]`: per-example quantities of a "
            "shared leaf need grad_factors on both layers (the uses' factors are combined)"
        )
    return tied.share(owner, user)


def _check_in_shape(in_shape: Any, layers: tuple[Any, ...]) -> tuple[int | None, ...] | None:
    """``Sequential``'s ``in_shape``: a non-empty sequence of ints ≥ 1 or None, of the
    rank the first layers need (if they fix one)."""
    if in_shape is None:
        return None
    if isinstance(in_shape, (str, bytes)) or not isinstance(in_shape, Sequence):
        raise TypeError(
            f"`in_shape` must be a tuple of ints or None (one example's shape, no batch axis), "
            f"got {in_shape!r}"
        )
    shape = tuple(in_shape)
    if not shape or any(
        s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 1) for s in shape
    ):
        raise ValueError(
            "`in_shape` must be one example's shape (no batch axis): a non-empty tuple of "
            f"positive ints or None (any size), got {in_shape!r}"
        )
    rank = first_rank(layers)
    if rank is not None and rank != len(shape):
        at = next(i for i, layer in enumerate(layers) if in_rank(layer) is not None)
        raise ValueError(
            f"`in_shape` {shape} has rank {len(shape)} but `layers[{at}]` ({layers[at]!r}) "
            f"takes examples of rank {rank}"
        )
    return shape


def _check_widths(layers: tuple[Any, ...], width: int | None) -> None:
    """Consecutive widths (last axis) agree wherever both sides are known; ``width``
    is ``in_shape``'s (None: unknown). An undeclared layer's output width is unknown."""
    for i, layer in enumerate(layers):
        need = declared_in(layer)
        if need is not None and width is not None and need[1] != width:
            name, value = need
            unit = "channels" if name == "in_channels" else "features"
            given = "the layers before it give" if i else "`in_shape` gives"
            raise ValueError(
                f"`layers[{i}]` ({layer!r}) expects {name}={value} but {given} {width} {unit}"
            )
        width = out_width(layer, width)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Residual:
    """``out = a + block(a)``: a skip connection around ``block``.

    Args:
      block: a layer or combinator whose output shape equals its input shape.

    Params are the block's. δ rule: ``∂C/∂a = δ_out + block.backward(δ_out)``:
    the skip path hands δ_out back unchanged.
    """

    block: Any

    def __post_init__(self) -> None:
        try:
            (block,) = check_layers([self.block], "block")
        except (TypeError, ValueError) as e:
            raise type(e)(str(e).replace("`block[0]`", "`block`")) from None
        if takes_tokens(block):
            raise ValueError(
                f"`block` ({block!r}) takes integer tokens; a residual block's input is "
                "added to its output, so it must take and give real arrays"
            )
        need = declared_in(block)
        given = out_width(block, None if need is None else need[1])
        if need is not None and given is not None and need[1] != given:
            unit = "channels" if need[0] == "in_channels" else "features"
            raise ValueError(
                f"`block` ({block!r}) maps {need[1]} {unit} to {given}; a residual block "
                "must keep the shape of its input"
            )

    @property
    def in_rank(self) -> int | None:
        return in_rank(self.block)

    keeps_rank = True

    @property
    def fan_in(self) -> int | None:
        """The block's width (input and output), when it declares one."""
        width = getattr(self.block, "fan_in", None)
        return width if width is not None else getattr(self.block, "fan_out", None)

    fan_out = fan_in

    @property
    def in_width(self) -> int | None:
        """The block's width (last axis, input and output), when it declares one."""
        width = in_width(self.block)
        return width if width is not None else out_width(self.block, None)

    @property
    def out_width(self) -> int | None:
        return self.in_width

    keeps_width = True

    def output_shape(self, in_shape: Shape) -> Shape:
        try:
            out = output_shape(self.block, in_shape)
        except ShapeError as e:
            raise e.within("block") from None
        if out != tuple(in_shape):
            raise ShapeError(
                self,
                f"has a block that maps inputs of shape {tuple(in_shape)} to {out}; a residual "
                "block must keep the shape of its input",
            )
        return out

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        return self.block.init(key, dtype)

    takes_context = True

    def forward(self, params: Params, a: Array, context: Context = NO_CONTEXT) -> tuple[Array, Any]:
        out, cache = forward(self.block, params, a, context)
        return a + out, cache

    def backward_walk(
        self, params: Params, cache: Any, delta_out: Array, at_leaf: AtLeaf | None
    ) -> tuple[Any, Array]:
        results, delta = backward_walk(self.block, params, cache, delta_out, at_leaf)
        return results, delta_out + delta

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        return self.backward_walk(params, cache, delta_out, None)

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``a_dot + block tangent``."""
        return add_tangents(a_dot, tangent(self.block, params, cache, a_dot, params_dot))


_MERGES = ("sum", "concat", "product")


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Parallel:
    """Every branch sees the same input; outputs summed, concatenated or multiplied.

    Args:
      branches: a non-empty sequence of layers or combinators.
      merge: ``"sum"`` (outputs of one shape, added), ``"concat"`` (outputs
        concatenated on the last axis; all other axes must agree) or
        ``"product"`` (exactly two branches of one output shape, multiplied
        elementwise: a gate, ``out = a ⊙ b``).

    Params: a tuple, one entry per branch. δ rule: each branch gets δ_out
    (``"sum"``), its slice of δ_out's last axis (``"concat"``) or δ_out times
    the other branch's output (``"product"``: ``δ_a = δ ⊙ b``, ``δ_b = δ ⊙ a``);
    ``∂C/∂a`` is the sum of the branches' input δs.
    """

    branches: tuple[Any, ...]
    merge: str = "sum"

    def __init__(self, branches: Sequence[Any], merge: str = "sum") -> None:
        branches = check_layers(branches, "branches")
        check_no_tokens(branches, "branches")
        if merge not in _MERGES:
            raise ValueError(f"`merge` must be 'sum', 'concat' or 'product', got {merge!r}")
        if merge == "product" and len(branches) != 2:
            raise ValueError(
                f"merge='product' multiplies exactly two branches, got {len(branches)}"
            )
        if any(isinstance(b, Tied) for b in branches):
            raise ValueError("a Tied layer shares leaves within a Sequential, not as a branch")
        _check_branch_widths(branches, merge)
        object.__setattr__(self, "branches", branches)
        object.__setattr__(self, "merge", merge)

    takes_context = True

    @property
    def in_rank(self) -> int | None:
        return next((r for r in map(in_rank, self.branches) if r is not None), None)

    @property
    def keeps_rank(self) -> bool:
        return all(keeps_rank(b) for b in self.branches)

    @property
    def fan_in(self) -> int | None:
        """Input features of the first branch that declares them (all branches see
        the same input)."""
        return next((w for b in self.branches if (w := getattr(b, "fan_in", None))), None)

    @property
    def fan_out(self) -> int | None:
        """Output features: a branch's (``"sum"``, ``"product"``) or their total
        (``"concat"``), when known."""
        widths = [getattr(b, "fan_out", None) for b in self.branches]
        if self.merge != "concat":
            return next((w for w in widths if w is not None), None)
        known = [w for w in widths if w is not None]
        return sum(known) if len(known) == len(widths) else None

    @property
    def in_width(self) -> int | None:
        """The width (last axis) the input needs: the first branch's that declares one."""
        return next((w for w in map(in_width, self.branches) if w is not None), None)

    @property
    def out_width(self) -> int | None:
        """The width (last axis) of the merged output, when the branches declare it or
        keep the input's declared one."""
        widths = [out_width(b, self.in_width) for b in self.branches]
        if self.merge != "concat":
            return next((w for w in widths if w is not None), None)
        return sum(w for w in widths if w is not None) if None not in widths else None

    @property
    def keeps_width(self) -> bool:
        """Whether the output has the input's last axis (every branch keeps it; no concat)."""
        return self.merge != "concat" and all(keeps_width(b) for b in self.branches)

    def output_shape(self, in_shape: Shape) -> Shape:
        outs = []
        for j, branch in enumerate(self.branches):
            try:
                outs.append(output_shape(branch, in_shape))
            except ShapeError as e:
                raise e.within(f"branches[{j}]") from None
        first = outs[0]
        for j, out in enumerate(outs[1:], start=1):
            if self.merge != "concat" and out != first:
                verb = "sums" if self.merge == "sum" else "multiplies"
                raise ShapeError(
                    self,
                    f"{verb} its branches' outputs, but branches[0] gives shape {first} and "
                    f"branches[{j}] gives {out}",
                )
            if self.merge == "concat" and (len(out) != len(first) or out[:-1] != first[:-1]):
                raise ShapeError(
                    self,
                    f"concatenates its branches' outputs on the last axis, so all other axes "
                    f"must agree, but branches[0] gives shape {first} and branches[{j}] gives "
                    f"{out}",
                )
            if self.merge == "concat" and not out:
                raise ShapeError(self, "cannot concatenate scalar outputs")
        if self.merge != "concat":
            return first
        return (*first[:-1], sum(out[-1] for out in outs))

    def init(self, key: Array, dtype: Any = jnp.float32) -> tuple[Params, ...]:
        return _split_init(self.branches, key, dtype)

    def forward(
        self, params: Sequence[Params], a: Array, context: Context = NO_CONTEXT
    ) -> tuple[Array, Any]:
        """Branch ``j`` gets ``context.child(j)``. Cache: the branches' caches, their
        output widths and (``"product"``) their outputs."""
        outs, caches = [], []
        for j, (branch, p) in enumerate(zip(self.branches, params, strict=True)):
            out, cache = forward(branch, p, a, context.child(j))
            outs.append(out)
            caches.append(cache)
        if self.merge == "sum":
            merged = outs[0]
            for out in outs[1:]:
                merged = merged + out
        elif self.merge == "product":
            merged = outs[0] * outs[1]
        else:
            merged = jnp.concatenate(outs, axis=-1)
        widths = tuple(int(out.shape[-1]) for out in outs)
        return merged, (tuple(caches), widths, tuple(outs) if self.merge == "product" else ())

    def _branch_deltas(self, cache: Any, delta_out: Array) -> list[Array]:
        _, widths, outs = cache
        if self.merge == "sum":
            return [delta_out] * len(self.branches)
        if self.merge == "product":  # δ_a = δ ⊙ b, δ_b = δ ⊙ a
            return [delta_out * outs[1], delta_out * outs[0]]
        starts = [sum(widths[:j]) for j in range(len(widths))]
        return [delta_out[..., s : s + w] for s, w in zip(starts, widths, strict=True)]

    def backward_walk(
        self, params: Sequence[Params], cache: Any, delta_out: Array, at_leaf: AtLeaf | None
    ) -> tuple[tuple[Any, ...], Array]:
        caches = cache[0]
        deltas = self._branch_deltas(cache, delta_out)
        results, delta_in = [], None
        for branch, p, c, d in zip(self.branches, params, caches, deltas, strict=True):
            result, d_in = backward_walk(branch, p, c, d, at_leaf)
            results.append(result)
            delta_in = d_in if delta_in is None else delta_in + d_in
        assert delta_in is not None  # there is at least one branch
        return tuple(results), delta_in

    def backward(
        self, params: Sequence[Params], cache: Any, delta_out: Array
    ) -> tuple[tuple[Params, ...], Array]:
        return self.backward_walk(params, cache, delta_out, None)

    def tangent(self, params: Any, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """The branches' tangents, summed, concatenated or (``"product"``) ``ȧ ⊙ b + a ⊙ ḃ``
        (None branches are zero)."""
        caches, widths, outs = cache
        tangents = [
            tangent(branch, p, c, a_dot, None if params_dot is None else params_dot[j])
            for j, (branch, p, c) in enumerate(zip(self.branches, params, caches, strict=True))
        ]
        if self.merge == "product":
            first = None if tangents[0] is None else tangents[0] * outs[1]
            return add_tangents(first, None if tangents[1] is None else outs[0] * tangents[1])
        known = [o for o in tangents if o is not None]
        if not known:
            return None
        if self.merge == "sum":
            total = known[0]
            for o in known[1:]:
                total = total + o
            return total
        lead = known[0].shape[:-1]
        parts = [
            jnp.zeros((*lead, w), known[0].dtype) if o is None else o
            for o, w in zip(tangents, widths, strict=True)
        ]
        return jnp.concatenate(parts, axis=-1)


def _check_branch_widths(branches: tuple[Any, ...], merge: str) -> None:
    """The branches' declared input widths agree (they take one input) and, for a sum
    or product, so do their output widths wherever known."""
    first: tuple[int, str, int] | None = None  # branch, attribute, width
    for j, branch in enumerate(branches):
        need = declared_in(branch)
        if need is None:
            continue
        if first is not None and need[1] != first[2]:
            raise ValueError(
                f"`branches[{j}]` ({branch!r}) expects {need[0]}={need[1]} but `branches"
                f"[{first[0]}]` expects {first[1]}={first[2]}; every branch takes the same input"
            )
        first = first or (j, need[0], need[1])
    if merge == "concat":
        return
    width = None if first is None else first[2]
    outs = [(j, w) for j, b in enumerate(branches) if (w := out_width(b, width)) is not None]
    for j, w in outs[1:]:
        if w != outs[0][1]:
            verb = "adds" if merge == "sum" else "multiplies"
            raise ValueError(
                f"`branches[{j}]` ({branches[j]!r}) gives {w} on the last axis but "
                f"`branches[{outs[0][0]}]` gives {outs[0][1]}; merge={merge!r} {verb} outputs "
                "of one shape"
            )


def mlp(
    sizes: Sequence[int],
    activation: str = "relu",
    *,
    final_activation: str = "identity",
    bias: bool = True,
) -> Sequential:
    """A multilayer perceptron of Dense layers (``equinox.nn.MLP``'s convention).

    Args:
      sizes: layer widths ``[fan_in, hidden..., fan_out]``, at least two.
      activation: activation of the hidden layers.
      final_activation: activation of the last layer (default ``"identity"``).
      bias: whether every layer has a bias.

    Example:
      >>> import jbp
      >>> jbp.mlp([4, 2, 2, 1], "sigmoid", final_activation="sigmoid")  # doctest: +ELLIPSIS
      Sequential(layers=(Dense(fan_in=4, fan_out=2, activation='sigmoid', bias=True), ...))
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"`sizes` needs at least two entries [fan_in, fan_out], got {sizes}")
    n = len(sizes) - 1
    return Sequential(
        [
            Dense(sizes[i], sizes[i + 1], activation if i < n - 1 else final_activation, bias=bias)
            for i in range(n)
        ]
    )
