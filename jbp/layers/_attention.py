"""Multi-head self-attention with its backward written out, and the transformer.

On ``a`` of shape ``(batch, T, F)`` with H heads of width ``D = F / H``:

    q = a wq + bq,  k = a wk + bk,  v = a wv + bv        (split into heads)
    S = q kᵀ / √D   (causal: S_ts = −∞ for s > t)
    P = softmax(S) row by row (the row max subtracted first)
    o = P v  (heads merged),   out = o wo + bo

δ rule, from ``δ = ∂C/∂out``:

    ∂C/∂wo = Σ oᵀ δ,  dO = δ woᵀ
    dP = dO vᵀ,  dV = Pᵀ dO
    dS = P ⊙ (dP − rowsum(dP ⊙ P))          (the softmax; masked entries have P = 0)
         − P ⊙ rowsum(dS)                   (zero in exact arithmetic: the round-off
                                             residual of each row, removed)
    dQ = dS k / √D,  dK = dSᵀ q / √D
    ∂C/∂w{q,k,v} = Σ aᵀ d{Q,K,V},  ∂C/∂a = dQ wqᵀ + dK wkᵀ + dV wvᵀ

Per example, each projection's gradient is an outer factor summed over the T
positions, so the mixed ghost norm applies to all four.
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

from .._checks import check_dtype, check_key
from ._base import Layer, Params, Shape, ShapeError, add_tangents, last_axis, positive_int
from ._combinators import Residual, Sequential
from ._dense import Dense, contract_last, contract_leading
from ._embedding import Embedding, PositionalEmbedding
from ._factors import Elementwise, Factorised, Outer
from ._norm import LayerNorm

Array = jax.Array

_PROJECTIONS = ("q", "k", "v")
# dot_general numbers over (batch, T, heads, D) arrays, batched over (batch, heads)
_SCORES = (((3,), (3,)), ((0, 2), (0, 2)))  # q, k → (batch, heads, T, S)
_MIX = (((3,), (1,)), ((0, 1), (0, 2)))  # P, v → (batch, heads, T, D)
_BACK_T = (((2,), (1,)), ((0, 1), (0, 2)))  # Pᵀ-like: (B,H,T,S), (B,T,H,D) → (B,H,S,D)


def _heads_last(x: Array) -> Array:
    """``(batch, heads, T, D)`` → ``(batch, T, heads, D)``."""
    return jnp.transpose(x, (0, 2, 1, 3))


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class MultiHeadAttention(Factorised, Layer):
    """Self-attention over a sequence ``(batch, T, features)``, δ rule by hand.

    Args:
      features: the width F of the sequence (and of every projection).
      heads: the number of heads; must divide ``features``.
      causal: position t attends to positions s ≤ t only.
      bias: whether the four projections have biases.

    Params: ``wq, wk, wv, wo`` of shape ``(features, features)``,
    ``N(0, 1/features)``, and with bias ``bq, bk, bv, bo`` of shape
    ``(features,)``, zero. Scores are scaled by ``1/√(features/heads)``.
    """

    features: int
    heads: int
    causal: bool = dataclasses.field(default=False, kw_only=True)
    bias: bool = dataclasses.field(default=True, kw_only=True)

    in_rank = 2

    def __post_init__(self) -> None:
        positive_int(self.features, "features")
        positive_int(self.heads, "heads")
        if self.features % self.heads:
            raise ValueError(
                f"`features`={self.features} is not divisible by `heads`={self.heads}: heads "
                "split the features evenly"
            )

    @property
    def fan_in(self) -> int:
        return self.features

    fan_out = fan_in

    @property
    def _scale(self) -> float:
        return 1.0 / math.sqrt(self.features // self.heads)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        f = self.features
        keys = jr.split(key, 4)
        params = {
            f"w{n}": jr.normal(k, (f, f), dtype) / math.sqrt(f)
            for n, k in zip((*_PROJECTIONS, "o"), keys, strict=True)
        }
        if self.bias:
            params.update({f"b{n}": jnp.zeros((f,), dtype) for n in (*_PROJECTIONS, "o")})
        return params

    def output_shape(self, in_shape: Shape) -> Shape:
        in_shape = tuple(in_shape)
        if len(in_shape) != 2 or in_shape[-1] != self.features:
            raise ShapeError(
                self,
                f"attends over sequences (T, {self.features}), got examples of shape {in_shape}",
            )
        return in_shape

    def _linear(self, params: Params, x: Array, name: str) -> Array:
        z = jnp.matmul(x, params[f"w{name}"])
        return z + last_axis(params[f"b{name}"], z.ndim) if self.bias else z

    def _split(self, x: Array) -> Array:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.features // self.heads)

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        q, k, v = (self._split(self._linear(params, a, n)) for n in _PROJECTIONS)
        s = lax.dot_general(q, k, _SCORES) * self._scale  # (batch, heads, T, S)
        if self.causal:
            t = a.shape[1]
            s = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], s, -jnp.inf)
        # Shift by the row max (the diagonal is never masked) for stability. Softmax
        # ignores the shift, so it is held constant (as jax.nn.softmax does): no
        # reduce-max derivative for autodiff references to trace, whose jitted form
        # returned NaN on XLA CPU for a 1-feature attention (jbp verify, problem 128).
        e = jnp.exp(s - lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
        p = e / jnp.sum(e, axis=-1, keepdims=True)
        o = _heads_last(lax.dot_general(p, v, _MIX)).reshape(a.shape)
        return self._linear(params, o, "o"), (a, q, k, v, p, o)

    def _deltas(self, params: Params, cache: Any, delta_out: Array) -> tuple[Array, ...]:
        """``(dQ, dK, dV)`` as ``(batch, T, features)`` from ``δ = ∂C/∂out``."""
        _, q, k, v, p, _ = cache
        d_o = self._split(lax.dot_general(delta_out, params["wo"], contract_last(3)))
        d_p = lax.dot_general(d_o, v, _SCORES)  # dO vᵀ: (batch, heads, T, S)
        d_v = _heads_last(lax.dot_general(p, d_o, _BACK_T))  # Pᵀ dO
        d_s = p * (d_p - jnp.sum(d_p * p, axis=-1, keepdims=True))
        # Each row of dS sums to zero (softmax ignores a shift of its row); remove
        # what round-off leaves, or it reaches dQ through what all keys share (bk).
        d_s = (d_s - p * jnp.sum(d_s, axis=-1, keepdims=True)) * self._scale
        d_q = _heads_last(lax.dot_general(d_s, k, _MIX))  # dS k
        d_k = _heads_last(lax.dot_general(d_s, q, _BACK_T))  # dSᵀ q
        shape = delta_out.shape
        return d_q.reshape(shape), d_k.reshape(shape), d_v.reshape(shape)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        a, o = cache[0], cache[5]
        deltas = dict(zip(_PROJECTIONS, self._deltas(params, cache, delta_out), strict=True))
        deltas["o"] = delta_out
        inputs = {"q": a, "k": a, "v": a, "o": o}
        grads = {
            f"w{n}": lax.dot_general(inputs[n], d, contract_leading(3)) for n, d in deltas.items()
        }
        if self.bias:
            grads.update({f"b{n}": jnp.sum(d, axis=(0, 1)) for n, d in deltas.items()})
        q, k, v = (
            lax.dot_general(deltas[n], params[f"w{n}"], contract_last(3)) for n in _PROJECTIONS
        )
        return grads, q + k + v

    def _linear_tangent(
        self, params: Params, params_dot: Any, x: Array, x_dot: Any, name: str
    ) -> Any:
        """The tangent of ``x w + b``: ``x_dot w + x w_dot + b_dot`` (``None``: zero)."""
        z_dot = None if x_dot is None else jnp.matmul(x_dot, params[f"w{name}"])
        if params_dot is not None:
            z_dot = add_tangents(z_dot, jnp.matmul(x, params_dot[f"w{name}"]))
            if self.bias:
                z_dot = z_dot + last_axis(params_dot[f"b{name}"], x.ndim)
        return z_dot

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """Linearised projections, scores, softmax ``Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))``, ``P v``
        and output projection."""
        if a_dot is None and params_dot is None:
            return None
        a, q, k, v, p, o = cache
        q_dot, k_dot, v_dot = (
            self._split(self._linear_tangent(params, params_dot, a, a_dot, n)) for n in _PROJECTIONS
        )
        s_dot = (lax.dot_general(q_dot, k, _SCORES) + lax.dot_general(q, k_dot, _SCORES)) * (
            self._scale
        )
        # Masked entries have P = 0, so their Ṗ is zero too.
        p_dot = p * (s_dot - jnp.sum(p * s_dot, axis=-1, keepdims=True))
        o_dot = lax.dot_general(p_dot, v, _MIX) + lax.dot_general(p, v_dot, _MIX)
        o_dot = _heads_last(o_dot).reshape(a.shape)
        return self._linear_tangent(params, params_dot, o, o_dot, "o")

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Params:
        a, o = cache[0], cache[5]
        b, f = a.shape[0], self.features
        deltas = dict(zip(_PROJECTIONS, self._deltas(params, cache, delta_out), strict=True))
        deltas["o"] = delta_out
        rows = {"q": a, "k": a, "v": a, "o": o}
        factors: dict[str, Any] = {}
        for n, d in deltas.items():
            d4 = d.reshape(b, -1, 1, f)
            factors[f"w{n}"] = Outer(rows[n].reshape(b, -1, 1, f), d4, (f, f))
            if self.bias:
                factors[f"b{n}"] = Elementwise(None, d4[:, :, 0], (f,))
        return factors


def transformer(
    vocab: int,
    length: int,
    features: int,
    heads: int,
    depth: int,
    *,
    mlp_ratio: int = 4,
    activation: str = "gelu",
    causal: bool = True,
) -> Sequential:
    """A pre-LN decoder built from public layers and combinators only.

    ``Embedding(vocab, features)``, ``PositionalEmbedding(length, features)``,
    then ``depth`` × [``Residual(Sequential([LayerNorm, MultiHeadAttention]))``,
    ``Residual(Sequential([LayerNorm, Dense(features → mlp_ratio·features,
    activation), Dense(→ features)]))``], then ``LayerNorm`` and
    ``Dense(features → vocab)``: integer tokens ``(batch, T)``, ``T ≤ length``,
    to logits ``(batch, T, vocab)``.

    Example:
      >>> import jbp
      >>> net = jbp.transformer(vocab=16, length=8, features=12, heads=3, depth=2)
      >>> net.output_shape((8,))
      (8, 16)
    """
    positive_int(depth, "depth")
    positive_int(mlp_ratio, "mlp_ratio")
    hidden = mlp_ratio * features
    blocks: list[Any] = []
    for _ in range(depth):
        attention = MultiHeadAttention(features, heads, causal=causal)
        blocks.append(Residual(Sequential([LayerNorm(features), attention])))
        mlp = [LayerNorm(features), Dense(features, hidden, activation), Dense(hidden, features)]
        blocks.append(Residual(Sequential(mlp)))
    return Sequential(
        [
            Embedding(vocab, features),
            PositionalEmbedding(length, features),
            *blocks,
            LayerNorm(features),
            Dense(features, vocab),
        ]
    )
