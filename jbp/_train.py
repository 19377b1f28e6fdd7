"""Training with optax on hand-written gradients: the state, the step, evaluation.

In optax's style: a :class:`TrainState` NamedTuple ``(params, opt_state, step,
key)`` and a pure step ``(state, x, y) -> (state, metrics)`` built once by
:func:`make_step` from a network, a loss, any ``optax.GradientTransformation``
and a gradient source:

- ``"backprop"`` (default): ``jbp.value_and_backprop``, the δ equations;
- ``"autodiff"``: ``jax.value_and_grad(jbp.objective(...))``, the reference.

The step knows nothing of devices or data loading, so it runs as it is under
``jax.jit`` with sharded inputs. :func:`fit` (in ``_train_loop.py``) is the loop
around it.

Labels: the trainer is for classification. Data sets hold integer labels
``(n,)``; :func:`targets` turns them into what the loss takes: the labels
themselves for ``softmax_xent``, one-hot rows for the other losses, or a
``(n, 1)`` column of 0/1 for a network with a single output (binary).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ._backprop import check_net, objective, value_and_backprop
from ._checks import check_dtype, check_key, check_params, example_rank, params_dtype
from ._losses import Loss, get_loss
from ._per_example import dp_grad
from ._verify import Report
from .layers import Sequential, ShapeError
from .layers._conv import example_axes

Array = jax.Array
Params = Any
StepFn = Callable[["TrainState", Any, Any], tuple["TrainState", dict[str, Array]]]

GRADIENT_SOURCES = ("backprop", "autodiff")


class TrainState(NamedTuple):
    """Everything a training run carries from one step to the next.

    Attributes:
      params: the network's parameters, a tuple with one entry per layer.
      opt_state: the optimiser's state (``optimizer.init(params)``).
      step: int32 scalar, the number of updates applied so far.
      key: PRNG key, split once per step; the first half is carried on and
        the second is the step's own randomness (unused by ``Dense`` and
        ``Activation``, which draw none).
    """

    params: Params
    opt_state: optax.OptState
    step: Array
    key: Array


class TrainingError(RuntimeError):
    """Training stopped: a gradient-check mismatch or a non-finite loss.

    Attributes:
      step: the step (updates applied so far) at which it stopped.
      state: the last good :class:`TrainState` (its ``step`` equals ``step``);
        the failing update was not applied.
      report: the gradient-check :class:`Report` on a mismatch, else None.
    """

    def __init__(self, message: str, *, step: int, state: TrainState, report: Report | None = None):
        super().__init__(message)
        self.step = step
        self.state = state
        self.report = report


def check_optimizer(optimizer: Any) -> None:
    """``optimizer`` is an optax ``GradientTransformation``."""
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation such as optax.adam(1e-3), "
            f"got {optimizer!r}"
        )


def check_gradient_source(gradient_source: Any) -> str:
    """One of :data:`GRADIENT_SOURCES`."""
    if gradient_source not in GRADIENT_SOURCES:
        raise ValueError(
            f"`gradient_source` must be one of {', '.join(map(repr, GRADIENT_SOURCES))}, "
            f"got {gradient_source!r}"
        )
    return gradient_source


def init_state(net: Any, optimizer: Any, key: Array, *, dtype: Any = jnp.float32) -> TrainState:
    """A fresh :class:`TrainState`: ``net.init`` params, ``optimizer.init``, step 0.

    Args:
      net: the network.
      optimizer: an ``optax.GradientTransformation``.
      key: a PRNG key; split into the params' key and the state's key.
      dtype: the params' floating dtype.

    Returns:
      ``TrainState(params, opt_state, step=0, key)``.
    """
    net = check_net(net)
    check_optimizer(optimizer)
    check_key(key)
    return fresh_state(net, optimizer, key, check_dtype(dtype))


def fresh_state(net: Sequential, optimizer: Any, key: Array, dtype: Any) -> TrainState:
    """:func:`init_state` on arguments already checked."""
    params_key, key = jr.split(key)
    params = net.init(params_key, dtype)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), key)


def _norm(tree: Any) -> Array:
    """The global L2 norm of a pytree."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))


