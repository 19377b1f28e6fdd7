"""Mixed precision: float32 params, bfloat16 (or float16) activations and matmuls with
float32 accumulation, for backprop, per-example norms, clipping, training and verify."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp.cli import main

BF16 = jnp.bfloat16
U = 2.0**-8  # bfloat16's unit round-off
RTOL = 8 * U  # verify's default for a bfloat16 computation (jbp._precision.mixed_rtol)


def _images(key, shape, dtype=BF16):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def _mlp():
    """Dense, Activation, LayerNorm, RMSNorm, Dropout, Parallel (sum, concat), Residual."""
    return jbp.Sequential(
        [
            jbp.Dense(5, 8, "tanh"),
            jbp.LayerNorm(8),
            jbp.Parallel([jbp.Dense(8, 4, "gelu"), jbp.Dense(8, 4, "sigmoid")], merge="concat"),
            jbp.Dropout(0.25),
            jbp.Residual(jbp.Sequential([jbp.RMSNorm(8), jbp.Dense(8, 8, "silu")])),
            jbp.Activation("softplus"),
            jbp.Dense(8, 3),
        ]
    )


def _cnn():
    """Conv (grouped), GroupNorm, MaxPool, AvgPool, Residual, GlobalAvgPool."""
    return jbp.Sequential(
        [
            jbp.Conv(2, 4, (3, 3), "relu"),
            jbp.GroupNorm(2, 4),
            jbp.MaxPool((2, 2)),
            jbp.Residual(jbp.Conv(4, 4, (3, 3), "elu", groups=2)),
            jbp.AvgPool((2, 2), stride=1, padding="SAME"),
            jbp.GlobalAvgPool(),
            jbp.Dense(4, 10),
        ]
    )


def _small_cnn():
    """A Conv (an outer factor over 16 positions: the ghost-norm form), Flatten, Dense."""
    return jbp.Sequential([jbp.Conv(2, 3, (3, 3), "tanh", stride=2), jbp.Flatten(),
                           jbp.Dense(48, 10)])  # fmt: skip


def _llama():
    """Embedding, Cast, grouped-query attention with RoPE, swiglu (Parallel product),
    RMSNorm, tied embeddings."""
    net = jbp.llama(11, 8, 2, 1, kv_heads=1, tie_embeddings=True)
    return jbp.Sequential([net.layers[0], jbp.Cast("bfloat16"), *net.layers[1:]])


def _transformer():
    """PositionalEmbedding, LayerNorm, causal attention with biases, a padding mask."""
    net = jbp.transformer(11, 6, 8, 2, 1)
    return jbp.Sequential([net.layers[0], jbp.Cast("bfloat16"), *net.layers[1:]])


TOKENS = jax.random.randint(jax.random.key(3), (3, 6), 0, 11)
MASK = jnp.array([[True] * 6, [True] * 4 + [False] * 2, [True] * 5 + [False]])
FAMILIES = {
    "mlp": (_mlp, lambda: (_images(1, (6, 5)), _images(2, (6, 3), jnp.float32)), "mse", {}),
    "cnn": (
        _cnn,
        lambda: (_images(1, (4, 6, 6, 2)), jnp.arange(4) % 10),
        "softmax_xent",
        {},
    ),
    "llama": (_llama, lambda: (TOKENS, jnp.where(MASK, TOKENS, -1)), "softmax_xent", {}),
    "transformer": (_transformer, lambda: (TOKENS, TOKENS), "softmax_xent", {"mask": MASK}),
}


@pytest.mark.parametrize(
    "family",
    # the transformer's layers are the llama's but for the norm and the MLP: slow only
    [
        pytest.param(f, marks=pytest.mark.slow) if f == "transformer" else f
        for f in sorted(FAMILIES)
    ],
)
def test_a_bfloat16_network_verifies_against_autodiff_within_8u(family):
    build, data, loss, kw = FAMILIES[family]
    net, (x, y) = build(), data()
    params = net.init(jax.random.key(0), jnp.float32)
    if family == "mlp":
        kw = {"dropout_key": jax.random.key(7)}
    report = jbp.verify(net, loss, params, x, y, **kw)
    assert report.ok, report
    assert report.rtol == RTOL and any("bfloat16" in n for n in report.notes)
    assert report.max_rel_err <= RTOL
    grads = jbp.backprop(net, loss)(params, x, y, **kw)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.dtype == p.dtype == jnp.float32
    assert net.apply(params, x, **({"mask": kw["mask"]} if "mask" in kw else {})).dtype == BF16


def test_bfloat16_gradients_are_as_close_to_float64_as_autodiffs():
    """Against the float64 gradient of the unrounded network, jbp's bfloat16 gradient is
    as accurate as autodiff's of the same bfloat16 program (neither is exact: rounding
    moves relu kinks and max-pool choices, errors of many u)."""
    net, x, y = _small_cnn(), _images(1, (4, 8, 8, 2)), jnp.arange(4) % 10
    params = net.init(jax.random.key(0), jnp.float32)
    objective = jbp.objective(net, "softmax_xent")
    ours = jax.jit(jbp.backprop(net, "softmax_xent"))(params, x, y)
    autodiff = jax.jit(jax.grad(objective))(params, x, y)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        truth = jax.jit(jax.grad(objective))(p64, x.astype(jnp.float64), y)
    ours_err = jbp.compare(ours, truth).max_rel_err
    autodiff_err = jbp.compare(autodiff, truth).max_rel_err
    assert ours_err <= 1.5 * autodiff_err + U, (ours_err, autodiff_err)


def test_float16_computes_in_float16_with_its_own_tolerance():
    net, (x, y) = _mlp(), FAMILIES["mlp"][1]()
    params = net.init(jax.random.key(0), jnp.float32)
    x16 = x.astype(jnp.float16)
    assert net.apply(params, x16).dtype == jnp.float16
    report = jbp.verify(net, "mse", params, x16, y)
    assert report.ok and report.rtol == 8 * 2.0**-11, report


def test_a_delta_rule_off_by_32u_fails_and_is_blamed():
    class Off(jbp.Dense):
        def backward(self, params, cache, delta_out):
            grads, delta_in = super().backward(params, cache, delta_out)
            return {**grads, "w": grads["w"] * (1 + 32 * U)}, delta_in

    net = jbp.Sequential([jbp.Dense(5, 6, "tanh"), Off(6, 3)])
    params = net.init(jax.random.key(0), jnp.float32)
    x, y = FAMILIES["mlp"][1]()
    report = jbp.verify(net, "mse", params, x, y)
    assert not report.ok and report.blame == "layers[1]"
    assert RTOL < report.max_rel_err < 64 * U


def test_per_example_norms_and_clipping_in_bfloat16():
    """Factors in float32: the norms and the clipped sum agree with those of the
    per-example gradients (each example's bfloat16 backprop) to a few u."""
    net, x, y = _small_cnn(), _images(1, (4, 8, 8, 2)), jnp.arange(4) % 10
    params = net.init(jax.random.key(0), jnp.float32)
    grad = jbp.backprop(net, "softmax_xent")
    per_ex = jax.vmap(grad, in_axes=(None, 0, 0))(params, x, y)
    flat = jnp.concatenate([g.reshape(g.shape[0], -1) for g in jax.tree.leaves(per_ex)], 1)
    want = jnp.linalg.norm(flat, axis=1)
    norms = jbp.per_example_norms(net, "softmax_xent")(params, x, y)
    assert norms.dtype == jnp.float32
    np.testing.assert_allclose(norms, want, rtol=RTOL)
    c = 0.5 * float(jnp.median(want))
    clipped, unclipped = jbp.clipped_grad(net, "softmax_xent", c)(params, x, y)
    np.testing.assert_allclose(unclipped, norms, rtol=RTOL)
    weights = jnp.minimum(1.0, c / want) / len(want)  # softmax_xent: the mean
    expected = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), per_ex)
    assert jbp.compare(clipped, expected, rtol=RTOL).ok
    for g in jax.tree.leaves(clipped):
        assert g.dtype == jnp.float32


