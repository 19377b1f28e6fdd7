"""``jbp train``: train an MLP with optax on hand-written gradients."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jbp

from .._progress import format_duration
from ._args import (
    DTYPES,
    activation_name,
    device,
    hidden_widths,
    int_at_least,
    loss_name,
    positive_float,
    simulate_cpu_devices,
)

OPTIMIZERS = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
}
SOURCES = ("backprop", "autodiff", "both")
# Arguments that must be the same to resume a run (the others may change).
_RESUME_KEYS = (
    "data", "test_fraction", "hidden", "activation", "loss", "optimizer", "lr",
    "batch_size", "seed", "dtype", "gradient_source",
)  # fmt: skip

_TRAIN_HELP = """\
Train an MLP classifier on a data set with optax, on gradients from jbp's
hand-written δ equations (--gradient-source backprop, the default), from
jax.grad (autodiff), or both runs side by side from the same seed. The input
and output widths come from the data; --hidden sets the layers between.

Every --check-every steps the two gradient sources are compared on the
current batch with jbp.compare, and the run stops (exit status 1) with the
report if they disagree. A NaN or Inf in the loss, gradients or parameters
stops it too, naming the step, and keeps the last good checkpoint.

With --run-dir, the run folder gets metrics.jsonl (one record per epoch),
checkpoint.npz (atomic, at every epoch end) and config.json; --resume
continues it and ends with bitwise the same parameters as an uninterrupted
run. With --gradient-source both, the two runs go to RUN_DIR/backprop and
RUN_DIR/autodiff.

