"""Every seed derivation, in its own notation, against ``jbp.backprop`` and ``jax.grad``.

The five documents in ``shared/seeds/`` derive the δ equations five ways. Each
group below writes one seed's formulas literally in plain numpy, in that seed's
layout (column or row vectors, 1-based layers and neurons, its sign), and
translates to jbp's layout (``x`` rows, ``w`` of shape ``(fan_in, fan_out)``,
``C`` minimised) only at the comparison. Every group checks the seed against
``jbp.backprop`` and ``jax.grad(jbp.objective)`` in float64 on several random
draws, runs the seed's own training rule for a few steps beside jbp's, and has
a misreading test: a plausible wrong transcription (a dropped transpose, a typo
taken literally) must disagree, which shows that the comparisons can fail.
``docs/seeds.md`` maps each seed's notation to jbp's and lists the seeds' errors.
"""

# ruff: noqa: E741  (``l`` is the seeds' own name for a layer index)

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import jbp

DRAWS = (0, 1, 2)
RTOL = 1e-12  # float64: relative to each reference leaf's max |g|


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# f and f' in numpy, independent of jbp's registry.
F = {
    "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1.0 - _sigmoid(z))),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
}


def _rng(*salt: int) -> np.random.Generator:
    return np.random.default_rng(salt)


@functools.cache
def _grad_fns(net: Any, loss: Any) -> tuple[Any, Any]:
    """``jit(jbp.backprop)`` and ``jit(jax.grad(objective))``, compiled once per network."""
    return jax.jit(jbp.backprop(net, loss)), jax.jit(jax.grad(jbp.objective(net, loss)))


def _agree(seed_grads: Any, net: Any, loss: Any, params: Any, x: Any, y: Any, what: str) -> Any:
    """The seed's gradient (already in jbp's layout and sign) equals jbp's and jax.grad's."""
    manual, autodiff = _grad_fns(net, loss)
    x, y = jnp.asarray(x), jnp.asarray(y)
    g_jbp, g_ad = manual(params, x, y), autodiff(params, x, y)
    for name, got in (("jbp.backprop", g_jbp), ("jax.grad", g_ad)):
        report = jbp.compare(got, seed_grads, rtol=RTOL, names=(name, "seed formula"))
        assert report.ok, f"{what}: {name} vs the seed\n{report}"
    return g_jbp


def _rel_err(a: Any, b: Any) -> float:
    la = [np.asarray(u) for u in jtu.tree_leaves(a)]
    lb = [np.asarray(v) for v in jtu.tree_leaves(b)]
    scale = max(float(np.max(np.abs(v))) for v in lb)
    return max(float(np.max(np.abs(u - v))) for u, v in zip(la, lb, strict=True)) / scale


def _assert_disagree(wrong: Any, right: Any, what: str) -> None:
    assert _rel_err(wrong, right) > 1e-3, f"{what}: the misreading agrees, so the test has no power"


def _tree(tree: Any) -> Any:
    return jtu.tree_map(jnp.asarray, tree)


def _descend(params: Any, grads: Any, rate: float) -> Any:
    return jtu.tree_map(lambda p, g: p - rate * g, params, grads)


# --- seed 000 (Schuermann): column vectors, y_n = f(x_n), x_{n+1} = w_n y_n -------------
#
# Layers n = 1..N; f acts on the input itself (y_1 = f(x_1)); no biases;
# c = ½ (y_N − t)ᵀ(y_N − t). δ_n = ∂c/∂x_n. In jbp: Activation(f), then Dense
# layers without bias; params[n] = {"w": w_nᵀ}; the δ of layer params[n] is the seed's δ_{n+1}.

S000_SIZES = (3, 4, 4, 2)  # k_1..k_N


def s000_forward(w: dict, x1: np.ndarray, f) -> tuple[dict, dict]:
    """y_n = f(x_n) for n = 1..N, x_{n+1} = w_n y_n; ``w = {n: w_n}``, columns (k, 1)."""
    big_n = len(w) + 1
    x, y = {1: x1}, {}
    for n in range(1, big_n + 1):
        y[n] = f(x[n])
        if n < big_n:
            x[n + 1] = w[n] @ y[n]
    return x, y


def s000_cost(w: dict, x1: np.ndarray, t: np.ndarray, f) -> float:
    """c = ½ (y_N − t)²  (for a vector: ½ (y_N − t)ᵀ(y_N − t))."""
    _, y = s000_forward(w, x1, f)
    r = y[len(w) + 1] - t
    return 0.5 * (r.T @ r).item()


def s000_backprop(w: dict, x1: np.ndarray, t: np.ndarray, f, fp) -> tuple[dict, dict]:
    """Column layout: δ_N = (y_N − t) ⊙ f'(x_N), δ_n = f'(x_n) ⊙ (w_nᵀ δ_{n+1}),
    ∂c/∂w_n = δ_{n+1} y_nᵀ."""
    big_n = len(w) + 1
    x, y = s000_forward(w, x1, f)
    delta = {big_n: (y[big_n] - t) * fp(x[big_n])}
    for n in range(big_n - 1, 0, -1):
        delta[n] = fp(x[n]) * (w[n].T @ delta[n + 1])
    return delta, {n: delta[n + 1] @ y[n].T for n in range(1, big_n)}


def s000_backprop_chain_rule(w: dict, x1: np.ndarray, t: np.ndarray, f, fp) -> tuple[dict, dict]:
    """The seed's chain rule read literally, δ_n as a row (a Jacobian ∂c/∂x_n):
    δ_N = (y_N − t)ᵀ f'(x_N) and δ_n = δ_{n+1} w_n f'(x_n), where f'(x_n) is the
    Jacobian ∂y_n/∂x_n = diag(f'(x_n)). Then ∂c/∂w_n in w_n's shape is δ_{n+1}ᵀ y_nᵀ."""
    big_n = len(w) + 1
    x, y = s000_forward(w, x1, f)
    delta = {big_n: (y[big_n] - t).T @ np.diag(fp(x[big_n])[:, 0])}
    for n in range(big_n - 1, 0, -1):
        delta[n] = delta[n + 1] @ w[n] @ np.diag(fp(x[n])[:, 0])
    return delta, {n: delta[n + 1].T @ y[n].T for n in range(1, big_n)}


def s000_draw(draw: int) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = _rng(0, draw)
    k = S000_SIZES
    w = {n: rng.normal(size=(k[n], k[n - 1])) for n in range(1, len(k))}  # w_n: (k_{n+1}, k_n)
    return w, rng.normal(size=(k[0], 1)), rng.uniform(-0.8, 0.8, size=(k[-1], 1))


def s000_net(act: str, sizes=S000_SIZES) -> jbp.Sequential:
    dense = [jbp.Dense(sizes[i], sizes[i + 1], act, bias=False) for i in range(len(sizes) - 1)]
    return jbp.Sequential([jbp.Activation(act), *dense])


