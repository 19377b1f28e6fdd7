"""Per-example quantities against vmap(jax.grad) over single examples, plus invariants."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jbp
import jbp.testing as jt

PROBLEMS = jt.problems(dtypes=["float64"], single=False, max_depth=4, max_width=12, max_batch=12)


def _examples(n: int) -> int:
    """``n`` examples under the ci profile, scaled with the profile's max_examples."""
    return max(1, round(n * settings.default.max_examples / 25))


def _with_reference(net, loss, **fns):
    """One compiled function per drawn problem: the reference g_i (``"ref"``, vmap of
    jax.grad over single examples) beside jbp's quantities ``fns``, fetched as numpy,
    so that the reference arithmetic below runs in numpy and compiles nothing."""
    grad = jax.vmap(jax.grad(jbp.objective(net, loss)), in_axes=(None, 0, 0))  # reference
    run = jax.jit(lambda p, x, y: {"ref": grad(p, x, y), **{k: f(p, x, y) for k, f in fns.items()}})
    return lambda params, x, y: jax.device_get(run(params, x, y))


def _ref_norms(g):
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(g)]
    b = leaves[0].shape[0]
    return np.sqrt(sum(np.sum(leaf.reshape(b, -1) ** 2, axis=1) for leaf in leaves))


def _scale(loss, b):
    return jbp._losses.get_loss(loss).scale(b) if isinstance(loss, str) else loss.scale(b)


def _assert_close(a, b, rtol=1e-10, atol=0.0):
    jbp.compare(a, b, rtol=rtol, atol=atol, names=("jbp", "vmap(jax.grad)")).raise_if_failed()


@settings(max_examples=_examples(6))
@given(PROBLEMS)
def test_per_example_grads_match_vmap_grad(problem):
    net, loss, params, x, y = problem
    got = _with_reference(
        net, loss, grads=jbp.per_example_grads(net, loss), batch=jbp.backprop(net, loss)
    )(params, x, y)
    _assert_close(got["grads"], got["ref"])
    # Σ_i g_i (times 1/B for mean losses) is the batch gradient.
    s = _scale(loss, x.shape[0])
    _assert_close(jax.tree.map(lambda g: s * np.sum(g, axis=0), got["grads"]), got["batch"])


@settings(max_examples=_examples(6))
@given(PROBLEMS)
def test_norms_and_per_layer_norms(problem):
    net, loss, params, x, y = problem
    got = _with_reference(
        net,
        loss,
        norms=jbp.per_example_norms(net, loss),
        per_layer=jbp.per_example_norms(net, loss, per_layer=True),
    )(params, x, y)
    ref = _ref_norms(got["ref"])
    norms, per_layer = got["norms"], got["per_layer"]
    np.testing.assert_allclose(norms, ref, rtol=1e-10, atol=1e-12 * float(np.max(ref)))
    assert per_layer.shape == (x.shape[0], len(net.layers))
    np.testing.assert_allclose(np.sum(per_layer**2, axis=1), norms**2, rtol=1e-10, atol=1e-300)
    for i, p in enumerate(params):
        if not jax.tree.leaves(p):
            assert not np.any(per_layer[:, i])


