"""A Laplace approximation of a digits classifier, from jbp's curvature.

Trains an MLP (64-64-10, tanh, ``softmax_xent``) to its MAP estimate with a
Gaussian prior of precision ``--map-prior`` (weight decay), then builds two
Laplace posteriors around it from the GGN of the summed training loss,
``N · G`` (jbp's quantities are for the mean loss, so times N):

- diagonal: precision ``N · diag_ggn + τ`` (``jbp.diag_ggn``, exact);
- K-FAC: per Dense layer ``N · a ⊗ g + τ I`` (``jbp.kfac(kind="kflr")``), sampled
  in the eigenbases of ``a`` and ``g``: precision eigenvalues ``N λ_a λ_g + τ``.

The prior precision τ of each posterior is chosen on a validation split (the
last 20% of the training set, not trained on) by the negative log-likelihood
of the Monte-Carlo predictive (the mean of the softmax over posterior
samples), and, separately, by the Laplace estimate of the evidence at θ*,
``log Z(τ) ≈ −L(θ*) − ½ τ ‖θ*‖² + (P/2) log τ − ½ log det(N·G + τ I)`` (L the
summed training NLL; the determinant from the diagonal, or from the K-FAC
eigenvalues ``N λ_a λ_g``), maximised over a fine log grid of τ; each
posterior is reported at both choices, at the evidence's τ also with the
linearised (GLM) predictive, the network expanded to first order around θ*
at each draw (the model the GGN is exact for). Reported on the test set: accuracy, NLL and the expected
calibration error (15 equal-width confidence bins) of the MAP model and both
Laplace predictives, with a reliability diagram in ``OUT/laplace_digits.png``.

    python experiments/laplace_digits.py [--epochs 150] [--samples 50] [--out experiments/out]
        [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jbp

HERE = os.path.dirname(os.path.abspath(__file__))
BINS = 15
TAUS = tuple(float(t) for t in np.logspace(-2, 5, 15))
EVIDENCE_TAUS = np.logspace(-2, 5, 141)


def train_map(net, x, y, *, epochs, prior, seed):
    """Adam on the mean loss plus ``prior/(2N)·‖θ‖²`` (the MAP of the summed loss
    under a N(0, 1/prior) prior), gradients from jbp.backprop."""
    n = x.shape[0]
    params = net.init(jax.random.key(seed))
    opt = optax.adam(3e-3)
    state = opt.init(params)
    grad_fn = jbp.backprop(net, "softmax_xent")

    @jax.jit
    def step(params, state, xb, yb):
        g = grad_fn(params, xb, yb)
        g = jax.tree_util.tree_map(lambda gi, p: gi + (prior / n) * p, g, params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(n)
        for i in range(0, n - 31, 32):
            idx = order[i : i + 32]
            params, state = step(params, state, x[idx], y[idx])
    return params


def metrics(probs, y):
    """Accuracy, mean NLL and ECE (15 equal-width confidence bins)."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = pred == y
    nll = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)))
    edges = np.linspace(0, 1, BINS + 1)
    ece, rows = 0.0, []
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            acc, mean_conf = correct[inside].mean(), conf[inside].mean()
            ece += inside.mean() * abs(acc - mean_conf)
            rows.append((mean_conf, acc, inside.sum()))
    return {"acc": correct.mean(), "nll": nll, "ece": ece, "bins": rows}


def diag_sampler(params, precision_data):
    """θ* + ε / √(N·diag + τ)."""

    def sample(key, tau):
        leaves, tree = jax.tree_util.tree_flatten(params)
        prec = jax.tree_util.tree_leaves(precision_data)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(
            tree,
            [
                p + jax.random.normal(k, p.shape, p.dtype) / jnp.sqrt(d + tau)
                for p, d, k in zip(leaves, prec, keys, strict=True)
            ],
        )

    return sample


def kfac_eigs(factors):
    """Per Dense layer, the clipped eigendecompositions ``(λ_a, U_a, λ_g, U_g)``."""
    eig = []
    for layer in factors:
        kf = layer["w"]
        la, ua = jnp.linalg.eigh(kf.a)
        lg, ug = jnp.linalg.eigh(kf.g)
        eig.append((jnp.clip(la, 0), ua, jnp.clip(lg, 0), ug))
    return eig


