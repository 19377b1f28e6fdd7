"""Hypothesis strategies for networks, losses, dtypes and whole gradient problems.

Every strategy is a function with keyword-only parameters that returns a
``hypothesis`` search strategy. Arrays are drawn from a drawn integer seed with
``numpy.random.default_rng``, so hypothesis shrinks over seeds (and over
depths, widths and batch sizes) rather than over individual floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

import jbp
from jbp._architectures import Architecture
from jbp._architectures import cnn as _cnn_recipe
from jbp._architectures import llama_family as _llama_recipe
from jbp._architectures import padding as _padding
from jbp._architectures import resnet as _resnet_recipe
from jbp._architectures import rnn_family as _rnn_recipe
from jbp._architectures import sequence_stack as _sequence_recipe
from jbp._architectures import transformer_net as _transformer_recipe
from jbp.layers._dropout import has_dropout as _has_dropout

# What kind of target each built-in loss takes.
_REAL, _UNIT, _CLASSES = "real", "unit interval", "classes"
_TARGETS = {"half_sse": _REAL, "mse": _REAL, "sigmoid_bce": _UNIT, "softmax_xent": _CLASSES}

_BIAS_STD = 0.5  # noise added to constant-initialised leaves such as zero biases
_SEEDS = st.integers(0, 2**31 - 1)


def _check_range(lo: int, hi: int, lo_name: str, hi_name: str, least: int = 0) -> None:
    for name, value in ((lo_name, lo), (hi_name, hi)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}")
    if lo > hi:
        raise ValueError(f"`{lo_name}`={lo} is larger than `{hi_name}`={hi}")


def _check_int(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}")


def _names(names: Sequence[Any] | str, what: str) -> tuple[Any, ...]:
    if isinstance(names, str):
        raise TypeError(f"`names` must be a sequence of {what} names, got the string {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError(f"`names` is empty: give at least one {what} name")
    return names


def activations(*, names: Sequence[str] | None = None) -> SearchStrategy[str]:
    """Names of registered activations.

    Args:
      names: the names to sample from; default every name registered when the
        strategy is created (``jbp.activation_names()``).

    Returns:
      A strategy of activation names (``str``), shrinking towards ``names[0]``.

    Raises:
      ValueError: if a name is not registered, or ``names`` is empty.
    """
    names = _names(jbp.activation_names() if names is None else names, "activation")
    for name in names:
        jbp.Activation(name)  # unknown names fail here, listing the known ones
    return st.sampled_from(names)


def losses(*, names: Sequence[str | jbp.Loss] | None = None) -> SearchStrategy[Any]:
    """Loss names (or :class:`jbp.Loss` objects).

    Args:
      names: built-in loss names or ``jbp.Loss`` objects to sample from;
        default ``jbp.loss_names()``.

    Returns:
      A strategy of the given names (``str``) or loss objects.

    Raises:
      ValueError: if a name is not a built-in loss, or ``names`` is empty.
    """
    names = _names(jbp.loss_names() if names is None else names, "loss")
    known = jbp.loss_names()
    for name in names:
        if not isinstance(name, jbp.Loss) and name not in known:
            raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(known)}")
    return st.sampled_from(names)


def dtypes(*, names: Sequence[str] = ("float32", "float64")) -> SearchStrategy[np.dtype]:
    """Floating dtypes, as ``jnp.dtype`` objects.

    64-bit names are dropped when ``jax_enable_x64`` is off (checked when the
    strategy is created), so the default draws only float32 then.

    Args:
      names: dtype names to sample from, e.g. ``("float64",)``.

    Returns:
      A strategy of ``jnp.dtype`` values.

    Raises:
      ValueError: if a name is not a floating dtype, or only 64-bit names
        were given while ``jax_enable_x64`` is off.
    """
    dts = []
    for name in _names(names, "dtype"):
        dt = jnp.dtype(name)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"`names` must hold floating dtypes, got {name!r}")
        dts.append(dt)
    if not jax.config.read("jax_enable_x64"):
        dts = [dt for dt in dts if dt.itemsize < 8]
        if not dts:
            raise ValueError(
                f"`names`={tuple(names)!r} are all 64-bit but jax_enable_x64 is off; run "
                "jax.config.update('jax_enable_x64', True) first (or include 'float32')"
            )
    return st.sampled_from(dts)


def batch_sizes(
    *, min_size: int = 1, max_size: int = 32, single: bool = True
) -> SearchStrategy[int | None]:
    """Batch sizes; ``None`` stands for a single unbatched example.

    Args:
      min_size, max_size: bounds of the batch size.
      single: also draw ``None``, meaning ``x`` of shape ``(fan_in,)``.

    Returns:
      A strategy of ``int`` (``x`` of shape ``(batch, fan_in)``) or ``None``,
      shrinking towards ``min_size``.
    """
    _check_range(min_size, max_size, "min_size", "max_size", least=1)
    sizes = st.integers(min_size, max_size)
    return st.one_of(sizes, st.none()) if single else sizes


def architectures(
    *,
    min_depth: int = 1,
    max_depth: int = 6,
    min_width: int = 1,
    max_width: int = 32,
    fan_in: int | None = None,
    fan_out: int | None = None,
    activations: Sequence[str] | None = None,
    activation_layers: bool = True,
    bias: bool | None = None,
) -> SearchStrategy[jbp.Sequential]:
    """Random :class:`jbp.Sequential` networks of Dense and Activation layers.

    Args:
      min_depth, max_depth: bounds of the number of Dense layers.
      min_width, max_width: bounds of every width (input, hidden, output).
      fan_in: fix the input width (default: drawn).
      fan_out: fix the output width (default: drawn).
      activations: activation names to draw from, independently for every
        Dense and Activation layer; default every registered name.
      activation_layers: also insert parameterless ``jbp.Activation`` layers,
        at most one in each gap between Dense layers, before the first and
        after the last included.
      bias: give every Dense layer a bias (True), none (False), or draw it per
        layer (None).

    Returns:
      A strategy of networks with ``net.fan_in`` and ``net.fan_out`` set;
      shrinks towards shallow, narrow networks without Activation layers.
    """
    _check_range(min_depth, max_depth, "min_depth", "max_depth", least=1)
    _check_range(min_width, max_width, "min_width", "max_width", least=1)
    for name, value in (("fan_in", fan_in), ("fan_out", fan_out)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(f"`{name}` must be None or a positive int, got {value!r}")
    acts = _activations_strategy(names=activations)
    widths = st.integers(min_width, max_width)
    biases = st.booleans() if bias is None else st.just(bool(bias))

    @st.composite
    def draw_net(draw: Any) -> jbp.Sequential:
        depth = draw(st.integers(min_depth, max_depth))
        sizes = [fan_in if fan_in is not None else draw(widths)]
        sizes += [draw(widths) for _ in range(depth - 1)]
        sizes.append(fan_out if fan_out is not None else draw(widths))
        gaps = [
            draw(st.lists(acts, max_size=1)) if activation_layers else [] for _ in range(depth + 1)
        ]
        layers: list[Any] = [jbp.Activation(name) for name in gaps[0]]
        for i in range(depth):
            layers.append(jbp.Dense(sizes[i], sizes[i + 1], draw(acts), bias=draw(biases)))
            layers.extend(jbp.Activation(name) for name in gaps[i + 1])
        return jbp.Sequential(layers)

    return draw_net()


_activations_strategy = activations  # `architectures` shadows the name with its argument


class _HypothesisPicker:
    """The architecture recipes' choices, drawn by hypothesis (and so shrinking:
    integers towards their low end, choices towards the first option, chances
    towards no)."""

    def __init__(self, draw: Any) -> None:
        self.draw = draw

    def integer(self, lo: int, hi: int) -> int:
        return int(self.draw(st.integers(lo, hi)))

    def choice(self, options: Sequence[Any]) -> Any:
        return self.draw(st.sampled_from(tuple(options)))

    def chance(self, p: float) -> bool:
        return bool(self.draw(st.integers(0, 99)) >= round(100 * (1 - p)))


def _family_args(
    max_blocks: int, max_width: int, fan_out: int | None, activations: Sequence[str] | None
) -> tuple[tuple[str, ...], SearchStrategy[int]]:
    _check_int("max_blocks", max_blocks, 1)
    _check_int("max_width", max_width, 1)
    if fan_out is not None:
        _check_int("fan_out", fan_out, 1)
    names = _names(jbp.activation_names() if activations is None else activations, "activation")
    for name in names:
        jbp.Activation(name)
    outs = st.just(fan_out) if fan_out is not None else st.integers(1, max(max_width, 2))
    return names, outs


def _check_dims(dims: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(dims)
    if not dims or any(d not in (1, 2, 3) for d in dims):
        raise ValueError(f"`dims` must hold spatial ranks among 1, 2 and 3, got {dims!r}")
    return dims


def cnns(
    *,
    max_blocks: int = 3,
    max_channels: int = 6,
    fan_out: int | None = None,
    activations: Sequence[str] | None = None,
    dims: Sequence[int] = (1, 2),
    max_size: int = 8,
    feature_map_outputs: bool = True,
) -> SearchStrategy[Architecture]:
    """Random convolutional networks with their input shape.

    Each of 1 to ``max_blocks`` blocks is a :class:`jbp.Conv` (kernel 1–3 per
    axis, stride 1–2, SAME/VALID/explicit padding, dilation 1–2, groups
    dividing the channels, bias or not, a drawn activation) followed by
    nothing, a max or average pool, a LayerNorm/RMSNorm over channels, an
    Activation, or a Dense layer on the channel axis; the head is Flatten → Dense, GlobalAvgPool → Dense or (with
    ``feature_map_outputs``) a 1×1 Conv whose feature maps are the outputs.

    Args:
      max_blocks: the most convolutions before the head.
      max_channels: the most channels of the input and of every convolution.
      fan_out: output features (channels, for a feature-map head); drawn if None.
      activations: names to draw from; default every registered one.
      dims: spatial ranks to draw from: 1 (signals ``(length, channels)``), 2
        (images ``(height, width, channels)``), 3.
      max_size: the largest input extent per spatial axis (at least 3).
      feature_map_outputs: allow the feature-map head.

    Returns:
      A strategy of :class:`Architecture` ``(net, in_shape)``; pass it as
      ``problems(nets=...)``. Shrinks towards one small 1-D convolution.
    """
    names, outs = _family_args(max_blocks, max_channels, fan_out, activations)
    dims = _check_dims(dims)
    _check_int("max_size", max_size, 3)

    @st.composite
    def draw_cnn(draw: Any) -> Architecture:
        return _cnn_recipe(
            _HypothesisPicker(draw),
            max_blocks=max_blocks,
            max_channels=max_channels,
            activations=names,
            fan_out=draw(outs),
            dims=dims,
            max_size=max_size,
            allow_maps=feature_map_outputs,
        )

    return draw_cnn()


def resnets(
    *,
    max_blocks: int = 3,
    max_width: int = 6,
    fan_out: int | None = None,
    activations: Sequence[str] | None = None,
    dims: Sequence[int] = (1, 2),
    max_size: int = 6,
) -> SearchStrategy[Architecture]:
    """Random residual and branching networks, on vectors or images.

    Vectors: a Dense stem, then 1 to ``max_blocks`` blocks, each a
    :class:`jbp.Residual` (around a Dense, two Dense, a norm and two Dense, or
    a :class:`jbp.Parallel` sum that nests another Residual), a Parallel
    concatenation or a Parallel sum; then a Dense head. Images: a Conv stem,
    residual conv blocks (optionally pre-normed), Inception-style Parallel
    concatenations of 1×1 and 3×3 convolutions, or pooling; then a Flatten or
    GlobalAvgPool head.

    Args:
      max_blocks: the most blocks after the stem.
      max_width: the largest width (vectors) or channel count (images, capped at 6).
      fan_out, activations, dims, max_size: as for :func:`cnns`.

    Returns:
      A strategy of :class:`Architecture` ``(net, in_shape)``.
    """
    names, outs = _family_args(max_blocks, max_width, fan_out, activations)
    dims = _check_dims(dims)
    _check_int("max_size", max_size, 3)

    @st.composite
    def draw_resnet(draw: Any) -> Architecture:
        return _resnet_recipe(
            _HypothesisPicker(draw),
            max_blocks=max_blocks,
            max_width=max_width,
            activations=names,
            fan_out=draw(outs),
            dims=dims,
            max_size=max_size,
        )

    return draw_resnet()


def transformers(
    *,
    max_depth: int = 2,
    max_vocab: int = 8,
    max_length: int = 6,
    activations: Sequence[str] | None = None,
) -> SearchStrategy[Architecture]:
    """Random :func:`jbp.transformer` networks on integer tokens.

    Vocabulary 2 to ``max_vocab``; 1 to 3 heads, each 1 to 3 wide (at least 3
    features: LayerNorm of fewer is degenerate); depth 1 to ``max_depth``; MLP
    ratio 1 or 2; a drawn activation; causal or not; sequences of 1 to
    ``max_length`` tokens, the positional table up to 2 longer.

    Returns:
      A strategy of :class:`Architecture` ``(net, (T,), vocab)``; ``problems``
      draws integer tokens for it.
    """
    _check_int("max_depth", max_depth, 1)
    _check_int("max_vocab", max_vocab, 2)
    _check_int("max_length", max_length, 1)
    names, _ = _family_args(1, 1, None, activations)

    @st.composite
    def draw(draw: Any) -> Architecture:
        return _transformer_recipe(
            _HypothesisPicker(draw),
            max_depth=max_depth,
            max_width=max_vocab,
            activations=names,
            max_length=max_length,
        )

    return draw()


def sequence_stacks(
    *,
    max_blocks: int = 3,
    max_width: int = 6,
    max_length: int = 6,
    fan_out: int | None = None,
    activations: Sequence[str] | None = None,
) -> SearchStrategy[Architecture]:
    """Random stacks on continuous sequences ``(T, features)``.

    A Dense input projection, an optional :class:`jbp.PositionalEmbedding`,
    then 1 to ``max_blocks`` blocks, each a pre-normed residual
    :class:`jbp.MultiHeadAttention` (causal or not, bias or not), a residual
    Dense MLP, a bare attention layer or a Dense layer, then a Dense head with
    ``fan_out`` outputs per position.

    Returns:
      A strategy of :class:`Architecture` ``(net, (T, fan_in))``.
    """
    names, outs = _family_args(max_blocks, max_width, fan_out, activations)
    _check_int("max_length", max_length, 1)

    @st.composite
    def draw(draw: Any) -> Architecture:
        return _sequence_recipe(
            _HypothesisPicker(draw),
            max_blocks=max_blocks,
            max_width=max_width,
            activations=names,
            fan_out=draw(outs),
            max_length=max_length,
        )

    return draw()


def llamas(
    *,
    max_depth: int = 2,
    max_vocab: int = 8,
    max_length: int = 6,
    activations: Sequence[str] | None = None,
    causal: bool | None = None,
) -> SearchStrategy[Architecture]:
    """Random networks of the ``"llama"`` family on integer tokens.

    :func:`jbp.llama` itself, or decoders and encoders (causal or not) of 1 to
    ``max_depth`` pairs of residual blocks: attention with rotary or learned
    positions, ``kv_heads`` dividing ``heads`` (grouped-query, multi-query),
    bias or not; SwiGLU gates (``Parallel(..., merge="product")``) or Dense
    MLPs; RMSNorm, LayerNorm or GroupNorm; Dropout in some; the output tied to
    the embedding (:class:`jbp.Tied`) or its own. Vocabulary 2 to
    ``max_vocab``, sequences of 1 to ``max_length`` tokens. ``causal``: decoders
    only (True), encoders only (False) or either (None).

    Returns:
      A strategy of :class:`Architecture` ``(net, (T,), vocab)``; draw whole
      problems with :func:`padded_problems`.
    """
    _check_int("max_depth", max_depth, 1)
    _check_int("max_vocab", max_vocab, 2)
    _check_int("max_length", max_length, 1)
    names, _ = _family_args(1, 1, None, activations)

    @st.composite
    def draw(draw: Any) -> Architecture:
        return _llama_recipe(
            _HypothesisPicker(draw),
            max_blocks=max_depth,
            max_width=max_vocab,
            activations=names,
            max_length=max_length,
            causal=causal,
        )

    return draw()


def recurrents(
    *,
    max_depth: int = 2,
    max_width: int = 5,
    max_length: int = 5,
    fan_out: int | None = None,
    activations: Sequence[str] | None = None,
) -> SearchStrategy[Architecture]:
    """Random recurrent networks: RNN (drawn activation), LSTM and GRU layers.

    Continuous sequences ``(T, features)`` or tokens (an Embedding first); 1 to
    ``max_depth`` recurrent layers of 1 to ``max_width`` hidden units, some
    bidirectional (:func:`jbp.bidirectional`), a :class:`jbp.Reverse` or a Dense
    layer now and then; the last returns sequences or its last state; a Dense
    head with ``fan_out`` outputs (drawn if None). Draw whole problems, padded
    or not, with :func:`padded_problems` (``nets=recurrents()``).

    Returns:
      A strategy of :class:`Architecture` ``(net, in_shape, vocab)``.
    """
    names, outs = _family_args(max_depth, max_width, fan_out, activations)
    _check_int("max_length", max_length, 1)

    @st.composite
    def draw(draw: Any) -> Architecture:
        return _rnn_recipe(
            _HypothesisPicker(draw),
            max_blocks=max_depth,
            max_width=max_width,
            activations=names,
            fan_out=draw(outs),
            max_length=max_length,
        )

    return draw()


class PaddedProblem(NamedTuple):
    """A gradient problem on a padded batch of sequences.

    Attributes:
      net, loss, params, x, y: as :func:`problems` draws them; ``x`` is
        ``(batch, T, ...)``, ``y`` integer labels (``-1`` at padded positions
        and, now and then, at real ones: no target) or targets (any values at
        padded positions: they must not matter).
      mask: ``(batch, T)`` boolean, True at real positions (right padding), or
        None when drawn unpadded.
      dropout_key: a PRNG key for a network with :class:`jbp.Dropout`, or None.
    """

    net: jbp.Sequential
    loss: Any
    params: Any
    x: jax.Array
    y: jax.Array
    mask: jax.Array | None
    dropout_key: jax.Array | None

    @property
    def keywords(self) -> dict[str, Any]:
        """``{"mask": ..., "dropout_key": ...}`` for every function of ``(params, x, y)``."""
        return {"mask": self.mask, "dropout_key": self.dropout_key}

    @property
    def lengths(self) -> list[int]:
        """Each example's real length (``T`` for all when unpadded)."""
        t = self.x.shape[1]
        if self.mask is None:
            return [t] * self.x.shape[0]
        return [int(n) for n in np.asarray(self.mask).sum(axis=1)]


