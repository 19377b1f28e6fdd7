"""Train a byte-level jbp.llama on Python's own standard library, twice (hand-written
backprop with the live gradient check, and jax.grad), and compare.

The corpus is ``jbp.load_dataset("stdlib")``: the top-level ``.py`` files of the
running interpreter's standard library, split by file into training and held-out
documents, each cut into windows of ``--length`` bytes for next-byte prediction;
the last window of a document is shorter, padded (token 0, label -1, False in the
padding mask), so every batch holds documents of different lengths. The network is
``jbp.llama`` (RMSNorm, rotary positions, grouped-query attention, SwiGLU, no
biases, the output projection tied to the byte embedding): every gradient of the
backprop run comes from the δ rules, and every ``--check-every`` steps the run
compares them with jax.grad on the current batch (and would stop on a mismatch).
Both runs start from the same seed and use the same optax optimiser (adam on a
warmup-cosine schedule).

Reported: held-out bits per byte of both runs (the loss per target byte over ln 2,
``jbp.evaluate(...)["loss_per_token"]``) against the unigram baseline (the
training bytes' frequencies, add-one smoothed, scored on the held-out bytes), the
largest per-epoch differences between the two runs' curves, the largest
|parameter difference| after training, and both runs' curves overlaid in
``OUT/train_corpus.png``.

    python experiments/train_corpus.py [--max-bytes 1000000] [--epochs 2]
        [--features 64] [--heads 4] [--kv-heads 2] [--depth 2] [--out experiments/out]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import jax
import numpy as np
import optax
from _twin_runs import fit_twins, report_twin_runs

import jbp

HERE = os.path.dirname(os.path.abspath(__file__))


def unigram_bits(data: jbp.Dataset) -> float:
    """Held-out bits per byte of the training bytes' frequencies (add-one smoothed)."""
    train = data.y_train[data.y_train >= 0]
    test = data.y_test[data.y_test >= 0]
    counts = np.bincount(train, minlength=256) + 1.0
    p = counts / counts.sum()
    return float(-np.mean(np.log2(p[test])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=1_000_000, help="bytes of source read")
    parser.add_argument("--length", type=int, default=128, help="bytes per window")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for the PNG")
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)

    data = jbp.load_dataset(
        "stdlib", length=args.length, max_bytes=args.max_bytes, seed=args.seed, test_fraction=0.1
    )
    net = jbp.llama(
        256, args.features, args.heads, args.depth, kv_heads=args.kv_heads, tie_embeddings=True
    )
    steps = args.epochs * -(-len(data.x_train) // args.batch_size)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, steps // 20, steps, 0.0)
    model = (
        f"llama(vocab=256, features={args.features}, heads={args.heads}, kv_heads="
        f"{args.kv_heads}, depth={args.depth}, tie_embeddings=True)"
    )
    padded = int((~data.mask_train).any(axis=1).sum())
    print(
        f"{data.name}: {len(data.x_train)} train / {len(data.x_test)} held-out windows "
        f"({padded} training windows padded); {model}, softmax_xent, adam lr {args.lr:g} "
        f"(warmup-cosine), batch {args.batch_size}, {args.epochs} epochs ({steps} steps), "
        f"live check every {args.check_every} steps, seed {args.seed}, {args.dtype}; "
        f"jax {jax.__version__} on {jax.default_backend()}, python {platform.python_version()}"
    )
    baseline = unigram_bits(data)
    print(f"unigram baseline: {baseline:.4f} bits per byte on the held-out files")

    start = time.perf_counter()
    runs = fit_twins(net, optax.adam(schedule), data, args, check_every=args.check_every)
    results = {source: result for source, (result, _) in runs.items()}
    for source, (result, seconds) in runs.items():
        ev = jbp.evaluate(
            net, "softmax_xent", result.state.params, data.x_test, data.y_test,
            mask=data.mask_test,
        )  # fmt: skip
        checks = sum(r["grad_checks"] for r in result.history)
        worst = max((r["grad_check_max_rel_err"] or 0.0) for r in result.history)
        check = f", {checks} live checks, worst rel err {worst:.1e}" if checks else ""
        print(
            f"{source:9s} held-out {ev['loss_per_token'] / math.log(2):.4f} bits per byte "
            f"(unigram {baseline:.4f}), next-byte accuracy {100 * ev['accuracy']:.2f}% "
            f"({seconds:.0f} s{check})"
        )
    print(f"both runs: {time.perf_counter() - start:.0f} s")
    report_twin_runs(
        results["backprop"],
        results["autodiff"],
        args.dtype,
        os.path.join(args.out, "train_corpus.png"),
        f"{data.name}, {model}: backprop and autodiff overlaid",
    )


if __name__ == "__main__":
    main()
