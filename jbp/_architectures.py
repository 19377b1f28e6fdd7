"""Random architecture recipes: CNNs, residual and branching networks.

One recipe per family, written once and shared by the seeded zoo
(:func:`jbp.random_problem`, numpy draws) and the hypothesis strategies
(:mod:`jbp.testing`, draws that shrink). A recipe asks a *picker* for every
choice; the picker is backed by a ``numpy.random.Generator`` or by
hypothesis's ``draw``. Every choice's first option is the simplest, so
hypothesis shrinks towards small, plain networks.

Every network a recipe returns is valid for its ``in_shape``: each layer's
shape is checked as it is placed, and a choice that would leave an empty
output (a kernel or window larger than the padded input) falls back to
``"SAME"`` padding and stride 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from .layers import (
    GRU,
    LSTM,
    RNN,
    Activation,
    AvgPool,
    Conv,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    GlobalAvgPool,
    GroupNorm,
    LayerNorm,
    MaxPool,
    MultiHeadAttention,
    Parallel,
    PositionalEmbedding,
    Residual,
    Reverse,
    RMSNorm,
    Sequential,
    ShapeError,
    Tied,
    bidirectional,
    llama,
    swiglu,
    transformer,
)

FAMILIES = ("mlp", "cnn", "resnet", "transformer", "llama", "rnn")


class Architecture(NamedTuple):
    """A network, the shape of one input example (no batch axis), and for a
    network on integer tokens (an Embedding first) its vocabulary size."""

    net: Sequential
    in_shape: tuple[int, ...]
    vocab: int | None = None


class Picker(Protocol):
    """Where a recipe's choices come from."""

    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence[Any]) -> Any: ...

    def chance(self, p: float) -> bool: ...


