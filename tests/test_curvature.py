"""Curvature by the δ rules against autodiff: loss Hessian square roots, GGN diagonals
(exact, MC, per example), square-root columns, GGN-vector products, Kronecker
factors and Hessian diagonals; the MC estimates' statistics; mutants caught.

References (jbp._verify_curvature) come from ``jax.jacfwd`` of the network output,
``jax.hessian`` of each example's loss and ``jax.hessian`` of the objective.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jbp
from jbp import _curvature
from jbp._losses import get_loss
from jbp._verify_curvature import _check_kfac, flat, reference_ggn
from jbp.layers._base import Context

F64 = jnp.float64


def _examples(n: int) -> int:
    return max(1, round(n * settings.default.max_examples / 25))


def _targets(loss: str, shape: tuple[int, ...], rng: np.random.Generator) -> jax.Array:
    if loss == "softmax_xent":
        return jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]))
    if loss == "sigmoid_bce":
        return jnp.asarray(rng.uniform(size=shape))
    return jnp.asarray(rng.normal(size=shape))


# --- the loss Hessian's square roots -------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
@pytest.mark.parametrize("name", ["half_sse", "mse", "sigmoid_bce", "softmax_xent"])
def test_loss_square_root_and_hessian_product_match_jax_hessian(name: str, shape: Any) -> None:
    rng = np.random.default_rng(0)
    loss = get_loss(name)
    a = jnp.asarray(rng.normal(size=shape))
    y = _targets(name, shape, rng)
    u = jnp.asarray(rng.normal(size=shape))
    k = int(np.prod(shape[1:]))

    @jax.jit  # one program: the rules and every example's jax.hessian
    def run(a: jax.Array, y: jax.Array, u: jax.Array) -> Any:
        hessians = [
            jax.hessian(lambda ai, i=i: loss.per_example(ai[None], y[i : i + 1])[0])(a[i])
            for i in range(shape[0])
        ]
        return loss.sqrt_hessian(a, y), loss.hessian_vp(a, y, u), hessians

    roots, products, hessians = jax.device_get(run(a, y, u))
    assert roots.shape[1:] == shape
    for i in range(shape[0]):
        hess = hessians[i].reshape(k, k)
        s = roots[:, i].reshape(-1, k)
        np.testing.assert_allclose(s.T @ s, hess, atol=1e-14)
        np.testing.assert_allclose(products[i].reshape(k), hess @ u[i].reshape(k), atol=1e-14)


def test_softmax_square_root_is_not_symmetric_so_a_transpose_is_a_bug() -> None:
    """The precondition of the transpose mutant below: S ≠ Sᵀ per position."""
    a = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4)))
    s = get_loss("softmax_xent").sqrt_hessian(a, jnp.zeros((1,), jnp.int32))[:, 0]
    assert float(jnp.max(jnp.abs(s - s.T))) > 1e-2


# --- every quantity against autodiff, over the architecture families -----------------


@settings(max_examples=_examples(5))
@given(
    arch=st.sampled_from(["mlp", "cnn", "resnet", "transformer"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_curvature_matches_autodiff_on_random_architectures(arch: str, seed: int) -> None:
    problem = jbp.random_problem(
        np.random.default_rng(seed), dtype=F64, arch=arch, max_depth=2, max_width=6
    )
    report = jbp.check_curvature(problem.net, problem.loss, problem.params, problem.x, problem.y)
    assert report.passed, report.format()
    assert {"diag_ggn", "per_example_diag_ggn", "sqrt_ggn"} <= {r.quantity for r in report.rows}


@pytest.mark.parametrize(
    "acts,loss",
    [
        (("tanh", "sigmoid", "gelu_tanh", "identity"), "softmax_xent"),
        (("silu", "gelu", "elu", "softplus"), "half_sse"),
        (("relu", "sin", "leaky_relu", "tanh"), "sigmoid_bce"),
    ],
)
def test_diag_hessian_matches_jax_hessian_with_residual_terms(acts: Any, loss: str) -> None:
    rng = np.random.default_rng(2)
    net = jbp.Sequential(
        [
            jbp.Dense(3, 5, acts[0]),
            jbp.Activation(acts[1]),
            jbp.Dense(5, 4, acts[2], bias=False),
            jbp.Sequential([jbp.Activation(acts[3]), jbp.Dense(4, 3)]),
        ]
    )
    params = net.init(jax.random.key(1), F64)
    x = jnp.asarray(rng.normal(size=(6, 3)))
    y = _targets(loss, (6, 3), rng)
    report = jbp.check_curvature(net, loss, params, x, y)
    assert report.passed, report.format()
    assert "diag_hessian" in {r.quantity for r in report.rows}
    # smooth activations: the Hessian is not the GGN (the residual terms matter)
    ggn, hess = jax.jit(
        lambda p: (
            flat(jbp.diag_ggn(net, loss)(p, x, y)),
            flat(jbp.diag_hessian(net, loss)(p, x, y)),
        )
    )(params)
    assert float(np.max(np.abs(np.asarray(ggn) - np.asarray(hess)))) > 1e-6


def test_quantities_compose_with_jit_and_take_keys_as_arguments() -> None:
    net = jbp.mlp([4, 6, 3], "tanh")
    params = net.init(jax.random.key(0), F64)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)))
    y = jnp.asarray([0, 1, 2, 1, 0])
    fn = jax.jit(jbp.diag_ggn(net, "softmax_xent", mc_samples=2))
    a = fn(params, x, y, key=jax.random.key(1))
    b = fn(params, x, y, key=jax.random.key(2))
    assert not np.allclose(flat(a), flat(b))  # fresh samples per key
    np.testing.assert_array_equal(flat(a), flat(fn(params, x, y, key=jax.random.key(1))))


# --- Kronecker factors -----------------------------------------------------------------


def _index_tree(params: Any) -> Any:
    vector, unravel = jax.flatten_util.ravel_pytree(params)
    return unravel(jnp.arange(vector.size, dtype=vector.dtype))


def _block(ggn: jax.Array, idx: jax.Array) -> jax.Array:
    idx = jnp.asarray(idx, jnp.int32).ravel()
    return ggn[idx][:, idx]


def _kflr_block_errors(net: Any, loss: str, params: Any, x: Any, y: Any) -> list[float]:
    """For every layer ``i`` of ``net`` with a ``w``/``b`` pair (one output position,
    batch 1), the error of ``A ⊗ G`` against the exact GGN block of ``[w; b]``, per group."""
    ref = reference_ggn(net, loss, params, x, y)
    factors = jax.jit(jbp.kfac(net, loss, kind="kflr"))(params, x, y)
    index = _index_tree(params)
    errors = []
    for i, layer_factors in enumerate(factors):
        if "w" not in layer_factors:
            continue
        kf = layer_factors["w"]
        w_idx, b_idx = index[i]["w"], index[i]["b"]
        out = w_idx.shape[-1]
        groups = 1 if kf.a.ndim == 2 else kf.a.shape[0]
        rows = w_idx.reshape(-1, groups, out // groups)
        cols = b_idx.reshape(groups, out // groups)
        for g in range(groups):
            idx = jnp.concatenate([rows[:, g], cols[g][None]], axis=0)
            a, gg = (kf.a, kf.g) if groups == 1 else (kf.a[g], kf.g[g])
            kron = jnp.kron(a, gg)
            want = _block(ref.ggn, idx)
            err = float("inf") if kron.shape != want.shape else float(jnp.max(jnp.abs(kron - want)))
            errors.append(err / float(jnp.max(jnp.abs(want))))
    return errors


def _kfac_cases() -> list[tuple[str, Any, Any, str]]:
    rng = np.random.default_rng(4)
    dense = jbp.Sequential([jbp.Dense(3, 4, "tanh"), jbp.Dense(4, 3)])
    conv = jbp.Sequential(
        [jbp.Conv(2, 4, (3, 3), "tanh", padding="VALID"), jbp.Flatten(), jbp.Dense(4, 3)]
    )
    grouped = jbp.Sequential(
        [jbp.Conv(4, 6, (2, 2), "sigmoid", padding="VALID", groups=2), jbp.Flatten()]
    )
    return [
        ("dense", dense, jnp.asarray(rng.normal(size=(1, 3))), "softmax_xent"),
        ("conv", conv, jnp.asarray(rng.normal(size=(1, 3, 3, 2))), "sigmoid_bce"),
        ("grouped conv", grouped, jnp.asarray(rng.normal(size=(1, 2, 2, 4))), "half_sse"),
    ]


@pytest.mark.parametrize("case", _kfac_cases(), ids=lambda c: c[0])
def test_kflr_is_the_exact_ggn_block_for_one_example_at_one_position(case: Any) -> None:
    _, net, x, loss = case
    params = net.init(jax.random.key(5), F64)
    out_shape = net.output_shape(x.shape[1:])
    y = _targets(loss, (1, *out_shape), np.random.default_rng(6))
    errors = _kflr_block_errors(net, loss, params, x, y)
    assert errors and max(errors) < 1e-12, errors


def test_kfac_factors_match_their_definitions_on_a_batch() -> None:
    """A = mean x̃ x̃ᵀ of the first layer's input; G = the GGN block of the bias (one
    position per example: Σ_c s sᵀ summed over the batch is exactly that block)."""
    rng = np.random.default_rng(7)
    net = jbp.Sequential([jbp.Dense(3, 4, "tanh"), jbp.Dense(4, 3, "sigmoid")])
    params = net.init(jax.random.key(8), F64)
    x = jnp.asarray(rng.normal(size=(6, 3)))
    y = jnp.asarray(rng.integers(0, 3, size=6))
    factors = jax.jit(jbp.kfac(net, "softmax_xent", kind="kflr"))(params, x, y)
    ref = reference_ggn(net, "softmax_xent", params, x, y)
    index = _index_tree(params)
    x1 = np.concatenate([np.asarray(x), np.ones((6, 1))], axis=1)
    np.testing.assert_allclose(factors[0]["w"].a, x1.T @ x1 / 6, rtol=1e-13)
    for i in (0, 1):
        np.testing.assert_allclose(factors[i]["w"].g, _block(ref.ggn, index[i]["b"]), atol=1e-15)
    # MC factors (kind="kfac") average to the exact ones: G is linear in the sampled s sᵀ
    mc = jax.jit(jbp.kfac(net, "softmax_xent", mc_samples=4000))(
        params, x, y, key=jax.random.key(9)
    )
    np.testing.assert_allclose(mc[1]["w"].g, factors[1]["w"].g, atol=0.02)
    np.testing.assert_array_equal(mc[0]["w"].a, factors[0]["w"].a)


def test_kfac_covers_attention_projections_and_leaves_other_leaves_out() -> None:
    net = jbp.transformer(vocab=5, length=4, features=4, heads=2, depth=1)
    params = net.init(jax.random.key(0), F64)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 5, size=(2, 4)))
    factors = jax.jit(jbp.kfac(net, "softmax_xent", kind="kflr"))(params, tokens, tokens)
    attention = factors[2][1]  # Residual(Sequential([LayerNorm, MultiHeadAttention]))
    assert set(attention) == {"wq", "wk", "wv", "wo"}
    assert attention["wq"].a.shape == (5, 5) and attention["wq"].g.shape == (4, 4)
    assert factors[0] == {} and factors[1] == {}  # embedding tables: no Kronecker form
    assert factors[2][0] == {}  # LayerNorm: elementwise leaves
    assert factors[3][2]["w"].a.shape == (17, 17)  # Dense(16 → 4) with its bias


# --- Monte-Carlo: unbiased, error falling like 1/√M --------------------------------------


def test_mc_diag_ggn_is_unbiased_and_its_error_falls_like_one_over_sqrt_m() -> None:
    """Seeded, so deterministic. An MC estimate with M columns is the mean of M
    independent one-column estimates, so its error's RMS over keys is exactly
    RMS(M=1)/√M in distribution. With R = 64 keys each RMS is known to about
    1/√(2R) ≈ 9%: we require the ratio RMS(1)/RMS(16) in [4·0.7, 4·1.3] (≥ 3σ) and
    the mean of the 64·16 one-column draws within 5 standard errors of the exact
    diagonal at every entry."""
    rng = np.random.default_rng(10)
    net = jbp.mlp([3, 5, 4], "tanh")
    params = net.init(jax.random.key(11), F64)
    x = jnp.asarray(rng.normal(size=(8, 3)))
    y = jnp.asarray(rng.integers(0, 4, size=8))
    keys = jax.random.split(jax.random.key(12), 64)

    @jax.jit
    def run(params: Any, keys: jax.Array) -> dict[str, Any]:
        def draws(m: int) -> jax.Array:
            fn = jbp.diag_ggn(net, "softmax_xent", mc_samples=m)
            return jax.vmap(lambda k: flat(fn(params, x, y, key=k)))(keys)

        mc3 = jbp.diag_ggn(net, "softmax_xent", mc_samples=3)
        per_example = jbp.per_example_diag_ggn(net, "softmax_xent", mc_samples=3)
        return {
            "exact": flat(jbp.diag_ggn(net, "softmax_xent")(params, x, y)),
            "one": draws(1),
            "sixteen": draws(16),
            # per example: the same estimator, before the batch sum
            "per_example": per_example(params, x, y, key=keys[0]),
            "mc3": flat(mc3(params, x, y, key=keys[0])),
        }

    got = jax.device_get(run(params, keys))
    exact, one, sixteen = got["exact"], got["one"], got["sixteen"]
    rms = [float(np.sqrt(np.mean(np.sum((d - exact[None]) ** 2, axis=1)))) for d in (one, sixteen)]
    assert 4 * 0.7 < rms[0] / rms[1] < 4 * 1.3, rms
    mean = np.mean(sixteen, axis=0)  # the mean of 1024 one-column draws
    stderr = np.std(one, axis=0) / np.sqrt(64 * 16)
    assert bool(np.all(np.abs(mean - exact) <= 5 * stderr + 1e-12))
    summed = jtu.tree_map(lambda leaf: np.sum(leaf, axis=0) / 8, got["per_example"])
    summed = np.concatenate([np.ravel(v) for v in jtu.tree_leaves(summed)])  # flat's order
    np.testing.assert_allclose(summed, got["mc3"], rtol=1e-12)


# --- mutants: each caught ---------------------------------------------------------------


def test_mutant_transposed_loss_square_root_is_caught() -> None:
    softmax = get_loss("softmax_xent")

    def transposed(a: jax.Array, y: jax.Array) -> jax.Array:
        s = softmax.sqrt_hessian(a, y)  # (classes, batch, classes) for (batch, classes)
        return jnp.swapaxes(s, 0, 2)

    mutant = dataclasses.replace(softmax, name="softmax_xent_mutant", sqrt_hessian=transposed)
    rng = np.random.default_rng(13)
    net = jbp.mlp([3, 4, 4], "tanh")
    params = net.init(jax.random.key(14), F64)
    x = jnp.asarray(rng.normal(size=(4, 3)))
    y = jnp.asarray(rng.integers(0, 4, size=4))
    good = jbp.check_curvature(net, softmax, params, x, y)
    assert good.ok and good.passed and good.raise_if_failed() is good
    assert good.skipped == (
        "kfac (exact only for one example at one position: K-FAC approximates the GGN block "
        "otherwise; here 4 examples)",
    )
    report = jbp.check_curvature(net, mutant, params, x, y)
    failed = {r.quantity for r in report.rows if not r.passed}
    assert {"diag_ggn", "per_example_diag_ggn", "sqrt_ggn"} <= failed, report.format()
    # the one report API: ok, raise_if_failed(), format()/str, rows, to_json()
    assert not report.ok and report.worst == report.max_rel_err > 1e-3
    with pytest.raises(jbp.GradientMismatch) as raised:  # one except catches both kinds
        report.raise_if_failed()
    assert raised.value.report is report and str(raised.value) == str(report) == report.format()
    lines = report.format().splitlines()
    assert re.fullmatch(
        r"curvature check: MISMATCH: 5 quantities, worst rel err \d\.\d\de[-+]\d\d "
        r"\(tolerance 1e-09\); dtype float64, matmul precision highest, backend cpu",
        lines[0],
    ), lines[0]
    assert [line.split()[0] for line in lines[1:6]] == [r.quantity for r in report.rows]
    assert lines[6:] == [f"skipped: {good.skipped[0]}"]
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["ok"] is False and data["dtype"] == "float64" and data["precision"] == "highest"
    assert [(r["quantity"], r["ok"]) for r in data["rows"]] == [
        (r.quantity, r.ok) for r in report.rows
    ]
    assert data["skipped"] == list(good.skipped) and data["notes"] == []


def test_mutant_bias_column_dropped_from_a_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    _, net, x, loss = _kfac_cases()[0]
    params = net.init(jax.random.key(5), F64)
    y = _targets(loss, (1, 3), np.random.default_rng(6))
    assert max(_kflr_block_errors(net, loss, params, x, y)) < 1e-12
    kronecker = _curvature._kronecker
    monkeypatch.setattr(
        _curvature, "_kronecker", lambda f, bias, scale, mask: kronecker(f, False, scale, mask)
    )
    assert min(_kflr_block_errors(net, loss, params, x, y)) > 1e-3


def test_check_curvature_compares_kflr_with_the_ggn_blocks_where_kfac_is_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One example: the Dense leaves (one position) are compared, the Conv's (four
    positions) named as not compared; a G off by 1e-6 and factors of the wrong shape or
    missing fail the row; with no leaf at one position the quantity is skipped. (The row
    inside check_curvature's report: the f'' mutant's test below.)"""
    rng = np.random.default_rng(19)
    conv = jbp.Conv(2, 3, (2, 2), "tanh", padding="VALID")  # 3×3 → 2×2: four positions
    net = jbp.Sequential(
        [conv, jbp.Flatten(), jbp.Dense(12, 4, "sigmoid"), jbp.Dense(4, 3, bias=False)]
    )
    params = net.init(jax.random.key(20), F64)
    x = jnp.asarray(rng.normal(size=(1, 3, 3, 2)))
    y = jnp.asarray([2])
    ggn = reference_ggn(net, "softmax_xent", params, x, y).ggn
    loss = get_loss("softmax_xent")
    (row,), skipped, notes = _check_kfac(net, loss, params, x, y, ggn, 1e-9)
    assert row.ok and row.note == "kind='kflr': a ⊗ g against G's block of 2 leaves at one position"
    assert skipped == [] and notes == [
        "kfac: params[0]['w'] not compared (4 positions per example: K-FAC approximates its "
        "GGN block)"
    ]
    assert f"note: {notes[0]}" in str(jbp.CurvatureReport((row,), notes=tuple(notes))).splitlines()
    kronecker = _curvature._kronecker

    def scaled(f: Any, bias: bool, scale: float, mask: Any) -> Any:
        k = kronecker(f, bias, scale, mask)
        return k._replace(g=k.g * (1 + 1e-6))

    monkeypatch.setattr(_curvature, "_kronecker", scaled)
    (bad,), _, _ = _check_kfac(net, loss, params, x, y, ggn, 1e-9)
    assert not bad.ok and 0.9e-6 < bad.error < 1.1e-6, bad  # the tolerance is meaningful
    monkeypatch.setattr(_curvature, "_kronecker", kronecker)

    kfac = _curvature.kfac

    def broken(*args: Any, **kwargs: Any) -> Any:
        fn = kfac(*args, **kwargs)

        def run(*a: Any, **k: Any) -> Any:
            factors = fn(*a, **k)
            w = factors[2]["w"]
            factors[2]["w"] = w._replace(a=w.a[:-1, :-1])  # the bias's row and column dropped
            del factors[3]["w"]
            return factors

        return run

    monkeypatch.setattr(_curvature, "kfac", broken)
    (row,), _, _ = _check_kfac(net, loss, params, x, y, ggn, 1e-9)
    assert row.error == float("inf") and not row.ok
    assert row.note == (
        "params[2]['w']: a (12, 12), g (4, 4) do not factor the block of a leaf (12, 4) and "
        "its bias params[2]['b']; params[3]['w'] has no KroneckerFactors"
    )
    bad = jbp.CurvatureReport((row,))
    assert json.loads(json.dumps(bad.to_json(), allow_nan=False))["rows"][0]["error"] == "inf"
    assert bad.format().splitlines()[1].endswith(f"MISMATCH ({row.note})")

    only_conv = jbp.Sequential([conv, jbp.Flatten()])
    conv_params = only_conv.init(jax.random.key(21), F64)
    y12 = jnp.asarray(rng.normal(size=(1, 12)))
    got = _check_kfac(only_conv, get_loss("half_sse"), conv_params, x, y12, ggn, 1e-9)
    assert got == (
        [],
        [
            "kfac (exact only for one example at one position: K-FAC approximates the GGN "
            "block otherwise; here no Kronecker-factored leaf is at one position)"
        ],
        [
            "kfac: params[0]['w'] not compared (4 positions per example: K-FAC approximates "
            "its GGN block)"
        ],
    )


