"""``jbp train``: train an MLP, a CNN, a transformer, a llama or a recurrent network with
optax on hand-written gradients."""

from __future__ import annotations

import argparse
import json
import math
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
    channel_counts,
    device,
    hidden_widths,
    int_at_least,
    loss_name,
    positive_float,
    simulate_cpu_devices,
)

# Each takes a learning rate: a number or an optax schedule.
OPTIMIZERS = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
}
SOURCES = ("backprop", "autodiff", "both")
MODELS = ("mlp", "cnn", "transformer", "llama", "lstm", "gru", "rnn")
SEQUENCE_MODELS = ("transformer", "llama")
RECURRENT_MODELS = ("lstm", "gru", "rnn")
SCHEDULES = ("constant", "cosine")
# --dtype: the params' dtype, or (bfloat16) mixed precision: float32 params, bfloat16 compute
TRAIN_DTYPES = (*DTYPES, "bfloat16")
# Arguments that must be the same to resume a run (the others may change);
# --channels too for a cnn, --features, --heads and --depth for a transformer,
# --epochs for a cosine schedule (it decays over all the run's steps).
_RESUME_KEYS = (
    "data", "test_fraction", "model", "hidden", "activation", "loss", "optimizer", "lr",
    "schedule", "batch_size", "seed", "dtype", "gradient_source",
)  # fmt: skip
# Arguments of a private run that must be the same to resume it (σ is checked by fit).
_DP_KEYS = (
    "dp", "epsilon", "delta", "max_norm", "accountant", "physical_batch_size", "max_batch_size",
)  # fmt: skip
_DP_FLAGS = (
    "epsilon", "noise_multiplier", "physical_batch_size", "max_batch_size",
)  # fmt: skip
# What a config.json written before a key existed meant by its absence.
_OLD_DEFAULTS = {"model": "mlp", "schedule": "constant", "dp": False}

_TRAIN_HELP = """\
Train a classifier on a data set with optax, on gradients from jbp's
hand-written δ equations (--gradient-source backprop, the default), from
jax.grad (autodiff), or both runs side by side from the same seed. The input
and output widths come from the data; --hidden sets the Dense layers between.

--model mlp (default): Dense layers (image data is flattened first).
--model cnn: 3x3 convolutions, --channels wide (SAME padding, the first with
stride 1, each later one with stride 2), then Flatten and the Dense layers.
It needs images: --data digits (as 8x8x1 images) or a .npz whose x is
(n, height, width) or (n, height, width, channels).
--model transformer: jbp.transformer, a causal pre-LN decoder (--depth
blocks of --heads-head attention and a 4x wide --activation MLP, --features
wide) from integer tokens to logits at every position. It needs a sequence
data set: --data sort (sorting 8 digits as next-token prediction; the
accuracy counts the answer tokens, the sorted half). --hidden does not apply.
Its learning rate follows a cosine schedule unless --schedule says otherwise.
--model llama: jbp.llama, a Llama-style decoder (RMSNorm, rotary positions,
--kv-heads grouped-query attention, SwiGLU, no biases; --tie-embeddings shares
the token embedding with the output projection), on a sequence data set such
as --data stdlib (byte-level language modelling on Python's own standard
library, documents padded into windows; the result line gives the held-out
loss in bits per answer token: for stdlib, bits per byte).
--model lstm, gru or rnn: --depth recurrent layers (jbp.LSTM, jbp.GRU, or
jbp.RNN with --activation) of --features hidden units, then a Dense head; on
tokens an Embedding of --features first. It takes sequences: --data digits
(read row by row, 8 steps of 8 pixels), a data set of padded token sequences
with one label each (--data majority: the last real step's state is
classified, the padding mask respected), or a sequence data set with labels per
position (--data sort or stdlib: a recurrent language model).

Every --check-every steps the two gradient sources are compared on the
current batch with jbp.compare, and the run stops (exit status 1) with the
report if they disagree. A NaN or Inf in the loss, gradients or parameters
stops it too, naming the step, and keeps the last good checkpoint.

With --run-dir, the run folder gets metrics.jsonl (one record per epoch),
checkpoint.npz (atomic, at every epoch end) and config.json; --resume
continues it and ends with bitwise the same parameters as an uninterrupted
run. With --gradient-source both, the two runs go to RUN_DIR/backprop and
RUN_DIR/autodiff.

--dp trains privately (DP-SGD): each step includes every training example
independently with probability q = --batch-size / N (Poisson sampling; an
epoch is N / --batch-size steps), clips each example's gradient to L2 norm
--max-norm (default 1.0), adds Gaussian noise of standard deviation σ·C to
the sum and divides by the expected batch. σ is --noise-multiplier, or
calibrated so that the run's steps spend exactly --epsilon at --delta
(default 1e-5); with both, --epsilon is a budget the run stops at. The
privacy ledger is dp-accounting's (PLD by default, --accountant rdp), for
add-or-remove-one neighbours; every epoch line and metrics.jsonl record
holds the ε spent so far, config.json the mechanism (noise_multiplier,
sampling_rate, max_norm, delta, accountant), and the run ends with σ, q,
the steps and ε. --physical-batch-size processes each step's batch in
chunks of that size (the noise is added once, to their sum).

Exit status: 0 on success, 1 if training stopped on an error (gradient
mismatch, non-finite values), 2 on bad arguments, data or checkpoints."""