@settings(max_examples=_examples(6))
@given(PROBLEMS)
def test_second_moment_and_variance(problem):
    net, loss, params, x, y = problem
    b = x.shape[0]
    fns = {"sgs": jbp.sum_grad_squared(net, loss), "var": jbp.grad_variance(net, loss)}
    if b > 1:
        fns["var1"] = jbp.grad_variance(net, loss, ddof=1)
    got = _with_reference(net, loss, **fns)(params, x, y)
    ref, sgs, var = got["ref"], got["sgs"], got["var"]
    _assert_close(sgs, jax.tree.map(lambda g: np.sum(g * g, axis=0), ref))
    # variance = E[g²] − E[g]², and it is numpy's population variance
    # Round-off in E[g²] − E[g]² is relative to E[g²], not to the variance.
    atol = 1e-12 * max(float(np.max(s)) for s in jax.tree.leaves(sgs)) / b
    moment = jax.tree.map(lambda s, g: s / b - np.mean(g, axis=0) ** 2, sgs, ref)
    _assert_close(var, jax.tree.map(lambda m: np.maximum(m, 0), moment), rtol=1e-8, atol=atol)
    _assert_close(var, jax.tree.map(lambda g: np.var(g, axis=0), ref), rtol=1e-8, atol=atol)
    if b > 1:
        ref1 = jax.tree.map(lambda g: np.var(g, axis=0, ddof=1), ref)
        _assert_close(got["var1"], ref1, rtol=1e-8, atol=2 * atol)


@settings(max_examples=_examples(6))
@given(PROBLEMS, st.floats(0.01, 10.0))
def test_clipped_grad_equals_clip_then_sum(problem, max_norm):
    net, loss, params, x, y = problem
    got = _with_reference(
        net,
        loss,
        clipped=jbp.clipped_grad(net, loss, max_norm),
        plain=jbp.clipped_grad(net, loss, math.inf),
        batch=jbp.backprop(net, loss),
    )(params, x, y)
    ref = got["ref"]
    norms_ref = _ref_norms(ref)
    with np.errstate(divide="ignore"):  # ‖g_i‖ = 0: C/0 = inf, the example is not clipped
        c = np.minimum(1.0, max_norm / norms_ref) * _scale(loss, x.shape[0])
    expected = jax.tree.map(lambda g: np.tensordot(c, g, axes=1), ref)
    clipped, norms = got["clipped"]
    _assert_close(clipped, expected)
    np.testing.assert_allclose(norms, norms_ref, rtol=1e-10, atol=1e-300)
    # No clipping: the plain batch gradient.
    _assert_close(got["plain"][0], got["batch"])


