"""Per-example gradient analysis from the δ equations, at the cost of one backward pass.

For a batch, the backward pass already holds every example's activation a_i
and δ_i at every layer. From them each parameterised layer forms, without
materialising g_i = ∂ℓ_i/∂θ:

- ‖g_i‖² (Dense: ‖a_i‖²‖δ_i‖² + ‖δ_i‖²),
- Σ_i g_i² elementwise (Dense: (a²)ᵀ(δ²)),
- Σ_i c_i g_i for per-example weights c (Dense: aᵀ(c ⊙ δ)), which gives
  clipping in one backward pass plus one re-weighted weight-gradient pass.

Per-example gradients are always unscaled, ``g_i = ∂ℓ_i/∂θ``; the batch
gradient is ``Σ_i g_i`` (``"sum"`` losses) or ``mean_i g_i`` (``"mean"``).
Wrap the returned functions in ``jax.jit``: the weight-gradient matmuls that
a quantity does not need are then removed by XLA.

A user layer takes part by implementing ``per_example_grads(params, cache,
delta_out)``; ``per_example_sq_norms``, ``sum_grad_squared`` and
``weighted_grads`` are optional (without them jbp materialises that layer's
g_i). ``delta_out`` holds the per-example ``∂ℓ_i/∂out`` in row ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._backprop import check_net, prepare
from ._layers import Sequential
from ._losses import Loss, get_loss

Array = jax.Array
Params = Any


def _has_params(p: Params) -> bool:
    return bool(jtu.tree_leaves(p))


def _per_example_method(layer: Any, name: str) -> Callable[..., Any] | None:
    """The layer's own ``name`` method, or None (then it is formed from g_i)."""
    return getattr(layer, name, None)


def _grads_method(layer: Any) -> Callable[..., Any]:
    """The layer's ``per_example_grads``, which every layer with params needs."""
    method = getattr(layer, "per_example_grads", None)
    if method is None:
        raise TypeError(
            f"layer {layer!r} has parameters but no per_example_grads(params, cache, delta_out); "
            "implement it to use per-example analysis"
        )
    return method


def _backward_deltas(
    net: Sequential, loss: Loss, params: Params, x: Array, y: Array
) -> tuple[tuple[Any, ...], list[Array | None]]:
    """Forward, then the δ recursion with the unscaled per-example output δ.

    Returns the caches and, per layer, ``delta_out`` = ∂(Σ_i ℓ_i)/∂out (row i
    is example i's ∂ℓ_i/∂out). ``None`` for layers before the first with params.
    """
    out, caches = net.forward(params, x)
    delta = loss.delta(out, y)
    n = len(net.layers)
    first = next((i for i in range(n) if _has_params(params[i])), n)
    delta_outs: list[Array | None] = [None] * n
    for i in reversed(range(first, n)):
        delta_outs[i] = delta
        if i > first:
            _, delta = net.layers[i].backward(params[i], caches[i], delta)
    return caches, delta_outs


def _layer_quantity(net, params, caches, delta_outs, name: str, *extra: Any) -> list[Any]:
    """``name`` for each layer: the layer's own method, or from its g_i."""
    results: list[Any] = []
    for layer, p, cache, d in zip(net.layers, params, caches, delta_outs, strict=True):
        if not _has_params(p):
            results.append(None)
            continue
        method = _per_example_method(layer, name)
        if method is not None:
            results.append(method(p, cache, d, *extra))
            continue
        g = _grads_method(layer)(p, cache, d)
        if name == "per_example_sq_norms":
            results.append(
                sum(
                    jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1)
                    for leaf in jtu.tree_leaves(g)
                )
            )
        elif name == "sum_grad_squared":
            results.append(jtu.tree_map(lambda leaf: jnp.sum(leaf * leaf, axis=0), g))
        elif name == "weighted_grads":
            results.append(jtu.tree_map(partial(jnp.tensordot, extra[0], axes=1), g))
        else:  # pragma: no cover - internal names only
            raise AssertionError(name)
    return results


