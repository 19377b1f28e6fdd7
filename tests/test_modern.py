"""The transformers people train today: gates, shared weights, RoPE, grouped-query
attention, padded batches, GroupNorm, dropout, jbp.llama; each rule against autodiff,
the padding-invariance property, and planted bugs, each caught."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings

import jbp
import jbp.testing as jt
from jbp import _losses
from jbp._backprop import keeps_positions
from jbp.layers import _factors, _shared

F64 = jnp.float64


def _examples(n: int) -> int:
    return max(1, round(n * settings.default.max_examples / 25))


def _tree_close(
    a: Any, b: Any, rtol: float = 1e-10, names: tuple[str, str] = ("jbp", "ref")
) -> None:
    jbp.compare(a, b, rtol=rtol, names=names).raise_if_failed()


def _per_example_reference(net: Any, loss: str, params: Any, x: Any, y: Any, **kw: Any) -> Any:
    """``g_i = ∂ℓ_i/∂θ`` by ``jax.jacrev`` of the vector of per-example losses of the
    whole batch (one mask, one dropout draw for the batch)."""

    def losses(p: Any) -> jax.Array:
        out = net.apply(p, x, **kw)
        mask = kw.get("mask")
        keep = mask if out.ndim >= 3 and mask is not None else None
        return _losses.get_loss(loss).with_mask(keep).per_example(out, y)

    return jax.jit(jax.jacrev(losses))(params)  # reference


def _sq_norms(g: Any) -> np.ndarray:
    """Σ over leaves of ‖g_i‖², in numpy (no eager op to compile)."""
    leaves = [np.asarray(leaf) for leaf in jtu.tree_leaves(g)]
    b = leaves[0].shape[0]
    return sum(np.sum(leaf.reshape(b, -1) ** 2, axis=1) for leaf in leaves)


def _padded_tokens(rng: np.random.Generator, vocab: int, lengths: list[int], t: int) -> Any:
    x = rng.integers(0, vocab, (len(lengths), t))
    y = rng.integers(0, vocab, (len(lengths), t))
    mask = np.arange(t)[None] < np.asarray(lengths)[:, None]
    y[~mask] = -1
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)


def _perturbed(net: Any, seed: int = 0, scale: float = 0.3) -> Any:
    rng = np.random.default_rng(seed)
    params = net.init(jax.random.key(seed), F64)
    return jtu.tree_map(lambda a: a + scale * rng.standard_normal(a.shape), params)


# --- every new layer's rules against autodiff --------------------------------------


NEW_LAYERS = [
    (jbp.Parallel([jbp.Dense(4, 3, "silu"), jbp.Dense(4, 3)], merge="product"), (5, 4), False),
    (jbp.MultiHeadAttention(8, 4, kv_heads=2, rope_theta=100.0, causal=True), (5, 8), True),
    (jbp.MultiHeadAttention(8, 4, kv_heads=1, rope_theta=10.0, bias=False), (5, 8), True),
    (jbp.GroupNorm(2, 6), (5, 6), True),
    (jbp.GroupNorm(3, 6), (3, 4, 6), False),
    (jbp.Dropout(0.3), (4, 5), False),
    (jbp.GlobalAvgPool(), (5, 3), True),
    (jbp.llama(13, 8, 2, 1, kv_heads=1, hidden=6, tie_embeddings=True), (5,), True),
]


@pytest.mark.parametrize(("layer", "in_shape", "padded"), NEW_LAYERS, ids=lambda v: repr(v)[:40])
def test_check_layer_passes_for_every_new_layer(layer, in_shape, padded):
    report = jbp.check_layer(layer, in_shape, padded=padded)
    assert report.ok, str(report)


def test_new_tangent_rules_match_jax_jvp():
    """Product merge, RoPE, grouped-query attention, GroupNorm (masked), Dropout:
    ``tangent`` against ``jax.jvp`` of the forward, inputs and params together."""
    rng = np.random.default_rng(3)
    cases = [
        (jbp.Parallel([jbp.Dense(4, 3, "tanh"), jbp.Dense(4, 3)], merge="product"), (2, 5, 4)),
        (jbp.MultiHeadAttention(8, 4, kv_heads=2, rope_theta=50.0, causal=True), (2, 5, 8)),
        (jbp.GroupNorm(2, 6), (3, 5, 6)),
        (jbp.Dropout(0.4), (3, 5, 6)),
    ]
    mask = jnp.asarray(np.arange(5)[None] < np.array([[5], [2], [1]])[:3])
    for layer, shape in cases:
        params = jtu.tree_map(
            lambda a: a + 0.3 * rng.standard_normal(a.shape), layer.init(jax.random.key(1), F64)
        )
        ctx = jbp.Context(mask[: shape[0]], jax.random.key(2))
        a = jnp.asarray(rng.standard_normal(shape))
        a_dot = jnp.asarray(rng.standard_normal(shape))
        p_dot = jtu.tree_map(lambda v: jnp.asarray(rng.standard_normal(v.shape)), params)

        @jax.jit  # the rule and its reference in one program
        def both(params, a, p_dot, a_dot, layer=layer, ctx=ctx):
            _, cache = layer.forward(params, a, ctx)
            got = layer.tangent(params, cache, a_dot, p_dot)
            run = lambda p, x: layer.forward(p, x, ctx)[0]  # noqa: E731
            return got, jax.jvp(run, (params, a), (p_dot, a_dot))[1]

        got, want = both(params, a, p_dot, a_dot)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=repr(layer))


def test_rope_rotation_and_grouped_heads_as_pinned():
    """RoPE's half-split rotation with θ_j = p·base^(−2j/D), and query head h reading
    key/value head h // (heads // kv_heads): the forward against a loop written from
    DESIGN.md's words."""
    rng = np.random.default_rng(0)
    layer = jbp.MultiHeadAttention(8, 4, kv_heads=2, rope_theta=100.0, bias=False)
    params = layer.init(jax.random.key(0), F64)
    a = rng.standard_normal((1, 3, 8))
    d, g = 2, 2
    q, k, v = (a[0] @ np.asarray(params[f"w{n}"]) for n in "qkv")

    def rot(x: np.ndarray, p: int) -> np.ndarray:
        theta = p * 100.0 ** (-2 * np.arange(d // 2) / d)
        x1, x2 = x[: d // 2], x[d // 2 :]
        return np.concatenate(
            [x1 * np.cos(theta) - x2 * np.sin(theta), x2 * np.cos(theta) + x1 * np.sin(theta)]
        )

    o = np.zeros((3, 8))
    for h in range(4):
        kv = h // g
        qh = np.stack([rot(q[t, h * d : (h + 1) * d], t) for t in range(3)])
        kh = np.stack([rot(k[t, kv * d : (kv + 1) * d], t) for t in range(3)])
        s = qh @ kh.T / math.sqrt(d)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        o[:, h * d : (h + 1) * d] = p @ v[:, kv * d : (kv + 1) * d]
    want = o @ np.asarray(params["wo"])
    got = layer.forward(params, jnp.asarray(a))[0][0]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert params["wk"].shape == (8, 4) and params["wq"].shape == (8, 8)


def test_llama_is_built_as_pinned():
    net = jbp.llama(vocab=256, features=128, heads=4, depth=2, kv_heads=2, tie_embeddings=True)
    layers = net.layers
    assert isinstance(layers[0], jbp.Embedding) and len(layers) == 1 + 2 * 2 + 2
    attn = layers[1].block.layers[1]
    assert (attn.kv_heads, attn.causal, attn.bias, attn.rope_theta) == (2, True, False, 10000.0)
    gate = layers[2].block.layers[1].layers[0]
    assert gate.merge == "product" and gate.branches[0].fan_out == 344  # 8·128/3 → 344
    params = jax.eval_shape(lambda k: net.init(k), jax.random.key(0))
    assert params[-1] == {} and params[0]["table"].shape == (256, 128)
    assert params[1][1]["wk"].shape == (128, 64)
    assert jbp.llama(11, 8, 2, 1).init(jax.random.key(0))[-1]["w"].shape == (8, 11)


# --- labels -1 and padding masks -----------------------------------------------------


def test_labels_minus_one_average_over_the_examples_own_targets():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 4, 5))
    labels = np.asarray([[1, -1, 3, -1], [-1, -1, -1, -1]])
    xent = _losses.get_loss("softmax_xent")
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    token = -np.take_along_axis(log_softmax, np.maximum(labels, 0)[..., None], -1)
    want0 = (token[0, 0, 0] + token[0, 2, 0]) / 2
    # with a mask: the padded position's label does not count even where it is set
    mask = np.asarray([[True, True, True, False], [True, False, False, False]])
    labels2 = labels.copy()
    labels2[0, 3] = 2
    plain, masked = jax.jit(
        lambda a: (xent.per_example(a, labels), xent.with_mask(mask).per_example(a, labels2))
    )(logits)
    np.testing.assert_allclose(plain, [want0, 0.0], rtol=1e-12)
    np.testing.assert_allclose(masked, [want0, 0.0])
    # ‖g_i‖ of a padded example equals its unpadded one's (not scaled by n_i / T)
    net = jbp.Sequential([jbp.Embedding(5, 4), jbp.Dense(4, 5)])
    params = _perturbed(net)
    x, y, m = _padded_tokens(rng, 5, [3, 1], 4)
    norms_fn = jax.jit(jbp.per_example_norms(net, "softmax_xent"))
    norms = norms_fn(params, x, y, mask=m)
    alone = norms_fn(params, x[:1, :3], y[:1, :3])
    np.testing.assert_allclose(norms[0], alone[0], rtol=1e-12)
    g, ref = jax.jit(  # -1 accepted without a mask too
        lambda p: (
            jbp.backprop(net, "softmax_xent")(p, x, y),
            jax.grad(jbp.objective(net, "softmax_xent"))(p, x, y),
        )
    )(params)
    _tree_close(g, ref)


def _alone(fn: Any, params: Any, x: Any, y: Any, n: int) -> Any:
    return fn(params, x[None, :n], y[None, :n])


@settings(max_examples=_examples(4))
@given(
    problem=jt.padded_problems(
        nets=jt.llamas(max_depth=1, max_vocab=6, max_length=5, causal=True)
        | jt.llamas(max_depth=1, max_vocab=6, max_length=5, causal=False),
        dtypes=("float64",),
        max_batch=3,
        dropout=False,
    )
)
def test_padding_invariance(problem):
    """Every per-example quantity of a padded example equals that of the same example
    run alone without padding, and the batch gradient is the sum over the examples
    run alone (times 1/B for a "mean" loss): causal and non-causal, every loss."""
    check_padding_invariance(problem)


def check_padding_invariance(problem: Any) -> None:
    """The padding-invariance property on one drawn :class:`jbp.testing.PaddedProblem`
    (shared with the recurrent networks' test)."""
    net, loss, params, x, y, mask, _ = problem
    lengths = problem.lengths
    max_norm = 0.7
    fns = {
        "grad": jbp.backprop(net, loss),
        "per_example_grads": jbp.per_example_grads(net, loss),
        "norms": jbp.per_example_norms(net, loss),
        "sum_grad_squared": jbp.sum_grad_squared(net, loss),
        "clipped": jbp.clipped_grad(net, loss, max_norm),
        "diag_ggn": jbp.per_example_diag_ggn(net, loss),
    }

    @jax.jit
    def everything(params: Any, x: Any, y: Any, mask: Any) -> dict[str, Any]:
        return {k: f(params, x, y, mask=mask) for k, f in fns.items()}

    batch = jax.device_get(everything(params, x, y, mask))  # numpy from here on
    x, y = np.asarray(x), np.asarray(y)  # slices in numpy: no op compiled per slice
    out_shape = (x.shape[0], *net.output_shape(tuple(x.shape[1:])))
    positions = keeps_positions(out_shape, tuple(x.shape))
    assume(any(np.any(np.asarray(v) != 0) for v in jtu.tree_leaves(batch["grad"])))
    scale = 1.0 / x.shape[0] if _losses.get_loss(loss).reduction == "mean" else 1.0
    total = jtu.tree_map(np.zeros_like, batch["grad"])
    sq = jtu.tree_map(np.zeros_like, batch["grad"])
    clipped = jtu.tree_map(np.zeros_like, batch["grad"])
    for i, n in enumerate(lengths):
        g_i = jtu.tree_map(lambda v, i=i: v[i], batch["per_example_grads"])
        if n == 0:  # all padding: nothing at all
            assert float(batch["norms"][i]) == 0.0
            continue
        y_i = y[i : i + 1, :n] if positions else y[i : i + 1]
        one = jax.device_get(everything(params, x[i : i + 1, :n], y_i, None))
        g_alone = jtu.tree_map(lambda v: v[0], one["per_example_grads"])
        _tree_close(g_i, g_alone, 1e-9, ("padded g_i", "g_i alone"))
        np.testing.assert_allclose(batch["norms"][i], one["norms"][0], rtol=1e-9)
        d_i = jtu.tree_map(lambda v, i=i: v[i], batch["diag_ggn"])
        _tree_close(d_i, jtu.tree_map(lambda v: v[0], one["diag_ggn"]), 1e-9)
        total = jtu.tree_map(lambda t, g: t + g, total, one["grad"])
        sq = jtu.tree_map(lambda s, g: s + g * g, sq, g_alone)
        norm = float(one["norms"][0])
        c = (1.0 if norm <= max_norm else max_norm / norm) * scale
        clipped = jtu.tree_map(lambda s, g, c=c: s + c * g, clipped, g_alone)
    _tree_close(batch["grad"], jtu.tree_map(lambda t: scale * t, total), 1e-9)
    _tree_close(batch["sum_grad_squared"], sq, 1e-9, ("Σg² padded", "Σ over examples alone"))
    _tree_close(batch["clipped"][0], clipped, 1e-9, ("clipped padded", "clipped alone"))


@settings(max_examples=_examples(3))
@given(problem=jt.padded_problems(dtypes=("float64",), max_batch=3, padded=None))
def test_llama_family_against_autodiff(problem):
    """Backprop = jax.grad and per-example quantities = jacrev of the per-example losses,
    on padded batches with dropout on (one key for both sides)."""
    net, loss, params, x, y, _, _ = problem
    kw = problem.keywords
    fns = {
        "grad": jbp.backprop(net, loss),
        "ref": jax.grad(jbp.objective(net, loss)),
        "per_example_grads": jbp.per_example_grads(net, loss),
        "norms": jbp.per_example_norms(net, loss),
        "sum_grad_squared": jbp.sum_grad_squared(net, loss),
    }
    got = jax.jit(lambda p, x, y, kw: {k: f(p, x, y, **kw) for k, f in fns.items()})(
        params, x, y, kw
    )
    assume(any(np.any(np.asarray(v) != 0) for v in jtu.tree_leaves(got["ref"])))
    _tree_close(got["grad"], got["ref"], 1e-9, ("backprop", "jax.grad"))
    per_ex = jax.jit(lambda p: _per_example_reference(net, loss, p, x, y, **kw))(params)
    _tree_close(got["per_example_grads"], per_ex, 1e-9, ("per_example_grads", "jacrev"))
    np.testing.assert_allclose(got["norms"], np.sqrt(_sq_norms(per_ex)), rtol=1e-9)
    sq = jtu.tree_map(lambda g: np.sum(np.asarray(g) ** 2, axis=0), per_ex)
    _tree_close(got["sum_grad_squared"], sq, 1e-9)


def test_curvature_on_a_padded_tied_llama():
    net = jbp.llama(
        vocab=7, features=4, heads=2, depth=1, kv_heads=1, hidden=3, tie_embeddings=True
    )
    params = _perturbed(net)
    x, y, m = _padded_tokens(np.random.default_rng(1), 7, [4, 2], 4)
    report = jbp.check_curvature(net, "softmax_xent", params, x, y, mask=m)
    assert report.passed, report.format()
    factors = jax.jit(jbp.kfac(net, "softmax_xent", kind="kflr"))(params, x, y, mask=m)
    assert factors[-1] == {} and factors[0] == {}  # the tied output's w is the table's
    assert set(factors[1][1]) == {"wq", "wk", "wv", "wo"}


# --- shared weights ---------------------------------------------------------------------


def test_tied_weights_get_both_uses_and_the_cross_term():
    """The tied table's gradient is the sum of the embedding's and the transposed
    output projection's; per-example norms include 2⟨g¹, g²⟩ (gather against outer),
    in both the Gram and the materialised form; an untied twin with the same numbers
    gives the two uses' gradients separately."""
    rng = np.random.default_rng(2)
    tied = jbp.Sequential(
        [
            jbp.Embedding(6, 4),
            jbp.Dense(4, 4, "tanh"),
            jbp.Tied(jbp.Dense(4, 6), source=0, leaves={"w": "table"}, transpose=True),
        ]
    )
    untied = jbp.Sequential([jbp.Embedding(6, 4), jbp.Dense(4, 4, "tanh"), jbp.Dense(4, 6)])
    params = _perturbed(tied)
    twin = (params[0], params[1], {"w": params[0]["table"].T, "b": params[2]["b"]})
    x, y, m = _padded_tokens(rng, 6, [5, 3, 4], 5)
    loss = "softmax_xent"
    methods = ("auto", "gram", "materialise")

    @jax.jit
    def everything(params: Any, twin: Any) -> dict[str, Any]:
        return {
            "g": jbp.backprop(tied, loss)(params, x, y, mask=m),
            "twin": jbp.backprop(untied, loss)(twin, x, y, mask=m),
            "ref": jax.grad(jbp.objective(tied, loss))(params, x, y, mask=m),
            "parts": jbp.per_example_grads(untied, loss)(twin, x, y, mask=m),
            "clipped": jbp.clipped_grad(tied, loss, 0.5)(params, x, y, mask=m)[0],
            **{
                k: jbp.per_example_norms(tied, loss, method=k)(params, x, y, mask=m)
                for k in methods
            },
        }

    got = everything(params, twin)
    g, g_twin = got["g"], got["twin"]
    np.testing.assert_allclose(g[0]["table"], g_twin[0]["table"] + g_twin[2]["w"].T, rtol=1e-12)
    _tree_close(g, got["ref"])
    ref = _per_example_reference(tied, loss, params, x, y, mask=m)
    want = np.sqrt(_sq_norms(ref))
    for method in methods:
        np.testing.assert_allclose(got[method], want, rtol=1e-11, err_msg=method)
    # the cross term matters: without it the norms are off
    parts = jax.device_get(got["parts"])
    cross = np.sum((parts[0]["table"] * np.swapaxes(parts[2]["w"], 1, 2)).reshape(3, -1), 1)
    assert float(np.max(np.abs(cross))) > 1e-3
    clipped = got["clipped"]
    c = np.minimum(1.0, 0.5 / want) / 3
    _tree_close(clipped, jtu.tree_map(lambda v: np.tensordot(c, np.asarray(v), axes=1), ref), 1e-10)


def test_untransposed_sharing_of_two_dense_layers():
    """ALBERT-style: two Dense layers share w and b (outer against outer)."""
    net = jbp.Sequential(
        [
            jbp.Dense(3, 3, "tanh"),
            jbp.Tied(jbp.Dense(3, 3, "sin"), source=0, leaves={"w": "w", "b": "b"}),
            jbp.Dense(3, 2),
        ]
    )
    params = _perturbed(net)
    assert params[1] == {}
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((4, 3))), jnp.asarray(rng.standard_normal((4, 2)))
    report = jbp.check_layer(net, (3,))
    assert report.ok, str(report)
    ref = _per_example_reference(net, "half_sse", params, x, y)
    per_ex, diag, kf = jax.jit(
        lambda p: (
            jbp.per_example_grads(net, "half_sse")(p, x, y),
            jbp.diag_ggn(net, "half_sse")(p, x, y),
            jbp.kfac(net, "half_sse", kind="kflr")(p, x, y),
        )
    )(params)
    _tree_close(per_ex, ref)
    assert diag[1] == {} and diag[0]["w"].shape == (3, 3)
    assert kf[0] == {} and set(kf[2]) == {"w"}  # a shared leaf gets no Kronecker factors


