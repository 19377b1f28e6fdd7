"""The training loop: seeded batches, evaluation, a live gradient check, metrics,
checkpoints, NaN detection, early stopping and exact resume.

A run folder holds ``metrics.jsonl`` (one JSON record per epoch) and
``checkpoint.npz`` (the latest state, written atomically at every epoch end,
every ``checkpoint_every`` steps and when ``max_steps`` stops the run). The
batch order of an epoch is a function of ``(seed, epoch)`` only
(:func:`jbp._data.permutation`, drawn on the device), so a run resumed from
step ``k`` skips the batches of its epoch already done and reaches step ``n``
with bitwise the same state as an uninterrupted run. All output goes through
a :class:`RunFolder`, which writes on process 0 only.

No avoidable host round-trips. The data set is uploaded once (each split's
inputs, targets, labels and mask; replicated on every device of a ``mesh``)
and stays on the device; each step's batch is gathered there by the epoch's
permutation, itself drawn on the device from the state's step. A step is one
dispatch of a jitted function whose arguments already lie on the device, and
it *donates* the carry (params, optimiser state, key, the run's sums): XLA
updates them in place instead of holding two copies. Once set up, an epoch
uploads nothing (tested under ``jax.transfer_guard_host_to_device("disallow")``);
private training uploads its epoch's Poisson samples (indices and example
masks, from the same host sampler as before) once at the epoch's start, and
in-run Shapley its epoch's validation rows when they are drawn.

The loop does not wait for the device after each step. The state stays on
the device in a :class:`Carry` with a first-bad-step marker
(:func:`guarded_step`): the step that first gives a non-finite loss, gradient
or parameter norm, or fails the live gradient check, is recorded there with
its figures and no update is applied from then on, so the state on the device
stays the last good one. The epoch's sums (Σ of the batch losses, examples,
steps) accumulate in the carry too. The host reads the marker and the sums
together, a handful of scalars in one transfer, every ``READ_EVERY`` steps
and before anything that needs them (a checkpoint, kept params, the end of an
epoch or of the run), and then raises :class:`TrainingError` naming the first
bad step and carrying that last good state.

The live gradient check (``check_every``) runs before the step that donates
the params it reads: one jitted program computes both gradients on the
step's batch under ``jax.default_matmul_precision("highest")`` and reduces
them on the device to per-leaf figures (``max |a − b|``, the reference's
scale, the relative error, bitwise equality, finiteness and the verdict;
:func:`jbp.compare`'s measure), which the step takes as an input: a failed
check stops the updates like a non-finite step. Only the figures are read,
with the next read of the sums.

Determinism. On CPU a run is bitwise reproducible and a resumed run equals an
uninterrupted one bitwise (tested). On a GPU the batch order and the Poisson
samples are the same as on CPU (threefry, a stable sort, numpy), but XLA:GPU
may sum in a different order from run to run where it uses atomics
(scatter-adds, e.g. the gradient of an ``Embedding``'s table, and some
reductions): then two runs, or a resumed and an uninterrupted one, agree to
round-off, not bitwise. ``XLA_FLAGS=--xla_gpu_deterministic_ops=true`` (set
before JAX starts) makes XLA:GPU choose deterministic kernels, at some cost in
speed; the in-run data values' scatter-add is deterministic anyway (a batch's
rows are distinct).

:func:`fit` checks its arguments once, at this public boundary, into a
:class:`Plan` and a :class:`Data` (:mod:`jbp._train_checks`); everything
inside takes those.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax import lax
from jax.sharding import Mesh

from ._attribution import InRunShapley
from ._backprop import backprop, objective
from ._checkpoint import CHECKPOINT, CheckpointError, RunFolder
from ._data import order_key, permutation
from ._losses import Loss
from ._precision import mixed_rtol
from ._privacy import Privacy
from ._progress import Progress
from ._report import DEFAULT_RTOL, PRECISION, ZERO_ULPS, LeafRow, Report, _layer_of
from ._sharding import batch_sharded, replicate, replicated
from ._train import (
    StepFn,
    TrainingError,
    TrainState,
    build_step,
    evaluate_checked,
    fresh_state,
    make_dp_step,
)
from ._train_checks import Data, Plan, Split, check_data, check_split
from ._train_private import PrivateRun
from ._train_shapley import shapley_step
from ._verify import compute_dtype
from .layers._dropout import has_dropout

SHAPLEY = "shapley.npy"  # fit(shapley=...): the in-run data values, one per training example
READ_EVERY = 50  # most steps dispatched between two host reads of the run's sums
CHECK_PRECISION = PRECISION  # the live check's matmul precision: every check's ("highest")
CHECK_NAMES = ("manual (jbp.backprop)", "autodiff (jax.grad)")
_WATCHED = {"loss": "loss", "grad_norm": "gradients", "param_norm": "parameters"}
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`TrainState`.
      history: one record per completed epoch (with those before a resume):
        ``epoch``, ``step``, ``gradient_source``, ``batch_loss`` (mean ℓ_i over
        the epoch's batches as they were seen, summed on the device in the
        loss's dtype, at least float32), ``train_loss``, ``train_accuracy``,
        ``test_loss``, ``test_accuracy`` (mean ℓ_i and accuracy at the epoch's
        end; None without a test split), ``grad_check_max_rel_err`` (worst over
        the epoch's live checks, None if none ran), ``grad_checks``,
        ``grad_check_precision`` (the checks' matmul precision, ``"highest"``;
        None if none ran), ``step_time`` (seconds per step spent dispatching
        steps and waiting for the device, the first epoch's including
        compilation) and ``epoch_time``.
      stop_reason: ``"epochs"``, ``"early_stopping"``, ``"max_steps"`` or
        ``"privacy_budget"`` (the next step would have spent more than the
        target ε).
      run_dir: the run folder, or None.
      shapley: with ``shapley=``, every training example's in-run data value
        ``(n_train,)`` float64 (:class:`jbp.InRunShapley`; summed on the device
        in float64 when JAX has it enabled, else float32), else None.
      privacy: for a private run, its configuration (``noise_multiplier``,
        ``sampling_rate``, ``max_norm``, ``delta``, ``accountant``, ...) with
        ``steps`` and ``epsilon``, the ε spent by them; else None.
    """

    state: TrainState
    history: tuple[dict[str, Any], ...]
    stop_reason: str
    run_dir: str | None
    privacy: dict[str, Any] | None = None
    shapley: np.ndarray | None = None


