"""The five seed derivations, side by side with jbp.backprop, jax.grad and finite differences.

For every seed in ``shared/seeds/`` this script writes the seed's formulas in
its own notation and layout (plain numpy: column vectors and ``W`` of shape
``(out, in)`` for 000 and 001, scalar neurons and gradient *ascent* for 002,
row vectors for 003, the bias as ``w_0`` on a constant input and a
log-likelihood for 004), translates jbp's gradients into that notation (the
transposes and signs listed in ``docs/seeds.md``), and prints one table per
seed: a few named entries with the seed's formula, ``jbp.backprop``,
``jax.grad(jbp.objective)`` and float64 central differences of the seed's own
cost, then the worst relative error over all entries. Then it trains the
seed networks three ways (the seed's rule in numpy, jbp.backprop, jax.grad):

- 2-2-1 sigmoid on XOR with seed 004's rule, w ← w + α ∂C/∂w on the
  log-likelihood C by its closed form (15), for a fixed number of steps;
- seed 001's 4-2-2-1 network, w ← w − ε ∂C/∂w until its termination
  condition (made concrete here as C ≤ 0.01) holds;

and writes ``OUT/seeds_xor.png`` and ``OUT/seeds_001.png``, the loss curves of
the three overlaid. Float64 throughout; about 10 s on a 2-core CPU.

    python experiments/seeds.py [--out experiments/out] [--xor-steps 5000]
"""

# ruff: noqa: E741  (``l`` is the seeds' own name for a layer index)

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import numpy as np  # noqa: E402

import jbp  # noqa: E402


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


F = {
    "sigmoid": (sigmoid, lambda z: sigmoid(z) * (1.0 - sigmoid(z))),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
}


def rng(*salt: int) -> np.random.Generator:
    return np.random.default_rng(salt)