Exit status: 0 on success, 1 if training stopped on an error (gradient
mismatch, non-finite values), 2 on bad arguments, data or checkpoints."""


def add_train(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an MLP with optax on hand-written gradients",
        description=_TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--data", default="digits", metavar="NAME|PATH",
        help=f"{', '.join(jbp.dataset_names())}, or a .npz (x, y) or .csv (label last) file "
        "(default digits)")  # fmt: skip
    add("--test-fraction", type=float, default=0.2, metavar="F",
        help="share of examples held out for testing (default 0.2; xor tests on its 4 points)")  # fmt: skip
    add("--hidden", type=hidden_widths, default=(128, 64), metavar="LIST",
        help="hidden layer widths, comma-separated, or none (default 128,64)")  # fmt: skip
    add("--activation", type=activation_name, default="relu", metavar="NAME",
        help="activation of the hidden layers (default relu)")  # fmt: skip
    add("--loss", type=loss_name, default="softmax_xent", metavar="NAME",
        help=f"one of {', '.join(jbp.loss_names())} (default softmax_xent)")  # fmt: skip
    add("--optimizer", choices=tuple(OPTIMIZERS), default="adam", help="(default adam)")
    add("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    add("--batch-size", type=int_at_least(1), default=32, metavar="N", help="(default 32)")
    add("--epochs", type=int_at_least(1), default=20, metavar="N", help="(default 20)")
    add("--seed", type=int_at_least(0), default=0,
        help="seeds params, batch order and split (default 0)")  # fmt: skip
    add("--dtype", choices=DTYPES, default="float32", help="params dtype (default float32)")
    add("--gradient-source", choices=SOURCES, default="backprop",
        help="backprop (δ equations), autodiff (jax.grad), or both (default backprop)")  # fmt: skip
    add("--check-every", type=int_at_least(0), default=100, metavar="N",
        help="compare backprop with jax.grad every N steps; 0: never (default 100)")  # fmt: skip
    add("--patience", type=int_at_least(1), default=None, metavar="N",
        help="stop early after N epochs without improvement (default: off)")  # fmt: skip
    add("--min-delta", type=float, default=0.0, metavar="D",
        help="least decrease of the monitored loss that counts (default 0)")  # fmt: skip
    add("--monitor", choices=("train_loss", "test_loss"), default="train_loss",
        help="the loss early stopping watches (default train_loss)")  # fmt: skip
    add("--run-dir", default=None, metavar="PATH",
        help="folder for metrics.jsonl, checkpoint.npz and config.json (default: none)")  # fmt: skip
    add("--resume", action="store_true", help="continue the run in --run-dir")
    add("--checkpoint-every", type=int_at_least(1), default=None, metavar="N",
        help="also checkpoint every N steps (default: at epoch ends)")  # fmt: skip
    add("--max-steps", type=int_at_least(1), default=None, metavar="N",
        help="stop after N steps in total")  # fmt: skip
    add("--devices", type=int_at_least(1), default=None, metavar="N",
        help="train data-parallel on N devices: the batch split over them, the params "
        "replicated (on a CPU, N simulated devices; default: one device)")  # fmt: skip
    add("--coordinator", default=None, metavar="HOST:PORT",
        help="multi-process run: the address of process 0 (with --num-processes and "
        "--process-id); calls jax.distributed.initialize")  # fmt: skip
    add("--num-processes", type=int_at_least(1), default=None, metavar="N",
        help="multi-process run: how many processes take part")  # fmt: skip
    add("--process-id", type=int_at_least(0), default=None, metavar="I",
        help="multi-process run: this process's index, 0 to N-1")  # fmt: skip
    add("--distributed", action="store_true",
        help="multi-process run configured by the cluster (Slurm, TPU pods, ...): "
        "jax.distributed.initialize() with no arguments")  # fmt: skip
    add("--plot", default=None, metavar="PNG",
        help="write loss and accuracy curves to this PNG (needs matplotlib)")  # fmt: skip
    add("--quiet", action="store_true", help="print the final result only")
    p.set_defaults(run=_run_train, subparser=p)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config = {k: getattr(args, k) for k in _RESUME_KEYS}
    config["hidden"] = list(config["hidden"])
    return config


def _check_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Write ``config.json`` for a new run; on --resume, check the arguments match it."""
    path = os.path.join(args.run_dir, "config.json")
    if args.resume:
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            parser.error(f"--resume: cannot read {path} ({type(err).__name__}: {err})")
        for key, value in _config(args).items():
            if saved.get(key) != value:
                parser.error(
                    f"--{key.replace('_', '-')} is {value!r} but the run being resumed used "
                    f"{saved.get(key)!r} ({path}); resume with the same value"
                )
        return
    if os.path.exists(os.path.join(args.run_dir, "config.json")):
        parser.error(
            f"--run-dir {args.run_dir} already holds a run; add --resume to continue it, or "
            "choose another folder"
        )
    os.makedirs(args.run_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_config(args), f, indent=2)
        f.write("\n")


def _silent(*args: Any, **kwargs: Any) -> None:
    """``print`` on every process but process 0."""