def s000_params(w: dict) -> tuple:
    return ({}, *({"w": jnp.asarray(w[n].T)} for n in sorted(w)))


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("draw", DRAWS)
def test_000_weight_gradients(draw, act):
    f, fp = F[act]
    w, x1, t = s000_draw(draw)
    delta, dc_dw = s000_backprop(w, x1, t, f, fp)
    delta_row, dc_dw_row = s000_backprop_chain_rule(w, x1, t, f, fp)
    for n in delta:  # both readings of the seed agree: δ_n (row) = δ_nᵀ (column)
        np.testing.assert_allclose(delta_row[n], delta[n].T, rtol=1e-13, atol=1e-15)
    for n in w:
        assert dc_dw[n].shape == dc_dw_row[n].shape == w[n].shape
    seed = ({}, *({"w": dc_dw[n].T} for n in sorted(dc_dw)))
    seed_row = ({}, *({"w": dc_dw_row[n].T} for n in sorted(dc_dw_row)))
    net = s000_net(act)
    # one example, as in the seed: jbp takes x_1 as a single row (fan_in,)
    _agree(seed, net, "half_sse", s000_params(w), x1[:, 0], t[:, 0], "seed 000 ∂c/∂w_n")
    _agree(seed_row, net, "half_sse", s000_params(w), x1[:, 0], t[:, 0], "seed 000 chain rule")
    assert jbp.objective(net, "half_sse")(s000_params(w), x1[:, 0], t[:, 0]) == pytest.approx(
        s000_cost(w, x1, t, f), rel=1e-14
    )


