"""The training loop's argument checks: :func:`jbp.fit`'s arguments become a
:class:`Plan` (the checked network, loss, optimiser and settings) and its data
set a :class:`Data` (inputs cast, targets built, labels checked), once, at the
public boundary; the loop inside takes those and checks nothing again."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ._backprop import check_net
from ._checks import check_dtype
from ._losses import get_loss
from ._train import (
    check_class_labels,
    check_examples,
    check_gradient_source,
    check_optimizer,
    class_targets,
)

MONITORS = ("train_loss", "test_loss")


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "net", check_net(self.net))
        object.__setattr__(self, "loss", get_loss(self.loss))
        check_optimizer(self.optimizer)
        check_gradient_source(self.gradient_source)
        for name in ("epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("check_every", "patience", "checkpoint_every", "max_steps"):
            _positive_int(name, getattr(self, name), optional=True)
        seed = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"`monitor` must be 'train_loss' or 'test_loss', got {self.monitor!r}")
        object.__setattr__(self, "dtype", check_dtype(self.dtype))


@dataclasses.dataclass(frozen=True)
class Split:
    """One split as the loop uses it: inputs in the params' dtype, the loss's
    targets and the int32 labels."""

    x: np.ndarray
    y: np.ndarray
    labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Data:
    """The data set, checked against the plan's network and loss.

    ``meta`` is what a checkpoint records of it (the batch order depends on it).
    """

    train: Split
    test: Split | None
    meta: dict[str, Any]


def check_data(data: Any, plan: Plan) -> Data:
    names = ("x_train", "y_train", "x_test", "y_test")
    if not all(hasattr(data, n) for n in names):
        raise TypeError(
            "`data` must be a jbp.Dataset (x_train, y_train, x_test, y_test, ...), e.g. from "
            f"jbp.load_dataset, got {type(data).__name__}"
        )
    splits = []
    for xs, ys in (("x_train", "y_train"), ("x_test", "y_test")):
        x, y = np.asarray(getattr(data, xs)), np.asarray(getattr(data, ys))
        if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"`data.{xs}` must have shape (n, features) or (n, *example_shape) and "
                f"`data.{ys}` shape (n,), got {x.shape} and {y.shape}"
            )
        outputs = check_examples(plan.net, x.shape, f"data.{xs}")
        check_class_labels(plan.loss, y, outputs, f"data.{ys}")
        targets = class_targets(plan.loss, y, outputs, plan.dtype)
        splits.append(Split(x.astype(plan.dtype), targets, y.astype(np.int32)))
    train, test = splits
    if not train.labels.size:
        raise ValueError("`data.x_train` is empty: need at least one training example")
    if plan.monitor == "test_loss" and not test.labels.size:
        raise ValueError("`monitor='test_loss'` but `data` has no test split")
    meta = {"name": str(getattr(data, "name", "")), "n_train": int(train.labels.size),
            "batch_size": plan.batch_size, "seed": plan.seed}  # fmt: skip
    return Data(train, test if test.labels.size else None, meta)