class NumpyPicker:
    """Choices from a ``numpy.random.Generator`` (uniform; ``chance(p)`` with odds p)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def choice(self, options: Sequence[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _place(layers: list[Any], layer: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = layer.output_shape(shape)
    layers.append(layer)
    return out


def _conv(
    pick: Picker,
    shape: tuple[int, ...],
    c_out: int | None,
    max_channels: int,
    activations: Sequence[str],
    *,
    keep_shape: bool = False,
) -> Conv:
    """A random convolution valid for inputs of ``shape`` (channels last).

    ``keep_shape``: stride 1, SAME padding and as many output channels as
    input channels (for residual blocks).
    """
    n, c_in = len(shape) - 1, shape[-1]
    groups = pick.choice(_divisors(c_in))
    if keep_shape:
        c_out = c_in
    elif c_out is None:
        c_out = groups * pick.integer(1, max(1, max_channels // groups))
    elif c_out % groups:
        groups = 1
    kernel = tuple(pick.integer(1, 3) for _ in range(n))
    kw: dict[str, Any] = dict(groups=groups, bias=pick.chance(0.5), dilation=pick.integer(1, 2))
    if not keep_shape:
        kw["stride"] = pick.integer(1, 2)
        form = pick.choice(("SAME", "VALID", "explicit"))
        # Explicit pads up to the dilated kernel's extent minus one: larger ones
        # make the autodiff reference wrong in float32 on XLA's CPU (see docs).
        most = [min(2, (k - 1) * kw["dilation"]) for k in kernel]
        kw["padding"] = (
            tuple((pick.integer(0, m), pick.integer(0, m)) for m in most)
            if form == "explicit"
            else form
        )
    conv = Conv(c_in, c_out, kernel, pick.choice(activations), **kw)
    try:
        conv.output_shape(shape)
    except ShapeError:
        kw.update(stride=1, padding="SAME")
        conv = Conv(c_in, c_out, kernel, conv.activation, **kw)
    return conv


def _pool(pick: Picker, shape: tuple[int, ...]) -> Any | None:
    """A random pooling layer valid for ``shape``, or None when none fits."""
    n = len(shape) - 1
    kind = pick.choice((MaxPool, AvgPool))
    window = tuple(pick.integer(1, 3) for _ in range(n))
    stride = pick.choice((None, 1))
    padding = pick.choice(("VALID", "SAME"))
    pool = kind(window, stride=stride, padding=padding)
    try:
        pool.output_shape(shape)
    except ShapeError:
        return None
    return pool


def _norm(pick: Picker, features: int) -> Any | None:
    """A LayerNorm or RMSNorm over ``features``, or None for fewer than 3 features
    (normalising 1 or 2 numbers leaves an output that hardly depends on them:
    its gradient is round-off, which no tolerance can judge)."""
    if features < 3:
        return None
    return pick.choice((LayerNorm, RMSNorm))(features)


def _head(
    pick: Picker,
    layers: list[Any],
    shape: tuple[int, ...],
    fan_out: int,
    activations: Sequence[str],
    *,
    allow_maps: bool,
) -> None:
    """Finish a conv stack: Flatten → Dense, GlobalAvgPool → Dense, or (with
    ``allow_maps``) a 1×1 conv that keeps the feature maps as outputs."""
    form = pick.choice(("flatten", "global", "maps") if allow_maps else ("flatten", "global"))
    if form == "maps":
        n = len(shape) - 1
        _place(layers, Conv(shape[-1], fan_out, (1,) * n, pick.choice(activations)), shape)
        return
    shape = _place(layers, Flatten() if form == "flatten" else GlobalAvgPool(), shape)
    _place(
        layers, Dense(shape[-1], fan_out, pick.choice(activations), bias=pick.chance(0.5)), shape
    )


def cnn(
    pick: Picker,
    *,
    max_blocks: int,
    max_channels: int,
    activations: Sequence[str],
    fan_out: int,
    dims: Sequence[int] = (1, 2),
    max_size: int = 9,
    allow_maps: bool = True,
) -> Architecture:
    """A random convolutional network on 1-D signals or 2-D images.

    ``1..max_blocks`` convolutions (random kernel 1–3 per axis, stride 1–2,
    SAME/VALID/explicit padding, dilation 1–2, groups dividing the channels,
    bias or not), each followed by nothing, a max or average pool, a
    LayerNorm/RMSNorm over channels, an Activation, or a Dense layer on the
    channel axis (its gradient summed over positions); then a head (see
    :func:`_head`) with ``fan_out`` outputs. Inputs: spatial sizes 3 to
    ``max_size``, 1 to ``max_channels`` channels.
    """
    n = pick.choice(tuple(dims))
    in_shape = (*(pick.integer(3, max_size) for _ in range(n)), pick.integer(1, max_channels))
    layers: list[Any] = []
    shape = in_shape
    for _ in range(pick.integer(1, max_blocks)):
        shape = _place(layers, _conv(pick, shape, None, max_channels, activations), shape)
        extra = pick.choice(("none", "pool", "norm", "activation", "dense"))
        if extra == "pool" and (pool := _pool(pick, shape)) is not None:
            shape = _place(layers, pool, shape)
        elif extra == "dense":  # Dense on the channel axis, summed over positions
            width = pick.integer(1, max_channels)
            shape = _place(layers, Dense(shape[-1], width, pick.choice(activations)), shape)
        elif extra == "norm" and (norm := _norm(pick, shape[-1])) is not None:
            shape = _place(layers, norm, shape)
        elif extra == "activation":
            shape = _place(layers, Activation(pick.choice(activations)), shape)
    _head(pick, layers, shape, fan_out, activations, allow_maps=allow_maps)
    return Architecture(Sequential(layers), in_shape)


def _dense_block(pick: Picker, width: int, max_width: int, activations: Sequence[str]) -> Any:
    """A block that keeps ``width`` features: for a Residual's inside."""
    form = pick.choice(("dense", "two", "normed", "parallel"))
    act = pick.choice(activations)
    if form == "dense":
        return Dense(width, width, act, bias=pick.chance(0.5))
    hidden = pick.integer(1, max_width)
    two = [Dense(width, hidden, act), Dense(hidden, width, bias=pick.chance(0.5))]
    if form == "normed" and (norm := _norm(pick, width)) is not None:
        return Sequential([norm, *two])
    if form in ("two", "normed"):
        return Sequential(two)
    return Parallel([Dense(width, width, act), Residual(Dense(width, width))], "sum")


def _dense_resnet(
    pick: Picker, *, max_blocks: int, max_width: int, activations: Sequence[str], fan_out: int
) -> Architecture:
    fan_in, width = pick.integer(1, max_width), pick.integer(1, max_width)
    layers: list[Any] = [Dense(fan_in, width, pick.choice(activations))]
    for _ in range(pick.integer(1, max_blocks)):
        form = pick.choice(("residual", "concat", "sum"))
        if form == "residual":
            layers.append(Residual(_dense_block(pick, width, max_width, activations)))
        elif form == "concat":
            a, b = pick.integer(1, max_width), pick.integer(1, max_width)
            branch_b = Sequential([Dense(width, b, pick.choice(activations)), Activation("tanh")])
            layers.append(Parallel([Dense(width, a, pick.choice(activations)), branch_b], "concat"))
            width = a + b
        else:
            out = pick.integer(1, max_width)
            branches = [Dense(width, out, pick.choice(activations)), Dense(width, out)]
            layers.append(Parallel(branches, "sum"))
            width = out
    layers.append(Dense(width, fan_out, pick.choice(activations)))
    return Architecture(Sequential(layers), (fan_in,))


