"""Multi-head self-attention with its backward written out: grouped-query, RoPE, padding.

On ``a`` of shape ``(batch, T, F)`` with H query heads of width ``D = F / H``
and KV key/value heads, each shared by the ``G = H / KV`` query heads of its
group (grouped-query attention; KV = H: multi-head, KV = 1: multi-query):

    q = a wq + bq  (H heads),  k = a wk + bk,  v = a wv + bv   (KV heads)
    RoPE (optional): q, k ← rot_p(q), rot_p(k) at each position p
    S = q kᵀ / √D   (query head h against key head h // G; causal: S_ts = −∞ for
                     s > t; a padding mask: S_ts = −∞ for padded keys s)
    P = softmax(S) row by row (the row max subtracted first)
    o = P v  (heads merged),   out = o wo + bo

δ rule, from ``δ = ∂C/∂out``:

    ∂C/∂wo = Σ oᵀ δ,  dO = δ woᵀ
    dP = dO vᵀ,  dV = Σ_{g in the group} Pᵀ dO     (a group's query heads summed)
    dS = P ⊙ (dP − rowsum(dP ⊙ P))          (the softmax; masked entries have P = 0)
         − P ⊙ rowsum(dS)                   (zero in exact arithmetic: the round-off
                                             residual of each row, removed)
    dq = dS k / √D,  dk = Σ_{g in the group} dSᵀ q / √D
    RoPE: dq, dk ← rot_p⁻¹(dq), rot_p⁻¹(dk)  (the rotation is orthogonal: its
                                             transpose is its inverse)
    ∂C/∂w{q,k,v} = Σ aᵀ d{q,k,v},  ∂C/∂a = dq wqᵀ + dk wkᵀ + dv wvᵀ

RoPE (``rope_theta``, half-split form): with ``x₁ = x[:D/2]``, ``x₂ = x[D/2:]``
and angles ``θ_j = p · rope_theta^(−2j/D)``, ``rot_p(x) = [x₁ cos θ − x₂ sin θ,
x₂ cos θ + x₁ sin θ]`` and ``rot_p⁻¹(y) = [y₁ cos θ + y₂ sin θ, y₂ cos θ − y₁ sin θ]``.

Padding: with a padding mask no query attends to a padded key (each query may
always attend to itself, so a padded query's row is never empty). A padded
position's output is then never read by a real one, and its δ is zero.

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
import numpy as np
from jax import lax

from .._checks import check_dtype, check_key
from .._precision import dot, matmul, total, widen
from ._base import (
    NO_CONTEXT,
    Context,
    Layer,
    Params,
    Shape,
    ShapeError,
    add_tangents,
    last_axis,
    positive_int,
)
from ._dense import contract_last, contract_leading
from ._factors import Elementwise, Factorised, Outer

Array = jax.Array

_PROJECTIONS = ("q", "k", "v")
# dot_general numbers: q (batch, T, KV, G, D), k and v (batch, S, KV, D), scores and P
# (batch, KV, T, G, S), batched over (batch, KV head)
_SCORES = (((4,), (3,)), ((0, 2), (0, 2)))  # q, k → S; dO, v → dP
_MIX = (((4,), (1,)), ((0, 1), (0, 2)))  # P, v → o; dS, k → dq: (batch, KV, T, G, D)
_BACK_T = (((2, 3), (1, 3)), ((0, 1), (0, 2)))  # Pᵀ dO, dSᵀ q, over (T, G): (batch, KV, S, D)


def _query_major(x: Array) -> Array:
    """``(batch, KV, T, G, D)`` → ``(batch, T, KV, G, D)``."""
    return jnp.transpose(x, (0, 2, 1, 3, 4))


def _key_major(x: Array) -> Array:
    """``(batch, KV, S, D)`` → ``(batch, S, KV, D)``."""
    return jnp.transpose(x, (0, 2, 1, 3))


def rope_tables(length: int, head_dim: int, theta: float, dtype: Any) -> tuple[Array, Array]:
    """``cos θ`` and ``sin θ`` of RoPE's angles ``θ_pj = p · theta^(−2j/D)``, each
    ``(length, D/2)`` (computed in float64, then cast)."""
    inv = theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    angles = np.arange(length)[:, None] * inv[None]
    return jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)


def _rotate(x: Array, cos: Array, sin: Array, inverse: bool = False) -> Array:
    """RoPE's rotation (or its inverse, which is its transpose) of ``x (batch, T, ...,
    D)`` by position, half-split form; ``cos``, ``sin`` ``(T, D/2)``."""
    shape = (1, cos.shape[0]) + (1,) * (x.ndim - 3) + (cos.shape[1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if inverse:
        return jnp.concatenate([x1 * c + x2 * s, x2 * c - x1 * s], axis=-1)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class MultiHeadAttention(Factorised, Layer):
    """Self-attention over a sequence ``(batch, T, features)``, δ rule by hand.

    Args:
      features: the width F of the sequence (and of the query and output projections).
      heads: the number H of query heads; must divide ``features`` (D = F / H).
      kv_heads: the number of key/value heads, dividing ``heads`` (query head h
        uses key/value head ``h // (heads // kv_heads)``); None means ``heads``
        (multi-head attention), 1 multi-query attention.
      causal: position t attends to positions s ≤ t only.
      bias: whether the four projections have biases.
      rope_theta: the base of rotary position embeddings applied to queries and
        keys (D must be even), or None for none.

    Params: ``wq, wo`` of shape ``(features, features)``, ``wk, wv`` of shape
    ``(features, kv_heads·D)``, ``N(0, 1/features)``; with bias ``bq, bo``
    ``(features,)`` and ``bk, bv`` ``(kv_heads·D,)``, zero. Head h owns columns
    ``[h·D, (h+1)·D)``. Scores are scaled by ``1/√D``. Takes the padding mask of
    the batch (padded keys are never attended to).
    """

    features: int
    heads: int
    kv_heads: int | None = dataclasses.field(default=None, kw_only=True)
    causal: bool = dataclasses.field(default=False, kw_only=True)
    bias: bool = dataclasses.field(default=True, kw_only=True)
    rope_theta: float | None = dataclasses.field(default=None, kw_only=True)

    in_rank = 2
    keeps_width = True
    takes_context = True

    def __post_init__(self) -> None:
        positive_int(self.features, "features")
        positive_int(self.heads, "heads")
        if self.features % self.heads:
            raise ValueError(
                f"`features`={self.features} is not divisible by `heads`={self.heads}: heads "
                "split the features evenly"
            )
        if self.kv_heads is not None:
            positive_int(self.kv_heads, "kv_heads")
            if self.heads % self.kv_heads:
                raise ValueError(
                    f"`heads`={self.heads} is not divisible by `kv_heads`={self.kv_heads}: each "
                    "key/value head serves an equal group of query heads"
                )
        if self.rope_theta is not None:
            theta = self.rope_theta
            if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
                raise ValueError(f"`rope_theta` must be a positive number or None, got {theta!r}")
            if (self.features // self.heads) % 2:
                raise ValueError(
                    f"RoPE rotates pairs of features, so the head width features/heads = "
                    f"{self.features // self.heads} must be even (`rope_theta` given)"
                )

    @property
    def fan_in(self) -> int:
        return self.features

    fan_out = fan_in

    @property
    def _kv(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def _d(self) -> int:
        return self.features // self.heads

    @property
    def _scale(self) -> float:
        return 1.0 / math.sqrt(self._d)

    def _width(self, name: str) -> int:
        """Output width of projection ``name``: F for q and o, KV·D for k and v."""
        return self._kv * self._d if name in ("k", "v") else self.features

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        f = self.features
        keys = jr.split(key, 4)
        params = {
            f"w{n}": jr.normal(k, (f, self._width(n)), dtype) / math.sqrt(f)
            for n, k in zip((*_PROJECTIONS, "o"), keys, strict=True)
        }
        if self.bias:
            params.update(
                {f"b{n}": jnp.zeros((self._width(n),), dtype) for n in (*_PROJECTIONS, "o")}
            )
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
        """``x w + b``: ``w`` cast to ``x``'s dtype, a float32 accumulator for low-precision
        ``x`` (the bias added there), the result in ``x``'s dtype."""
        w = params[f"w{name}"]
        z = matmul(x, w)
        z = z + last_axis(params[f"b{name}"], z.ndim) if self.bias else z
        return z.astype(x.dtype)

    def _split(self, x: Array, name: str) -> Array:
        """Heads apart: q ``(batch, T, KV, G, D)``, k and v ``(batch, T, KV, D)``."""
        b, t, _ = x.shape
        if name == "q":
            return x.reshape(b, t, self._kv, self.heads // self._kv, self._d)
        return x.reshape(b, t, self._kv, self._d)

    def _rope(self, x: Array, inverse: bool = False) -> Array:
        if self.rope_theta is None:
            return x
        xw = widen(x)  # rotated in float32 under mixed precision
        cos, sin = rope_tables(x.shape[1], self._d, float(self.rope_theta), xw.dtype)
        return _rotate(xw, cos, sin, inverse).astype(x.dtype)

    def _allowed(self, t: int, mask: Array | None) -> Array | None:
        """Which scores are kept, broadcasting against ``(batch, KV, T, G, S)``: causal
        and/or not a padded key (the diagonal always: no row is empty)."""
        causal = jnp.tril(jnp.ones((t, t), bool)) if self.causal else None
        if mask is None:
            return None if causal is None else causal[None, None, :, None, :]
        keys = mask[:, None, :]  # (batch, 1, S)
        allowed = keys if causal is None else keys & causal[None]
        allowed = allowed | jnp.eye(t, dtype=bool)[None]
        return allowed[:, None, :, None, :]

    def forward(self, params: Params, a: Array, context: Context = NO_CONTEXT) -> tuple[Array, Any]:
        q, k, v = (self._split(self._linear(params, a, n), n) for n in _PROJECTIONS)
        q, k = self._rope(q), self._rope(k)
        s = dot(q, k, _SCORES) * self._scale  # (batch, KV, T, G, S); float32 if mixed
        allowed = self._allowed(a.shape[1], context.mask)
        if allowed is not None:
            s = jnp.where(allowed, s, -jnp.inf)
        # Shift by the row max (the diagonal is never masked) for stability. Softmax
        # ignores the shift, so it is held constant (as jax.nn.softmax does): no
        # reduce-max derivative for autodiff references to trace, whose jitted form
        # returned NaN on XLA CPU for a 1-feature attention (jbp verify, problem 128).
        e = jnp.exp(s - lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
        p = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(a.dtype)
        o = _query_major(dot(p, v, _MIX)).reshape(a.shape).astype(a.dtype)
        return self._linear(params, o, "o"), (a, q, k, v, p, o)

    def _deltas(self, params: Params, cache: Any, delta_out: Array) -> tuple[Array, ...]:
        """``(dq, dk, dv)`` as ``(batch, T, width)`` from ``δ = ∂C/∂out``."""
        _, q, k, v, p, _ = cache
        low = delta_out.dtype  # the compute dtype: δs stored in it, products in float32
        d_o = self._split(dot(delta_out, params["wo"], contract_last(3)).astype(low), "q")
        d_p = dot(d_o, v, _SCORES)  # dO vᵀ: (batch, KV, T, G, S)
        d_v = _key_major(dot(p, d_o, _BACK_T)).astype(low)  # Σ_g Pᵀ dO
        pw = widen(p)
        d_s = pw * (d_p - jnp.sum(d_p * pw, axis=-1, keepdims=True))
        # Each row of dS sums to zero (softmax ignores a shift of its row); remove
        # what round-off leaves, or it reaches dQ through what all keys share (bk).
        d_s = ((d_s - pw * jnp.sum(d_s, axis=-1, keepdims=True)) * self._scale).astype(low)
        d_q = self._rope(_query_major(dot(d_s, k, _MIX)).astype(low), inverse=True)  # dS k
        d_k = self._rope(_key_major(dot(d_s, q, _BACK_T)).astype(low), inverse=True)  # Σ_g dSᵀ q
        b, t = delta_out.shape[:2]
        return d_q.reshape(b, t, -1), d_k.reshape(b, t, -1), d_v.reshape(b, t, -1)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        a, o = cache[0], cache[5]
        deltas = dict(zip(_PROJECTIONS, self._deltas(params, cache, delta_out), strict=True))
        deltas["o"] = delta_out
        inputs = {"q": a, "k": a, "v": a, "o": o}
        grads = {
            f"w{n}": dot(inputs[n], d, contract_leading(3)).astype(params[f"w{n}"].dtype)
            for n, d in deltas.items()
        }
        if self.bias:
            grads.update(
                {f"b{n}": total(d, (0, 1)).astype(params[f"b{n}"].dtype) for n, d in deltas.items()}
            )
        q, k, v = (dot(deltas[n], params[f"w{n}"], contract_last(3)) for n in _PROJECTIONS)
        return grads, (q + k + v).astype(delta_out.dtype)

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
        """Linearised projections (rotated, the rotation being linear), scores, softmax
        ``Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))``, ``P v`` and output projection."""
        if a_dot is None and params_dot is None:
            return None
        a, q, k, v, p, o = cache
        q_dot, k_dot, v_dot = (
            self._split(self._linear_tangent(params, params_dot, a, a_dot, n), n)
            for n in _PROJECTIONS
        )
        q_dot, k_dot = self._rope(q_dot), self._rope(k_dot)
        s_dot = (lax.dot_general(q_dot, k, _SCORES) + lax.dot_general(q, k_dot, _SCORES)) * (
            self._scale
        )
        # Masked entries have P = 0, so their Ṗ is zero too.
        p_dot = p * (s_dot - jnp.sum(p * s_dot, axis=-1, keepdims=True))
        o_dot = lax.dot_general(p_dot, v, _MIX) + lax.dot_general(p, v_dot, _MIX)
        o_dot = _query_major(o_dot).reshape(a.shape)
        return self._linear_tangent(params, params_dot, o, o_dot, "o")

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Params:
        a, o = widen(cache[0]), widen(cache[5])  # factors in float32 under mixed precision
        b, f = a.shape[0], self.features
        deltas = dict(zip(_PROJECTIONS, self._deltas(params, cache, delta_out), strict=True))
        deltas["o"] = delta_out
        deltas = {n: widen(d) for n, d in deltas.items()}
        rows = {"q": a, "k": a, "v": a, "o": o}
        factors: dict[str, Any] = {}
        for n, d in deltas.items():
            width = self._width(n)
            d4 = d.reshape(b, -1, 1, width)
            factors[f"w{n}"] = Outer(rows[n].reshape(b, -1, 1, f), d4, (f, width))
            if self.bias:
                factors[f"b{n}"] = Elementwise(None, d4[:, :, 0], (width,))
        return factors