def kfac_sampler(params, eig, n):
    """Per Dense layer, [w; b] = θ* + U_a (ε / √(N λ_a λ_gᵀ + τ)) U_gᵀ."""

    def sample(key, tau):
        out = []
        for (la, ua, lg, ug), p, k in zip(
            eig, params, jax.random.split(key, len(params)), strict=True
        ):
            wb = jnp.concatenate([p["w"], p["b"][None]], axis=0)
            z = jax.random.normal(k, wb.shape, wb.dtype) / jnp.sqrt(
                n * la[:, None] * lg[None] + tau
            )
            wb = wb + ua @ z @ ug.T
            out.append({"w": wb[:-1], "b": wb[-1]})
        return tuple(out)

    return sample


def predictive(net, sample, x, tau, samples, key, params=None):
    """The MC predictive: the mean softmax over ``samples`` posterior draws (one jitted
    vmap over the draws). With ``params`` (θ*), the linearised (GLM) predictive: the
    network's first-order expansion ``f(θ*) + J (θ − θ*)`` at each draw (a jvp)."""
    keys = jax.random.split(key, samples)
    probs = _probs(net, sample, params)(keys, x, jnp.asarray(tau, x.dtype))
    return np.mean(np.asarray(probs), axis=0)


_COMPILED: dict = {}


def _probs(net, sample, params):
    cache = (id(sample), params is not None)
    if cache not in _COMPILED:

        def logits(k, x, tau):
            theta = sample(k, tau)
            if params is None:
                return net.apply(theta, x)
            delta = jax.tree_util.tree_map(jnp.subtract, theta, params)
            f0, df = jax.jvp(lambda p: net.apply(p, x), (params,), (delta,))
            return f0 + df

        def probs(keys, x, tau):
            return jax.vmap(lambda k: jax.nn.softmax(logits(k, x, tau), axis=-1))(keys)

        _COMPILED[cache] = jax.jit(probs)
    return _COMPILED[cache]


def choose_tau(net, sample, x_val, y_val, samples, key):
    scores = {
        tau: metrics(predictive(net, sample, x_val, tau, samples, key), y_val)["nll"]
        for tau in TAUS
    }
    return min(scores, key=scores.get), scores


def log_evidence(nll_sum, sq_norm, n_params, curv_eigs, tau):
    """The Laplace estimate of log p(D | τ) around θ* (the 2π terms cancel):
    −L(θ*) − ½ τ ‖θ*‖² + (P/2) log τ − ½ Σ log(N λ + τ), ``curv_eigs`` the eigenvalues
    N λ of the summed-loss GGN approximation (diagonal entries, or N λ_a λ_g)."""
    logdet = float(np.sum(np.log(curv_eigs + tau)))
    return -nll_sum - 0.5 * tau * sq_norm + 0.5 * n_params * np.log(tau) - 0.5 * logdet


def choose_tau_evidence(nll_sum, sq_norm, curv_eigs):
    """τ maximising the Laplace evidence on a fine log grid; τ and its log evidence."""
    scores = {
        float(tau): log_evidence(nll_sum, sq_norm, curv_eigs.size, curv_eigs, tau)
        for tau in EVIDENCE_TAUS
    }
    best = max(scores, key=scores.get)
    return best, scores[best]


