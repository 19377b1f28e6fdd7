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

Logit losses (``sigmoid_bce``, ``softmax_xent``) compute their value with
softplus / logsumexp and their δ in the fused form ``σ(a) − y`` /
``softmax(a)·Σy − y``, never through ``log(σ(·))``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr

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
    """

    name: str
    per_example: Callable[[Array, Array], Array]
    delta: Callable[[Array, Array], Array]
    reduction: str
    integer_labels: bool = False
    description: str = ""
    reduced_delta: Callable[[Array, Array], Array] | None = None
    sqrt_hessian: Callable[[Array, Array], Array] | None = None
    sample_sqrt_hessian: Callable[[Array, Array, Array, int], Array] | None = None
    hessian_vp: Callable[[Array, Array, Array], Array] | None = None

    def __post_init__(self) -> None:
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"`reduction` must be 'sum' or 'mean', got {self.reduction!r}")

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


def _half_sse(a: Array, y: Array) -> Array:
    r = a - y
    return 0.5 * jnp.sum(r * r, axis=_example_axes(a))


def _mse(a: Array, y: Array) -> Array:
    r = a - y
    return jnp.mean(r * r, axis=_example_axes(a))


def _elements(a: Array) -> int:
    return math.prod(a.shape[1:])


def _mse_delta(a: Array, y: Array) -> Array:
    return (2.0 / _elements(a)) * (a - y)


def _mse_reduced_delta(a: Array, y: Array) -> Array:
    """2(a − y)/(K·B) in JAX autodiff's order, as XLA runs it: (1/B)·(1/K) in the
    array's dtype (XLA turns the division by the constant K into a product)."""
    one = jnp.ones((), a.dtype)
    k = (one / a.shape[0]) * (one / _elements(a))
    return 2 * ((a - y) * k)


def _sigmoid_bce(a: Array, y: Array) -> Array:
    return jnp.sum(jax.nn.softplus(a) - y * a, axis=_example_axes(a))


def _targets(a: Array, y: Array) -> Array:
    """Integer labels ``(batch, *positions)`` to one-hot ``(batch, *positions,
    classes)``; else ``y``."""
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jax.nn.one_hot(y, a.shape[-1], dtype=a.dtype)
    return y


def _positions(a: Array) -> int:
    """Positions per example of a ``(batch, *positions, classes)`` output (1 for
    ``(batch, classes)``)."""
    return math.prod(a.shape[1:-1])


def _softmax_xent(a: Array, y: Array) -> Array:
    t = _targets(a, y)
    token = -jnp.sum(t * jax.nn.log_softmax(a, axis=-1), axis=-1)
    return jnp.mean(token, axis=tuple(range(1, token.ndim))) if token.ndim > 1 else token


def _softmax_xent_delta(a: Array, y: Array) -> Array:
    t = _targets(a, y)
    delta = jax.nn.softmax(a, axis=-1) * jnp.sum(t, axis=-1, keepdims=True) - t
    return delta / _positions(a) if a.ndim > 2 else delta


# --- Hessian square roots (curvature) -------------------------------------------


def _unit_columns(a: Array, scale: Array | float) -> Array:
    """``scale`` times the K = prod(out) unit vectors of one example, ``(K, batch, *out)``
    (``scale`` may vary per element, shaped like ``a``)."""
    k = _elements(a)
    eye = jnp.eye(k, dtype=a.dtype).reshape((k, 1, *a.shape[1:]))
    scale = jnp.broadcast_to(jnp.asarray(scale, a.dtype), a.shape)
    return eye * scale[None]


def _normal_columns(key: Array, a: Array, m: int, scale: float) -> Array:
    return (scale / math.sqrt(m)) * jr.normal(key, (m, *a.shape), a.dtype)


def _bce_slope(a: Array) -> Array:
    p = jax.nn.sigmoid(a)
    return p * (1 - p)