# --- dropout ---------------------------------------------------------------------------


def test_dropout_is_exact_with_a_key_and_the_identity_without():
    net = jbp.Sequential(
        [
            jbp.Dense(4, 6, "tanh"),
            jbp.Dropout(0.5),
            jbp.Dense(6, 6, "tanh"),
            jbp.Dropout(0.5),
            jbp.Dense(6, 2),
        ]
    )
    params = _perturbed(net)
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((8, 4))), jnp.asarray(rng.standard_normal((8, 2)))
    key = jax.random.key(5)
    report = jbp.verify(net, "mse", params, x, y, dropout_key=key)
    assert report.ok and report.n_bitwise >= 4, str(report)
    plain = jbp.mlp([4, 6, 6, 2], "tanh")

    @jax.jit
    def run(params: Any, key: jax.Array) -> dict[str, Any]:
        return {
            "no_key": jbp.backprop(net, "mse")(params, x, y),
            "plain": jbp.backprop(plain, "mse")((params[0], params[2], params[4]), x, y),
            "caches": net.forward(params, x, jbp.Context(None, key))[1],
            "per_ex": jbp.per_example_grads(net, "mse")(params, x, y, dropout_key=key),
        }

    got = run(params, key)
    _tree_close([got["no_key"][i] for i in (0, 2, 4)], list(got["plain"]), 0.0)
    first, second = np.asarray(got["caches"][1]), np.asarray(got["caches"][3])
    assert 0.3 < first.mean() < 0.7 and not np.array_equal(first, second)  # two layers, two draws
    assert not np.array_equal(first[0], first[1])  # one mask per example
    ref = _per_example_reference(net, "mse", params, x, y, dropout_key=key)
    _tree_close(got["per_ex"], ref)


