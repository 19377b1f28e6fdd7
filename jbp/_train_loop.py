"""The training loop: seeded batches, evaluation, a live gradient check, metrics,
checkpoints, NaN detection, early stopping and exact resume.

A run folder holds ``metrics.jsonl`` (one JSON record per epoch) and
``checkpoint.npz`` (the latest state, written atomically at every epoch end,
every ``checkpoint_every`` steps and when ``max_steps`` stops the run). The
batch order of an epoch is a function of ``(seed, epoch)`` only, so a run
resumed from step ``k`` skips the batches of its epoch already done and
reaches step ``n`` with bitwise the same state as an uninterrupted run. All
output goes through a :class:`RunFolder`, which writes on process 0 only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh

from ._backprop import backprop, check_net, objective
from ._checkpoint import CHECKPOINT, RunFolder
from ._checks import check_dtype
from ._data import batches
from ._losses import Loss, get_loss
from ._progress import Progress
from ._sharding import data_parallel_step, replicate
from ._train import (
    TrainingError,
    TrainState,
    check_gradient_source,
    check_labels,
    check_optimizer,
    evaluate,
    init_state,
    make_step,
    targets,
)
from ._verify import Report, compare

MONITORS = ("train_loss", "test_loss")


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
        if none ran), ``grad_checks``, ``step_time`` (seconds per step, the
        first epoch's including compilation) and ``epoch_time``.
      stop_reason: ``"epochs"``, ``"early_stopping"`` or ``"max_steps"``.
      run_dir: the run folder, or None.
    """

    state: TrainState
    history: tuple[dict[str, Any], ...]
    stop_reason: str
    run_dir: str | None


def _positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        what = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"`{name}` must be {what}, got {value!r}")


def _check_data(data: Any, net: Any, loss: Loss) -> None:
    names = ("x_train", "y_train", "x_test", "y_test")
    if not all(hasattr(data, n) for n in names):
        raise TypeError(
            "`data` must be a jbp.Dataset (x_train, y_train, x_test, y_test, ...), e.g. from "
            f"jbp.load_dataset, got {type(data).__name__}"
        )
    for xs, ys in (("x_train", "y_train"), ("x_test", "y_test")):
        x, y = np.asarray(getattr(data, xs)), np.asarray(getattr(data, ys))
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"`data.{xs}` must have shape (n, features) and `data.{ys}` shape (n,), got "
                f"{x.shape} and {y.shape}"
            )
        if net.fan_in is not None and x.shape[1] != net.fan_in:
            raise ValueError(
                f"`data.{xs}` has {x.shape[1]} features but the first layer expects "
                f"fan_in={net.fan_in}"
            )
        check_labels(net, loss, y, name=f"data.{ys}")
    if np.asarray(data.y_train).shape[0] == 0:
        raise ValueError("`data.x_train` is empty: need at least one training example")