def test_mutant_second_derivative_replaced_by_first_is_caught() -> None:
    tanh = jbp.register_activation(
        "tanh_f2_mutant",
        jnp.tanh,
        lambda z, out: 1 - out * out,
        second_derivative=lambda z, out: 1 - out * out,  # f' in place of f''
    )
    rng = np.random.default_rng(15)
    net = jbp.Sequential([jbp.Dense(3, 4, tanh.name), jbp.Dense(4, 2)])
    params = net.init(jax.random.key(16), F64)
    x = jnp.asarray(rng.normal(size=(1, 3)))  # one example: kfac is checked too, and passes
    y = jnp.asarray(rng.normal(size=(1, 2)))
    report = jbp.check_curvature(net, "half_sse", params, x, y)
    assert {r.quantity for r in report.rows if not r.passed} == {"diag_hessian"}, report.format()
    assert "kfac" in {r.quantity for r in report.rows} and report.skipped == report.notes == ()


# --- bounded memory: columns by chunks ---------------------------------------------------


def _max_diff(got: Any, want: Any) -> float:
    """The largest difference over every leaf, relative to the largest |value| of all."""
    assert jtu.tree_structure(got) == jtu.tree_structure(want)
    pairs = list(zip(jtu.tree_leaves(got), jtu.tree_leaves(want), strict=True))
    scale = max(float(np.max(np.abs(w))) for _, w in pairs)
    return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in pairs) / scale


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_loss_columns_made_by_chunks_are_the_loss_square_root(shape: Any) -> None:
    """The columns that curvature makes a chunk at a time from each built-in loss's
    structure (softmax: per-position V×V blocks; the others: diagonal) are the loss's own
    dense ``sqrt_hessian``, labels -1 and a padding mask included; a partial chunk is
    padded with zero columns."""
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=shape))
    mask = jnp.asarray([[True, True, False], [True, False, False]]) if len(shape) == 3 else None
    names = ("half_sse", "mse", "sigmoid_bce", "softmax_xent")
    ys = {name: _targets(name, shape, rng) for name in names}
    ys["softmax_xent"] = ys["softmax_xent"].at[(0, 0)[: len(shape) - 1]].set(-1)

    @jax.jit  # one program: every loss's columns, by chunks of 5 and dense
    def run(a: jax.Array, ys: Any, mask: Any) -> Any:
        out = {}
        for name in names:
            loss = get_loss(name)
            batch = jbp._backprop.Batch(a, ys[name], Context(mask), loss.with_mask(mask))
            source = _curvature._source(loss, batch, a, None, None)
            assert source.total == int(np.prod(shape[1:]))
            chunks = [source.make(jnp.arange(i, i + 5)) for i in range(0, source.total, 5)]
            out[name] = jnp.concatenate(chunks), loss.with_mask(mask).sqrt_hessian(a, ys[name])
        return out

    for name, (made, dense) in jax.device_get(run(a, ys, mask)).items():
        k = dense.shape[0]
        np.testing.assert_allclose(made[:k], dense, rtol=1e-15, atol=0, err_msg=name)
        assert made.shape[0] > k and not made[k:].any(), name