def padded_problems(
    *,
    nets: SearchStrategy[Any] | None = None,
    dtypes: Sequence[str] | SearchStrategy[Any] | None = None,
    losses: Sequence[str | jbp.Loss] | SearchStrategy[Any] | None = None,
    min_batch: int = 1,
    max_batch: int = 4,
    padded: bool | None = True,
    dropout: bool = True,
) -> SearchStrategy[PaddedProblem]:
    """Whole problems on padded batches of sequences, as :class:`PaddedProblem`.

    Args:
      nets: a strategy of :class:`Architecture` on sequences (default
        :func:`llamas`); ``in_shape[0]`` is the sequence length.
      dtypes, losses: as for :func:`problems`.
      min_batch, max_batch: the batch size's bounds.
      padded: True (always a mask: each example's length in ``[1, T]``, now and
        then 0), False (never), None (drawn).
      dropout: whether a network with Dropout gets a ``dropout_key`` (else it
        runs as at evaluation).

    Padded positions of ``x`` hold random tokens (or values): a right answer does
    not depend on them.
    """
    dtype_st = _as_strategy(dtypes, _dtypes_strategy)
    loss_st = _as_strategy(losses, _losses_strategy)
    nets = llamas() if nets is None else nets
    _check_range(min_batch, max_batch, "min_batch", "max_batch", least=1)

    @st.composite
    def draw_problem(draw: Any) -> PaddedProblem:
        dtype = draw(dtype_st)
        loss = draw(loss_st)
        kind = _target_kind(loss)
        net, shape, vocab = draw(nets)
        batch = draw(st.integers(min_batch, max_batch))
        rng = np.random.default_rng(draw(_SEEDS))
        params = _draw_params(net, dtype, rng)
        x_shape = (batch, *shape)
        if vocab is not None:
            x = jnp.asarray(rng.integers(0, vocab, x_shape), dtype=jnp.int32)
        else:
            x = jnp.asarray(rng.standard_normal(x_shape), dtype=dtype)
        out_shape = net.output_shape(shape)
        if kind == _CLASSES:
            assume(out_shape[-1] >= 2)
        y = _targets(draw, kind, rng, (batch, *out_shape), dtype)
        pad = draw(st.booleans()) if padded is None else padded
        mask = None
        if pad:
            lengths = _padding(_HypothesisPicker(draw), batch, shape[0])
            mask = jnp.asarray(np.arange(shape[0])[None] < np.asarray(lengths)[:, None])
        if jnp.issubdtype(y.dtype, jnp.integer) and y.ndim >= 2:
            labels = np.asarray(y).copy()
            none = rng.random(labels.shape) < 0.15
            if mask is not None:
                none |= ~np.asarray(mask)
            labels[none] = -1
            y = jnp.asarray(labels, dtype=jnp.int32)
        key = None
        if dropout and _has_dropout(net):
            key = jax.random.key(int(rng.integers(2**31)))
        return PaddedProblem(net, loss, params, x, y, mask, key)

    return draw_problem()


