"""Layers and combinators: each layer's forward, δ rule and per-example factors together.

One module per family: ``_dense`` (Dense, Activation), ``_conv`` (Conv),
``_pool`` (MaxPool, AvgPool, GlobalAvgPool, Flatten), ``_norm`` (LayerNorm,
RMSNorm, GroupNorm), ``_dropout`` (Dropout), ``_cast`` (Cast: mixed precision), ``_embedding`` (Embedding,
PositionalEmbedding), ``_attention`` (MultiHeadAttention), ``_combinators``
(Sequential, Residual, Parallel, mlp), ``_shared`` (Tied: shared weights), ``_recurrent`` (RNN, LSTM, GRU, the
Cell protocol, Reverse, bidirectional),
``_models`` (transformer, swiglu, llama). The protocol is in ``_base`` (what the
argument checks read of it too, :class:`ShapeError` and the forward's
:class:`Context` among it, in :mod:`jbp._protocol`, below the layers); the per-example quantities, written once per kind of
weight-gradient factorisation (:class:`Outer`, :class:`Elementwise`,
:class:`Gather`), in
``_factors``. Everything public is re-exported by ``jbp``.
"""

from ._attention import MultiHeadAttention as MultiHeadAttention
from ._base import Context as Context
from ._base import Layer as Layer
from ._base import ShapeError as ShapeError
from ._cast import Cast as Cast
from ._combinators import Parallel as Parallel
from ._combinators import Residual as Residual
from ._combinators import Sequential as Sequential
from ._combinators import mlp as mlp
from ._conv import Conv as Conv
from ._dense import Activation as Activation
from ._dense import Dense as Dense
from ._dropout import Dropout as Dropout
from ._embedding import Embedding as Embedding
from ._embedding import PositionalEmbedding as PositionalEmbedding
from ._factors import Elementwise as Elementwise
from ._factors import Factorised as Factorised
from ._factors import Gather as Gather
from ._factors import Outer as Outer
from ._factors import Sum as Sum
from ._models import llama as llama
from ._models import swiglu as swiglu
from ._models import transformer as transformer
from ._norm import GroupNorm as GroupNorm
from ._norm import LayerNorm as LayerNorm
from ._norm import RMSNorm as RMSNorm
from ._pool import AvgPool as AvgPool
from ._pool import Flatten as Flatten
from ._pool import GlobalAvgPool as GlobalAvgPool
from ._pool import MaxPool as MaxPool
from ._recurrent import GRU as GRU
from ._recurrent import LSTM as LSTM
from ._recurrent import RNN as RNN
from ._recurrent import Cell as Cell
from ._recurrent import GRUCell as GRUCell
from ._recurrent import LSTMCell as LSTMCell
from ._recurrent import Recurrent as Recurrent
from ._recurrent import Reverse as Reverse
from ._recurrent import RNNCell as RNNCell
from ._recurrent import bidirectional as bidirectional
from ._shared import Tied as Tied
