"""Argument checks shared by every public entry point.

Each check runs in Python on shapes and dtypes (available on tracers too), so
a bad argument fails with one clear message, naming the argument, what was
expected and what was given, before any XLA computation is built.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._precision import is_low
from ._protocol import (
    Context,
    ShapeError,
    example_axes,
    fits_in_shape,
    in_rank,
    keeps_rank,
    walk_layers,
)

Array = jax.Array


def check_dtype(dtype: Any, name: str = "dtype") -> jnp.dtype:
    """A floating dtype JAX can honour (float64 needs ``jax_enable_x64``)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a floating dtype such as jnp.float32, got {dtype!r}"
        ) from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"`{name}` must be a floating dtype such as jnp.float32, got {dt.name}")
    if dt.itemsize == 8 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            f"`{name}` is {dt.name} but 64-bit types are disabled; run "
            "jax.config.update('jax_enable_x64', True) first (or use float32)"
        )
    return dt


def mixed_precision(params_dtype: Any, x_dtype: Any) -> bool:
    """Whether float ``x`` of ``x_dtype`` with params of ``params_dtype`` is jbp's mixed
    precision: float32 params with a low-precision (bfloat16, float16) ``x``, which then
    sets the compute dtype (:mod:`jbp._precision`). Any other pair must match."""
    return jnp.dtype(params_dtype) == jnp.float32 and is_low(x_dtype)


def check_key(key: Any) -> None:
    """A JAX PRNG key (new-style ``jax.random.key`` or legacy ``PRNGKey``)."""
    if not hasattr(key, "dtype") or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        raise TypeError(f"`key` must be a PRNG key from jax.random.key(seed), got {key!r}")


def _path(path: tuple[Any, ...]) -> str:
    return "params" + jtu.keystr(path)


@functools.lru_cache(maxsize=512)
def _expected_params(layer: Any, dtype: jnp.dtype) -> Any:
    return jax.eval_shape(lambda key: layer.init(key, dtype), jax.random.key(0))


def params_dtype(params: Any) -> jnp.dtype | None:
    """The single floating dtype of ``params`` (None when there are no leaves)."""
    leaves = jtu.tree_leaves(params)
    return jnp.dtype(leaves[0].dtype) if leaves else None


def check_params(net: Any, params: Any) -> None:
    """``params`` matches ``net``: one entry per layer, the tree and shapes
    ``layer.init`` makes, and one floating dtype throughout."""
    if not isinstance(params, (tuple, list)):
        raise TypeError(
            f"`params` must be a tuple with one entry per layer (from net.init), got "
            f"{type(params).__name__}"
        )
    if len(params) != len(net.layers):
        raise ValueError(
            f"`params` has {len(params)} entries but the network has {len(net.layers)} layers"
        )
    first: tuple[str, jnp.dtype] | None = None
    for path, leaf in jtu.tree_leaves_with_path(params):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"`{_path(path)}` must be an array, got {type(leaf).__name__}")
        dt = jnp.dtype(leaf.dtype)
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(
                f"`{_path(path)}` has dtype {dt.name}; params must be real floating "
                "(float32 or float64)"
            )
        if first is None:
            first = (_path(path), dt)
        elif dt != first[1]:
            raise TypeError(
                f"`params` mixes dtypes: {first[0]} is {first[1].name} but {_path(path)} is "
                f"{dt.name}; cast them to one dtype"
            )
    dtype = first[1] if first else jnp.dtype(jnp.float32)
    for i, (layer, p) in enumerate(zip(net.layers, params, strict=True)):
        expected = _expected_params(layer, dtype)
        got_def = jtu.tree_structure(p)
        exp_def = jtu.tree_structure(expected)
        if got_def != exp_def:  # type: ignore[operator]  # PyTreeDef has __eq__
            raise ValueError(
                f"`params[{i}]` has structure {got_def} but layer {i} ({layer!r}) expects "
                f"{exp_def}; build params with net.init"
            )
        for (path, leaf), want in zip(
            jtu.tree_leaves_with_path(p), jtu.tree_leaves(expected), strict=True
        ):
            if tuple(leaf.shape) != tuple(want.shape):
                raise ValueError(
                    f"`params[{i}]{jtu.keystr(path)}` has shape {tuple(leaf.shape)} but layer "
                    f"{i} ({layer!r}) expects {tuple(want.shape)}"
                )


def _as_array(value: Any, name: str) -> Array:
    if isinstance(value, jax.Array):
        return value
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be an array, got {type(value).__name__}") from None