def _target_kind(loss: str | jbp.Loss) -> str:
    name = loss.name if isinstance(loss, jbp.Loss) else loss
    if name in _TARGETS:
        return _TARGETS[name]
    return _CLASSES if getattr(loss, "integer_labels", False) else _REAL


def _draw_params(net: jbp.Sequential, dtype: np.dtype, rng: np.random.Generator) -> Any:
    """Params shaped like ``net.init``'s, filled by numpy (no XLA compile per shape).

    Leaves of rank >= 2 get Glorot normal values, N(0, 2/(fan_in + fan_out))
    with ``fan_out = shape[-1]`` and ``fan_in`` the product of the other axes
    (Dense ``w`` ``(fan_in, fan_out)``; Conv ``w`` ``(*kernel, in, out)``);
    smaller leaves such as biases and norm scales get N(0, 0.5²), so that they
    are nonzero.
    """
    shapes = jax.eval_shape(lambda key: net.init(key, dtype), jax.random.key(0))

    def fill(leaf: Any) -> jax.Array:
        shape = tuple(leaf.shape)
        std = math.sqrt(2.0 / (math.prod(shape[:-1]) + shape[-1])) if len(shape) >= 2 else _BIAS_STD
        return jnp.asarray(rng.normal(0.0, std, shape), dtype=leaf.dtype)

    return jtu.tree_map(fill, shapes)