# --- norm layers as accurate as autodiff -------------------------------------------------


def test_norm_rules_are_as_accurate_as_autodiff_in_float32_when_ill_conditioned():
    """The issue's case: a final LayerNorm of 2 features (x̂ nearly ±1) makes every
    upstream leaf's gradient a small difference; jbp's float32 error must match
    jax.grad's (it was 3-10x worse with the one-line δ formula). Also GroupNorm with
    groups of two numbers (RMSNorm's rule has LayerNorm's order)."""

    def net_with(norm: Any, f: int) -> Any:
        return jbp.Sequential(
            [
                jbp.Embedding(7, f),
                jbp.PositionalEmbedding(5, f),
                jbp.Residual(
                    jbp.Sequential([jbp.LayerNorm(f), jbp.MultiHeadAttention(f, 1, causal=True)])
                ),
                norm,
                jbp.Dense(f, 7),
            ]
        )

    for norm, f, t in ((jbp.LayerNorm(2), 2, 5), (jbp.GroupNorm(4, 4), 4, 2)):
        net = net_with(norm, f)
        truth_fn = jax.jit(jax.grad(jbp.objective(net, "softmax_xent")))
        ours, theirs = jax.jit(jbp.backprop(net, "softmax_xent")), truth_fn
        worst = np.zeros(2)
        for seed in range(12):
            rng = np.random.default_rng(seed)
            p64 = jtu.tree_map(
                lambda a, rng=rng: a + 0.5 * rng.standard_normal(a.shape),
                net.init(jax.random.key(seed), F64),
            )
            x, y = (jnp.asarray(rng.integers(0, 7, (4, t))) for _ in range(2))
            truth = truth_fn(p64, x, y)
            p32 = jtu.tree_map(lambda a: a.astype(jnp.float32), p64)
            truth = [np.asarray(v) for v in jtu.tree_leaves(truth)]
            big = max(float(np.max(np.abs(v))) for v in truth)
            for j, g in enumerate((ours(p32, x, y), theirs(p32, x, y))):
                err = max(
                    float(np.max(np.abs(np.asarray(a).astype(np.float64) - b)))
                    for a, b in zip(jtu.tree_leaves(g), truth, strict=True)
                )
                worst[j] = max(worst[j], err / big)
        assert worst[1] > 1e-6, (norm, worst)  # the case is ill-conditioned: autodiff errs too
        assert worst[0] <= 1.2 * worst[1], (norm, worst)