def example_rank(net: Any) -> int | None:
    """The rank of one input example ``net`` takes: fixed by its first layers
    (a 2-D Conv: 3), 1 when no layer constrains it (an MLP: vectors), None when a
    rank-changing layer such as ``Flatten`` comes first (any rank ≥ 1)."""
    rank = in_rank(net)
    if rank is not None:
        return int(rank)
    return 1 if keeps_rank(net) else None


def _example(rank: int) -> str:
    return "(fan_in,)" if rank == 1 else example_axes(rank - 1)


def _shape(shape: tuple[Any, ...]) -> str:
    """A shape as Python writes a tuple, ``(None, 4)``, ``(5,)``."""
    return str(tuple(shape))


def first_outside(values: Any, low: int, high: int, name: str) -> str:
    """Where the first value outside ``[low, high]`` sits, for a message:
    ``"; the first outside is y[3, 1] = 7"`` (``""`` when every value is inside)."""
    values = np.asarray(values)
    bad = np.argwhere((values < low) | (values > high))
    if not len(bad):
        return ""
    at = tuple(int(i) for i in bad[0])
    return f"; the first outside is {name}[{', '.join(map(str, at))}] = {int(values[at])}"


def _readable(a: Any) -> bool:
    """Values can be read only from a concrete array this process holds whole (not
    a tracer, nor a global array spread over several hosts)."""
    return not isinstance(a, jax.core.Tracer) and getattr(a, "is_fully_addressable", True)


def _check_tokens(net: Any, x: Array) -> tuple[Array, bool]:
    """Integer tokens ``(batch, T)`` or ``(T,)`` for a network whose first layer is
    an Embedding; values in ``[0, vocab)`` wherever they can be read."""
    dt = jnp.dtype(x.dtype)
    first = net.layers[0]
    while hasattr(first, "layers"):
        first = first.layers[0]
    if not jnp.issubdtype(dt, jnp.integer):
        raise TypeError(
            f"`x` has dtype {dt.name}, but the first layer ({first!r}) takes integer tokens; "
            "pass token ids, e.g. x.astype(jnp.int32)"
        )
    if x.ndim not in (1, 2):
        raise ValueError(
            f"`x` must have shape (batch, T) or (T,) of integer tokens, got shape {tuple(x.shape)}"
        )
    single = x.ndim == 1
    if 0 in x.shape:
        shape = tuple(x[None].shape if single else x.shape)
        raise ValueError(f"`x` has shape {shape}: give at least one token per example")
    vocab = getattr(first, "vocab", None)
    if vocab is not None and _readable(x):
        tokens = np.asarray(x)
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(
                f"`x` has tokens in [{tokens.min()}, {tokens.max()}] but the first layer has "
                f"vocab={vocab}, so tokens must lie in [0, {vocab - 1}]"
                + first_outside(tokens, 0, vocab - 1, "x")
            )
    if single:
        x = x[None]
    try:
        net.output_shape(tuple(x.shape[1:]))
    except ShapeError as e:
        raise ShapeError(
            e.layer, f"{e.detail}; `x` has examples of shape {tuple(x.shape[1:])}", e.where
        ) from None
    return x, single


