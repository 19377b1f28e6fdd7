"""Finding mislabelled examples by their per-example gradient norms.

Flip a share of the training labels, train, and rank the training examples by
‖g_i‖ = ‖∂ℓ_i/∂θ‖ (from ``per_example_norms``: one backward pass, no g_i
formed). A flipped label makes its example's loss, and so its gradient, large
for as long as the network has not memorised it; the ranking is scored with
the AUROC and precision at k against the set of flipped examples, beside the
same ranking by per-example loss. The simple gradient noise scale (McCandlish
et al. 2018) is tracked over training from the same per-example norms.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._data import Dataset, batches
from ._losses import get_loss
from ._per_example import gradient_noise_scale, per_example_norms
from ._train import evaluate, init_state, make_step
from .layers import Sequential, mlp

_CHUNK = 512  # examples per jitted call when scoring a whole training set


def flip_labels(
    labels: Any, fraction: float, n_classes: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Give ``round(fraction·n)`` examples, chosen at random, a wrong label.

    Args:
      labels: ``(n,)`` integer class labels in ``[0, n_classes)``.
      fraction: the share of labels to flip, in ``[0, 1]``.
      n_classes: the number of classes (at least 2).
      seed: seeds the choice of examples and of their new labels.

    Returns:
      ``(noisy, flipped)``: ``(n,)`` int32 labels, each flipped one replaced by
      one of the other ``n_classes − 1`` classes uniformly at random, and the
      ``(n,)`` boolean mask of flipped examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`labels` must be integer class labels of shape (n,), got {labels.dtype.name} "
            f"of shape {labels.shape}"
        )
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"`n_classes` must be an int >= 2, got {n_classes!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"`labels` lie in [{labels.min()}, {labels.max()}], outside [0, {n_classes - 1}]"
        )
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"`fraction` must be a number in [0, 1], got {fraction!r}")
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    noisy = labels.astype(np.int32).copy()
    # A shift of 1..n_classes-1 classes lands on each other class with equal odds.
    noisy[chosen] = (noisy[chosen] + rng.integers(1, n_classes, chosen.size)) % n_classes
    flipped = np.zeros(n, bool)
    flipped[chosen] = True
    return noisy, flipped


def _check_scores(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray]:
    s, p = np.asarray(scores, np.float64), np.asarray(positives)
    if s.ndim != 1 or p.shape != s.shape:
        raise ValueError(
            f"`scores` and `positives` must be 1-D of one length, got shapes {s.shape} and "
            f"{p.shape}"
        )
    if p.dtype != np.bool_:
        raise TypeError(f"`positives` must be a boolean mask, got dtype {p.dtype.name}")
    if not np.all(np.isfinite(s)):
        raise ValueError("`scores` contain NaN or Inf")
    return s, p


def auroc(scores: Any, positives: Any) -> float:
    """The area under the ROC curve of ranking by ``scores`` (higher = positive).

    The Mann–Whitney form: the probability that a random positive scores
    higher than a random negative, ties counting one half (average ranks).

    Args:
      scores: ``(n,)`` real scores.
      positives: ``(n,)`` boolean mask of the positive examples.

    Returns:
      The AUROC in [0, 1] (0.5 is chance); NaN if either class is empty.
    """
    s, p = _check_scores(scores, positives)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, np.float64)
    sorted_s = s[order]
    # Average 1-based ranks over runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for lo, hi in zip(starts, ends, strict=True):
        ranks[order[lo:hi]] = 0.5 * (lo + 1 + hi)
    u = ranks[p].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def precision_at_k(scores: Any, positives: Any, k: int) -> float:
    """The share of positives among the ``k`` highest-scoring examples.

    Args:
      scores: ``(n,)`` real scores.
      positives: ``(n,)`` boolean mask.
      k: how many top examples, ``1 ≤ k ≤ n``.
    """
    s, p = _check_scores(scores, positives)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= s.size:
        raise ValueError(f"`k` must be an int in [1, {s.size}], got {k!r}")
    top = np.argsort(-s, kind="stable")[:k]
    return float(p[top].mean())


@dataclasses.dataclass(frozen=True)
class LabelNoiseStudy:
    """What :func:`label_noise_study` found.

    Attributes:
      net: the trained network; ``params`` its final parameters.
      params: the final parameters.
      labels: ``(n_train,)`` the training labels used (with the flips).
      flipped: ``(n_train,)`` boolean mask of flipped labels.
      norms: ``(n_train,)`` ‖g_i‖ at the end of training.
      losses: ``(n_train,)`` ℓ_i at the end of training.
      auroc_norm, auroc_loss: AUROC of ranking by norm / by loss.
      precision: ``{k: precision at k}`` of the norm ranking for the k in
        ``top_ks`` (k = the number of flipped labels included).
      history: one dict per epoch: ``epoch``, ``step``, ``train_loss``,
        ``test_accuracy``, ``auroc_norm``, ``auroc_loss``, ``b_simple``,
        ``trace_cov``, ``grad_sq_norm`` (see :func:`jbp.gradient_noise_scale`).
      test_accuracy: accuracy on the clean test split at the end.
      seconds: wall time.
    """

    net: Sequential
    params: Any
    labels: np.ndarray
    flipped: np.ndarray
    norms: np.ndarray
    losses: np.ndarray
    auroc_norm: float
    auroc_loss: float
    precision: dict[int, float]
    history: tuple[dict[str, Any], ...]
    test_accuracy: float
    seconds: float

    def top(self, k: int) -> list[tuple[int, float, float, bool]]:
        """The ``k`` largest norms: ``(index, norm, loss, flipped)``, largest first."""
        order = np.argsort(-self.norms, kind="stable")[:k]
        return [
            (int(i), float(self.norms[i]), float(self.losses[i]), bool(self.flipped[i]))
            for i in order
        ]


def _scorer(net: Sequential, loss_name: str) -> Callable[[Any, np.ndarray, np.ndarray], tuple]:
    """``(params, x, labels) -> (norms, losses)`` over a whole set, in jitted chunks."""
    loss = get_loss(loss_name)
    norms_fn = jax.jit(per_example_norms(net, loss))

    @jax.jit
    def losses_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        out, _ = net.forward(params, x)
        return loss.per_example(out, y)

    def score(params: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        norms, losses = [], []
        for start in range(0, x.shape[0], _CHUNK):
            xs, ys = jnp.asarray(x[start : start + _CHUNK]), jnp.asarray(y[start : start + _CHUNK])
            norms.append(np.asarray(norms_fn(params, xs, ys)))
            losses.append(np.asarray(losses_fn(params, xs, ys)))
        return np.concatenate(norms), np.concatenate(losses)

    return score


def label_noise_study(
    data: Dataset,
    *,
    noise: float = 0.1,
    hidden: Sequence[int] = (64,),
    activation: str = "relu",
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    top_ks: Sequence[int] = (10, 50),
    log: Callable[[dict[str, Any]], None] | None = None,
) -> LabelNoiseStudy:
    """Flip labels, train an MLP with ``softmax_xent`` and adam, rank by ‖g_i‖.

    After every epoch every training example gets its ‖g_i‖ (and ℓ_i) under the
    current params, the rankings are scored against the flipped set, and the
    gradient noise scale ``B_simple = tr(Σ)/‖G‖²`` of the training set is
    computed exactly, by :func:`jbp.gradient_noise_scale` with
    ``unbiased=False`` on the whole training split (the unbiased small-batch
    estimates go negative once the gradient is small, as it is late in
    training).

    Args:
      data: a :class:`Dataset` with integer labels (e.g. ``load_dataset("digits")``).
      noise: the share of training labels to flip.
      hidden: hidden layer widths of the MLP.
      activation: hidden activation.
      epochs, batch_size, learning_rate, seed: the training run (adam).
      top_ks: the k of the precision at k reported (plus k = number flipped).
      log: called with each epoch's history record as it is made.

    Returns:
      A :class:`LabelNoiseStudy`.
    """
    start = time.perf_counter()
    n_classes = int(data.n_classes)
    labels, flipped = flip_labels(data.y_train, noise, n_classes, seed=seed)
    n = labels.shape[0]
    net = mlp([data.n_features, *hidden, n_classes], activation)
    optimizer = optax.adam(learning_rate)
    state = init_state(net, optimizer, jax.random.key(seed))
    step = make_step(net, "softmax_xent", optimizer)
    score = _scorer(net, "softmax_xent")
    gns = jax.jit(gradient_noise_scale(net, "softmax_xent", unbiased=False))
    x = np.asarray(data.x_train, np.float32)
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        losses = []
        for xb, yb in batches(x, labels, batch_size, seed=seed, epoch=epoch):
            state, metrics = step(state, jnp.asarray(xb), jnp.asarray(yb))
            losses.append(float(metrics["loss"]))
        norms, per_loss = score(state.params, x, labels)
        parts = gns(state.params, x, labels)
        trace, g2 = float(parts.trace_cov), float(parts.grad_sq_norm)
        record = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "train_loss": float(np.mean(losses)),
            "test_accuracy": evaluate(net, "softmax_xent", state.params, data.x_test, data.y_test)[
                "accuracy"
            ],
            "auroc_norm": auroc(norms, flipped),
            "auroc_loss": auroc(per_loss, flipped),
            "b_simple": float(parts.b_simple),
            "trace_cov": trace,
            "grad_sq_norm": g2,
        }
        history.append(record)
        if log is not None:
            log(record)
    ks = sorted({k for k in (*top_ks, int(flipped.sum())) if 1 <= k <= n})
    return LabelNoiseStudy(
        net=net,
        params=state.params,
        labels=labels,
        flipped=flipped,
        norms=norms,
        losses=per_loss,
        auroc_norm=auroc(norms, flipped),
        auroc_loss=auroc(per_loss, flipped),
        precision={k: precision_at_k(norms, flipped, k) for k in ks},
        history=tuple(history),
        test_accuracy=history[-1]["test_accuracy"] if history else math.nan,
        seconds=time.perf_counter() - start,
    )


def plot_label_noise(study: LabelNoiseStudy, out_dir: str | os.PathLike) -> list[str]:
    """Write ``label_noise_hist.png`` (‖g_i‖ of clean vs flipped examples) and
    ``label_noise_training.png`` (AUROC and the noise scale per epoch) to ``out_dir``.

    Returns:
      The paths written. Needs matplotlib (the ``experiments`` extra).
    """
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    logn = np.log10(np.maximum(study.norms, 1e-12))
    bins = np.linspace(logn.min(), logn.max(), 40).tolist()
    ax.hist(logn[~study.flipped], bins=bins, alpha=0.6, label=f"clean ({(~study.flipped).sum()})")
    ax.hist(logn[study.flipped], bins=bins, alpha=0.6, label=f"flipped ({study.flipped.sum()})")
    ax.set_xlabel("log10 ‖g_i‖ (per-example gradient norm, end of training)")
    ax.set_ylabel("training examples")
    ax.set_title(f"AUROC {study.auroc_norm:.3f} (by loss {study.auroc_loss:.3f})")
    ax.legend()
    paths.append(os.path.join(out_dir, "label_noise_hist.png"))
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(6.4, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    epochs = [r["epoch"] for r in study.history]
    top.plot(epochs, [r["auroc_norm"] for r in study.history], marker="o", label="by ‖g_i‖")
    top.plot(epochs, [r["auroc_loss"] for r in study.history], marker=".", ls="--", label="by ℓ_i")
    top.plot(epochs, [r["test_accuracy"] for r in study.history], ls=":", label="test accuracy")
    top.set_ylabel("AUROC (flipped labels), accuracy")
    top.legend()
    bottom.plot(epochs, [r["b_simple"] for r in study.history], marker="o")
    bottom.set_yscale("log")
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("B_simple = tr(Σ)/‖G‖²")
    paths.append(os.path.join(out_dir, "label_noise_training.png"))
    fig.savefig(paths[-1], dpi=120)
    return paths