# --- planted bugs ---------------------------------------------------------------------------


def _caught_in(net: Any, params: Any, x: Any, y: Any, **kw: Any) -> jbp.Report:
    report = jbp.verify(net, "softmax_xent", params, x, y, **kw)
    assert not report.ok, str(report)
    return report


def _attention_mutant(**switches: Any) -> type:
    from test_sequences import _attention_deltas

    @dataclasses.dataclass(frozen=True)
    class Mutant(jbp.MultiHeadAttention):
        def _deltas(self, params, cache, delta_out):
            return _attention_deltas(self, params, cache, delta_out, **switches)

    return Mutant


@pytest.mark.parametrize(
    ("name", "switches", "kw"),
    [
        (
            "RoPE's inverse rotation with the wrong sign",
            {"rope_inverse": False},
            {"kv_heads": 2, "rope_theta": 10.0},
        ),
        ("kv δ of a group not summed over its query heads", {"group_sum": False}, {"kv_heads": 1}),
    ],
)
def test_attention_mutants_are_caught(name, switches, kw):
    assert jbp.check_layer(_attention_mutant()(8, 4, causal=True, **kw), (5, 8)).ok  # switches off
    layer = _attention_mutant(**switches)(8, 4, causal=True, **kw)
    report = jbp.check_layer(layer, (5, 8))
    assert not report.ok, f"{name} not caught by check_layer"
    net = jbp.Sequential(
        [
            jbp.Embedding(7, 8),
            jbp.Residual(jbp.Sequential([jbp.RMSNorm(8), layer])),
            jbp.RMSNorm(8),
            jbp.Dense(8, 7),
        ]
    )
    x, y, _ = _padded_tokens(np.random.default_rng(0), 7, [5, 5, 5], 5)
    report = _caught_in(net, _perturbed(net), x, y)
    assert report.first_mismatch.layer in (0, 1), str(report)