def _perturb(params: Any, rng: np.random.Generator) -> Any:
    """Add N(0, 0.5²) noise to every leaf that init filled with one constant."""

    def perturb(leaf: Any) -> Any:
        a = np.asarray(leaf, dtype=np.float64)
        if a.size and np.all(a == a.flat[0]):
            return jnp.asarray(a + rng.normal(0.0, _BIAS_STD, a.shape), dtype=leaf.dtype)
        return leaf

    return jtu.tree_map(perturb, params)


def _targets(
    draw: Any, kind: str, rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype
) -> jax.Array:
    if kind == _REAL:
        return jnp.asarray(rng.standard_normal(shape), dtype=dtype)
    if kind == _UNIT:
        if draw(st.booleans()):
            return jnp.asarray(rng.integers(0, 2, shape), dtype=dtype)
        return jnp.asarray(rng.uniform(0.0, 1.0, shape), dtype=dtype)
    width = shape[-1]
    labels = rng.integers(0, width, shape[:-1])
    form = draw(st.sampled_from(("labels", "one-hot", "probabilities")))
    if form == "labels":
        return jnp.asarray(labels, dtype=jnp.int32)
    if form == "one-hot":
        return jnp.asarray(np.eye(width)[labels], dtype=dtype)
    return jnp.asarray(rng.dirichlet(np.ones(width), shape[:-1]), dtype=dtype)


