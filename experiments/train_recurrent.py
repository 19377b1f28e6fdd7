"""Train recurrent networks on two tasks with hand-written BPTT and the live gradient
check on, each twice (backprop and jax.grad from the same seed), and compare.

1. **Digits, row by row.** ``jbp.load_dataset("digits", rows=True)``: each 8×8
   image read as a sequence of 8 steps of 8 pixels; ``--cell`` layers (LSTM by
   default) of ``--features`` units, the last real step's state classified by a
   Dense head.
2. **Majority of a variable-length, padded sequence.**
   ``jbp.load_dataset("majority")``: 1 to ``--max-length`` tokens, labelled by the
   most frequent token, right-padded with token 0 (a padding mask). An Embedding,
   then the same recurrent stack; the network has to count over the whole sequence
   and read its answer at each example's own last real step, which the padding mask
   gives (the state is carried through the pads). Trained also without the mask,
   where the pads are read as token 0 and the state at the padded end is classified.

Every ``--check-every`` steps the backprop run compares its gradients with jax.grad
on the current batch (with the mask) and would stop on a mismatch. Reported:
held-out accuracy of each run, the live checks, the largest per-epoch differences
between the two runs' curves and after training between their parameters, and both
runs' curves overlaid in ``OUT/train_recurrent_digits.png`` and
``OUT/train_recurrent_majority.png``.

    python experiments/train_recurrent.py [--cell lstm|gru|rnn] [--epochs 40]
        [--features 64] [--depth 2] [--out experiments/out]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import jax
import optax
from _twin_runs import fit_twins, report_twin_runs

import jbp

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = {"lstm": jbp.LSTM, "gru": jbp.GRU}


def recurrent(cell: str, features: int, hidden: int, depth: int) -> list[Any]:
    """``depth`` layers of ``cell``, every one but the last returning sequences."""
    layers = []
    for i in range(depth):
        sequences = i < depth - 1
        if cell == "rnn":
            layers.append(jbp.RNN(features, hidden, "tanh", return_sequences=sequences))
        else:
            layers.append(LAYERS[cell](features, hidden, return_sequences=sequences))
        features = hidden
    return layers


def held_out(net: Any, params: Any, data: jbp.Dataset) -> str:
    ev = jbp.evaluate(net, "softmax_xent", params, data.x_test, data.y_test, mask=data.mask_test)
    return f"{100 * ev['accuracy']:.2f}% ({round(ev['accuracy'] * ev['n'])}/{ev['n']})"


def checks(result: jbp.FitResult) -> str:
    n = sum(r["grad_checks"] for r in result.history)
    worst = max((r["grad_check_max_rel_err"] or 0.0) for r in result.history)
    return f", {n} live checks, worst rel err {worst:.1e}" if n else ""


def adam(args: Any, data: jbp.Dataset) -> tuple[Any, int]:
    """Adam on a warmup-cosine schedule over the run, and the run's steps."""
    steps = args.epochs * -(-len(data.x_train) // args.batch_size)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, steps // 20, steps, 0.0)
    return optax.adam(schedule), steps


def task(name: str, net: Any, data: jbp.Dataset, args: Any, png: str) -> None:
    optimizer, steps = adam(args, data)
    print(f"\n{name}: {len(data.x_train)} train / {len(data.x_test)} held-out, {steps} steps")
    runs = fit_twins(net, optimizer, data, args, check_every=args.check_every)
    for source, (result, seconds) in runs.items():
        print(
            f"{source:9s} held-out accuracy {held_out(net, result.state.params, data)} "
            f"({seconds:.0f} s{checks(result)})"
        )
    report_twin_runs(
        runs["backprop"][0], runs["autodiff"][0], args.dtype, os.path.join(args.out, png),
        f"{data.name}, {args.cell}: backprop and autodiff overlaid",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm")
    parser.add_argument("--features", type=int, default=64, help="hidden units per layer")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for the PNGs")
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    print(
        f"{args.cell}: {args.depth} layers of {args.features}, softmax_xent, adam lr "
        f"{args.lr:g} (warmup-cosine), batch {args.batch_size}, {args.epochs} epochs, live "
        f"check every {args.check_every} steps, seed {args.seed}, {args.dtype}; jax "
        f"{jax.__version__} on {jax.default_backend()}, python {platform.python_version()}"
    )
    start = time.perf_counter()
    digits = jbp.load_dataset("digits", rows=True, seed=args.seed)
    net = jbp.Sequential(
        [*recurrent(args.cell, 8, args.features, args.depth), jbp.Dense(args.features, 10)]
    )
    task("digits, 8 steps of 8 pixels", net, digits, args, "train_recurrent_digits.png")

    majority = jbp.load_dataset("majority", max_length=args.max_length, seed=args.seed)
    vocab = majority.n_classes
    net = jbp.Sequential(
        [
            jbp.Embedding(vocab, args.features),
            *recurrent(args.cell, args.features, args.features, args.depth),
            jbp.Dense(args.features, vocab),
        ]
    )
    padding = 100 * (1 - majority.mask_train.mean())
    task(
        f"majority, 1-{args.max_length} tokens, {padding:.0f}% of the steps padding",
        net, majority, args, "train_recurrent_majority.png",
    )  # fmt: skip
    unmasked = majority._replace(mask_train=None, mask_test=None)
    result = jbp.fit(
        net, "softmax_xent", adam(args, unmasked)[0], unmasked, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    print(f"without the mask: held-out accuracy {held_out(net, result.state.params, unmasked)}")
    print(f"\nall runs: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
