"""The objective and its gradient by the δ equations alone.

``backprop(net, loss)`` returns a function with the call shape of autodiff's
``grad(objective(net, loss))``, ``(params, x, y) -> grads``, computed by a forward pass
that keeps each layer's cache and a backward pass that runs each layer's δ
rule in reverse. No autodiff transformation is used on this path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from ._checks import check_context, check_params, check_x, check_y, params_dtype
from ._losses import Loss, get_loss
from .layers import Sequential
from .layers._base import Context

Array = jax.Array
Params = Any


def check_net(net: Any) -> Sequential:
    """``net`` is a :class:`Sequential` (a bare layer or list is wrapped)."""
    if isinstance(net, Sequential):
        return net
    if isinstance(net, (list, tuple)):
        return Sequential(net)
    if all(callable(getattr(net, m, None)) for m in ("init", "forward", "backward")):
        return Sequential([net])
    raise TypeError(f"`net` must be a jbp.Sequential (e.g. from jbp.mlp), got {type(net).__name__}")


class Batch(NamedTuple):
    """A checked call: ``x`` and ``y`` batched, the forward's :class:`Context` (padding
    mask, dropout key) and the loss with the mask bound (where the output keeps the
    sequence axis)."""

    x: Array
    y: Array
    context: Context
    loss: Loss


def keeps_positions(out_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> bool:
    """Whether an output ``(batch, T, ...)`` keeps the input's sequence axis (so a
    padding mask applies to the loss too)."""
    return len(out_shape) >= 3 and len(x_shape) >= 2 and out_shape[1] == x_shape[1]


def prepare(
    net: Sequential,
    loss: Loss,
    params: Params,
    x: Any,
    y: Any,
    mask: Any = None,
    dropout_key: Any = None,
) -> Batch:
    """Check every argument; return ``x`` and ``y`` batched (single examples get a
    batch axis of 1), the context and the loss for this batch."""
    check_params(net, params)
    x, single = check_x(net, params, x)
    context = check_context(net, x, mask, dropout_key, single)
    out_shape = (x.shape[0], *net.output_shape(tuple(x.shape[1:])))
    if len(out_shape) < 2:
        raise ValueError(
            f"the network output has shape {out_shape}; a loss needs (batch, outputs...)"
        )
    y = check_y(loss, out_shape, y, single, params_dtype(params) or x.dtype)
    mask = context.mask if keeps_positions(out_shape, tuple(x.shape)) else None
    return Batch(x, y, context, loss.with_mask(mask))


def forward_backward(
    net: Sequential, params: Params, batch: Batch
) -> tuple[Array, tuple[Params, ...], Array, tuple[Any, ...]]:
    """One forward pass and one backward pass on a checked batch.

    Returns:
      ``(C, grads, out, caches)``: the reduced loss, the gradient (one entry per
      layer), the output ``(batch, out)`` and the per-layer caches.
    """
    loss = batch.loss
    out, caches = net.forward(params, batch.x, batch.context)
    grads, _ = net.backward(params, caches, loss.batch_delta(out, batch.y))
    return loss(out, batch.y), grads, out, caches


def _like(params: Params, grads: tuple[Params, ...]) -> Params:
    return list(grads) if isinstance(params, list) else grads


_CALL = """``mask`` (keyword): the padding mask ``(batch, T)`` of a batch of
      sequences, boolean, True at real positions, each row a prefix (right
      padding): padded positions contribute nothing and attention never attends
      to them. ``dropout_key`` (keyword): a PRNG key that switches every
      :class:`jbp.Dropout` on (default: off)."""


def objective(net: Any, loss: str | Loss) -> Callable[..., Array]:
    """The scalar objective ``C(params, x, y)``; its autodiff gradient is the reference.

    Args:
      net: a :class:`Sequential` network.
      loss: a loss name (``"half_sse"``, ``"mse"``, ``"sigmoid_bce"``,
        ``"softmax_xent"``) or a :class:`Loss`.

    Returns:
      ``f(params, x, y, *, mask=None, dropout_key=None) -> C``, a scalar: ``Σ_i ℓ_i``
      or ``mean_i ℓ_i`` by the loss's reduction. ``x`` is ``(batch, fan_in)`` or
      ``(fan_in,)``; ``y`` is ``(batch, out)`` (or ``(out,)``), or integer labels
      for ``softmax_xent`` (``-1``: no target at that position). MASK_AND_KEY
    """
    net = check_net(net)
    loss = get_loss(loss)

    def objective_fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None
    ) -> Array:
        b = prepare(net, loss, params, x, y, mask, dropout_key)
        out, _ = net.forward(params, b.x, b.context)
        return b.loss(out, b.y)

    return objective_fn


def value_and_backprop(net: Any, loss: str | Loss) -> Callable[..., tuple[Array, Params]]:
    """Like :func:`backprop`, also returning the objective: ``(C, grads)``.

    The δ equations: ``δ_L = ∂C/∂a_L ⊙ f'(z_L)``, ``δ_l = (δ_{l+1} w_{l+1}ᵀ) ⊙
    f'(z_l)``, ``∂C/∂w_l = a_{l-1}ᵀ δ_l``, ``∂C/∂b_l = Σ_batch δ_l``.
    """
    net = check_net(net)
    loss = get_loss(loss)

    def value_and_backprop_fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None
    ) -> tuple[Array, Params]:
        b = prepare(net, loss, params, x, y, mask, dropout_key)
        value, grads, _, _ = forward_backward(net, params, b)
        return value, _like(params, grads)

    return value_and_backprop_fn


def backprop(net: Any, loss: str | Loss) -> Callable[..., Params]:
    """The gradient of :func:`objective` by hand-written backprop (δ equations only).

    Args:
      net: a :class:`Sequential` network.
      loss: a loss name or :class:`Loss`.

    Returns:
      ``grad_fn(params, x, y, *, mask=None, dropout_key=None) -> grads`` with the
      call shape of ``grad(objective(net, loss))`` (JAX autodiff): ``grads`` is
      shaped like ``params`` and is ``∂C/∂θ`` of the reduced loss (sum or mean over
      the batch). Composes with ``jit``, ``vmap`` (e.g. ``in_axes=(None, 0, 0)``
      gives unscaled per-example gradients) and ``jacfwd``. MASK_AND_KEY

    Example:
      >>> import jax, jax.numpy as jnp, jbp
      >>> net = jbp.mlp([3, 4, 2], "tanh")
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.ones((5, 3), jnp.float32), jnp.zeros((5, 2), jnp.float32)
      >>> grads = jbp.backprop(net, "half_sse")(params, x, y)
      >>> grads[0]["w"].shape
      (3, 4)
    """
    vg = value_and_backprop(net, loss)

    def backprop_fn(
        params: Params, x: Any, y: Any, *, mask: Any = None, dropout_key: Any = None
    ) -> Params:
        return vg(params, x, y, mask=mask, dropout_key=dropout_key)[1]

    return backprop_fn


for _fn in (objective, backprop):
    assert _fn.__doc__ is not None
    _fn.__doc__ = _fn.__doc__.replace("MASK_AND_KEY", _CALL)