def _conv_resnet(
    pick: Picker,
    *,
    max_blocks: int,
    max_channels: int,
    activations: Sequence[str],
    fan_out: int,
    dims: Sequence[int],
    max_size: int,
) -> Architecture:
    n = pick.choice(tuple(dims))
    in_shape = (*(pick.integer(3, max_size) for _ in range(n)), pick.integer(1, max_channels))
    c = pick.integer(1, max_channels)
    layers: list[Any] = []
    stem = Conv(in_shape[-1], c, (3,) * n, pick.choice(activations))
    shape = _place(layers, stem, in_shape)
    for _ in range(pick.integer(1, max_blocks)):
        form = pick.choice(("residual", "concat", "pool"))
        if form == "residual":
            inner = [_conv(pick, shape, None, max_channels, activations, keep_shape=True)]
            if pick.chance(0.5) and (norm := _norm(pick, shape[-1])) is not None:
                inner.insert(0, norm)
            inner.append(_conv(pick, shape, None, max_channels, activations, keep_shape=True))
            shape = _place(layers, Residual(Sequential(inner)), shape)
        elif form == "concat":
            a, b = pick.integer(1, max_channels), pick.integer(1, max_channels)
            branches = [
                Conv(shape[-1], a, (1,) * n, pick.choice(activations)),
                Conv(shape[-1], b, (3,) * n, pick.choice(activations)),
            ]
            shape = _place(layers, Parallel(branches, "concat"), shape)
        elif (pool := _pool(pick, shape)) is not None:
            shape = _place(layers, pool, shape)
    _head(pick, layers, shape, fan_out, activations, allow_maps=False)
    return Architecture(Sequential(layers), in_shape)


def resnet(
    pick: Picker,
    *,
    max_blocks: int,
    max_width: int,
    activations: Sequence[str],
    fan_out: int,
    dims: Sequence[int] = (1, 2),
    max_size: int = 8,
) -> Architecture:
    """A random residual / branching network, on vectors or on images.

    Vectors: a Dense stem, then blocks of ``Residual`` (around a Dense, two
    Dense, a norm and two Dense, or a ``Parallel`` sum holding a nested
    ``Residual``), ``Parallel`` concatenations and sums, then a Dense head.
    Images: a Conv stem, then residual conv blocks (SAME, stride 1, optional
    norm), Inception-style ``Parallel`` concatenations of 1×1 and 3×3
    convolutions, or pooling; then a Flatten or GlobalAvgPool head.
    """
    if pick.chance(0.5):
        return _dense_resnet(
            pick,
            max_blocks=max_blocks,
            max_width=max_width,
            activations=activations,
            fan_out=fan_out,
        )
    return _conv_resnet(
        pick,
        max_blocks=max_blocks,
        max_channels=max(1, min(max_width, 6)),
        activations=activations,
        fan_out=fan_out,
        dims=dims,
        max_size=max_size,
    )