def test_clipping_actually_clips():
    net = jbp.mlp([3, 5, 2], "tanh")
    params = net.init(jax.random.key(0), jnp.float64)
    x = 3 * jax.random.normal(jax.random.key(1), (16, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (16, 2), jnp.float64)
    norms = np.asarray(jax.jit(jbp.per_example_norms(net, "half_sse"))(params, x, y))
    max_norm = float(np.median(norms))

    @jax.jit
    def run(params, x, y):
        return {
            "per_example": jbp.per_example_grads(net, "half_sse")(params, x, y),
            "clipped": jbp.clipped_grad(net, "half_sse", max_norm)(params, x, y)[0],
            "plain": jbp.backprop(net, "half_sse")(params, x, y),
        }

    got = jax.device_get(run(params, x, y))
    c = np.minimum(1.0, max_norm / norms)
    clipped_norms = _ref_norms(
        jax.tree.map(lambda g: g * c.reshape((-1,) + (1,) * (g.ndim - 1)), got["per_example"])
    )
    assert np.all(clipped_norms <= max_norm * (1 + 1e-12))
    assert np.sum(norms > max_norm) >= 7  # the test is not vacuous: half are clipped
    assert not jbp.compare(got["clipped"], got["plain"]).ok


def test_dp_grad_noise():
    net = jbp.mlp([20, 30, 10], "relu")
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (8, 20), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    clipped, norms = jax.jit(jbp.clipped_grad(net, "softmax_xent", 0.5))(params, x, y)
    silent, _ = jax.jit(jbp.dp_grad(net, "softmax_xent", 0.5, 0.0))(params, x, y, jax.random.key(3))
    _assert_close(silent, clipped)
    f = jax.jit(jbp.dp_grad(net, "softmax_xent", 0.5, 2.0))
    noisy, norms2 = f(params, x, y, jax.random.key(3))
    np.testing.assert_allclose(norms, norms2, rtol=1e-14)
    again, _ = f(params, x, y, jax.random.key(3))
    _assert_close(again, noisy, rtol=0)
    other, _ = f(params, x, y, jax.random.key(4))
    assert not jbp.compare(other, noisy).ok
    noise = np.concatenate(
        [
            np.ravel(np.asarray(n) - np.asarray(c))
            for n, c in zip(jax.tree.leaves(noisy), jax.tree.leaves(clipped), strict=True)
        ]
    )
    expected_std = 2.0 * 0.5 / 8  # σ·C, over B for a mean loss
    assert noise.size > 900
    np.testing.assert_allclose(np.std(noise), expected_std, rtol=0.1)
    assert abs(float(np.mean(noise))) < 4 * expected_std / math.sqrt(noise.size)


@settings(max_examples=_examples(6))
@given(jt.problems(dtypes=["float64"], single=False, min_batch=2, max_depth=3, max_width=8))
def test_gradient_noise_scale_formulas(problem):
    net, loss, params, x, y = problem
    got = _with_reference(
        net,
        loss,
        gns=jbp.gradient_noise_scale(net, loss),
        exact=jbp.gradient_noise_scale(net, loss, unbiased=False),
    )(params, x, y)
    ref = got["ref"]
    b = x.shape[0]
    mean_sq_norm = np.mean(_ref_norms(ref) ** 2)
    gbar_sq = sum(np.sum(np.mean(g, axis=0) ** 2) for g in jax.tree.leaves(ref))
    trace = b / (b - 1) * (mean_sq_norm - gbar_sq)
    # tr(Σ) is the unbiased sample covariance trace
    cov_trace = sum(np.sum(np.var(g, axis=0, ddof=1)) for g in jax.tree.leaves(ref))
    np.testing.assert_allclose(trace, cov_trace, rtol=1e-8, atol=1e-300)
    gns = got["gns"]
    np.testing.assert_allclose(gns.trace_cov, trace, rtol=1e-8, atol=1e-14 * float(mean_sq_norm))
    np.testing.assert_allclose(
        gns.grad_sq_norm, gbar_sq - trace / b, rtol=1e-8, atol=1e-14 * float(mean_sq_norm)
    )
    if abs(float(gns.grad_sq_norm)) > 1e-6 * float(mean_sq_norm):
        np.testing.assert_allclose(gns.b_simple, gns.trace_cov / gns.grad_sq_norm, rtol=1e-12)
    # The batch as the whole distribution: population covariance trace and ‖ḡ‖².
    exact = got["exact"]
    pop_trace = sum(np.sum(np.var(g, axis=0)) for g in jax.tree.leaves(ref))
    np.testing.assert_allclose(
        exact.trace_cov, pop_trace, rtol=1e-8, atol=1e-14 * float(mean_sq_norm)
    )
    np.testing.assert_allclose(exact.grad_sq_norm, gbar_sq, rtol=1e-10, atol=1e-300)
    assert exact.trace_cov >= 0 and exact.grad_sq_norm >= 0


def _noise_scale(g, unbiased):
    """The formulas of McCandlish et al. on per-example gradients g (leaves (B, ...))."""
    flat = np.concatenate([np.reshape(leaf, (leaf.shape[0], -1)) for leaf in g], axis=1)
    b = flat.shape[0]
    mean = flat.mean(axis=0)
    spread = np.mean(np.sum(flat * flat, axis=1)) - np.sum(mean * mean)
    trace = b / (b - 1) * spread if unbiased else spread
    g2 = np.sum(mean * mean) - trace / b if unbiased else np.sum(mean * mean)
    return np.array([trace / g2, trace, g2])


def test_gradient_noise_scale_on_tokens_matches_the_formula_on_reference_gradients():
    """Issue 21's bug: on int32 token inputs the noise scale once built its weights in
    the tokens' dtype (‖G‖² = 0, B_simple = inf). Here it matches the formulas evaluated
    on per-example gradients from vmap of jax.grad: params as a list; unbiased=False with
    a padding mask and an example mask; by chunks of examples."""
    net = jbp.Sequential([jbp.Embedding(7, 4), jbp.Dense(4, 4, "tanh"), jbp.Dense(4, 7)])
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.randint(jax.random.key(1), (5, 4), 0, 7, dtype=jnp.int32)
    y = jax.random.randint(jax.random.key(2), (5, 4), 0, 7, dtype=jnp.int32)
    mask = jnp.asarray([[1] * 4, [1] * 2 + [0] * 2, [1] * 4, [1] * 3 + [0], [1] * 4], bool)
    em = jnp.asarray([True, True, False, True, True])
    objective = jbp.objective(net, "softmax_xent")

    def one(p, xi, yi, mi):
        return jax.grad(objective)(p, xi[None], yi[None], mask=mi[None])  # reference

    per_example = jax.vmap(one, in_axes=(None, 0, 0, 0))
    gns = {u: jbp.gradient_noise_scale(net, "softmax_xent", unbiased=u) for u in (True, False)}
    chunked = jbp.gradient_noise_scale(net, "softmax_xent", chunk_size=2)

    @jax.jit
    def run(params, x, y, mask, em):
        return {
            "ref": per_example(params, x, y, jnp.ones_like(mask)),
            "ref_masked": per_example(params, x, y, mask),
            "plain": gns[True](list(params), x, y),
            "population": gns[False](params, x, y, mask=mask, example_mask=em),
            "chunked": chunked(params, x, y, mask=mask, example_mask=em),
        }

    got = jax.device_get(run(params, x, y, mask, em))
    ref, ref_masked = jax.tree.leaves(got["ref"]), jax.tree.leaves(got["ref_masked"])
    keep = np.asarray(em)
    want = {
        "plain": _noise_scale(ref, True),
        "population": _noise_scale([g[keep] for g in ref_masked], False),
        "chunked": _noise_scale([g[keep] for g in ref_masked], True),
    }
    for name, expected in want.items():
        result = got[name]
        assert isinstance(result, jbp.NoiseScale) and result.b_simple.dtype == np.float64
        assert np.all(np.isfinite(expected)) and expected[2] != 0, name
        np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-9, err_msg=name)


