"""The training loop: seeded batches, evaluation, a live gradient check, metrics,
checkpoints, NaN detection, early stopping and exact resume.

A run folder holds ``metrics.jsonl`` (one JSON record per epoch) and
``checkpoint.npz`` (the latest state, written atomically at every epoch end,
every ``checkpoint_every`` steps and when ``max_steps`` stops the run). The
batch order of an epoch is a function of ``(seed, epoch)`` only, so a run
resumed from step ``k`` skips the batches of its epoch already done and
reaches step ``n`` with bitwise the same state as an uninterrupted run. All
output goes through a :class:`RunFolder`, which writes on process 0 only.

The loop does not wait for the device after each step. Each step is
dispatched with the state and a first-bad-step marker that stay on the device
(:func:`guarded_step`): the step that first gives a non-finite loss, gradient
or parameter norm is recorded there and no update is applied from then on, so
the state on the device stays the last good one. The host reads the marker
and the pending steps' metrics together, at most every ``READ_EVERY`` steps
and before anything that needs them (a gradient check, a checkpoint, the end
of an epoch or of the run), and then raises :class:`TrainingError` naming
the first bad step and carrying that last good state.

:func:`fit` checks its arguments once, at this public boundary, into a
:class:`Plan` and a :class:`Data` (:mod:`jbp._train_checks`); everything
inside takes those.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
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
from ._data import batches, epoch_order
from ._losses import Loss
from ._privacy import Privacy
from ._progress import Progress
from ._report import compare
from ._sharding import data_parallel_step, replicate
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
from .layers._dropout import has_dropout

SHAPLEY = "shapley.npy"  # fit(shapley=...): the in-run data values, one per training example
READ_EVERY = 50  # most steps dispatched between two host reads of the metrics
_WATCHED = {"loss": "loss", "grad_norm": "gradients", "param_norm": "parameters"}


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`TrainState`.
      history: one record per completed epoch (with those before a resume):
        ``epoch``, ``step``, ``gradient_source``, ``batch_loss`` (mean ℓ_i over
        the epoch's batches as they were seen), ``train_loss``,
        ``train_accuracy``, ``test_loss``, ``test_accuracy`` (mean ℓ_i and
        accuracy at the epoch's end; None without a test split),
        ``grad_check_max_rel_err`` (worst over the epoch's live checks, None
        if none ran), ``grad_checks``, ``step_time`` (seconds per step spent
        dispatching steps and waiting for the device, the first epoch's
        including compilation) and ``epoch_time``.
      stop_reason: ``"epochs"``, ``"early_stopping"``, ``"max_steps"`` or
        ``"privacy_budget"`` (the next step would have spent more than the
        target ε).
      run_dir: the run folder, or None.
      shapley: with ``shapley=``, every training example's in-run data value
        ``(n_train,)`` float64 (:class:`jbp.InRunShapley`), else None.
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


class Carry(NamedTuple):
    """What the guarded step carries on the device from one step to the next.

    Attributes:
      state: the :class:`TrainState`, the last good one once a step has failed.
      bad_step: int32 scalar, -1 while every step has been finite, else the
        first step whose loss, gradient norm or parameter norm was not.
    """

    state: TrainState
    bad_step: jax.Array


GuardedStep = Callable[..., tuple[Carry, dict[str, jax.Array]]]


def guarded_step(step: StepFn) -> GuardedStep:
    """``step`` on a :class:`Carry`: once a step is non-finite, its update and
    every later one are dropped on the device (the state is selected, bitwise,
    from the one before) and the marker keeps that step's number."""

    def run(
        carry: Carry, x: Any, y: Any, mask: Any = None, *example_mask: Any
    ) -> tuple[Carry, dict[str, jax.Array]]:
        new, metrics = step(carry.state, x, y, mask, *example_mask)
        finite = functools.reduce(operator.and_, (jnp.isfinite(metrics[k]) for k in _WATCHED))
        clean = carry.bad_step < 0
        keep = finite & clean
        state = jtu.tree_map(lambda a, b: lax.select(keep, a, b), new, carry.state)
        bad_step = jnp.where(clean & ~finite, carry.state.step, carry.bad_step)
        return Carry(state, bad_step), metrics

    return run


@dataclasses.dataclass
class _Tally:
    """The current epoch so far; a checkpoint keeps it as ``epoch_progress``."""

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


def _compile_step(plan: Plan, private: PrivateRun | None) -> GuardedStep:
    if plan.shapley is not None:
        step = shapley_step(plan.net, plan.loss, plan.optimizer, plan.shapley.learning_rate)
        return jax.jit(guarded_step(step))
    if private is not None:
        assert private.noise_multiplier is not None
        p = private.privacy
        dp = make_dp_step(
            plan.net, plan.loss, plan.optimizer, max_norm=p.max_norm,
            noise_multiplier=private.noise_multiplier, expected_batch_size=plan.batch_size,
            physical_batch_size=p.physical_batch_size, jit=False,
        )  # fmt: skip
        return jax.jit(guarded_step(dp))
    step = guarded_step(build_step(plan.net, plan.loss, plan.optimizer, plan.gradient_source))
    return jax.jit(step) if plan.mesh is None else data_parallel_step(step, plan.mesh)


