"""Data attribution on digits: finding flipped labels by TracIn and in-run data Shapley,
against random, final-loss and gradient-norm rankings, then retraining without the worst.

For every seed: flip 10% of the digits training labels (``jbp.flip_labels``); split the
test split into a clean validation half (for in-run Shapley) and a test half; train an
MLP 64-64-10 (tanh, plain SGD 0.05, batch 32, 20 epochs) with ``jbp.fit(...,
keep_every=<one epoch>, shapley=jbp.InRunShapley(x_val, y_val, 0.05))``, which keeps the
params at every epoch end and accumulates every training example's first-order in-run
value against the validation half. Then every training example gets five scores of
"looks mislabelled" (higher = more suspicious):

- ``random``: a uniform random number;
- ``loss``: its final loss ℓ_i;
- ``grad norm``: its final ‖g_i‖ (``jbp.per_example_norms``);
- ``TracIn self-influence``: Σ_k η_k ‖g_i(w_k)‖² over the 20 kept params (``jbp.TracIn``);
- ``in-run Shapley``: minus its in-run value (a negative value: its steps raised the
  validation loss).

Reported per score: AUROC for the flipped set and the share of the flipped examples found
in the top 5/10/20% of the ranking; then the 10% most suspicious examples by each score
are removed and the network retrained from scratch (same recipe, same seed), with the test
accuracy change against training on all the noisy data (and, for reference, removing
exactly the flipped ones). Mean ± sd over the seeds in ``OUT/attribution_digits.md`` and
``.json``; ``OUT/attribution_digits.png`` (recall curves and the accuracy changes) and
``OUT/attribution_digits_examples.png`` (misclassified test digits with their strongest
TracIn proponents and opponents).

    python experiments/attribution_digits.py [--seeds 3] [--epochs 20] [--out experiments/out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import jax
import numpy as np
import optax

import jbp

HERE = os.path.dirname(os.path.abspath(__file__))
NOISE, LR, BATCH = 0.1, 0.05, 32
SCORES = ("random", "loss", "grad norm", "TracIn self-influence", "in-run Shapley")
TOPS = (0.05, 0.1, 0.2)


def network() -> jbp.Sequential:
    return jbp.mlp([64, 64, 10], "tanh")


def train(data: jbp.Dataset, seed: int, epochs: int, **kwargs: Any) -> jbp.FitResult:
    return jbp.fit(
        network(), "softmax_xent", optax.sgd(LR), data, epochs=epochs, batch_size=BATCH,
        seed=seed, **kwargs,
    )  # fmt: skip


def accuracy(params: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(jbp.evaluate(network(), "softmax_xent", params, x, y)["accuracy"])


def one_seed(seed: int, epochs: int, out: str, examples: bool) -> dict[str, Any]:
    full = jbp.load_dataset("digits", seed=seed)
    noisy, flipped = jbp.flip_labels(full.y_train, NOISE, 10, seed=seed)
    half = full.x_test.shape[0] // 2
    x_val, y_val = full.x_test[:half], full.y_test[:half]
    x_te, y_te = full.x_test[half:], full.y_test[half:]
    data = full._replace(y_train=noisy, x_test=x_te, y_test=y_te)
    per_epoch = -(-len(noisy) // BATCH)
    run_dir = os.path.join(out, "attribution_runs", f"seed{seed}")
    if os.path.exists(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    shapley = jbp.InRunShapley(x_val, y_val, LR)
    t0 = time.perf_counter()
    result = train(data, seed, epochs, run_dir=run_dir, keep_every=per_epoch, shapley=shapley)
    train_s = time.perf_counter() - t0
    net, params = network(), result.state.params
    x = np.asarray(full.x_train, np.float32)
    t0 = time.perf_counter()
    tracin = jbp.TracIn.from_run(run_dir, net, "softmax_xent", LR)
    self_influence = tracin.self_influence(x, noisy)
    tracin_s = time.perf_counter() - t0
    norms = np.asarray(jax.jit(jbp.per_example_norms(net, "softmax_xent"))(params, x, noisy))
    out_, _ = net.forward(params, x)
    logp = np.asarray(jax.nn.log_softmax(out_, axis=-1))
    losses = -logp[np.arange(len(noisy)), noisy]
    scores = {
        "random": np.random.default_rng(seed).random(len(noisy)),
        "loss": losses,
        "grad norm": norms,
        "TracIn self-influence": self_influence,
        "in-run Shapley": -result.shapley,
    }
    n = len(noisy)
    found = {}
    for name, s in scores.items():
        order = np.argsort(-s, kind="stable")
        found[name] = {
            "auroc": jbp.auroc(s, flipped),
            **{f"top{round(100 * f)}": float(flipped[order[: round(f * n)]].sum() / flipped.sum())
               for f in TOPS},
            "recall_curve": (np.cumsum(flipped[order]) / flipped.sum()).tolist(),
        }  # fmt: skip
    base = accuracy(params, x_te, y_te)
    removed = {}
    k = round(NOISE * n)
    drops = {name: np.argsort(-s, kind="stable")[:k] for name, s in scores.items()}
    drops["the flipped ones (oracle)"] = np.flatnonzero(flipped)
    for name, drop in drops.items():
        keep = np.setdiff1d(np.arange(n), drop)
        sub = data._replace(x_train=data.x_train[keep], y_train=noisy[keep])
        acc = accuracy(train(sub, seed, epochs).state.params, x_te, y_te)
        removed[name] = {"test_accuracy": acc, "change": acc - base,
                         "flipped_removed": float(flipped[drop].mean())}  # fmt: skip
    if examples:
        plot_examples(tracin, full, noisy, flipped, params, x_te, y_te, out, seed, half)
    return {
        "seed": seed, "flipped": int(flipped.sum()), "n_train": n,
        "test_accuracy": base, "found": found, "removed": removed,
        "train_seconds": train_s, "tracin_seconds": tracin_s, "checkpoints": len(tracin.params),
    }  # fmt: skip


def plot_examples(tracin, full, noisy, flipped, params, x_te, y_te, out, seed, half) -> None:
    from matplotlib.figure import Figure

    net = network()
    out_, _ = net.forward(params, np.asarray(x_te, np.float32))
    pred = np.asarray(np.argmax(out_, axis=-1))
    wrong = np.flatnonzero(pred != y_te)[:4]
    x = np.asarray(full.x_train, np.float32)
    raw = jbp.load_dataset("digits", seed=seed, standardize=False)  # the same split, pixels 0-16
    props = tracin.proponents(np.asarray(x_te[wrong], np.float32), y_te[wrong], x, noisy, k=3)
    fig = Figure(figsize=(8.4, 1.6 * len(wrong) + 0.4), layout="constrained")
    axes = fig.subplots(len(wrong), 7, squeeze=False)
    for r, t in enumerate(wrong):
        cells = [(raw.x_test[half + t], f"test: {y_te[t]}\npredicted {pred[t]}", "black")]
        for kind, idx in (("+", props.proponents[r]), ("−", props.opponents[r])):
            for i in idx:
                note = f" (was {full.y_train[i]})" if flipped[i] else ""
                colour = "tab:red" if flipped[i] else ("tab:green" if kind == "+" else "tab:blue")
                cells.append((raw.x_train[i], f"{kind} label {noisy[i]}{note}", colour))
        for c, (img, title, colour) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(np.asarray(img).reshape(8, 8), cmap="gray_r")
            ax.set_title(title, fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        "misclassified test digits (left), their 3 strongest TracIn proponents (+) and "
        "opponents (−); red: a flipped training label", fontsize=8,
    )  # fmt: skip
    fig.savefig(os.path.join(out, "attribution_digits_examples.png"), dpi=110)


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def plot(runs: list[dict[str, Any]], out: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    n = runs[0]["n_train"]
    for name in SCORES:
        curve = np.mean([r["found"][name]["recall_curve"] for r in runs], axis=0)
        auc = statistics.mean(r["found"][name]["auroc"] for r in runs)
        left.plot(100 * np.arange(1, n + 1) / n, 100 * curve, label=f"{name} (AUROC {auc:.3f})")
    left.axvline(100 * NOISE, color="grey", ls=":", lw=1)
    left.set_xlim(0, 40)
    left.set_xlabel("% of training examples inspected, most suspicious first")
    left.set_ylabel("% of flipped labels found")
    left.legend(fontsize=8)
    names = list(runs[0]["removed"])
    means = [100 * statistics.mean(r["removed"][k]["change"] for r in runs) for k in names]
    sds = [100 * (statistics.stdev([r["removed"][k]["change"] for r in runs]) if len(runs) > 1
                  else 0) for k in names]  # fmt: skip
    right.barh(names, means, xerr=sds, color="tab:blue")
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel("test accuracy change (points), 10% removed, retrained")
    right.invert_yaxis()
    fig.suptitle(f"digits, {NOISE:.0%} labels flipped, MLP 64-64-10, SGD {LR}; "
                 f"mean over {len(runs)} seeds", fontsize=9)  # fmt: skip
    fig.savefig(os.path.join(out, "attribution_digits.png"), dpi=110)


def table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"digits (1,438 training images), {NOISE:.0%} of training labels flipped "
        f"({runs[0]['flipped']}), MLP 64-64-10 tanh, SGD {LR}, batch {BATCH}, "
        f"{args.epochs} epochs; validation = half of the test split (clean), test = the other "
        f"half; {len(runs)} seeds, mean ± sd. jax {jax.__version__}, {platform.machine()}, "
        f"{jax.default_backend()}.",
        "",
        "| ranking (most suspicious first) | AUROC | found in top 5% | top 10% | top 20% |",
        "|---|---|---|---|---|",
    ]
    for name in SCORES:
        f = [r["found"][name] for r in runs]
        lines.append(
            f"| {name} | {spread([x['auroc'] for x in f])} | "
            + " | ".join(spread([x[f"top{round(100 * t)}"] for x in f]) for t in TOPS)
            + " |"
        )
    lines += [
        "",
        f"Test accuracy trained on all the noisy labels: "
        f"{spread([r['test_accuracy'] for r in runs])}. Removing 10% of the training set "
        "and retraining (same recipe and seed):",
        "",
        "| removed | share of them flipped | test accuracy | change (points) |",
        "|---|---|---|---|",
    ]
    for name in runs[0]["removed"]:
        rem = [r["removed"][name] for r in runs]
        lines.append(
            f"| {name} | {spread([x['flipped_removed'] for x in rem])} | "
            f"{spread([x['test_accuracy'] for x in rem])} | "
            f"{spread([100 * x['change'] for x in rem])} |"
        )
    secs = statistics.mean(r["train_seconds"] for r in runs)
    tr = statistics.mean(r["tracin_seconds"] for r in runs)
    lines += ["", f"Training with in-run values: {secs:.1f} s per run; TracIn self-influence "
              f"over {runs[0]['checkpoints']} checkpoints: {tr:.1f} s."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for seed in range(args.seeds):
        runs.append(one_seed(seed, args.epochs, args.out, examples=seed == 0))
        f = runs[-1]["found"]
        print(f"seed {seed}: " + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in f.items()),
              flush=True)  # fmt: skip
    text = table(runs, args)
    print(text)
    with open(os.path.join(args.out, "attribution_digits.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "attribution_digits.json"), "w", encoding="utf-8") as f:
        json.dump(runs, f)
    plot(runs, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
