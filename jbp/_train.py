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
Sequence data sets hold labels per position ``(n, T)`` for a network that
scores each position, ``(n, T, classes)`` out (e.g. ``jbp.transformer`` on
integer tokens ``(n, T)``), with ``-1`` (``IGNORE_LABEL``) where a position has
no target: those become zero target rows (no loss, δ = 0; ``softmax_xent``
only) and are left out of the accuracy, which counts the positions that
have a target. The label checks are in ``_train_checks.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jax import lax

from ._backprop import check_net, keeps_positions, objective, value_and_backprop
from ._checks import check_count, check_dtype, check_key, check_params, params_dtype
from ._data import IGNORE_LABEL
from ._losses import Loss, get_loss
from ._per_example import (
    ClippedSum,
    check_divisor,
    check_dp_max_norm,
    check_expected_batch_size,
    check_noise_multiplier,
    clipped_sum,
    noisy_mean,
)
from ._report import Report
from ._train_checks import (
    check_class_labels,
    check_data_mask,
    check_examples,
    check_gradient_source,
    check_inputs,
    check_optimizer,
    class_targets,
)
from .layers import Context, Sequential
from .layers._dropout import has_dropout

Array = jax.Array
Params = Any
StepFn = Callable[..., tuple["TrainState", dict[str, Array]]]