def test_per_example_quantities_by_chunks_of_examples_equal_the_whole_batch():
    """Every per-example function with ``chunk_size`` (2 and 3 do not divide the batch of
    5) equals the whole batch at once: per_example_grads against itself unchunked, the
    others against their formulas on those unchunked g_i (the materialising norm paths
    included), with a padding mask and an example mask, in one program."""
    net = jbp.Sequential([jbp.Embedding(6, 4), jbp.LayerNorm(4), jbp.Dense(4, 6, "tanh")])
    params = net.init(jax.random.key(3), jnp.float64)
    x = jax.random.randint(jax.random.key(4), (5, 4), 0, 6)
    y = jax.random.randint(jax.random.key(5), (5, 4), 0, 6)
    mask = jnp.asarray([[1] * 4, [1] * 2 + [0] * 2, [1] * 4, [1] * 4, [1] + [0] * 3], bool)
    em = jnp.asarray([True, True, True, False, True])
    loss, c = "softmax_xent", 0.3
    fns = {
        "whole": jbp.per_example_grads(net, loss),
        "grads2": jbp.per_example_grads(net, loss, chunk_size=2),
        "grads3": jbp.per_example_grads(net, loss, chunk_size=3),
        "norms": jbp.per_example_norms(net, loss, method="materialise", chunk_size=3),
        "sum_sq": jbp.sum_grad_squared(net, loss, chunk_size=3),
        "variance": jbp.grad_variance(net, loss, ddof=1, chunk_size=3),
        "clipped": jbp.clipped_grad(net, loss, c, method="materialise", chunk_size=3),
    }
    dp = jbp.dp_grad(net, loss, c, 0.0, expected_batch_size=2.0, chunk_size=2)

    @jax.jit
    def run(params, x, y, mask, em):
        out = {k: f(params, x, y, mask=mask, example_mask=em) for k, f in fns.items()}
        out["dp"] = dp(params, x, y, jax.random.key(6), mask=mask, example_mask=em)
        return out

    got = jax.device_get(run(params, x, y, mask, em))
    g = got["whole"]
    for k in ("grads2", "grads3"):
        _assert_close(got[k], g, rtol=1e-13)
    assert not any(np.any(leaf[3]) for leaf in jax.tree.leaves(g))  # the padding row
    keep = np.asarray(em)
    norms = _ref_norms(g)
    _assert_close(got["norms"], norms, rtol=1e-12)
    _assert_close(got["sum_sq"], jax.tree.map(lambda leaf: np.sum(leaf * leaf, axis=0), g))
    var = jax.tree.map(lambda leaf: np.var(leaf[keep], axis=0, ddof=1), g)
    _assert_close(got["variance"], var, rtol=1e-9, atol=1e-15)
    factors = np.minimum(1.0, c / np.where(norms > 0, norms, 1.0))
    clipped = jax.tree.map(lambda leaf: np.tensordot(factors, leaf, axes=1), g)
    _assert_close(got["clipped"][0], jax.tree.map(lambda s: s / keep.sum(), clipped))
    _assert_close(got["clipped"][1], norms, rtol=1e-12)
    _assert_close(got["dp"][0], jax.tree.map(lambda s: s / 2.0, clipped))