def make_step(
    net: Any,
    loss: str | Loss,
    optimizer: Any,
    *,
    gradient_source: str = "backprop",
    jit: bool = True,
) -> StepFn:
    """The training step ``(state, x, y) -> (state, metrics)``, built once.

    Args:
      net: the network.
      loss: a loss name or :class:`Loss`.
      optimizer: any ``optax.GradientTransformation``.
      gradient_source: ``"backprop"`` (the δ equations, default) or
        ``"autodiff"`` (``jax.grad`` of the objective, the reference).
      jit: return the step under ``jax.jit`` (default) or the pure function,
        e.g. to ``jax.jit`` it yourself with shardings.

    Returns:
      ``step(state, x, y)``: ``x`` ``(batch, fan_in)``, ``y`` the loss's
      targets for the batch (see :func:`targets`). Returns the next state and
      ``{"loss": C, "grad_norm": ‖∇C‖, "param_norm": ‖θ_next‖}``, scalars; ``C``
      is the loss reduced over the batch (sum or mean, by the loss).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jbp
      >>> net, opt = jbp.mlp([2, 4, 2]), optax.sgd(0.1)
      >>> state = jbp.init_state(net, opt, jax.random.key(0))
      >>> step = jbp.make_step(net, "softmax_xent", opt)
      >>> x = jnp.ones((3, 2), jnp.float32)
      >>> state, metrics = step(state, x, jnp.array([0, 1, 1]))
      >>> int(state.step), sorted(metrics)
      (1, ['grad_norm', 'loss', 'param_norm'])
    """
    net = check_net(net)
    loss = get_loss(loss)
    check_optimizer(optimizer)
    check_gradient_source(gradient_source)
    step = build_step(net, loss, optimizer, gradient_source)
    return jax.jit(step) if jit else step


def build_step(net: Sequential, loss: Loss, optimizer: Any, gradient_source: str) -> StepFn:
    """:func:`make_step`'s pure step, on arguments already checked."""
    if gradient_source == "backprop":
        value_and_grad = value_and_backprop(net, loss)
    else:
        value_and_grad = jax.value_and_grad(objective(net, loss))  # reference

    def step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
        key, _step_key = jr.split(state.key)
        value, grads = value_and_grad(state.params, x, y)
        return _apply(optimizer, state, key, grads, {"loss": value})

    return step