def _fill(params: Params, per_layer: list[Any]) -> Params:
    out = tuple({} if q is None else q for q in per_layer)
    return list(out) if isinstance(params, list) else out


def _setup(net: Any, loss: str | Loss) -> tuple[Sequential, Loss]:
    return check_net(net), get_loss(loss)


def per_example_grads(net: Any, loss: str | Loss) -> Callable[[Params, Any, Any], Params]:
    """Every example's gradient ``g_i = ∂ℓ_i/∂θ`` (unscaled).

    Returns:
      ``fn(params, x, y) -> grads``: like ``params`` with a leading batch axis
      on every leaf (Dense ``w``: ``(batch, fan_in, fan_out)``). The batch
      gradient is the sum or mean over that axis, by the loss's reduction. A
      single example ``x`` of shape ``(fan_in,)`` gives a batch axis of 1.
    """
    net, loss = _setup(net, loss)

    def fn(params: Params, x: Any, y: Any) -> Params:
        x, y = prepare(net, loss, params, x, y)
        caches, deltas = _backward_deltas(net, loss, params, x, y)
        per_layer = [
            None if d is None or not _has_params(p) else _grads_method(layer)(p, cache, d)
            for layer, p, cache, d in zip(net.layers, params, caches, deltas, strict=True)
        ]
        return _fill(params, per_layer)

    return fn


def _sq_norms(net, loss, params, x, y) -> tuple[Array, tuple[Any, ...], list[Any]]:
    """Per-layer squared norms ``(batch, layers)`` plus the caches and δs."""
    caches, deltas = _backward_deltas(net, loss, params, x, y)
    per_layer = _layer_quantity(net, params, caches, deltas, "per_example_sq_norms")
    zeros = jnp.zeros((x.shape[0],), x.dtype)
    sq = jnp.stack([zeros if q is None else q for q in per_layer], axis=1)
    return sq, caches, deltas


def per_example_norms(
    net: Any, loss: str | Loss, *, per_layer: bool = False
) -> Callable[[Params, Any, Any], Array]:
    """‖g_i‖ for every example, without forming g_i (Dense: ‖a_i‖²‖δ_i‖²).

    Args:
      net, loss: the network and loss.
      per_layer: return one norm per layer instead of the total.

    Returns:
      ``fn(params, x, y)``: ``(batch,)`` norms over all parameters, or
      ``(batch, layers)`` per-layer norms (0 for parameterless layers) whose
      squares add up to the squared total.
    """
    net, loss = _setup(net, loss)

    def fn(params: Params, x: Any, y: Any) -> Array:
        x, y = prepare(net, loss, params, x, y)
        sq, _, _ = _sq_norms(net, loss, params, x, y)
        return jnp.sqrt(sq) if per_layer else jnp.sqrt(jnp.sum(sq, axis=1))

    return fn


def sum_grad_squared(net: Any, loss: str | Loss) -> Callable[[Params, Any, Any], Params]:
    """The elementwise second moment ``Σ_i g_i²`` (BackPACK's SumGradSquared).

    Returns:
      ``fn(params, x, y)``: like ``params``; Dense ``w``: ``(a²)ᵀ(δ²)``.
    """
    net, loss = _setup(net, loss)

    def fn(params: Params, x: Any, y: Any) -> Params:
        x, y = prepare(net, loss, params, x, y)
        caches, deltas = _backward_deltas(net, loss, params, x, y)
        return _fill(params, _layer_quantity(net, params, caches, deltas, "sum_grad_squared"))

    return fn