class Sums(NamedTuple):
    """The current epoch's running sums, kept on the device (the step that starts an
    epoch zeroes them before adding itself).

    Attributes:
      loss_sum: Σ over the epoch's good steps of ``C / loss.scale(batch)`` (a
        private step: its mean ℓ_i times its examples), in the sums' dtype.
      examples: int32, the examples those steps saw.
      steps: int32, how many steps.
      last_loss: the latest good step's ``C``.
    """

    loss_sum: Any
    examples: Any
    steps: Any
    last_loss: Any


class Carry(NamedTuple):
    """What the guarded step carries on the device from one step to the next
    (and donates to the next step: the arrays of a carry passed to a step are
    deleted, the step returns their successors).

    Attributes:
      state: the :class:`TrainState`, the last good one once a step has failed
        (inside :func:`fit`'s loop its key is held as raw key data).
      bad_step: int32 scalar, -1 while every step has been good, else the first
        step whose loss, gradient norm or parameter norm was not finite or
        whose live check failed.
      bad_metrics: ``(3,)`` that step's loss, gradient norm and parameter norm.
      failed_check: bool scalar, whether that step's metrics were finite (so it
        failed the live check).
      sums: the epoch's :class:`Sums`.
      values: the in-run data values ``(n_train,)`` of ``fit(shapley=...)``, else None.
    """

    state: TrainState
    bad_step: Any
    bad_metrics: Any
    failed_check: Any
    sums: Any
    values: Any = None


