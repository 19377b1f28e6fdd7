"""Data attribution from the backward pass: dot products of per-example gradients.

The δ equations give, for every example, its layer inputs ã_i and its δ_i; the
same factors that give per-example gradient norms give the dot products between
the gradients of two different examples without materialising either:
``⟨g_i, g'_j⟩ = Σ_{t,s} (ã_it·ã'_js)(δ_it·δ'_js)`` for an outer-product leaf (and
the matching forms for elementwise and gather leaves, :func:`jbp.layers._factors.cross`).
That one quantity is the core of gradient-based data attribution: TracIn
(:class:`jbp.TracIn`), in-run data Shapley (``jbp.fit(..., shapley=...)``) and
gradient similarity between examples.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._backprop import check_net
from ._checkpoint import PARAMS, read_params
from ._checks import check_count, check_number
from ._losses import Loss
from ._per_example import _setup, _start, per_example_norms
from .layers._factors import (
    check_method,
    cross,
    is_leaf_factor,
    sq_norm,
)

Array = jax.Array
Params = Any


def _per_layer(fn: Callable[..., Array], *trees: Any) -> dict[str, Array]:
    """``fn`` over the leaf factors of each top-level layer with params, summed per
    layer: ``{"layers[i]": value}``."""
    out = {}
    for i, parts in enumerate(zip(*trees, strict=True)):
        leaves = [jtu.tree_leaves(t, is_leaf=is_leaf_factor) for t in parts]
        if leaves[0]:
            values = [fn(*fs) for fs in zip(*leaves, strict=True)]
            out[f"layers[{i}]"] = sum(values[1:], values[0])
    return out


def _cosine(dots: Array, sq: Array, sq_other: Array) -> Array:
    """``dots / (‖g_i‖‖g'_j‖)``, 0 where either norm is 0."""
    scale = jnp.sqrt(sq[:, None] * sq_other[None, :])
    return jnp.where(scale > 0, dots / jnp.where(scale > 0, scale, 1), 0)


def per_example_dots(
    net: Any,
    loss: str | Loss,
    *,
    per_layer: bool = False,
    cosine: bool = False,
    method: str = "auto",
) -> Callable[..., Any]:
    """``⟨g_i, g'_j⟩`` between the per-example gradients of two batches, never materialised.

    ``g_i = ∂ℓ(x_i, y_i)/∂θ`` (unscaled, as everywhere in jbp). Per leaf, the dot
    products are formed from the two batches' factors (:mod:`jbp.layers._factors`):
    an outer-product leaf (Dense, Conv, attention projections) by the cross-Gram
    ("ghost") form ``Σ_{t,s} (ã_it·ã'_js)(δ_it·δ'_js)`` or by forming this one leaf's
    ``g`` on both sides and multiplying, whichever costs fewer flops (Dense on
    ``(batch, features)``: the Gram form, ``(ã_i·ã'_j)(δ_i·δ'_j)``, about
    ``2·B·B'·(I + O)`` flops against ``2·B·B'·I·O``); an embedding table by the
    token-equality form ``Σ_{t,s} [tok_it = tok'_js](δ_it·δ'_js)`` or per-example
    tables; an elementwise leaf (biases, norm scales) from its ``(batch, F)``
    gradients. A leaf shared by two layers (:class:`jbp.Tied`) sums over the pairs
    of uses, cross terms included. Memory: ``O(B·B')`` plus the activations (and
    one leaf's per-example gradients where that form is taken).

    Args:
      net, loss: the network and loss.
      per_layer: return ``{"layers[i]": (B, B')}``, one matrix per top-level layer
        with params (they add up to the total).
      cosine: return ``⟨g_i, g'_j⟩ / (‖g_i‖‖g'_j‖)`` instead (0 where a gradient is 0;
        per layer with ``per_layer``: each layer's own cosine).
      method: ``"auto"``, ``"gram"`` or ``"materialise"`` (one form everywhere).

    Returns:
      ``fn(params, x, y, x_other=None, y_other=None, *, mask=None, mask_other=None)``:
      the ``(B, B_other)`` matrix (or the dict). ``x_other=None``: the batch against
      itself (``(B, B)``, the squared norms on its diagonal). ``mask`` /
      ``mask_other``: padding masks ``(batch, T)`` of sequence batches.

    Example:
      >>> import jax, jax.numpy as jnp, jbp
      >>> net = jbp.mlp([3, 4, 2])
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.ones((5, 3), jnp.float32), jnp.zeros((5, 2), jnp.float32)
      >>> dots = jbp.per_example_dots(net, "mse")(params, x, y, x[:2], y[:2])
      >>> dots.shape
      (5, 2)
    """
    net, loss = _setup(net, loss)
    check_method(method)

    def fn(
        params: Params, x: Any, y: Any, x_other: Any = None, y_other: Any = None, *,
        mask: Any = None, mask_other: Any = None,
    ) -> Any:  # fmt: skip
        if (x_other is None) != (y_other is None):
            raise ValueError(
                "`x_other` and `y_other` go together: give both (another batch) or neither "
                f"(the batch against itself); got x_other={'None' if x_other is None else 'an array'}"
                f" and y_other={'None' if y_other is None else 'an array'}"
            )
        run, _ = _start(net, loss, params, x, y, mask, None, None)
        factors = run.factors()
        other = factors
        if x_other is not None:
            other = _start(net, loss, params, x_other, y_other, mask_other, None, None)[0].factors()
        dots = _per_layer(lambda f, g: cross(f, g, method), factors, other)
        if cosine:
            if x_other is None:  # the squared norms are the Gram's diagonal
                sq = sq_other = {k: jnp.diagonal(d) for k, d in dots.items()}
            else:
                sq = _per_layer(lambda f: sq_norm(f, method), factors)
                sq_other = _per_layer(lambda f: sq_norm(f, method), other)
            if not per_layer:
                total = lambda d: sum(d.values())  # noqa: E731
                return _cosine(total(dots), total(sq), total(sq_other))
            return {k: _cosine(dots[k], sq[k], sq_other[k]) for k in dots}
        return dots if per_layer else sum(dots.values())

    return fn


# --- TracIn over kept checkpoints ------------------------------------------------------


def _learning_rate(learning_rate: Any, name: str = "learning_rate") -> Callable[[Any], Any]:
    """A step → η function from a positive float or a schedule (e.g. an optax one)."""
    if callable(learning_rate):
        return learning_rate
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
        raise TypeError(
            f"`{name}` must be a positive float or a schedule step -> learning rate (the "
            f"optimiser's), got {type(learning_rate).__name__}"
        )
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"`{name}` must be a positive float, got {learning_rate!r}")
    return lambda step: learning_rate


