"""Unit tests of the building blocks: activations, losses, layers, the public façade."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import _activations, _losses

Z = jnp.concatenate([jnp.linspace(-6.0, 6.0, 241, dtype=jnp.float64), jnp.array([-30.0, 30.0])])

PUBLIC = [
    "Activation", "ActivationFn", "Dense", "FiniteDifferenceCheck", "GradientMismatch", "Layer",
    "LeafRow", "Loss", "Report", "Sequential", "TaylorCheck", "activation_names", "backprop",
    "compare", "loss_names", "mlp", "objective", "register_activation", "value_and_backprop",
    "verify",
    # the trainer and data sets
    "CheckpointError", "Dataset", "FitResult", "TrainState", "TrainingError", "batches",
    "dataset_names", "evaluate", "fit", "init_state", "load_checkpoint", "load_dataset",
    "make_step", "plot_curves", "save_checkpoint", "targets", "make_dp_step",
    # per-example analysis
    "NoiseScale", "clipped_grad", "dp_grad", "grad_variance", "gradient_noise_scale",
    "per_example_grads", "per_example_norms", "sum_grad_squared",
    "LabelNoiseStudy", "auroc", "flip_labels", "label_noise_study", "plot_label_noise",
    "precision_at_k",
    # devices
    "batch_sharded", "data_parallel_step", "is_main_process", "make_mesh", "process_rows",
    "replicate", "replicated", "shard_batch",
    # benchmarks and sweeps
    "BENCH_FUNCTIONS", "BENCH_TARGETS", "BenchRow", "BenchTarget", "MATERIALISING",
    "ScalingRow", "benchmark", "benchmark_scaling", "check_targets", "format_benchmark",
    "format_scaling", "format_targets", "random_problem", "BENCH_TARGETS_CNN",
    "CNN_BENCH_FUNCTIONS",
    # arbitrary architectures: layers, combinators, shape errors, the layer checker
    "AvgPool", "Conv", "Flatten", "GlobalAvgPool", "LayerNorm", "MaxPool", "Parallel",
    "RMSNorm", "Residual", "ShapeError", "check_layer", "check_vjp",
    # sequence models
    "Embedding", "MultiHeadAttention", "PositionalEmbedding", "transformer",
    "BENCH_TARGETS_TRANSFORMER", "TRANSFORMER_BENCH_FUNCTIONS",
    # curvature
    "sqrt_ggn", "diag_ggn", "per_example_diag_ggn", "kfac", "ggn_vector_product",
    "diag_hessian", "KroneckerFactors", "check_curvature", "CurvatureReport", "CurvatureRow",
    "ZERO", "benchmark_curvature", "BENCH_TARGETS_CURVATURE", "CURVATURE_BENCH_FUNCTIONS",
    # modern transformers: gates, shared weights, padding, dropout
    "Context", "Cast", "Dropout", "GroupNorm", "Tied", "llama", "swiglu", "BENCH_TARGETS_LLAMA",
    "LLAMA_BENCH_FUNCTIONS",
    # recurrent networks
    "RNN", "LSTM", "GRU", "Cell", "RNNCell", "LSTMCell", "GRUCell", "Recurrent", "Reverse",
    "bidirectional", "BENCH_TARGETS_LSTM", "LSTM_BENCH_FUNCTIONS",
    # private training
    "Privacy", "PoissonSampler", "dp_epsilon", "dp_noise_multiplier", "benchmark_dp", "audit_epsilon",
    "BENCH_TARGETS_DP", "DP_BENCH_FUNCTIONS",
    # data attribution
    "per_example_dots", "TracIn", "InRunShapley", "Proponents",
]  # fmt: skip


@pytest.mark.parametrize("name", PUBLIC)
def test_public_names(name):
    assert hasattr(jbp, name), name


def test_the_public_list_is_complete():
    exported = {
        n for n, v in vars(jbp).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    }  # fmt: skip
    assert exported == set(PUBLIC)


@pytest.mark.parametrize("name", _activations.activation_names())
def test_activation_derivative_matches_autodiff(name):
    act = _activations.get_activation(name)
    out = act.f(Z)
    ref = jax.vmap(jax.grad(act.f))(Z)  # reference
    np.testing.assert_allclose(act.derivative(Z, out), ref, rtol=1e-12, atol=1e-14)
    g = jnp.cos(3 * Z)  # an arbitrary upstream gradient
    np.testing.assert_allclose(act.backward(g, Z, out), g * ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", _activations.activation_names())
def test_activation_derivative_is_differentiable(name):
    """Forward-mode through the δ rule is f'' (what jacfwd(backprop) relies on)."""
    act = _activations.get_activation(name)
    z = jnp.linspace(-3.0, 3.0, 61, dtype=jnp.float64) + 0.013  # avoid relu kinks at 0
    d2 = jax.vmap(jax.grad(lambda t: act.backward(jnp.ones_like(t), t, act.f(t))))(z)
    ref = jax.vmap(jax.grad(jax.grad(act.f)))(z)  # reference
    np.testing.assert_allclose(d2, ref, rtol=1e-10, atol=1e-12)


# The δ rules mirror the operation order of JAX's own reverse-mode rules, as
# written in jax 0.10; a later JAX that reorders a rule changes only this test.
MIRRORED_JAX = jax.__version__.startswith("0.10.")


@pytest.mark.skipif(not MIRRORED_JAX, reason=f"rules mirrored from jax 0.10, not {jax.__version__}")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", _activations.activation_names())
def test_activation_delta_is_bitwise_jax_vjp(name, dtype):
    act = _activations.get_activation(name)
    z = 3 * jax.random.normal(jax.random.key(0), (4096,), dtype)
    g = jax.random.normal(jax.random.key(1), (4096,), dtype)
    ref = jax.jit(lambda z, g: jax.vjp(act.f, z)[1](g)[0])(z, g)  # reference
    got = jax.jit(lambda z, g: act.backward(g, z, act.f(z)))(z, g)
    assert np.array_equal(np.asarray(got), np.asarray(ref)), float(jnp.max(jnp.abs(got - ref)))


@pytest.mark.skipif(not MIRRORED_JAX, reason=f"rules mirrored from jax 0.10, not {jax.__version__}")
@pytest.mark.parametrize("loss", ["half_sse", "mse"])
def test_regression_loss_delta_is_bitwise_jax_grad(loss):
    a = jax.random.normal(jax.random.key(0), (7, 3), jnp.float32)
    y = jax.random.normal(jax.random.key(1), (7, 3), jnp.float32)
    fn = _losses.get_loss(loss)
    ref = jax.grad(lambda a: fn(a, y))(a)  # reference
    assert np.array_equal(np.asarray(fn.batch_delta(a, y)), np.asarray(ref))


def test_register_activation_is_used_by_dense():
    jbp.register_activation("test_cube", lambda z: z**3, lambda z, out: 3 * z**2, overwrite=True)
    assert "test_cube" in jbp.activation_names()
    net = jbp.mlp([3, 4, 2], "test_cube")
    p = net.init(jax.random.key(1), jnp.float64)
    x = jax.random.normal(jax.random.key(2), (6, 3), jnp.float64)
    y = jnp.zeros((6, 2))
    jbp.verify(net, "half_sse", p, x, y, finite_differences=True).raise_if_failed()


@pytest.mark.parametrize("name", jbp.loss_names())
def test_loss_delta_is_gradient_of_per_example(name):
    loss = _losses.get_loss(name)
    key = jax.random.key(0)
    a = 3 * jax.random.normal(key, (7, 4), jnp.float64)
    if name == "softmax_xent":
        ys = [jnp.array([0, 3, 2, 1, 0, 3, 2]), jax.nn.softmax(jax.random.normal(key, (7, 4)))]
    elif name == "sigmoid_bce":
        ys = [jax.random.uniform(key, (7, 4), jnp.float64)]
    else:
        ys = [jax.random.normal(jax.random.fold_in(key, 1), (7, 4), jnp.float64)]
    for y in ys:
        ref = jax.vmap(jax.grad(lambda ai, yi: loss.per_example(ai[None], yi[None])[0]))(
            a, y
        )  # reference
        np.testing.assert_allclose(loss.delta(a, y), ref, rtol=1e-12, atol=1e-14)


def test_loss_conventions_against_their_definitions():
    a = jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    y = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.5]])
    r = a - y
    np.testing.assert_allclose(_losses.HALF_SSE(a, y), 0.5 * float(jnp.sum(r**2)))
    np.testing.assert_allclose(_losses.MSE(a, y), float(jnp.mean(jnp.mean(r**2, axis=1))))
    bce = -(y * jnp.log(jax.nn.sigmoid(a)) + (1 - y) * jnp.log(1 - jax.nn.sigmoid(a)))
    np.testing.assert_allclose(_losses.SIGMOID_BCE(a, y), float(jnp.sum(bce)), rtol=1e-12)
    labels = jnp.array([2, 1])
    p = jax.nn.softmax(a, axis=1)
    xent = -jnp.mean(jnp.log(p[jnp.arange(2), labels]))
    np.testing.assert_allclose(_losses.SOFTMAX_XENT(a, labels), float(xent), rtol=1e-12)
    np.testing.assert_allclose(
        _losses.SOFTMAX_XENT(a, jax.nn.one_hot(labels, 3, dtype=a.dtype)), float(xent), rtol=1e-12
    )


@pytest.mark.parametrize("name", ["sigmoid_bce", "softmax_xent"])
def test_logit_losses_are_stable_at_extreme_logits(name):
    net = jbp.Sequential([jbp.Dense(2, 2, bias=False)])
    p = ({"w": jnp.array([[800.0, -800.0], [0.0, 0.0]])},)
    x = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
    y = jnp.array([1, 0]) if name == "softmax_xent" else jnp.array([[0.0, 1.0], [1.0, 0.0]])
    value, grads = jbp.value_and_backprop(net, name)(p, x, y)
    assert np.isfinite(value) and value > 100  # confidently wrong: a large, finite loss
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    jbp.verify(net, name, p, x, y).raise_if_failed()


def test_layers_are_hashable_static_pytrees():
    net = jbp.mlp([3, 5, 2], "relu", final_activation="sigmoid", bias=False)
    assert hash(net) == hash(jbp.mlp([3, 5, 2], "relu", final_activation="sigmoid", bias=False))
    assert jax.tree.leaves(net) == []
    p = net.init(jax.random.key(0), jnp.float64)
    assert set(p[0]) == {"w"} and p[0]["w"].shape == (3, 5)
    x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
    f = jax.jit(lambda net, p, x: net.apply(p, x))
    np.testing.assert_array_equal(f(net, p, x), net.apply(p, x))


def test_mlp_follows_equinox_convention():
    net = jbp.mlp([4, 2, 2, 1], activation="sigmoid", final_activation="sigmoid")
    assert [layer.activation for layer in net.layers] == ["sigmoid"] * 3
    net = jbp.mlp([4, 8, 3])
    assert [layer.activation for layer in net.layers] == ["relu", "identity"]
    assert net.fan_in == 4 and net.fan_out == 3


def test_init_scales():
    he = jbp.Dense(400, 300, "relu").init(jax.random.key(0), jnp.float64)
    glorot = jbp.Dense(400, 300, "tanh").init(jax.random.key(0), jnp.float64)
    np.testing.assert_allclose(jnp.std(he["w"]), np.sqrt(2 / 400), rtol=0.02)
    np.testing.assert_allclose(jnp.std(glorot["w"]), np.sqrt(2 / 700), rtol=0.02)
    assert not jnp.any(he["b"])


def test_single_example_and_list_params():
    net = jbp.mlp([3, 4, 2], "tanh")
    p = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (3,), jnp.float64)
    y = jnp.array([0.5, -0.5])
    assert net.apply(p, x).shape == (2,)
    g1 = jbp.backprop(net, "half_sse")(p, x, y)
    g2 = jbp.backprop(net, "half_sse")(p, x[None], y[None])
    jbp.compare(g1, g2).raise_if_failed()
    gl = jbp.backprop(net, "half_sse")(list(p), x, y)
    assert isinstance(gl, list)
    assert jbp.compare(tuple(gl), jax.grad(jbp.objective(net, "half_sse"))(p, x, y)).ok


def test_activation_layers_anywhere():
    net = jbp.Sequential(
        [
            jbp.Activation("sin"),
            jbp.Dense(3, 4, "relu"),
            jbp.Activation("tanh"),
            jbp.Dense(4, 2, bias=False),
            jbp.Activation("sigmoid"),
        ]
    )
    p = net.init(jax.random.key(0), jnp.float64)
    assert p[0] == {} and p[2] == {} and p[4] == {}
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    y = jax.random.uniform(jax.random.key(2), (5, 2), jnp.float64)
    jbp.verify(net, "half_sse", p, x, y, finite_differences=True).raise_if_failed()


def test_report_table_and_first_mismatch():
    net = jbp.mlp([3, 4, 4, 2], "tanh")
    p = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    y = jnp.zeros((5, 2))
    report = jbp.verify(net, "half_sse", p, x, y)
    text = str(report)
    assert report.ok and "OK" in text and "params[1]['w']" in text and "(4, 4)" in text
    assert "matmul precision highest" in text and "float64" in text
    assert 0 <= report.n_bitwise <= len(report.rows) == 6
    good = jbp.backprop(net, "half_sse")(p, x, y)
    bad = (good[0], {**good[1], "w": good[1]["w"] * 1.001}, good[2])
    mismatch = jbp.compare(bad, good)
    assert not mismatch.ok
    assert mismatch.first_mismatch.path == "params[1]['w']"
    with pytest.raises(jbp.GradientMismatch) as info:
        mismatch.raise_if_failed()
    assert info.value.report is mismatch
    assert "first mismatch: params[1]['w']" in str(info.value)


def test_compare_zero_leaf_uses_global_scale():
    ref = {"a": jnp.array([10.0, -10.0]), "z": jnp.zeros(3)}
    near = {"a": ref["a"], "z": jnp.array([1e-12, 0.0, 0.0])}
    assert jbp.compare(near, ref).ok
    far = {"a": ref["a"], "z": jnp.array([1e-3, 0.0, 0.0])}
    assert not jbp.compare(far, ref).ok


def test_compare_a_leaf_zero_to_round_off_uses_global_scale():
    """Both sides of a gradient that is zero in exact arithmetic hold round-off
    (e.g. attention's key bias): measured against the largest leaf, they agree;
    a small leaf that is not round-off is still measured against itself."""
    ref = {"a": jnp.array([1.0, -2.0]), "z": jnp.array([2e-16, -1e-16])}
    noise = {"a": ref["a"], "z": jnp.array([-7e-16, 9e-16])}
    report = jbp.compare(noise, ref)
    assert report.ok and report.rows[1].scale == 2.0
    small = {"a": ref["a"], "z": jnp.array([1e-6, 0.0])}
    off = {"a": ref["a"], "z": jnp.array([1.1e-6, 0.0])}
    report = jbp.compare(off, small)
    assert not report.ok and report.rows[1].scale == pytest.approx(1e-6)


def test_finite_differences_catch_a_wrong_derivative():
    jbp.register_activation(
        "test_bad_tanh", jnp.tanh, lambda z, out: 1 - 0.9 * out * out, overwrite=True
    )
    net = jbp.mlp([3, 4, 2], "test_bad_tanh")
    p = net.init(jax.random.key(0))  # float32 network: the oracles run in float64
    x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float32)
    y = jnp.zeros((5, 2), jnp.float32)
    report = jbp.verify(net, "half_sse", p, x, y, finite_differences=True)
    assert not report.ok
    assert not report.finite_differences.ok
    assert not report.taylor.ok and 0.8 < report.taylor.order < 1.3
    assert report.first_mismatch.layer == 0


def test_jit_equals_no_jit():
    net = jbp.mlp([3, 6, 6, 2], "gelu")
    p = net.init(jax.random.key(0), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (9, 3), jnp.float64)
    y = jnp.array([0, 1, 1, 0, 1, 0, 0, 1, 1])
    f = jbp.backprop(net, "softmax_xent")
    jbp.compare(jax.jit(f)(p, x, y), f(p, x, y), rtol=1e-13).raise_if_failed()


def test_verify_user_layer_readme_example():
    @dataclasses.dataclass(frozen=True)
    class Scale(jbp.Layer):
        """out = a * s, one learned scale per feature."""

        features: int

        def init(self, key, dtype=jnp.float32):
            return {"s": jnp.ones((self.features,), dtype)}

        def forward(self, params, a):
            return a * params["s"][None, :], a

        def backward(self, params, cache, delta_out):
            a = cache
            return {"s": jnp.sum(delta_out * a, axis=0)}, delta_out * params["s"][None, :]

    net = jbp.Sequential([jbp.Dense(3, 4, "tanh"), Scale(4), jbp.Dense(4, 1)])
    p = net.init(jax.random.key(0), jnp.float64)
    p = (p[0], {"s": jnp.array([0.5, -1.0, 2.0, 1.5])}, p[2])
    x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (8, 1), jnp.float64)
    jbp.verify(net, "mse", p, x, y, finite_differences=True).raise_if_failed()
