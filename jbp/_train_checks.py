"""The trainer's argument checks, once, at the public boundary.

:func:`jbp.fit`'s arguments become a :class:`Plan` (the checked network, loss,
optimiser and settings) and its data set a :class:`Data` (inputs cast, targets
built, labels checked); the loop inside takes those and checks nothing again.
:func:`jbp.targets` and :func:`jbp.evaluate` share the label, input and
example checks.

Labels come in two kinds:

- class labels ``(n,)``: one class per example, non-negative;
- labels per position ``(n, T)`` (sequences: the next token at each
  position), each a class or :data:`~jbp._data.IGNORE_LABEL` (-1) where a
  position has no target. The network maps an example to ``(T, classes)``.
  With ignored positions the targets are one-hot rows with a zero row at each
  ignored position, for ``softmax_xent`` only: its ``ℓ`` and δ
  (``softmax(a)·Σy − y``) are zero at a zero row, so an ignored position
  neither adds to the loss nor to the gradient (it still counts in the
  mean over the example's T positions). Other losses have no such row.

Integer tokens (a network whose first layer is an ``Embedding``) stay
integers: they are checked against the vocabulary here, where they can be
read, because inside the jitted step they cannot; so are the labels against
the network's outputs. The whole data set is checked before the first step,
so no batch with a value out of range reaches it; the message names the split
and the first offending value's index.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ._attribution import InRunShapley
from ._backprop import check_net
from ._checks import check_dtype, example_rank, first_outside
from ._data import IGNORE_LABEL
from ._losses import Loss, get_loss
from ._protocol import example_axes
from ._train_private import check_privacy
from .layers import Sequential, ShapeError

GRADIENT_SOURCES = ("backprop", "autodiff")
MONITORS = ("train_loss", "test_loss")
# The losses whose target row of zeros gives ℓ = 0 and δ = 0 at that position.
_IGNORING_LOSSES = ("softmax_xent",)


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


# --- labels and targets --------------------------------------------------------------


def class_targets(loss: Loss, labels: np.ndarray, outputs: int | None, dtype: Any) -> np.ndarray:
    """:func:`jbp.targets` for checked labels and a network with ``outputs`` outputs."""
    if labels.ndim > 1:
        return _position_targets(loss, labels, outputs, dtype)
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


def _position_targets(loss: Loss, labels: np.ndarray, outputs: int | None, dtype: Any) -> Any:
    """Labels per position ``(n, T)``: the labels themselves for a loss that takes
    them (:data:`IGNORE_LABEL` included: the loss leaves those positions out), else
    one-hot rows ``(n, T, outputs)`` with a zero row where the label is
    :data:`IGNORE_LABEL`."""
    if loss.integer_labels:
        return labels.astype(np.int32)
    if outputs is None:
        raise ValueError(
            "labels per position with ignored positions become one-hot targets, but the "
            "network does not declare its number of outputs (no Dense at its end); end it "
            "with a Dense layer"
        )
    rows = np.concatenate([np.eye(outputs, dtype=dtype), np.zeros((1, outputs), dtype)])
    return rows[labels]  # IGNORE_LABEL = -1 picks the zero row


def check_class_labels(loss: Loss, labels: Any, outputs: int | None, name: str) -> None:
    """Labels are integer classes that ``outputs`` outputs can express (None:
    unknown): ``(n,)`` non-negative, or per position ``(n, T, ...)`` with
    :data:`IGNORE_LABEL` allowed."""
    labels = np.asarray(labels)
    if labels.ndim < 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`{name}` must be integer class labels of shape (n,), or labels per position "
            f"(n, T) for sequences, got {labels.dtype.name} of shape {labels.shape}"
        )
    per_position = labels.ndim > 1
    if per_position and labels.size:
        lo = int(labels.min())
        if lo < IGNORE_LABEL:
            raise ValueError(
                f"`{name}` holds label {lo}; labels per position are classes 0, 1, ... or "
                f"{IGNORE_LABEL} where a position has no target"
                + first_outside(labels, IGNORE_LABEL, int(labels.max()), name)
            )
        if lo == IGNORE_LABEL and loss.name not in _IGNORING_LOSSES:
            raise ValueError(
                f"`{name}` has positions without a target (label {IGNORE_LABEL}), which only "
                f"{' or '.join(_IGNORING_LOSSES)} can leave out (a zero target row gives it "
                f"no loss and δ = 0 there); loss {loss.name!r} would still fit those "
                "positions to zero: use loss 'softmax_xent'"
            )
    out = outputs
    if out is None or not labels.size:
        return
    if out == 1 and (loss.integer_labels or per_position):
        need = "labels per position" if per_position else f"loss {loss.name!r}"
        raise ValueError(
            f"{need} need{'' if per_position else 's'} at least 2 outputs but the network has "
            "1; use 2 outputs"
            + ("" if per_position else " or a binary loss (sigmoid_bce, half_sse, mse)")
        )
    classes = 2 if out == 1 else out
    scored = labels[labels != IGNORE_LABEL] if per_position else labels
    if not scored.size:
        return
    lo, hi = int(scored.min()), int(scored.max())
    if lo < 0 or hi >= classes:
        low = IGNORE_LABEL if per_position else 0
        raise ValueError(
            f"`{name}` lie in [{lo}, {hi}] but the network's {out} output"
            f"{'s' if out > 1 else ''} express{'' if out > 1 else 'es'} classes 0..{classes - 1}; "
            f"give the last layer {hi + 1} outputs" + first_outside(labels, low, classes - 1, name)
        )


def _first_layer(net: Any) -> Any:
    while hasattr(net, "layers"):
        net = net.layers[0]
    return net


def check_inputs(net: Sequential, x: np.ndarray, dtype: Any, name: str) -> np.ndarray:
    """``x`` as the network takes it: integer tokens in ``[0, vocab)`` as int32 for
    a network that starts with an ``Embedding``, else cast to ``dtype``."""
    if not getattr(net, "takes_tokens", False):
        return x.astype(dtype)
    first = _first_layer(net)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(
            f"`{name}` has dtype {x.dtype.name}, but the network's first layer ({first!r}) "
            "takes integer tokens: use a sequence data set such as jbp.load_dataset('sort'), "
            "or token ids of an integer dtype"
        )
    vocab = getattr(first, "vocab", None)
    if vocab is not None and x.size and (x.min() < 0 or x.max() >= vocab):
        raise ValueError(
            f"`{name}` has tokens in [{x.min()}, {x.max()}] but the first layer has "
            f"vocab={vocab}, so tokens must lie in [0, {vocab - 1}]"
            + first_outside(x, 0, vocab - 1, name)
        )
    return x.astype(np.int32)


def check_examples(
    net: Sequential, shape: tuple[int, ...], name: str, positions: tuple[int, ...] = ()
) -> int:
    """Inputs of shape ``(n, *example)`` fit ``net`` and it maps each example to
    one score per class (``positions == ()``, class labels) or to one score per
    class at each position, ``(*positions, classes)`` (labels per position);
    returns the number of outputs (classes).

    Args:
      net: the network.
      shape: the inputs' shape, batch axis first.
      name: the argument, for messages (e.g. ``"data.x_train"``).
      positions: one example's label shape: ``()`` or ``(T,)``.
    """
    shape = tuple(int(s) for s in shape)
    positions = tuple(int(s) for s in positions)
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
    if positions and tuple(out[:-1]) != positions:
        raise ValueError(
            f"the network maps one example of `{name}` to shape {out}, but labels per position "
            f"of shape {positions} need one score per class at each position, shape "
            f"({', '.join(map(str, positions))}, classes)"
            + ("; a sequence model such as jbp.transformer gives that" if len(out) == 1 else "")
        )
    if not positions and len(out) != 1:
        raise ValueError(
            f"the network maps one example of `{name}` to shape {out}, but a classifier needs "
            "one score per class, shape (classes,): end it with jbp.Flatten() or "
            "jbp.GlobalAvgPool() and a Dense layer"
            + (
                "; labels per position (n, T) would fit a network that scores each position"
                if len(out) == 2
                else ""
            )
        )
    return out[-1]


# --- fit's plan and data -------------------------------------------------------------


def _positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        what = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"`{name}` must be {what}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """:func:`fit`'s arguments but the data and run folder, checked when built:
    ``net`` becomes a :class:`Sequential`, ``loss`` a :class:`Loss`, ``dtype``
    a floating dtype."""

    net: Any
    loss: Any
    optimizer: Any
    epochs: int
    batch_size: int
    seed: int
    dtype: Any
    gradient_source: str
    check_every: int | None
    check_rtol: float | None
    patience: int | None
    min_delta: float
    monitor: str
    checkpoint_every: int | None
    max_steps: int | None
    mesh: Mesh | None
    privacy: Any = None
    keep_every: int | None = None
    shapley: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "net", check_net(self.net))
        object.__setattr__(self, "loss", get_loss(self.loss))
        check_optimizer(self.optimizer)
        check_gradient_source(self.gradient_source)
        for name in ("epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("check_every", "patience", "checkpoint_every", "max_steps", "keep_every"):
            _positive_int(name, getattr(self, name), optional=True)
        seed = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"`monitor` must be 'train_loss' or 'test_loss', got {self.monitor!r}")
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        if check_privacy(self.privacy) is not None:
            if self.mesh is not None:
                raise ValueError(
                    "`privacy` with a `mesh`: private training runs on one device for now; "
                    "pass mesh=None"
                )
            if self.gradient_source != "backprop":
                raise ValueError(
                    "`privacy` trains on jbp's per-example clipped gradients (ghost clipping); "
                    f"`gradient_source` must be 'backprop', got {self.gradient_source!r}"
                )
            if self.patience is not None and self.monitor == "train_loss":
                raise ValueError(
                    "`patience` with `privacy` would stop the run on the training loss, computed "
                    "from the private data without noise, which the ε does not cover; monitor "
                    "'test_loss' (held-out data) or pass patience=None"
                )
        if self.shapley is not None:
            if not isinstance(self.shapley, InRunShapley):
                raise TypeError(
                    "`shapley` must be a jbp.InRunShapley(x_val, y_val, learning_rate), got "
                    f"{type(self.shapley).__name__}"
                )
            clash = {
                "privacy": self.privacy is not None,
                "mesh": self.mesh is not None,
                "gradient_source='autodiff'": self.gradient_source != "backprop",
            }
            for what, bad in clash.items():
                if bad:
                    raise ValueError(
                        f"`shapley` with `{what}`: in-run data values are formed from the "
                        "step's own per-example factors, on one device, without privacy "
                        "(they read the private data without noise); drop one of the two"
                    )


@dataclasses.dataclass(frozen=True)
class Split:
    """One split as the loop uses it: inputs in the params' dtype (int32 tokens
    for a network that takes tokens), the loss's targets and the int32 labels."""

    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray
    mask: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Data:
    """The data set, checked against the plan's network and loss.

    ``meta`` is what a checkpoint records of it (the batch order depends on it).
    """

    train: Split
    test: Split | None
    meta: dict[str, Any]


