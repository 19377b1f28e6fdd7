"""The pinned network recipes, built from public layers and combinators only.

- :func:`transformer`: a pre-LN decoder (GPT-2's shape), learned positions;
- :func:`swiglu`: the gated MLP of Llama-style blocks;
- :func:`llama`: a Llama-style decoder (RMSNorm, RoPE, grouped-query attention,
  SwiGLU, no biases), optionally with tied input/output embeddings.

Tied embeddings (``tie_embeddings=True``): the output projection is
``Tied(Dense(features, vocab, bias=False), source=0, leaves={"w": "table"},
transpose=True)``, logits ``= h · tableᵀ``; its params entry is ``{}`` and the
embedding's table gets the gradient of both uses.
"""

from __future__ import annotations

import math
from typing import Any

from ._attention import MultiHeadAttention
from ._base import positive_int
from ._combinators import Parallel, Residual, Sequential
from ._dense import Dense
from ._embedding import Embedding, PositionalEmbedding
from ._norm import LayerNorm, RMSNorm
from ._shared import Tied


def _output(features: int, vocab: int, tie: bool, bias: bool) -> Any:
    """The output projection: its own ``Dense`` or the embedding's table, transposed."""
    if tie:
        dense = Dense(features, vocab, bias=False)
        return Tied(dense, source=0, leaves={"w": "table"}, transpose=True)
    return Dense(features, vocab, bias=bias)


def transformer(
    vocab: int,
    length: int,
    features: int,
    heads: int,
    depth: int,
    *,
    mlp_ratio: int = 4,
    activation: str = "gelu",
    causal: bool = True,
    tie_embeddings: bool = False,
) -> Sequential:
    """A pre-LN decoder built from public layers and combinators only.

    ``Embedding(vocab, features)``, ``PositionalEmbedding(length, features)``,
    then ``depth`` × [``Residual(Sequential([LayerNorm, MultiHeadAttention]))``,
    ``Residual(Sequential([LayerNorm, Dense(features → mlp_ratio·features,
    activation), Dense(→ features)]))``], then ``LayerNorm`` and
    ``Dense(features → vocab)``, or with ``tie_embeddings`` logits ``= h ·
    tableᵀ`` (no output matrix, no output bias): integer tokens ``(batch, T)``,
    ``T ≤ length``, to logits ``(batch, T, vocab)``.

    Example:
      >>> import jbp
      >>> net = jbp.transformer(vocab=16, length=8, features=12, heads=3, depth=2)
      >>> net.output_shape((8,))
      (8, 16)
    """
    positive_int(depth, "depth")
    positive_int(mlp_ratio, "mlp_ratio")
    hidden = mlp_ratio * features
    blocks: list[Any] = []
    for _ in range(depth):
        attention = MultiHeadAttention(features, heads, causal=causal)
        blocks.append(Residual(Sequential([LayerNorm(features), attention])))
        mlp = [LayerNorm(features), Dense(features, hidden, activation), Dense(hidden, features)]
        blocks.append(Residual(Sequential(mlp)))
    return Sequential(
        [
            Embedding(vocab, features),
            PositionalEmbedding(length, features),
            *blocks,
            LayerNorm(features),
            _output(features, vocab, tie_embeddings, bias=True),
        ]
    )


def swiglu(features: int, hidden: int) -> Sequential:
    """The gated MLP of Llama-style blocks: ``(silu(a w₁) ⊙ (a w₃)) w₂``, no biases.

    ``Parallel([Dense(features, hidden, "silu", bias=False), Dense(features, hidden,
    bias=False)], merge="product")``, then ``Dense(hidden, features, bias=False)``.

    Example:
      >>> import jbp
      >>> jbp.swiglu(8, 24).output_shape((5, 8))
      (5, 8)
    """
    positive_int(features, "features")
    positive_int(hidden, "hidden")
    gate = Parallel(
        [Dense(features, hidden, "silu", bias=False), Dense(features, hidden, bias=False)],
        merge="product",
    )
    return Sequential([gate, Dense(hidden, features, bias=False)])


def llama_hidden(features: int) -> int:
    """The default SwiGLU width: ``8·features/3`` rounded up to a multiple of 8."""
    return 8 * math.ceil(8 * features / 3 / 8)


def llama(
    vocab: int,
    features: int,
    heads: int,
    depth: int,
    *,
    kv_heads: int | None = None,
    hidden: int | None = None,
    rope_theta: float = 10000.0,
    eps: float = 1e-6,
    tie_embeddings: bool = False,
) -> Sequential:
    """A Llama-style decoder built from public layers and combinators only.

    ``Embedding(vocab, features)``, then ``depth`` × [``Residual(Sequential([
    RMSNorm(features, eps=eps), MultiHeadAttention(features, heads,
    kv_heads=kv_heads, causal=True, bias=False, rope_theta=rope_theta)]))``,
    ``Residual(Sequential([RMSNorm(features, eps=eps), swiglu(features,
    hidden)]))``], ``RMSNorm(features, eps=eps)``, then ``Dense(features, vocab,
    bias=False)`` or, with ``tie_embeddings``, logits ``= h · tableᵀ``. Integer
    tokens ``(batch, T)`` of any length (positions by RoPE) to logits ``(batch, T,
    vocab)``.

    Args:
      vocab, features, heads, depth: sizes; ``heads`` divides ``features`` and the
        head width ``features // heads`` is even (RoPE).
      kv_heads: key/value heads (grouped-query attention), dividing ``heads``;
        None means ``heads``.
      hidden: the SwiGLU width; None gives ``8·features/3`` rounded up to a
        multiple of 8.
      rope_theta: RoPE's base.
      eps: the RMSNorm epsilon.
      tie_embeddings: share the token embedding's table with the output projection.

    Example:
      >>> import jbp
      >>> net = jbp.llama(vocab=256, features=32, heads=4, depth=2, kv_heads=2,
      ...                 tie_embeddings=True)
      >>> net.output_shape((10,))
      (10, 256)
    """
    positive_int(depth, "depth")
    hidden = llama_hidden(features) if hidden is None else positive_int(hidden, "hidden")
    blocks: list[Any] = []
    for _ in range(depth):
        attention = MultiHeadAttention(
            features, heads, kv_heads=kv_heads, causal=True, bias=False, rope_theta=rope_theta
        )
        blocks.append(Residual(Sequential([RMSNorm(features, eps=eps), attention])))
        blocks.append(Residual(Sequential([RMSNorm(features, eps=eps), swiglu(features, hidden)])))
    return Sequential(
        [
            Embedding(vocab, features),
            *blocks,
            RMSNorm(features, eps=eps),
            _output(features, vocab, tie_embeddings, bias=False),
        ]
    )
