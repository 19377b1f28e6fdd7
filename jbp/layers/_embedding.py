"""Embedding tables: token and positional, forward and δ rule side by side.

- ``Embedding(vocab, features)``: integer tokens ``(batch, T)`` → rows of
  ``table`` ``(batch, T, features)``. δ rule: ``∂C/∂table[v] = Σ_{i,t:
  tok_it = v} δ_it``, a scatter-add (a token seen twice gets both δs). Its
  input is integers, so it has no input δ: it is a network's first layer.
- ``PositionalEmbedding(length, features)``: ``a + table[:T]`` on
  ``(batch, T, features)``, ``T ≤ length``. δ rule: ``∂C/∂table[t] = Σ_i δ_it``
  for ``t < T`` (0 below), ``∂C/∂a = δ``.

Per example both are :class:`~jbp.layers._factors.Gather` factors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from .._checks import check_dtype, check_key
from .._precision import total, widen
from ._base import Layer, Params, Shape, ShapeError, positive_int
from ._factors import Factorised, Gather

Array = jax.Array


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Embedding(Factorised, Layer):
    """Token embedding: integer tokens ``(batch, T)`` → ``(batch, T, features)``.

    Args:
      vocab: the number of tokens (rows of the table); tokens lie in ``[0, vocab)``.
      features: the embedding width.

    Params: ``{"table": (vocab, features)}``, ``N(0, 1/features)``. It can only
    be a network's first layer (its input is integers: there is no ``∂C/∂a``);
    tokens outside ``[0, vocab)`` are an error wherever they can be read (outside
    ``jit``); where they cannot, the output rows of such a token are NaN and so is
    the gradient they would scatter into the table (never a clamped or wrapped row).
    """

    vocab: int
    features: int

    in_rank = 1
    takes_tokens = True

    def __post_init__(self) -> None:
        positive_int(self.vocab, "vocab")
        positive_int(self.features, "features")

    @property
    def fan_out(self) -> int:
        return self.features

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        std = 1.0 / math.sqrt(self.features)
        return {"table": std * jr.normal(key, (self.vocab, self.features), dtype)}

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 1:
            raise ShapeError(
                self,
                f"takes a sequence of integer tokens (T,), got examples of shape {tuple(in_shape)}",
            )
        return (*in_shape, self.features)

    def _rows(self, table: Array, tokens: Array) -> Array:
        """``table[tokens]``, NaN rows for tokens outside ``[0, vocab)``."""
        rows = jnp.take(table, jnp.clip(tokens, 0, self.vocab - 1), axis=0)
        return _nan_outside(rows, self._outside(tokens))

    def _outside(self, tokens: Array) -> Array:
        return (tokens < 0) | (tokens >= self.vocab)

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        return self._rows(params["table"], a), a

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Any]:
        tokens = cache
        table = params["table"]
        # δ added in the table's dtype (float32 under mixed precision)
        delta = _nan_outside(delta_out.astype(table.dtype), self._outside(tokens))
        table = jnp.zeros_like(table).at[jnp.clip(tokens, 0, self.vocab - 1)].add(delta)
        return {"table": table}, None

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``table_dot[tokens]`` (the input is integers: ``a_dot`` is ignored)."""
        return None if params_dot is None else self._rows(params_dot["table"], cache)

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Params:
        tokens = jnp.clip(cache, 0, self.vocab - 1)
        delta = _nan_outside(widen(delta_out), self._outside(cache))
        return {
            "table": Gather(
                tokens.reshape(tokens.shape[0], -1),
                delta.reshape(delta.shape[0], -1, self.features),
                self.vocab,
            )
        }


def _nan_outside(x: Array, outside: Array) -> Array:
    """Rows ``x`` ``(..., features)`` with NaN where ``outside`` ``(...)`` is True."""
    return jnp.where(outside[..., None], jnp.asarray(jnp.nan, x.dtype), x)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class PositionalEmbedding(Factorised, Layer):
    """A learned position table added to a sequence: ``a + table[:T]``.

    Args:
      length: the longest sequence (rows of the table).
      features: the width of ``a``'s last axis.

    Shapes: ``(batch, T, features)`` → the same, ``T ≤ length``. Params:
    ``{"table": (length, features)}``, ``N(0, 1/features)``.
    """

    length: int
    features: int

    in_rank = 2
    keeps_width = True

    def __post_init__(self) -> None:
        positive_int(self.length, "length")
        positive_int(self.features, "features")

    @property
    def fan_in(self) -> int:
        return self.features

    fan_out = fan_in

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        std = 1.0 / math.sqrt(self.features)
        return {"table": std * jr.normal(key, (self.length, self.features), dtype)}

    def output_shape(self, in_shape: Shape) -> Shape:
        in_shape = tuple(in_shape)
        if len(in_shape) != 2 or in_shape[-1] != self.features:
            raise ShapeError(
                self, f"expects sequences (T, {self.features}), got examples of shape {in_shape}"
            )
        if in_shape[0] > self.length:
            raise ShapeError(
                self,
                f"has a table of {self.length} positions, but the sequences are {in_shape[0]} long",
            )
        return in_shape

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        t = a.shape[1]
        return (a + params["table"][None, :t]).astype(a.dtype), None

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        t = delta_out.shape[1]
        rows = total(delta_out, 0).astype(params["table"].dtype)  # float32 sum if mixed
        table = jnp.zeros_like(params["table"]).at[:t].set(rows)
        return {"table": table}, delta_out

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``a_dot + table_dot[:T]``."""
        if params_dot is None:
            return a_dot
        if a_dot is None:
            # The cache holds no shape (forward keeps none), so T and the batch are
            # unknown: only reachable as a network's first layer on real inputs.
            raise ValueError(
                f"{self!r}.tangent needs an input tangent for the shape of its output (its "
                "cache holds none): put a layer before it, e.g. Embedding or Dense"
            )
        return a_dot + params_dot["table"][None, : a_dot.shape[1]]

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Params:
        return {"table": Gather(None, widen(delta_out), self.length)}