def reliability_plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for name, m in results.items():
        conf, acc, _ = zip(*m["bins"], strict=True)
        ax.plot(conf, acc, marker="o", label=f"{name} (ECE {m['ece']:.3f})")
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("accuracy")
    ax.set_title("digits test set: reliability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument(
        "--samples", type=int, default=50, help="posterior samples for the test predictive"
    )
    parser.add_argument(
        "--map-prior", type=float, default=1e-2, help="prior precision of the MAP fit"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    parser.add_argument(
        "--quick", action="store_true", help="a few epochs and samples (smoke test)"
    )
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.samples = 3, 4
    t0 = time.perf_counter()
    data = jbp.load_dataset("digits")
    x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    n_val = x_all.shape[0] // 5
    x, y = x_all[:-n_val], y_all[:-n_val]
    x_val, y_val = x_all[-n_val:], y_all[-n_val:]
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    n = x.shape[0]
    net = jbp.mlp([data.n_features, 64, data.n_classes], "tanh")

    params = train_map(net, x, y, epochs=args.epochs, prior=args.map_prior, seed=args.seed)
    t_train = time.perf_counter() - t0
    diag = jax.jit(jbp.diag_ggn(net, "softmax_xent"))(params, x, y)
    diag = jax.tree_util.tree_map(lambda d: n * d, diag)
    factors = jax.jit(jbp.kfac(net, "softmax_xent", kind="kflr"))(params, x, y)
    eig = kfac_eigs(factors)
    samplers = {
        "diag-GGN Laplace": diag_sampler(params, diag),
        "K-FAC Laplace": kfac_sampler(params, eig, n),
    }
    # Eigenvalues of the summed-loss GGN approximations, for the evidence.
    curv_eigs = {
        "diag-GGN Laplace": np.concatenate(
            [np.asarray(d, np.float64).ravel() for d in jax.tree_util.tree_leaves(diag)]
        ),
        "K-FAC Laplace": np.concatenate(
            [
                n * np.outer(np.asarray(la, np.float64), np.asarray(lg, np.float64)).ravel()
                for la, _, lg, _ in eig
            ]
        ),
    }
    logp = jax.nn.log_softmax(net.apply(params, x), axis=-1)
    nll_sum = -float(jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1)))
    sq_norm = sum(
        float(np.sum(np.asarray(p, np.float64) ** 2)) for p in jax.tree_util.tree_leaves(params)
    )

    key = jax.random.key(args.seed + 1)
    results = {"MAP": metrics(jax.nn.softmax(net.apply(params, x_test), axis=-1), y_test)}
    chosen = {}
    for name, sample in samplers.items():
        tau, scores = choose_tau(net, sample, x_val, y_val, max(args.samples // 2, 2), key)
        chosen[name] = (tau, "validation NLL")
        curve = ", ".join(f"{t:.0e}: {v:.4f}" for t, v in scores.items())
        print(f"{name}: validation NLL by prior τ: {curve}")
        results[name] = metrics(predictive(net, sample, x_test, tau, args.samples, key), y_test)
    for name, sample in samplers.items():
        tau, evidence = choose_tau_evidence(nll_sum, sq_norm, curv_eigs[name])
        print(f"{name}: Laplace evidence maximal at τ = {tau:.3g} (log Z ≈ {evidence:.1f})")
        short = name.split()[0]
        for row, lin in ((f"{short}, evidence τ", None), (f"{short}, evidence τ, GLM", params)):
            chosen[row] = (tau, "evidence")
            probs = predictive(net, sample, x_test, tau, args.samples, key, params=lin)
            results[row] = metrics(probs, y_test)

    print(
        f"digits: {n} train, {n_val} validation, {x_test.shape[0]} test; MLP 64-64-10 tanh, "
        f"{args.epochs} epochs adam, MAP prior precision {args.map_prior:g}; "
        f"{args.samples} posterior samples"
    )
    print(f"{'model':<25} {'accuracy':>8} {'NLL':>8} {'ECE':>8}  prior τ (chosen by)")
    for name, m in results.items():
        tau = f"{chosen[name][0]:.3g} ({chosen[name][1]})" if name in chosen else "-"
        print(f"{name:<25} {100 * m['acc']:>7.2f}% {m['nll']:>8.4f} {m['ece']:>8.4f}  {tau}")
    os.makedirs(args.out, exist_ok=True)
    path = reliability_plot(results, os.path.join(args.out, "laplace_digits.png"))
    print(f"reliability diagram: {path}")
    print(f"time: {time.perf_counter() - t0:.1f} s (MAP training {t_train:.1f} s)")


if __name__ == "__main__":
    main()