def check_data_mask(mask: Any, x: np.ndarray, name: str) -> np.ndarray | None:
    """A data set's padding mask: boolean ``(n, T)`` for inputs ``(n, T, ...)``,
    each row a prefix; None stays None."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != x.shape[:2] or x.ndim < 2:
        raise ValueError(
            f"`{name}` must be a boolean padding mask of shape {x.shape[:2]} (n, T), got "
            f"{mask.dtype.name} of shape {mask.shape}"
        )
    if np.any(~mask[:, :-1] & mask[:, 1:]):
        raise ValueError(
            f"`{name}`: each row must be True (real) then False (padding on the right)"
        )
    return mask


def check_split(plan: Plan, x: Any, y: Any, mask: Any, names: tuple[str, str, str]) -> Split:
    """One split of inputs and integer labels checked against the plan's network and
    loss; ``names`` name ``x``, ``y`` and ``mask`` in errors."""
    xs, ys, ms = names
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"`{xs}` must have shape (n, features) or (n, *example_shape) and "
            f"`{ys}` shape (n,), got {x.shape} and {y.shape}"
        )
    check_class_labels(plan.loss, y, None, ys)
    x = check_inputs(plan.net, x, plan.dtype, xs)
    outputs = check_examples(plan.net, x.shape, xs, y.shape[1:])
    check_class_labels(plan.loss, y, outputs, ys)
    targets = class_targets(plan.loss, y, outputs, plan.dtype)
    return Split(x, targets, y.astype(np.int32), check_data_mask(mask, x, ms))


def check_data(data: Any, plan: Plan) -> Data:
    names = ("x_train", "y_train", "x_test", "y_test")
    if not all(hasattr(data, n) for n in names):
        raise TypeError(
            "`data` must be a jbp.Dataset (x_train, y_train, x_test, y_test, ...), e.g. from "
            f"jbp.load_dataset, got {type(data).__name__}"
        )
    train, test = (
        check_split(
            plan, getattr(data, f"x_{s}"), getattr(data, f"y_{s}"), getattr(data, f"mask_{s}", None),
            (f"data.x_{s}", f"data.y_{s}", f"data.mask_{s}"),
        )
        for s in ("train", "test")
    )  # fmt: skip
    if not len(train.labels):
        raise ValueError("`data.x_train` is empty: need at least one training example")
    if train.labels.ndim > 1 and not np.any(train.labels != IGNORE_LABEL):
        raise ValueError(
            f"`data.y_train` has no position with a target: every label is {IGNORE_LABEL}"
        )
    if plan.privacy is not None and plan.batch_size > len(train.labels):
        raise ValueError(
            f"`batch_size` {plan.batch_size} is the expected batch of private training (q·N), "
            f"but `data.x_train` holds only {len(train.labels)} examples"
        )
    if plan.monitor == "test_loss" and not len(test.labels):
        raise ValueError("`monitor='test_loss'` but `data` has no test split")
    meta = {"name": str(getattr(data, "name", "")), "n_train": len(train.labels),
            "batch_size": plan.batch_size, "seed": plan.seed}  # fmt: skip
    return Data(train, test if len(test.labels) else None, meta)