def test_exact_curvature_by_chunks_of_columns_equals_all_at_once() -> None:
    """diag_ggn, per_example_diag_ggn, sqrt_ggn and kflr with ``chunk_size`` (8, which
    divides the T·V = 4·6 = 24 columns of a sequence softmax loss, and 5, which does not)
    against all columns at once, on a padded batch, float64, in one program (gather,
    elementwise and many-position outer factors)."""
    net = jbp.Sequential([jbp.Embedding(6, 4), jbp.LayerNorm(4), jbp.Dense(4, 6)])
    params = net.init(jax.random.key(0), F64)
    x = jax.random.randint(jax.random.key(1), (3, 4), 0, 6)
    y = jax.random.randint(jax.random.key(2), (3, 4), 0, 6).at[0, 3].set(-1)
    mask = jnp.asarray([[1] * 4, [1] * 2 + [0] * 2, [1] * 4], bool)
    loss = "softmax_xent"
    makers = {
        "diag_ggn": lambda **k: jbp.diag_ggn(net, loss, **k),
        "per_example_diag_ggn": lambda **k: jbp.per_example_diag_ggn(net, loss, **k),
        "sqrt_ggn": lambda **k: jbp.sqrt_ggn(net, loss, **k),
        "kflr": lambda **k: jbp.kfac(net, loss, kind="kflr", **k),
    }
    sizes = {"diag_ggn": (8, 5), "per_example_diag_ggn": (5,), "sqrt_ggn": (5,), "kflr": (5,)}

    @jax.jit
    def run(params: Any, x: Any, y: Any, mask: Any) -> Any:
        return {
            (name, str(k)): make(chunk_size=k)(params, x, y, mask=mask)
            for name, make in makers.items()
            for k in (None, *sizes[name])
        }

    got = jax.device_get(run(params, x, y, mask))
    for name in makers:
        for k in sizes[name]:
            assert _max_diff(got[name, str(k)], got[name, "None"]) < 1e-13, (name, k)
    # sqrt_ggn's chunked columns square to diag_ggn's values
    squares = jtu.tree_map(lambda s: np.sum(s * s, axis=(0, 1)), got["sqrt_ggn", "5"])
    assert _max_diff(squares, got["diag_ggn", "5"]) < 1e-13
    assert got["sqrt_ggn", "5"][2]["w"].shape == (24, 3, 4, 6)


