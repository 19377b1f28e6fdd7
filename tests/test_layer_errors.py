"""Bad input to the layers, combinators and CNN entry points: one clear message each,
naming the argument or layer, what it expects and what it got, before any tracing."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp

CNN = jbp.Sequential(
    [jbp.Conv(1, 4, (3, 3), "relu"), jbp.MaxPool((2, 2)), jbp.Flatten(), jbp.Dense(4 * 4 * 4, 3)]
)
PARAMS = CNN.init(jax.random.key(0))
LABELS = jnp.zeros((5,), jnp.int32)
KEY = jax.random.key(0)


def _backprop(x, y=LABELS):
    return jbp.backprop(CNN, "softmax_xent")(PARAMS, x, y)


def test_images_of_the_wrong_rank():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`x` must have shape (batch, height, width, channels) or (height, width, channels), "
            "got shape (8, 8): this network's first layers take examples of rank 3"
        ),
    ):
        _backprop(jnp.ones((8, 8), jnp.float32))
    with pytest.raises(ValueError, match=r"got shape \(2, 5, 8, 8, 1\)"):
        _backprop(jnp.ones((2, 5, 8, 8, 1), jnp.float32))


def test_images_without_their_channel_axis_get_a_hint():
    with pytest.raises(
        ValueError,
        match=r"`layers\[0\]` \(Conv\(in_channels=1, .*\) expects 1 input channels \(the last "
        r"axis\), got shape \(5, 8, 8\); `x` has examples of shape \(5, 8, 8\); if `x` is a batch "
        r"of 5 one-channel examples, add the channel axis: x\[\.\.\., None\]",
    ):
        _backprop(jnp.ones((5, 8, 8), jnp.float32))


def test_images_with_the_wrong_channel_count():
    with pytest.raises(
        ValueError,
        match=r"`layers\[0\]` \(Conv\(in_channels=1, .*\) expects 1 input channels \(the last "
        r"axis\), got shape \(8, 8, 3\); `x` has examples of shape \(8, 8, 3\)$",
    ):
        _backprop(jnp.ones((5, 8, 8, 3), jnp.float32))


def test_images_of_another_size_reach_a_dense_layer_of_the_wrong_width():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "expects fan_in=64 features on the last axis, got 100 features (input shape (100,))"
        ),
    ):
        _backprop(jnp.ones((5, 10, 10, 1), jnp.float32))


def test_a_flatten_followed_by_a_layer_expecting_another_width():
    net = jbp.Sequential([jbp.Conv(1, 2, (3, 3)), jbp.Flatten(), jbp.Dense(10, 2)])
    with pytest.raises(
        ValueError,
        match=r"`layers\[2\]` \(Dense\(fan_in=10, .*\) expects fan_in=10 features on the last "
        r"axis, got 32 features \(input shape \(32,\)\)",
    ):
        net.init(KEY, in_shape=(4, 4, 1))
    assert net.init(KEY, in_shape=(5, 1, 1))  # 5·1·2 = 10 features fit


def test_a_residual_block_that_changes_the_shape():
    with pytest.raises(
        ValueError,
        match=r"`block` \(Dense\(fan_in=4, fan_out=3.*\) maps 4 features to 3; a residual block "
        "must keep the shape of its input",
    ):
        jbp.Residual(jbp.Dense(4, 3))
    with pytest.raises(
        ValueError, match=r"`block` \(Conv\(in_channels=2, .*\) maps 2 channels to 4; a residual"
    ):
        jbp.Residual(jbp.Conv(2, 4, 3))  # channels are checked when it is built
    net = jbp.Sequential([jbp.Residual(jbp.Conv(2, 2, 3, stride=2))])
    with pytest.raises(
        ValueError,
        match=r"`layers\[0\]` \(Residual\(block=Conv\(.*\)\)\) has a block that maps inputs of "
        r"shape \(5, 2\) to \(3, 2\); a residual block must keep the shape of its input",
    ):
        net.init(KEY, in_shape=(5, 2))


def test_nested_errors_name_the_path():
    net = jbp.Sequential(
        [jbp.Dense(3, 4), jbp.Residual(jbp.Sequential([jbp.LayerNorm(4), jbp.Conv(4, 4, 3)]))]
    )
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]\.block\.layers\[1\]` \(Conv\(.*\)\) has a 1-D kernel, so it expects "
        r"examples \(length, channels\) of rank 2, got shape \(4,\)",
    ):
        net.output_shape((3,))


def test_concatenated_branches_with_mismatched_leading_shapes():
    par = jbp.Parallel([jbp.Conv(2, 3, 3, stride=2), jbp.Conv(2, 3, 3)], "concat")
    with pytest.raises(
        ValueError,
        match=r"^Parallel\(.*\) concatenates its branches' outputs on the last axis, so all "
        r"other axes must agree, but branches\[0\] gives shape \(4, 3\) and branches\[1\] gives "
        r"\(8, 3\)$",
    ):
        par.output_shape((8, 2))
    with pytest.raises(
        ValueError, match=r"sums its branches' outputs, but branches\[0\] gives shape \(4, 3\)"
    ):
        jbp.Parallel([jbp.Conv(2, 3, 3, stride=2), jbp.Conv(2, 3, 3)]).output_shape((8, 2))
    # widths that cannot agree are an error when the Parallel is built
    with pytest.raises(
        ValueError,
        match=r"^`branches\[1\]` \(Dense\(fan_in=2, fan_out=4.*\) gives 4 on the last axis but "
        r"`branches\[0\]` gives 3; merge='sum' adds outputs of one shape$",
    ):
        jbp.Parallel([jbp.Dense(2, 3), jbp.Dense(2, 4)])


@pytest.mark.parametrize(
    ("layer", "in_shape", "message"),
    [
        (
            jbp.Conv(1, 1, 5, padding="VALID"),
            (3, 1),
            r"leaves an empty output \(0,\) for spatial size \(3,\): the dilated kernel \(5,\) "
            r"does not fit in the padded input; use a smaller kernel, stride or dilation, more "
            r"padding, or 'SAME'",
        ),
        (
            jbp.Conv(1, 1, 2, dilation=4, padding="VALID"),
            (4, 1),
            r"the dilated kernel \(5,\) does not fit",
        ),
        (
            jbp.MaxPool(4),
            (3, 1),
            r"leaves an empty output \(0,\) for spatial size \(3,\): the window \(4,\) does not "
            r"fit in the padded input",
        ),
        (jbp.AvgPool((2, 4)), (4, 3, 1), r"empty output \(2, 0\)"),
    ],
)
def test_a_kernel_stride_window_or_padding_that_leaves_an_empty_output(layer, in_shape, message):
    with pytest.raises(ValueError, match=message):
        jbp.Sequential([layer]).init(KEY, in_shape=in_shape)


def test_groups_that_do_not_divide_the_channels():
    with pytest.raises(
        ValueError,
        match=r"`groups`=2 does not divide `in_channels`=3; each group needs the same number",
    ):
        jbp.Conv(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"`groups`=2 does not divide `out_channels`=3"):
        jbp.Conv(4, 3, 3, groups=2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: jbp.Conv(1, 2, 0), r"`kernel_size` must be a positive int or a tuple of positive"),
        (lambda: jbp.Conv(1, 2, "3"), r"`kernel_size` must be an int or a tuple of ints, got '3'"),
        (
            lambda: jbp.Conv(1, 2, (3, 3), stride=(1, 2, 3)),
            r"`stride` must be a positive int or a tuple of 2 positive ints, got \(1, 2, 3\)",
        ),
        (lambda: jbp.Conv(1, 2, 3, dilation=0), r"`dilation` must be a positive int"),
        (lambda: jbp.Conv(0, 2, 3), r"`in_channels` must be a positive int, got 0"),
        (lambda: jbp.Conv(1, 2, 3, groups=0), r"`groups` must be a positive int, got 0"),
        (
            lambda: jbp.Conv(1, 2, 3, padding="FULL"),
            r"`padding` must be 'SAME', 'VALID', an int or \(lo, hi\) pairs, got 'FULL'",
        ),
        (
            lambda: jbp.Conv(1, 2, 3, padding=-1),
            r"`padding` must be .* a sequence of 1 non-negative ints or \(lo, hi\) pairs, one per "
            r"spatial axis, got -1",
        ),
        (lambda: jbp.Conv(1, 2, (3, 3), padding=((1, 2),)), r"got \(\(1, 2\),\)"),
        (lambda: jbp.Conv(1, 2, 3, "sigmod"), r"unknown activation 'sigmod'"),
        (lambda: jbp.MaxPool(0), r"`window` must be a positive int or a tuple of positive ints"),
        (lambda: jbp.AvgPool((2, 2), stride=(1,)), r"`stride` must be .* tuple of 2 positive"),
        (lambda: jbp.LayerNorm(0), r"`features` must be a positive int, got 0"),
        (lambda: jbp.LayerNorm(4, eps=0), r"`eps` must be a positive number, got 0"),
        (lambda: jbp.RMSNorm(4, eps=-1.0), r"`eps` must be a positive number, got -1.0"),
        (
            lambda: jbp.Parallel([jbp.Dense(2, 2)], merge="max"),
            r"`merge` must be 'sum', 'concat' or 'product', got 'max'",
        ),
        (lambda: jbp.Parallel([]), r"`branches` is empty: a network needs at least one layer"),
        (lambda: jbp.Parallel([jbp.Dense(2, 2), 3]), r"`branches\[1\]` is 3, which is not a"),
        (lambda: jbp.Residual("tanh"), r"`block` is 'tanh', which is not a layer"),
    ],
)
def test_bad_layer_arguments(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


@pytest.mark.parametrize(
    ("layer", "in_shape", "message"),
    [
        (
            jbp.MaxPool((2, 2)),
            (8, 1),
            r"MaxPool\(.*\) pools 2 spatial axes, so it expects examples \(height, width, "
            r"channels\) of rank 3, got shape \(8, 1\); give window=\(2,\)",
        ),
        (
            jbp.GlobalAvgPool(),
            (3,),
            r"averages over spatial axes, so it expects examples \(\*spatial, channels\) of rank",
        ),
        (
            jbp.LayerNorm(4),
            (2, 3),
            r"LayerNorm\(features=4.*\) normalises 4 features on the last axis, got shape \(2, 3\)",
        ),
        (jbp.Conv(2, 2, (3, 3)), (5, 5, 3), r"expects 2 input channels \(the last axis\)"),
    ],
)
def test_layers_name_what_they_expect(layer, in_shape, message):
    with pytest.raises(ValueError, match=message):
        layer.output_shape(in_shape)


def test_consecutive_widths_are_checked_when_a_network_is_built():
    with pytest.raises(
        ValueError,
        match=r"`layers\[1\]` \(LayerNorm\(features=5.*\) expects fan_in=5 but the layers before "
        "it give 4 features",
    ):
        jbp.Sequential([jbp.Dense(3, 4), jbp.LayerNorm(5)])
    # a layer that may change the last axis resets what is known
    jbp.Sequential([jbp.Dense(3, 4), jbp.Conv(4, 6, 1), jbp.Dense(6, 2)])


def test_image_labels_of_the_wrong_shape():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`y` holds integer labels of shape (2,) but loss 'softmax_xent' with this x expects "
            "labels of shape (2, 4, 4) (or targets of shape (2, 4, 4, 3))"
        ),
    ):
        net = jbp.Sequential([jbp.Conv(1, 3, (3, 3))])
        p = net.init(KEY)
        jbp.backprop(net, "softmax_xent")(p, jnp.ones((2, 4, 4, 1), jnp.float32), LABELS[:2])


def test_check_layer_and_per_example_arguments():
    with pytest.raises(ValueError, match=r"`batch` must be a positive int, got 0"):
        jbp.check_layer(jbp.Dense(2, 2), (2,), batch=0)
    with pytest.raises(
        ValueError, match=r"Dense\(fan_in=2.*\) expects fan_in=2 features on the last axis"
    ):
        jbp.check_layer(jbp.Dense(2, 2), (3,))
    with pytest.raises(
        ValueError, match=r"`method` must be one of 'auto', 'gram', 'materialise', got 'ghost'"
    ):
        jbp.per_example_norms(CNN, "mse", method="ghost")
    with pytest.raises(ValueError, match=r"`method` must be one of"):
        jbp.clipped_grad(CNN, "mse", 1.0, method="fast")


def test_strategy_and_zoo_arguments():
    import jbp.testing as jt

    with pytest.raises(ValueError, match=r"`max_blocks` must be an int >= 1, got 0"):
        jt.cnns(max_blocks=0)
    with pytest.raises(ValueError, match=r"`dims` must hold spatial ranks among 1, 2 and 3"):
        jt.cnns(dims=(4,))
    with pytest.raises(ValueError, match=r"`max_size` must be an int >= 3, got 2"):
        jt.resnets(max_size=2)
    with pytest.raises(
        ValueError,
        match=r"`arch` must be one of 'mlp', 'cnn', 'resnet', 'transformer', 'llama', 'rnn', "
        r"got 'gpt'",
    ):
        jbp.random_problem(np.random.default_rng(0), dtype=jnp.float32, arch="gpt")


def test_a_bad_layer_draft_is_a_failed_check_not_a_crash():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Crashes(jbp.Layer):
        def init(self, key, dtype=jnp.float32):
            return {}

        def output_shape(self, in_shape):
            return in_shape

        def forward(self, params, a):
            return a, None

        def backward(self, params, cache, delta_out):
            raise ValueError("not written yet")

    report = jbp.check_layer(Crashes(), (3,))
    assert not report.ok
    assert "raised ValueError: not written yet" in str(report)


# --- sequence layers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: jbp.MultiHeadAttention(6, 4),
         r"`features`=6 is not divisible by `heads`=4: heads split the features evenly"),
        (lambda: jbp.MultiHeadAttention(8, 0), r"`heads` must be a positive int, got 0"),
        (lambda: jbp.Embedding(0, 4), r"`vocab` must be a positive int, got 0"),
        (lambda: jbp.PositionalEmbedding(4, 0), r"`features` must be a positive int, got 0"),
        (lambda: jbp.Sequential([jbp.Dense(3, 4), jbp.Embedding(5, 4)]),
         r"`layers\[1\]` \(Embedding\(vocab=5, features=4\)\) takes integer tokens, so it has no "
         r"input δ and can only be a network's first layer"),
        (lambda: jbp.Sequential([jbp.Dense(3, 4), jbp.Sequential([jbp.Embedding(5, 4)])]),
         r"`layers\[1\]` \(Sequential\(.*\)\) takes integer tokens"),
        (lambda: jbp.Residual(jbp.Sequential([jbp.Embedding(5, 4)])),
         r"`block` \(Sequential\(.*\)\) takes integer tokens; a residual block's input is added "
         r"to its output, so it must take and give real arrays"),
        (lambda: jbp.Parallel([jbp.Embedding(5, 4), jbp.Embedding(5, 4)]),
         r"`branches\[0\]` \(Embedding\(.*\)\) takes integer tokens, so it has no input δ"),
    ],
)  # fmt: skip
def test_bad_sequence_layer_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("layer", "in_shape", "message"),
    [
        (jbp.MultiHeadAttention(8, 2), (5, 6),
         r"MultiHeadAttention\(features=8, .*\) attends over sequences \(T, 8\), got examples of "
         r"shape \(5, 6\)"),
        (jbp.MultiHeadAttention(8, 2), (8,), r"got examples of shape \(8,\)"),
        (jbp.PositionalEmbedding(4, 8), (5, 8),
         r"PositionalEmbedding\(length=4, features=8\)\) has a table of 4 positions, but the "
         r"sequences are 5 long"),
        (jbp.PositionalEmbedding(4, 8), (4, 6), r"expects sequences \(T, 8\), got examples of"),
        (jbp.Embedding(4, 8), (5, 8),
         r"Embedding\(vocab=4, features=8\)\) takes a sequence of integer tokens \(T,\), got "
         r"examples of shape \(5, 8\)"),
    ],
)  # fmt: skip
def test_sequence_layers_name_what_they_expect(layer, in_shape, message):
    with pytest.raises(ValueError, match=message):
        jbp.Sequential([layer]).output_shape(in_shape)


TRANSFORMER = jbp.transformer(11, 6, 8, 2, 1)
T_PARAMS = TRANSFORMER.init(KEY)
T_LABELS = jnp.zeros((2, 6), jnp.int32)


@pytest.mark.parametrize(
    ("entry", "x", "y", "error", "message"),
    [
        ("backprop", np.zeros((2, 6), np.float32), T_LABELS, TypeError,
         r"`x` has dtype float32, but the first layer \(Embedding\(vocab=11, features=8\)\) takes "
         r"integer tokens; pass token ids, e.g. x.astype\(jnp.int32\)"),
        ("per_example_norms", np.full((2, 6), 11), T_LABELS, ValueError,
         r"`x` has tokens in \[11, 11\] but the first layer has vocab=11, so tokens must lie in "
         r"\[0, 10\]"),
        ("apply", np.full((2, 6), -1), None, ValueError, r"`x` has tokens in \[-1, -1\]"),
        ("backprop", np.zeros((2, 7), np.int32), jnp.zeros((2, 7), jnp.int32), ValueError,
         r"`layers\[1\]` \(PositionalEmbedding\(length=6, features=8\)\) has a table of 6 "
         r"positions, but the sequences are 7 long; `x` has examples of shape \(7,\)"),
        ("apply", np.zeros((2, 3, 6), np.int32), None, ValueError,
         r"`x` must have shape \(batch, T\) or \(T,\) of integer tokens, got shape \(2, 3, 6\)"),
        ("clipped_grad", np.zeros((2, 6), np.int32), jnp.zeros((2, 5), jnp.int32), ValueError,
         r"`y` holds integer labels of shape \(2, 5\) but loss 'softmax_xent' with this x "
         r"expects labels of shape \(2, 6\) \(or targets of shape \(2, 6, 11\)\)"),
    ],
)  # fmt: skip
def test_token_inputs_are_checked_before_tracing(entry, x, y, error, message):
    if entry == "apply":
        call = lambda: TRANSFORMER.apply(T_PARAMS, x)  # noqa: E731
    elif entry == "clipped_grad":
        call = lambda: jbp.clipped_grad(TRANSFORMER, "softmax_xent", 1.0)(T_PARAMS, x, y)  # noqa: E731
    else:
        call = lambda: getattr(jbp, entry)(TRANSFORMER, "softmax_xent")(T_PARAMS, x, y)  # noqa: E731
    with pytest.raises(error, match=message):
        call()


# --- widths and example shapes, checked when a network is built ---------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Double(jbp.Layer):
    """A user layer that doubles the last axis and declares no widths."""

    def init(self, key, dtype=jnp.float32):
        return {}

    def forward(self, params, a):
        return jnp.concatenate([a, a], axis=-1), None

    def backward(self, params, cache, delta_out):
        half = delta_out.shape[-1] // 2
        return {}, delta_out[..., :half] + delta_out[..., half:]


def _seq(*layers, **kwargs):
    return lambda: jbp.Sequential(list(layers), **kwargs)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (_seq(jbp.Conv(3, 4, (3, 3)), jbp.Conv(5, 2, (3, 3))), ValueError,
         r"^`layers\[1\]` \(Conv\(in_channels=5, .*\)\) expects in_channels=5 but the layers "
         r"before it give 4 channels$"),
        (_seq(jbp.Dense(3, 4), jbp.Conv(5, 6, 1)), ValueError,
         r"`layers\[1\]` \(Conv\(in_channels=5, .*\) expects in_channels=5 but the layers before "
         r"it give 4 channels"),
        # activations, pooling and norms keep the channels; nested combinators give theirs
        (_seq(jbp.Conv(3, 4, (3, 3)), jbp.Activation("relu"), jbp.MaxPool((2, 2)),
              jbp.Conv(5, 6, (3, 3))), ValueError,
         r"`layers\[3\]` \(Conv\(in_channels=5, .*\) expects in_channels=5 but the layers before "
         r"it give 4 channels"),
        (_seq(jbp.Conv(3, 4, (3, 3)), jbp.GlobalAvgPool(), jbp.Dense(5, 6)), ValueError,
         r"`layers\[2\]` \(Dense\(fan_in=5, .*\) expects fan_in=5 but the layers before it give "
         r"4 features"),
        (_seq(jbp.Sequential([jbp.Conv(3, 4, 3), jbp.GroupNorm(2, 4)]), jbp.Conv(6, 2, 3)),
         ValueError, r"`layers\[1\]` \(Conv\(in_channels=6, .*\) expects in_channels=6 but the "
         r"layers before it give 4 channels"),
        (_seq(jbp.Dense(3, 4), jbp.Residual(jbp.Dense(4, 4)), jbp.Dense(5, 1)), ValueError,
         r"`layers\[2\]` \(Dense\(fan_in=5, .*\) expects fan_in=5 but the layers before it give "
         r"4 features"),
        (_seq(jbp.Dense(3, 4), jbp.Parallel([jbp.Dense(4, 2), jbp.Activation("tanh")], "concat"),
              jbp.Dense(7, 1)), ValueError,
         r"`layers\[2\]` \(Dense\(fan_in=7, .*\) expects fan_in=7 but the layers before it give "
         r"6 features"),
        (lambda: jbp.Parallel([jbp.Dense(4, 2), jbp.Dense(5, 2)]), ValueError,
         r"^`branches\[1\]` \(Dense\(fan_in=5, .*\)\) expects fan_in=5 but `branches\[0\]` "
         r"expects fan_in=4; every branch takes the same input$"),
        # after a user layer that declares nothing the width is unknown, then known again
        (_seq(jbp.Dense(3, 4), _Double(), jbp.Dense(8, 2), jbp.Dense(3, 1)), ValueError,
         r"`layers\[3\]` \(Dense\(fan_in=3, .*\) expects fan_in=3 but the layers before it give "
         r"2 features"),
        # a whole in_shape: every shape is checked, the user layer's by its output_shape
        (_seq(jbp.Dense(3, 4), _Double(), jbp.Dense(4, 2), in_shape=(3,)), jbp.ShapeError,
         r"`layers\[2\]` \(Dense\(fan_in=4, .*\) expects fan_in=4 features on the last axis, "
         r"got 8 features \(input shape \(8,\)\)"),
        (_seq(jbp.Dense(4, 3), in_shape=(None, 5)), ValueError,
         r"^`layers\[0\]` \(Dense\(fan_in=4, .*\)\) expects fan_in=4 but `in_shape` gives 5 "
         r"features$"),
        (_seq(jbp.Conv(4, 3, (3, 3)), in_shape=(None, 4)), ValueError,
         r"^`in_shape` \(None, 4\) has rank 2 but `layers\[0\]` \(Conv\(.*\)\) takes examples of "
         r"rank 3$"),
        (_seq(jbp.Dense(4, 3), in_shape=(0, 4)), ValueError,
         r"^`in_shape` must be one example's shape \(no batch axis\): a non-empty tuple of "
         r"positive ints or None \(any size\), got \(0, 4\)$"),
        (_seq(jbp.Dense(4, 3), in_shape=4), TypeError,
         r"^`in_shape` must be a tuple of ints or None \(one example's shape, no batch axis\), "
         r"got 4$"),
    ],
)  # fmt: skip
def test_widths_and_channels_are_checked_when_a_network_is_built(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_a_user_layer_may_change_the_width_without_declaring_it():
    x = jnp.ones((5, 3), jnp.float32)
    net = jbp.Sequential([jbp.Dense(3, 4), _Double(), jbp.Dense(8, 2)])
    params = jax.tree.map(  # net.init's tree without its eager draws
        lambda s: np.full(s.shape, 0.1, s.dtype), jax.eval_shape(net.init, KEY)
    )
    out, grads = jax.jit(lambda p, x: (net.apply(p, x), jbp.backprop(net, "half_sse")(p, x, x[:, :2])))(params, x)  # fmt: skip
    assert out.shape == (5, 2)
    assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
    first = jbp.Sequential([_Double(), jbp.Dense(6, 1)])  # x's width is the user layer's own
    assert first.fan_in is None and first.output_shape((3,)) == (1,)


def test_in_shape_states_the_examples_of_a_network_whose_first_layers_keep_any_rank():
    mlp = jbp.mlp([4, 8, 2], "tanh")
    rng = np.random.default_rng(0)
    params = tuple(
        {"w": rng.normal(size=(i, o)).astype(np.float32), "b": np.zeros(o, np.float32)}
        for i, o in [(4, 8), (8, 2)]
    )
    x = jnp.ones((3, 5, 4), jnp.float32)  # 3 sequences of 5 steps, 4 features each
    with pytest.raises(
        ValueError,
        match=r"^`x` must have shape \(batch, fan_in\) or \(fan_in,\), got shape \(3, 5, 4\); "
        r"Dense layers act on the last axis of any rank: to give examples of shape \(5, 4\), "
        r"build the network with in_shape \(None: any size\), e\.g\. "
        r"jbp\.Sequential\(net\.layers, in_shape=\(None, 4\)\)$",
    ):
        mlp.apply(params, x)
    net = jbp.Sequential(mlp.layers, in_shape=(None, 4))
    assert repr(net).endswith(", in_shape=(None, 4))") and "in_shape" not in repr(mlp)
    batch, single = jax.jit(lambda p, x: (net.apply(p, x), net.apply(p, x[0])))(params, x)
    assert batch.shape == (3, 5, 2)
    np.testing.assert_allclose(single, batch[0], rtol=1e-6)  # one example, no batch axis
    for bad, message in [
        (x[..., :3], r"^`x` has examples of shape \(5, 3\) but the network was built with "
                     r"in_shape=\(None, 4\) \(None: any size\)$"),
        (x[0, 0], r"^`x` must have shape \(batch, None, 4\) or \(None, 4\), got shape \(4,\) "
                  r"\(the network's in_shape; None: any size\)$"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            net.apply(params, bad)
    with pytest.raises(
        ValueError,
        match=r"was built with in_shape=\(None, 4\) \(None: any size\), so it cannot take "
        r"examples of shape \(5, 3\)",
    ):
        net.output_shape((5, 3))