def grad_variance(
    net: Any, loss: str | Loss, *, ddof: int = 0
) -> Callable[[Params, Any, Any], Params]:
    """The elementwise variance of the per-example gradients g_i over the batch.

    ``Var = (Σ_i g_i² − B·ḡ²) / (B − ddof)`` with ``ḡ = mean_i g_i``
    (``ddof=0``: population variance, BackPACK's Variance; ``ddof=1``:
    unbiased). Clamped at 0 against round-off.

    Returns:
      ``fn(params, x, y)``: like ``params``.
    """
    net, loss = _setup(net, loss)
    if ddof not in (0, 1):
        raise ValueError(f"`ddof` must be 0 or 1, got {ddof!r}")

    def fn(params: Params, x: Any, y: Any) -> Params:
        x, y = prepare(net, loss, params, x, y)
        b = x.shape[0]
        if b - ddof < 1:
            raise ValueError(
                f"`x` has batch {b}; a variance with ddof={ddof} needs at least {ddof + 1}"
            )
        caches, deltas = _backward_deltas(net, loss, params, x, y)
        sq = _layer_quantity(net, params, caches, deltas, "sum_grad_squared")
        ones = jnp.ones((b,), x.dtype)
        total = _layer_quantity(net, params, caches, deltas, "weighted_grads", ones)

        def var(s: Array, t: Array) -> Array:
            mean = t / b
            return jnp.maximum((s - b * mean * mean) / (b - ddof), 0)

        return _fill(
            params,
            [
                None if s is None else jtu.tree_map(var, s, t)
                for s, t in zip(sq, total, strict=True)
            ],
        )

    return fn


def _check_max_norm(max_norm: Any) -> None:
    if isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool):
        if math.isnan(max_norm) or max_norm <= 0:
            raise ValueError(f"`max_norm` must be positive (or math.inf), got {max_norm!r}")
    elif not hasattr(max_norm, "dtype"):
        raise TypeError(f"`max_norm` must be a positive number, got {type(max_norm).__name__}")


def clip_factors(norms: Array, max_norm: Any) -> Array:
    """``min(1, max_norm/‖g_i‖)``, written without dividing by zero or by inf."""
    over = norms > max_norm
    return jnp.where(over, max_norm / jnp.where(over, norms, 1), jnp.ones_like(norms))


def clipped_grad(
    net: Any, loss: str | Loss, max_norm: float
) -> Callable[[Params, Any, Any], tuple[Params, Array]]:
    """The per-example-clipped gradient in one backward pass (ghost clipping).

    ``Σ_i min(1, max_norm/‖g_i‖) g_i`` for ``"sum"`` losses, and that over B
    for ``"mean"`` losses. The norms come from (a_i, δ_i); the clipped sum is
    one re-weighted weight-gradient pass ``aᵀ(c ⊙ δ)`` per layer.

    Args:
      net, loss: the network and loss.
      max_norm: the clipping threshold (``math.inf`` gives the plain gradient).

    Returns:
      ``fn(params, x, y) -> (grads, norms)``: ``grads`` like ``params``;
      ``norms`` the unclipped ``‖g_i‖``, ``(batch,)``.
    """
    net, loss = _setup(net, loss)
    _check_max_norm(max_norm)

    def fn(params: Params, x: Any, y: Any) -> tuple[Params, Array]:
        x, y = prepare(net, loss, params, x, y)
        sq, caches, deltas = _sq_norms(net, loss, params, x, y)
        norms = jnp.sqrt(jnp.sum(sq, axis=1))
        c = clip_factors(norms, max_norm) * loss.scale(x.shape[0])
        per_layer = _layer_quantity(net, params, caches, deltas, "weighted_grads", c)
        return _fill(params, per_layer), norms

    return fn