def test_chunks_for_diagonal_losses_user_losses_and_the_hessian_diagonal() -> None:
    """Every other kind of column source by chunks equals all at once: a diagonal loss
    (mse on a padded sequence output), a user loss's dense sqrt_hessian (as Monte-Carlo
    columns are), and diag_hessian's loss columns (4) and residual columns (2·5 from the
    tanh above the second weight matrix), in chunks of 3, which divide neither."""
    rng = np.random.default_rng(7)
    seq = jbp.Sequential([jbp.Dense(3, 4, "tanh"), jbp.Dense(4, 2)], in_shape=(None, 3))
    chain = jbp.Sequential(
        [
            jbp.Dense(3, 4, "tanh"),
            jbp.Activation("sigmoid"),
            jbp.Dense(4, 5, "tanh"),
            jbp.Dense(5, 4),
        ]
    )
    p_seq, p_chain = seq.init(jax.random.key(8), F64), chain.init(jax.random.key(9), F64)
    xs, ys = jnp.asarray(rng.normal(size=(2, 3, 3))), jnp.asarray(rng.normal(size=(2, 3, 2)))
    mask = jnp.asarray([[True, True, True], [True, False, False]])
    xc, yc = jnp.asarray(rng.normal(size=(3, 3))), jnp.asarray(rng.integers(0, 4, size=3))
    targets = jnp.asarray(rng.normal(size=(3, 4)))
    sse = get_loss("half_sse")
    user = jbp.Loss("user_sse", sse.per_example, sse.delta, "sum", sqrt_hessian=sse.sqrt_hessian)

    @jax.jit
    def run(p_seq: Any, p_chain: Any) -> Any:
        out = {}
        for k in (None, 4):
            out["mse", str(k)] = jbp.diag_ggn(seq, "mse", chunk_size=k)(p_seq, xs, ys, mask=mask)
            out["user", str(k)] = jbp.per_example_diag_ggn(chain, user, chunk_size=k)(
                p_chain, xc, targets
            )
        for k in (None, 3):
            out["hessian", str(k)] = jbp.diag_hessian(chain, "softmax_xent", chunk_size=k)(
                p_chain, xc, yc
            )
        return out

    got = jax.device_get(run(p_seq, p_chain))
    for name, k in (("mse", 4), ("user", 4), ("hessian", 3)):
        assert _max_diff(got[name, str(k)], got[name, "None"]) < 1e-13, name