def test_mixed_precision_bad_inputs_have_clear_errors():
    net = jbp.mlp([5, 3])
    x = _images(1, (4, 5))
    with jax.enable_x64(True):
        p64 = net.init(jax.random.key(0), jnp.float64)
        with pytest.raises(
            TypeError,
            match=r"`x` has dtype bfloat16 but params are float64.*"
            r"mixed precision takes float32 params with bfloat16 or float16 x",
        ):
            jbp.backprop(net, "mse")(p64, x, jnp.zeros((4, 3)))
    p16 = net.init(jax.random.key(0), BF16)
    with pytest.raises(TypeError, match=r"`x` has dtype float32 but params are bfloat16; cast x"):
        net.apply(p16, x.astype(jnp.float32))
    with pytest.raises(TypeError, match=r"`dtype` must be a floating dtype.*got int32"):
        jbp.Cast(jnp.int32)
    lstm = jbp.Sequential([jbp.Cast("bfloat16"), jbp.LSTM(3, 4)])
    params = lstm.init(jax.random.key(0), jnp.float32)
    with pytest.raises(
        TypeError,
        match=r"LSTM.* has no mixed precision: it got bfloat16 "
        r"activations with float32 params; put jbp.Cast\('float32'\)",
    ):
        lstm.apply(params, jnp.ones((2, 5, 3), jnp.float32))


def test_cast_switches_the_compute_dtype_and_back():
    net = jbp.Sequential([jbp.Cast("bfloat16"), jbp.Dense(5, 4, "relu"), jbp.Cast(jnp.float32),
                          jbp.Dense(4, 3)])  # fmt: skip
    assert net.layers[0] == jbp.Cast(BF16) and repr(net.layers[0]) == "Cast(dtype='bfloat16')"
    params = net.init(jax.random.key(0), jnp.float32)
    x = _images(1, (6, 5), jnp.float32)
    out, caches = net.forward(params, x)
    assert out.dtype == jnp.float32 and caches[1][0].dtype == BF16
    report = jbp.verify(net, "half_sse", params, x, jnp.zeros((6, 3), jnp.float32))
    assert report.ok and report.rtol == RTOL, report


def test_jbp_train_bfloat16_trains_with_float32_params(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--dtype", "bfloat16", "--hidden", "16", "--epochs",
            "2", "--batch-size", "128", "--lr", "3e-3", "--check-every", "5", "--run-dir",
            str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mixed precision (float32 params, bfloat16 compute)" in out
    with open(tmp_path / "metrics.jsonl") as f:
        history = [json.loads(line) for line in f]
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert len(losses) == 2 and losses[1] < losses[0] < 2.5, losses
    with np.load(tmp_path / "checkpoint.npz") as saved:
        floats = [saved[k].dtype for k in saved.files if saved[k].dtype.kind == "f"]
    assert floats and all(dt == np.float32 for dt in floats)
    argv = ["train", "--model", "lstm", "--data", "digits", "--dtype", "bfloat16"]
    assert main(argv) == 2
    assert "--model lstm has no mixed precision" in capsys.readouterr().err