def add_train(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an MLP, a CNN, a transformer, a llama or an LSTM/GRU/RNN with optax on "
        "hand-written gradients",
        description=_TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--data", default="digits", metavar="NAME|PATH",
        help=f"{', '.join(jbp.dataset_names())}, or a .npz (x, y) or .csv (label last) file "
        "(default digits)")  # fmt: skip
    add("--test-fraction", type=float, default=0.2, metavar="F",
        help="share of examples held out for testing (default 0.2; xor tests on its 4 points)")  # fmt: skip
    add("--model", choices=MODELS, default="mlp",
        help="mlp (Dense layers), cnn (3x3 convolutions, then the Dense layers; needs "
        "images), transformer or llama (need a sequence data set such as sort or stdlib), "
        "lstm, gru or rnn (recurrent: digits row by row, majority, sort or stdlib) "
        "(default mlp)")  # fmt: skip
    add("--channels", type=channel_counts, default=(32, 64), metavar="LIST",
        help="--model cnn: the convolutions' output channels, comma-separated "
        "(default 32,64)")  # fmt: skip
    add("--features", type=int_at_least(1), default=64, metavar="N",
        help="--model transformer: the width of the embeddings and attention (default 64)")  # fmt: skip
    add("--heads", type=int_at_least(1), default=4, metavar="N",
        help="--model transformer: attention heads; must divide --features (default 4)")  # fmt: skip
    add("--depth", type=int_at_least(1), default=2, metavar="N",
        help="--model transformer: attention + MLP blocks (default 2)")  # fmt: skip
    add("--kv-heads", type=int_at_least(1), default=None, metavar="N",
        help="--model llama: key/value heads, dividing --heads (default: --heads)")  # fmt: skip
    add("--tie-embeddings", action="store_true",
        help="--model llama: the output projection is the token embedding, transposed")  # fmt: skip
    add("--hidden", type=hidden_widths, default=(128, 64), metavar="LIST",
        help="hidden Dense layer widths, comma-separated, or none (default 128,64)")  # fmt: skip
    add("--activation", type=activation_name, default="relu", metavar="NAME",
        help="activation of the hidden layers (default relu)")  # fmt: skip
    add("--loss", type=loss_name, default="softmax_xent", metavar="NAME",
        help=f"one of {', '.join(jbp.loss_names())} (default softmax_xent)")  # fmt: skip
    add("--optimizer", choices=tuple(OPTIMIZERS), default="adam", help="(default adam)")
    add("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    add("--schedule", choices=SCHEDULES, default=None,
        help="the learning rate over the run: constant, or cosine (a linear warmup over the "
        "first 5%% of the --epochs' steps to --lr, then a cosine decay to 0) (default: "
        "cosine for a transformer, else constant)")  # fmt: skip
    add("--batch-size", type=int_at_least(1), default=32, metavar="N", help="(default 32)")
    add("--epochs", type=int_at_least(1), default=20, metavar="N", help="(default 20)")
    add("--seed", type=int_at_least(0), default=0,
        help="seeds params, batch order and split (default 0)")  # fmt: skip
    add("--dtype", choices=TRAIN_DTYPES, default="float32",
        help="params dtype; bfloat16: mixed precision, float32 params with bfloat16 "
        "activations and matmuls accumulated in float32 (default float32)")  # fmt: skip
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
    add("--dp", action="store_true",
        help="train privately: DP-SGD with Poisson sampling and a dp-accounting ledger")  # fmt: skip
    add("--epsilon", type=positive_float, default=None, metavar="E",
        help="--dp: the target ε (σ calibrated for the run's steps), or with "
        "--noise-multiplier a budget the run stops at")  # fmt: skip
    add("--delta", type=positive_float, default=1e-5, metavar="D",
        help="--dp: the δ of the (ε, δ) guarantee (default 1e-5; keep it below 1/N)")  # fmt: skip
    add("--max-norm", type=positive_float, default=1.0, metavar="C",
        help="--dp: the per-example clipping norm (default 1.0)")  # fmt: skip
    add("--noise-multiplier", type=positive_float, default=None, metavar="S",
        help="--dp: σ, the noise's standard deviation over --max-norm (instead of --epsilon)")  # fmt: skip
    add("--accountant", choices=("pld", "rdp"), default="pld",
        help="--dp: the privacy accountant (default pld)")  # fmt: skip
    add("--physical-batch-size", type=int_at_least(1), default=None, metavar="N",
        help="--dp: process each step's batch in chunks of N examples (default: at once)")  # fmt: skip
    add("--max-batch-size", type=int_at_least(1), default=None, metavar="N",
        help="--dp: cap each step's batch at N (truncated Poisson, accounted as such; "
        "default: no cap)")  # fmt: skip
    add("--plot", default=None, metavar="PNG",
        help="write loss and accuracy curves to this PNG (needs matplotlib)")  # fmt: skip
    add("--quiet", action="store_true", help="print the final result only")
    p.set_defaults(run=_run_train, subparser=p)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config = {k: getattr(args, k) for k in _RESUME_KEYS}
    config["hidden"] = list(config["hidden"])
    if args.model == "cnn":
        config["channels"] = list(args.channels)
    if args.model in SEQUENCE_MODELS:
        config.update(features=args.features, heads=args.heads, depth=args.depth)
    if args.model in RECURRENT_MODELS:
        config.update(features=args.features, depth=args.depth)
    if args.model == "llama":
        config.update(kv_heads=args.kv_heads, tie_embeddings=args.tie_embeddings)
    if args.schedule == "cosine":
        config["epochs"] = args.epochs
    if args.dp:
        config.update({k: getattr(args, k) for k in _DP_KEYS})
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
            used = saved.get(key, _OLD_DEFAULTS.get(key))
            if used != value:
                parser.error(
                    f"--{key.replace('_', '-')} is {value!r} but the run being resumed used "
                    f"{used!r} ({path}); resume with the same value"
                    + (
                        " (a cosine schedule decays over all the run's epochs)"
                        if key == "epochs"
                        else ""
                    )
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


def build_net(
    model: str,
    input_shape: tuple[int, ...],
    classes: int,
    *,
    hidden: tuple[int, ...],
    activation: str,
    channels: tuple[int, ...],
    features: int = 64,
    heads: int = 4,
    depth: int = 2,
    kv_heads: int | None = None,
    tie_embeddings: bool = False,
    vocab: int | None = None,
    per_position: bool = False,
) -> tuple[jbp.Sequential, str]:
    """The network ``jbp train`` trains, and a line that describes it.

    ``mlp``: ``jbp.mlp`` over the features (after a ``jbp.Flatten`` for
    images). ``cnn``: one 3×3 (3×…×3 for other ranks) ``jbp.Conv`` per entry
    of ``channels``, SAME padding, stride 1 for the first and 2 for the rest,
    then ``jbp.Flatten`` and the Dense layers. ``transformer``:
    ``jbp.transformer`` over ``classes`` tokens and sequences of
    ``input_shape[0]``, causal. ``llama``: ``jbp.llama`` over ``classes``
    tokens. ``lstm``, ``gru``, ``rnn``: ``depth`` recurrent layers of ``features``
    hidden units (``rnn`` with ``activation``), each returning sequences but the last
    (which does too for per-position labels, ``per_position``), a Dense head; an
    Embedding of ``vocab`` tokens first for token inputs. Public ``jbp`` names only.
    """
    if model in RECURRENT_MODELS:
        return _recurrent_net(
            model, input_shape, classes, features, depth, activation, vocab, per_position
        )
    if model == "llama":
        net = jbp.llama(
            classes, features, heads, depth, kv_heads=kv_heads, tie_embeddings=tie_embeddings
        )
        text = (
            f"llama: {depth} block{'s' if depth > 1 else ''}, {features} features, {heads} "
            f"heads, {kv_heads or heads} kv heads, rope, swiglu, "
            f"{'tied' if tie_embeddings else 'untied'} embeddings, vocab {classes}"
        )
        return net, text
    if model == "transformer":
        length = input_shape[0]
        net = jbp.transformer(classes, length, features, heads, depth, activation=activation)
        text = (
            f"transformer: {depth} block{'s' if depth > 1 else ''}, {features} features, "
            f"{heads} head{'s' if heads > 1 else ''}, mlp x4 "
            f"{activation}, causal, vocab {classes}, length {length}"
        )
        return net, text
    if model == "mlp":
        sizes = [math.prod(input_shape), *hidden, classes]
        net = jbp.mlp(sizes, activation)
        if len(input_shape) == 1:
            return net, f"mlp {sizes} {activation}"
        return jbp.Sequential([jbp.Flatten(), *net.layers]), f"flatten + mlp {sizes} {activation}"
    kernel = (3,) * (len(input_shape) - 1)
    convs, width = [], input_shape[-1]
    for i, out in enumerate(channels):
        convs.append(jbp.Conv(width, out, kernel, activation, stride=1 if i == 0 else 2))
        width = out
    sizes = [math.prod(jbp.Sequential(convs).output_shape(input_shape)), *hidden, classes]
    head = jbp.mlp(sizes, activation)
    text = (
        f"cnn: {'x'.join(map(str, kernel))} conv {list(channels)} (stride 1"
        f"{', then 2' if len(channels) > 1 else ''}) + flatten + mlp {sizes} {activation}"
    )
    return jbp.Sequential([*convs, jbp.Flatten(), *head.layers]), text


def mixed_precision(net: jbp.Sequential, dtype: str) -> jbp.Sequential:
    """``net`` computing in ``dtype`` (mixed precision): a ``jbp.Cast(dtype)`` first, or
    after the ``Embedding`` of a network that takes tokens (its params stay float32)."""
    at = 1 if net.takes_tokens else 0
    return jbp.Sequential([*net.layers[:at], jbp.Cast(dtype), *net.layers[at:]])


def _recurrent_net(
    model: str,
    input_shape: tuple[int, ...],
    classes: int,
    features: int,
    depth: int,
    activation: str,
    vocab: int | None,
    per_position: bool,
) -> tuple[jbp.Sequential, str]:
    layers: list[Any] = []
    width = input_shape[-1] if vocab is None else features
    if vocab is not None:
        layers.append(jbp.Embedding(vocab, features))
    for i in range(depth):
        sequences = per_position or i < depth - 1
        if model == "rnn":
            layers.append(jbp.RNN(width, features, activation, return_sequences=sequences))
        else:
            kind = jbp.LSTM if model == "lstm" else jbp.GRU
            layers.append(kind(width, features, return_sequences=sequences))
        width = features
    layers.append(jbp.Dense(features, classes))
    name = {"lstm": "LSTM", "gru": "GRU", "rnn": f"RNN ({activation})"}[model]
    source = f"embedding {vocab}→{features}, " if vocab is not None else ""
    text = (
        f"{model}: {source}{depth} {name} layer{'s' if depth > 1 else ''} of {features}, "
        f"{'every step' if per_position else 'the last real step'} → dense {classes}"
    )
    return jbp.Sequential(layers), text


def _load_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> jbp.Dataset:
    """The data set; digits as images for a cnn, row by row for a recurrent network.
    Bad data: a usage error."""
    options: dict[str, Any] = {}
    if args.data == "digits" and args.model == "cnn":
        options = {"images": True}
    elif args.data == "digits" and args.model in RECURRENT_MODELS:
        options = {"rows": True}
    try:
        data = jbp.load_dataset(
            args.data, seed=args.seed, test_fraction=args.test_fraction, **options
        )
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"--data: {err}")
    if args.model in SEQUENCE_MODELS and not data.is_sequence:
        parser.error(
            f"--model {args.model} needs a sequence data set, integer tokens (n, T) with labels "
            f"per position (n, T), but {data.name} has examples of shape {data.input_shape} "
            "with one label each; use --data sort or stdlib, or --model mlp or cnn"
        )
    if args.model in RECURRENT_MODELS:
        tokens = jnp.issubdtype(data.x_train.dtype, jnp.integer)
        if not (tokens and data.x_train.ndim == 2) and len(data.input_shape) != 2:
            parser.error(
                f"--model {args.model} needs sequences: integer tokens (n, T) or steps of "
                f"features (n, T, features), but {data.name} has examples of shape "
                f"{data.input_shape}; use --data digits (row by row), majority, sort or stdlib"
            )
        return data
    if args.model not in SEQUENCE_MODELS and data.is_sequence:
        parser.error(
            f"--model {args.model} needs feature vectors or images with one label each, but "
            f"{data.name} is a sequence data set (integer tokens (n, T), labels per position); "
            "use --model transformer or llama"
        )
    if args.model == "cnn" and len(data.input_shape) < 2:
        parser.error(
            f"--model cnn needs images, examples of shape (height, width, channels), but "
            f"{data.name} has examples of shape {data.input_shape}; use --data digits or a .npz "
            "file whose x is (n, height, width) or (n, height, width, channels), or --model mlp"
        )
    return data