def _bce_sample(key: Array, a: Array, y: Array, m: int) -> Array:
    p = jax.nn.sigmoid(a)
    draw = jr.bernoulli(key, p, (m, *a.shape)).astype(a.dtype)
    return (p[None] - draw) / math.sqrt(m)


def _token_weights(a: Array, y: Array) -> Array:
    """``Σ_k y_tk / T`` per position, ``(batch, *positions, 1)``: the scale of each
    position's softmax Hessian in ℓ_i."""
    t = _targets(a, y)
    return jnp.sum(t, axis=-1, keepdims=True) / _positions(a)


def _softmax_sqrt_hessian(a: Array, y: Array) -> Array:
    """Columns ``(T·V, batch, *positions, V)``: for position t and class c,
    ``√(w_t p_tc)(e_c − p_t)`` at position t, zero elsewhere."""
    p = jax.nn.softmax(a, axis=-1)
    v = a.shape[-1]
    positions = _positions(a)
    root = jnp.sqrt(_token_weights(a, y) * p)  # (batch, *pos, V)
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


def _softmax_sample(key: Array, a: Array, y: Array, m: int) -> Array:
    p = jax.nn.softmax(a, axis=-1)
    draw = jr.categorical(key, jax.nn.log_softmax(a, axis=-1), axis=-1, shape=(m, *a.shape[:-1]))
    onehot = jax.nn.one_hot(draw, a.shape[-1], dtype=a.dtype)
    return jnp.sqrt(_token_weights(a, y))[None] * (p[None] - onehot) / math.sqrt(m)


def _softmax_hvp(a: Array, y: Array, u: Array) -> Array:
    p = jax.nn.softmax(a, axis=-1)
    pu = p * u
    return _token_weights(a, y) * (pu - p * jnp.sum(pu, axis=-1, keepdims=True))


HALF_SSE = Loss(
    "half_sse",
    _half_sse,
    lambda a, y: a - y,
    "sum",
    description="ℓ_i = ½ Σ_k (a_ik − y_ik)², summed over the batch; δ_L = a − y",
    sqrt_hessian=lambda a, y: _unit_columns(a, 1.0),
    sample_sqrt_hessian=lambda key, a, y, m: _normal_columns(key, a, m, 1.0),
    hessian_vp=lambda a, y, u: u,
)
MSE = Loss(
    "mse",
    _mse,
    _mse_delta,
    "mean",
    description="ℓ_i = mean_k (a_ik − y_ik)², averaged over the batch; δ_L = 2(a − y)/(K·B)",
    reduced_delta=_mse_reduced_delta,
    sqrt_hessian=lambda a, y: _unit_columns(a, math.sqrt(2.0 / _elements(a))),
    sample_sqrt_hessian=lambda key, a, y, m: _normal_columns(
        key, a, m, math.sqrt(2.0 / _elements(a))
    ),
    hessian_vp=lambda a, y, u: (2.0 / _elements(a)) * u,
)
SIGMOID_BCE = Loss(
    "sigmoid_bce",
    _sigmoid_bce,
    lambda a, y: jax.nn.sigmoid(a) - y,
    "sum",
    description="ℓ_i = Σ_k softplus(a_ik) − y_ik a_ik from logits, summed; δ_L = σ(a) − y",
    sqrt_hessian=lambda a, y: _unit_columns(a, jnp.sqrt(_bce_slope(a))),
    sample_sqrt_hessian=_bce_sample,
    hessian_vp=lambda a, y, u: _bce_slope(a) * u,
)
SOFTMAX_XENT = Loss(
    "softmax_xent",
    _softmax_xent,
    _softmax_xent_delta,
    "mean",
    integer_labels=True,
    description=(
        "ℓ_i = −Σ_k y_ik log softmax(a_i)_k from logits (integer labels or "
        "one-hot/probability targets), averaged; δ_L = (softmax(a)·Σy − y)/B"
    ),
    sqrt_hessian=_softmax_sqrt_hessian,
    sample_sqrt_hessian=_softmax_sample,
    hessian_vp=_softmax_hvp,
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