def _as_strategy(value: Any, make: Any) -> SearchStrategy[Any]:
    if isinstance(value, SearchStrategy):
        return value
    return make() if value is None else make(names=value)


def problems(
    *,
    dtypes: Sequence[str] | SearchStrategy[Any] | None = None,
    losses: Sequence[str | jbp.Loss] | SearchStrategy[Any] | None = None,
    nets: jbp.Sequential | SearchStrategy[Any] | None = None,
    in_shape: Sequence[int] | None = None,
    min_depth: int = 1,
    max_depth: int = 6,
    min_width: int = 1,
    max_width: int = 32,
    activations: Sequence[str] | None = None,
    activation_layers: bool = True,
    bias: bool | None = None,
    min_batch: int = 1,
    max_batch: int = 32,
    single: bool = True,
    params_from_init: bool = False,
) -> SearchStrategy[tuple[jbp.Sequential, Any, Any, jax.Array, jax.Array]]:
    """Whole gradient problems ``(net, loss, params, x, y)``.

    ``params`` have the tree, shapes and dtype that ``net.init`` gives (found
    with ``jax.eval_shape``) and numpy values: Glorot normal for leaves of
    rank >= 2, N(0, 0.5²) for the rest, so biases are nonzero and every bias
    gradient path is exercised. (Running ``net.init`` itself compiles the
    random-number kernels for each new shape, about a second per problem on a
    CPU; pass ``params_from_init=True`` for that, e.g. when a layer's params
    must satisfy a constraint its ``init`` knows about: leaves ``init`` fills
    with one constant then get N(0, 0.5²) noise.) ``x ~ N(0, 1)``. ``y`` suits the
    loss: real N(0, 1) targets for ``half_sse`` and ``mse``, targets in
    [0, 1] (sometimes exactly 0/1) for ``sigmoid_bce``, and for
    ``softmax_xent`` integer labels, one-hot or probability targets, with at
    least two outputs so the gradient is not identically zero. A custom
    :class:`jbp.Loss` gets labels or one-hot targets if it takes integer
    labels, else real targets.

    Args:
      dtypes: dtype names, or a strategy of dtypes (default :func:`dtypes`).
      losses: loss names or ``jbp.Loss`` objects, or a strategy of them
        (default every built-in loss).
      nets: a network, or a strategy of networks (e.g. ones holding your own
        layers) or of :class:`Architecture` pairs such as :func:`cnns` and
        :func:`resnets` draw; default :func:`architectures` with the
        arguments below.
      in_shape: the shape of one input example for networks given without
        one; default ``(net.fan_in,)``.
      min_depth, max_depth, min_width, max_width, activations,
        activation_layers, bias: passed to :func:`architectures`.
      min_batch, max_batch, single: passed to :func:`batch_sizes`.
      params_from_init: take params from ``net.init`` with a drawn key (see
        above) instead of drawing them with numpy.

    Returns:
      A strategy of ``(net, loss, params, x, y)``: ``loss`` as drawn (a name or
      a ``jbp.Loss``); ``params`` a tuple, one entry per layer, in the drawn
      dtype; ``x`` of shape ``(batch, *in_shape)``, or ``in_shape`` for a
      single example (an MLP: ``(batch, fan_in)`` / ``(fan_in,)``); ``y``
      shaped like the network output, or integer labels of that shape without
      its last (class) axis.

    Example:
      >>> import jbp, jbp.testing
      >>> from hypothesis import given, settings
      >>> @settings(max_examples=3, deadline=None, database=None)
      ... @given(jbp.testing.problems(max_depth=2, max_width=4))
      ... def test_backprop(problem):
      ...     net, loss, params, x, y = problem
      ...     jbp.verify(net, loss, params, x, y).raise_if_failed()
      >>> test_backprop()
    """
    dtype_st = _as_strategy(dtypes, _dtypes_strategy)
    loss_st = _as_strategy(losses, _losses_strategy)
    batch_st = batch_sizes(min_size=min_batch, max_size=max_batch, single=single)
    if isinstance(nets, jbp.Sequential):
        nets = st.just(nets)
    arch: dict[str, Any] = dict(
        min_depth=min_depth,
        max_depth=max_depth,
        min_width=min_width,
        max_width=max_width,
        activations=activations,
        activation_layers=activation_layers,
        bias=bias,
    )
    if nets is None:
        if activations is None:  # fix the names now, as the docstring of `activations` says
            arch["activations"] = jbp.activation_names()
        architectures(**arch)  # validate the arguments now, not at the first draw
        if max_width < 2:
            loss_st = loss_st.filter(lambda loss: _target_kind(loss) != _CLASSES)

    @st.composite
    def draw_problem(draw: Any) -> tuple[jbp.Sequential, Any, Any, jax.Array, jax.Array]:
        dtype = draw(dtype_st)
        loss = draw(loss_st)
        kind = _target_kind(loss)
        if nets is None:
            out = draw(st.integers(max(2, min_width), max_width)) if kind == _CLASSES else None
            net = draw(architectures(fan_out=out, **arch))
        else:
            net = draw(nets)
        vocab = None
        if isinstance(net, Architecture):
            net, shape, vocab = net
        elif in_shape is not None:
            shape = tuple(in_shape)
        elif net.fan_in is not None:
            shape = (net.fan_in,)
        else:
            raise ValueError(
                f"cannot draw inputs for {net!r}: no layer declares `fan_in`; pass `in_shape`"
            )
        batch = draw(batch_st)
        rng = np.random.default_rng(draw(_SEEDS))
        if params_from_init:
            params = net.init(jax.random.key(int(rng.integers(2**31))), dtype)
            params = _perturb(params, rng)
        else:
            params = _draw_params(net, dtype, rng)
        x_shape = shape if batch is None else (batch, *shape)
        if vocab is not None:  # integer tokens for an Embedding
            x = jnp.asarray(rng.integers(0, vocab, x_shape), dtype=jnp.int32)
        else:
            x = jnp.asarray(rng.standard_normal(x_shape), dtype=dtype)
        out_shape = net.output_shape(shape)
        if kind == _CLASSES:
            assume(out_shape[-1] >= 2)  # one class: softmax_xent's gradient is identically zero
        y_shape = out_shape if batch is None else (batch, *out_shape)
        y = _targets(draw, kind, rng, y_shape, dtype)
        return net, loss, params, x, y

    return draw_problem()