def _make_mesh(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The data-parallel mesh for --devices, or None."""
    if args.devices is None:
        return None
    try:
        mesh = jbp.make_mesh(args.devices)
    except ValueError as err:
        parser.error(f"--devices: {err}")
    if args.batch_size % args.devices:
        parser.error(
            f"--batch-size {args.batch_size} does not split evenly over --devices "
            f"{args.devices}; use a multiple of {args.devices}"
        )
    return mesh


def _privacy(args: argparse.Namespace, parser: argparse.ArgumentParser) -> jbp.Privacy | None:
    """``jbp.Privacy`` from the --dp flags, or None; flags that need --dp without it:
    a usage error."""
    if not args.dp:
        given = [f"--{k.replace('_', '-')}" for k in _DP_FLAGS if getattr(args, k) is not None]
        if given:
            parser.error(f"{', '.join(given)} configure private training: add --dp")
        return None
    if args.epsilon is None and args.noise_multiplier is None:
        parser.error("--dp needs --epsilon E (σ calibrated for it) or --noise-multiplier S")
    if args.gradient_source != "backprop":
        parser.error(
            f"--dp trains on jbp's clipped per-example gradients: --gradient-source must be "
            f"backprop, got {args.gradient_source}"
        )
    if args.devices is not None:
        parser.error("--dp runs on one device for now: drop --devices")
    try:
        return jbp.Privacy(
            max_norm=args.max_norm, noise_multiplier=args.noise_multiplier,
            epsilon=args.epsilon, delta=args.delta, accountant=args.accountant,
            physical_batch_size=args.physical_batch_size, max_batch_size=args.max_batch_size,
        )  # fmt: skip
    except ValueError as err:
        parser.error(f"--dp: {err}")


def _start(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check the flags that need no data, and start JAX (devices, processes)."""
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


def _describe(args: argparse.Namespace, data: jbp.Dataset, model: str, mesh: Any) -> None:
    shape = data.input_shape
    inputs = f"{shape[0]} features" if len(shape) == 1 else f"{'×'.join(map(str, shape))} images"
    if model.startswith(RECURRENT_MODELS):
        inputs = f"sequences of {shape[0]} steps" + (
            f" of {shape[1]} features" if len(shape) == 2 else " (tokens)"
        )
        if data.mask_train is not None:
            inputs += f", {100 * (1 - data.mask_train.mean()):.0f}% of the steps padding"
    classes = f"{data.n_classes} classes"
    if data.is_sequence:
        answers = int((data.y_train[0] >= 0).sum())
        inputs = f"sequences of {shape[0]} tokens, {answers} of them with a target"
        classes = f"a vocabulary of {data.n_classes} tokens"
    print(
        f"jbp train: {data.name}: {len(data.y_train)} train / {len(data.y_test)} test "
        f"examples, {inputs}, {classes}"
    )
    schedule = "" if args.schedule == "constant" else f" ({args.schedule})"
    print(
        f"{model}, {args.loss}, {args.optimizer} lr {args.lr:g}{schedule}, "
        f"batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}, {args.dtype}, "
        f"gradients from {' and '.join(_sources(args))}, check every "
        f"{args.check_every or 'never'}, backend {device()}"
        + (f" × {args.devices} (data-parallel)" if mesh is not None else "")
    )
    if args.dp:
        target = f"ε = {args.epsilon:g}" if args.epsilon is not None else "no ε target"
        sigma = "" if args.noise_multiplier is None else f", σ = {args.noise_multiplier:g}"
        print(
            f"private (DP-SGD): Poisson sampling, expected batch {args.batch_size} of "
            f"{len(data.y_train)}, clipping norm {args.max_norm:g}{sigma}, {target} at δ = "
            f"{args.delta:g} ({args.accountant.upper()})"
        )


def _learning_rate(args: argparse.Namespace, data: jbp.Dataset) -> Any:
    """``--lr``, or for ``--schedule cosine`` an optax schedule over the run's
    ``--epochs`` (``--max-steps`` stops a run early but does not change it)."""
    if args.schedule == "constant":
        return args.lr
    n = len(data.y_train)
    per_epoch = max(1, round(n / args.batch_size)) if args.dp else math.ceil(n / args.batch_size)
    steps = args.epochs * per_epoch
    return optax.warmup_cosine_decay_schedule(0.0, args.lr, steps // 20, max(steps, 1), 0.0)


def _sources(args: argparse.Namespace) -> tuple[str, ...]:
    both = args.gradient_source == "both"
    return ("backprop", "autodiff") if both else (args.gradient_source,)


def _outcome(args: argparse.Namespace, net: Any, data: jbp.Dataset, result: Any) -> str:
    """The result line's accuracy part: on the test split, else on the training split."""
    params = result.state.params
    ev = jbp.evaluate(net, args.loss, params, data.x_test, data.y_test, mask=data.mask_test)
    if ev["n"] and data.is_sequence:
        correct = round(ev["accuracy"] * ev["tokens"])
        bits = ev["loss_per_token"] / math.log(2)
        return (
            f"test accuracy {100 * ev['accuracy']:.2f}% of answer tokens "
            f"({correct}/{ev['tokens']}), {100 * ev['sequence_accuracy']:.2f}% of sequences "
            f"right at every answer token, test loss {ev['loss']:.4f}, "
            f"{bits:.4f} bits per answer token"
        )
    if ev["n"]:
        correct = round(ev["accuracy"] * ev["n"])
        return (
            f"test accuracy {100 * ev['accuracy']:.2f}% ({correct}/{ev['n']}), "
            f"test loss {ev['loss']:.4f}"
        )
    ev = jbp.evaluate(net, args.loss, params, data.x_train, data.y_train, mask=data.mask_train)
    what = "of answer tokens " if data.is_sequence else ""
    return f"train accuracy {100 * ev['accuracy']:.2f}% {what}(no test split)"


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _start(args, parser)
    privacy = _privacy(args, parser)
    say = print if jbp.is_main_process() else _silent
    mesh = _make_mesh(args, parser)
    data = _load_data(args, parser)
    if args.schedule is None:
        cosine = args.model in SEQUENCE_MODELS or args.model in RECURRENT_MODELS
        args.schedule = "cosine" if cosine else "constant"
    tokens = jnp.issubdtype(data.x_train.dtype, jnp.integer)
    vocab = None
    if tokens and args.model in RECURRENT_MODELS:
        vocab = max(
            data.n_classes, int(data.x_train.max()) + 1, int(data.x_test.max(initial=0)) + 1
        )
    try:
        net, model = build_net(
            args.model, data.input_shape, data.n_classes,
            hidden=args.hidden, activation=args.activation, channels=args.channels,
            features=args.features, heads=args.heads, depth=args.depth,
            kv_heads=args.kv_heads, tie_embeddings=args.tie_embeddings,
            vocab=vocab, per_position=data.is_sequence,
        )  # fmt: skip
    except ValueError as err:
        parser.error(f"--model {args.model}: {err}")
    params_dtype, check_rtol = jnp.dtype(args.dtype), None
    if args.dtype == "bfloat16":  # mixed precision: float32 params, bfloat16 compute
        if args.model in RECURRENT_MODELS:
            parser.error(
                f"--dtype bfloat16: --model {args.model} has no mixed precision (recurrent "
                "layers compute in their params' dtype); use --dtype float32"
            )
        net = mixed_precision(net, args.dtype)
        params_dtype = jnp.dtype(jnp.float32)  # fit's live check: the Cast's tolerance
        model += f", mixed precision (float32 params, {args.dtype} compute)"
    optimizer = OPTIMIZERS[args.optimizer](_learning_rate(args, data))
    sources = _sources(args)
    if args.run_dir is not None and jax.process_index() == 0:
        _check_config(args, parser)
    if not args.quiet:
        _describe(args, data, model, mesh)
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
                net, args.loss, optimizer, data,
                epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                dtype=params_dtype, gradient_source=source, check_rtol=check_rtol,
                check_every=args.check_every or None, patience=args.patience,
                min_delta=args.min_delta, monitor=args.monitor, run_dir=run_dir,
                resume=args.resume, checkpoint_every=args.checkpoint_every,
                max_steps=args.max_steps, mesh=mesh, privacy=privacy, verbose=not args.quiet,
            )  # fmt: skip
        except jbp.TrainingError as err:
            print(f"jbp train: {source}: {err}")
            return 1
        except (jbp.CheckpointError, ValueError) as err:
            parser.error(str(err))
        seconds = time.perf_counter() - start
        results[source] = result
        epochs_done = result.history[-1]["epoch"] if result.history else 0
        stopped = {
            "early_stopping": ", stopped early",
            "max_steps": ", stopped at --max-steps",
            "privacy_budget": ", stopped at the --epsilon budget",
        }
        say(
            f"{source}: {_outcome(args, net, data, result)} after {epochs_done} epochs "
            f"({int(result.state.step)} steps{stopped.get(result.stop_reason, '')}) in "
            f"{format_duration(seconds)}"
        )
        if result.privacy is not None and args.quiet:
            p = result.privacy
            say(
                f"DP-SGD: σ = {p['noise_multiplier']:.4g}, q = {p['sampling_rate']:.4g}, C = "
                f"{p['max_norm']:g}, {p['steps']} steps: ε = {p['epsilon']:.4g} at δ = "
                f"{p['delta']:g} ({p['accountant'].upper()}, add-or-remove-one)"
            )
    _compare_and_plot(args, data, model, results, say)
    return 0


def _compare_and_plot(
    args: argparse.Namespace, data: jbp.Dataset, model: str, results: dict[str, Any], say: Any
) -> None:
    """With both sources: the largest parameter difference; with --plot: the curves."""
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
        title = f"{data.name}: {model}, {args.optimizer} lr {args.lr:g}"
        print(f"curves: {jbp.plot_curves(runs, args.plot, title=title, note=note)}")