class Proponents(NamedTuple):
    """The strongest training examples for each test example, strongest first.

    Attributes:
      proponents: ``(B_test, k)`` indices of the training examples with the largest
        influence (their steps lowered the test example's loss the most).
      opponents: ``(B_test, k)`` indices of the most negative influence (raised it).
      influence: ``(B_test, B_train)``, the TracIn influence they were ranked by.
    """

    proponents: np.ndarray
    opponents: np.ndarray
    influence: np.ndarray


class TracIn:
    """TracIn (Pruthi et al., 2020), TracInCP form, exact for every layer.

    Over checkpoints ``w_k`` with learning rates ``η_k``:

    - self-influence ``Σ_k η_k ‖g_i(w_k)‖²`` (high for mislabelled and atypical
      examples);
    - influence of training example ``j`` on test example ``t``:
      ``Σ_k η_k ⟨g_t(w_k), g_j(w_k)⟩`` (positive: a proponent, its gradient step
      lowered the test loss to first order; negative: an opponent).

    Gradients are unscaled per-example gradients ``∂ℓ_i/∂θ``, their dot products formed
    by :func:`per_example_dots` and their norms by :func:`jbp.per_example_norms`, never
    materialised; the training set is taken in chunks of ``chunk_size`` rows (one
    compilation per checkpoint shape).

    Args:
      net, loss: the network and loss the checkpoints were trained with.
      checkpoints: a sequence of ``(params, learning_rate)`` pairs, each learning
        rate a positive number (:meth:`from_run` reads them from a schedule).
      method: as in :func:`per_example_dots`.
      chunk_size: training rows per dot-product call.
    """

    def __init__(
        self,
        net: Any,
        loss: str | Loss,
        checkpoints: Sequence[tuple[Params, float]],
        *,
        method: str = "auto",
        chunk_size: int = 512,
    ) -> None:
        self.net, self.loss = _setup(net, loss)
        checkpoints = list(checkpoints)
        if not checkpoints or not all(
            isinstance(c, (tuple, list)) and len(c) == 2 for c in checkpoints
        ):
            raise ValueError(
                "`checkpoints` must be a non-empty sequence of (params, learning_rate) pairs, "
                f"got {type(checkpoints).__name__} of {len(checkpoints)}"
            )
        self.params = [p for p, _ in checkpoints]
        self.learning_rates = [
            check_number(f"checkpoints[{k}] learning rate", float(np.asarray(lr)), low=0)
            for k, (_, lr) in enumerate(checkpoints)
        ]
        check_count("chunk_size", chunk_size)
        self.chunk_size = chunk_size
        self._dots = jax.jit(per_example_dots(self.net, self.loss, method=check_method(method)))
        self._norms = jax.jit(per_example_norms(self.net, self.loss, method=method))
        self.steps: tuple[int, ...] | None = None

    @classmethod
    def from_run(
        cls, run_dir: str | os.PathLike, net: Any, loss: str | Loss, learning_rate: Any,
        **kwargs: Any,
    ) -> TracIn:  # fmt: skip
        """The params a :func:`jbp.fit` run kept (``keep_every=k``: ``params/step_*.npz``),
        each weighted by ``η_k = learning_rate(step_k)``, the learning rate of the update
        that followed it (a float for a constant one; an optax schedule counts updates
        from 0, as the optimiser does)."""
        folder = os.path.join(os.fspath(run_dir), PARAMS)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        names = [n for n in names if n.startswith("step_") and n.endswith(".npz")]
        if not names:
            raise ValueError(
                f"{run_dir} keeps no params for TracIn ({PARAMS}/step_*.npz): train with "
                "jbp.fit(..., run_dir=..., keep_every=k)"
            )
        schedule = _learning_rate(learning_rate)
        net = check_net(net)
        checkpoints, steps = [], []
        for name in names:
            params, extra = read_params(os.path.join(folder, name), net)
            steps.append(int(extra["step"]))
            checkpoints.append((params, float(schedule(steps[-1]))))
        tracin = cls(net, loss, checkpoints, **kwargs)
        tracin.steps = tuple(steps)
        return tracin

    def _chunks(self, x: Any, y: Any, mask: Any) -> Iterator[tuple[int, Any, Any, Any]]:
        """``(rows, x, y, mask)`` chunks of ``chunk_size`` rows, the last padded with
        copies of the first row (one shape, one compilation)."""
        x, y = np.asarray(x), np.asarray(y)
        n, size = x.shape[0], self.chunk_size
        for start in range(0, n, size):
            idx = np.arange(start, start + size) if n > size else np.arange(n)
            idx = np.where(idx < n, idx, 0)
            rows = min(size, n - start)
            yield rows, x[idx], y[idx], None if mask is None else np.asarray(mask)[idx]

    def self_influence(self, x: Any, y: Any, *, mask: Any = None) -> np.ndarray:
        """``Σ_k η_k ‖g_i(w_k)‖²`` for every example, ``(B,)`` float64."""
        out = []
        for rows, xc, yc, mc in self._chunks(x, y, mask):
            total = np.zeros(rows)
            for params, lr in zip(self.params, self.learning_rates, strict=True):
                norms = np.asarray(self._norms(params, xc, yc, mask=mc), np.float64)[:rows]
                total += lr * norms**2
            out.append(total)
        return np.concatenate(out)

    def influence(
        self, x_test: Any, y_test: Any, x_train: Any, y_train: Any, *,
        mask_test: Any = None, mask_train: Any = None,
    ) -> np.ndarray:  # fmt: skip
        """``Σ_k η_k ⟨g_t(w_k), g_j(w_k)⟩``, ``(B_test, B_train)`` float64."""
        out = []
        for rows, xc, yc, mc in self._chunks(x_train, y_train, mask_train):
            total = np.zeros((np.shape(x_test)[0], rows))
            for params, lr in zip(self.params, self.learning_rates, strict=True):
                d = self._dots(params, x_test, y_test, xc, yc, mask=mask_test, mask_other=mc)
                total += lr * np.asarray(d, np.float64)[:, :rows]
            out.append(total)
        return np.concatenate(out, axis=1)

    def proponents(
        self, x_test: Any, y_test: Any, x_train: Any, y_train: Any, k: int = 5, **masks: Any
    ) -> Proponents:
        """The ``k`` strongest proponents and opponents of each test example."""
        check_count("k", k)
        influence = self.influence(x_test, y_test, x_train, y_train, **masks)
        order = np.argsort(-influence, axis=1, kind="stable")
        k = min(k, influence.shape[1])
        return Proponents(order[:, :k], order[:, ::-1][:, :k], influence)