# --- clear errors -----------------------------------------------------------------------


def _small() -> tuple[Any, Any, jax.Array, jax.Array]:
    net = jbp.mlp([3, 4, 2], "tanh")
    params = net.init(jax.random.key(0), F64)
    return net, params, jnp.ones((2, 3), F64), jnp.zeros((2, 2), F64)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda net: jbp.diag_ggn(net, "half_sse", mc_samples=0), r"`mc_samples` must be None"),
        (lambda net: jbp.sqrt_ggn(net, "half_sse", mc_samples=1.5), r"`mc_samples` must be None"),
        (lambda net: jbp.kfac(net, "half_sse", kind="ekfac"), r"`kind` must be one of"),
        (
            lambda net: jbp.diag_ggn(net, "half_sse", chunk_size=0),
            r"`chunk_size` must be None \(all at once\) or a positive int, got 0",
        ),
        (lambda net: jbp.sqrt_ggn(net, "mse", chunk_size=2.0), r"`chunk_size` .* got 2\.0"),
        (lambda net: jbp.per_example_diag_ggn(net, "mse", chunk_size=True), r"got True"),
        (lambda net: jbp.kfac(net, "mse", kind="kflr", chunk_size=-3), r"`chunk_size` .* got -3"),
        (lambda net: jbp.diag_hessian(net, "mse", chunk_size="8"), r"`chunk_size` .* got '8'"),
        (lambda net: jbp.kfac(net, "half_sse", mc_samples=None), r"needs mc_samples ≥ 1"),
        (
            lambda net: jbp.diag_ggn(net, jbp.Loss("l1", lambda a, y: a, lambda a, y: a, "sum")),
            r"loss 'l1' has no sqrt_hessian",
        ),
        (
            lambda net: jbp.ggn_vector_product(
                net, jbp.Loss("l1", lambda a, y: a, lambda a, y: a, "sum")
            ),
            r"loss 'l1' has no hessian_vp",
        ),
        (
            lambda net: jbp.diag_hessian(jbp.Sequential([jbp.Conv(1, 1, 3), jbp.Flatten()]), "mse"),
            r"`net.layers\[0\]` is Conv.*Dense and Activation",
        ),
    ],
)
def test_bad_arguments_have_clear_errors(make: Any, match: str) -> None:
    net, _, _, _ = _small()
    with pytest.raises((ValueError, TypeError), match=match):
        make(net)