def _gradient_check(net: Any, fns: Any, params: Any, x: Any, y: Any, rtol: Any) -> Report:
    manual, reference = fns
    with jax.default_matmul_precision("highest"):
        report = compare(
            manual(params, x, y),
            reference(params, x, y),
            rtol=rtol,
            names=("manual (jbp.backprop)", "autodiff (jax.grad)"),
        )
    return dataclasses.replace(report, layers=tuple(repr(layer) for layer in net.layers))


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _new_epoch() -> dict[str, Any]:
    return {"loss_sum": 0.0, "examples": 0, "steps": 0, "seconds": 0.0, "check": None, "checks": 0}


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
    verbose: bool = False,
) -> FitResult:
    """Train ``net`` on a data set with optax, evaluating on its test split.

    Args:
      net: the network; fan_in must match the features, the outputs the classes.
      loss: a loss name or :class:`Loss` (labels become targets by ``jbp.targets``).
      optimizer: any ``optax.GradientTransformation``.
      data: a :class:`Dataset` (integer labels), e.g. ``jbp.load_dataset("digits")``.
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
      verbose: print a line per epoch and draw a progress bar on a terminal.

    Returns:
      A :class:`FitResult`.

    Raises:
      TrainingError: a gradient-check mismatch, or a non-finite loss, gradient
        or parameter at some step; that update is not applied and the last
        checkpoint stays as it was.
      CheckpointError: resuming from a missing, corrupt or mismatched checkpoint.
    """
    net = check_net(net)
    loss = get_loss(loss)
    check_optimizer(optimizer)
    check_gradient_source(gradient_source)
    for name, value, optional in (
        ("epochs", epochs, False),
        ("batch_size", batch_size, False),
        ("check_every", check_every, True),
        ("patience", patience, True),
        ("checkpoint_every", checkpoint_every, True),
        ("max_steps", max_steps, True),
    ):
        _positive_int(name, value, optional=optional)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
    if monitor not in MONITORS:
        raise ValueError(f"`monitor` must be 'train_loss' or 'test_loss', got {monitor!r}")
    dtype = check_dtype(dtype)
    _check_data(data, net, loss)
    has_test = np.asarray(data.y_test).shape[0] > 0
    if monitor == "test_loss" and not has_test:
        raise ValueError("`monitor='test_loss'` but `data` has no test split")
    if resume and run_dir is None:
        raise ValueError("`resume=True` needs the `run_dir` of the run to continue")

    x_train = np.asarray(data.x_train).astype(dtype)
    y_train = targets(net, loss, data.y_train, dtype)
    n_train = int(x_train.shape[0])
    data_meta = {"name": str(getattr(data, "name", "")), "n_train": n_train,
                 "batch_size": batch_size, "seed": seed}  # fmt: skip
    run = RunFolder(run_dir, verbose)
    state = init_state(net, optimizer, jr.key(seed), dtype=dtype)
    progress: dict[str, Any] = _new_epoch()
    early: dict[str, Any] = {"best": None, "bad_epochs": 0}
    history: list[dict[str, Any]] = []
    if resume:
        state, extra = run.load(state, net)
        if extra.get("data") != data_meta:
            raise ValueError(
                f"cannot resume {run.path(CHECKPOINT)}: it was written for data "
                f"{extra.get('data')} but this run has {data_meta}; the batch order depends "
                "on the data, batch size and seed"
            )
        progress, early = extra["epoch_progress"], extra["early_stopping"]
        history = run.history(int(state.step))
    elif run.has_checkpoint:
        raise ValueError(
            f"{run.dir} already holds a run ({CHECKPOINT}); pass resume=True to continue it, "
            "or choose a new `run_dir`"
        )
    else:
        run.start()

    def checkpoint_meta() -> dict[str, Any]:
        return {"data": data_meta, "epoch_progress": dict(progress),
                "early_stopping": dict(early), "gradient_source": gradient_source}  # fmt: skip

    if mesh is None:
        step_fn = make_step(net, loss, optimizer, gradient_source=gradient_source)
    else:
        state = replicate(state, mesh)
        step_fn = data_parallel_step(
            make_step(net, loss, optimizer, gradient_source=gradient_source, jit=False), mesh
        )
    check_fns = None
    if check_every is not None:
        check_fns = (
            jax.jit(backprop(net, loss)),
            jax.jit(jax.grad(objective(net, loss))),  # reference
        )
    steps_per_epoch = math.ceil(n_train / batch_size)
    step = int(state.step)
    epoch, skip = divmod(step, steps_per_epoch)
    if step:
        run.say(f"resumed at step {step} (epoch {epoch + 1}, batch {skip + 1}/{steps_per_epoch})")
    stop_reason = "max_steps" if max_steps is not None and step >= max_steps else "epochs"
    while stop_reason == "epochs" and epoch < epochs:
        epoch_start = time.perf_counter()
        order = batches(x_train, y_train, batch_size, seed=seed, epoch=epoch)
        label = f"epoch {epoch + 1}/{epochs}"
        with Progress(total=steps_per_epoch, label=label, quiet=not run.verbose) as bar:
            bar.update(skip)
            for i, (xb, yb) in enumerate(order):
                if i < skip:
                    continue
                t0 = time.perf_counter()
                new_state, metrics = step_fn(state, xb, yb)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                progress["seconds"] += time.perf_counter() - t0
                names = {"loss": "loss", "grad_norm": "gradients", "param_norm": "parameters"}
                bad = [names[k] for k in names if not math.isfinite(m[k])]
                if bad:
                    where = ""
                    if run.saved_step is not None:
                        ckpt = run.path(CHECKPOINT)
                        where = f"; the last good checkpoint is {ckpt} (step {run.saved_step})"
                    raise TrainingError(
                        f"non-finite {_join(bad)} at step {step} (loss {m['loss']}, "
                        f"gradient norm {m['grad_norm']}, parameter norm {m['param_norm']}); "
                        f"training stopped without applying this update{where}",
                        step=step,
                        state=state,
                    )
                if check_fns is not None and check_every is not None and step % check_every == 0:
                    report = _gradient_check(net, check_fns, state.params, xb, yb, check_rtol)
                    if not report.ok:
                        raise TrainingError(
                            f"gradient check failed at step {step}: jbp.backprop and jax.grad "
                            f"disagree on the current batch (worst rel err "
                            f"{report.max_rel_err:.2e}, tolerance {report.rtol:.0e}); training "
                            f"stopped\n{report}",
                            step=step,
                            state=state,
                            report=report,
                        )
                    progress["check"] = max(progress["check"] or 0.0, report.max_rel_err)
                    progress["checks"] += 1
                state, step = new_state, step + 1
                progress["loss_sum"] += m["loss"] / loss.scale(len(xb))
                progress["examples"] += len(xb)
                progress["steps"] += 1
                bar.update(note=f"loss {m['loss']:.4g}")
                if max_steps is not None and step >= max_steps:
                    stop_reason = "max_steps"
                    break
                at_end = step % steps_per_epoch == 0
                if checkpoint_every is not None and step % checkpoint_every == 0 and not at_end:
                    run.save(state, net, checkpoint_meta())
        if step % steps_per_epoch != 0:  # max_steps stopped the run mid-epoch
            run.save(state, net, checkpoint_meta())
            break
        record = _end_of_epoch(net, loss, state, data, has_test, progress, epoch, gradient_source)
        record["epoch_time"] = time.perf_counter() - epoch_start
        value = record[monitor]
        if math.isfinite(value) and (early["best"] is None or value < early["best"] - min_delta):
            early["best"], early["bad_epochs"] = value, 0
        else:
            early["bad_epochs"] += 1
        history.append(record)
        progress = _new_epoch()
        run.record(record)  # metrics first: a resume drops records past its checkpoint
        run.save(state, net, checkpoint_meta())
        run.say(_epoch_line(record, epochs))
        epoch, skip = epoch + 1, 0
        if patience is not None and early["bad_epochs"] >= patience:
            stop_reason = "early_stopping"
            run.say(
                f"early stopping: {monitor} has not decreased by more than {min_delta} for "
                f"{patience} epochs (best {early['best']:.4g})"
            )
    return FitResult(state, tuple(history), stop_reason, run.dir)


def _end_of_epoch(
    net: Any, loss: Loss, state: TrainState, data: Any, has_test: bool,
    progress: dict[str, Any], epoch: int, gradient_source: str,
) -> dict[str, Any]:  # fmt: skip
    train = evaluate(net, loss, state.params, data.x_train, data.y_train)
    test = evaluate(net, loss, state.params, data.x_test, data.y_test) if has_test else {}
    return {
        "epoch": epoch + 1,
        "step": int(state.step),
        "gradient_source": gradient_source,
        "batch_loss": progress["loss_sum"] / max(progress["examples"], 1),
        "train_loss": train["loss"],
        "train_accuracy": train["accuracy"],
        "test_loss": test.get("loss"),
        "test_accuracy": test.get("accuracy"),
        "grad_check_max_rel_err": progress["check"],
        "grad_checks": progress["checks"],
        "step_time": progress["seconds"] / max(progress["steps"], 1),
    }


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
    parts.append(f"{1e3 * r['step_time']:.2f} ms/step")
    return "  ".join(parts)