def test_chunks_draw_dropout_from_the_key_folded_with_the_chunk_index():
    """The documented draw: with a dropout key, chunk k of ``chunk_size`` examples is the
    unchunked call on its rows with ``fold_in(dropout_key, k)``."""
    net = jbp.Sequential([jbp.Dense(3, 4, "tanh"), jbp.Dropout(0.5), jbp.Dense(4, 2)])
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (3, 2), jnp.float64)
    key = jax.random.key(3)
    whole, chunked = (
        jbp.per_example_grads(net, "mse"),
        jbp.per_example_grads(net, "mse", chunk_size=2),
    )

    @jax.jit
    def run(params, x, y):
        parts = [
            whole(params, x[:2], y[:2], dropout_key=jax.random.fold_in(key, 0)),
            whole(params, x[2:], y[2:], dropout_key=jax.random.fold_in(key, 1)),
        ]
        want = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *parts)
        return chunked(params, x, y, dropout_key=key), want, whole(params, x, y, dropout_key=key)

    got, want, unchunked = jax.device_get(run(params, x, y))
    _assert_close(got, want, rtol=1e-13)
    assert not np.allclose(got[2]["w"], unchunked[2]["w"])  # other draws than unchunked


def test_float32_per_example_norms_documented_tolerance():
    net = jbp.mlp([10, 32, 32, 4], "gelu")
    params = net.init(jax.random.key(0), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (32, 10), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (32,), 0, 4)
    got = _with_reference(net, "softmax_xent", norms=jbp.per_example_norms(net, "softmax_xent"))(
        params, x, y
    )
    assert got["norms"].dtype == np.float32 and got["ref"][0]["w"].dtype == np.float32
    np.testing.assert_allclose(got["norms"], _ref_norms(got["ref"]), rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class Scale(jbp.Layer):
    features: int

    def init(self, key, dtype=jnp.float32):
        return {"s": jnp.linspace(0.5, 1.5, self.features, dtype=dtype)}

    def forward(self, params, a):
        return a * params["s"][None, :], a

    def backward(self, params, cache, delta_out):
        return {"s": jnp.sum(delta_out * cache, axis=0)}, delta_out * params["s"][None, :]


@dataclasses.dataclass(frozen=True)
class ScaleWithPerExample(Scale):
    def per_example_grads(self, params, cache, delta_out):
        return {"s": delta_out * cache}


def test_user_layer_per_example_fallbacks():
    net = jbp.Sequential([jbp.Dense(3, 4, "tanh"), ScaleWithPerExample(4), jbp.Dense(4, 2)])
    params = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (6, 2), jnp.float64)
    got = _with_reference(
        net,
        "mse",
        grads=jbp.per_example_grads(net, "mse"),
        norms=jbp.per_example_norms(net, "mse"),
        sgs=jbp.sum_grad_squared(net, "mse"),
        clipped=jbp.clipped_grad(net, "mse", 0.1),
    )(params, x, y)
    ref = got["ref"]
    _assert_close(got["grads"], ref)
    np.testing.assert_allclose(got["norms"], _ref_norms(ref), rtol=1e-12)
    _assert_close(got["sgs"], jax.tree.map(lambda g: np.sum(g * g, 0), ref))
    c = np.minimum(1.0, 0.1 / _ref_norms(ref)) / 6
    _assert_close(got["clipped"][0], jax.tree.map(lambda g: np.tensordot(c, g, axes=1), ref))