class ProductSwapped(jbp.Parallel):
    """Bug: the product merge's two δs swapped (δ_a = δ ⊙ a)."""

    def _branch_deltas(self, cache, delta_out):
        outs = cache[2]
        return [delta_out * outs[0], delta_out * outs[1]]


class GroupNormWithoutMean(jbp.GroupNorm):
    """Bug: GroupNorm's mean term dropped from the δ rule."""

    def backward(self, params, cache, delta_out):
        xhat, r, w = cache[:3]
        g = self._grouped(delta_out * params["scale"][None, None])
        xg = self._grouped(xhat)
        delta = r * (g - xg * self._mean(g * xg, w))
        grads = {
            "scale": jnp.sum(delta_out * xhat, axis=(0, 1)),
            "bias": jnp.sum(delta_out, axis=(0, 1)),
        }
        return grads, delta.reshape(delta_out.shape)


class GroupNormMaskForwardOnly(jbp.GroupNorm):
    """Bug: the padding mask applied in the forward but not in the backward."""

    def backward(self, params, cache, delta_out):
        xhat, r, _w, centred, ve = cache
        return super().backward(params, (xhat, r, None, centred, ve), delta_out)


def test_product_swap_and_groupnorm_mutants_are_caught():
    swapped = ProductSwapped([jbp.Dense(4, 3, "silu"), jbp.Dense(4, 3)], merge="product")
    assert not jbp.check_layer(swapped, (5, 4)).ok
    no_mean = GroupNormWithoutMean(2, 6)
    assert not jbp.check_layer(no_mean, (5, 6)).ok
    forward_only = GroupNormMaskForwardOnly(2, 6)
    assert jbp.check_layer(forward_only, (5, 6)).ok  # unpadded, the bug is silent
    assert not jbp.check_layer(forward_only, (5, 6), padded=True).ok
    rng = np.random.default_rng(0)
    x, y, m = _padded_tokens(rng, 7, [5, 2, 3], 5)
    for layer in (swapped, no_mean, forward_only):
        if isinstance(layer, jbp.Parallel):
            block = jbp.Sequential([jbp.RMSNorm(6), jbp.Dense(6, 4), layer, jbp.Dense(3, 6)])
        else:
            block = jbp.Sequential([layer, jbp.Dense(6, 6, "tanh")])
        net = jbp.Sequential([jbp.Embedding(7, 6), jbp.Residual(block), jbp.Dense(6, 7)])
        _caught_in(net, _perturbed(net), x, y, mask=m)


