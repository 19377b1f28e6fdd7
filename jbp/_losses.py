"""Losses: per-example value, batch reduction and output δ, side by side.

Outputs may have any rank, ``(batch, *out)``: ``ℓ_i`` runs over all of an
example's elements (``half_sse``, ``sigmoid_bce``: summed; ``mse``: averaged).
``softmax_xent`` treats the last axis as classes and every other axis of an
example as positions (tokens, pixels): ``ℓ_i`` is the mean over the example's
positions, so C = mean_i ℓ_i is also the mean over all positions.

A loss is ``ℓ_i`` per example plus a reduction: the total is ``C = Σ_i ℓ_i``
(``"sum"``) or ``C = mean_i ℓ_i`` (``"mean"``). ``delta(a, y)`` is the
per-example ``∂ℓ_i/∂a_i``, unscaled; the batch δ_L handed to the last layer is
that times ``1`` (sum) or ``1/B`` (mean). Per-example gradients are always
``g_i = ∂ℓ_i/∂θ``, unscaled.

For curvature each built-in loss also gives the Hessian ``H_i = ∂²ℓ_i/∂a_i²``
(unscaled, per example) as a matrix square root, ``H_i = Σ_c s_ic s_icᵀ``:
exact (``sqrt_hessian``: ``(C, batch, *out)``, C columns per example) or
Monte-Carlo (``sample_sqrt_hessian``: M columns ``s = ∇_a(−log p(ŷ|a))/√M``
for ``ŷ`` drawn from the model's predictive distribution, ``E[Σ_c s_c s_cᵀ] =
H_i``), and its product with a vector (``hessian_vp``):

| loss | H_i | exact square root (columns) | MC sample |
|---|---|---|---|
| ``half_sse`` | I | the K unit vectors | ``ε ~ N(0, I)`` |
| ``mse`` | (2/K) I | ``√(2/K)`` × unit vectors | ``√(2/K) ε`` |
| ``sigmoid_bce`` | diag(σ(1 − σ)) | ``√(σ(1 − σ))`` × unit vectors | ``σ − ŷ``, ``ŷ ~ Bernoulli(σ)`` |
| ``softmax_xent`` | per position ``(Σy/T)(diag p − p pᵀ)`` | ``√(Σy/T) √p_c (e_c − p)``, one set per position | ``√(Σy/T)(p − e_ŷ)``, ``ŷ ~ Cat(p)`` per position |

Padding. An integer label ``-1`` means "no target at this position": for
``softmax_xent`` with integer labels ``ℓ_i`` is the mean over the example's own
target positions (0 if it has none), never over the padded length. A label
outside ``[-1, classes)`` is an error wherever it can be read; under ``jit``,
where it cannot, the example's ℓ_i and the δ at its position are NaN (never a
label clamped or wrapped into range). A padding
mask ``(batch, T)`` (True at real positions; see :meth:`Loss.with_mask`) given
with outputs ``(batch, T, ...)`` that keep the sequence axis removes the padded
positions from every loss: ``half_sse`` and ``sigmoid_bce`` sum over real
positions only, ``mse`` averages over the real elements, ``softmax_xent`` over
the real target positions; δ_L, the Hessian square roots and Hessian-vector
products are zero at padded positions. (An output without the sequence axis,
e.g. a pooled ``(batch, classes)``, has no padded positions to remove.)

Mixed precision: from low-precision outputs (bfloat16, float16) every built-in
loss computes its value and δ_L in float32 (the value stays float32, δ_L is
handed back in the outputs' dtype); curvature quantities are not mixed precision.

Logit losses (``sigmoid_bce``, ``softmax_xent``) compute their value with
softplus / logsumexp and their δ in the fused form ``σ(a) − y`` /
``softmax(a)·Σy − y``, never through ``log(σ(·))``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr

from ._precision import is_low, widen

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-example loss with its reduction and its output δ.

    Attributes:
      name: registry name.
      per_example: ``(a, y) -> ℓ``, ``a`` of shape ``(batch, *out)``, returns
        ``(batch,)``.
      delta: ``(a, y) -> ∂ℓ_i/∂a_i``, shaped like ``a``, unscaled.
      reduction: ``"sum"`` or ``"mean"`` over the batch.
      integer_labels: whether ``y`` may be integer class labels of shape
        ``(batch, *out[:-1])`` instead of targets shaped like ``a``.
      description: one line for error messages and docs.
      reduced_delta: optional ``(a, y) -> ∂C/∂a`` of the reduced total, to
        compute the batch δ_L in another operation order than ``delta`` times
        :meth:`scale` (e.g. that of JAX autodiff); see :meth:`batch_delta`.
      sqrt_hessian: optional ``(a, y) -> S`` of shape ``(C, batch, *out)``
        with ``Σ_c S[c, i] ⊗ S[c, i] = ∂²ℓ_i/∂a_i²`` (curvature, exact).
      sample_sqrt_hessian: optional ``(key, a, y, m) -> S`` of shape ``(m,
        batch, *out)`` whose outer products average to the Hessian (MC).
      hessian_vp: optional ``(a, y, u) -> (∂²ℓ_i/∂a_i²) u_i`` per example,
        shaped like ``a`` (:func:`jbp.ggn_vector_product`).
      masked: whether every function above takes a keyword ``mask`` (a padding
        mask ``(batch, T)`` for outputs ``(batch, T, ...)``), so that
        :meth:`with_mask` can bind one (the built-in losses do).
    """

    name: str
    per_example: Callable[..., Array]
    delta: Callable[..., Array]
    reduction: str
    integer_labels: bool = False
    description: str = ""
    reduced_delta: Callable[..., Array] | None = None
    sqrt_hessian: Callable[..., Array] | None = None
    sample_sqrt_hessian: Callable[..., Array] | None = None
    hessian_vp: Callable[..., Array] | None = None
    masked: bool = False

    def __post_init__(self) -> None:
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"`reduction` must be 'sum' or 'mean', got {self.reduction!r}")

    def with_mask(self, mask: Array | None) -> Loss:
        """This loss with the padding mask ``(batch, T)`` bound into every function, for
        outputs ``(batch, T, ...)``: padded positions contribute nothing (see the module
        docs). ``None`` gives the loss itself."""
        if mask is None:
            return self
        if not self.masked:
            raise ValueError(
                f"loss {self.name!r} takes no padding mask: give its functions a `mask` "
                "keyword and masked=True, or pass no mask"
            )
        names = (
            "per_example",
            "delta",
            "reduced_delta",
            "sqrt_hessian",
            "sample_sqrt_hessian",
            "hessian_vp",
        )
        bound: dict[str, Any] = {
            n: functools.partial(getattr(self, n), mask=mask)
            for n in names
            if getattr(self, n) is not None
        }
        return dataclasses.replace(self, masked=False, **bound)

    def scale(self, batch: int) -> float:
        """The factor from ``Σ_i`` to this loss's reduction: 1 or 1/batch."""
        return 1.0 if self.reduction == "sum" else 1.0 / batch

    def batch_delta(self, a: Array, y: Array) -> Array:
        """δ_L = ∂C/∂a of the reduced total: ``delta(a, y)`` times :meth:`scale`."""
        if self.reduced_delta is not None:
            return self.reduced_delta(a, y)
        delta = self.delta(a, y)
        return delta if self.reduction == "sum" else delta * self.scale(a.shape[0])

    def reduce(self, per_example: Array) -> Array:
        """Reduce per-example values ``(batch,)`` to the scalar total ``C``."""
        if self.reduction == "sum":
            return jnp.sum(per_example)
        return jnp.mean(per_example)

    def __call__(self, a: Array, y: Array) -> Array:
        """The total ``C`` for outputs ``a (batch, out)`` and targets ``y``."""
        return self.reduce(self.per_example(a, y))