def test_user_layer_without_per_example_grads_is_a_clear_error():
    net = jbp.Sequential([jbp.Dense(3, 4, "tanh"), Scale(4), jbp.Dense(4, 2)])
    params = net.init(jax.random.key(0), jnp.float64)
    x, y = jnp.ones((2, 3)), jnp.ones((2, 2))
    with pytest.raises(
        TypeError, match=r"layer Scale\(features=4\) has parameters but no per_example_grads"
    ):
        jbp.per_example_norms(net, "mse")(params, x, y)


def test_per_example_argument_errors():
    net = jbp.mlp([3, 2])
    params = net.init(jax.random.key(0), jnp.float64)
    x, y = jnp.ones((1, 3)), jnp.ones((1, 2))
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match=r"`max_norm` must be positive \(or math.inf\)"):
            jbp.clipped_grad(net, "mse", bad)
    with pytest.raises(TypeError, match=r"`max_norm` must be a positive number, got str"):
        jbp.clipped_grad(net, "mse", "1")
    with pytest.raises(ValueError, match=r"`max_norm` must be finite for DP-SGD"):
        jbp.dp_grad(net, "mse", math.inf, 1.0)
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be a number ≥ 0, got -1"):
        jbp.dp_grad(net, "mse", 1.0, -1)
    for make in (
        jbp.per_example_grads,
        jbp.per_example_norms,
        jbp.sum_grad_squared,
        jbp.grad_variance,
        jbp.gradient_noise_scale,
        lambda net, loss, **k: jbp.clipped_grad(net, loss, 1.0, **k),
        lambda net, loss, **k: jbp.dp_grad(net, loss, 1.0, 1.0, **k),
    ):
        for bad in (0, -2, 1.5, True, "4"):
            with pytest.raises(
                ValueError,
                match=rf"`chunk_size` must be None \(all at once\) or a positive int, got {bad!r}",
            ):
                make(net, "mse", chunk_size=bad)
    with pytest.raises(ValueError, match=r"`ddof` must be 0 or 1, got 2"):
        jbp.grad_variance(net, "mse", ddof=2)
    with pytest.raises(
        ValueError, match=r"`x` has batch 1; a variance with ddof=1 needs at least 2"
    ):
        jbp.grad_variance(net, "mse", ddof=1)(params, x, y)
    with pytest.raises(
        ValueError, match=r"`x` has batch 1; the gradient noise scale needs at least 2"
    ):
        jbp.gradient_noise_scale(net, "mse")(params, x, y)
    with pytest.raises(ValueError, match=r"`x` has 4 features"):
        jbp.per_example_norms(net, "mse")(params, jnp.ones((2, 4)), jnp.ones((2, 2)))