TINY_TIED = jbp.Sequential(
    [
        jbp.Embedding(7, 3),
        jbp.Tied(jbp.Dense(3, 7, bias=False), source=0, leaves={"w": "table"}, transpose=True),
    ]
)


def test_tied_mutants_are_caught(monkeypatch):
    """The tied leaf's transposed use dropped from its gradient; the cross term dropped
    from its per-example norm."""
    net = jbp.llama(vocab=7, features=4, heads=1, depth=1, hidden=4, tie_embeddings=True)
    params = _perturbed(net)
    x, y, m = _padded_tokens(np.random.default_rng(0), 7, [4, 3], 4)
    norms = jax.jit(jbp.per_example_norms(net, "softmax_xent"))
    want = np.sqrt(_sq_norms(_per_example_reference(net, "softmax_xent", params, x, y, mask=m)))
    np.testing.assert_allclose(norms(params, x, y, mask=m), want, rtol=1e-11)

    combine = _shared.combine_leaf
    monkeypatch.setattr(
        _shared,
        "combine_leaf",
        lambda o, u, t: o if not _factors.is_leaf_factor(o) else combine(o, u, t),
    )
    report = jbp.verify(net, "softmax_xent", params, x, y, mask=m)
    assert not report.ok and report.first_mismatch.path == "params[0]['table']", str(report)
    assert not jbp.check_layer(TINY_TIED, (4,)).ok
    monkeypatch.setattr(_shared, "combine_leaf", combine)

    sq_norm = _factors.sq_norm

    def without_cross(f: Any, method: str = "auto") -> Any:
        if isinstance(f, _factors.Sum):
            return sum(sq_norm(p, method) for p in f.parts)
        return sq_norm(f, method)

    monkeypatch.setattr(_factors, "sq_norm", without_cross)
    monkeypatch.setattr("jbp._per_example.sq_norm", without_cross)
    # a new jit of a new function: traced with the patched sq_norm
    got = np.asarray(jax.jit(jbp.per_example_norms(net, "softmax_xent"))(params, x, y, mask=m))
    assert float(np.max(np.abs(got - want) / want)) > 1e-3
    report = jbp.check_layer(TINY_TIED, (4,))
    assert not report.ok and {r.path for r in report.rows if not r.ok} <= {
        "per_example_sq_norms",
        "per_example_sq_norms[gram]",
        "per_example_sq_norms[materialise]",
    }, str(report)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: jbp.MultiHeadAttention(8, 4, kv_heads=3),
            r"`heads`=4 is not divisible by `kv_heads`=3",
        ),
        (
            lambda: jbp.MultiHeadAttention(6, 2, rope_theta=1e4),
            r"head width features/heads = 3 must be even",
        ),
        (
            lambda: jbp.MultiHeadAttention(8, 2, rope_theta=-1.0),
            r"`rope_theta` must be a positive number",
        ),
        (lambda: jbp.GroupNorm(4, 6), r"`features`=6 is not divisible by `groups`=4"),
        (
            lambda: jbp.Dropout(1.0),
            r"`rate` is the probability of dropping a value and must lie in \[0, 1\), got 1.0",
        ),
        (
            lambda: jbp.Parallel([jbp.Dense(2, 2)] * 3, merge="product"),
            r"multiplies exactly two branches, got 3",
        ),
        (
            lambda: jbp.Sequential(
                [jbp.Tied(jbp.Dense(4, 4), source=1, leaves={"w": "w"}), jbp.Dense(4, 4)]
            ),
            r"`layers\[0\]` .* shares leaves of `layers\[1\]`, which must come before it",
        ),
        (
            lambda: jbp.Sequential(
                [jbp.Embedding(6, 4), jbp.Tied(jbp.Dense(4, 6), 0, {"w": "tabel"}, transpose=True)]
            ),
            r"shares leaf 'tabel' of `layers\[0\]` .* which has leaves \['table'\]",
        ),
        (
            lambda: jbp.Sequential(
                [jbp.Embedding(6, 4), jbp.Tied(jbp.Dense(4, 6), 0, {"w": "table"})]
            ),
            r"needs `layers\[0\]`'s 'table' of shape \(4, 6\), but it has shape \(6, 4\)",
        ),
        (
            lambda: jbp.Tied(jbp.Dense(4, 6), 0, {"b": "table"}, transpose=True),
            r"`transpose=True` needs 2-D leaves",
        ),
        (
            lambda: jbp.Tied(jbp.Dense(4, 6), 0, {"v": "table"}),
            r"`leaves` names 'v', but `layer` .* has leaves \['b', 'w'\]",
        ),
        (lambda: jbp.Tied(jbp.Dense(4, 6), -1, {"w": "w"}), r"`source` must be the index"),
        (
            lambda: jbp.Parallel(
                [jbp.Parallel([jbp.Conv(2, 2, 3, stride=2), jbp.Conv(2, 2, 3)], merge="product")]
            ).output_shape((8, 2)),
            r"multiplies its branches' outputs, but branches\[0\] gives shape \(4, 2\) and branches\[1\] gives \(8, 2\)",
        ),
        (  # widths that cannot agree: an error when the Parallel is built
            lambda: jbp.Parallel([jbp.Dense(2, 2), jbp.Dense(2, 3)], merge="product"),
            r"`branches\[1\]` .* gives 3 on the last axis but `branches\[0\]` gives 2; "
            r"merge='product' multiplies outputs of one shape",
        ),
    ],
)
def test_bad_arguments_of_the_new_layers(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_bad_masks_and_keys_are_named():
    net = jbp.Sequential([jbp.Embedding(5, 4), jbp.MultiHeadAttention(4, 2), jbp.Dense(4, 5)])
    params = net.init(jax.random.key(0), F64)
    x = jnp.zeros((2, 3), jnp.int32)
    grad = jbp.backprop(net, "softmax_xent")
    cases = [
        (
            jnp.ones((2, 4), bool),
            r"`mask` must have shape \(batch, T\) = \(2, 3\) .* got shape \(2, 4\)",
        ),
        (jnp.ones((2, 3)), r"`mask` must be boolean \(True at real positions\), got dtype float"),
        (
            jnp.asarray([[True, False, True], [True, True, True]]),
            r"`mask` row 0 is \[1, 0, 1\]: each row must be a prefix",
        ),
    ]
    for mask, message in cases:
        with pytest.raises((TypeError, ValueError), match=message):
            grad(params, x, x, mask=mask)
    with pytest.raises(TypeError, match=r"`dropout_key` must be a PRNG key from jax.random.key"):
        grad(params, x, x, dropout_key=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\] \(or be -1: no target"):
        grad(params, x, x - 2)
    conv = jbp.Sequential([jbp.Dense(2, 3), jbp.Conv(3, 3, 2), jbp.Dense(3, 1)])
    p = conv.init(jax.random.key(0), F64)
    with pytest.raises(
        ValueError,
        match=r"`net.layers\[1\]` \(Conv.* mixes positions and does not take a padding mask",
    ):
        jbp.backprop(conv, "half_sse")(
            p, jnp.zeros((2, 4, 2)), jnp.zeros((2, 4, 1)), mask=jnp.ones((2, 4), bool)
        )
    mlp = jbp.mlp([2, 1])
    with pytest.raises(
        ValueError,
        match=r"`mask` marks the positions of sequences, but `x` holds examples of shape \(2,\)",
    ):
        jbp.backprop(mlp, "half_sse")(
            mlp.init(jax.random.key(0), F64),
            jnp.zeros((3, 2)),
            jnp.zeros((3, 1)),
            mask=jnp.ones((3,), bool),
        )
    custom = jbp.Loss(
        "mine", lambda a, y: jnp.sum((a - y) ** 2, axis=(1, 2)), lambda a, y: 2 * (a - y), "sum"
    )
    seq = jbp.Sequential([jbp.Dense(2, 2), jbp.MultiHeadAttention(2, 1)])
    p = seq.init(jax.random.key(0), F64)
    with pytest.raises(ValueError, match=r"loss 'mine' takes no padding mask"):
        jbp.backprop(seq, custom)(
            p, jnp.zeros((2, 3, 2)), jnp.zeros((2, 3, 2)), mask=jnp.ones((2, 3), bool)
        )
    with pytest.raises(
        TypeError,
        match=r"shares leaves with `layers\[0\]` of its Sequential; it can only run inside",
    ):
        jbp.Tied(jbp.Dense(4, 6), 0, {"w": "w"}).forward({}, jnp.zeros((1, 4)))


# --- training and the command line ------------------------------------------------------


def test_fit_on_padded_sequences_with_dropout_and_the_live_check():
    """The mask reaches every step, evaluation and the live check; the step's own
    key drives dropout."""
    data = jbp.load_dataset("majority", n=96, max_length=6, vocab=3)
    net = jbp.Sequential(
        [
            jbp.Embedding(3, 8),
            jbp.Residual(
                jbp.Sequential(
                    [jbp.RMSNorm(8), jbp.MultiHeadAttention(8, 2, kv_heads=1), jbp.Dropout(0.2)]
                )
            ),
            jbp.GroupNorm(2, 8),
            jbp.GlobalAvgPool(),
            jbp.Dense(8, 3),
        ]
    )
    opt = optax.adam(1e-2)
    whole = jbp.fit(net, "softmax_xent", opt, data, epochs=2, batch_size=32, check_every=2)
    assert all(r["grad_checks"] and r["grad_check_max_rel_err"] <= 1e-4 for r in whole.history)
    ev = jbp.evaluate(
        net, "softmax_xent", whole.state.params, data.x_test, data.y_test, mask=data.mask_test
    )
    assert ev["accuracy"] == whole.history[-1]["test_accuracy"]
    # the step draws its dropout masks from the state's key: two keys, two updates
    step = jbp.make_step(net, "softmax_xent", opt)
    state = jbp.init_state(net, opt, jax.random.key(0))
    x, y, m = data.x_train[:8], data.y_train[:8], data.mask_train[:8]
    one, _ = step(state, x, y, m)
    two, _ = step(state._replace(key=jax.random.key(1)), x, y, m)
    assert not np.array_equal(one.params[1][1]["wq"], two.params[1][1]["wq"])


def test_stdlib_corpus_is_split_by_file_and_padded():
    data = jbp.load_dataset("stdlib", length=32, max_bytes=40_000, test_fraction=0.25)
    assert data.n_classes == 256 and data.x_train.shape[1] == 32 and data.is_sequence
    m = data.mask_train
    assert (~m).any() and m.any(axis=1).all()  # some windows padded, none empty
    assert np.all(data.y_train[~m] == -1) and np.all(data.y_train[m] >= 0)
    # labels are the next byte of the same window
    row = int(np.argmax(m.all(axis=1)))
    np.testing.assert_array_equal(data.x_train[row, 1:], data.y_train[row, :-1])


def test_cli_verify_train_and_bench_llama(tmp_path, capsys):
    from jbp.cli import main

    assert main(["verify", "--count", "1", "--arch", "llama", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "OK: all 1 problems pass" in out
    argv = ["train", "--model", "llama", "--data", "stdlib", "--features", "8", "--heads", "2",
            "--kv-heads", "1", "--tie-embeddings", "--depth", "1", "--max-steps", "3",
            "--check-every", "1", "--batch-size", "8", "--epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "llama: 1 block, 8 features, 2 heads, 1 kv heads, rope, swiglu, tied embeddings" in out
    assert re.search(r"backprop: test accuracy .* bits per answer token after", out), out
    path = tmp_path / "bench.json"
    argv = [
        "bench",
        "--arch",
        "llama",
        "--batches",
        "2",
        "--rounds",
        "3",
        "--only",
        "per_example_norms",
    ]
    assert main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "jbp bench: llama vocab 256, 128 features, 4 heads, 2 kv heads" in out
    summary = json.loads(path.read_text())
    (run,) = summary["runs"]
    assert [r["name"] for r in run["rows"]] == ["jax.grad", "per_example_norms", "dispatch floor"]


@dataclasses.dataclass(frozen=True)
class _Scale(jbp.Layer):
    """out = a ⊙ s, with per-example gradients of its own but no grad_factors."""

    features: int

    def init(self, key, dtype=jnp.float32):
        return {"s": jnp.ones((self.features,), dtype)}

    def forward(self, params, a):
        return a * params["s"][None], a

    def backward(self, params, cache, delta_out):
        return {"s": jnp.sum(delta_out * cache, axis=0)}, delta_out * params["s"][None]

    def per_example_grads(self, params, cache, delta_out):
        return {"s": delta_out * cache}


def test_a_shared_leaf_without_factors_is_named():
    net = jbp.Sequential([_Scale(3), jbp.Tied(_Scale(3), source=0, leaves={"s": "s"})])
    params = net.init(jax.random.key(0), F64)
    x = y = jnp.ones((2, 3))
    g = jbp.backprop(net, "half_sse")(params, x, y)  # gradients need no factors
    _tree_close(g, jax.grad(jbp.objective(net, "half_sse"))(params, x, y))
    with pytest.raises(TypeError, match=r"shares leaves with `layers\[0\]`: per-example"):
        jbp.per_example_norms(net, "half_sse")(params, x, y)
    with pytest.raises(TypeError, match=r"curvature of a shared leaf needs grad_factors"):
        jbp.diag_ggn(net, "half_sse")(params, x, y)