def _widest_float() -> Any:
    """float64 where JAX has it enabled, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _sums_dtype(params: Any) -> Any:
    """The sums' dtype: the params' floating dtype, at least float32."""
    floats = [
        leaf.dtype for leaf in jtu.tree_leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    return jnp.promote_types(jnp.result_type(*floats) if floats else jnp.float32, jnp.float32)


def new_carry(
    state: TrainState,
    *,
    loss_sum: float = 0.0,
    examples: int = 0,
    steps: int = 0,
    values: Any = None,
) -> Carry:
    """A :class:`Carry` for ``state`` with no bad step, the epoch's sums so far
    (zero for a new epoch) and the in-run data values (or None), as host values:
    put it on the device once, before the first step."""
    dtype = _sums_dtype(state.params)
    sums = Sums(
        np.asarray(loss_sum, dtype),
        np.int32(examples),
        np.int32(steps),
        np.asarray(math.nan, dtype),
    )
    if values is not None:
        values = np.asarray(values, _widest_float())
    bad = np.full(3, math.nan, dtype)
    return Carry(state, np.int32(-1), bad, np.bool_(False), sums, values)


def _count(sums: Sums, metrics: dict[str, Array], rows: int, loss: Loss, keep: Array) -> Sums:
    """The sums with one step added if it was applied (``keep``)."""
    dtype = sums.loss_sum.dtype
    value = metrics["loss"].astype(dtype)
    if "examples" in metrics:  # a private step: the mean ℓ_i over its real examples
        n = metrics["examples"].astype(jnp.int32)
        part = value * n.astype(dtype)
    else:
        n = jnp.int32(rows)
        part = value * jnp.asarray(1.0 / loss.scale(rows), dtype)
    return Sums(
        jnp.where(keep, sums.loss_sum + part, sums.loss_sum),
        jnp.where(keep, sums.examples + n, sums.examples),
        sums.steps + keep.astype(jnp.int32),
        jnp.where(keep, value, sums.last_loss),
    )


GuardedStep = Callable[..., tuple[Carry, dict[str, Array]]]


def guarded_step(step: StepFn, loss: Loss) -> GuardedStep:
    """``step`` on a :class:`Carry`: ``run(carry, ok, x, y, mask=None, *rest)``.
    Once a step is non-finite or ``ok`` (its live check's verdict, a bool scalar)
    is False, its update and every later one are dropped on the device (the state
    is selected, bitwise, from the one before) and the marker keeps that step's
    number and figures; a good step adds to the epoch's sums. Returns the next
    carry and the step's metrics with ``"applied"``, whether its update was."""

    def run(
        carry: Carry, ok: Array, x: Any, y: Any, mask: Any = None, *rest: Any
    ) -> tuple[Carry, dict[str, Array]]:
        new, metrics = step(carry.state, x, y, mask, *rest)
        finite = functools.reduce(operator.and_, (jnp.isfinite(metrics[k]) for k in _WATCHED))
        clean = carry.bad_step < 0
        keep = finite & ok & clean
        state = jtu.tree_map(lambda a, b: lax.select(keep, a, b), new, carry.state)
        first = clean & ~keep
        dtype = carry.bad_metrics.dtype
        watched = jnp.stack([metrics[k].astype(dtype) for k in _WATCHED])
        carry = Carry(
            state,
            jnp.where(first, carry.state.step, carry.bad_step),
            jnp.where(first, watched, carry.bad_metrics),
            jnp.where(first, finite, carry.failed_check),
            _count(carry.sums, metrics, np.shape(x)[0], loss, keep),
            carry.values,
        )
        return carry, {**metrics, "applied": keep}

    return run


# --- the live check's figures, on the device -------------------------------------------


def check_figures(
    tested: Any, reference: Any, rtol: float, roundoff: float | None = None
) -> dict[str, Array]:
    """:func:`jbp.compare`'s measure, reduced on the device to per-leaf figures
    ``(leaves,)``: ``max_abs_err`` (of the difference in the leaf's dtype, at least
    float32), ``scale`` (the reference leaf's ``max |b|``, or the largest leaf's for a
    leaf that is zero to round-off), ``rel_err``, ``bitwise``, ``finite_tested``,
    ``finite_reference``, ``ok`` per leaf, and ``all_ok``, the verdict (a bool
    scalar). ``roundoff``: the ε of the zero rule (as :func:`jbp.compare`'s; None:
    each reference leaf's dtype's). Traceable; the two trees have one structure and
    shapes."""
    wide = _widest_float()
    stats, eps = [], []
    for a, b in zip(jtu.tree_leaves(tested), jtu.tree_leaves(reference), strict=True):
        w = jnp.promote_types(b.dtype, jnp.float32)
        aw, bw = a.astype(w).ravel(), b.astype(w).ravel()
        if a.dtype == b.dtype and jnp.issubdtype(a.dtype, jnp.floating):
            bits = jnp.dtype(f"uint{8 * a.dtype.itemsize}")
            differ = lax.bitcast_convert_type(a, bits) != lax.bitcast_convert_type(b, bits)
        else:
            differ = jnp.broadcast_to(a.dtype != b.dtype, a.shape) | (a != b)
        # one reduction per leaf (its five maxima at once): XLA compiles each reduction
        # on its own, and a live check of a deep network has many leaves
        parts = [
            jnp.abs(aw - bw),
            jnp.abs(bw),
            ~jnp.isfinite(aw),
            ~jnp.isfinite(bw),
            differ.ravel(),
        ]
        stacked = jnp.stack([p.astype(w) for p in parts])
        stats.append(jnp.max(stacked, axis=1, initial=0).astype(wide))
        if roundoff is not None:
            eps.append(roundoff)
        else:
            eps.append(
                float(jnp.finfo(b.dtype).eps) if jnp.issubdtype(b.dtype, jnp.inexact) else 0.0
            )
    if not stats:  # a network without parameters: nothing to disagree on
        none = jnp.zeros((0,), wide)
        stats_t = (none, none, none, none, none)
    else:
        stats_t = tuple(jnp.stack(stats).T)
    err, scale, bad_a, bad_b, differ = stats_t
    fin_a, fin_b = bad_a == 0, bad_b == 0
    leaf_scale = jnp.where(fin_b, scale, 0)  # compare's: 0 for a leaf that is not finite
    top = jnp.max(leaf_scale, initial=0)
    zero = leaf_scale <= ZERO_ULPS * jnp.asarray(eps, wide) * top
    scale = jnp.where(zero, top, leaf_scale)
    ratio = err / jnp.where(scale > 0, scale, 1)
    rel = jnp.where(scale > 0, ratio, jnp.where(err == 0, 0, jnp.inf))
    finite = fin_a & fin_b
    ok = finite & ((rel <= rtol) | (err == 0))
    return {
        "max_abs_err": err, "scale": scale, "rel_err": rel, "bitwise": (differ == 0) & finite,
        "finite_tested": fin_a, "finite_reference": fin_b, "ok": ok,
        "all_ok": jnp.all(ok),
    }  # fmt: skip


def figures_report(
    figures: dict[str, np.ndarray], like: Any, rtol: float, dtype: str, layers: tuple[str, ...]
) -> Report:
    """The :class:`Report` of host-read :func:`check_figures` (the gradients shaped
    like ``like``), as :func:`jbp.compare` would give it, its verdicts the device's."""
    rows = []
    for i, (path, leaf) in enumerate(jtu.tree_leaves_with_path(like)):
        name = "params" + jtu.keystr(path)
        layer = _layer_of(path)
        shape = tuple(np.shape(leaf))
        ok = bool(figures["ok"][i])
        if not (figures["finite_tested"][i] and figures["finite_reference"][i]):
            side = CHECK_NAMES[0] if not figures["finite_tested"][i] else CHECK_NAMES[1]
            scale = float(figures["scale"][i])
            rows.append(
                LeafRow(
                    name,
                    layer,
                    shape,
                    math.nan,
                    scale,
                    math.nan,
                    False,
                    False,
                    f"non-finite values in {side}",
                )
            )
            continue
        rows.append(
            LeafRow(
                name,
                layer,
                shape,
                float(figures["max_abs_err"][i]),
                float(figures["scale"][i]),
                float(figures["rel_err"][i]),
                bool(figures["bitwise"][i]),
                ok,
            )
        )
    return Report(
        tuple(rows), CHECK_NAMES, float(rtol), dtype, CHECK_PRECISION, jax.default_backend(),
        layers=layers,
    )  # fmt: skip


# --- where a step's batch comes from ------------------------------------------------------


def _order_at(n: int, key: Array, step: Array, per_epoch: Array) -> Array:
    """The permutation of the epoch that holds ``step`` (``per_epoch`` steps an epoch,
    an int32 on the device: one compilation per data set size)."""
    return permutation(key, step // per_epoch, n)


# Compiled once per process and data set size for every run on one device (the
# step and check are closures of each run).
_ORDER = jax.jit(_order_at, static_argnums=0)


class _DeviceSplit(NamedTuple):
    """One split on the device: inputs, the loss's targets, int32 labels, mask or None."""

    x: Any
    y: Any
    labels: Any
    mask: Any


def _pick(a: Any, idx: Array) -> Any:
    """Rows ``idx`` of ``a`` (valid indices: no bounds handling), or None."""
    return None if a is None else a.at[idx].get(mode="promise_in_bounds")


class _Shuffled:
    """Shuffled batches of ``batch_size`` (the last of an epoch smaller): each
    epoch's permutation drawn on the device from the state's step, each batch
    gathered from the split on the device; with a mesh, a batch that divides
    over the devices is split along the data axis."""

    def __init__(self, loop: _Loop) -> None:
        self.loop = loop
        self.n = loop.data.meta["n_train"]
        self.batch_size = loop.plan.batch_size
        self.key = loop.put(order_key(loop.plan.seed))
        self.perm: Array | None = None
        self.per_epoch = loop.put(np.int32(loop.steps_per_epoch))
        self.order = loop.jit(_order_at, donate=False, static=("n",), shared=_ORDER)

    def start_epoch(self, epoch: int) -> None:
        state = self.loop.carry.state
        self.perm = self.order(self.n, self.key, state.step, self.per_epoch)

    def size(self, k: int) -> int:
        return min(self.batch_size, self.n - k * self.batch_size)

    def feed(self) -> Any:
        return (self.loop.train_split, self.perm)

    def take(self, feed: Any, k: Array, size: int) -> tuple[tuple[Any, ...], tuple[Any, ...], Any]:
        train, perm = feed
        idx = lax.dynamic_slice_in_dim(perm, k * self.batch_size, size)
        batch = tuple(_pick(a, idx) for a in (train.x, train.y, train.mask))
        mesh = self.loop.plan.mesh
        if mesh is not None and size % mesh.devices.size == 0:
            split = batch_sharded(mesh)
            batch = tuple(
                None if a is None else lax.with_sharding_constraint(a, split) for a in batch
            )
        return batch, (), idx


class _Poisson(_Shuffled):
    """Private training's Poisson samples (:class:`jbp.PoissonSampler`, on the host as
    before: the same batches and mechanism), uploaded once per epoch as indices and
    example masks ``(steps, rows)``, one pair per row count (a rare sample larger than
    the padding has its own); each batch gathered on the device, its padding rows
    zeros with an all-True position mask, as the sampler pads them."""

    def __init__(self, loop: _Loop) -> None:
        self.loop = loop
        self.samples: dict[int, tuple[Array, Array]] = {}
        self.widths: list[int] = []

    def start_epoch(self, epoch: int) -> None:
        loop = self.loop
        assert loop.private is not None
        sampler, per = loop.private.sampler, loop.steps_per_epoch
        drawn = [sampler.sample(step) for step in range(epoch * per, (epoch + 1) * per)]
        self.widths = [len(idx) for idx, _ in drawn]
        host = {}
        for w in sorted(set(self.widths)):
            idx = np.zeros((per, w), np.int32)
            em = np.zeros((per, w), bool)
            for k, (i, m) in enumerate(drawn):
                if len(i) == w:
                    idx[k], em[k] = i, m
            host[w] = (idx, em)
        self.samples = jax.device_put(host)  # the epoch's one upload

    def size(self, k: int) -> int:
        return self.widths[k]

    def feed(self) -> Any:
        return (self.loop.train_split, self.samples)

    def take(self, feed: Any, k: Array, size: int) -> tuple[tuple[Any, ...], tuple[Any, ...], Any]:
        train, samples = feed
        idx, em = (a[k] for a in samples[size])

        def rows(a: Any, fill: Any) -> Any:
            if a is None:
                return None
            real = jnp.reshape(em, (-1,) + (1,) * (a.ndim - 1))
            return jnp.where(real, _pick(a, idx), jnp.asarray(fill, a.dtype))

        return (rows(train.x, 0), rows(train.y, 0), rows(train.mask, True)), (em,), None


class _WithValidation(_Shuffled):
    """In-run Shapley's batches: shuffled training rows with their validation rows
    (:meth:`jbp.InRunShapley.rows`, drawn on the host as before and uploaded once per
    epoch; all of them, never uploaded again, without a validation batch size)."""

    def __init__(self, loop: _Loop) -> None:
        super().__init__(loop)
        self.val = loop.put(_device_split(loop.val))
        self.rows: Array | None = None

    def start_epoch(self, epoch: int) -> None:
        super().start_epoch(epoch)
        shapley, n = self.loop.plan.shapley, len(self.loop.val.labels)
        if shapley.batch_size is not None and shapley.batch_size < n:
            per = self.loop.steps_per_epoch
            steps = range(epoch * per, (epoch + 1) * per)
            self.rows = jax.device_put(
                np.stack([shapley.rows(n, s) for s in steps]).astype(np.int32)
            )

    def feed(self) -> Any:
        return (self.loop.train_split, self.perm, self.val, self.rows)

    def take(self, feed: Any, k: Array, size: int) -> tuple[tuple[Any, ...], tuple[Any, ...], Any]:
        train, perm, val, rows = feed
        batch, _, idx = super().take((train, perm), k, size)
        v = (val.x, val.y, val.mask)
        if rows is not None:
            v = tuple(_pick(a, rows[k]) for a in v)
        return batch, v, idx


def _device_split(split: Split) -> _DeviceSplit:
    return _DeviceSplit(split.x, split.y, split.labels, split.mask)


# --- the loop ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Tally:
    """The current epoch so far as the host last read it; a checkpoint keeps it as
    ``epoch_progress``."""

    loss_sum: float = 0.0  # Σ over the epoch's steps of C / loss.scale(batch)
    examples: int = 0
    steps: int = 0
    seconds: float = 0.0  # dispatching steps and waiting for them
    check: float | None = None  # worst relative error of the live checks
    checks: int = 0


@dataclasses.dataclass
class _Early:
    """Early stopping's state; a checkpoint keeps it as ``early_stopping``."""

    best: float | None = None
    bad_epochs: int = 0

    def update(self, value: float, min_delta: float) -> None:
        if math.isfinite(value) and (self.best is None or value < self.best - min_delta):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _pure_step(plan: Plan, private: PrivateRun | None) -> StepFn:
    if plan.shapley is not None:
        return shapley_step(plan.net, plan.loss, plan.optimizer, plan.shapley.learning_rate)
    if private is not None:
        assert private.noise_multiplier is not None
        p = private.privacy
        return make_dp_step(
            plan.net, plan.loss, plan.optimizer, max_norm=p.max_norm,
            noise_multiplier=private.noise_multiplier, expected_batch_size=plan.batch_size,
            physical_batch_size=p.physical_batch_size, jit=False,
        )  # fmt: skip
    return build_step(plan.net, plan.loss, plan.optimizer, plan.gradient_source)


def _raw_key(state: TrainState) -> TrainState:
    """``state`` with its key as raw key data: a carry of plain arrays takes JAX's
    fast dispatch path (a typed key in a jitted function's arguments and results
    costs tens of microseconds a call, about a small network's whole step)."""
    return state._replace(key=jr.key_data(state.key))


def _typed_key(state: TrainState, impl: Any) -> TrainState:
    return state._replace(key=jr.wrap_key_data(state.key, impl=impl))


def _unique_buffers(tree: Any) -> Any:
    """``tree`` with every leaf its own array (a step donates them all, and an array
    donated twice, e.g. an optimiser state that holds the params, would fail)."""
    seen: set[int] = set()

    def own(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or id(leaf) not in seen:
            seen.add(id(leaf))
            return leaf
        return jnp.array(leaf, copy=True)  # (the carry's key is raw key data by then)

    return jtu.tree_map(own, tree)


class _Loop:
    """One :func:`fit` run: the checked plan and data, the run folder, and what
    changes as it trains (the device carry, the step, the epoch's tally, early
    stopping, the history and the live checks whose figures are not read yet)."""

    def __init__(self, plan: Plan, data: Data, run: RunFolder) -> None:
        self.plan, self.data, self.run = plan, data, run
        n_train = data.meta["n_train"]
        self.private: PrivateRun | None = None
        self.steps_per_epoch = math.ceil(n_train / plan.batch_size)
        if plan.privacy is not None:
            self.private = PrivateRun(
                plan.privacy, n_train, plan.batch_size, plan.seed, plan.epochs
            )
            self.steps_per_epoch = self.private.steps_per_epoch
        self.values: np.ndarray | None = None  # in-run data values, as last read
        if plan.shapley is not None:
            v = plan.shapley
            names = ("shapley.x", "shapley.y", "shapley.mask")
            self.val = check_split(plan, v.x, v.y, v.mask, names)
            self.values = np.zeros(n_train)
        self.step = 0
        self.tally, self.early = _Tally(), _Early()
        self.history: list[dict[str, Any]] = []
        self.unread = 0  # steps dispatched since the last read
        self.pending: list[tuple[int, dict[str, Array]]] = []  # live checks not read yet
        self.last_loss: float | None = None
        self.state = fresh_state(plan.net, plan.optimizer, jr.key(plan.seed), plan.dtype)

    # -- device plumbing

    def put(self, tree: Any) -> Any:
        """``tree`` on the device (replicated on every device of the mesh): setup only."""
        mesh = self.plan.mesh
        return jax.device_put(tree) if mesh is None else replicate(tree, mesh)

    def jit(
        self,
        fn: Callable[..., Any],
        *,
        donate: bool,
        static: tuple[str, ...] = (),
        shared: Any = None,
    ) -> Any:
        """``jax.jit(fn)``, donating its first argument or not; on a mesh its results
        replicated; on one device ``shared`` where given (``fn`` compiled once for all
        runs)."""
        if shared is not None and self.plan.mesh is None:
            return shared
        kw: dict[str, Any] = {"static_argnames": static}
        if donate:
            kw["donate_argnums"] = 0
        if self.plan.mesh is not None:
            kw["out_shardings"] = replicated(self.plan.mesh)
        return jax.jit(fn, **kw)

    def _compile(self) -> None:
        """The run's device data and programs: the splits, the batch source, the step,
        and the live check."""
        plan, per_epoch = self.plan, self.steps_per_epoch
        self.train_split = self.put(_device_split(self.data.train))
        self.test_split = (
            None if self.data.test is None else self.put(_device_split(self.data.test))
        )
        if plan.shapley is not None:
            self.source: _Shuffled = _WithValidation(self)
        elif self.private is not None:
            self.source = _Poisson(self)
        else:
            self.source = _Shuffled(self)
        source, loss = self.source, plan.loss
        guarded = guarded_step(_pure_step(plan, self.private), loss)

        impl = self.key_impl

        def step(carry: Carry, feed: Any, ok: Array, size: int) -> Carry:
            k = carry.state.step % per_epoch
            batch, extra, rows = source.take(feed, k, size)
            fresh = jtu.tree_map(lambda a: jnp.where(k == 0, jnp.zeros_like(a), a), carry.sums)
            carry = carry._replace(state=_typed_key(carry.state, impl), sums=fresh)
            carry, metrics = guarded(carry, ok, *batch, *extra)
            if carry.values is not None:
                v = jnp.where(metrics["applied"], metrics["values"], 0).astype(carry.values.dtype)
                carry = carry._replace(values=carry.values.at[rows].add(v, unique_indices=True))
            return carry._replace(state=_raw_key(carry.state))

        self.step_fn = self.jit(step, donate=True, static=("size",))
        self.ok = self.put(np.bool_(True))
        self.check_fn = None
        if plan.check_every is not None:
            floats = [leaf.dtype for leaf in jtu.tree_leaves(self.state.params)]
            self.check_dtype = np.result_type(*floats).name if floats else "float32"
            # a Cast layer (mixed precision): verify's tolerance and zero rule, the compute dtype's
            low = compute_dtype(plan.net, None)
            default = DEFAULT_RTOL.get(self.check_dtype, 1e-4) if low is None else mixed_rtol(low)
            self.check_rtol = default if plan.check_rtol is None else float(plan.check_rtol)
            roundoff = None if low is None else float(jnp.finfo(low).eps)
            manual = backprop(plan.net, loss)
            reference = jax.grad(objective(plan.net, loss))  # reference
            dropout, seed, rtol = has_dropout(plan.net), plan.seed, self.check_rtol

            def check(state: TrainState, feed: Any, size: int) -> dict[str, Array]:
                (x, y, mask), _, _ = source.take(feed, state.step % per_epoch, size)
                key = jr.fold_in(jr.key(seed), state.step) if dropout else None
                kw = {"mask": mask, "dropout_key": key}
                a = manual(state.params, x, y, **kw)
                b = reference(state.params, x, y, **kw)
                return check_figures(a, b, rtol, roundoff)

            self.check_fn = self.jit(check, donate=False, static=("size",))

    def begin(self, resume: bool) -> None:
        """A fresh run, or the state, tally and history of the run being resumed;
        then the data and the carry on the device."""
        state, saved_privacy = self.state, None
        if resume:
            try:
                state, extra = self.run.load(self._saved(state))
            except CheckpointError as err:
                if "does not match the training state" not in str(err):
                    raise
                raise CheckpointError(
                    f"{err}; or it was written by a run {'without' if self.values is not None else 'with'}"
                    " `shapley` (in-run data values are kept with the state): resume as it was trained"
                ) from None
            if self.values is not None:
                state, values = state
                self.values = np.asarray(values, np.float64)
            saved_privacy = extra.get("privacy")
            if (saved_privacy is None) != (self.private is None):
                raise ValueError(
                    f"cannot resume {self.run.path(CHECKPOINT)}: it was written by a "
                    f"{'private' if saved_privacy else 'non-private'} run but this call is "
                    f"{'private' if self.private else 'not'}; resume as it was trained"
                )
            if extra.get("data") != self.data.meta:
                raise ValueError(
                    f"cannot resume {self.run.path(CHECKPOINT)}: it was written for data "
                    f"{extra.get('data')} but this run has {self.data.meta}; the batch order "
                    "depends on the data, batch size and seed"
                )
            self.tally = _Tally(**extra["epoch_progress"])
            self.early = _Early(**extra["early_stopping"])
            self.step = int(jax.device_get(state.step))
            self.history = self.run.history(self.step)
        elif self.run.has_checkpoint:
            raise ValueError(
                f"{self.run.dir} already holds a run ({CHECKPOINT}); pass resume=True to "
                "continue it, or choose a new `run_dir`"
            )
        else:
            self.run.start()
        if self.private is not None:
            self.private.resolve(saved_privacy)
            self.run.write_config(self.private.record())
        self.state = state
        self.key_impl = jr.key_impl(state.key)
        self._compile()
        t = self.tally
        carry = new_carry(
            state, loss_sum=t.loss_sum, examples=t.examples, steps=t.steps, values=self.values
        )
        carry = carry._replace(state=_raw_key(carry.state))
        self.carry = _unique_buffers(self.put(carry))

    def train(self) -> FitResult:
        """Epochs until ``epochs``, ``max_steps`` or early stopping."""
        plan, per_epoch = self.plan, self.steps_per_epoch
        epoch, skip = divmod(self.step, per_epoch)
        if self.step:
            self.run.say(
                f"resumed at step {self.step} (epoch {epoch + 1}, batch {skip + 1}/{per_epoch})"
            )
        stop = self._stop_before_step() or "epochs"
        while stop == "epochs" and epoch < plan.epochs:
            started = time.perf_counter()
            stop = self._run_epoch(epoch, skip) or stop
            if self.step % per_epoch:  # max_steps or the ε budget stopped the run mid-epoch
                self._save()
                break
            self._end_epoch(epoch, started)
            epoch, skip = epoch + 1, 0
            if plan.patience is not None and self.early.bad_epochs >= plan.patience:
                stop = "early_stopping"
                self.run.say(
                    f"early stopping: {plan.monitor} has not decreased by more than "
                    f"{plan.min_delta} for {plan.patience} epochs (best {self.early.best:.4g})"
                )
        self._flush()
        privacy = None
        if self.private is not None:
            if stop == "privacy_budget":
                self.run.say(
                    f"privacy budget: step {self.step + 1} would spend more than ε = "
                    f"{self.private.privacy.epsilon:g}; stopped after {self.step} steps"
                )
            self.run.say(self.private.summary(self.step))
            eps = self.private.epsilon(self.step)
            privacy = {**self.private.record(), "steps": self.step, "epsilon": eps}
        return FitResult(
            self._state(), tuple(self.history), stop, self.run.dir, privacy, self._values()
        )

    def _stop_before_step(self) -> str | None:
        """Why the run must stop before its next step, or None (also once all its
        epochs are done: a budget spent exactly by them stopped nothing)."""
        if self.plan.max_steps is not None and self.step >= self.plan.max_steps:
            return "max_steps"
        done = self.step >= self.plan.epochs * self.steps_per_epoch
        if self.private is not None and self.private.over_budget(self.step) and not done:
            return "privacy_budget"
        return None

    def _run_epoch(self, epoch: int, skip: int) -> str | None:
        """The epoch's steps from batch ``skip`` on; why it stopped early, or None."""
        label = f"epoch {epoch + 1}/{self.plan.epochs}"
        with Progress(total=self.steps_per_epoch, label=label, quiet=not self.run.verbose) as bar:
            bar.update(skip)
            if self._stop_before_step() is None:
                self.source.start_epoch(epoch)
            for k in range(skip, self.steps_per_epoch):
                stop = self._stop_before_step()
                if stop is not None:
                    return stop
                self._take_step(k)
                bar.update(note=None if self.last_loss is None else f"loss {self.last_loss:.4g}")
                if self._checkpoint_due():
                    self._save()
        return self._stop_before_step()

    def _checkpoint_due(self) -> bool:
        """A ``checkpoint_every`` step inside an epoch (its end checkpoints anyway)."""
        every = self.plan.checkpoint_every
        return every is not None and self.step % every == 0 and self.step % self.steps_per_epoch > 0

    def _take_step(self, k: int) -> None:
        """Dispatch step ``k`` of the epoch (its live check first, where one is due);
        the host waits for it only when something reads. Every argument already lies
        on the device: nothing is uploaded."""
        size, feed, ok = self.source.size(k), self.source.feed(), self.ok
        started = time.perf_counter()
        every = self.plan.check_every
        if every is not None and self.step % every == 0:
            assert self.check_fn is not None
            with jax.default_matmul_precision(CHECK_PRECISION):
                figures = self.check_fn(self.carry.state, feed, size=size)
            self.pending.append((self.step, figures))
            ok = figures["all_ok"]
        self.carry = self.step_fn(self.carry, feed, ok, size=size)
        self.tally.seconds += time.perf_counter() - started
        self.step += 1
        self.unread += 1
        if self.unread >= READ_EVERY:
            self._flush()
        keep = self.plan.keep_every
        if keep is not None and self.step % keep == 0:
            self._flush()  # kept params are finite ones
            self.run.keep_params(self.carry.state.params, self.step)

    def _flush(self) -> None:
        """Read the marker, the epoch's sums and the pending live checks' figures (one
        transfer); raise :class:`TrainingError` at the first bad step, else tally them."""
        if not self.unread and not self.pending:
            return
        started = time.perf_counter()
        c = self.carry
        bad_step, failed_check, bad_metrics, sums, figures = jax.device_get(
            (c.bad_step, c.failed_check, c.bad_metrics, c.sums, [f for _, f in self.pending])
        )
        self.tally.seconds += time.perf_counter() - started
        checks = [(k, self._report(f)) for (k, _), f in zip(self.pending, figures, strict=True)]
        self.pending, self.unread = [], 0
        first_bad = int(bad_step)
        if first_bad >= 0:
            if bool(failed_check):
                report = next(r for k, r in checks if k == first_bad)
                raise TrainingError(
                    f"gradient check failed at step {first_bad}: jbp.backprop and jax.grad "
                    f"disagree on the current batch (worst rel err {report.max_rel_err:.2e}, "
                    f"tolerance {report.rtol:.0e}); training stopped\n{report}",
                    step=first_bad,
                    state=self._state(),
                    report=report,
                )
            raise self._non_finite(first_bad, bad_metrics)
        for _, report in checks:
            self.tally.check = max(self.tally.check or 0.0, report.max_rel_err)
            self.tally.checks += 1
        self.tally.loss_sum = float(sums.loss_sum)
        self.tally.examples, self.tally.steps = int(sums.examples), int(sums.steps)
        if self.tally.steps:
            self.last_loss = float(sums.last_loss)

    def _report(self, figures: dict[str, np.ndarray]) -> Report:
        layers = tuple(map(repr, self.plan.net.layers))
        rtol = self.check_rtol
        return figures_report(figures, self.carry.state.params, rtol, self.check_dtype, layers)

    def _non_finite(self, step: int, metrics: np.ndarray) -> TrainingError:
        m = dict(zip(_WATCHED, map(float, metrics), strict=True))
        bad = [_WATCHED[k] for k in _WATCHED if not math.isfinite(m[k])]
        where = ""
        if self.run.saved_step is not None:
            ckpt = self.run.path(CHECKPOINT)
            where = f"; the last good checkpoint is {ckpt} (step {self.run.saved_step})"
        return TrainingError(
            f"non-finite {_join(bad)} at step {step} (loss {m['loss']}, gradient norm "
            f"{m['grad_norm']}, parameter norm {m['param_norm']}); training stopped without "
            f"applying this update{where}",
            step=step,
            state=self._state(),
        )

    def _state(self) -> TrainState:
        """The carry's state as a :class:`TrainState` (its key typed again)."""
        return _typed_key(self.carry.state, self.key_impl)

    def _meta(self) -> dict[str, Any]:
        meta = {
            "data": self.data.meta,
            "epoch_progress": dataclasses.asdict(self.tally),
            "early_stopping": dataclasses.asdict(self.early),
            "gradient_source": self.plan.gradient_source,
        }
        if self.private is not None:
            meta["privacy"] = self.private.record()
        return meta

    def _values(self) -> np.ndarray | None:
        """The in-run data values read from the device, float64 (None without them)."""
        if self.carry.values is None:
            return None
        self.values = np.asarray(jax.device_get(self.carry.values), np.float64)
        return self.values

    def _saved(self, state: TrainState) -> Any:
        """What a checkpoint holds: the state, and the in-run data values with it."""
        return state if self.values is None else (state, self.values)

    def _save(self) -> None:
        """Checkpoint the state, once every step before it is known to be finite (and
        the in-run data values, also as ``shapley.npy`` for reading on their own)."""
        self._flush()
        values = self._values()
        self.run.save(self._saved(self._state()), self._meta())
        if values is not None:
            self.run.write_array(SHAPLEY, values)

    def _end_epoch(self, epoch: int, started: float) -> None:
        self._flush()
        record = self._record(epoch)
        record["epoch_time"] = time.perf_counter() - started
        self.early.update(record[self.plan.monitor], self.plan.min_delta)
        self.history.append(record)
        self.tally = _Tally()  # the device's sums restart at the next epoch's first step
        self.run.record(record)  # metrics first: a resume drops records past its checkpoint
        self._save()
        self.run.say(_epoch_line(record, self.plan.epochs))

    def _record(self, epoch: int) -> dict[str, Any]:
        plan, tally, params = self.plan, self.tally, self.carry.state.params

        def evaluate(split: _DeviceSplit | None) -> dict[str, Any]:
            if split is None:
                return {}
            return evaluate_checked(
                plan.net, plan.loss, params, split.x, split.y, split.labels, 4096, split.mask
            )

        train, test = evaluate(self.train_split), evaluate(self.test_split)
        private = {}
        if self.private is not None:
            private = {"epsilon": self.private.epsilon(self.step)}
        return {
            "epoch": epoch + 1,
            "step": self.step,
            "gradient_source": plan.gradient_source,
            "batch_loss": tally.loss_sum / max(tally.examples, 1),
            "train_loss": train["loss"],
            "train_accuracy": train["accuracy"],
            "test_loss": test.get("loss"),
            "test_accuracy": test.get("accuracy"),
            "grad_check_max_rel_err": tally.check,
            "grad_checks": tally.checks,
            "grad_check_precision": CHECK_PRECISION if tally.checks else None,
            "step_time": tally.seconds / max(tally.steps, 1),
            **private,
        }


def fit(
    net: Any,
    loss: str | Loss,
    optimizer: Any,
    data: Any,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    dtype: Any = jnp.float32,
    gradient_source: str = "backprop",
    check_every: int | None = None,
    check_rtol: float | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    monitor: str = "train_loss",
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    max_steps: int | None = None,
    mesh: Mesh | None = None,
    privacy: Privacy | None = None,
    keep_every: int | None = None,
    shapley: InRunShapley | None = None,
    verbose: bool = False,
) -> FitResult:
    """Train ``net`` on a data set with optax, evaluating on its test split.

    Args:
      net: the network; it must take the data's examples (features, or
        images ``(height, width, channels)``) and give one score per class,
        or, for a sequence data set, take its integer tokens ``(T,)`` (an
        ``Embedding`` first; they stay integers) and give one score per
        class at each position, ``(T, classes)``, as ``jbp.transformer`` does.
      loss: a loss name or :class:`Loss` (labels become targets by ``jbp.targets``;
        labels per position with ignored positions, -1, need ``softmax_xent``).
      optimizer: any ``optax.GradientTransformation``.
      data: a :class:`Dataset` (integer labels), e.g. ``jbp.load_dataset("digits")``
        or ``jbp.load_dataset("digits", images=True)``, or a sequence data set
        such as ``jbp.load_dataset("sort")`` (labels per position ``(n, T)``;
        the accuracies in ``history`` then count the positions with a target,
        the answer tokens).
      epochs: passes over the training split, in total (a resumed run's included).
      batch_size: examples per step; the last batch of an epoch may be smaller.
      seed: seeds the initial params and the batch order.
      dtype: the params' dtype.
      gradient_source: ``"backprop"`` (δ equations) or ``"autodiff"`` (jax.grad).
      check_every: every this many steps, compare ``jbp.backprop`` with
        ``jax.grad`` on the current batch before the step (``jbp.compare``'s
        measure, reduced on the device to per-leaf figures, both gradients
        under matmul precision "highest", recorded as
        ``grad_check_precision``) and stop on a mismatch; None: no check.
      check_rtol: the check's tolerance (default: ``compare``'s, by dtype).
      patience: stop after this many epochs in which ``monitor`` did not
        decrease by more than ``min_delta`` (a plateau); None: all ``epochs``.
      min_delta: the least decrease of ``monitor`` that counts.
      monitor: ``"train_loss"`` (the cost being minimised, default) or
        ``"test_loss"`` (the held-out split then acts as a validation set, so
        its accuracy is no longer an unbiased test estimate).
      run_dir: a folder for ``metrics.jsonl`` and ``checkpoint.npz``; None
        writes nothing.
      resume: continue the run in ``run_dir`` from its checkpoint.
      checkpoint_every: also checkpoint every this many steps.
      max_steps: stop (and checkpoint) once this many steps are done in total.
      mesh: run data-parallel on this mesh (:func:`jbp.make_mesh`): the state
        replicated, each batch split over the devices (see
        :func:`jbp.data_parallel_step`). The result equals the one-device run
        up to the order of the batch sums. None: the default device.
      privacy: train privately (DP-SGD, :class:`jbp.Privacy`): ``batch_size``
        becomes the expected batch ``q·N`` of Poisson sampling, an epoch
        ``round(N / batch_size)`` steps; each step's batch is padded to a fixed
        shape (one compilation), its examples' gradients clipped and summed in
        chunks of ``privacy.physical_batch_size``, noise σ·C added, and the sum
        divided by ``batch_size``. σ is given or calibrated for the planned steps;
        every epoch's record holds ``epsilon``, the ε spent so far (from
        dp-accounting); a run with a target ε stops before a step that would exceed
        it; ``run_dir`` gets the privacy fields in ``config.json``. The guarantee
        covers the parameters, not the metrics recorded on the training split. Not
        with ``mesh``, ``gradient_source="autodiff"`` or early stopping on the
        training loss. None: non-private.
      keep_every: also keep the params every this many steps in ``run_dir``
        (``params/step_00000100.npz``), for :meth:`jbp.TracIn.from_run`.
      shapley: in-run first-order data Shapley (:class:`jbp.InRunShapley`): every
        step adds ``η_t·s·⟨g_val, g_i⟩`` to each of its examples' values, formed in
        the step's own pass; ``FitResult.shapley`` holds them, one per training
        example (``run_dir`` keeps them with the checkpoint, so they survive a
        resume, and as ``shapley.npy``). Not with ``privacy``, ``mesh`` or ``gradient_source="autodiff"``.
      verbose: print a line per epoch and draw a progress bar on a terminal.

    Returns:
      A :class:`FitResult`.

    Raises:
      TrainingError: a gradient-check mismatch, or a non-finite loss, gradient
        or parameter at some step; that update is not applied and the last
        checkpoint stays as it was. Both are caught on the device and reported
        at the next host read (at most 50 steps later, sooner at a checkpoint,
        kept params or the epoch's end), naming the first bad step, with
        ``state`` the state before it (and ``report`` the check's
        :class:`Report`).
      CheckpointError: resuming from a missing, corrupt or mismatched checkpoint.
    """
    plan = Plan(
        net=net, loss=loss, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
        seed=seed, dtype=dtype, gradient_source=gradient_source, check_every=check_every,
        check_rtol=check_rtol, patience=patience, min_delta=min_delta, monitor=monitor,
        checkpoint_every=checkpoint_every, max_steps=max_steps, mesh=mesh, privacy=privacy,
        keep_every=keep_every, shapley=shapley,
    )  # fmt: skip
    checked = check_data(data, plan)
    if resume and run_dir is None:
        raise ValueError("`resume=True` needs the `run_dir` of the run to continue")
    if keep_every is not None and run_dir is None:
        raise ValueError("`keep_every` keeps params in a run folder: give `run_dir` too")
    loop = _Loop(plan, checked, RunFolder(run_dir, verbose, plan.net))
    loop.begin(resume)
    return loop.train()


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [
        f"epoch {r['epoch']}/{epochs}",
        f"step {r['step']}",
        f"loss {r['train_loss']:.4f}",
        f"train acc {100 * r['train_accuracy']:.1f}%",
    ]
    if r["test_loss"] is not None:
        parts += [f"test loss {r['test_loss']:.4f}", f"test acc {100 * r['test_accuracy']:.1f}%"]
    if r["grad_check_max_rel_err"] is not None:
        parts.append(f"grad check {r['grad_check_max_rel_err']:.1e}")
    if r.get("epsilon") is not None:
        parts.append(f"ε {r['epsilon']:.3g}")
    parts.append(f"{1e3 * r['step_time']:.2f} ms/step")
    return "  ".join(parts)