def _check_fns(plan: Plan) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    if plan.check_every is None:
        return None
    return (
        jax.jit(backprop(plan.net, plan.loss)),
        jax.jit(jax.grad(objective(plan.net, plan.loss))),  # reference
    )


class _Loop:
    """One :func:`fit` run: the checked plan and data, the run folder, and what
    changes as it trains (the device carry, the step, the epoch's tally, early
    stopping, the history and the steps whose metrics are not read yet)."""

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
        self.check_fns = _check_fns(plan)
        self.values: np.ndarray | None = None  # in-run data values, one per training example
        self.value_rows: dict[int, np.ndarray] = {}  # step -> its batch's rows, until read
        if plan.shapley is not None:
            v = plan.shapley
            names = ("shapley.x", "shapley.y", "shapley.mask")
            self.val = check_split(plan, v.x, v.y, v.mask, names)
            self.values = np.zeros(n_train)
        self.step = 0
        self.tally, self.early = _Tally(), _Early()
        self.history: list[dict[str, Any]] = []
        self.pending: list[tuple[int, int, dict[str, jax.Array]]] = []
        self.last_loss: float | None = None
        self.carry = Carry(
            fresh_state(plan.net, plan.optimizer, jr.key(plan.seed), plan.dtype),
            jnp.full((), -1, jnp.int32),
        )

    def begin(self, resume: bool) -> None:
        """A fresh run, or the state, tally and history of the run being resumed."""
        state, saved_privacy = self.carry.state, None
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
        self.step_fn = _compile_step(self.plan, self.private)
        self.carry = self.carry._replace(state=state)
        if self.plan.mesh is not None:
            self.carry = replicate(self.carry, self.plan.mesh)

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
            self.carry.state, tuple(self.history), stop, self.run.dir, privacy, self.values
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

    def _epoch_batches(self, epoch: int) -> Any:
        """The epoch's batches: shuffled, or for a private run Poisson samples padded
        to a fixed shape, ``(x, y, position mask, example mask)``; with in-run Shapley
        values ``(x, y, position mask, x_val, y_val, val mask, rows)``."""
        plan, train = self.plan, self.data.train
        if plan.shapley is not None:
            return self._shapley_batches(epoch)
        if self.private is None:
            return batches(
                train.x, train.y, plan.batch_size, seed=plan.seed, epoch=epoch, mask=train.mask
            )
        sampler, first = self.private.sampler, epoch * self.steps_per_epoch
        arrays = (train.x, train.y) if train.mask is None else (train.x, train.y, train.mask)

        def private() -> Any:
            for step in range(first, first + self.steps_per_epoch):
                (xb, yb, *mb), em = sampler.batch(arrays, step)
                if mb:
                    mb[0][~em] = True  # a padding row's positions: zeros, all "real"
                yield xb, yb, (mb[0] if mb else None), em

        return private()

    def _shapley_batches(self, epoch: int) -> Any:
        plan, train, val = self.plan, self.data.train, self.val
        order = epoch_order(len(train.y), plan.seed, epoch)
        step = epoch * self.steps_per_epoch
        for k, start in enumerate(range(0, len(order), plan.batch_size)):
            idx = order[start : start + plan.batch_size]
            v = plan.shapley.rows(len(val.y), step + k)
            pick = lambda m, i: None if m is None else m[i]  # noqa: E731
            yield (train.x[idx], train.y[idx], pick(train.mask, idx), val.x[v], val.y[v],
                   pick(val.mask, v), idx)  # fmt: skip

    def _run_epoch(self, epoch: int, skip: int) -> str | None:
        """The epoch's steps from batch ``skip`` on; why it stopped early, or None."""
        label = f"epoch {epoch + 1}/{self.plan.epochs}"
        with Progress(total=self.steps_per_epoch, label=label, quiet=not self.run.verbose) as bar:
            bar.update(skip)
            for batch in itertools.islice(self._epoch_batches(epoch), skip, None):
                stop = self._stop_before_step()
                if stop is not None:
                    return stop
                if self.values is not None:
                    *batch, rows = batch
                    self.value_rows[self.step] = rows
                self._take_step(*batch)
                bar.update(note=None if self.last_loss is None else f"loss {self.last_loss:.4g}")
                if self._checkpoint_due():
                    self._save()
        return self._stop_before_step()

    def _checkpoint_due(self) -> bool:
        """A ``checkpoint_every`` step inside an epoch (its end checkpoints anyway)."""
        every = self.plan.checkpoint_every
        return every is not None and self.step % every == 0 and self.step % self.steps_per_epoch > 0

    def _take_step(
        self, xb: np.ndarray, yb: np.ndarray, mb: np.ndarray | None = None, *em: np.ndarray
    ) -> None:
        """Dispatch one step; the host waits for it only when something reads. A private
        step's batch comes with its example mask ``em``; the live check compares the
        unclipped gradients of the padded batch (padding rows hold zeros)."""
        before = self.carry
        started = time.perf_counter()
        self.carry, metrics = self.step_fn(before, xb, yb, mb, *em)
        self.tally.seconds += time.perf_counter() - started
        self.pending.append((self.step, len(xb), metrics))
        every = self.plan.check_every
        if every is not None and self.step % every == 0:
            self._flush()  # a non-finite step, this one included, is reported first
            self._gradient_check(before.state, xb, yb, mb)
        self.step += 1
        if len(self.pending) >= READ_EVERY:
            self._flush()
        keep = self.plan.keep_every
        if keep is not None and self.step % keep == 0:
            self._flush()  # kept params are finite ones
            self.run.keep_params(self.carry.state.params, self.step)

    def _flush(self) -> None:
        """Read the marker and the pending steps' metrics (one host read); raise
        :class:`TrainingError` at the first non-finite step, else tally them."""
        if not self.pending:
            return
        started = time.perf_counter()
        bad_step, metrics = jax.device_get((self.carry.bad_step, [m for *_, m in self.pending]))
        self.tally.seconds += time.perf_counter() - started
        pending, self.pending = self.pending, []
        first_bad = int(bad_step)
        if first_bad >= 0:  # it is among the pending steps: the last read saw none
            bad = next(m for (k, *_), m in zip(pending, metrics, strict=True) if k == first_bad)
            raise self._non_finite(first_bad, bad)
        for (k, n, _), m in zip(pending, metrics, strict=True):
            if self.values is not None:
                np.add.at(self.values, self.value_rows.pop(k), np.asarray(m["values"], np.float64))
            if "examples" in m:  # a private step: the mean ℓ_i over its real examples
                n = int(m["examples"])
                self.tally.loss_sum += float(m["loss"]) * n
            else:
                self.tally.loss_sum += float(m["loss"]) / self.plan.loss.scale(n)
            self.tally.examples += n
            self.tally.steps += 1
        self.last_loss = float(metrics[-1]["loss"])

    def _non_finite(self, step: int, metrics: dict[str, Any]) -> TrainingError:
        m = {k: float(v) for k, v in metrics.items()}
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
            state=self.carry.state,
        )

    def _gradient_check(self, state: TrainState, x: Any, y: Any, mask: Any = None) -> None:
        """Compare the δ equations with autodiff on this batch (with its padding mask,
        and one dropout key for both); raise on a mismatch."""
        assert self.check_fns is not None
        manual, reference = self.check_fns
        kw = {"mask": mask, "dropout_key": None}
        if has_dropout(self.plan.net):
            kw["dropout_key"] = jr.fold_in(jr.key(self.plan.seed), self.step)
        with jax.default_matmul_precision("highest"):
            report = compare(
                manual(state.params, x, y, **kw),
                reference(state.params, x, y, **kw),
                rtol=self.plan.check_rtol,
                names=("manual (jbp.backprop)", "autodiff (jax.grad)"),
            )
        report = dataclasses.replace(report, layers=tuple(map(repr, self.plan.net.layers)))
        if not report.ok:
            raise TrainingError(
                f"gradient check failed at step {self.step}: jbp.backprop and jax.grad "
                f"disagree on the current batch (worst rel err {report.max_rel_err:.2e}, "
                f"tolerance {report.rtol:.0e}); training stopped\n{report}",
                step=self.step,
                state=state,
                report=report,
            )
        self.tally.check = max(self.tally.check or 0.0, report.max_rel_err)
        self.tally.checks += 1

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

    def _saved(self, state: TrainState) -> Any:
        """What a checkpoint holds: the state, and the in-run data values with it."""
        return state if self.values is None else (state, self.values)

    def _save(self) -> None:
        """Checkpoint the state, once every step before it is known to be finite (and
        the in-run data values, also as ``shapley.npy`` for reading on their own)."""
        self._flush()
        self.run.save(self._saved(self.carry.state), self._meta())
        if self.values is not None:
            self.run.write_array(SHAPLEY, self.values)

    def _end_epoch(self, epoch: int, started: float) -> None:
        self._flush()
        record = self._record(epoch)
        record["epoch_time"] = time.perf_counter() - started
        self.early.update(record[self.plan.monitor], self.plan.min_delta)
        self.history.append(record)
        self.tally = _Tally()
        self.run.record(record)  # metrics first: a resume drops records past its checkpoint
        self._save()
        self.run.say(_epoch_line(record, self.plan.epochs))

    def _record(self, epoch: int) -> dict[str, Any]:
        plan, tally, params = self.plan, self.tally, self.carry.state.params

        def evaluate(split: Split | None) -> dict[str, Any]:
            if split is None:
                return {}
            return evaluate_checked(
                plan.net, plan.loss, params, split.x, split.y, split.labels, 4096, split.mask
            )

        train, test = evaluate(self.data.train), evaluate(self.data.test)
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
        ``jax.grad`` on the current batch (``jbp.compare`` under matmul
        precision "highest") and stop on a mismatch; None: no check.
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
        checkpoint stays as it was. A non-finite step is caught on the device
        and reported at the next host read (at most 50 steps later, sooner
        at a check, checkpoint or epoch end), naming the first bad step, with
        ``state`` the state before it.
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
