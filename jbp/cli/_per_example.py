"""``jbp per-example``: find flipped labels by their per-example gradient norms."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax

import jbp

from ._args import activation_name, device, hidden_widths, int_at_least, json_safe, positive_float

_HELP = """\
Flip a share of the training labels of a data set (default: 10% of digits),
train an MLP on the noisy labels (adam, softmax_xent, jbp.backprop), and after
every epoch rank all training examples by their per-example gradient norm
‖g_i‖ (jbp.per_example_norms: one backward pass, no per-example gradient
formed). Reports how well the ranking finds the flipped labels (AUROC and
precision at k, beside the same ranking by per-example loss), the simple
gradient noise scale B_simple = tr(Σ)/‖G‖² of the training set per epoch, and
the top-k examples. --out DIR also writes a histogram of the norms of clean
and flipped examples and the AUROC and noise-scale curves (PNG, needs
matplotlib).

Exit status: 0, or 2 on bad arguments."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def add_per_example(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "per-example",
        help="find flipped labels by per-example gradient norms; gradient noise scale",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        default="digits",
        metavar="NAME|PATH",
        help=f"{', '.join(jbp.dataset_names())}, or a .npz/.csv file (default digits)",
    )
    p.add_argument(
        "--noise", type=_fraction, default=0.1, help="share of labels flipped (default 0.1)"
    )
    p.add_argument(
        "--hidden",
        type=hidden_widths,
        default=(64,),
        metavar="LIST",
        help="hidden widths (default 64)",
    )
    p.add_argument(
        "--activation",
        type=activation_name,
        default="relu",
        metavar="NAME",
        help="hidden activation (default relu)",
    )
    p.add_argument("--epochs", type=int_at_least(1), default=10, help="epochs (default 10)")
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=32, help="examples per step (default 32)"
    )
    p.add_argument("--lr", type=positive_float, default=1e-3, help="adam's rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seeds split, flips, init (default 0)")
    p.add_argument(
        "--top-k", type=int_at_least(1), default=10, metavar="K", help="examples listed (10)"
    )
    p.add_argument("--out", metavar="DIR", default=None, help="write the two plots to DIR")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results to PATH")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(run=_run_per_example, subparser=p)


def _run_per_example(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        data = jbp.load_dataset(args.data, seed=args.seed)
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"--data: {err}")
    if data.n_classes < 2:
        parser.error(f"--data: {data.name} has {data.n_classes} class; flipping needs 2 or more")
    sizes = "-".join(map(str, (data.n_features, *args.hidden, data.n_classes)))
    print(
        f"jbp per-example: {data.name}, {data.x_train.shape[0]} training examples, "
        f"{args.noise:.0%} of labels flipped; MLP {sizes} {args.activation}, adam "
        f"{args.lr:g}, batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}; "
        f"backend {device()}, jax {jax.__version__}"
    )

    def log(r: dict[str, Any]) -> None:
        if not args.quiet:
            print(
                f"epoch {r['epoch']:>3}  train loss {r['train_loss']:.4f}  test acc "
                f"{r['test_accuracy']:.4f}  AUROC by ‖g_i‖ {r['auroc_norm']:.4f} "
                f"(by loss {r['auroc_loss']:.4f})  B_simple {r['b_simple']:.4g}",
                flush=True,
            )

    study = jbp.label_noise_study(
        data,
        noise=args.noise,
        hidden=args.hidden,
        activation=args.activation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        top_ks=(args.top_k,),
        log=log,
    )
    n_flipped = int(study.flipped.sum())
    print(
        f"flipped labels found by ranking on ‖g_i‖: AUROC {study.auroc_norm:.4f} "
        f"(ranking on the loss ℓ_i: {study.auroc_loss:.4f}); "
        + ", ".join(f"precision at {k} {p:.3f}" for k, p in study.precision.items())
        + f" ({n_flipped} flipped); test accuracy {study.test_accuracy:.4f}; "
        f"{study.seconds:.1f} s"
    )
    print(f"top {args.top_k} by per-example gradient norm:")
    print("  rank  example       ‖g_i‖        ℓ_i  label  true  flipped")
    for rank, (i, norm, loss, flipped) in enumerate(study.top(args.top_k), 1):
        print(
            f"  {rank:>4}  {i:>7}  {norm:>10.4g}  {loss:>9.4g}  {study.labels[i]:>5}  "
            f"{data.y_train[i]:>4}  {'yes' if flipped else 'no'}"
        )
    if args.out is not None:
        for path in jbp.plot_label_noise(study, args.out):
            print(f"wrote {path}")
    if args.json is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        summary = {
            "command": "per-example",
            "data": data.name,
            "noise": args.noise,
            "n_flipped": n_flipped,
            "auroc_norm": study.auroc_norm,
            "auroc_loss": study.auroc_loss,
            "precision_at_k": {str(k): p for k, p in study.precision.items()},
            "test_accuracy": study.test_accuracy,
            "history": list(study.history),
            "top": [
                {"index": i, "norm": n, "loss": lo, "flipped": f}
                for i, n, lo, f in study.top(args.top_k)
            ],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
            f.write("\n")
    return 0
