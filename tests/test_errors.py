"""Every bad-input message: it names the argument, the expectation and what was given."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp

NET = jbp.mlp([4, 3, 2], "tanh")


@pytest.fixture
def params():
    return NET.init(jax.random.key(0), jnp.float64)


X = jnp.ones((5, 4), jnp.float64)
Y = jnp.zeros((5, 2), jnp.float64)


def _both(fn_name):
    """backprop, objective and value_and_backprop all check the same way."""
    return getattr(jbp, fn_name)(NET, "half_sse")


FNS = ["backprop", "objective", "value_and_backprop"]


@pytest.mark.parametrize("fn", FNS)
def test_x_feature_mismatch(fn, params):
    with pytest.raises(
        ValueError, match=r"`x` has 5 features but the first layer expects fan_in=4"
    ):
        _both(fn)(params, jnp.ones((5, 5), jnp.float64), Y)


def test_x_feature_mismatch_single_example(params):
    with pytest.raises(ValueError, match=r"`x` has 3 features .* fan_in=4"):
        jbp.backprop(NET, "half_sse")(params, jnp.ones((3,), jnp.float64), jnp.zeros(2))


def test_x_feature_mismatch_under_jit_and_vmap(params):
    f = jax.jit(jbp.backprop(NET, "half_sse"))
    with pytest.raises(ValueError, match=r"`x` has 5 features"):
        f(params, jnp.ones((5, 5), jnp.float64), Y)
    g = jax.vmap(jbp.backprop(NET, "half_sse"), in_axes=(None, 0, 0))
    with pytest.raises(ValueError, match=r"`x` has 6 features"):
        g(params, jnp.ones((5, 6), jnp.float64), Y)


def test_x_rank(params):
    with pytest.raises(
        ValueError,
        match=r"`x` must have shape \(batch, fan_in\) or \(fan_in,\), got shape \(2, 5, 4\)",
    ):
        jbp.backprop(NET, "half_sse")(params, jnp.ones((2, 5, 4), jnp.float64), Y)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_x_integer(params, dtype):
    with pytest.raises(
        TypeError,
        match=r"`x` has dtype (int32|bool); inputs must be floating: cast with x.astype\(float64\)",
    ):
        jbp.backprop(NET, "half_sse")(params, jnp.ones((5, 4), dtype), Y)


def test_x_complex(params):
    with pytest.raises(TypeError, match=r"`x` has complex dtype complex128"):
        jbp.backprop(NET, "half_sse")(params, jnp.ones((5, 4), jnp.complex128), Y)


def test_x_dtype_differs_from_params(params):
    with pytest.raises(TypeError, match=r"`x` has dtype float32 but params are float64"):
        jbp.backprop(NET, "half_sse")(params, jnp.ones((5, 4), jnp.float32), Y)


def test_empty_batch(params):
    with pytest.raises(ValueError, match=r"`x` has an empty batch"):
        jbp.backprop(NET, "half_sse")(params, jnp.ones((0, 4), jnp.float64), jnp.zeros((0, 2)))


@pytest.mark.parametrize("fn", FNS)
def test_y_shape_mismatch(fn, params):
    with pytest.raises(
        ValueError, match=r"`y` has shape \(5, 3\) but the network output has shape \(5, 2\)"
    ):
        _both(fn)(params, X, jnp.zeros((5, 3)))


def test_y_batch_mismatch(params):
    with pytest.raises(
        ValueError, match=r"`y` has shape \(4, 2\) but the network output has shape \(5, 2\)"
    ):
        jbp.backprop(NET, "half_sse")(params, X, jnp.zeros((4, 2)))


def test_y_missing_output_axis_hint():
    net = jbp.mlp([4, 3, 1], "tanh")
    p = net.init(jax.random.key(0), jnp.float64)
    with pytest.raises(ValueError, match=r"add the output axis with y\[:, None\]"):
        jbp.backprop(net, "half_sse")(p, X, jnp.zeros((5,)))


def test_y_complex(params):
    with pytest.raises(TypeError, match=r"`y` has complex dtype"):
        jbp.backprop(NET, "half_sse")(params, X, jnp.zeros((5, 2), jnp.complex128))


def test_softmax_labels_wrong_shape(params):
    with pytest.raises(
        ValueError,
        match=r"`y` holds integer labels of shape \(5, 1\) but loss 'softmax_xent' .* expects labels of shape \(5,\)",
    ):
        jbp.backprop(NET, "softmax_xent")(params, X, jnp.zeros((5, 1), jnp.int32))


def test_softmax_labels_out_of_range(params):
    labels = jnp.array([0, 1, 2, 0, 1])
    with pytest.raises(
        ValueError,
        match=r"`y` has labels in \[0, 2\] but the network has 2 outputs, so labels must lie in "
        r"\[0, 1\] \(or be -1: no target at that position\); the first outside is y\[2\] = 2$",
    ):
        jbp.backprop(NET, "softmax_xent")(params, X, labels)
    # under jit the labels cannot be read: NaN, not a label clamped or wrapped into range
    loss, grads = jax.jit(jbp.value_and_backprop(NET, "softmax_xent"))(params, X, labels)
    assert np.isnan(loss) and all(np.isnan(g).any() for g in jax.tree.leaves(grads))


EMBED = jbp.Sequential([jbp.Embedding(5, 4), jbp.Dense(4, 3)])
TOKENS = jnp.array([[0, 1, 2], [3, 4, 1]], jnp.int32)
TOKEN_LABELS = jnp.array([[0, 1, 2], [1, -1, 0]], jnp.int32)


def test_tokens_and_labels_out_of_range_are_errors_where_read_and_nan_under_jit():
    rng = np.random.default_rng(0)
    params = ({"table": rng.normal(size=(5, 4))}, {"w": rng.normal(size=(4, 3)), "b": np.zeros(3)})
    cases = [  # x, y, the example that holds the bad value, the message
        (TOKENS.at[1, 2].set(-1), TOKEN_LABELS, 1,
         r"^`x` has tokens in \[-1, 4\] but the first layer has vocab=5, so tokens must lie in "
         r"\[0, 4\]; the first outside is x\[1, 2\] = -1$"),
        (TOKENS.at[0, 1].set(5), TOKEN_LABELS, 0, r"; the first outside is x\[0, 1\] = 5$"),
        (TOKENS, TOKEN_LABELS.at[1, 2].set(3), 1,
         r"^`y` has labels in \[-1, 3\] but the network has 3 outputs, so labels must lie in "
         r"\[0, 2\] \(or be -1: no target at that position\); the first outside is y\[1, 2\] = 3$"),
        (TOKENS, TOKEN_LABELS.at[0, 1].set(-2), 0, r"; the first outside is y\[0, 1\] = -2$"),
    ]  # fmt: skip
    for x, y, _, message in cases:
        with pytest.raises(ValueError, match=message):
            jbp.backprop(EMBED, "softmax_xent")(params, x, y)
    with pytest.raises(ValueError, match=r"; the first outside is x\[2\] = 9$"):  # one example
        jbp.backprop(EMBED, "softmax_xent")(params, TOKENS[0].at[2].set(9), TOKEN_LABELS[0])

    @jax.jit
    def step(params, x, y):
        loss, grads = jbp.value_and_backprop(EMBED, "softmax_xent")(params, x, y)
        return loss, grads, jbp.per_example_norms(EMBED, "softmax_xent")(params, x, y)

    loss, grads, norms = step(params, TOKENS, TOKEN_LABELS)
    assert np.isfinite(loss) and np.isfinite(norms).all()
    for x, y, bad, _ in cases:
        loss, grads, norms = step(params, x, y)
        assert np.isnan(loss), (x, y)
        assert all(np.isnan(g).any() for g in jax.tree.leaves(grads)), (x, y)
        assert np.isnan(norms[bad]) and np.isfinite(norms[1 - bad]), (x, y)


def test_softmax_targets_wrong_shape_mentions_labels(params):
    with pytest.raises(ValueError, match=r"also takes integer labels of shape \(5,\)"):
        jbp.backprop(NET, "softmax_xent")(params, X, jnp.zeros((5, 3)))


def test_params_wrong_length(params):
    with pytest.raises(ValueError, match=r"`params` has 1 entries but the network has 2 layers"):
        jbp.backprop(NET, "half_sse")(params[:1], X, Y)


def test_params_not_a_tuple(params):
    with pytest.raises(
        TypeError, match=r"`params` must be a tuple with one entry per layer .* got dict"
    ):
        jbp.backprop(NET, "half_sse")({"w": 1}, X, Y)


def test_params_wrong_tree(params):
    bad = (params[0], {"w": params[1]["w"]})
    with pytest.raises(
        ValueError,
        match=r"`params\[1\]` has structure .* but layer 1 \(Dense\(fan_in=3, fan_out=2.*\) expects",
    ):
        jbp.backprop(NET, "half_sse")(bad, X, Y)


def test_params_wrong_shape(params):
    bad = (params[0], {"w": params[1]["w"].T, "b": params[1]["b"]})
    with pytest.raises(
        ValueError, match=re.escape("`params[1]['w']` has shape (2, 3) but layer 1")
    ):
        jbp.backprop(NET, "half_sse")(bad, X, Y)


def test_params_dtype_mixture(params):
    bad = (params[0], {"w": params[1]["w"].astype(jnp.float32), "b": params[1]["b"]})
    with pytest.raises(
        TypeError,
        match=r"`params` mixes dtypes: params\[0\]\['b'\] is float64 but params\[1\]\['w'\] is float32",
    ):
        jbp.backprop(NET, "half_sse")(bad, X, Y)


def test_params_integer(params):
    bad = jax.tree.map(lambda a: a.astype(jnp.int32), params)
    with pytest.raises(
        TypeError, match=r"`params\[0\]\['b'\]` has dtype int32; params must be real floating"
    ):
        jbp.backprop(NET, "half_sse")(bad, X, Y)


def test_params_not_arrays(params):
    bad = (params[0], {"w": [[1.0]], "b": params[1]["b"]})
    with pytest.raises(TypeError, match=r"must be an array, got"):
        jbp.backprop(NET, "half_sse")(bad, X, Y)


def test_unknown_activation_lists_known():
    with pytest.raises(
        ValueError, match=r"unknown activation 'sigmod'; known activations: .*sigmoid.*tanh"
    ):
        jbp.Dense(2, 3, "sigmod")
    with pytest.raises(ValueError, match=r"unknown activation 'rel'"):
        jbp.Activation("rel")
    with pytest.raises(ValueError, match=r"unknown activation"):
        jbp.mlp([2, 3], activation="swishy", final_activation="swishy")


def test_unknown_loss_lists_known():
    with pytest.raises(
        ValueError,
        match=r"unknown loss 'hinge'; known losses: half_sse, mse, sigmoid_bce, softmax_xent",
    ):
        jbp.backprop(NET, "hinge")
    with pytest.raises(ValueError, match=r"unknown loss"):
        jbp.objective(NET, "hinge")


def test_empty_network():
    with pytest.raises(ValueError, match=r"`layers` is empty: a network needs at least one layer"):
        jbp.Sequential([])
    with pytest.raises(ValueError, match=r"`sizes` needs at least two entries"):
        jbp.mlp([3])


def test_layers_not_layers():
    with pytest.raises(TypeError, match=r"`layers\[1\]` is 3, which is not a layer"):
        jbp.Sequential([jbp.Dense(2, 3), 3])
    with pytest.raises(TypeError, match=r"`layers` must be a sequence of layers, got str"):
        jbp.Sequential("tanh")


def test_incompatible_consecutive_layers():
    with pytest.raises(
        ValueError,
        match=r"`layers\[2\]` \(.*\) expects fan_in=4 but the layers before it give 3 features",
    ):
        jbp.Sequential([jbp.Dense(2, 3), jbp.Activation("tanh"), jbp.Dense(4, 1)])
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` \(.*\) expects fan_in=4 but the layers before it give 3 features",
    ):
        jbp.Sequential([jbp.Dense(2, 3), jbp.Dense(4, 1)])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_dense_sizes(bad):
    with pytest.raises(ValueError, match=r"`fan_in` must be a positive int"):
        jbp.Dense(bad, 3)


def test_init_dtype_errors():
    with pytest.raises(
        TypeError, match=r"`dtype` must be a floating dtype such as jnp.float32, got int32"
    ):
        NET.init(jax.random.key(0), jnp.int32)
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):
        NET.init(0)


def test_init_float64_without_x64():
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"`dtype` is float64 but 64-bit types are disabled"):
            NET.init(jax.random.key(0), jnp.float64)


def test_apply_checks(params):
    with pytest.raises(ValueError, match=r"`x` has 5 features"):
        NET.apply(params, np.ones((2, 5)))


def test_net_not_a_network():
    with pytest.raises(TypeError, match=r"`net` must be a jbp.Sequential .* got int"):
        jbp.backprop(3, "half_sse")


def test_register_activation_errors():
    with pytest.raises(
        ValueError, match=r"activation 'tanh' is already registered; pass overwrite=True"
    ):
        jbp.register_activation("tanh", jnp.tanh, lambda z, out: 1 - out**2)
    with pytest.raises(TypeError, match=r"`f` and `derivative` must be callables"):
        jbp.register_activation("nope", 1, 2)


def test_loss_reduction_error():
    with pytest.raises(ValueError, match=r"`reduction` must be 'sum' or 'mean', got 'max'"):
        jbp.Loss("bad", lambda a, y: a, lambda a, y: a, "max")


def test_compare_structure_mismatch():
    with pytest.raises(
        ValueError, match=r"`tested` and `reference` have different tree structures"
    ):
        jbp.compare({"a": jnp.ones(2)}, {"b": jnp.ones(2)})


def test_mismatched_shapes_fail_not_raise():
    r = jbp.compare({"a": jnp.ones(2)}, {"a": jnp.ones(3)})
    assert not r.ok
    assert "shape (2,) vs reference (3,)" in str(r)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_is_never_agreement(bad):
    a = {"w": jnp.array([1.0, bad])}
    r = jbp.compare(a, a)
    assert not r.ok
    assert "non-finite" in str(r)
    with pytest.raises(jbp.GradientMismatch, match=r"MISMATCH"):
        r.raise_if_failed()