def check_x(net: Any, params: Any, x: Any) -> tuple[Array, bool]:
    """Validate inputs; returns ``x`` batched, ``(batch, *in_shape)``, and whether
    it was a single example (no batch axis). Every layer's shape is checked."""
    x = _as_array(x, "x")
    dt = jnp.dtype(x.dtype)
    if getattr(net, "takes_tokens", False):
        return _check_tokens(net, x)
    if jnp.issubdtype(dt, jnp.complexfloating):
        raise TypeError(f"`x` has complex dtype {dt.name}; jbp handles real inputs only")
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"`x` has dtype {dt.name}; inputs must be floating: cast with "
            f"x.astype({(params_dtype(params) or jnp.dtype('float32')).name})"
        )
    pdt = params_dtype(params)
    if pdt is not None and dt != pdt and not mixed_precision(pdt, dt):
        mixed = (
            " (mixed precision takes float32 params with bfloat16 or float16 x)"
            if is_low(dt) or is_low(pdt)
            else ""
        )
        raise TypeError(
            f"`x` has dtype {dt.name} but params are {pdt.name}; cast x with "
            f"x.astype({pdt.name}){mixed}"
        )
    rank = example_rank(net)
    stated = getattr(net, "in_shape", None)
    if rank is None:
        if x.ndim == 0:
            raise ValueError("`x` is a scalar; give a batch (batch, ...) of inputs")
        single = x.ndim == 1
    elif x.ndim == rank:
        single = True
    elif x.ndim == rank + 1:
        single = False
    else:
        one = _example(rank) if stated is None else _shape(stated)
        batch = "(batch, fan_in)" if rank == 1 and stated is None else "(batch, " + one[1:]
        if stated is not None:
            batch = "(batch, " + ", ".join(map(str, stated)) + ")"
            why = " (the network's in_shape; None: any size)"
        elif rank > 1:
            why = f": this network's first layers take examples of rank {rank}"
        elif x.ndim > 2 and in_rank(net) is None:
            suggest = _shape((*(None,) * (x.ndim - 2), int(x.shape[-1])))
            why = (
                f"; Dense layers act on the last axis of any rank: to give examples of shape "
                f"{tuple(x.shape[1:])}, build the network with in_shape (None: any size), "
                f"e.g. jbp.Sequential(net.layers, in_shape={suggest})"
            )
        else:
            why = ""
        raise ValueError(f"`x` must have shape {batch} or {one}, got shape {tuple(x.shape)}{why}")
    if single:
        x = x[None]
    if x.shape[0] == 0:
        raise ValueError("`x` has an empty batch (shape (0, ...)); give at least one example")
    if not fits_in_shape(stated, tuple(x.shape[1:])):
        raise ValueError(
            f"`x` has examples of shape {tuple(x.shape[1:])} but the network was built with "
            f"in_shape={stated} (None: any size)"
        )
    fan_in = getattr(net, "fan_in", None)
    if fan_in is not None and x.shape[-1] != fan_in:
        raise ValueError(
            f"`x` has {x.shape[-1]} features but the first layer expects fan_in={fan_in}"
        )
    try:
        net.output_shape(tuple(x.shape[1:]))
    except ShapeError as e:
        hint = ""
        if single and rank is not None and rank > 1:
            try:  # a batch of one-channel images given without the channel axis?
                net.output_shape((*x.shape[2:], 1))
                hint = f"; if `x` is a batch of {x.shape[1]} one-channel examples, add the channel axis: x[..., None]"
            except ShapeError:
                pass
        raise ShapeError(
            e.layer, f"{e.detail}; `x` has examples of shape {tuple(x.shape[1:])}{hint}", e.where
        ) from None
    return x, single


def check_y(loss: Any, out_shape: tuple[int, ...], y: Any, single: bool, dtype: Any) -> Array:
    """Validate targets for ``loss`` against the network output ``(batch, *out)``;
    returns ``y`` batched (and, for real-valued targets, cast to ``dtype``).

    Targets have the output's shape; a loss with ``integer_labels`` also takes
    integer labels of the output's shape without its last (class) axis."""
    y = _as_array(y, "y")
    dt = jnp.dtype(y.dtype)
    if jnp.issubdtype(dt, jnp.complexfloating):
        raise TypeError(f"`y` has complex dtype {dt.name}; targets must be real")
    out_shape = tuple(out_shape)
    width = out_shape[-1] if len(out_shape) > 1 else 1
    want = out_shape[1:] if single else out_shape
    if loss.integer_labels and jnp.issubdtype(dt, jnp.integer):
        labels_shape = want[:-1]
        if tuple(y.shape) != labels_shape:
            raise ValueError(
                f"`y` holds integer labels of shape {tuple(y.shape)} but loss "
                f"{loss.name!r} with this x expects labels of shape {labels_shape} (or targets of "
                f"shape {want})"
            )
        if _readable(y):
            labels = np.asarray(y)
            if labels.size and (labels.min() < -1 or labels.max() >= width):
                raise ValueError(
                    f"`y` has labels in [{labels.min()}, {labels.max()}] but the network has "
                    f"{width} outputs, so labels must lie in [0, {width - 1}] (or be -1: no "
                    "target at that position)" + first_outside(labels, -1, width - 1, "y")
                )
        return y[None] if single else y
    if tuple(y.shape) != want:
        hint = ""
        if not single and tuple(y.shape) == want[:-1] and width == 1:
            hint = (
                "; add the output axis with y[..., None]"
                if len(want) > 2
                else ("; add the output axis with y[:, None]")
            )
        elif loss.integer_labels:
            hint = f"; loss {loss.name!r} also takes integer labels of shape {want[:-1]}"
        raise ValueError(
            f"`y` has shape {tuple(y.shape)} but the network output has shape {want}{hint}"
        )
    if not jnp.issubdtype(dt, jnp.inexact) or dt != jnp.dtype(dtype):
        y = y.astype(dtype)
    return y[None] if single else y