# --- in-run first-order data Shapley ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InRunShapley:
    """First-order in-run data Shapley during :func:`jbp.fit` (Wang et al., ICLR 2025).

    At every step ``t`` each example ``i`` of the batch gains
    ``η_t · s · ⟨g_val(w_t), g_i(w_t)⟩``: ``g_val`` the mean gradient of a validation
    batch, ``g_i`` the example's unscaled gradient, ``s`` its weight in the batch
    gradient (``1/B`` for a mean loss, 1 for a sum). Positive: the example's share of
    the step lowered the validation loss (to first order). For plain SGD with learning
    rate ``η_t`` a step's values add up to the first-order decrease of the validation
    loss, ``⟨g_val, η_t ĝ⟩``. With any other optimiser (momentum, Adam) the values
    still use the raw gradient direction ``η_t·s·g_i``: they say how the step would
    have moved the validation loss under SGD at the current parameters, not how the
    preconditioned update did (Adam's update is not linear in the ``g_i``; the paper
    leaves this open too).

    The validation rows join the step's forward and backward pass; the training
    gradient is formed from the training rows' factors (not recomputed) and each
    ``⟨g_val, g_i⟩`` by the cross-Gram ("ghost dot product") mean over the validation
    rows or, where it costs fewer flops, as ``⟨g_i, g_val⟩`` with ``g_val`` formed once
    (one weight-gradient-sized matmul per layer); no ``g_i`` is materialised.

    Args:
      x, y: the validation set, as the data set's splits (inputs, integer labels).
      learning_rate: the optimiser's learning rate: a float or a schedule
        ``step -> η`` (the optax schedule the optimiser was built with).
      batch_size: validation rows per step, drawn without replacement by
        ``(seed, step)`` (so a resumed run draws the same); None: all of them.
      mask: the validation set's padding mask for sequence data.
      seed: seeds the validation batches.
    """

    x: Any
    y: Any
    learning_rate: Any
    batch_size: int | None = None
    mask: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "learning_rate", _learning_rate(self.learning_rate))
        if self.batch_size is not None:
            check_count("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {self.seed!r}")

    def rows(self, n: int, step: int) -> np.ndarray:
        """The validation rows of ``step`` (all ``n`` without a batch size)."""
        if self.batch_size is None or self.batch_size >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng([self.seed, step]).choice(n, self.batch_size, False))