def dp_grad(
    net: Any, loss: str | Loss, max_norm: float, noise_multiplier: float
) -> Callable[[Params, Any, Any, Array], tuple[Params, Array]]:
    """A DP-SGD gradient: clip each g_i to ``max_norm``, sum, add Gaussian noise.

    ``(Σ_i clip(g_i) + N(0, (noise_multiplier·max_norm)² I)) · s`` with
    ``s = 1`` for ``"sum"`` losses and ``1/B`` for ``"mean"`` losses (Abadi et
    al. 2016). Feed the result to any optax optimiser's ``update``.

    Returns:
      ``fn(params, x, y, key) -> (grads, norms)``.
    """
    net, loss = _setup(net, loss)
    _check_max_norm(max_norm)
    if not math.isfinite(max_norm):
        raise ValueError("`max_norm` must be finite for DP-SGD: the noise scales with it")
    if not isinstance(noise_multiplier, (int, float)) or noise_multiplier < 0:
        raise ValueError(f"`noise_multiplier` must be a number ≥ 0, got {noise_multiplier!r}")
    clipped = clipped_grad(net, loss, max_norm)

    def fn(params: Params, x: Any, y: Any, key: Array) -> tuple[Params, Array]:
        grads, norms = clipped(params, x, y)
        scale = loss.scale(norms.shape[0])
        leaves, treedef = jtu.tree_flatten(grads)
        keys = jax.random.split(key, max(len(leaves), 1))
        std = noise_multiplier * max_norm * scale
        noisy = [
            g + std * jax.random.normal(k, g.shape, g.dtype)
            for g, k in zip(leaves, keys, strict=False)
        ]
        return jtu.tree_unflatten(treedef, noisy), norms

    return fn


class NoiseScale(NamedTuple):
    """The simple gradient noise scale and its parts (McCandlish et al. 2018).

    Attributes:
      b_simple: ``trace_cov / grad_sq_norm``, the critical-batch-size estimate.
      trace_cov: unbiased ``tr(Σ) = B/(B−1) (mean_i ‖g_i‖² − ‖ḡ‖²)``.
      grad_sq_norm: unbiased ``‖G‖² = ‖ḡ‖² − tr(Σ)/B``.
    """

    b_simple: Array
    trace_cov: Array
    grad_sq_norm: Array


def gradient_noise_scale(
    net: Any, loss: str | Loss, *, unbiased: bool = True
) -> Callable[[Params, Any, Any], NoiseScale]:
    """B_simple = tr(Σ)/‖G‖² from per-example norms and the mean gradient.

    ``unbiased=True`` (default): the batch is a sample of a larger data
    distribution. The two-batch-size estimators of McCandlish et al. (2018,
    App. A.1) with B_small = 1 (each example's ‖g_i‖², from the δ equations)
    and B_big = B (the mean gradient ḡ of the batch): ``tr(Σ) = B/(B−1)
    (mean_i ‖g_i‖² − ‖ḡ‖²)`` and ``‖G‖² = ‖ḡ‖² − tr(Σ)/B`` are unbiased;
    their ratio is not (and ``‖G‖²`` may come out negative on small batches,
    or whenever the true gradient is small: average the two parts over steps
    before dividing, as the paper does).

    ``unbiased=False``: the batch *is* the distribution, e.g. a whole
    training set, whose noise scale is then exact: ``tr(Σ) = mean_i ‖g_i‖² −
    ‖ḡ‖²`` and ``‖G‖² = ‖ḡ‖²``, both ≥ 0.

    Returns:
      ``fn(params, x, y) -> NoiseScale``; needs a batch of at least 2.
    """
    net, loss = _setup(net, loss)

    def fn(params: Params, x: Any, y: Any) -> NoiseScale:
        x, y = prepare(net, loss, params, x, y)
        b = x.shape[0]
        if b < 2:
            raise ValueError(f"`x` has batch {b}; the gradient noise scale needs at least 2")
        sq, caches, deltas = _sq_norms(net, loss, params, x, y)
        ones = jnp.full((b,), 1.0 / b, x.dtype)
        mean = _layer_quantity(net, params, caches, deltas, "weighted_grads", ones)
        mean_sq = sum(jnp.sum(leaf * leaf) for leaf in jtu.tree_leaves(mean))
        spread = jnp.mean(jnp.sum(sq, axis=1)) - mean_sq
        if unbiased:
            trace = b / (b - 1) * spread
            g2 = mean_sq - trace / b
        else:
            trace, g2 = jnp.maximum(spread, 0), mean_sq
        return NoiseScale(trace / g2, trace, g2)

    return fn
