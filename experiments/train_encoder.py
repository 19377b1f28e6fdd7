"""Train a non-causal encoder classifier on padded variable-length sequences, with and
without the padding mask.

The data set is ``jbp.load_dataset("majority")``: sequences of 1 to
``--max-length`` tokens (uniform), each labelled by its most frequent token, right
padded with token 0. The network is a pre-LN encoder from public layers only:
``Embedding``, ``PositionalEmbedding``, ``--depth`` × [residual non-causal
``MultiHeadAttention``, residual SwiGLU], ``LayerNorm``, ``GlobalAvgPool`` (with a
mask: the mean over each sequence's real positions) and a ``Dense`` head. With the
mask, attention never reads a pad and the pooled mean ignores them, so a sequence's
prediction is that of the sequence alone; without it, the pads count as zeros and
bias the vote. The run with the mask has the live gradient check on (backprop
against jax.grad every ``--check-every`` steps, with the mask).

    python experiments/train_encoder.py [--epochs 10] [--features 32] [--depth 1]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import optax

import jbp


def encoder(vocab: int, length: int, features: int, heads: int, depth: int) -> jbp.Sequential:
    blocks = []
    for _ in range(depth):
        attention = jbp.MultiHeadAttention(features, heads)  # non-causal
        blocks.append(jbp.Residual(jbp.Sequential([jbp.LayerNorm(features), attention])))
        mlp = jbp.swiglu(features, 2 * features)
        blocks.append(jbp.Residual(jbp.Sequential([jbp.LayerNorm(features), mlp])))
    return jbp.Sequential(
        [
            jbp.Embedding(vocab, features),
            jbp.PositionalEmbedding(length, features),
            *blocks,
            jbp.LayerNorm(features),
            jbp.GlobalAvgPool(),
            jbp.Dense(features, vocab),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=5)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--check-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = jbp.load_dataset(
        "majority", n=args.n, max_length=args.max_length, vocab=args.vocab, seed=args.seed
    )
    net = encoder(args.vocab, args.max_length, args.features, args.heads, args.depth)
    print(
        f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} held-out sequences, "
        f"{100 * (1 - data.mask_train.mean()):.0f}% of positions padding; encoder: {args.depth} "
        f"block(s), {args.features} features, {args.heads} heads, swiglu, masked mean pool; "
        f"adam lr {args.lr:g}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}; "
        f"jax {jax.__version__} on {jax.default_backend()}, python {platform.python_version()}"
    )
    variants = {
        "with the mask": (data, args.check_every),
        "without it": (data._replace(mask_train=None, mask_test=None), None),
    }
    for name, (variant, check) in variants.items():
        start = time.perf_counter()
        result = jbp.fit(
            net, "softmax_xent", optax.adam(args.lr), variant,
            epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, check_every=check,
        )  # fmt: skip
        ev = jbp.evaluate(
            net, "softmax_xent", result.state.params, variant.x_test, variant.y_test,
            mask=variant.mask_test,
        )  # fmt: skip
        checks = sum(r["grad_checks"] for r in result.history)
        worst = max((r["grad_check_max_rel_err"] or 0.0) for r in result.history)
        note = f", {checks} live checks (worst rel err {worst:.1e})" if checks else ""
        print(
            f"{name:14s} held-out accuracy {100 * ev['accuracy']:.2f}% "
            f"({round(ev['accuracy'] * ev['n'])}/{ev['n']}), test loss {ev['loss']:.4f} "
            f"({time.perf_counter() - start:.0f} s{note})"
        )


if __name__ == "__main__":
    main()