def test_mc_without_a_key_and_wrong_keys_are_clear_errors() -> None:
    net, params, x, y = _small()
    fn = jbp.diag_ggn(net, "half_sse", mc_samples=2)
    with pytest.raises(ValueError, match=r"mc_samples=2 draws Monte-Carlo columns: pass key="):
        fn(params, x, y)
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):
        fn(params, x, y, key=3)


def test_activation_without_second_derivative_is_a_clear_error() -> None:
    jbp.register_activation("cube_no_f2", lambda z: z**3, lambda z, out: 3 * z**2)
    net = jbp.Sequential([jbp.Dense(3, 2, "cube_no_f2")])
    with pytest.raises(ValueError, match=r"activation 'cube_no_f2' has no second derivative"):
        jbp.diag_hessian(net, "half_sse")
    with pytest.raises(TypeError, match=r"`second_derivative` must be a callable"):
        jbp.register_activation("bad_f2", jnp.sin, lambda z, o: jnp.cos(z), second_derivative=2)


def test_ggn_vector_product_checks_v() -> None:
    net, params, x, y = _small()
    fn = jbp.ggn_vector_product(net, "half_sse")
    bad = jtu.tree_map(jnp.zeros_like, params)
    bad[0]["w"] = jnp.zeros((4, 3), F64)
    with pytest.raises(ValueError, match=r"`v\[0\]\['w'\]` must have shape \(3, 4\)"):
        fn(params, x, y, bad)
    with pytest.raises(ValueError, match=r"`v` must be shaped like params"):
        fn(params, x, y, params[0])