class TrainState(NamedTuple):
    """Everything a training run carries from one step to the next.

    Attributes:
      params: the network's parameters, a tuple with one entry per layer.
      opt_state: the optimiser's state (``optimizer.init(params)``).
      step: int32 scalar, the number of updates applied so far.
      key: PRNG key, split once per step; the first half is carried on and
        the second is the step's own randomness: the dropout key of a network
        with :class:`jbp.Dropout` (unused by the others, which draw none).
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
      ``step(state, x, y, mask=None)``: ``x`` ``(batch, fan_in)``, ``y`` the loss's
      targets for the batch (see :func:`targets`), ``mask`` the padding mask of a
      batch of padded sequences. A network with :class:`jbp.Dropout` drops with
      the step's own key (see :class:`TrainState`). Returns the next state and
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
    dropout = has_dropout(net)

    def step(
        state: TrainState, x: Array, y: Array, mask: Array | None = None
    ) -> tuple[TrainState, dict[str, Array]]:
        key, step_key = jr.split(state.key)
        value, grads = value_and_grad(
            state.params, x, y, mask=mask, dropout_key=step_key if dropout else None
        )
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
    expected_batch_size: float | None = None,
    physical_batch_size: int | None = None,
    jit: bool = True,
) -> StepFn:
    """A DP-SGD training step (Abadi et al. 2016) on the δ equations, built once.

    Each example's gradient is clipped to ``max_norm`` without being formed
    (ghost clipping: one backward pass and a re-weighted weight-gradient
    pass), the clipped sum gets Gaussian noise of standard deviation
    ``noise_multiplier · max_norm``, is divided by ``expected_batch_size``
    (:func:`jbp.dp_grad`), and ``optimizer`` applies the result. The noise key
    is the step's own half of ``state.key``, split once per step, so a run is
    reproducible from its seed and a resumed run draws the same noise.

    For a privacy guarantee, feed it the batches of :class:`jbp.PoissonSampler`
    (Poisson sampling, padded to a fixed shape, with their ``example_mask``)
    and account its steps with :func:`jbp.dp_epsilon`; :func:`jbp.fit` with
    ``privacy=jbp.Privacy(...)`` does both.

    Args:
      net, loss, optimizer: as :func:`make_step`.
      max_norm: the per-example clipping norm C (finite, positive).
      noise_multiplier: σ in units of ``max_norm``, ≥ 0 (0: clipping only).
      expected_batch_size: ``q·N``, the divisor of the noisy sum (see
        :func:`jbp.dp_grad`); None: 1 for sum losses, the batch for mean ones.
      physical_batch_size: process the batch in chunks of this many rows
        (the batch must be a multiple of it), accumulating their clipped sums
        inside the step before the noise is added once (Opacus's virtual
        steps: a logical batch larger than fits in memory at once). Chunks
        after the last real example (``example_mask``) are skipped, so a
        padded Poisson batch costs about its real rows, not its padding; the
        step's time then depends on the realised batch size, as in any
        variable-size Poisson batching (Opacus): the guarantee covers the
        released parameters, not timing. None: one pass over every row.
      jit: return the step under ``jax.jit`` (default) or the pure function.

    Returns:
      ``step(state, x, y, mask=None, example_mask=None) -> (state, metrics)``;
      ``example_mask`` ``(batch,)`` marks the real examples of a padded batch
      (padding rows contribute exactly nothing, whatever they hold). The
      metrics of :func:`make_step` (``loss``: the mean ℓ_i over the real
      examples; ``grad_norm``: the noisy gradient's) plus ``"clipped"``, the
      share of real examples whose gradient was clipped, ``"mean_example_norm"``,
      their mean unclipped ‖g_i‖, and ``"examples"``, how many there were.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jbp
      >>> net, opt = jbp.mlp([2, 4, 2]), optax.sgd(0.1)
      >>> state = jbp.init_state(net, opt, jax.random.key(0))
      >>> step = jbp.make_dp_step(net, "softmax_xent", opt, max_norm=1.0, noise_multiplier=1.1)
      >>> state, metrics = step(state, jnp.ones((3, 2), jnp.float32), jnp.array([0, 1, 1]))
      >>> sorted(metrics)
      ['clipped', 'examples', 'grad_norm', 'loss', 'mean_example_norm', 'param_norm']
    """
    net = check_net(net)
    loss = get_loss(loss)
    check_optimizer(optimizer)
    max_norm = check_dp_max_norm(max_norm)
    sigma = check_noise_multiplier(noise_multiplier)
    expected = check_expected_batch_size(expected_batch_size)
    chunk = physical_batch_size
    if chunk is not None:
        check_count("physical_batch_size", chunk)
    clipped = clipped_sum(net, loss, max_norm, "auto")
    dropout = has_dropout(net)

    def step(
        state: TrainState,
        x: Array,
        y: Array,
        mask: Array | None = None,
        example_mask: Array | None = None,
    ) -> tuple[TrainState, dict[str, Array]]:
        key, step_key = jr.split(state.key)
        noise_key, dropout_key = jr.split(step_key)
        check_divisor("make_dp_step", expected, loss, example_mask)
        r = _chunked(clipped, chunk, state.params, x, y, mask, example_mask, dropout_key, dropout)
        count = r.examples.astype(r.norms.dtype)
        grads = noisy_mean(r.grads, r.norms.shape[0], noise_key, sigma * max_norm, expected, loss)
        real = r.norms > -1 if example_mask is None else example_mask
        per = jnp.maximum(count, 1)
        metrics = {
            "loss": r.loss_sum / per,
            "clipped": jnp.sum(real & (r.norms > max_norm)) / per,
            "mean_example_norm": jnp.sum(r.norms) / per,
            "examples": r.examples,
        }
        return _apply(optimizer, state, key, grads, metrics)

    return jax.jit(step) if jit else step


def _chunked(
    clipped: Callable[..., ClippedSum],
    chunk: int | None,
    params: Any,
    x: Any,
    y: Any,
    mask: Any,
    example_mask: Any,
    key: Array,
    dropout: bool,
) -> ClippedSum:
    """The clipped sum of a batch, in chunks of ``chunk`` rows accumulated by a loop
    (one compiled chunk, the activations of one chunk alive at a time) that stops
    after the last chunk holding a real example."""
    rows = np.shape(x)[0]
    if chunk is None or chunk >= rows:
        return clipped(
            params, x, y, mask=mask, example_mask=example_mask,
            dropout_key=key if dropout else None,
        )  # fmt: skip
    if rows % chunk:
        raise ValueError(
            f"`x` has a batch of {rows} rows, not a multiple of `physical_batch_size` {chunk}; "
            "pad the batch to whole chunks (jbp.PoissonSampler(..., multiple_of=chunk) does)"
        )
    k = rows // chunk
    if example_mask is None:
        example_mask = jnp.ones((rows,), bool)
    split = lambda a: None if a is None else jnp.reshape(a, (k, chunk, *np.shape(a)[1:]))  # noqa: E731
    parts = (split(jnp.asarray(x)), split(jnp.asarray(y)), split(mask), split(example_mask))

    def one(p: Any, i: Array) -> ClippedSum:
        xc, yc, mc, ec = jtu.tree_map(lambda a: a[i], parts)
        dropout_key = jr.fold_in(key, i) if dropout else None
        return clipped(p, xc, yc, mask=mc, example_mask=ec, dropout_key=dropout_key)

    first = jax.eval_shape(lambda p: one(p, jnp.int32(0)), params)

    def body(i: Array, total: Any) -> Any:
        grads, norms, loss_sum, examples = total
        r = one(params, i)
        return (
            jtu.tree_map(jnp.add, grads, r.grads),
            lax.dynamic_update_index_in_dim(norms, r.norms, i, 0),
            loss_sum + r.loss_sum,
            examples + r.examples,
        )

    zeros = (
        jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first.grads),
        jnp.zeros((k, chunk), first.norms.dtype),
        jnp.zeros((), first.loss_sum.dtype),
        jnp.zeros((), first.examples.dtype),
    )
    # Only the chunks up to the last real example run: a Poisson batch's padding at
    # the end costs nothing (the step's time then depends on the batch's size).
    used = jnp.max(jnp.where(example_mask, jnp.arange(rows) // chunk + 1, 0))
    grads, norms, loss_sum, examples = lax.fori_loop(0, used, body, zeros)
    return ClippedSum(grads, norms.reshape(rows), loss_sum, examples)


def targets(net: Any, loss: str | Loss, labels: Any, dtype: Any = np.float32) -> np.ndarray:
    """Integer class labels as the targets ``loss`` takes for this network's outputs.

    Args:
      net: the network.
      loss: a loss name or :class:`Loss`.
      labels: ``(n,)`` integer class labels, or labels per position ``(n, T)``
        (classes, or -1, ``IGNORE_LABEL``, where a position has no target).
      dtype: the dtype of real-valued targets.

    Returns:
      For a loss that takes integer labels (``softmax_xent``): the labels,
      int32 ``(n,)``, or per position ``(n, T)`` with -1 where there is no
      target (the loss leaves those out: ℓ_i is the mean over the example's own
      targets). Otherwise one-hot rows ``(n, fan_out)`` (per position ``(n, T,
      fan_out)``) in ``dtype``; with a single output, the 0/1 column ``(n, 1)``.

    Example:
      >>> import numpy as np, jbp
      >>> net = jbp.transformer(vocab=3, length=2, features=4, heads=1, depth=1)
      >>> jbp.targets(net, "softmax_xent", np.array([[-1, 2]])).tolist()
      [[-1, 2]]
      >>> jbp.targets(net, "mse", np.array([[0, 2]])).tolist()
      [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
    """
    net = check_net(net)
    loss = get_loss(loss)
    labels = np.asarray(labels)
    check_labels(net, loss, labels)
    return class_targets(loss, labels, net.fan_out, dtype)


def check_labels(net: Sequential, loss: Loss, labels: np.ndarray, name: str = "labels") -> None:
    """Labels are integers the network's outputs can express."""
    check_class_labels(loss, labels, net.fan_out, name)


def _evaluate_chunk(
    net: Sequential, loss: Loss, params: Params, x: Array, y: Array, labels: Array, mask: Any
) -> tuple[Array, Array, Array, Array, Array]:
    """Σ ℓ_i, the correct predictions, the positions with a target, the examples
    right at every such position, and Σ_i n_i ℓ_i (n_i: example i's positions with
    a target; the total of the per-position losses for ``softmax_xent``)."""
    out, _ = net.forward(params, x, Context(mask))
    if mask is not None and keeps_positions(out.shape, x.shape):
        loss = loss.with_mask(mask)
    if labels.ndim == 1 and out.shape[1] == 1:
        threshold = 0.0 if loss.name == "sigmoid_bce" else 0.5
        predicted = (out[:, 0] > threshold).astype(labels.dtype)
    else:
        predicted = jnp.argmax(out, axis=-1).astype(labels.dtype)
    scored = labels != IGNORE_LABEL
    if mask is not None and labels.ndim > 1:
        scored = scored & mask
    right = (predicted == labels) & scored
    rest = tuple(range(1, labels.ndim))
    whole = jnp.all(right | ~scored, axis=rest)
    per_example = loss.per_example(out, y)
    weighted = jnp.sum(per_example * jnp.sum(scored, axis=rest).astype(per_example.dtype))
    return jnp.sum(per_example), jnp.sum(right), jnp.sum(scored), jnp.sum(whole), weighted


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _evaluate_sums(
    net: Sequential,
    loss: Loss,
    size: int,
    params: Params,
    x: Array,
    y: Array,
    labels: Array,
    mask: Any,
) -> tuple[Array, ...]:
    """:func:`_evaluate_chunk`'s five sums for each chunk of ``size`` examples, stacked
    ``(chunks,)``, in one program: the full chunks by a loop that slices the arrays where
    they lie (on the device: nothing uploaded, nothing copied), then the rest."""
    n = labels.shape[0]
    full, rest = divmod(n, size)
    pick: Any = lambda a, start, k: None if a is None else lax.dynamic_slice_in_dim(a, start, k)  # noqa: E731
    parts = []
    if full == 1 and not rest:
        parts.append(
            jtu.tree_map(lambda s: s[None], _evaluate_chunk(net, loss, params, x, y, labels, mask))
        )
    elif full:

        def body(carry: None, i: Array) -> tuple[None, tuple[Array, ...]]:
            start = i * size
            chunk = [pick(a, start, size) for a in (x, y, labels, mask)]
            return None, _evaluate_chunk(net, loss, params, *chunk)

        parts.append(lax.scan(body, None, jnp.arange(full, dtype=jnp.int32))[1])
    if rest:
        chunk = [pick(a, full * size, rest) for a in (x, y, labels, mask)]
        parts.append(jtu.tree_map(lambda s: s[None], _evaluate_chunk(net, loss, params, *chunk)))
    return tuple(jnp.concatenate(column) for column in zip(*parts, strict=True))


def evaluate(
    net: Any,
    loss: str | Loss,
    params: Params,
    x: Any,
    labels: Any,
    *,
    batch_size: int = 4096,
    mask: Any = None,
) -> dict[str, float]:
    """Mean per-example loss and accuracy of ``params`` on a labelled set.

    Args:
      net, loss: the network and loss.
      params: the network's parameters.
      x: ``(n, fan_in)`` inputs, or ``(n, *example_shape)`` (e.g. images
        ``(n, height, width, channels)``) for a network that takes them, or
        integer tokens ``(n, T)`` for one that starts with an ``Embedding``
        (they stay integers).
      labels: ``(n,)`` integer class labels, or labels per position ``(n, T)``
        for a network that maps an example to ``(T, classes)``, -1
        (``IGNORE_LABEL``) where a position has no target.
      batch_size: examples per forward pass.
      mask: the padding mask ``(n, T)`` of padded sequences (True at real
        positions): padded positions are left out of the loss and the accuracy.

    Returns:
      ``{"loss": mean_i ℓ_i, "accuracy": share of correct predictions, "n": n}``.
      The prediction is the argmax output, or for a single output
      ``out > 0`` (``sigmoid_bce``, logits) or ``out > 0.5`` (other losses).
      With labels per position, the accuracy is over the positions that have
      a target (e.g. a sequence task's answer tokens), ``ℓ_i`` is the loss's
      own (``softmax_xent``: the mean over the example's positions with a
      target), and three more entries say ``"tokens"``, the positions with a
      target, ``"sequence_accuracy"``, the share of examples right at all of
      them, and ``"loss_per_token"``, ``Σ_i n_i ℓ_i / Σ_i n_i`` (n_i the
      example's positions with a target: for ``softmax_xent`` the mean loss per
      target position, nats per token; divide by ln 2 for bits). An empty set
      gives NaN loss and accuracy.

    Example:
      >>> import jax, numpy as np, jbp
      >>> net = jbp.transformer(vocab=5, length=4, features=8, heads=2, depth=1)
      >>> params = net.init(jax.random.key(0))
      >>> tokens = np.array([[1, 2, 3, 4], [4, 3, 2, 1]])
      >>> labels = np.array([[-1, -1, 4, 0], [-1, -1, 1, 0]])
      >>> ev = jbp.evaluate(net, "softmax_xent", params, tokens, labels)
      >>> ev["n"], ev["tokens"]
      (2, 4)
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
    dtype = params_dtype(params) or np.dtype(np.float32)
    x = check_inputs(net, x, dtype, "x")
    outputs = check_examples(net, x.shape, "x", labels.shape[1:])
    check_class_labels(loss, labels, outputs, "labels")
    y = class_targets(loss, labels, outputs, dtype)
    if mask is not None:
        mask = check_data_mask(mask, x, "mask")
    return evaluate_checked(net, loss, params, x, y, labels.astype(np.int32), batch_size, mask)


def evaluate_checked(
    net: Sequential,
    loss: Loss,
    params: Params,
    x: Any,
    y: Any,
    labels: Any,
    batch_size: int,
    mask: Any = None,
) -> dict[str, float]:
    """:func:`evaluate` on checked arrays: ``x`` in the params' dtype (or int32
    tokens), ``y`` the loss's targets, ``labels`` int32, ``mask`` a padding mask
    or None; host arrays (uploaded once) or arrays already on the device (as
    :func:`jbp.fit` keeps its splits: nothing is uploaded). One program over
    chunks of ``batch_size`` examples; reads the device once, at the end."""
    n = int(labels.shape[0])
    per_position = labels.ndim > 1
    if n == 0:
        empty = {"tokens": 0, "sequence_accuracy": math.nan} if per_position else {}
        return {"loss": math.nan, "accuracy": math.nan, "n": 0, **empty}
    size = min(batch_size, n)
    sums = jax.device_get(_evaluate_sums(net, loss, size, params, x, y, labels, mask))
    total, correct, scored, whole, weighted = 0.0, 0, 0, 0, 0.0
    for s, c, k, w, t in zip(*sums, strict=True):  # chunk by chunk, as a float64 sum
        total += float(s)
        correct += int(c)
        scored += int(k)
        whole += int(w)
        weighted += float(t)
    result = {"loss": total / n, "accuracy": correct / scored if scored else math.nan, "n": n}
    if per_position:
        result.update(
            tokens=scored,
            sequence_accuracy=whole / n,
            loss_per_token=weighted / scored if scored else math.nan,
        )
    return result