# --- one table per seed -------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One seed at one point: its params and cost in its own notation, and three gradients
    of that cost (the seed's formula, jbp.backprop and jax.grad translated back)."""

    title: str
    mapping: str
    params: dict[str, np.ndarray]
    cost: Callable[[dict[str, np.ndarray]], float]
    seed: dict[str, np.ndarray]
    manual: dict[str, np.ndarray]
    autodiff: dict[str, np.ndarray]
    rows: list[tuple[str, str, tuple[int, ...]]]
    notes: list[str] = dataclasses.field(default_factory=list)


def jbp_gradients(net: Any, loss: Any, params: Any, x: Any, y: Any) -> tuple[Any, Any]:
    """``jbp.backprop`` and ``jax.grad(jbp.objective)``, both jitted."""
    manual = jax.jit(jbp.backprop(net, loss))
    autodiff = jax.jit(jax.grad(jbp.objective(net, loss)))
    x, y = jnp.asarray(x), jnp.asarray(y)
    return manual(params, x, y), autodiff(params, x, y)


def finite_differences(cost: Callable, params: dict[str, np.ndarray], h: float = 1e-6) -> dict:
    """Central differences of the seed's own cost, entry by entry, in float64."""
    out = {}
    for key, value in params.items():
        g = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[key][idx] += h
            minus[key][idx] -= h
            g[idx] = (cost(plus) - cost(minus)) / (2 * h)
        out[key] = g
    return out


def rel_err(a: dict, b: dict) -> float:
    scale = max(float(np.max(np.abs(v))) for v in b.values())
    return max(float(np.max(np.abs(np.asarray(a[k]) - b[k]))) for k in b) / scale


def print_case(case: Case) -> dict[str, float]:
    fd = finite_differences(case.cost, case.params)
    print(f"\n== {case.title}")
    print(f"   {case.mapping}")
    header = f"   {'entry':<26}{'seed formula':>20}{'jbp.backprop':>20}{'jax.grad':>20}"
    print(header + f"{'finite diff.':>20}")
    for label, key, idx in case.rows:
        vals = [case.seed[key][idx], case.manual[key][idx], case.autodiff[key][idx], fd[key][idx]]
        print(f"   {label:<26}" + "".join(f"{float(v):>20.12e}" for v in vals))
    n = sum(v.size for v in case.params.values())
    errs = {
        "jbp.backprop": rel_err(case.manual, case.seed),
        "jax.grad": rel_err(case.autodiff, case.seed),
        "finite diff.": rel_err(fd, case.seed),
    }
    print(
        f"   worst |x − seed| / max|seed| over all {n} entries: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    )
    for note in case.notes:
        print(f"   {note}")
    return errs


# --- seed 000 (Schuermann): columns, y_n = f(x_n), x_{n+1} = w_n y_n, no biases -------------


def case_000() -> Case:
    sizes, act = (3, 4, 4, 2), "tanh"
    f, fp = F[act]
    r = rng(0, 0)
    params = {f"w_{n}": r.normal(size=(sizes[n], sizes[n - 1])) for n in range(1, len(sizes))}
    x1, t = r.normal(size=(sizes[0], 1)), r.uniform(-0.8, 0.8, size=(sizes[-1], 1))
    big_n = len(sizes)

    def forward(p):
        x, y = {1: x1}, {}
        for n in range(1, big_n + 1):
            y[n] = f(x[n])  # y_n = f(x_n), from the input on
            if n < big_n:
                x[n + 1] = p[f"w_{n}"] @ y[n]  # x_{n+1} = w_n y_n
        return x, y

    def cost(p):  # c = ½ (y_N − t)²
        r_ = forward(p)[1][big_n] - t
        return 0.5 * float((r_.T @ r_).item())

    x, y = forward(params)
    delta = {big_n: (y[big_n] - t) * fp(x[big_n])}  # δ_N = (y_N − t) f'(x_N)
    for n in range(big_n - 1, 0, -1):
        delta[n] = fp(x[n]) * (params[f"w_{n}"].T @ delta[n + 1])  # δ_n = f'(x_n) w_nᵀ δ_{n+1}
    seed = {f"w_{n}": delta[n + 1] @ y[n].T for n in range(1, big_n)}  # ∂c/∂w_n = δ_{n+1} y_nᵀ

    dense = [jbp.Dense(sizes[i], sizes[i + 1], act, bias=False) for i in range(len(sizes) - 1)]
    net = jbp.Sequential([jbp.Activation(act), *dense])
    p_jbp = ({}, *({"w": jnp.asarray(params[f"w_{n}"].T)} for n in range(1, big_n)))
    gm, ga = jbp_gradients(net, "half_sse", p_jbp, x1[:, 0], t[:, 0])

    def back(g):  # jbp's params[n]["w"] is w_nᵀ
        return {f"w_{n}": np.asarray(g[n]["w"]).T for n in range(1, big_n)}

    return Case(
        "seed 000 (Schuermann): 3-4-4-2, f = tanh on every layer including the input, "
        "no biases, one example",
        "w_n = params[n]['w']ᵀ (params[0] is the Activation on x_1); "
        "the δ of layer params[n] is δ_{n+1}",
        params,
        cost,
        seed,
        back(gm),
        back(ga),
        [
            ("∂c/∂w_1[1,1]", "w_1", (0, 0)),
            ("∂c/∂w_1[2,3]", "w_1", (1, 2)),
            ("∂c/∂w_2[4,1]", "w_2", (3, 0)),
            ("∂c/∂w_3[2,4]", "w_3", (1, 3)),
        ],
    )


# --- seed 001: 4-2-2-1, W^l of shape (out, in), columns, biases -----------------------------

S001_N = {1: 4, 2: 2, 3: 2, 4: 1}
S001_X = np.array(list(itertools.product([0.0, 1.0], repeat=4))).T  # (4, 16), one per column
S001_Y = ((S001_X[0] * S001_X[1] + S001_X[2] * S001_X[3]) > 0).astype(float)[None, :]
S001_NET = jbp.mlp([4, 2, 2, 1], "sigmoid", final_activation="sigmoid")
S001_EPSILON, S001_C_TOL, S001_MAX_ITERS = 1.0, 0.01, 20_000


def s001_forward(p: dict, x: np.ndarray) -> tuple[dict, dict]:
    f = F["sigmoid"][0]
    a, z = {1: x}, {}
    for l in (1, 2, 3):
        z[l + 1] = p[f"W{l}"] @ a[l] + p[f"b{l}"]  # z^{l+1} = W^l a^l + b^l
        a[l + 1] = f(z[l + 1])
    return z, a


def s001_cost(p: dict) -> float:  # C = Σ_p ½ (s_p − y_p)² over the training set
    r = s001_forward(p, S001_X)[1][4] - S001_Y
    return float(0.5 * np.sum(r * r))


def s001_matrix_grads(p: dict) -> dict:
    fp = F["sigmoid"][1]
    z, a = s001_forward(p, S001_X)
    delta = {4: (a[4] - S001_Y) * fp(z[4])}
    for l in (3, 2):
        delta[l] = (p[f"W{l}"].T @ delta[l + 1]) * fp(z[l])
    grads = {}
    for l in (1, 2, 3):
        grads[f"W{l}"] = delta[l + 1] @ a[l].T
        grads[f"b{l}"] = delta[l + 1].sum(axis=1, keepdims=True)
    return grads


def s001_init() -> dict:
    r = rng(1, 1000)
    p = {f"W{l}": r.normal(size=(S001_N[l + 1], S001_N[l])) for l in (1, 2, 3)}
    p.update({f"b{l}": r.normal(size=(S001_N[l + 1], 1)) for l in (1, 2, 3)})
    return p


def s001_to_jbp(p: dict) -> tuple:
    return tuple(
        {"w": jnp.asarray(p[f"W{l}"].T), "b": jnp.asarray(p[f"b{l}"][:, 0])} for l in (1, 2, 3)
    )


def s001_from_jbp(g: Any) -> dict:
    out = {}
    for l in (1, 2, 3):
        out[f"W{l}"] = np.asarray(g[l - 1]["w"]).T
        out[f"b{l}"] = np.asarray(g[l - 1]["b"])[:, None]
    return out


def case_001() -> Case:
    fp = F["sigmoid"][1]
    params = s001_init()
    seed = {k: np.zeros_like(v) for k, v in params.items()}
    worked = 0.0
    for col in range(S001_X.shape[1]):  # neuron by neuron, one example at a time, 1-based
        z, a = s001_forward(params, S001_X[:, [col]])
        s, y = a[4][0, 0], S001_Y[0, col]
        local = {4: {1: (s - y) * fp(z[4][0, 0])}}  # (δ_1)⁴ = ∂C/∂s · f'(z⁴)
        for l in (3, 2):
            local[l] = {
                j: sum(
                    local[l + 1][i] * params[f"W{l}"][i - 1, j - 1]
                    for i in range(1, S001_N[l + 1] + 1)
                )
                * fp(z[l][j - 1, 0])
                for j in range(1, S001_N[l] + 1)
            }
        for l in (1, 2, 3):
            for j in range(1, S001_N[l + 1] + 1):
                seed[f"b{l}"][j - 1, 0] += local[l + 1][j]  # ∂C/∂(b_j)^l = (δ_j)^{l+1}
                for k in range(1, S001_N[l] + 1):  # ∂C/∂(w_jk)^l = (δ_j)^{l+1} (a_k)^l
                    seed[f"W{l}"][j - 1, k - 1] += local[l + 1][j] * a[l][k - 1, 0]
        # the worked example: ∂C/∂(w_22)² = ∂C/∂(a_2)³ · ∂(a_2)³/∂(z_2)³ · ∂(z_2)³/∂(w_22)²
        dC_da2_3 = (s - y) * fp(z[4][0, 0]) * params["W3"][0, 1]
        worked += dC_da2_3 * fp(z[3][1, 0]) * a[2][1, 0]
    gm, ga = jbp_gradients(S001_NET, "half_sse", s001_to_jbp(params), S001_X.T, S001_Y.T)
    return Case(
        "seed 001: 4-2-2-1 sigmoid with biases, C = Σ_p ½(s_p − y_p)² on the 16 training "
        "patterns, at the training run's initial weights",
        "(w_jk)^l = params[l-1]['w'][k-1, j-1] (jbp's w is (W^l)ᵀ); (b_j)^l = "
        "params[l-1]['b'][j-1]",
        params,
        s001_cost,
        seed,
        s001_from_jbp(gm),
        s001_from_jbp(ga),
        [
            ("∂C/∂(w_22)²", "W2", (1, 1)),
            ("∂C/∂(w_12)²", "W2", (0, 1)),
            ("∂C/∂(w_21)²", "W2", (1, 0)),
            ("∂C/∂(w_13)¹", "W1", (0, 2)),
            ("∂C/∂(w_12)³", "W3", (0, 1)),
            ("∂C/∂(b_2)²", "b2", (1, 0)),
        ],
        [
            f"worked example through (z_2)³ and (a_2)³: ∂C/∂(w_22)² = {worked:.12e} "
            f"(table: {seed['W2'][1, 1]:.12e})"
        ],
    )


# --- seed 002 (MIT OCW): sigmoid neurons, no biases, P = −½(d − o)², gradient ascent --------


def case_002_chain() -> Case:
    r = rng(2, 0)
    i_l, d = float(r.normal()), float(r.uniform())
    params = {"w_l": np.array([r.normal()]), "w_r": np.array([r.normal()])}

    def outputs(p):
        o_l = sigmoid(p["w_l"][0] * i_l)  # o_l = σ(p_l), p_l = w_l i_l
        return o_l, sigmoid(p["w_r"][0] * o_l)  # i_r = o_l, p_r = w_r i_r

    def perf(p):  # P = −½(d − o_r)²
        return float(-0.5 * (d - outputs(p)[1]) ** 2)

    o_l, o_r = outputs(params)
    w_r, i_r = params["w_r"][0], o_l
    seed = {
        "w_r": np.array([(d - o_r) * o_r * (1 - o_r) * i_r]),
        "w_l": np.array([(d - o_r) * o_r * (1 - o_r) * w_r * o_l * (1 - o_l) * i_l]),
    }
    net = jbp.Sequential([jbp.Dense(1, 1, "sigmoid", bias=False)] * 2)
    p_jbp = ({"w": jnp.asarray(params["w_l"])[None, :]}, {"w": jnp.asarray(params["w_r"])[None, :]})
    gm, ga = jbp_gradients(net, "half_sse", p_jbp, [i_l], [d])

    def back(g):  # ∂P/∂w = −∂C/∂w with C = ½(d − o)²
        return {"w_l": -np.asarray(g[0]["w"])[0], "w_r": -np.asarray(g[1]["w"])[0]}

    return Case(
        "seed 002 (MIT OCW): the two-neuron chain i_l → σ → σ → o_r, P = −½(d − o_r)²",
        "w_l = params[0]['w'][0,0], w_r = params[1]['w'][0,0]; jbp minimises C = ½(d − o)² = −P, "
        "so ∂P/∂w is shown as −(jbp's gradient)",
        params,
        perf,
        seed,
        back(gm),
        back(ga),
        [("∂P/∂w_r", "w_r", (0,)), ("∂P/∂w_l", "w_l", (0,))],
    )


S002_SIZES = (3, 4, 3, 2)
S002_NET = jbp.mlp(list(S002_SIZES), "sigmoid", final_activation="sigmoid", bias=False)


def s002_outputs(w: list, i: np.ndarray) -> tuple[list, np.ndarray]:
    inputs = []
    for wm in w:
        inputs.append(i)
        i = sigmoid(i @ wm)
    return inputs, i


def s002_dP(w: list, X: np.ndarray, D: np.ndarray) -> list:
    """Δw = α i δ: δ_{f_k} = o(1 − o)(d_k − o), δ_{l_i} = o(1 − o) Σ_j w_{l_i→r_j} δ_{r_j};
    ∂P/∂w_{i→j} = i_i δ_j, P summed over the samples (rows of X)."""
    dP = [np.zeros_like(wm) for wm in w]
    for x, d in zip(X, D, strict=True):
        inputs, o = s002_outputs(w, x)
        outs = [*inputs[1:], o]
        delta = o * (1 - o) * (d - o)
        for m in range(len(w) - 1, -1, -1):
            dP[m] += np.outer(inputs[m], delta)
            if m:
                delta = (
                    outs[m - 1]
                    * (1 - outs[m - 1])
                    * np.array(
                        [
                            sum(w[m][i, j] * delta[j] for j in range(w[m].shape[1]))
                            for i in range(w[m].shape[0])
                        ]
                    )
                )
    return dP


def case_002_multi() -> tuple[Case, float]:
    r = rng(2, 1)
    w = [r.normal(size=(S002_SIZES[m], S002_SIZES[m + 1])) for m in range(3)]
    X, D = r.normal(size=(4, 3)), r.uniform(size=(4, 2))
    params = {f"w{m + 1}": w[m] for m in range(3)}

    def perf(p):
        o = s002_outputs([p[f"w{m + 1}"] for m in range(3)], X)[1]
        return float(-0.5 * np.sum((D - o) ** 2))

    dP = s002_dP(w, X, D)
    seed = {f"w{m + 1}": dP[m] for m in range(3)}
    p_jbp = tuple({"w": jnp.asarray(wm)} for wm in w)
    gm, ga = jbp_gradients(S002_NET, "half_sse", p_jbp, X, D)

    def back(g):
        return {f"w{m + 1}": -np.asarray(g[m]["w"]) for m in range(3)}

    # ascent on P (seed) against descent on ½(d − o)² (jbp), ten steps
    alpha, step = 0.5, jax.jit(jbp.backprop(S002_NET, "half_sse"))
    w_asc, p_desc, worst = list(w), p_jbp, 0.0
    for _ in range(10):
        w_asc = [wm + alpha * g for wm, g in zip(w_asc, s002_dP(w_asc, X, D), strict=True)]
        p_desc = jtu.tree_map(lambda p, g: p - alpha * g, p_desc, step(p_desc, X, D))
        worst = max(
            worst,
            max(
                float(np.max(np.abs(np.asarray(p["w"]) - wm)))
                for p, wm in zip(p_desc, w_asc, strict=True)
            ),
        )
    case = Case(
        "seed 002: more neurons per layer, 3-4-3-2 sigmoid, no biases, 4 samples",
        "w_{l_i→r_j} = params[m]['w'][i, j] (no transpose); shown as ∂P/∂w = −(jbp's gradient)",
        params,
        perf,
        seed,
        back(gm),
        back(ga),
        [
            ("∂P/∂w_{l_1→r_1} (layer 1)", "w1", (0, 0)),
            ("∂P/∂w_{l_3→r_2} (layer 1)", "w1", (2, 1)),
            ("∂P/∂w_{l_4→r_3} (layer 2)", "w2", (3, 2)),
            ("∂P/∂w_{l_2→f_1} (final)", "w3", (1, 0)),
        ],
        [
            f"ascent w' = w + α∂P/∂w (seed) vs descent w' = w − α∂C/∂w (jbp), 10 steps, α = "
            f"{alpha}: max |Δw| = {worst:.1e}"
        ],
    )
    return case, worst


# --- seed 003: row vectors, z_i = a_{i-1} w_{i-1} + b_{i-1}, C = ½(y − a_l)² ---------------


def case_003() -> Case:
    sizes, act = (3, 5, 4, 2), "sigmoid"
    sigma, sigma_p = F[act]
    r = rng(3, 0)
    l = len(sizes)
    params = {f"w{i}": r.normal(size=(sizes[i - 1], sizes[i])) for i in range(1, l)}
    params.update({f"b{i}": r.normal(size=(1, sizes[i])) for i in range(1, l)})
    X, Y = r.normal(size=(3, sizes[0])), r.uniform(size=(3, sizes[-1]))

    def forward(p, x):
        a, z = {1: x}, {}  # (1) a_1 = x
        for i in range(2, l + 1):
            z[i] = a[i - 1] @ p[f"w{i - 1}"] + p[f"b{i - 1}"]  # (2)
            a[i] = sigma(z[i])  # (3)
        return a, z

    def cost(p):  # (5) C = ½ (y − a_l)², summed over the rows
        return sum(
            0.5 * float(np.sum((y - forward(p, x)[0][l]) ** 2))
            for x, y in zip(X[:, None, :], Y[:, None, :], strict=True)
        )

    seed = {k: np.zeros_like(v) for k, v in params.items()}
    for x, y in zip(X[:, None, :], Y[:, None, :], strict=True):  # one row (1, n) at a time
        a, z = forward(params, x)
        delta = {l: (a[l] - y) * sigma_p(z[l])}  # (11)
        for i in range(l - 1, 1, -1):
            delta[i] = (delta[i + 1] @ params[f"w{i}"].T) * sigma_p(z[i])  # (12)
        for i in range(1, l):
            seed[f"w{i}"] += a[i].T @ delta[i + 1]  # (13)
            seed[f"b{i}"] += delta[i + 1]  # (14)
    net = jbp.mlp(list(sizes), act, final_activation=act)
    p_jbp = tuple(
        {"w": jnp.asarray(params[f"w{i}"]), "b": jnp.asarray(params[f"b{i}"][0])}
        for i in range(1, l)
    )
    gm, ga = jbp_gradients(net, "half_sse", p_jbp, X, Y)

    def back(g):
        out = {f"w{i}": np.asarray(g[i - 1]["w"]) for i in range(1, l)}
        out.update({f"b{i}": np.asarray(g[i - 1]["b"])[None, :] for i in range(1, l)})
        return out

    return Case(
        "seed 003: 3-5-4-2 sigmoid, row vectors, 3 examples (rows), equations (11)-(14)",
        "w_i = params[i-1]['w'] and b_i = params[i-1]['b'] (jbp's own layout, no transpose); "
        "the δ of layer params[i-1] is the seed's δ_{i+1}",
        params,
        cost,
        seed,
        back(gm),
        back(ga),
        [
            ("∂C/∂w_1[1,1]", "w1", (0, 0)),
            ("∂C/∂w_2[5,4]", "w2", (4, 3)),
            ("∂C/∂w_3[4,2]", "w3", (3, 1)),
            ("∂C/∂b_1[3]", "b1", (0, 2)),
            ("∂C/∂b_3[1]", "b3", (0, 0)),
        ],
    )


# --- seed 004: bias as w_0 on a constant input, log-likelihood, 2-2-1 on XOR ----------------

XOR_X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_Y = np.array([[0.0], [1.0], [1.0], [0.0]])
XOR_NET = jbp.mlp([2, 2, 1], "sigmoid")  # last layer identity: z^L are sigmoid_bce's logits


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class PrependOne(jbp.Layer):
    """Seed 004's constant input a_0 = 1, ``out = [1, a]``: a user layer with its δ rule."""

    fan_in: int

    @property
    def fan_out(self) -> int:
        return self.fan_in + 1

    def init(self, key, dtype=jnp.float32):
        return {}

    def forward(self, params, a):
        return jnp.concatenate([jnp.ones((a.shape[0], 1), a.dtype), a], axis=1), None

    def backward(self, params, cache, delta_out):
        return {}, delta_out[:, 1:]


XOR_NET_W0 = jbp.Sequential(
    [
        PrependOne(2),
        jbp.Dense(3, 2, "sigmoid", bias=False),
        PrependOne(2),
        jbp.Dense(3, 1, bias=False),
    ]
)


def s004_forward(W: list, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1): z^{p,l+1} = w^l_{0·} + Σ_{n_l ≥ 1} w^l_{n_l ·} a^{p,l}, sigmoid units, h = σ(z²)."""
    a1 = sigmoid(W[0][0][None, :] + X @ W[0][1:])
    return a1, sigmoid(W[1][0][None, :] + a1 @ W[1][1:])


def s004_likelihood(W: list) -> float:
    """(2), (12): C = Σ_p y log h + (1 − y) log(1 − h), maximised."""
    h = s004_forward(W, XOR_X)[1]
    return float(np.sum(XOR_Y * np.log(h) + (1 - XOR_Y) * np.log(1 - h)))


def s004_eq15(W: list) -> list:
    """(15) and the output weights ("v") directly, Σ over all P points."""
    a1, h = s004_forward(W, XOR_X)
    x, y, h = XOR_X, XOR_Y[:, 0], h[:, 0]
    g0, g1 = np.empty_like(W[0]), np.empty_like(W[1])
    for n1 in (1, 2):
        w1, a = W[1][n1, 0], a1[:, n1 - 1]
        g0[0, n1 - 1] = w1 * sum(a[p] * (1 - a[p]) * (y[p] - h[p]) for p in range(4))
        for q in (1, 2):
            g0[q, n1 - 1] = w1 * sum(
                x[p, q - 1] * a[p] * (1 - a[p]) * (y[p] - h[p]) for p in range(4)
            )
        g1[n1, 0] = sum(a[p] * (y[p] - h[p]) for p in range(4))
    g1[0, 0] = sum(y[p] - h[p] for p in range(4))
    return [g0, g1]


def s004_init(seed: int) -> list:
    r = rng(4, seed)
    return [r.normal(size=(3, 2)), r.normal(size=(3, 1))]


def s004_to_jbp(W: list) -> tuple:
    return tuple({"w": jnp.asarray(w[1:]), "b": jnp.asarray(w[0])} for w in W)


def case_004(W: list) -> Case:
    g15 = s004_eq15(W)
    seed = {"w^0": g15[0], "w^1": g15[1]}
    gm, ga = jbp_gradients(XOR_NET, "sigmoid_bce", s004_to_jbp(W), XOR_X, XOR_Y)

    def back(g):  # seed C = log-likelihood = −(sigmoid_bce); rows [bias, weights]
        return {
            f"w^{l}": -np.concatenate([np.asarray(g[l]["b"])[None, :], np.asarray(g[l]["w"])])
            for l in (0, 1)
        }

    g_w0 = jax.jit(jbp.backprop(XOR_NET_W0, "sigmoid_bce"))(
        ({}, {"w": jnp.asarray(W[0])}, {}, {"w": jnp.asarray(W[1])}), XOR_X, XOR_Y
    )
    w0_err = max(float(np.max(np.abs(-np.asarray(g_w0[2 * l + 1]["w"]) - g15[l]))) for l in (0, 1))
    return Case(
        "seed 004: 2-2-1 sigmoid on the 4 XOR points, log-likelihood C, closed form (15)",
        "w^l[n_l, n_{l+1}] with row 0 the bias: jbp w = w^l[1:], b = w^l[0]; c is a "
        "log-likelihood = −(sigmoid_bce of the logits z^L), shown as −(jbp's gradient)",
        {"w^0": W[0], "w^1": W[1]},
        lambda p: s004_likelihood([p["w^0"], p["w^1"]]),
        seed,
        back(gm),
        back(ga),
        [
            ("∂C/∂w^0_{01} (bias)", "w^0", (0, 0)),
            ("∂C/∂w^0_{11}", "w^0", (1, 0)),
            ("∂C/∂w^0_{22}", "w^0", (2, 1)),
            ("∂C/∂w^1_{0} (bias, v)", "w^1", (0, 0)),
            ("∂C/∂w^1_{2} (v)", "w^1", (2, 0)),
        ],
        [
            f"bias as w_0 on a constant input (PrependOne + Dense(bias=False)) vs (15): max |Δ| "
            f"= {w0_err:.1e}"
        ],
    )


# --- training ---------------------------------------------------------------------------


def train_xor(steps: int, alpha: float, seed: int) -> dict:
    """Ascent on the log-likelihood by (15) in numpy; descent on sigmoid_bce = −C in jbp."""
    W = s004_init(seed)
    seed_losses = [-s004_likelihood(W)]
    for _ in range(steps):
        W = [w + alpha * g for w, g in zip(W, s004_eq15(W), strict=True)]
        seed_losses.append(-s004_likelihood(W))
    x, y = jnp.asarray(XOR_X), jnp.asarray(XOR_Y)
    objective = jbp.objective(XOR_NET, "sigmoid_bce")
    runs = {
        "jbp.backprop": jbp.value_and_backprop(XOR_NET, "sigmoid_bce"),
        "jax.grad": jax.value_and_grad(objective),
    }
    out = {"seed (15), ascent on C": np.array(seed_losses)}
    finals = {}
    for name, vg in runs.items():

        def step(p, _, vg=vg):
            c, g = vg(p, x, y)
            return jtu.tree_map(lambda a, b: a - alpha * b, p, g), c

        params, losses = jax.jit(lambda p, step=step: jax.lax.scan(step, p, None, length=steps))(
            s004_to_jbp(s004_init(seed))
        )
        out[name] = np.append(np.asarray(losses), float(objective(params, x, y)))
        finals[name] = params
    w_err = max(
        float(np.max(np.abs(np.asarray(finals["jbp.backprop"][l]["w"]) - W[l][1:]))) for l in (0, 1)
    )
    return {"losses": out, "w_err": w_err, "W": W}


def xor_success_rate(steps: int, alpha: float, inits: int) -> tuple[int, np.ndarray]:
    """How many random inits solve XOR (final −C < 0.05) with jbp.backprop, vmapped over inits."""
    vg = jbp.value_and_backprop(XOR_NET, "sigmoid_bce")
    x, y = jnp.asarray(XOR_X), jnp.asarray(XOR_Y)

    def run(p):
        def step(p, _):
            c, g = vg(p, x, y)
            return jtu.tree_map(lambda a, b: a - alpha * b, p, g), c

        return jax.lax.scan(step, p, None, length=steps)[1][-1]

    stacked = jtu.tree_map(
        lambda *a: jnp.stack(a), *[s004_to_jbp(s004_init(s)) for s in range(inits)]
    )
    finals = np.asarray(jax.jit(jax.vmap(run))(stacked))
    return int(np.sum(finals < 0.05)), finals


def train_001() -> dict:
    """w ← w − ε ∂C/∂w, b ← b − ε ∂C/∂b until C ≤ C_TOL (or MAX_ITERS)."""
    p = s001_init()
    seed_costs = [s001_cost(p)]
    while seed_costs[-1] > S001_C_TOL and len(seed_costs) <= S001_MAX_ITERS:
        g = s001_matrix_grads(p)
        p = {k: v - S001_EPSILON * g[k] for k, v in p.items()}
        seed_costs.append(s001_cost(p))
    out = {"seed, matrix form": np.array(seed_costs)}
    x, y = jnp.asarray(S001_X.T), jnp.asarray(S001_Y.T)
    runs = {
        "jbp.backprop": jax.jit(jbp.value_and_backprop(S001_NET, "half_sse")),
        "jax.grad": jax.jit(jax.value_and_grad(jbp.objective(S001_NET, "half_sse"))),
    }
    finals = {}
    for name, vg in runs.items():
        params, costs = s001_to_jbp(s001_init()), []
        for _ in range(S001_MAX_ITERS + 1):
            c, g = vg(params, x, y)
            costs.append(float(c))
            if costs[-1] <= S001_C_TOL:
                break
            params = jtu.tree_map(lambda a, b: a - S001_EPSILON * b, params, g)
        out[name] = np.array(costs)
        finals[name] = s001_from_jbp(params)
    w_err = max(float(np.max(np.abs(finals["jbp.backprop"][k] - v))) for k, v in p.items())
    s = s001_forward(p, S001_X)[1][4][0]
    return {"costs": out, "w_err": w_err, "outputs": s}


def plot(curves: dict, title: str, ylabel: str, path: str, hline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = [
        dict(lw=5, alpha=0.35, color="C0"),
        dict(lw=1.6, ls="--", color="C3"),
        dict(lw=1.6, ls=":", color="k"),
    ]
    for (name, ys), style in zip(curves.items(), styles, strict=False):
        ax.plot(np.arange(len(ys)), ys, label=f"{name} ({len(ys) - 1} steps)", **style)
    if hline is not None:
        ax.axhline(hline, color="0.5", lw=0.8, ls="-.", label=f"termination C ≤ {hline}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "out"),
        help="folder for the PNGs (default: experiments/out next to this script)",
    )
    parser.add_argument("--xor-steps", type=int, default=5000)
    parser.add_argument("--xor-alpha", type=float, default=0.5)
    parser.add_argument("--xor-seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, float64")

    case_002b, _ = case_002_multi()
    cases = [
        case_000(),
        case_001(),
        case_002_chain(),
        case_002b,
        case_003(),
        case_004(s004_init(args.xor_seed)),
    ]
    worst = {}
    for case in cases:
        for k, v in print_case(case).items():
            worst[k] = max(worst.get(k, 0.0), v)
    print("\nworst over all seeds: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))

    print(
        f"\n== XOR, 2-2-1 sigmoid, seed 004's rule w ← w + α ∂C/∂w by (15), α = "
        f"{args.xor_alpha}, {args.xor_steps} steps, init {args.xor_seed}"
    )
    xor = train_xor(args.xor_steps, args.xor_alpha, args.xor_seed)
    for name, losses in xor["losses"].items():
        print(f"   {name:<24} −C: start {losses[0]:.6f}, end {losses[-1]:.3e}")
    ref = xor["losses"]["seed (15), ascent on C"]
    for name in ("jbp.backprop", "jax.grad"):
        print(
            f"   max |loss − seed loss| over the run, {name}: "
            f"{np.max(np.abs(xor['losses'][name] - ref)):.1e}"
        )
    print(f"   max |w_jbp − w_seed| after the run: {xor['w_err']:.1e}")
    h = s004_forward(xor["W"], XOR_X)[1][:, 0]
    print("   outputs h on (0,0), (0,1), (1,0), (1,1): " + ", ".join(f"{v:.4f}" for v in h))
    solved, _ = xor_success_rate(args.xor_steps, args.xor_alpha, 20)
    print(
        f"   inits 0-19 solved (−C < 0.05 after {args.xor_steps} steps, jbp.backprop, vmap): "
        f"{solved}/20"
    )
    path = os.path.join(args.out, "seeds_xor.png")
    plot(
        xor["losses"],
        f"XOR 2-2-1 sigmoid, seed 004 rule (15), α = {args.xor_alpha}",
        "−C (log-likelihood negated = sigmoid_bce)",
        path,
    )
    print(f"   wrote {path}")

    print(
        f"\n== seed 001: 4-2-2-1 on (x1 ∧ x2) ∨ (x3 ∧ x4), 16 patterns, ε = {S001_EPSILON}, "
        f"until C ≤ {S001_C_TOL}"
    )
    run = train_001()
    for name, costs in run["costs"].items():
        print(
            f"   {name:<24} C: start {costs[0]:.6f}, terminated after {len(costs) - 1} "
            f"iterations at C = {costs[-1]:.6f}"
        )
    ref = run["costs"]["seed, matrix form"]
    for name in ("jbp.backprop", "jax.grad"):
        c = run["costs"][name]
        diff = np.max(np.abs(c - ref)) if len(c) == len(ref) else float("nan")
        print(f"   max |C − seed C| over the run, {name}: {diff:.1e}")
    print(f"   max |w_jbp − w_seed| at termination: {run['w_err']:.1e}")
    print(
        f"   outputs s (targets {S001_Y[0].astype(int).tolist()}): "
        + " ".join(f"{v:.2f}" for v in run["outputs"])
    )
    path = os.path.join(args.out, "seeds_001.png")
    plot(
        run["costs"],
        f"seed 001: 4-2-2-1 sigmoid, ε = {S001_EPSILON}, until C ≤ {S001_C_TOL}",
        "C = Σ ½(s − y)²",
        path,
        hline=S001_C_TOL,
    )
    print(f"   wrote {path}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