def _example_axes(a: Array) -> tuple[int, ...]:
    """Every axis of one example (all but the batch axis)."""
    return tuple(range(1, a.ndim))


def _weights(mask: Array | None, a: Array) -> Array | None:
    """The padding mask ``(batch, T)`` as 0/1 weights broadcasting against ``a``
    ``(batch, T, ...)`` (None: no mask)."""
    if mask is None:
        return None
    return mask.astype(a.dtype).reshape(mask.shape + (1,) * (a.ndim - 2))


def _masked(x: Array, w: Array | None) -> Array:
    """``x`` at real positions, 0 at padded ones (a select, not a product: whatever a
    padded position holds, NaN included, adds nothing)."""
    return x if w is None else jnp.where(w > 0, x, jnp.zeros_like(x))


def _half_sse(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    r = _masked(a - y, _weights(mask, a))
    return 0.5 * jnp.sum(r * r, axis=_example_axes(a))


def _elements(a: Array) -> int:
    return math.prod(a.shape[1:])


def _counts(a: Array, mask: Array | None) -> Array | float:
    """Real elements per example, ``(batch, 1, ...)`` (``K`` without a mask), at least 1."""
    if mask is None:
        return float(_elements(a))
    per_position = math.prod(a.shape[2:])
    n = jnp.sum(mask, axis=1).astype(a.dtype) * per_position
    return jnp.maximum(n, 1).reshape((a.shape[0],) + (1,) * (a.ndim - 1))


def _mse(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    if mask is None:
        r = a - y
        return jnp.mean(r * r, axis=_example_axes(a))
    r = _masked(a - y, _weights(mask, a))
    return jnp.sum(r * r / _counts(a, mask), axis=_example_axes(a))


def _mse_delta(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    if mask is None:
        return (2.0 / _elements(a)) * (a - y)
    return 2 * _masked(a - y, _weights(mask, a)) / _counts(a, mask)


def _mse_reduced_delta(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    """2(a − y)/(K·B) in JAX autodiff's order, as XLA runs it: (1/B)·(1/K) in the
    array's dtype (XLA turns the division by the constant K into a product)."""
    if mask is not None:
        return _mse_delta(a, y, mask=mask) / a.shape[0]
    one = jnp.ones((), a.dtype)
    k = (one / a.shape[0]) * (one / _elements(a))
    return 2 * ((a - y) * k)


def _sigmoid_bce(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    value = _masked(jax.nn.softplus(a) - y * a, _weights(mask, a))
    return jnp.sum(value, axis=_example_axes(a))


def _bce_delta(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    return _masked(jax.nn.sigmoid(a) - y, _weights(mask, a))


def _targets(a: Array, y: Array) -> Array:
    """Integer labels ``(batch, *positions)`` to one-hot ``(batch, *positions,
    classes)`` (a label ``-1``, no target, to zeros); else ``y``."""
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jax.nn.one_hot(y, a.shape[-1], dtype=a.dtype)
    return y


def _outside(a: Array, y: Array) -> Array | None:
    """Where integer labels lie outside ``[-1, classes)``, ``(batch, *positions)`` (None
    for targets). Such a label has no class to score: under ``jit``, where its value
    cannot be checked, the example's ℓ_i, the δ at its position and the Hessian terms
    there are NaN, never a silently clamped or wrapped answer."""
    if not jnp.issubdtype(y.dtype, jnp.integer):
        return None
    return (y < -1) | (y >= a.shape[-1])


def _poisoned(x: Array, bad: Array | None) -> Array:
    """``x`` with NaN where ``bad`` (broadcast on x's trailing axes) is True."""
    if bad is None:
        return x
    bad = bad.reshape(bad.shape + (1,) * (x.ndim - bad.ndim))
    return jnp.where(bad, jnp.asarray(jnp.nan, x.dtype), x)


def _positions(a: Array) -> int:
    """Positions per example of a ``(batch, *positions, classes)`` output (1 for
    ``(batch, classes)``)."""
    return math.prod(a.shape[1:-1])


def _target_weights(a: Array, y: Array, mask: Array | None) -> tuple[Array, Array] | None:
    """For integer labels or a padding mask: 0/1 weights of each position
    ``(batch, *positions, 1)`` (a target there, and a real position) and their count
    per example ``(batch, 1, ..., 1)``, at least 1. None: every position counts, the
    plain mean over positions."""
    integer = jnp.issubdtype(y.dtype, jnp.integer)
    if not integer and mask is None:
        return None
    w = (y >= 0) if integer else jnp.ones(a.shape[:-1], bool)
    if mask is not None and a.ndim > 2:
        w = w & mask.reshape(mask.shape + (1,) * (a.ndim - 3))
    w = w.astype(a.dtype)[..., None]
    n = jnp.sum(w, axis=tuple(range(1, a.ndim)), keepdims=True)
    return w, jnp.maximum(n, 1)


def _softmax_xent(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    t = _targets(a, y)
    token = -jnp.sum(t * jax.nn.log_softmax(a, axis=-1), axis=-1)
    weights = _target_weights(a, y, mask)
    if weights is not None:
        w, n = weights
        token = _masked(token, w[..., 0])
        value = jnp.sum(token / n[..., 0], axis=tuple(range(1, token.ndim)))
    else:
        value = jnp.mean(token, axis=tuple(range(1, token.ndim))) if token.ndim > 1 else token
    bad = _outside(a, y)
    return value if bad is None else _poisoned(value, jnp.any(bad, axis=tuple(range(1, y.ndim))))


def _softmax_xent_delta(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    t = _targets(a, y)
    delta = jax.nn.softmax(a, axis=-1) * jnp.sum(t, axis=-1, keepdims=True) - t
    weights = _target_weights(a, y, mask)
    if weights is not None:
        w, n = weights
        return _poisoned(_masked(delta, w) / n, _outside(a, y))
    return delta / _positions(a) if a.ndim > 2 else delta


# --- Hessian square roots (curvature) -------------------------------------------


def _unit_columns(a: Array, scale: Array | float) -> Array:
    """``scale`` times the K = prod(out) unit vectors of one example, ``(K, batch, *out)``
    (``scale`` may vary per element, shaped like ``a``)."""
    k = _elements(a)
    eye = jnp.eye(k, dtype=a.dtype).reshape((k, 1, *a.shape[1:]))
    scale = jnp.broadcast_to(jnp.asarray(scale, a.dtype), a.shape)
    return eye * scale[None]


def _normal_columns(
    key: Array, a: Array, m: int, scale: Array | float, mask: Array | None = None
) -> Array:
    cols = jr.normal(key, (m, *a.shape), a.dtype) * (scale / math.sqrt(m))
    w = _weights(mask, a)
    return cols if w is None else cols * w[None]


def _mse_root(a: Array, mask: Array | None) -> Array | float:
    """``√(2/K)`` per element (K the example's real elements; 0 at padded positions)."""
    if mask is None:
        return math.sqrt(2.0 / _elements(a))
    return jnp.sqrt(2.0 / _counts(a, mask)) * mask.astype(a.dtype).reshape(
        mask.shape + (1,) * (a.ndim - 2)
    )


def _mse_hvp(a: Array, y: Array, u: Array, *, mask: Array | None = None) -> Array:
    if mask is None:
        return (2.0 / _elements(a)) * u
    return 2 * _masked(u, _weights(mask, a)) / _counts(a, mask)


def _bce_slope(a: Array, mask: Array | None = None) -> Array:
    p = jax.nn.sigmoid(a)
    return _masked(p * (1 - p), _weights(mask, a))


def _bce_sample(key: Array, a: Array, y: Array, m: int, *, mask: Array | None = None) -> Array:
    p = jax.nn.sigmoid(a)
    draw = jr.bernoulli(key, p, (m, *a.shape)).astype(a.dtype)
    cols = (p[None] - draw) / math.sqrt(m)
    w = _weights(mask, a)
    return cols if w is None else cols * w[None]


def _token_weights(a: Array, y: Array, mask: Array | None = None) -> Array:
    """``Σ_k y_tk / T`` per position, ``(batch, *positions, 1)``: the scale of each
    position's softmax Hessian in ℓ_i (with labels ``-1`` or a mask: ``w_t Σ_k y_tk /
    n_i``, n_i the example's target positions)."""
    t = _targets(a, y)
    weights = _target_weights(a, y, mask)
    if weights is not None:
        w, n = weights
        return _poisoned(jnp.sum(t, axis=-1, keepdims=True) * (w / n), _outside(a, y))
    return jnp.sum(t, axis=-1, keepdims=True) / _positions(a)


def _softmax_sqrt_hessian(a: Array, y: Array, *, mask: Array | None = None) -> Array:
    """Columns ``(T·V, batch, *positions, V)``: for position t and class c,
    ``√(w_t p_tc)(e_c − p_t)`` at position t, zero elsewhere."""
    p = jax.nn.softmax(a, axis=-1)
    v = a.shape[-1]
    positions = _positions(a)
    root = jnp.sqrt(_token_weights(a, y, mask) * p)  # (batch, *pos, V)
    eye = jnp.eye(v, dtype=a.dtype)
    # per position: cols[c, ..., k] = root_c (δ_ck − p_k)
    cols = jnp.moveaxis(root, -1, 0)[..., None] * (
        eye.reshape((v,) + (1,) * (a.ndim - 1) + (v,)) - p[None]
    )
    if positions == 1:
        return cols
    # one column set per position: zero outside it
    flat = cols.reshape(v, a.shape[0], positions, v)
    at = jnp.eye(positions, dtype=a.dtype)  # (position of the set, position)
    sets = at[:, None, None, :, None] * flat[None]  # (T, V, batch, T, V)
    return sets.reshape((positions * v, *a.shape))


def _softmax_sample(key: Array, a: Array, y: Array, m: int, *, mask: Array | None = None) -> Array:
    p = jax.nn.softmax(a, axis=-1)
    draw = jr.categorical(key, jax.nn.log_softmax(a, axis=-1), axis=-1, shape=(m, *a.shape[:-1]))
    onehot = jax.nn.one_hot(draw, a.shape[-1], dtype=a.dtype)
    return jnp.sqrt(_token_weights(a, y, mask))[None] * (p[None] - onehot) / math.sqrt(m)


def _softmax_hvp(a: Array, y: Array, u: Array, *, mask: Array | None = None) -> Array:
    p = jax.nn.softmax(a, axis=-1)
    pu = p * u
    return _token_weights(a, y, mask) * (pu - p * jnp.sum(pu, axis=-1, keepdims=True))


def _in_float32(fn: Callable[..., Array], *, keep_dtype: bool) -> Callable[..., Array]:
    """``fn(a, y, ...)`` computed in float32 when the outputs ``a`` are low precision
    (mixed precision: bfloat16, float16 logits), its result in ``a``'s dtype when
    ``keep_dtype`` (δ_L) or in float32 (the loss's value); the plain ``fn`` otherwise."""

    @functools.wraps(fn)
    def wrapped(a: Array, y: Array, *args: Any, **kw: Any) -> Array:
        if not is_low(a.dtype):
            return fn(a, y, *args, **kw)
        out = fn(a.astype(jnp.float32), widen(y), *args, **kw)
        return out.astype(a.dtype) if keep_dtype else out

    return wrapped


def _mixed(loss: Loss) -> Loss:
    """A built-in loss whose value and δ_L compute in float32 from low-precision
    outputs (δ_L handed back in the outputs' dtype)."""
    return dataclasses.replace(
        loss,
        per_example=_in_float32(loss.per_example, keep_dtype=False),
        delta=_in_float32(loss.delta, keep_dtype=True),
        reduced_delta=None
        if loss.reduced_delta is None
        else _in_float32(loss.reduced_delta, keep_dtype=True),
    )


HALF_SSE = Loss(
    "half_sse",
    _half_sse,
    lambda a, y, *, mask=None: _masked(a - y, _weights(mask, a)),
    "sum",
    description="ℓ_i = ½ Σ_k (a_ik − y_ik)², summed over the batch; δ_L = a − y",
    sqrt_hessian=lambda a, y, *, mask=None: _unit_columns(
        a, _masked(jnp.ones_like(a), _weights(mask, a))
    ),
    sample_sqrt_hessian=lambda key, a, y, m, *, mask=None: _normal_columns(key, a, m, 1.0, mask),
    hessian_vp=lambda a, y, u, *, mask=None: _masked(u, _weights(mask, a)),
    masked=True,
)
MSE = Loss(
    "mse",
    _mse,
    _mse_delta,
    "mean",
    description="ℓ_i = mean_k (a_ik − y_ik)², averaged over the batch; δ_L = 2(a − y)/(K·B)",
    reduced_delta=_mse_reduced_delta,
    sqrt_hessian=lambda a, y, *, mask=None: _unit_columns(a, _mse_root(a, mask)),
    sample_sqrt_hessian=lambda key, a, y, m, *, mask=None: _normal_columns(
        key, a, m, _mse_root(a, mask), mask
    ),
    hessian_vp=_mse_hvp,
    masked=True,
)
SIGMOID_BCE = Loss(
    "sigmoid_bce",
    _sigmoid_bce,
    _bce_delta,
    "sum",
    description="ℓ_i = Σ_k softplus(a_ik) − y_ik a_ik from logits, summed; δ_L = σ(a) − y",
    sqrt_hessian=lambda a, y, *, mask=None: _unit_columns(a, jnp.sqrt(_bce_slope(a, mask))),
    sample_sqrt_hessian=_bce_sample,
    hessian_vp=lambda a, y, u, *, mask=None: _bce_slope(a, mask) * u,
    masked=True,
)
SOFTMAX_XENT = Loss(
    "softmax_xent",
    _softmax_xent,
    _softmax_xent_delta,
    "mean",
    integer_labels=True,
    description=(
        "ℓ_i = −Σ_k y_ik log softmax(a_i)_k from logits (integer labels, -1 for no "
        "target, or one-hot/probability targets), averaged; δ_L = (softmax(a)·Σy − y)/B"
    ),
    sqrt_hessian=_softmax_sqrt_hessian,
    sample_sqrt_hessian=_softmax_sample,
    hessian_vp=_softmax_hvp,
    masked=True,
)

HALF_SSE, MSE, SIGMOID_BCE, SOFTMAX_XENT = (
    _mixed(loss) for loss in (HALF_SSE, MSE, SIGMOID_BCE, SOFTMAX_XENT)
)
_LOSSES = {loss.name: loss for loss in (HALF_SSE, MSE, SIGMOID_BCE, SOFTMAX_XENT)}


def loss_names() -> tuple[str, ...]:
    """The names of the built-in losses, sorted."""
    return tuple(sorted(_LOSSES))


def get_loss(loss: str | Loss) -> Loss:
    """A :class:`Loss` from its name (or the object itself), with a clear error."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in _LOSSES:
        return _LOSSES[loss]
    known = ", ".join(loss_names())
    raise ValueError(f"unknown loss {loss!r}; known losses: {known} (or pass a jbp.Loss)")