def transformer_net(
    pick: Picker,
    *,
    max_depth: int,
    max_width: int,
    activations: Sequence[str],
    max_length: int = 6,
) -> Architecture:
    """A random :func:`jbp.transformer` on integer tokens: vocab 2 to
    ``max_width``, 1 to 3 heads of width 1 to 3, depth 1 to ``max_depth``, MLP
    ratio 1 or 2, causal or not, sequences of 1 to ``max_length`` tokens (the
    positional table 0 to 2 positions longer)."""
    vocab = pick.integer(2, max(2, max_width))
    heads = pick.integer(1, 3)
    features = heads * pick.integer(-(-3 // heads), 3)  # ≥ 3: LayerNorm on 1 or 2 is degenerate
    t = pick.integer(1, max_length)
    net = transformer(
        vocab,
        t + pick.integer(0, 2),
        features,
        heads,
        pick.integer(1, max_depth),
        mlp_ratio=pick.integer(1, 2),
        activation=pick.choice(activations),
        causal=pick.chance(0.5),
    )
    return Architecture(net, (t,), vocab)


def sequence_stack(
    pick: Picker,
    *,
    max_blocks: int,
    max_width: int,
    activations: Sequence[str],
    fan_out: int,
    max_length: int = 6,
) -> Architecture:
    """A random stack on continuous sequences ``(T, features)``: a Dense input
    projection, an optional positional table, then 1 to ``max_blocks`` blocks
    (pre-normed residual attention, causal or not; a residual Dense MLP; a bare
    attention or Dense layer), then a Dense head with ``fan_out`` outputs per
    position."""
    t = pick.integer(1, max_length)
    fan_in = pick.integer(1, max_width)
    heads = pick.integer(1, 3)
    features = heads * pick.integer(1, 3)
    layers: list[Any] = [Dense(fan_in, features, pick.choice(activations))]
    if pick.chance(0.5):
        layers.append(PositionalEmbedding(t + pick.integer(0, 2), features))
    for _ in range(pick.integer(1, max_blocks)):
        form = pick.choice(("attention", "mlp", "bare attention", "dense"))
        attention = MultiHeadAttention(
            features, heads, causal=pick.chance(0.5), bias=pick.chance(0.7)
        )
        norm = _norm(pick, features)
        if form == "attention":
            layers.append(Residual(Sequential([norm, attention] if norm else [attention])))
        elif form == "mlp":
            hidden = pick.integer(1, max_width)
            inner = [Dense(features, hidden, pick.choice(activations)), Dense(hidden, features)]
            layers.append(Residual(Sequential([norm, *inner] if norm else inner)))
        elif form == "bare attention":
            layers.append(attention)
        else:
            layers.append(Dense(features, features, pick.choice(activations)))
    if Sequential(layers).in_rank is None:
        # Dense layers alone take vectors: an attention layer makes these sequences
        layers.append(MultiHeadAttention(features, heads, causal=pick.chance(0.5)))
    layers.append(Dense(features, fan_out, pick.choice(activations)))
    return Architecture(Sequential(layers), (t, fan_in))


def sequence_family(
    pick: Picker, *, max_blocks: int, max_width: int, activations: Sequence[str], fan_out: int
) -> Architecture:
    """The ``"transformer"`` family of the zoo: a transformer on tokens or a
    stack on continuous sequences, even odds."""
    if pick.chance(0.5):
        return transformer_net(
            pick, max_depth=max_blocks, max_width=max_width, activations=activations
        )
    return sequence_stack(
        pick, max_blocks=max_blocks, max_width=max_width, activations=activations,
        fan_out=fan_out,
    )  # fmt: skip


def llama_family(
    pick: Picker, *, max_blocks: int, max_width: int, activations: Sequence[str],
    max_length: int = 6, causal: bool | None = None,
) -> Architecture:  # fmt: skip
    """The ``"llama"`` family: the networks people train today, on integer tokens.

    With odds 1/4 a :func:`jbp.llama` itself; otherwise a decoder or encoder
    (causal or not) of 1 to ``max_blocks`` pairs of pre-normed residual blocks:
    attention with 1 to 3 query heads, ``kv_heads`` drawn among the divisors of
    ``heads`` (grouped-query, multi-query), rotary positions or learned ones,
    bias or not; then a SwiGLU gate (``Parallel(..., merge="product")``) or a
    Dense MLP. Norms: RMSNorm, LayerNorm or GroupNorm throughout; Dropout after
    the blocks in some networks; the output projection tied to the embedding
    (:class:`jbp.Tied`) or its own. Vocabulary 2 to ``max_width``, sequences of 1
    to ``max_length`` tokens, at least 3 features (see :func:`_norm`).
    ``causal``: only decoders (True), only encoders (False), or either (None).
    """
    vocab = pick.integer(2, max(2, max_width))
    heads = pick.integer(1, 3)
    kv_heads = pick.choice(_divisors(heads))
    rope = pick.chance(0.5)
    if rope:
        width = pick.choice((2, 4))
        width = 4 if heads * width < 3 else width
    else:
        width = pick.integer(-(-3 // heads), 3)
    features = heads * width
    depth = pick.integer(1, max_blocks)
    t = pick.integer(1, max_length)
    tie = pick.chance(0.5)
    if pick.chance(0.25) and rope and causal is not False:
        hidden = pick.integer(1, max(1, max_width))
        net = llama(
            vocab, features, heads, depth, kv_heads=kv_heads, hidden=hidden, rope_theta=10.0,
            tie_embeddings=tie,
        )  # fmt: skip
        return Architecture(net, (t,), vocab)
    norm_kind = pick.choice(("rms", "layer", "group"))
    # at least 3 channels a group: a group of one or two numbers is degenerate (see _norm)
    groups = pick.choice([g for g in _divisors(features) if features // g >= 3])

    def norm() -> Any:
        if norm_kind == "rms":
            return RMSNorm(features)
        if norm_kind == "layer":
            return LayerNorm(features)
        return GroupNorm(groups, features)

    dropout = Dropout(pick.choice((0.1, 0.5))) if pick.chance(0.3) else None
    causal = pick.chance(0.5) if causal is None else causal
    layers: list[Any] = [Embedding(vocab, features)]
    if not rope:
        layers.append(PositionalEmbedding(t + pick.integer(0, 2), features))
    for _ in range(depth):
        attention = MultiHeadAttention(
            features, heads, kv_heads=kv_heads, causal=causal, bias=pick.chance(0.3),
            rope_theta=10.0 if rope else None,
        )  # fmt: skip
        block = [norm(), attention] + ([dropout] if dropout else [])
        layers.append(Residual(Sequential(block)))
        hidden = pick.integer(1, max(1, max_width))
        if pick.chance(0.6):
            mlp: list[Any] = [swiglu(features, hidden)]
        else:
            mlp = [Dense(features, hidden, pick.choice(activations)), Dense(hidden, features)]
        layers.append(Residual(Sequential([norm(), *mlp] + ([dropout] if dropout else []))))
    layers.append(norm())
    if tie:
        out = Dense(features, vocab, bias=False)
        layers.append(Tied(out, source=0, leaves={"w": "table"}, transpose=True))
    else:
        layers.append(Dense(features, vocab, bias=pick.chance(0.5)))
    return Architecture(Sequential(layers), (t,), vocab)


def _recurrent(pick: Picker, features: int, hidden: int, sequences: bool, names: Any) -> Any:
    kind = pick.choice(("rnn", "lstm", "gru"))
    if kind == "rnn":
        return RNN(features, hidden, pick.choice(names), return_sequences=sequences)
    layer = LSTM if kind == "lstm" else GRU
    return layer(features, hidden, return_sequences=sequences)


def rnn_family(
    pick: Picker, *, max_blocks: int, max_width: int, activations: Sequence[str], fan_out: int,
    max_length: int = 6,
) -> Architecture:  # fmt: skip
    """The ``"rnn"`` family: recurrent networks on continuous sequences or tokens.

    An Embedding first (odds 1/4) or continuous inputs ``(T, features)``; then 1 to
    ``max_blocks`` recurrent layers (RNN with a drawn activation, LSTM or GRU,
    1 to ``max_width`` hidden units), each bidirectional with odds 1/3 (two cell
    types, ``jbp.bidirectional``), now and then a time :class:`jbp.Reverse` or a
    Dense layer between; every layer but the last returns sequences, the last
    drawn (per-position outputs or one per sequence); a Dense head with ``fan_out``
    outputs. Sequences of 1 to ``max_length`` steps.
    """
    t = pick.integer(1, max_length)
    layers: list[Any] = []
    vocab = None
    if pick.chance(0.25):
        vocab = pick.integer(2, max(2, max_width))
        width = pick.integer(1, max_width)
        layers.append(Embedding(vocab, width))
        in_shape: tuple[int, ...] = (t,)
    else:
        width = pick.integer(1, max_width)
        in_shape = (t, width)
    depth = pick.integer(1, max_blocks)
    for block in range(depth):
        last = block == depth - 1
        sequences = True if not last else pick.chance(0.5)
        if pick.chance(0.1):
            layers.append(Reverse())
        hidden = pick.integer(1, max_width)
        if pick.chance(1 / 3):
            back = pick.integer(1, max_width)
            layers.append(
                bidirectional(
                    _recurrent(pick, width, hidden, sequences, activations),
                    _recurrent(pick, width, back, sequences, activations),
                )
            )
            width = hidden + back
        else:
            layers.append(_recurrent(pick, width, hidden, sequences, activations))
            width = hidden
        if not last and pick.chance(0.2):
            wider = pick.integer(1, max_width)
            layers.append(Dense(width, wider, pick.choice(activations)))
            width = wider
    layers.append(Dense(width, fan_out, pick.choice(activations), bias=pick.chance(0.5)))
    return Architecture(Sequential(layers), in_shape, vocab)


def padding(pick: Picker, batch: int, length: int) -> list[int]:
    """Real lengths of a padded batch: each in ``[1, length]``, now and then 0 (an
    example that is all padding)."""
    return [
        pick.integer(0, length) if pick.chance(0.1) else pick.integer(1, length)
        for _ in range(batch)
    ]