_dtypes_strategy = dtypes
_losses_strategy = losses


_dtypes = dtypes  # vjp_inputs' parameter of that name shadows it


def vjp_inputs(
    shapes: Sequence[Sequence[int | str]],
    *,
    dims: dict[str, Any] | None = None,
    dtypes: Sequence[str] = ("float32", "float64"),
    scale: float = 1.0,
) -> SearchStrategy[tuple[jax.Array, ...]]:
    """Primals for :func:`jbp.check_vjp`, over shapes and dtypes.

    Args:
      shapes: one shape per argument; an entry is an int or the name of a
        dimension, e.g. ``[("T", "d"), ("S", "d"), ("S", "d")]`` for attention's
        ``q, k, v``: every shape that names a dimension gets the same drawn size.
      dims: each named dimension's sizes: an int strategy or a ``(lo, hi)`` range
        (default ``(1, 8)``), e.g. ``{"S": st.sampled_from([4, 8, 16])}``.
      dtypes: floating dtype names, one drawn for all arguments (64-bit names
        dropped when ``jax_enable_x64`` is off, as :func:`dtypes`).
      scale: the values' standard deviation (drawn N(0, scale²) from a drawn seed).

    Returns:
      A strategy of tuples of arrays, one per shape.

    Example::

        @given(jbp.testing.vjp_inputs([("T", "d"), ("S", "d"), ("S", "d")],
                                      dims={"S": st.sampled_from([4, 8])}))
        def test_attention(qkv):
            jbp.check_vjp(attention, *qkv, 4).raise_if_failed()
    """
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or not shapes:
        raise TypeError(f"`shapes` must be a non-empty sequence of shapes, got {shapes!r}")
    names: set[str] = set()
    for k, shape in enumerate(shapes):
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise TypeError(f"`shapes[{k}]` must be a tuple of ints or names, got {shape!r}")
        for entry in shape:
            if isinstance(entry, str):
                names.add(entry)
            elif isinstance(entry, bool) or not isinstance(entry, int) or entry < 0:
                raise ValueError(
                    f"`shapes[{k}]` entries must be sizes ≥ 0 or dimension names, got {entry!r}"
                )
    given = dict(dims or {})
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"`dims` names {unknown}, which no shape uses")
    sizes: dict[str, SearchStrategy[int]] = {}
    for name in sorted(names):
        spec = given.get(name, (1, 8))
        if isinstance(spec, SearchStrategy):
            sizes[name] = spec
        elif isinstance(spec, tuple) and len(spec) == 2:
            _check_range(spec[0], spec[1], f"dims[{name!r}][0]", f"dims[{name!r}][1]", least=1)
            sizes[name] = st.integers(spec[0], spec[1])
        else:
            raise TypeError(
                f"`dims[{name!r}]` must be an int strategy or a (lo, hi) range, got {spec!r}"
            )
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"`scale` must be a positive finite number, got {scale!r}")
    dtype_strategy = _dtypes(names=dtypes)

    @st.composite
    def draw(draw: Any) -> tuple[jax.Array, ...]:
        size = {name: draw(sizes[name], label=name) for name in sorted(names)}
        dtype = draw(dtype_strategy, label="dtype")
        rng = np.random.default_rng(draw(_SEEDS, label="seed"))
        return tuple(
            jnp.asarray(
                scale * rng.standard_normal([size[e] if isinstance(e, str) else e for e in s]),
                dtype,
            )
            for s in shapes
        )

    return draw()