# --- tangent rules (the forward of the linearised network) --------------------------------


def test_tangent_rules_match_jax_jvp_and_missing_ones_are_clear_errors() -> None:
    """Dense, Conv, Activation, Flatten, Residual and Parallel (sum, concat) against
    jax.jvp of the forward; None tangents are zeros."""
    from jbp.layers._base import tangent

    rng = np.random.default_rng(17)
    net = jbp.Sequential(
        [
            jbp.Conv(2, 3, (2, 2), "tanh", stride=1, padding="VALID"),
            jbp.Flatten(),
            jbp.Activation("sigmoid"),
            jbp.Residual(jbp.Sequential([jbp.Dense(12, 12, "silu")])),
            jbp.Parallel([jbp.Dense(12, 3, "tanh"), jbp.Dense(12, 2, bias=False)], "concat"),
            jbp.Parallel([jbp.Dense(5, 4), jbp.Dense(5, 4, "elu")], "sum"),
        ]
    )
    params = net.init(jax.random.key(18), F64)
    x = jnp.asarray(rng.normal(size=(3, 3, 3, 2)))
    v = jtu.tree_map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape)), params)
    x_dot = jnp.asarray(rng.normal(size=x.shape))

    def forward(p: Any, a: Any) -> Any:
        return net.forward(p, a)[0]

    @jax.jit  # the three cases in one program
    def cases(params: Any, x: Any, v: Any, x_dot: Any) -> list[tuple[Any, Any]]:
        _out, caches = net.forward(params, x)
        assert tangent(net, params, caches, None, None) is None
        pairs = []
        for a_dot, p_dot in ((x_dot, v), (None, v), (x_dot, None)):
            want = jax.jvp(
                forward,
                (params, x),
                (
                    jtu.tree_map(jnp.zeros_like, params) if p_dot is None else p_dot,
                    jnp.zeros_like(x) if a_dot is None else a_dot,
                ),
            )[1]
            pairs.append((tangent(net, params, caches, a_dot, p_dot), want))
        return pairs

    for got, want in cases(params, x, v, x_dot):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match=r"layer _NoTangent.*has no tangent.*ggn_vector_product"):
        net = jbp.Sequential([_NoTangent()])
        jbp.ggn_vector_product(net, "mse")(
            ({},), jnp.ones((2, 3), F64), jnp.ones((2, 3), F64), ({},)
        )


@dataclasses.dataclass(frozen=True)
class _NoTangent:
    """A layer with the protocol's three methods and no tangent rule."""

    def init(self, key: Any, dtype: Any = F64) -> Any:
        return {}

    def forward(self, params: Any, a: Any) -> Any:
        return a, None

    def backward(self, params: Any, cache: Any, delta_out: Any) -> Any:
        return {}, delta_out