def _start_distributed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``jax.distributed.initialize`` for a multi-process run.

    Only process 0 prints and writes files; every process loads the whole data
    set and feeds its own rows of each batch to its own devices.
    """
    manual = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in manual) and any(v is None for v in manual):
        parser.error("--coordinator, --num-processes and --process-id go together")
    if args.distributed and args.coordinator is not None:
        parser.error("--distributed reads the cluster's settings: drop --coordinator and co.")
    if args.coordinator is None and not args.distributed:
        return
    if args.process_id is not None and args.process_id >= args.num_processes:
        parser.error(
            f"--process-id {args.process_id} must be below --num-processes {args.num_processes}"
        )
    # Cross-process collectives on CPU devices need gloo (GPU/TPU bring their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.distributed:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not jbp.is_main_process():
        args.quiet, args.plot = True, None


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.resume and args.run_dir is None:
        parser.error("--resume needs --run-dir, the folder of the run to continue")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'jbp[experiments]'")
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    processes = args.num_processes or 1
    if args.devices is not None:
        if args.devices % processes:
            parser.error(f"--devices {args.devices} does not split over {processes} processes")
        if not args.distributed:  # a cluster brings its own devices
            simulate_cpu_devices(args.devices // processes)
    _start_distributed(args, parser)  # before anything starts JAX's backends
    say = print if jbp.is_main_process() else _silent
    mesh = None
    if args.devices is not None:
        try:
            mesh = jbp.make_mesh(args.devices)
        except ValueError as err:
            parser.error(f"--devices: {err}")
        if args.batch_size % args.devices:
            parser.error(
                f"--batch-size {args.batch_size} does not split evenly over --devices "
                f"{args.devices}; use a multiple of {args.devices}"
            )
    try:
        data = jbp.load_dataset(args.data, seed=args.seed, test_fraction=args.test_fraction)
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"--data: {err}")
    sizes = [data.n_features, *args.hidden, data.n_classes]
    net = jbp.mlp(sizes, args.activation)
    sources = (
        ("backprop", "autodiff") if args.gradient_source == "both" else (args.gradient_source,)
    )
    if args.run_dir is not None and jax.process_index() == 0:
        _check_config(args, parser)
    if not args.quiet:
        print(
            f"jbp train: {data.name}: {len(data.y_train)} train / {len(data.y_test)} test "
            f"examples, {data.n_features} features, {data.n_classes} classes"
        )
        print(
            f"mlp {sizes} {args.activation}, {args.loss}, {args.optimizer} lr {args.lr:g}, "
            f"batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}, {args.dtype}, "
            f"gradients from {' and '.join(sources)}, check every "
            f"{args.check_every or 'never'}, backend {device()}"
            + (f" × {args.devices} (data-parallel)" if mesh is not None else "")
        )
    results = {}
    for source in sources:
        run_dir = args.run_dir
        if run_dir is not None and len(sources) > 1:
            run_dir = os.path.join(run_dir, source)
        if len(sources) > 1 and not args.quiet:
            print(f"-- {source}")
        start = time.perf_counter()
        try:
            result = jbp.fit(
                net, args.loss, OPTIMIZERS[args.optimizer](args.lr), data,
                epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                dtype=jnp.dtype(args.dtype), gradient_source=source,
                check_every=args.check_every or None, patience=args.patience,
                min_delta=args.min_delta, monitor=args.monitor, run_dir=run_dir,
                resume=args.resume, checkpoint_every=args.checkpoint_every,
                max_steps=args.max_steps, mesh=mesh, verbose=not args.quiet,
            )  # fmt: skip
        except jbp.TrainingError as err:
            print(f"jbp train: {source}: {err}")
            return 1
        except (jbp.CheckpointError, ValueError) as err:
            parser.error(str(err))
        seconds = time.perf_counter() - start
        results[source] = result
        ev = jbp.evaluate(net, args.loss, result.state.params, data.x_test, data.y_test)
        if ev["n"]:
            correct = round(ev["accuracy"] * ev["n"])
            what = (
                f"test accuracy {100 * ev['accuracy']:.2f}% ({correct}/{ev['n']}), "
                f"test loss {ev['loss']:.4f}"
            )
        else:
            ev = jbp.evaluate(net, args.loss, result.state.params, data.x_train, data.y_train)
            what = f"train accuracy {100 * ev['accuracy']:.2f}% (no test split)"
        epochs_done = result.history[-1]["epoch"] if result.history else 0
        stopped = {"early_stopping": ", stopped early", "max_steps": ", stopped at --max-steps"}
        say(
            f"{source}: {what} after {epochs_done} epochs ({int(result.state.step)} steps"
            f"{stopped.get(result.stop_reason, '')}) in {format_duration(seconds)}"
        )
    note = None
    if len(results) == 2:
        report = jbp.compare(results["backprop"].state.params, results["autodiff"].state.params)
        worst = max(row.max_abs_err for row in report.rows)
        note = (
            f"largest |parameter difference| backprop vs autodiff: {worst:.3g} "
            f"({report.n_bitwise} of {len(report.rows)} leaves bitwise identical)"
        )
        say(note)
    if args.plot is not None:
        runs = {source: r.history for source, r in results.items()}
        title = f"{data.name}: mlp {sizes} {args.activation}, {args.optimizer} lr {args.lr:g}"
        print(f"curves: {jbp.plot_curves(runs, args.plot, title=title, note=note)}")
    return 0
