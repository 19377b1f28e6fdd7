"""An empirical privacy audit of jbp's DP-SGD in one training run (Steinke, Nasr &
Jagielski 2023), on the digits MLP: the audit's lower bound on ε must stay below the
accountant's ε, and should rise well above zero when the same run is not private.

``--canaries`` canaries (default 1000): random inputs, N(0, 1) in the digits' standardised
feature space, far from every digit, each with a random label. Each is put in the training
set independently with probability 1/2 (the 1,438 training digits are always in). The MLP of
``experiments/dp_digits.py`` (64-64-10 tanh) is trained on that set with its tuned DP-SGD
recipe (expected batch 256, 40 epochs, adam 1e-2, C = 0.3; σ calibrated by PLD for the
run's own N and q) at each ε of ``--epsilons``, and once without privacy (the same batch,
epochs and learning rate, shuffled, no clipping or noise), to show what the attack finds
when nothing hides the canaries.

The attack scores each canary by how much training lowered its loss (its loss under the
initial parameters minus under the final ones), and guesses "in" for the ``--guesses`` / 2
highest scores and "out" for as many lowest; ``audit_epsilon`` turns the number of right
guesses into an ε that the run is shown *not* to satisfy, at 95% confidence. The number of
guesses is fixed in advance (choosing it after seeing the scores would void the bound).
This is a black-box audit of the final model only, so its bound is far below the
accountant's ε even for a correct implementation; its use is to catch a broken one (an
implementation that forgot the noise or the clipping shows a large bound).

    python experiments/dp_audit.py [--canaries 1000] [--guesses 200] [--epsilons 1,3,8]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import jax
import numpy as np
import optax

import jbp

HERE = os.path.dirname(os.path.abspath(__file__))
DELTA = 1e-5
BATCH, EPOCHS, LR, MAX_NORM = 256, 40, 1e-2, 0.3


def with_canaries(
    data: jbp.Dataset, m: int, seed: int
) -> tuple[jbp.Dataset, np.ndarray, np.ndarray, np.ndarray]:
    """The digits with each of ``m`` random canaries added with probability 1/2; the
    canaries' inputs, labels and membership."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, data.x_train.shape[1])).astype(data.x_train.dtype)
    y = rng.integers(0, data.n_classes, m).astype(data.y_train.dtype)
    member = rng.random(m) < 0.5
    train = data._replace(
        x_train=np.concatenate([data.x_train, x[member]]),
        y_train=np.concatenate([data.y_train, y[member]]),
        name=f"digits + {int(member.sum())} of {m} canaries",
    )
    return train, x, y, member


def canary_loss(net: jbp.Sequential, params: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each canary's cross-entropy loss ``-log softmax(a)[y]``."""
    logits = net.apply(params, x)
    return -np.asarray(jax.nn.log_softmax(logits))[np.arange(len(y)), y]


def audit(
    net: jbp.Sequential, data: jbp.Dataset, x: np.ndarray, y: np.ndarray, member: np.ndarray,
    guesses: int, epsilon: float | None, seed: int,
) -> tuple[Any, int, float]:  # fmt: skip
    """Train with (``epsilon``) or without privacy; the number of right guesses and the
    audit's lower bound."""
    privacy = (
        None if epsilon is None else jbp.Privacy(epsilon=epsilon, delta=DELTA, max_norm=MAX_NORM)
    )
    opt = optax.adam(LR)
    start = jbp.init_state(net, opt, jax.random.key(seed))  # fit's own initial state
    result = jbp.fit(net, "softmax_xent", opt, data, epochs=EPOCHS, batch_size=BATCH, seed=seed,
                     privacy=privacy)  # fmt: skip
    score = canary_loss(net, start.params, x, y) - canary_loss(net, result.state.params, x, y)
    order = np.argsort(-score)
    k = guesses // 2
    right = int(member[order[:k]].sum() + (~member[order[-k:]]).sum())
    return result, right, jbp.audit_epsilon(len(member), 2 * k, right, DELTA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--guesses", type=int, default=200)
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    digits = jbp.load_dataset("digits")
    data, x, y, member = with_canaries(digits, args.canaries, args.seed)
    net = jbp.mlp([64, 64, 10], "tanh")
    print(f"jax {jax.__version__} on {jax.default_backend()}; {data.name}, "
          f"{len(data.y_train)} training examples; {args.guesses} guesses fixed in advance")  # fmt: skip
    rows = []
    for eps in [None, *(float(e) for e in args.epsilons.split(","))]:
        t = time.perf_counter()
        result, right, bound = audit(net, data, x, y, member, args.guesses, eps, args.seed)
        spent = None if result.privacy is None else result.privacy["epsilon"]
        acc = result.history[-1]["test_accuracy"]
        rows.append((eps, spent, right, bound, acc))
        print(f"ε target {eps}: accountant ε {spent}, {right}/{args.guesses} right, audit lower "
              f"bound ε ≥ {bound:.3f} (95%), test accuracy {100 * acc:.2f}% "
              f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    print()
    print(
        "| training | accountant's ε (δ = 1e-5) | right guesses | audit's lower bound on ε (95%) | test accuracy |"
    )
    print("|---|---|---|---|---|")
    for eps, spent, right, bound, acc in rows:
        what = "non-private" if eps is None else f"DP-SGD, ε = {eps:g}"
        shown = "∞" if spent is None else f"{spent:.3f}"
        print(f"| {what} | {shown} | {right}/{args.guesses} | {bound:.3f} | {100 * acc:.2f}% |")


if __name__ == "__main__":
    main()