def check_mask(net: Any, x: Array, mask: Any, single: bool) -> Array | None:
    """The padding mask of a batch of sequences: boolean ``(batch, T)`` (``(T,)`` for a
    single example), True at real positions, each row a prefix (right padding), where
    ``x`` is the batched input ``(batch, T, ...)``. Returned batched; None stays None."""
    if mask is None:
        return None
    mask = _as_array(mask, "mask")
    if jnp.dtype(mask.dtype) != jnp.bool_:
        raise TypeError(
            f"`mask` must be boolean (True at real positions), got dtype {jnp.dtype(mask.dtype).name}"
        )
    want = tuple(x.shape[1:2]) if single else tuple(x.shape[:2])
    sequences = getattr(net, "takes_tokens", False) or x.ndim >= 3  # examples (T, ...)
    if not sequences or tuple(mask.shape) != want:
        seq = "(T,)" if single else "(batch, T)"
        raise ValueError(
            f"`mask` must have shape {seq} = {want} to mark the positions of `x` (shape "
            f"{tuple(x.shape[1:] if single else x.shape)}), got shape {tuple(mask.shape)}"
            if sequences
            else f"`mask` marks the positions of sequences, but `x` holds examples of shape "
            f"{tuple(x.shape[1:])} (no sequence axis)"
        )
    if single:
        mask = mask[None]
    if _readable(mask):
        m = np.asarray(mask)
        later = np.logical_and(~m[:, :-1], m[:, 1:])  # a real position after a pad
        if later.any():
            row = int(np.argwhere(later)[0][0])
            raise ValueError(
                f"`mask` row {row} is {m[row].astype(int).tolist()}: each row must be a prefix of "
                "True (real positions) followed by False (padding on the right)"
            )
    for where, layer in walk_layers(net):
        if getattr(layer, "mixes_positions", False):
            raise ValueError(
                f"`mask` was given, but `{where}` ({layer!r}) mixes positions and does not take a "
                "padding mask, so padding would leak into real positions; pool with "
                "GlobalAvgPool (which does) or pass no mask"
            )
    return mask


def check_context(net: Any, x: Array, mask: Any, dropout_key: Any, single: bool) -> Any:
    """The :class:`~jbp.layers.Context` of one call: the checked padding mask and
    dropout key (either may be None)."""
    mask = check_mask(net, x, mask, single)
    if dropout_key is not None:
        try:
            check_key(dropout_key)
        except TypeError:
            raise TypeError(
                f"`dropout_key` must be a PRNG key from jax.random.key(seed), got {dropout_key!r}"
            ) from None
    return Context(mask, dropout_key)


def check_example_mask(example_mask: Any, batch: int) -> Array | None:
    """Which rows of a batch ``(batch, ...)`` are examples: boolean ``(batch,)``, True at
    real examples, False at padding (any contents, NaN included). None stays None."""
    if example_mask is None:
        return None
    example_mask = _as_array(example_mask, "example_mask")
    if jnp.dtype(example_mask.dtype) != jnp.bool_:
        raise TypeError(
            "`example_mask` must be boolean (True at real examples), got dtype "
            f"{jnp.dtype(example_mask.dtype).name}"
        )
    if tuple(example_mask.shape) != (batch,):
        raise ValueError(
            f"`example_mask` must have shape (batch,) = ({batch},) to mark the rows of `x`, "
            f"got shape {tuple(example_mask.shape)}"
        )
    return example_mask


def check_number(
    name: str, value: Any, *, low: float, high: float = math.inf, closed: bool = False
) -> float:
    """``value`` is a real number in ``(low, high)`` (``[low, high)`` if ``closed``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    ok = (value >= low if closed else value > low) and value < high
    if math.isnan(value) or not ok:
        where = f"{'[' if closed else '('}{low:g}, {high:g})"
        raise ValueError(f"`{name}` must be in {where}, got {value!r}")
    return float(value)


def check_count(name: str, value: Any, *, low: int = 1) -> int:
    """``value`` is an int ≥ ``low`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer ≥ {low}, got {value!r}")
    return int(value)


def check_finite(value: Any, name: str) -> None:
    """No NaN or Inf in any floating leaf of ``value`` (a bad input, reported before
    any comparison: a gradient check at a non-finite point says nothing); tracers,
    whose values cannot be read, are let through."""
    for path, leaf in jtu.tree_leaves_with_path(value):
        if isinstance(leaf, jax.core.Tracer) or not hasattr(leaf, "dtype"):
            continue
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf))))
            if bad:
                raise ValueError(
                    f"`{name}{jtu.keystr(path)}` holds NaN or Inf ({bad} of {np.size(leaf)} "
                    "values): a bad input; a gradient check needs a finite point"
                )