@pytest.mark.parametrize("draw", DRAWS)
def test_000_every_delta_is_dc_dx_n(draw):
    """δ_n = ∂c/∂x_n for every n, down to δ_1 at the input (which passes through f):
    the seed's δ_n against jbp's δ rules run on the tail of the network from x_n,
    and against jax.grad with respect to x_n."""
    f, fp = F["tanh"]
    w, x1, t = s000_draw(draw)
    x, _ = s000_forward(w, x1, f)
    delta, _ = s000_backprop(w, x1, t, f, fp)
    params = s000_params(w)
    for n in delta:
        tail = s000_net("tanh", S000_SIZES[n - 1 :])  # x_n -> y_n = f(x_n) -> ... -> y_N
        p_tail = ({}, *params[n:])
        xn, tn = jnp.asarray(x[n][:, 0])[None, :], jnp.asarray(t[:, 0])[None, :]
        out, caches = tail.forward(p_tail, xn)
        _, dc_dxn = tail.backward(p_tail, caches, out - tn)  # δ_L = y_N − t for half_sse
        ref = jax.grad(jbp.objective(tail, "half_sse"), argnums=1)(p_tail, xn, tn)
        np.testing.assert_allclose(dc_dxn[0], delta[n][:, 0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ref[0], delta[n][:, 0], rtol=1e-12, atol=1e-15)


def test_000_update_rule_trajectory():
    """Δw_n = −α δ_{n+1} y_nᵀ, five steps, beside jbp's w ← w − α ∂C/∂w."""
    f, fp = F["tanh"]
    alpha = 0.3
    w, x1, t = s000_draw(7)
    net = s000_net("tanh")
    manual, autodiff = _grad_fns(net, "half_sse")
    p_jbp = p_ad = s000_params(w)
    xj, tj = jnp.asarray(x1[:, 0]), jnp.asarray(t[:, 0])
    costs = []
    for _ in range(5):
        delta, _ = s000_backprop(w, x1, t, f, fp)
        _, y = s000_forward(w, x1, f)
        w = {n: w[n] - alpha * delta[n + 1] @ y[n].T for n in w}  # Δw_n = −α δ_{n+1} y_nᵀ
        p_jbp = _descend(p_jbp, manual(p_jbp, xj, tj), alpha)
        p_ad = _descend(p_ad, autodiff(p_ad, xj, tj), alpha)
        for got in (p_jbp, p_ad):
            assert jbp.compare(got, s000_params(w), rtol=1e-12).ok
        costs.append(s000_cost(w, x1, t, f))
    assert costs[-1] < costs[0]


def test_000_misreadings_fail():
    """What the seed prints, taken literally, does not compute ∂c/∂w_n."""
    f, fp = F["tanh"]
    w, x1, t = s000_draw(0)
    delta, dc_dw = s000_backprop(w, x1, t, f, fp)
    _, y = s000_forward(w, x1, f)
    # "∂c/∂w_n = δ_{n+1} y_n" with both columns is not a product at all ...
    with pytest.raises(ValueError):
        _ = delta[2] @ y[1]
    # ... with δ_{n+1} a row (as in the seed's chain rule) it conforms only if k_{n+1} = k_n,
    with pytest.raises(ValueError):
        _ = delta[2].T @ y[1]  # k_2 = 4, k_1 = 3
    # and then it is a scalar (an inner product), not a matrix shaped like w_n.
    assert (delta[3].T @ y[2]).shape == (1, 1) != w[2].shape  # k_3 = k_2 = 4
    # "δ_n = δ_{n+1} w_n" with δ a column does not conform either (k_{n+1} ≠ 1).
    with pytest.raises(ValueError):
        _ = delta[2] @ w[1]
    # Forgetting that the input passes through f: a plain mlp, no leading Activation.
    plain = jbp.Sequential([jbp.Dense(3, 4, "tanh", bias=False), *s000_net("tanh").layers[2:]])
    g_plain = _grad_fns(plain, "half_sse")[0](
        s000_params(w)[1:], jnp.asarray(x1[:, 0]), jnp.asarray(t[:, 0])
    )
    _assert_disagree(g_plain, tuple({"w": dc_dw[n].T} for n in sorted(dc_dw)), "no f on input")


# --- seed 001: the 4-2-2-1 network, W^l of shape (out, in), column vectors ---------------
#
# Layers l = 1..4 (a¹ = x); z^{l+1} = W^l a^l + b^l, a^{l+1} = f(z^{l+1}); s = a⁴.
# (w_jk)^l joins neuron k of layer l to neuron j of layer l+1. In jbp:
# params[l-1] = {"w": (W^l)ᵀ, "b": b^l[:, 0]}, so (w_jk)^l is params[l-1]["w"][k-1, j-1].

S001_N = {1: 4, 2: 2, 3: 2, 4: 1}  # neurons per layer
S001_COSTS = {  # ∂C/∂s_p for C summed over the P training pairs (half_sse) or averaged (mse)
    "half_sse": lambda s, y, big_p: s - y,
    "mse": lambda s, y, big_p: 2.0 * (s - y) / big_p,
}


def s001_forward(W: dict, b: dict, x: np.ndarray, f) -> tuple[dict, dict]:
    """a¹ = x; z^{l+1} = W^l a^l + b^l; a^{l+1} = f(z^{l+1}); columns of ``x`` are examples."""
    a, z = {1: x}, {}
    for l in (1, 2, 3):
        z[l + 1] = W[l] @ a[l] + b[l]
        a[l + 1] = f(z[l + 1])
    return z, a


def s001_scalar_grads(W: dict, b: dict, x: np.ndarray, y: float, f, fp, dC_ds) -> tuple:
    """One example, neuron by neuron, 1-based: the local gradient
    (δ_j)^l = ∂C/∂(z_j)^l, ∂C/∂(w_jk)^l = (δ_j)^{l+1} (a_k)^l, ∂C/∂(b_j)^l = (δ_j)^{l+1}."""
    z, a = s001_forward(W, b, x, f)
    s = a[4][0, 0]
    local = {4: {1: dC_ds(s, y) * fp(z[4][0, 0])}}
    for l in (3, 2):
        local[l] = {}
        for j in range(1, S001_N[l] + 1):
            dC_da = sum(local[l + 1][i] * W[l][i - 1, j - 1] for i in range(1, S001_N[l + 1] + 1))
            local[l][j] = dC_da * fp(z[l][j - 1, 0])
    dW, db = {}, {}
    for l in (1, 2, 3):
        dW[l] = np.zeros_like(W[l])
        db[l] = np.zeros_like(b[l])
        for j in range(1, S001_N[l + 1] + 1):
            db[l][j - 1, 0] = local[l + 1][j]
            for k in range(1, S001_N[l] + 1):
                dW[l][j - 1, k - 1] = local[l + 1][j] * a[l][k - 1, 0]
    return dW, db


def s001_worked_example(W: dict, b: dict, x: np.ndarray, y: float, f, fp, dC_ds) -> float:
    """∂C/∂(w_22)² = ∂C/∂(a_2)³ · ∂(a_2)³/∂(z_2)³ · ∂(z_2)³/∂(w_22)²,
    with ∂C/∂(a_2)³ = ∂C/∂s · f'(z⁴) · (w_12)³ (C reaches (a_2)³ through the output)."""
    z, a = s001_forward(W, b, x, f)
    dC_da2_3 = dC_ds(a[4][0, 0], y) * fp(z[4][0, 0]) * W[3][0, 1]
    da2_3_dz2_3 = fp(z[3][1, 0])
    dz2_3_dw22_2 = a[2][1, 0]  # (z_2)³ = (w_21)²(a_1)² + (w_22)²(a_2)² + (b_2)²
    return dC_da2_3 * da2_3_dz2_3 * dz2_3_dw22_2


def s001_matrix_grads(W: dict, b: dict, X: np.ndarray, Y: np.ndarray, f, fp, dC_ds) -> tuple:
    """The same in matrix form over the columns of X (4, P): δ⁴ = ∂C/∂s ⊙ f'(z⁴),
    δ^l = (W^lᵀ δ^{l+1}) ⊙ f'(z^l), ∂C/∂W^l = δ^{l+1} a^lᵀ, ∂C/∂b^l = δ^{l+1} 1."""
    z, a = s001_forward(W, b, X, f)
    delta = {4: dC_ds(a[4], Y, X.shape[1]) * fp(z[4])}
    for l in (3, 2):
        delta[l] = (W[l].T @ delta[l + 1]) * fp(z[l])
    dW = {l: delta[l + 1] @ a[l].T for l in (1, 2, 3)}
    db = {l: delta[l + 1] @ np.ones((X.shape[1], 1)) for l in (1, 2, 3)}
    return dW, db


def s001_cost(W: dict, b: dict, X: np.ndarray, Y: np.ndarray, f, cost: str) -> float:
    _, a = s001_forward(W, b, X, f)
    r = a[4] - Y
    return float(0.5 * np.sum(r * r)) if cost == "half_sse" else float(np.mean(r * r))


def s001_draw(rng: np.random.Generator) -> tuple[dict, dict]:
    """Initial values of W and b are randomly chosen."""
    W = {l: rng.normal(size=(S001_N[l + 1], S001_N[l])) for l in (1, 2, 3)}
    b = {l: rng.normal(size=(S001_N[l + 1], 1)) for l in (1, 2, 3)}
    return W, b


def s001_to_jbp(W: dict, b: dict) -> tuple:
    return tuple({"w": W[l].T, "b": b[l][:, 0]} for l in (1, 2, 3))


S001_NET = jbp.mlp([4, 2, 2, 1], "sigmoid", final_activation="sigmoid")


@pytest.mark.parametrize("cost", sorted(S001_COSTS))
@pytest.mark.parametrize("draw", DRAWS)
def test_001_single_weight_and_all_weights(draw, cost):
    f, fp = F["sigmoid"]
    dC_ds = S001_COSTS[cost]
    rng = _rng(1, draw)
    W, b = s001_draw(rng)
    big_p = 3
    X, Y = rng.normal(size=(4, big_p)), rng.uniform(size=(1, big_p))
    # per example, neuron by neuron, then the training set's C (sum or mean over examples)
    per_ex = [
        s001_scalar_grads(W, b, X[:, [p]], Y[0, p], f, fp, lambda s, y: dC_ds(s, y, big_p))
        for p in range(big_p)
    ]
    dW = {l: sum(g[0][l] for g in per_ex) for l in (1, 2, 3)}
    db = {l: sum(g[1][l] for g in per_ex) for l in (1, 2, 3)}
    dW_m, db_m = s001_matrix_grads(W, b, X, Y, f, fp, dC_ds)
    for l in (1, 2, 3):
        np.testing.assert_allclose(dW[l], dW_m[l], rtol=1e-13, atol=1e-16)
        np.testing.assert_allclose(db[l], db_m[l], rtol=1e-13, atol=1e-16)
    g = _agree(s001_to_jbp(dW, db), S001_NET, cost, _tree(s001_to_jbp(W, b)), X.T, Y.T, "seed 001")
    # the worked example, (w_22)²: params[1]["w"][1, 1]
    worked = sum(
        s001_worked_example(W, b, X[:, [p]], Y[0, p], f, fp, lambda s, y: dC_ds(s, y, big_p))
        for p in range(big_p)
    )
    assert float(g[1]["w"][1, 1]) == pytest.approx(worked, rel=1e-12)
    # (w_12)² joins (a_2)² to (z_1)³: jbp's w[k-1, j-1] = w[1, 0], not w[0, 1].
    assert float(g[1]["w"][1, 0]) == pytest.approx(dW[2][0, 1], rel=1e-12)
    assert float(g[1]["w"][0, 1]) != pytest.approx(dW[2][0, 1], rel=1e-3)
    # the cost itself
    c = jbp.objective(S001_NET, cost)(_tree(s001_to_jbp(W, b)), jnp.asarray(X.T), jnp.asarray(Y.T))
    assert float(c) == pytest.approx(s001_cost(W, b, X, Y, f, cost), rel=1e-14)


def test_001_misreading_untransposed_weights_fail():
    """Handing the seed's W^l (out, in) to jbp's w (in, out) slot unchanged is caught
    (shape check), and transposing the gradient back wrongly disagrees."""
    f, fp = F["sigmoid"]
    rng = _rng(1, 99)
    W, b = s001_draw(rng)
    X, Y = rng.normal(size=(4, 3)), rng.uniform(size=(1, 3))
    dW, _ = s001_matrix_grads(W, b, X, Y, f, fp, S001_COSTS["half_sse"])
    with pytest.raises(ValueError, match="expects"):
        jbp.backprop(S001_NET, "half_sse")(
            _tree(tuple({"w": W[l], "b": b[l][:, 0]} for l in (1, 2, 3))), X.T, Y.T
        )
    g = _grad_fns(S001_NET, "half_sse")[0](_tree(s001_to_jbp(W, b)), X.T, Y.T)
    _assert_disagree(g[1]["w"], dW[2], "∂C/∂W² without the transpose")


# The 001 training run: 16 binary patterns, target (x1 ∧ x2) ∨ (x3 ∧ x4); the seed's
# "termination condition ... once the cost function is minimized" made concrete.
S001_X = np.array(list(itertools.product([0.0, 1.0], repeat=4))).T  # (4, 16), columns
S001_Y = ((S001_X[0] * S001_X[1] + S001_X[2] * S001_X[3]) > 0).astype(float)[None, :]
S001_EPSILON = 1.0
S001_C_TOL = 0.01  # terminate when C = Σ_p ½(s_p − y_p)² ≤ C_TOL ...
S001_MAX_ITERS = 20_000  # ... or after this many iterations


def s001_train(W: dict, b: dict, epsilon: float, c_tol: float, max_iters: int) -> tuple:
    """w ← w − ε ∂C/∂w, b ← b − ε ∂C/∂b until C ≤ c_tol; returns (W, b, costs)."""
    f, fp = F["sigmoid"]
    costs = [s001_cost(W, b, S001_X, S001_Y, f, "half_sse")]
    while costs[-1] > c_tol and len(costs) <= max_iters:
        dW, db = s001_matrix_grads(W, b, S001_X, S001_Y, f, fp, S001_COSTS["half_sse"])
        W = {l: W[l] - epsilon * dW[l] for l in W}
        b = {l: b[l] - epsilon * db[l] for l in b}
        costs.append(s001_cost(W, b, S001_X, S001_Y, f, "half_sse"))
    return W, b, costs


def test_001_gradient_descent_until_termination():
    W0, b0 = s001_draw(_rng(1, 1000))
    W, b, costs = s001_train(W0, b0, S001_EPSILON, S001_C_TOL, S001_MAX_ITERS)
    assert costs[-1] <= S001_C_TOL, "the seed's rule did not reach the termination condition"
    vg = jax.jit(jbp.value_and_backprop(S001_NET, "half_sse"))
    params = _tree(s001_to_jbp(W0, b0))
    x, y = jnp.asarray(S001_X.T), jnp.asarray(S001_Y.T)
    jbp_costs = []
    for _ in range(S001_MAX_ITERS + 1):
        c, g = vg(params, x, y)
        jbp_costs.append(float(c))
        if c <= S001_C_TOL:
            break
        params = _descend(params, g, S001_EPSILON)
    assert len(jbp_costs) == len(costs), "jbp and the seed terminate at different iterations"
    np.testing.assert_allclose(jbp_costs, costs, rtol=1e-9)
    assert jbp.compare(params, s001_to_jbp(W, b), rtol=1e-8).ok


# --- seed 002 (MIT OCW): sigmoid neurons without biases, P = −½(d − o)², ascent --------
#
# p = w·i, o = σ(p); P is maximised with w' = w + α ∂P/∂w. jbp minimises
# C = ½(d − o)² = −P ("half_sse"), so ∂P/∂w = −jbp's gradient. The seed's
# w_{l_i → r_j} is jbp's w[i, j] for the layer between them, no transpose.


def s002_chain(i_l: float, w_l: float, w_r: float, d: float) -> dict:
    p_l = w_l * i_l
    o_l = _sigmoid(p_l)
    i_r = o_l
    p_r = w_r * i_r
    o_r = _sigmoid(p_r)
    delta_r = o_r * (1 - o_r) * (d - o_r)
    delta_l = o_l * (1 - o_l) * w_r * delta_r
    return {
        "P": -0.5 * (d - o_r) ** 2,
        "dP/dw_r": (d - o_r) * o_r * (1 - o_r) * i_r,
        "dP/dw_l": (d - o_r) * o_r * (1 - o_r) * w_r * o_l * (1 - o_l) * i_l,
        "i_r delta_r": i_r * delta_r,
        "i_l delta_l": i_l * delta_l,
    }


def s002_chain_P_jnp(w_l, w_r, i_l, d):
    """The seed's P as a jnp function of the weights, for jax.grad."""
    o_r = jax.nn.sigmoid(w_r * jax.nn.sigmoid(w_l * i_l))
    return -0.5 * (d - o_r) ** 2


S002_CHAIN = jbp.Sequential([jbp.Dense(1, 1, "sigmoid", bias=False)] * 2)


@pytest.mark.parametrize("draw", DRAWS)
def test_002_two_neuron_chain(draw):
    rng = _rng(2, draw)
    i_l, w_l, w_r = rng.normal(size=3) * 1.5
    d = rng.uniform()
    s = s002_chain(i_l, w_l, w_r, d)
    assert s["dP/dw_r"] == pytest.approx(s["i_r delta_r"], rel=1e-14)
    assert s["dP/dw_l"] == pytest.approx(s["i_l delta_l"], rel=1e-14)
    params = _tree(({"w": np.array([[w_l]])}, {"w": np.array([[w_r]])}))
    minus_dP = ({"w": np.array([[-s["dP/dw_l"]]])}, {"w": np.array([[-s["dP/dw_r"]]])})
    _agree(minus_dP, S002_CHAIN, "half_sse", params, np.array([i_l]), np.array([d]), "002 chain")
    dP = jax.grad(s002_chain_P_jnp, argnums=(0, 1))(w_l, w_r, i_l, d)  # ascent direction of P
    assert float(dP[0]) == pytest.approx(s["dP/dw_l"], rel=1e-12)
    assert float(dP[1]) == pytest.approx(s["dP/dw_r"], rel=1e-12)
    c = jbp.objective(S002_CHAIN, "half_sse")(params, jnp.array([i_l]), jnp.array([d]))
    assert float(c) == pytest.approx(-s["P"], rel=1e-14)


S002_SIZES = (3, 4, 3, 2)


def s002_multi(w: list, i: np.ndarray, d: np.ndarray) -> tuple[list, float]:
    """Neuron by neuron: δ_{f_k} = o_{f_k}(1 − o_{f_k})(d_k − o_{f_k}),
    δ_{l_i} = o_{l_i}(1 − o_{l_i}) Σ_j w_{l_i→r_j} δ_{r_j}, ∂P/∂w = i δ (Δw = α i δ).
    ``w[m][i, j]`` is w_{l_i → r_j} between layer m's inputs and its neurons."""
    inputs, o = [], i
    for wm in w:
        inputs.append(o)
        o = np.array(
            [_sigmoid(sum(o[a] * wm[a, j] for a in range(len(o)))) for j in range(wm.shape[1])]
        )
    outs = [*inputs[1:], o]  # outs[m]: outputs of layer m's neurons
    delta = [None] * len(w)
    delta[-1] = np.array([ok * (1 - ok) * (dk - ok) for ok, dk in zip(o, d, strict=True)])
    for m in range(len(w) - 2, -1, -1):
        delta[m] = np.array(
            [
                outs[m][a]
                * (1 - outs[m][a])
                * sum(w[m + 1][a, j] * delta[m + 1][j] for j in range(w[m + 1].shape[1]))
                for a in range(w[m].shape[1])
            ]
        )
    dP = [
        np.array(
            [[inputs[m][a] * delta[m][j] for j in range(wm.shape[1])] for a in range(wm.shape[0])]
        )
        for m, wm in enumerate(w)
    ]
    return dP, -0.5 * float(np.sum((d - o) ** 2))


def s002_draw(rng: np.random.Generator, batch: int) -> tuple[list, np.ndarray, np.ndarray]:
    k = S002_SIZES
    w = [rng.normal(size=(k[m], k[m + 1])) for m in range(len(k) - 1)]
    return w, rng.normal(size=(batch, k[0])), rng.uniform(size=(batch, k[-1]))


S002_NET = jbp.mlp(list(S002_SIZES), "sigmoid", final_activation="sigmoid", bias=False)


@pytest.mark.parametrize("draw", DRAWS)
def test_002_more_neurons_per_layer(draw):
    w, X, D = s002_draw(_rng(2, 10 + draw), batch=3)
    per_sample = [s002_multi(w, X[p], D[p]) for p in range(3)]  # P summed over samples
    dP = [sum(s[0][m] for s in per_sample) for m in range(len(w))]
    minus_dP = tuple({"w": -g} for g in dP)
    params = _tree(tuple({"w": wm} for wm in w))
    _agree(minus_dP, S002_NET, "half_sse", params, X, D, "002 multi-neuron δ")


def test_002_ascent_on_P_equals_descent_on_half_sse():
    """w' = w + α ∂P/∂w (the seed) and w' = w − α ∂C/∂w with C = ½(d − o)² (jbp) give the
    same weights step for step; with jax.grad on both sides, bit for bit."""
    alpha = 0.5
    w, X, D = s002_draw(_rng(2, 100), batch=4)
    params = _tree(tuple({"w": wm} for wm in w))
    x, y = jnp.asarray(X), jnp.asarray(D)
    manual, autodiff = _grad_fns(S002_NET, "half_sse")
    objective = jbp.objective(S002_NET, "half_sse")
    grad_P = jax.jit(jax.grad(lambda p, x, y: -objective(p, x, y)))  # P = −C, summed
    p_jbp = p_desc = p_asc = params
    for _ in range(10):
        dP = [sum(s002_multi(w, X[p], D[p])[0][m] for p in range(4)) for m in range(len(w))]
        w = [wm + alpha * g for wm, g in zip(w, dP, strict=True)]  # gradient ascent on P
        p_jbp = _descend(p_jbp, manual(p_jbp, x, y), alpha)  # gradient descent on C
        p_desc = _descend(p_desc, autodiff(p_desc, x, y), alpha)
        p_asc = jtu.tree_map(lambda p, g: p + alpha * g, p_asc, grad_P(p_asc, x, y))
        assert jbp.compare(p_jbp, tuple({"w": wm} for wm in w), rtol=1e-12).ok
        assert all(
            bool(jnp.all(a == b))
            for a, b in zip(jtu.tree_leaves(p_asc), jtu.tree_leaves(p_desc), strict=True)
        )


def test_002_misreading_sign_fails():
    """Ascent with the gradient of C (or descent with ∂P/∂w) moves the other way."""
    w, X, D = s002_draw(_rng(2, 0), batch=3)
    dP = [sum(s002_multi(w, X[p], D[p])[0][m] for p in range(3)) for m in range(len(w))]
    g = _grad_fns(S002_NET, "half_sse")[0](_tree(tuple({"w": wm} for wm in w)), X, D)
    _assert_disagree(g, tuple({"w": gm} for gm in dP), "∂P/∂w without the sign")


# --- seed 003: row vectors, z_i = a_{i-1} · w_{i-1} + b_{i-1}, C = ½(y − a_l)² ----------
#
# This is jbp's own layout: w_i (layer_i, layer_{i+1}) is params[i-1]["w"] and the
# row b_i is params[i-1]["b"]; the δ of layer params[i-1] is the seed's δ_{i+1}. `'` on a
# matrix is the transpose (w_i'), on σ the derivative (σ').


def s003(w: dict, b: dict, x: np.ndarray, y: np.ndarray, act: str) -> dict:
    """Equations (1)-(3), (7)-(10) and (11)-(14) for one example ``x`` (1, layer_1)."""
    sigma, sigma_p = F[act]
    l = len(w) + 1
    a, z = {1: x}, {}  # (1)
    for i in range(2, l + 1):
        z[i] = a[i - 1] @ w[i - 1] + b[i - 1]  # (2)
        a[i] = sigma(z[i])  # (3)
    dC_da = {l: a[l] - y}  # (7)
    for i in range(l - 1, 0, -1):
        dC_da[i] = (dC_da[i + 1] * sigma_p(z[i + 1])) @ w[i].T  # (8)
    dC_dw_9 = {i: a[i].T @ (dC_da[i + 1] * sigma_p(z[i + 1])) for i in range(1, l)}  # (9)
    dC_db_10 = {i: dC_da[i + 1] * sigma_p(z[i + 1]) for i in range(1, l)}  # (10)
    delta = {l: (a[l] - y) * sigma_p(z[l])}  # (11)
    for i in range(l - 1, 1, -1):  # δ_1 would need σ'(z_1), but a_1 = x has no z_1
        delta[i] = (delta[i + 1] @ w[i].T) * sigma_p(z[i])  # (12)
    dC_dw = {i: a[i].T @ delta[i + 1] for i in range(1, l)}  # (13)
    dC_db = {i: delta[i + 1] for i in range(1, l)}  # (14)
    return {"w9": dC_dw_9, "b10": dC_db_10, "w13": dC_dw, "b14": dC_db, "a": a, "z": z}


S003_SIZES = (3, 5, 4, 2)


def s003_draw(rng: np.random.Generator, sizes=S003_SIZES, batch: int = 3) -> tuple:
    w = {i: rng.normal(size=(sizes[i - 1], sizes[i])) for i in range(1, len(sizes))}
    b = {i: rng.normal(size=(1, sizes[i])) for i in range(1, len(sizes))}
    return w, b, rng.normal(size=(batch, sizes[0])), rng.uniform(size=(batch, sizes[-1]))


def s003_to_jbp(w: dict, b: dict) -> tuple:
    return tuple({"w": w[i], "b": b[i][0]} for i in sorted(w))


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
@pytest.mark.parametrize("draw", DRAWS)
def test_003_row_vector_equations(draw, act):
    w, b, X, Y = s003_draw(_rng(3, draw))
    rows = [s003(w, b, X[[p]], Y[[p]], act) for p in range(len(X))]  # rows (1, ·), summed
    for key_w, key_b in (("w9", "b10"), ("w13", "b14")):
        grads = tuple(
            {"w": sum(r[key_w][i] for r in rows), "b": sum(r[key_b][i] for r in rows)[0]}
            for i in sorted(w)
        )
        net = jbp.mlp(list(S003_SIZES), act, final_activation=act)
        _agree(grads, net, "half_sse", _tree(s003_to_jbp(w, b)), X, Y, f"003 {key_w}/{key_b}")


def test_003_gradient_descent_unit_step():
    """Δw = −∂C/∂w, Δb = −∂C/∂b: the seed's rule has no learning rate (a unit step)."""
    w, b, X, Y = s003_draw(_rng(3, 50), batch=4)
    net = jbp.mlp(list(S003_SIZES), "sigmoid", final_activation="sigmoid")
    manual = _grad_fns(net, "half_sse")[0]
    params = _tree(s003_to_jbp(w, b))
    for _ in range(5):
        rows = [s003(w, b, X[[p]], Y[[p]], "sigmoid") for p in range(len(X))]
        w = {i: w[i] - sum(r["w13"][i] for r in rows) for i in w}
        b = {i: b[i] - sum(r["b14"][i] for r in rows) for i in b}
        params = _descend(params, manual(params, X, Y), 1.0)
        assert jbp.compare(params, s003_to_jbp(w, b), rtol=1e-12).ok


def test_003_misreading_operator_precedence_fails():
    """(8) must be read (∂C/∂a_{i+1} ⊙ σ'(z_{i+1})) w_i'. Read as ∂C/∂a_{i+1} ⊙
    (σ'(z_{i+1}) w_i') it does not conform unless layer_i = layer_{i+1}, and then
    it gives the wrong numbers."""
    sigma_p = F["sigmoid"][1]
    sizes = (4, 4, 4, 2)
    w, b, X, Y = s003_draw(_rng(3, 7), sizes=sizes, batch=1)
    s = s003(w, b, X, Y, "sigmoid")
    a, z = s["a"], s["z"]
    dC_da4 = a[4] - Y  # (7)
    dC_da3 = (dC_da4 * sigma_p(z[4])) @ w[3].T  # (8), read right
    with pytest.raises(ValueError):  # layer_3 = 4 ≠ layer_4 = 2
        _ = dC_da4 * (sigma_p(z[4]) @ w[3].T)
    wrong_dC_da2 = dC_da3 * (sigma_p(z[3]) @ w[2].T)  # layer_2 = layer_3 = 4: it computes
    right_dC_da2 = (dC_da3 * sigma_p(z[3])) @ w[2].T
    _assert_disagree(wrong_dC_da2, right_dC_da2, "(8) with ⊙ after the product")
    # (9) is safe either way: a_i'(A ⊙ B) = (a_i' A) ⊙ B when B is broadcast over rows.
    A, B = dC_da3, sigma_p(z[3])
    np.testing.assert_allclose(a[2].T @ (A * B), (a[2].T @ A) * B, rtol=1e-14)


# --- seed 004: P points, bias as w_0 on a constant input, log-likelihood -----------------
#
# Layers l = 0 (inputs x_q^p) .. L (outputs h^p = σ(z^L)). w^l is (N_l + 1, N_{l+1}),
# indexed [n_l, n_{l+1}], row 0 the bias w^l_{0 n_{l+1}}: jbp's Dense w = w^l[1:],
# b = w^l[0], no transpose. c = y log h + (1 − y) log(1 − h) is a log-likelihood
# (maximised, ∂c/∂z^L = y − h); jbp's "sigmoid_bce" from the logits z^L is −c,
# so the seed's ∂C/∂w = −jbp's gradient, and the last Dense is "identity".


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class PrependOne(jbp.Layer):
    """The seed's constant input a_0 = 1: ``out = [1, a]``; a user layer with its δ rule."""

    fan_in: int

    @property
    def fan_out(self) -> int:
        return self.fan_in + 1

    def init(self, key, dtype=jnp.float32):
        return {}

    def forward(self, params, a):
        return jnp.concatenate([jnp.ones((a.shape[0], 1), a.dtype), a], axis=1), None

    def backward(self, params, cache, delta_out):
        return {}, delta_out[:, 1:]  # nothing flows into the constant


def _neg_log_likelihood(h, y):
    return -jnp.sum(y * jnp.log(h) + (1 - y) * jnp.log(1 - h), axis=-1)


# The seed's layout literally: h = σ(z^L) is the last layer's activation and −c a
# function of h, with δ = ∂(−c)/∂h = (h − y)/(h(1 − h)); jbp's sigmoid δ rule then gives h − y.
NEG_LOG_LIKELIHOOD = jbp.Loss(
    "neg_log_likelihood", _neg_log_likelihood, lambda h, y: (h - y) / (h * (1 - h)), "sum"
)


def s004_forward(W: list, X: np.ndarray, f, bias_as_w0: bool = True) -> tuple[dict, dict]:
    """(1): z^{p,l+1}_{n} = w^l_{0 n} + Σ_{n_l=1}^{N_l} w^l_{n_l n} a^{p,l}_{n_l};
    a = f(z) in hidden layers, h = σ(z^L). ``X`` is (P, Q), one data point a row."""
    big_l = len(W)
    a, z = {0: X}, {}
    for l in range(big_l):
        if bias_as_w0:  # a_0 = 1 on a constant input, one weight matrix
            ones = np.ones((a[l].shape[0], 1))
            z[l + 1] = np.einsum("pk,km->pm", np.concatenate([ones, a[l]], axis=1), W[l])
        else:  # the same weights split into w and b
            z[l + 1] = np.einsum("pk,km->pm", a[l], W[l][1:]) + W[l][0][None, :]
        a[l + 1] = f(z[l + 1]) if l + 1 < big_l else _sigmoid(z[l + 1])
    return z, a


def s004_log_likelihood(W: list, X: np.ndarray, Y: np.ndarray, f) -> float:
    """(2), (12): C = Σ_p Σ_{n_L} y log h + (1 − y) log(1 − h)."""
    h = s004_forward(W, X, f)[1][len(W)]
    return float(np.sum(Y * np.log(h) + (1 - Y) * np.log(1 - h)))


def s004_equations_9_13(W: list, X: np.ndarray, Y: np.ndarray, act: str) -> list:
    """(9) with (13)'s output layer, one δ per output node's cost c^p_{n_L}, summed at the end:
    D^l[p, n_L, n] = ∂c^p_{n_L}/∂z^{p,l}_n; D^L[p, n_L, m] = (y − h)[p, n_L] if m = n_L, else 0;
    D^l = f'(z^l) Σ_m w^l_{n m} D^{l+1}; ∂C/∂w^l_{0m} = Σ_p Σ_{n_L} D^{l+1}[p, n_L, m];
    ∂C/∂w^l_{n m} = Σ_p a^{p,l}_n Σ_{n_L} D^{l+1}[p, n_L, m]."""
    f, fp = F[act]
    big_l = len(W)
    z, a = s004_forward(W, X, f)
    h = a[big_l]
    D = {big_l: np.einsum("pk,km->pkm", Y - h, np.eye(h.shape[1]))}
    for l in range(big_l - 1, 0, -1):
        fprime = a[l] * (1 - a[l]) if act == "sigmoid" else fp(z[l])  # (13): a(1 − a)
        D[l] = np.einsum("pn,nm,pkm->pkn", fprime, W[l][1:], D[l + 1])
    grads = []
    for l in range(big_l):
        g = np.empty_like(W[l])
        g[0] = np.einsum("pkm->m", D[l + 1])
        g[1:] = np.einsum("pn,pkm->nm", a[l], D[l + 1])
        grads.append(g)
    return grads


def s004_equation_11(W: list, X: np.ndarray, Y: np.ndarray, act: str) -> list:
    """(11), one output node (N_L = 1), for the last hidden layer l − 1 = L − 1 (here the
    network has two layers, so l − 2 is the input): ∂c^p/∂z^{p,l-1}_{n} = f'(z^{p,l-1}_{n})
    w^{l-1}_{n 1} ∂c^p/∂z^{p,l}_{1}, ∂C/∂w^{l-2}_{0n} = Σ_p ∂c^p/∂z^{p,l-1}_{n},
    ∂C/∂w^{l-2}_{qn} = Σ_p a^{p,l-2}_q ∂c^p/∂z^{p,l-1}_{n}; ∂c^p/∂z^{p,L} = y^p − h^p (13)."""
    f, fp = F[act]
    z, a = s004_forward(W, X, f)
    dz_out = Y[:, 0] - a[2][:, 0]  # ∂c^p/∂z^{p,L}_1
    dz = fp(z[1]) * W[1][1:, 0][None, :] * dz_out[:, None]  # (P, N_{L-1})
    g0 = np.concatenate([dz.sum(axis=0)[None, :], X.T @ dz])
    g1 = np.concatenate([[[dz_out.sum()]], a[1].T @ dz_out[:, None]])
    return [g0, g1]


def s004_equation_14(W: list, X: np.ndarray, Y: np.ndarray, act: str, *, literal=False) -> list:
    """(14), two layers, generic f: ∂c_{n_2}/∂z^{p,1}_{n_1} = f'(z^{p,1}_{n_1}) w^1_{n_1 n_2}
    ∂c_{n_2}/∂z^{p,2}_{n_2} (of the Σ_m w^1_{n_1 m} ∂c_{n_2}/∂z^{p,2}_m that (9) gives, only
    m = n_2 is non-zero). The seed prints Σ_{n_l=1}^{N_2} w^1_{n_1 n_l} ∂c_{n_2}/∂z^{p,2}_{n_2},
    summing the weights but not the δ: ``literal=True`` computes that. Then (14)'s second
    and third lines, and the output layer's gradient taken directly."""
    f, fp = F[act]
    z, a = s004_forward(W, X, f)
    h = a[2]
    big_p, big_q = X.shape
    n1, n2 = W[0].shape[1], W[1].shape[1]
    dz1 = np.zeros((big_p, n2, n1))  # ∂c^p_{n_2}/∂z^{p,1}_{n_1}
    for p, k, j in itertools.product(range(big_p), range(n2), range(n1)):
        weight = sum(W[1][1 + j, m] for m in range(n2)) if literal else W[1][1 + j, k]
        dz1[p, k, j] = fp(z[1][p, j]) * weight * (Y[p, k] - h[p, k])
    g0, g1 = np.empty_like(W[0]), np.empty_like(W[1])
    for j in range(n1):
        g0[0, j] = sum(dz1[p, k, j] for p in range(big_p) for k in range(n2))
        for q in range(1, big_q + 1):
            g0[q, j] = sum(X[p, q - 1] * sum(dz1[p, k, j] for k in range(n2)) for p in range(big_p))
    for k in range(n2):
        g1[0, k] = sum(Y[p, k] - h[p, k] for p in range(big_p))
        for j in range(n1):
            g1[1 + j, k] = sum(a[1][p, j] * (Y[p, k] - h[p, k]) for p in range(big_p))
    return [g0, g1]


def s004_equation_15(W: list, X: np.ndarray, Y: np.ndarray, *, upper: int | None = None) -> list:
    """(15), the 2-2-1 sigmoid network: ∂C/∂w^0_{0n_1} = w^1_{n_1} Σ_p a^{p,1}_{n_1}
    (1 − a^{p,1}_{n_1})(y^p − h^p), ∂C/∂w^0_{qn_1} = w^1_{n_1} Σ_p x^p_q a(1 − a)(y^p − h^p);
    the output weights ("v") directly: Σ_p (y^p − h^p) and Σ_p a^{p,1}_{n_1}(y^p − h^p).
    The seed's sum runs p = 1..2; ``upper=None`` runs it over all P points."""
    _, a = s004_forward(W, X, _sigmoid)
    h, y = a[2][:, 0], Y[:, 0]
    ps = range(len(X) if upper is None else upper)
    g0, g1 = np.empty_like(W[0]), np.empty_like(W[1])
    for n1 in (1, 2):
        w1 = W[1][n1, 0]  # w^1_{n_1}: hidden node n_1 to the single output
        g0[0, n1 - 1] = w1 * sum(
            a[1][p, n1 - 1] * (1 - a[1][p, n1 - 1]) * (y[p] - h[p]) for p in ps
        )
        for q in (1, 2):
            g0[q, n1 - 1] = w1 * sum(
                X[p, q - 1] * a[1][p, n1 - 1] * (1 - a[1][p, n1 - 1]) * (y[p] - h[p]) for p in ps
            )
        g1[n1, 0] = sum(a[1][p, n1 - 1] * (y[p] - h[p]) for p in ps)
    g1[0, 0] = sum(y[p] - h[p] for p in ps)
    return [g0, g1]


def s004_nets(sizes: tuple, act: str) -> dict:
    last = len(sizes) - 2
    with_b = [
        jbp.Dense(sizes[i], sizes[i + 1], act if i < last else "identity")
        for i in range(len(sizes) - 1)
    ]
    with_w0 = []
    for i in range(len(sizes) - 1):
        with_w0 += [
            PrependOne(sizes[i]),
            jbp.Dense(sizes[i] + 1, sizes[i + 1], act if i < last else "identity", bias=False),
        ]
    unfused = [*with_b[:-1], jbp.Dense(sizes[-2], sizes[-1], "sigmoid")]
    return {
        "bias": (jbp.Sequential(with_b), "sigmoid_bce"),
        "w0": (jbp.Sequential(with_w0), "sigmoid_bce"),
        "unfused": (jbp.Sequential(unfused), NEG_LOG_LIKELIHOOD),
    }


def s004_to_jbp(kind: str, W: list, sign: float = 1.0) -> tuple:
    if kind == "w0":
        return tuple(item for g in W for item in ({}, {"w": sign * g}))
    return tuple({"w": sign * g[1:], "b": sign * g[0]} for g in W)


def s004_draw(rng: np.random.Generator, sizes: tuple, big_p: int) -> tuple:
    W = [rng.normal(size=(sizes[l] + 1, sizes[l + 1])) for l in range(len(sizes) - 1)]
    X = rng.normal(size=(big_p, sizes[0]))
    return W, X, rng.integers(0, 2, size=(big_p, sizes[-1])).astype(float)


def _agree_004(seed_dC: list, sizes: tuple, act: str, W: list, X, Y, what: str) -> None:
    """∂C/∂w (seed, log-likelihood) = −jbp's gradient, for all three jbp encodings."""
    for kind, (net, loss) in s004_nets(sizes, act).items():
        _agree(
            s004_to_jbp(kind, seed_dC, -1.0),
            net,
            loss,
            _tree(s004_to_jbp(kind, W)),
            X,
            Y,
            f"{what}, jbp {kind}",
        )


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
@pytest.mark.parametrize("draw", DRAWS)
def test_004_general_equations_9_to_13(draw, act):
    sizes = (3, 4, 3, 2)  # N_0 = Q = 3 inputs, two hidden layers, N_L = 2 output nodes
    W, X, Y = s004_draw(_rng(4, draw), sizes, big_p=5)
    _agree_004(s004_equations_9_13(W, X, Y, act), sizes, act, W, X, Y, "004 (9)-(13)")
    net, loss = s004_nets(sizes, act)["bias"]
    c = jbp.objective(net, loss)(_tree(s004_to_jbp("bias", W)), jnp.asarray(X), jnp.asarray(Y))
    assert -float(c) == pytest.approx(s004_log_likelihood(W, X, Y, F[act][0]), rel=1e-13)


@pytest.mark.parametrize("draw", DRAWS)
def test_004_one_output_11_two_layers_14_and_221_closed_form_15(draw):
    sizes = (3, 4, 1)
    W, X, Y = s004_draw(_rng(4, 60 + draw), sizes, big_p=5)
    _agree_004(s004_equation_11(W, X, Y, "tanh"), sizes, "tanh", W, X, Y, "004 (11)")
    sizes = (2, 3, 2)
    W, X, Y = s004_draw(_rng(4, 10 + draw), sizes, big_p=4)
    _agree_004(s004_equation_14(W, X, Y, "tanh"), sizes, "tanh", W, X, Y, "004 (14)")
    sizes = (2, 2, 1)
    W, X, Y = s004_draw(_rng(4, 20 + draw), sizes, big_p=4)
    g15 = s004_equation_15(W, X, Y)
    _agree_004(g15, sizes, "sigmoid", W, X, Y, "004 (15)")
    for g, h in zip(g15, s004_equations_9_13(W, X, Y, "sigmoid"), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("draw", DRAWS)
def test_004_bias_as_w0_equals_separate_bias(draw):
    """The forward pass and gradient with a_0 = 1 and one matrix equal those with w and b:
    in the seed's numbers, and in jbp (PrependOne + Dense(bias=False) vs Dense with bias)."""
    sizes = (3, 4, 2)
    W, X, Y = s004_draw(_rng(4, 30 + draw), sizes, big_p=6)
    z_w0, _ = s004_forward(W, X, np.tanh, bias_as_w0=True)
    z_b, _ = s004_forward(W, X, np.tanh, bias_as_w0=False)
    for l in z_w0:
        np.testing.assert_allclose(z_w0[l], z_b[l], rtol=1e-13, atol=1e-15)
    nets = s004_nets(sizes, "tanh")
    x, y = jnp.asarray(X), jnp.asarray(Y)
    g_w0 = _grad_fns(*nets["w0"])[0](_tree(s004_to_jbp("w0", W)), x, y)
    g_b = _grad_fns(*nets["bias"])[0](_tree(s004_to_jbp("bias", W)), x, y)
    for l in range(len(W)):
        np.testing.assert_allclose(g_w0[2 * l + 1]["w"][0], g_b[l]["b"], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(g_w0[2 * l + 1]["w"][1:], g_b[l]["w"], rtol=1e-13, atol=1e-15)
    report = jbp.verify(
        nets["w0"][0], "sigmoid_bce", _tree(s004_to_jbp("w0", W)), x, y, finite_differences=True
    )
    assert report.ok, str(report)


def test_004_gradient_ascent_on_the_log_likelihood():
    """w ← w + α ∂C/∂w with (15) on XOR, beside jbp's descent on sigmoid_bce (= −C)."""
    alpha = 0.5
    X = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    Y = np.array([[0.0], [1.0], [1.0], [0.0]])
    W, _, _ = s004_draw(_rng(4, 40), (2, 2, 1), big_p=4)
    nets = s004_nets((2, 2, 1), "sigmoid")
    params = {kind: _tree(s004_to_jbp(kind, W)) for kind in nets}
    fns = {kind: _grad_fns(*nets[kind])[0] for kind in nets}
    likelihood = [s004_log_likelihood(W, X, Y, _sigmoid)]
    for _ in range(10):
        W = [w + alpha * g for w, g in zip(W, s004_equation_15(W, X, Y), strict=True)]
        likelihood.append(s004_log_likelihood(W, X, Y, _sigmoid))
        for kind in nets:
            params[kind] = _descend(params[kind], fns[kind](params[kind], X, Y), alpha)
            assert jbp.compare(params[kind], s004_to_jbp(kind, W), rtol=1e-12).ok, kind
    assert likelihood[-1] > likelihood[0]  # ascent: the log-likelihood goes up


def test_004_misreadings_fail():
    """(15)'s Σ_{p=1}^{2} taken literally uses two of the P = 4 points; (14)'s sum taken
    literally adds up the weights to every output node but keeps one node's δ; and reading
    c as a cost to minimise (descending its gradient) flips every sign."""
    W, X, Y = s004_draw(_rng(4, 50), (2, 2, 1), big_p=4)
    right = s004_equation_15(W, X, Y)
    _assert_disagree(s004_equation_15(W, X, Y, upper=2), right, "(15) with p = 1..2")
    W2, X2, Y2 = s004_draw(_rng(4, 51), (2, 3, 2), big_p=4)
    _assert_disagree(
        s004_equation_14(W2, X2, Y2, "tanh", literal=True),
        s004_equation_14(W2, X2, Y2, "tanh"),
        "(14) as printed",
    )
    net, loss = s004_nets((2, 2, 1), "sigmoid")["bias"]
    g = _grad_fns(net, loss)[0](_tree(s004_to_jbp("bias", W)), X, Y)
    _assert_disagree(g, s004_to_jbp("bias", right), "∂C/∂w of the log-likelihood as jbp's")