def _apply(
    optimizer: Any, state: TrainState, key: Array, grads: Any, metrics: dict[str, Array]
) -> tuple[TrainState, dict[str, Array]]:
    """The optax update with ``grads``; the next state and the step's metrics."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": _norm(grads), "param_norm": _norm(params)}
    return TrainState(params, opt_state, state.step + 1, key), metrics


def make_dp_step(
    net: Any,
    loss: str | Loss,
    optimizer: Any,
    *,
    max_norm: float,
    noise_multiplier: float,
    jit: bool = True,
) -> StepFn:
    """A DP-SGD training step (Abadi et al. 2016) on the δ equations, built once.

    Each example's gradient is clipped to ``max_norm`` without being formed
    (:func:`jbp.clipped_grad`: one backward pass and a re-weighted
    weight-gradient pass), the clipped sum gets Gaussian noise of standard
    deviation ``noise_multiplier · max_norm`` (:func:`jbp.dp_grad`; divided
    by B for mean losses), and ``optimizer`` applies the result. The noise
    key is the step's own half of ``state.key``, split once per step, so a
    run is reproducible from its seed and a resumed run draws the same noise.

    Args:
      net, loss, optimizer: as :func:`make_step`.
      max_norm: the per-example clipping norm (finite, positive).
      noise_multiplier: σ in units of ``max_norm``, ≥ 0 (0: clipping only).
      jit: return the step under ``jax.jit`` (default) or the pure function.

    Returns:
      ``step(state, x, y) -> (state, metrics)`` with the metrics of
      :func:`make_step` (``grad_norm`` is the noisy gradient's) plus
      ``"clipped"``, the share of examples whose gradient was clipped, and
      ``"mean_example_norm"``, the mean unclipped ‖g_i‖.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jbp
      >>> net, opt = jbp.mlp([2, 4, 2]), optax.sgd(0.1)
      >>> state = jbp.init_state(net, opt, jax.random.key(0))
      >>> step = jbp.make_dp_step(net, "softmax_xent", opt, max_norm=1.0, noise_multiplier=1.1)
      >>> state, metrics = step(state, jnp.ones((3, 2), jnp.float32), jnp.array([0, 1, 1]))
      >>> sorted(metrics)
      ['clipped', 'grad_norm', 'loss', 'mean_example_norm', 'param_norm']
    """
    net = check_net(net)
    loss = get_loss(loss)
    check_optimizer(optimizer)
    dp = dp_grad(net, loss, max_norm, noise_multiplier)
    value_fn = objective(net, loss)

    def step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
        key, step_key = jr.split(state.key)
        grads, norms = dp(state.params, x, y, step_key)
        metrics = {
            "loss": value_fn(state.params, x, y),
            "clipped": jnp.mean((norms > max_norm).astype(norms.dtype)),
            "mean_example_norm": jnp.mean(norms),
        }
        return _apply(optimizer, state, key, grads, metrics)

    return jax.jit(step) if jit else step


def targets(net: Any, loss: str | Loss, labels: Any, dtype: Any = np.float32) -> np.ndarray:
    """Integer class labels as the targets ``loss`` takes for this network's outputs.

    Args:
      net: the network.
      loss: a loss name or :class:`Loss`.
      labels: ``(n,)`` integer class labels.
      dtype: the dtype of real-valued targets.

    Returns:
      For a loss that takes integer labels (``softmax_xent``): the labels,
      int32 ``(n,)``. Otherwise one-hot rows ``(n, fan_out)`` in ``dtype``;
      with a single output, the 0/1 column ``(n, 1)``.
    """
    net = check_net(net)
    loss = get_loss(loss)
    labels = np.asarray(labels)
    check_labels(net, loss, labels)
    return class_targets(loss, labels, net.fan_out, dtype)


def class_targets(loss: Loss, labels: np.ndarray, outputs: int | None, dtype: Any) -> np.ndarray:
    """:func:`targets` for checked labels and a network with ``outputs`` outputs."""
    if loss.integer_labels and (outputs is None or outputs > 1):
        return labels.astype(np.int32)
    if outputs == 1:
        return labels.astype(dtype)[:, None]
    if outputs is None:
        raise ValueError(
            f"loss {loss.name!r} takes one-hot targets but the network does not declare its "
            "number of outputs (no Dense at its end); end it with a Dense layer"
        )
    return np.eye(outputs, dtype=dtype)[labels]


def check_labels(net: Sequential, loss: Loss, labels: np.ndarray, name: str = "labels") -> None:
    """Labels are integers the network's outputs can express."""
    check_class_labels(loss, labels, net.fan_out, name)


def check_class_labels(loss: Loss, labels: Any, outputs: int | None, name: str) -> None:
    """Labels are integer classes that ``outputs`` outputs can express (None: unknown)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`{name}` must be integer class labels of shape (n,), got {labels.dtype.name} "
            f"of shape {labels.shape}"
        )
    out = outputs
    if out is None or not labels.size:
        return
    if out == 1 and loss.integer_labels:
        raise ValueError(
            f"loss {loss.name!r} needs at least 2 outputs but the network has 1; use 2 outputs "
            "or a binary loss (sigmoid_bce, half_sse, mse)"
        )
    classes = 2 if out == 1 else out
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise ValueError(
            f"`{name}` lie in [{lo}, {hi}] but the network's {out} output"
            f"{'s' if out > 1 else ''} express{'' if out > 1 else 'es'} classes 0..{classes - 1}; "
            f"give the last layer {hi + 1} outputs"
        )


def check_examples(net: Sequential, shape: tuple[int, ...], name: str) -> int:
    """Inputs of shape ``(n, *example)`` fit ``net`` and it maps each example to
    one score per class; returns the number of outputs.

    Args:
      net: the network.
      shape: the inputs' shape, batch axis first.
      name: the argument, for messages (e.g. ``"data.x_train"``).
    """
    shape = tuple(int(s) for s in shape)
    rank = example_rank(net)
    if rank is not None and len(shape) - 1 != rank:
        want = "vectors (fan_in,)" if rank == 1 else f"examples {example_axes(rank - 1)}"
        hint = "; put jbp.Flatten() first to feed them to Dense layers" if rank == 1 else ""
        raise ValueError(
            f"`{name}` has examples of shape {shape[1:]} but the network's first layers take "
            f"{want}{hint}"
        )
    if net.fan_in is not None and shape[-1] != net.fan_in:
        raise ValueError(
            f"`{name}` has {shape[-1]} features but the first layer expects fan_in={net.fan_in}"
        )
    try:
        out = net.output_shape(shape[1:])
    except ShapeError as e:
        raise ValueError(
            f"`{name}` has examples of shape {shape[1:]}, which the network cannot take: {e}"
        ) from None
    if len(out) != 1:
        raise ValueError(
            f"the network maps one example of `{name}` to shape {out}, but a classifier needs "
            "one score per class, shape (classes,): end it with jbp.Flatten() or "
            "jbp.GlobalAvgPool() and a Dense layer"
        )
    return out[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _evaluate_chunk(
    net: Sequential, loss: Loss, params: Params, x: Array, y: Array, labels: Array
) -> tuple[Array, Array]:
    out, _ = net.forward(params, x)
    if out.shape[1] == 1:
        threshold = 0.0 if loss.name == "sigmoid_bce" else 0.5
        predicted = (out[:, 0] > threshold).astype(labels.dtype)
    else:
        predicted = jnp.argmax(out, axis=1).astype(labels.dtype)
    return jnp.sum(loss.per_example(out, y)), jnp.sum(predicted == labels)


def evaluate(
    net: Any, loss: str | Loss, params: Params, x: Any, labels: Any, *, batch_size: int = 4096
) -> dict[str, float]:
    """Mean per-example loss and accuracy of ``params`` on a labelled set.

    Args:
      net, loss: the network and loss.
      params: the network's parameters.
      x: ``(n, fan_in)`` inputs, or ``(n, *example_shape)`` (e.g. images
        ``(n, height, width, channels)``) for a network that takes them.
      labels: ``(n,)`` integer class labels.
      batch_size: examples per forward pass.

    Returns:
      ``{"loss": mean_i ℓ_i, "accuracy": share of correct predictions, "n": n}``.
      The prediction is the argmax output, or for a single output
      ``out > 0`` (``sigmoid_bce``, logits) or ``out > 0.5`` (other losses).
      An empty set gives NaN loss and accuracy.
    """
    net = check_net(net)
    loss = get_loss(loss)
    x, labels = np.asarray(x), np.asarray(labels)
    check_class_labels(loss, labels, None, "labels")
    n = int(labels.shape[0])
    if x.ndim < 2 or x.shape[0] != n:
        raise ValueError(
            f"`x` must have shape (n, features) or (n, *example_shape) with n={n} (one example "
            f"per label), got {x.shape}"
        )
    check_params(net, params)
    outputs = check_examples(net, x.shape, "x")
    check_class_labels(loss, labels, outputs, "labels")
    x = x.astype(params_dtype(params) or np.float32)
    y = class_targets(loss, labels, outputs, x.dtype)
    return evaluate_checked(net, loss, params, x, y, labels.astype(np.int32), batch_size)


def evaluate_checked(
    net: Sequential, loss: Loss, params: Params, x: Any, y: Any, labels: Any, batch_size: int
) -> dict[str, float]:
    """:func:`evaluate` on checked arrays: ``x`` in the params' dtype, ``y`` the
    loss's targets, ``labels`` int32. Reads the device once, at the end."""
    n = int(labels.shape[0])
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan, "n": 0}
    sums = [
        _evaluate_chunk(net, loss, params, x[sl], y[sl], labels[sl])
        for sl in (slice(start, start + batch_size) for start in range(0, n, batch_size))
    ]
    total, correct = 0.0, 0
    for s, c in jax.device_get(sums):
        total += float(s)
        correct += int(c)
    return {"loss": total / n, "accuracy": correct / n, "n": n}
