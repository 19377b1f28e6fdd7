"""Every built-in layer's hand-written ``tangent`` (the forward of the linearised
layer) against ``jax.jvp`` of its forward, in float64."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import jbp
from jbp.layers._base import tangent

RTOL = 1e-10


# Random data from numpy: jax.random would compile one program per shape.
def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape))


def _random_like(rng, tree):
    return jax.tree_util.tree_map(lambda leaf: _normal(rng, leaf.shape), tree)


def _params(layer, rng):
    """Random params of the layer's shapes (not its init: zero biases and unit scales
    would hide terms of the tangent)."""
    shapes = jax.eval_shape(lambda: layer.init(jr.key(0), jnp.float64))
    return jax.tree_util.tree_map(lambda leaf: 0.5 * _normal(rng, leaf.shape), shapes)


def _seq(layers):
    return jbp.Sequential(layers)


CASES = [
    ("dense tanh", jbp.Dense(3, 4, "tanh"), (2, 3)),
    ("dense no bias, rank 3", jbp.Dense(3, 4, "sigmoid", bias=False), (2, 5, 3)),
    ("activation gelu", jbp.Activation("gelu"), (2, 3, 2)),
    (
        "conv 2-D stride/pad/dilation/groups",
        jbp.Conv(
            4, 6, (3, 2), "tanh", stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2), groups=2
        ),
        (2, 7, 6, 4),
    ),
    ("conv 1-D SAME no bias", jbp.Conv(2, 3, 3, bias=False, padding="SAME"), (2, 5, 2)),
    ("maxpool overlapping SAME", jbp.MaxPool((3, 2), stride=(2, 1), padding="SAME"), (2, 5, 4, 3)),
    ("avgpool", jbp.AvgPool((2, 2), padding=1), (2, 4, 5, 2)),
    ("global avg pool", jbp.GlobalAvgPool(), (2, 3, 4, 2)),
    ("flatten", jbp.Flatten(), (2, 3, 2, 2)),
    ("layernorm", jbp.LayerNorm(5), (2, 3, 5)),
    ("layernorm bias only", jbp.LayerNorm(5, scale=False), (3, 5)),
    ("layernorm scale only", jbp.LayerNorm(5, bias=False), (3, 5)),
    ("rmsnorm", jbp.RMSNorm(4), (2, 3, 4)),
    ("positional embedding", jbp.PositionalEmbedding(6, 4), (2, 5, 4)),
    ("attention", jbp.MultiHeadAttention(4, 2), (2, 3, 4)),
    ("attention causal", jbp.MultiHeadAttention(4, 2, causal=True), (2, 4, 4)),
    ("attention causal no bias", jbp.MultiHeadAttention(4, 2, causal=True, bias=False), (2, 3, 4)),
    (
        "sequential with residual and parallels",
        _seq(
            [
                jbp.Dense(3, 4, "tanh"),
                jbp.Residual(_seq([jbp.LayerNorm(4), jbp.Dense(4, 4, "relu")])),
                jbp.Parallel([jbp.Dense(4, 2), jbp.Activation("tanh")], merge="concat"),
                jbp.Parallel([jbp.Dense(6, 3, "silu"), jbp.Dense(6, 3, bias=False)]),
                jbp.Residual(jbp.Activation("sigmoid")),
            ]
        ),
        (3, 3),
    ),
]


def _jvp(layer, params, a, params_dot, a_dot):
    return jax.jvp(lambda p, x: layer.forward(p, x)[0], (params, a), (params_dot, a_dot))[1]


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=RTOL)


def _tangents_and_jvps(layer, params, a, a_dot, params_dot):
    """The tangent for (a_dot, params_dot), (a_dot, None), (None, params_dot) and
    (None, None), and the jvps for the first two, in one jitted program (op-by-op
    dispatch would take about twice as long)."""
    skip_p = isinstance(layer, jbp.PositionalEmbedding)  # needs a_dot (see below)

    def run(params, a, a_dot, params_dot):
        out, cache = layer.forward(params, a)
        zeros_p = jax.tree_util.tree_map(jnp.zeros_like, params)
        got = (
            tangent(layer, params, cache, a_dot, params_dot),
            tangent(layer, params, cache, a_dot, None),
            None if skip_p else tangent(layer, params, cache, None, params_dot),
            tangent(layer, params, cache, None, None),
        )
        want = (_jvp(layer, params, a, params_dot, a_dot), _jvp(layer, params, a, zeros_p, a_dot))
        return out, got, want

    return jax.jit(run)(params, a, a_dot, params_dot)


@pytest.mark.parametrize(("name", "layer", "shape"), CASES, ids=[c[0] for c in CASES])
def test_tangent_matches_jvp(name, layer, shape):
    rng = np.random.default_rng(len(name))
    params = _params(layer, rng)
    a = _normal(rng, shape)
    a_dot = _normal(rng, shape)
    params_dot = _random_like(rng, params)
    out, (got, got_a, got_p, got_none), (want, want_a) = _tangents_and_jvps(
        layer, params, a, a_dot, params_dot
    )

    assert got.shape == out.shape
    _close(got, want)
    # params_dot=None: the input term only.
    _close(got_a, want_a)
    # a_dot=None: the params term only, the jvp with a zero input tangent (by
    # linearity, want − want_a); None for parameterless layers.
    if not isinstance(layer, jbp.PositionalEmbedding):
        if jbp.layers._base.has_params(params):
            assert got_p.shape == out.shape
            _close(got_p, want - want_a)
        else:
            assert got_p is None
    assert got_none is None


def test_maxpool_tangent_follows_the_first_maximum_on_ties():
    """On a tie the tangent comes from the position backward sends δ to."""
    pool = jbp.MaxPool((2,))
    a = jnp.array([[[1.0], [1.0], [0.0], [2.0]]])
    a_dot = jnp.array([[[10.0], [20.0], [30.0], [40.0]]])
    _, cache = pool.forward({}, a)
    got = pool.tangent({}, cache, a_dot, None)
    _close(got, jnp.array([[[10.0], [40.0]]]))
    # ⟨δ, J ȧ⟩ = ⟨Jᵀ δ, ȧ⟩ with backward's Jᵀ.
    delta = jnp.array([[[3.0], [5.0]]])
    _, delta_in = pool.backward({}, cache, delta)
    np.testing.assert_allclose(jnp.sum(delta * got), jnp.sum(delta_in * a_dot))


def test_embedding_tangent_is_the_table_tangent_at_the_tokens():
    layer = jbp.Embedding(7, 3)
    rng = np.random.default_rng(0)
    params = _params(layer, rng)
    tokens = jnp.array([[0, 3, 3, 6], [1, 2, 0, 5]])
    table_dot = {"table": _normal(rng, (7, 3))}
    _, cache = layer.forward(params, tokens)
    want = jax.jvp(lambda p: layer.forward(p, tokens)[0], (params,), (table_dot,))[1]
    _close(layer.tangent(params, cache, None, table_dot), want)
    assert layer.tangent(params, cache, None, None) is None


def test_positional_embedding_without_input_tangent_says_why():
    layer = jbp.PositionalEmbedding(4, 2)
    params = _params(layer, np.random.default_rng(0))
    _, cache = layer.forward(params, jnp.ones((1, 3, 2)))
    with pytest.raises(ValueError, match="needs an input tangent"):
        layer.tangent(params, cache, None, params)


def test_transformer_tangent_over_params_matches_jvp():
    net = jbp.transformer(vocab=7, length=5, features=8, heads=2, depth=1)
    rng = np.random.default_rng(3)
    params = _params(net, rng)
    tokens = jnp.asarray(rng.integers(0, 7, (2, 5)))
    v = _random_like(rng, params)

    @jax.jit
    def run(params, v):
        _, caches = net.forward(params, tokens)
        got = tangent(net, params, caches, None, v)
        return got, jax.jvp(lambda p: net.forward(p, tokens)[0], (params,), (v,))[1]

    _close(*run(params, v))


def test_helper_names_a_layer_without_tangent():
    class NoTangent:
        def init(self, key, dtype=jnp.float32):
            return {}

        def forward(self, params, a):
            return a, None

        def backward(self, params, cache, delta_out):
            return {}, delta_out

        def __repr__(self):
            return "NoTangent()"

    with pytest.raises(
        TypeError,
        match=r"layer NoTangent\(\) has no tangent\(params, cache, "
        r"a_dot, params_dot\): ggn_vector_product needs one",
    ):
        tangent(NoTangent(), {}, None, jnp.ones((1, 2)), None)
