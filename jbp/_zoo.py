"""A seeded zoo of random gradient problems for the CLI and experiment scripts.

Unlike :mod:`jbp.testing` (hypothesis strategies that shrink), this draws
everything from one ``numpy.random.Generator``, so a sweep is reproducible from
its seed, needs no hypothesis, and costs no XLA compilation to sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._activations import activation_names
from ._architectures import (
    FAMILIES,
    NumpyPicker,
    cnn,
    llama_family,
    padding,
    resnet,
    rnn_family,
    sequence_family,
)
from ._losses import loss_names
from .layers import (
    Activation,
    AvgPool,
    Conv,
    Dense,
    Dropout,
    Embedding,
    GroupNorm,
    LayerNorm,
    MaxPool,
    MultiHeadAttention,
    Parallel,
    PositionalEmbedding,
    Residual,
    RMSNorm,
    Sequential,
    Tied,
)
from .layers._dense import HE_ACTIVATIONS as _HE_ACTIVATIONS
from .layers._dropout import has_dropout

BIAS_STD = 0.5  # std of the noise that makes zero-initialised biases nonzero
SINGLE_EXAMPLE_P = 0.125  # chance that x is one example (fan_in,) instead of a batch
ACTIVATION_LAYER_P = 0.25  # chance of a parameterless Activation layer in each gap
MAX_BATCH = 32
MAX_BATCH_IMAGES = 8  # conv and residual problems: small batches keep a sweep fast
PADDED_P = 0.75  # chance that a llama-family batch is padded (a mask, labels -1 there)
NO_TARGET_P = 0.15  # chance of the label -1 ("no target") at a real position


class Problem(NamedTuple):
    """One gradient problem, ready for ``jbp.verify(net, loss, params, x, y)``.

    Attributes:
      net: the network.
      loss: the loss name.
      params: a tuple, one entry per layer, in the drawn dtype.
      x: ``(batch, fan_in)``, or ``(fan_in,)`` for a single example.
      y: targets ``(batch, fan_out)`` / ``(fan_out,)``, or integer labels
        ``(batch,)`` / ``()`` for ``softmax_xent``.
      description: one line naming dtype, loss, batch, targets and layers,
        e.g. ``"float32 half_sse batch=4: x(3) → Dense(3→2, tanh, b) → sin"``.
      mask: the padding mask ``(batch, T)`` of a padded batch, or None.
      dropout_key: the dropout key of a network with :class:`jbp.Dropout`, or None.
    """

    net: Sequential
    loss: str
    params: tuple[Any, ...]
    x: jax.Array
    y: jax.Array
    description: str
    mask: jax.Array | None = None
    dropout_key: jax.Array | None = None

    @property
    def n_params(self) -> int:
        """The number of scalar parameters (see :func:`n_params`)."""
        return n_params(self.params)

    @property
    def keywords(self) -> dict[str, Any]:
        """``mask`` and ``dropout_key``, for every function of ``(params, x, y)``."""
        return {"mask": self.mask, "dropout_key": self.dropout_key}


def n_params(params: Any) -> int:
    """The number of scalar parameters in a params pytree."""
    return sum(int(np.prod(leaf.shape)) for leaf in jtu.tree_leaves(params))


def _dims(shape: Any) -> str:
    return "×".join(str(v) for v in shape)


def _layer(layer: Any) -> str:
    """One layer in a few characters, e.g. ``Conv(2→4, 3×3, s2, VALID, relu)``."""
    if isinstance(layer, Dense):
        bias = ", b" if layer.bias else ""
        return f"Dense({layer.fan_in}→{layer.fan_out}, {layer.activation}{bias})"
    if isinstance(layer, Activation):
        return layer.name
    if isinstance(layer, Conv):
        extra = [f"s{_dims(layer.stride)}"] if set(layer.stride) != {1} else []
        extra += [f"d{_dims(layer.dilation)}"] if set(layer.dilation) != {1} else []
        extra += [f"g{layer.groups}"] if layer.groups > 1 else []
        pad = layer.padding if isinstance(layer.padding, str) else f"pad{list(layer.padding)}"
        bias = ", b" if layer.bias else ""
        return (
            f"Conv({layer.in_channels}→{layer.out_channels}, {_dims(layer.kernel_size)}, "
            + ", ".join([*extra, pad, layer.activation])
            + f"{bias})"
        )
    if isinstance(layer, (MaxPool, AvgPool)):
        return f"{type(layer).__name__}({_dims(layer.window)}, s{_dims(layer.stride)}, {layer.padding})"
    if isinstance(layer, Sequential):
        return "[" + " → ".join(_layer(child) for child in layer.layers) + "]"
    if isinstance(layer, Residual):
        return f"Residual{_layer(layer.block) if isinstance(layer.block, Sequential) else '[' + _layer(layer.block) + ']'}"
    if isinstance(layer, Parallel):
        return f"Parallel-{layer.merge}[" + " | ".join(_layer(b) for b in layer.branches) + "]"
    if isinstance(layer, (LayerNorm, RMSNorm)):
        return f"{type(layer).__name__}({layer.features})"
    if isinstance(layer, GroupNorm):
        return f"GroupNorm({layer.groups}×{layer.features // layer.groups})"
    if isinstance(layer, Dropout):
        return f"Dropout({layer.rate})"
    if isinstance(layer, Tied):
        return (
            f"Tied[{_layer(layer.layer)} ← layers[{layer.source}]{'ᵀ' if layer.transpose else ''}]"
        )
    if isinstance(layer, MultiHeadAttention):
        flags = ", causal" if layer.causal else ""
        flags += "" if layer.bias else ", no bias"
        if layer.kv_heads is not None and layer.kv_heads != layer.heads:
            flags += f", {layer.kv_heads} kv"
        if layer.rope_theta is not None:
            flags += ", rope"
        return f"MHA({layer.features}, {layer.heads} heads{flags})"
    if isinstance(layer, Embedding):
        return f"Embedding({layer.vocab}→{layer.features})"
    if isinstance(layer, PositionalEmbedding):
        return f"Positions({layer.length}×{layer.features})"
    return repr(layer)


def describe(net: Sequential, in_shape: Any = None) -> str:
    """A compact one-line architecture, e.g. ``x(3) → Dense(3→2, tanh, b) → sin``."""
    shape = (net.fan_in,) if in_shape is None else in_shape
    return " → ".join([f"x({_dims(shape)})", *(_layer(layer) for layer in net.layers)])


def _check_int(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}")


def _array(values: Any, dtype: Any) -> jax.Array:
    """A device array, cast by numpy and copied with ``jax.device_put``
    (``jnp.asarray`` compiles a conversion kernel for every new shape)."""
    return jax.device_put(np.asarray(values).astype(jnp.dtype(dtype)))


def _pick(rng: np.random.Generator, names: Sequence[str]) -> str:
    return names[int(rng.integers(len(names)))]


def _numpy_params(net: Sequential, dtype: Any, rng: np.random.Generator) -> tuple[Any, ...]:
    """Params with ``net.init``'s tree, shapes and distributions, filled by numpy.

    ``net.init`` draws with ``jax.random``, whose kernels XLA compiles once per
    shape: about a second per random network on a CPU, more than verifying it.
    Here the shapes come from ``jax.eval_shape`` (no compilation) and the
    values from ``rng``: Dense weights N(0, 2/fan_in) for the relu family and
    N(0, 2/(fan_in + fan_out)) otherwise, as ``Dense.init``; other rank >= 2
    leaves Glorot; biases and other small leaves N(0, BIAS_STD²).
    """
    shapes = jax.eval_shape(lambda key: net.init(key, dtype), jax.random.key(0))
    params = []
    for layer, layer_shapes in zip(net.layers, shapes, strict=True):

        def fill(leaf: Any, layer: Any = layer) -> jax.Array:
            shape = tuple(leaf.shape)
            if len(shape) >= 2:
                fan_in = math.prod(shape[:-1])  # Dense (fan_in, fan_out); Conv (*k, I, O)
                if isinstance(layer, Dense) and layer.activation in _HE_ACTIVATIONS:
                    std = math.sqrt(2.0 / fan_in)
                else:
                    std = math.sqrt(2.0 / (fan_in + shape[-1]))
            else:
                std = BIAS_STD
            return _array(rng.normal(0.0, std, shape), leaf.dtype)

        params.append(jtu.tree_map(fill, layer_shapes))
    return tuple(params)


def _init_params(net: Sequential, dtype: Any, rng: np.random.Generator) -> tuple[Any, ...]:
    """``net.init(jax.random.key(seed))``, then N(0, BIAS_STD²) noise on every leaf
    ``init`` filled with one constant (zero biases)."""
    params = net.init(jax.random.key(int(rng.integers(2**31))), dtype)

    def perturb(leaf: Any) -> Any:
        a = np.asarray(leaf, dtype=np.float64)
        if a.size and np.all(a == a.flat[0]):
            return _array(a + rng.normal(0.0, BIAS_STD, a.shape), leaf.dtype)
        return leaf

    return jtu.tree_map(perturb, params)


def _targets(
    loss: str, rng: np.random.Generator, shape: tuple[int, ...], dtype: Any
) -> tuple[jax.Array, str]:
    """Targets that suit ``loss`` for outputs of ``shape``, and what kind they are."""
    if loss == "sigmoid_bce":
        if rng.random() < 0.25:
            return _array(rng.integers(0, 2, shape), dtype), "0/1 targets"
        return _array(rng.uniform(0.0, 1.0, shape), dtype), "targets in [0, 1]"
    if loss == "softmax_xent":
        width = shape[-1]
        if rng.random() < 0.5:
            labels = rng.integers(0, width, shape[:-1])
            return _array(labels, np.int32), "integer labels"
        probs = rng.dirichlet(np.ones(width), shape[:-1])
        return _array(probs, dtype), "probability targets"
    return _array(rng.standard_normal(shape), dtype), "real targets"


def random_problem(
    rng: np.random.Generator,
    *,
    dtype: Any,
    loss: str | None = None,
    min_depth: int = 1,
    max_depth: int = 6,
    max_width: int = 32,
    activation_layers: bool = True,
    activations: Sequence[str] | None = None,
    params_from_init: bool = False,
    arch: str = "mlp",
) -> Problem:
    """Draw one random gradient problem from ``rng``.

    The architecture, for ``arch="mlp"`` (the default): ``depth`` Dense layers, ``depth`` uniform in
    ``[min_depth, max_depth]``; every width (input, hidden, output) uniform in
    ``[1, max_width]`` (the output at least 2 for ``softmax_xent``); each Dense
    layer's activation drawn from ``activations`` and its bias on or off with
    even odds; with ``activation_layers``, a parameterless ``jbp.Activation``
    in each gap (before the first Dense layer, between two, after the last)
    with probability 1/4. ``arch="cnn"``: a 1-D or 2-D convolutional network
    of 1 to ``max_depth`` convolutions (random kernels, strides, paddings,
    dilations, groups, pooling, norm layers, up to ``max_width`` channels) and
    a Flatten, global-pooling or feature-map head; ``arch="resnet"``: residual
    and ``Parallel`` (sum or concat) blocks on vectors or images;
    ``arch="transformer"``: a :func:`jbp.transformer` on integer tokens or a
    stack of attention, Dense and LayerNorm blocks on continuous sequences (see
    :mod:`jbp._architectures`). The data: batch uniform in ``[1, 32]`` (``[1,
    8]`` for the other families), or with probability 1/8 a single example
    ``x`` of the input shape; ``x ~ N(0, 1)`` (tokens uniform over the
    vocabulary); targets by loss: N(0, 1) for ``half_sse`` and ``mse``,
    uniform in [0, 1] (sometimes exactly 0/1) for ``sigmoid_bce``, integer
    labels or Dirichlet probability targets for ``softmax_xent``.

    The same ``rng`` state gives the same architecture and values for any
    ``dtype`` (values are drawn in float64 and cast), so float32 and float64
    runs of one seed test the same networks.

    Args:
      rng: the numpy generator everything is drawn from.
      dtype: the floating dtype of params, ``x`` and real targets.
      loss: a built-in loss name, or None to draw one per problem.
      min_depth, max_depth: bounds of the number of Dense layers.
      max_width: the largest width.
      activation_layers: whether to insert parameterless Activation layers.
      activations: the activation names to draw from (default every
        registered name, ``jbp.activation_names()``).
      arch: the family, ``"mlp"``, ``"cnn"``, ``"resnet"``, ``"transformer"`` or
        ``"llama"`` (modern decoders and encoders: RoPE, grouped-query attention,
        SwiGLU gates, tied embeddings, GroupNorm, dropout; with odds 3/4 a padded
        batch with its ``mask`` and labels -1 at padded positions, and a
        ``dropout_key`` for a network with dropout: pass ``problem.keywords``);
        ``"rnn"`` (RNN, LSTM and GRU layers, stacked and bidirectional, on
        sequences or tokens; padded batches as for ``"llama"``).
      params_from_init: take params from ``net.init(jax.random.key(seed))``
        with zero biases perturbed by N(0, 0.5²), instead of drawing the same
        distributions with numpy (the default: ``jax.random`` compiles a kernel
        per shape, about a second per network on a CPU).

    Returns:
      A :class:`Problem`.

    Raises:
      ValueError: for an unknown loss or activation name, bad bounds, or
        ``softmax_xent`` with ``max_width < 2``.

    Example:
      >>> import numpy as np, jax.numpy as jnp, jbp
      >>> p = jbp.random_problem(np.random.default_rng(0), dtype=jnp.float32, max_depth=2)
      >>> jbp.verify(p.net, p.loss, p.params, p.x, p.y).ok
      True
    """
    if arch not in FAMILIES:
        raise ValueError(f"`arch` must be one of {', '.join(map(repr, FAMILIES))}, got {arch!r}")
    _check_int("min_depth", min_depth, 1)
    _check_int("max_depth", max_depth, 1)
    _check_int("max_width", max_width, 1)
    if min_depth > max_depth:
        raise ValueError(f"`min_depth`={min_depth} is larger than `max_depth`={max_depth}")
    known_losses = loss_names()
    if loss is not None and loss not in known_losses:
        raise ValueError(f"unknown loss {loss!r}; known losses: {', '.join(known_losses)}")
    if loss == "softmax_xent" and max_width < 2:
        raise ValueError("loss 'softmax_xent' needs at least 2 outputs but `max_width` is 1")
    names = tuple(activation_names() if activations is None else activations)
    if not names:
        raise ValueError("`activations` is empty: give at least one activation name")
    known = activation_names()
    for name in names:
        if name not in known:
            raise ValueError(f"unknown activation {name!r}; known activations: {', '.join(known)}")

    if loss is None:
        choices = [n for n in known_losses if max_width >= 2 or n != "softmax_xent"]
        loss = _pick(rng, choices)
    vocab: int | None = None
    if arch == "mlp":
        net, in_shape = _mlp(rng, loss, names, min_depth, max_depth, max_width, activation_layers)
        max_batch = MAX_BATCH
    else:
        pick = NumpyPicker(rng)
        fan_out = int(rng.integers(2 if loss == "softmax_xent" else 1, max(max_width, 2) + 1))
        if arch == "cnn":
            net, in_shape, vocab = cnn(
                pick, max_blocks=max_depth, max_channels=max_width, activations=names,
                fan_out=fan_out,
            )  # fmt: skip
        elif arch == "resnet":
            net, in_shape, vocab = resnet(
                pick, max_blocks=max_depth, max_width=max_width, activations=names,
                fan_out=fan_out,
            )  # fmt: skip
        elif arch == "transformer":
            net, in_shape, vocab = sequence_family(
                pick, max_blocks=max_depth, max_width=max_width, activations=names,
                fan_out=fan_out,
            )  # fmt: skip
        elif arch == "rnn":
            net, in_shape, vocab = rnn_family(
                pick, max_blocks=max_depth, max_width=max_width, activations=names,
                fan_out=fan_out,
            )  # fmt: skip
        else:
            net, in_shape, vocab = llama_family(
                pick, max_blocks=max_depth, max_width=max_width, activations=names
            )
        max_batch = MAX_BATCH_IMAGES

    single = rng.random() < SINGLE_EXAMPLE_P
    batch = int(rng.integers(1, max_batch + 1))
    if params_from_init:
        params = _init_params(net, dtype, rng)
    else:
        params = _numpy_params(net, dtype, rng)
    x_shape = in_shape if single else (batch, *in_shape)
    if vocab is not None:  # integer tokens for an Embedding
        x = _array(rng.integers(0, vocab, x_shape), np.int32)
    else:
        x = _array(rng.standard_normal(x_shape), dtype)
    out_shape = net.output_shape(in_shape)
    y, kind = _targets(loss, rng, out_shape if single else (batch, *out_shape), dtype)
    shape = "single example" if single else f"batch={batch}"
    mask = dropout_key = None
    extra = ""
    if arch in ("llama", "rnn"):  # padded batches, labels -1, dropout
        rows = 1 if single else batch
        if rng.random() < PADDED_P:
            lengths = padding(NumpyPicker(rng), rows, in_shape[0])
            m = np.arange(in_shape[0])[None] < np.asarray(lengths)[:, None]
            mask = jax.device_put(m[0] if single else m)
            extra += f", padded to {in_shape[0]} (lengths {lengths})"
        if kind == "integer labels" and len(out_shape) >= 2:  # labels per position
            labels = np.asarray(y).copy()
            none = rng.random(labels.shape) < NO_TARGET_P
            if mask is not None:
                none |= ~np.asarray(mask)
            labels[none] = -1
            y = _array(labels, np.int32)
            extra += ", labels -1 where no target"
        if has_dropout(net):
            dropout_key = jax.random.key(int(rng.integers(2**31)))
            extra += ", dropout on"
    description = (
        f"{jnp.dtype(dtype).name} {loss} {shape}, {kind}{extra}: {describe(net, in_shape)}"
    )
    return Problem(net, loss, params, x, y, description, mask, dropout_key)


def _mlp(
    rng: np.random.Generator,
    loss: str,
    names: Sequence[str],
    min_depth: int,
    max_depth: int,
    max_width: int,
    activation_layers: bool,
) -> tuple[Sequential, tuple[int, ...]]:
    depth = int(rng.integers(min_depth, max_depth + 1))
    sizes = [int(w) for w in rng.integers(1, max_width + 1, depth + 1)]
    if loss == "softmax_xent":
        sizes[-1] = int(rng.integers(2, max_width + 1))
    layers: list[Any] = []
    for i in range(depth + 1):
        if activation_layers and rng.random() < ACTIVATION_LAYER_P:
            layers.append(Activation(_pick(rng, names)))
        if i < depth:
            layers.append(Dense(sizes[i], sizes[i + 1], _pick(rng, names), bias=rng.random() < 0.5))
    return Sequential(layers), (sizes[0],)
