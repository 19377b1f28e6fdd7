"""Per-example quantities written once per kind of weight-gradient factorisation.

Almost every parameter gradient is one of a few forms, built from a layer's
cache and its δ alone (kfac-jax's lesson; see DESIGN.md):

- :class:`Outer`: ``g_i = Σ_t ã_it ⊗ δ_it`` (Dense on any rank: ã = the input;
  Conv: ã = unfolded patches, one outer product per channel group, the patches
  given as one block per kernel offset and never stacked);
- :class:`Elementwise`: ``g_i = Σ_t u_it ⊙ δ_it`` (biases: u = 1; norm-layer
  scales: u = the normalised input);
- :class:`Gather`: ``g_i = Σ_t onehot(tok_it) ⊗ δ_it`` (Embedding: δ
  scatter-added into the rows of the tokens seen; PositionalEmbedding: the
  positions, each row met once, so ``g_i`` is δ_i itself padded to the table).

A parameterised layer says which form each of its leaves takes in
``grad_factors(params, cache, delta_out)`` (a pytree like params whose
leaves are factors); the functions here turn factors into per-example
gradients, squared norms, ``Σ_i g_i²`` and ``Σ_i c_i g_i``. Rows of ``delta``
hold each example's unscaled ``∂ℓ_i/∂z``.

Squared norms of an :class:`Outer` factor with T positions per example have
two forms: materialise ``g_i`` (about ``2·B·G·T·I·O`` flops and ``B·G·I·O``
numbers) or the Gram ("ghost") form ``Σ_{t,s} (ã_it·ã_is)(δ_it·δ_is)`` (about
``2·B·G·T²·(I + O)`` flops and ``B·G·T²`` numbers). ``method="auto"`` takes the
Gram form when ``T·(I + O) < I·O``, the smaller flop count (which also makes
its memory the smaller: ``T² < I·O``), the mixed ghost norm of Bu et al.
(2022). With one position (Dense on ``(batch, features)``) the Gram form is
``‖ã_i‖²‖δ_i‖²``, the cheapest of all. A :class:`Gather` factor's Gram form is
the token-equality one, ``Σ_{t,s} [tok_it = tok_is] (δ_it·δ_is)``, taken when
``T² < rows``; otherwise each example's table is scattered and squared.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

Array = jax.Array
Params = Any

METHODS = ("auto", "gram", "materialise")


class Outer(NamedTuple):
    """``g_i = Σ_t ã_it ⊗ δ_it`` per channel group.

    Attributes:
      a: the inputs ã, ``(batch, T, groups, I)``, or a tuple of column blocks
        ``(batch, T, groups, I_k)`` whose concatenation on the last axis is ã
        (Conv: one block per kernel offset, so the unfolded patches are never
        stacked into one array; every quantity is formed block by block).
      delta: ``(batch, T, groups, O)``.
      shape: the leaf's shape, a reshape of ``(I, groups·O)`` (group-major
        output axis, as a grouped convolution's kernel).
    """

    a: Any
    delta: Array
    shape: tuple[int, ...]

    @property
    def blocks(self) -> tuple[Array, ...]:
        return tuple(self.a) if isinstance(self.a, (tuple, list)) else (self.a,)


class Elementwise(NamedTuple):
    """``g_i = Σ_t u_it ⊙ δ_it``.

    Attributes:
      u: ``(batch, T, F)``, or None for ones (a bias).
      delta: ``(batch, T, F)``.
      shape: the leaf's shape, a reshape of ``(F,)``.
    """

    u: Array | None
    delta: Array
    shape: tuple[int, ...]


class Gather(NamedTuple):
    """``g_i = Σ_t onehot(tok_it) ⊗ δ_it``: δ scatter-added into rows of a table.

    Attributes:
      tokens: ``(batch, T)`` integer rows, or None for the positions ``0..T-1``
        of every example (a positional table: each row met at most once).
      delta: ``(batch, T, F)``.
      rows: the table's rows (the leaf is ``(rows, F)``).
    """

    tokens: Array | None
    delta: Array
    rows: int


class Sum(NamedTuple):
    """``g_i = Σ_k g_i^k``: one leaf used in several places (shared weights).

    Attributes:
      parts: the factors of the uses, each of the leaf's shape (a transposed use
        already transposed, see :func:`transpose`).

    Its squared norm keeps the cross terms, ``‖Σ_k g^k‖² = Σ_k ‖g^k‖² + 2 Σ_{k<l}
    ⟨g^k, g^l⟩``, each formed from the two uses' factors by :func:`dot` (no g_i
    materialised where a Gram form exists).
    """

    parts: tuple[Any, ...]


Factor = Outer | Elementwise | Gather


def is_factor(x: Any) -> bool:
    """A factor of one use (:class:`Outer`, :class:`Elementwise`, :class:`Gather`)."""
    return isinstance(x, (Outer, Elementwise, Gather))


def is_leaf_factor(x: Any) -> bool:
    """What a leaf's quantities are formed from: a factor or a :class:`Sum` of them."""
    return isinstance(x, (Outer, Elementwise, Gather, Sum))


def shared(owner: Any, user: Any) -> Sum:
    """The factor of a leaf used by its owner and by one more use (a flat :class:`Sum`)."""
    parts = owner.parts if isinstance(owner, Sum) else (owner,)
    return Sum((*parts, *(user.parts if isinstance(user, Sum) else (user,))))


def _outer_a(f: Outer) -> Array:
    """The whole ã of an outer factor, ``(batch, T, groups, I)`` (blocks concatenated)."""
    blocks = f.blocks
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=-1)


def transpose(f: Any) -> Any:
    """The factor of ``g_iᵀ`` for a 2-D leaf used transposed (``w = tableᵀ``): an outer
    factor's two sides swapped; an elementwise (1-D) factor unchanged."""
    if isinstance(f, Sum):
        return Sum(tuple(transpose(p) for p in f.parts))
    if isinstance(f, Elementwise):
        return f
    if isinstance(f, Outer) and f.delta.shape[2] == 1 and len(f.shape) == 2:
        return Outer(f.delta, _outer_a(f), (f.shape[1], f.shape[0]))
    raise TypeError(
        f"a {type(f).__name__} factor of shape {getattr(f, 'shape', None)} cannot be used "
        "transposed: shared leaves used transposed must be 2-D outer-product leaves (Dense w)"
    )


# --- gather: embedding tables ------------------------------------------------


def gather_norm_method(f: Gather, method: str = "auto") -> str:
    """Gram when ``T² < rows`` (``B·T²·F`` against the ``B·rows·F`` of a per-example
    table), else materialise; positions never need either."""
    if method != "auto":
        return method
    t = f.delta.shape[1]
    return "gram" if t * t < f.rows else "materialise"


def _pad_rows(x: Array, rows: int, axis: int) -> Array:
    """Positions ``0..T-1`` to a table of ``rows``: zeros below."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rows - x.shape[axis])
    return jnp.pad(x, pad)


def _gather_per_example(f: Gather) -> Array:
    """``(batch, rows, F)``."""
    if f.tokens is None:
        return _pad_rows(f.delta, f.rows, 1)
    b, t, feat = f.delta.shape
    examples = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return jnp.zeros((b, f.rows, feat), f.delta.dtype).at[examples, f.tokens].add(f.delta)


def _gather_sq_norm(f: Gather, method: str) -> Array:
    if f.tokens is None:
        return _sum_rows(f.delta * f.delta)
    if gather_norm_method(f, method) == "materialise":
        g = _gather_per_example(f)
        return _sum_rows(g * g)
    same = f.tokens[:, :, None] == f.tokens[:, None, :]  # (batch, T, T)
    dots = lax.dot_general(f.delta, f.delta, (((2,), (2,)), ((0,), (0,))))
    return _sum_rows(jnp.where(same, dots, jnp.zeros_like(dots)))


def _gather_sum_sq(f: Gather) -> Array:
    if f.tokens is None:
        return _pad_rows(jnp.sum(f.delta * f.delta, axis=0), f.rows, 0)
    g = _gather_per_example(f)
    return jnp.sum(g * g, axis=0)


def _gather_weighted(f: Gather, c: Array) -> Array:
    d = f.delta * c[:, None, None]
    if f.tokens is None:
        return _pad_rows(jnp.sum(d, axis=0), f.rows, 0)
    return jnp.zeros((f.rows, d.shape[-1]), d.dtype).at[f.tokens].add(d)


def check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


def norm_method(f: Outer, method: str = "auto") -> str:
    """``"gram"`` or ``"materialise"`` for an outer factor (see the module docs)."""
    if method != "auto":
        return method
    t = f.delta.shape[1]
    i = sum(block.shape[-1] for block in f.blocks)
    o = f.delta.shape[-1]
    return "gram" if t == 1 or t * (i + o) < i * o else "materialise"


def _outer_to_leaf(g: Array, shape: tuple[int, ...], batched: bool) -> Array:
    """``(..., G, I, O)`` to the leaf layout ``(..., *shape)``."""
    g = jnp.moveaxis(g, -3, -2)  # (..., I, G, O)
    lead = g.shape[:1] if batched else ()
    return g.reshape(lead + shape)


_PER_EXAMPLE = (((1,), (1,)), ((0, 2), (0, 2)))  # contract T; batch over (example, group)


def _per_example_blocks(f: Outer) -> list[Array]:
    """``g_i`` block by block: ``(batch, G, I_k, O)`` each."""
    if f.delta.shape[1] == 1:
        d = f.delta[:, 0, :, None, :]
        return [a[:, 0, :, :, None] * d for a in f.blocks]
    return [lax.dot_general(a, f.delta, _PER_EXAMPLE) for a in f.blocks]


def _concat(parts: list[Array], axis: int) -> Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _per_example_elementwise(f: Elementwise) -> Array:
    """``(batch, F)``."""
    if f.delta.shape[1] == 1:
        return f.delta[:, 0] if f.u is None else f.u[:, 0] * f.delta[:, 0]
    return jnp.sum(f.delta if f.u is None else f.u * f.delta, axis=1)


def per_example_grad(f: Any) -> Array:
    """``g_i`` for every example: ``(batch, *shape)``."""
    if isinstance(f, Sum):
        return _add([per_example_grad(p) for p in f.parts])
    if isinstance(f, Gather):
        return _gather_per_example(f)
    if isinstance(f, Outer):
        return _outer_to_leaf(_concat(_per_example_blocks(f), 2), f.shape, batched=True)
    g = _per_example_elementwise(f)
    return g.reshape(g.shape[:1] + f.shape)


def _sum_rows(x: Array) -> Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _add(values: list[Array]) -> Array:
    return sum(values[1:], values[0])


def sq_norm(f: Any, method: str = "auto") -> Array:
    """``‖g_i‖²`` for every example, ``(batch,)``."""
    if isinstance(f, Sum):
        terms = [sq_norm(p, method) for p in f.parts]
        for k, p in enumerate(f.parts):
            for q in f.parts[k + 1 :]:
                terms.append(2 * dot(p, q, method))
        return _add(terms)
    if isinstance(f, Gather):
        return _gather_sq_norm(f, method)
    if isinstance(f, Elementwise):
        g = _per_example_elementwise(f)
        return jnp.sum(g * g, axis=1)
    if norm_method(f, method) == "materialise":
        return _add([_sum_rows(g * g) for g in _per_example_blocks(f)])
    if f.delta.shape[1] == 1:
        a2 = _add([jnp.sum(a[:, 0] * a[:, 0], axis=-1) for a in f.blocks])
        d = f.delta[:, 0]
        return jnp.sum(a2 * jnp.sum(d * d, axis=-1), axis=1)
    grams = (((3,), (3,)), ((0, 2), (0, 2)))  # (batch, G, T, T)
    a = _concat(list(f.blocks), 3)  # one Gram of the whole ã: one matmul, not one per block
    return _sum_rows(lax.dot_general(a, a, grams) * lax.dot_general(f.delta, f.delta, grams))


# --- dot products of two factors of one leaf: ⟨g_i, g'_i⟩ per example ------------------

_GRAM = (((3,), (3,)), ((0, 2), (0, 2)))  # (batch, T, G, ·) × (batch, S, G, ·) → (batch, G, T, S)


def _gather_rows(f: Gather) -> Array:
    """The rows a gather factor writes, ``(batch, T)`` (positions ``0..T-1`` for a table
    of positions)."""
    if f.tokens is not None:
        return f.tokens
    b, t = f.delta.shape[:2]
    return jnp.broadcast_to(jnp.arange(t)[None], (b, t))


def dot_flops(f: Any, g: Any) -> tuple[int, int]:
    """Approximate flops of ``⟨g_i, g'_i⟩`` for two factors: (Gram form, materialised)."""
    b = f.delta.shape[0]
    t, s = f.delta.shape[1], g.delta.shape[1]
    size = 1
    for d in f.shape if not isinstance(f, Gather) else (f.rows, f.delta.shape[-1]):
        size *= d
    gram = 2 * b * t * s * (f.delta.shape[-1] + g.delta.shape[-1] + 2)
    return gram, 2 * b * (t + s) * size


def dot(f: Any, g: Any, method: str = "auto") -> Array:
    """``⟨g_i, g'_i⟩`` for every example, ``(batch,)``, of two factors of one leaf.

    Outer–outer: ``Σ_{t,s} (ã_t·ã'_s)(δ_t·δ'_s)``; gather–gather:
    ``Σ_{t,s} [row_t = row'_s](δ_t·δ'_s)``; gather–outer (a table of ``rows``
    against an outer factor with ``ã`` over the rows, as a transposed use gives):
    ``Σ_{t,s} ã'_s[row_t] (δ_t·δ'_s)``. Each is taken in that Gram form or by
    materialising both sides, whichever costs fewer flops (``method`` forces one);
    any other pair is materialised.
    """
    if isinstance(f, Sum) or isinstance(g, Sum):
        fs = f.parts if isinstance(f, Sum) else (f,)
        gs = g.parts if isinstance(g, Sum) else (g,)
        return _add([dot(p, q, method) for p in fs for q in gs])
    if isinstance(g, Gather) and isinstance(f, Outer):
        f, g = g, f
    gram, materialise = dot_flops(f, g)
    use_gram = method == "gram" or (method == "auto" and gram < materialise)
    if use_gram and isinstance(f, Outer) and isinstance(g, Outer):
        a, a2 = _outer_a(f), _outer_a(g)
        return _sum_rows(lax.dot_general(a, a2, _GRAM) * lax.dot_general(f.delta, g.delta, _GRAM))
    if use_gram and isinstance(f, Gather) and isinstance(g, Gather):
        r, r2 = _gather_rows(f), _gather_rows(g)
        same = r[:, :, None] == r2[:, None, :]
        dots = lax.dot_general(f.delta, g.delta, (((2,), (2,)), ((0,), (0,))))
        return _sum_rows(jnp.where(same, dots, jnp.zeros_like(dots)))
    if use_gram and isinstance(f, Gather) and isinstance(g, Outer) and g.delta.shape[2] == 1:
        a = _outer_a(g)[:, :, 0]  # (batch, S, rows)
        rows = _gather_rows(f)  # (batch, T)
        at = jnp.take_along_axis(jnp.swapaxes(a, 1, 2), rows[:, :, None], axis=1)  # (b, T, S)
        dots = lax.dot_general(f.delta, g.delta[:, :, 0], (((2,), (2,)), ((0,), (0,))))
        return _sum_rows(at * dots)
    x, y = per_example_grad(f), per_example_grad(g)
    return _sum_rows(x * y)


# --- dot products across two batches: ⟨g_i, g'_j⟩ for every pair ----------------------


def _size(f: Any) -> int:
    shape = (f.rows, f.delta.shape[-1]) if isinstance(f, Gather) else f.shape
    return math.prod(shape)


def cross_flops(f: Any, g: Any) -> tuple[int, int]:
    """Approximate flops of ``⟨g_i, g'_j⟩`` for every pair of two factors of one leaf
    over two batches: (Gram form, materialised).

    Outer–outer with ``T``, ``S`` positions: the Gram form costs
    ``2·B·B'·G·T·S·(I + O)`` (and holds ``B·B'·G·T·S`` numbers); materialising both
    sides and multiplying costs ``2·(B·T + B'·S)·G·I·O + 2·B·B'·G·I·O``. Gather:
    ``2·B·B'·T·S·F`` against ``2·B·B'·rows·F`` (plus the scatters).
    """
    b, b2 = f.delta.shape[0], g.delta.shape[0]
    t, s = f.delta.shape[1], g.delta.shape[1]
    groups = f.delta.shape[2] if f.delta.ndim == 4 else 1
    width = f.delta.shape[-1]  # the δ-Gram's, plus the ã-Gram's for outer–outer
    if isinstance(f, Outer) and isinstance(g, Outer):
        width += sum(block.shape[-1] for block in f.blocks)
    size = _size(f)
    gram = b * b2 * groups * t * s * (2 * width + 1)
    materialise = 2 * (b * t + b2 * s) * size + 2 * b * b2 * size
    return gram, materialise


def _flat(g: Array) -> Array:
    return g.reshape(g.shape[0], -1)


def _gather_cross_gram(f: Gather, g: Any) -> Array:
    """``Σ_{t,s} [row_it = row'_js](δ_it·δ'_js)`` (gather–gather) or
    ``Σ_{t,s} ã'_js[row_it](δ_it·δ'_js)`` (gather–outer with one group)."""
    rows = _gather_rows(f)  # (B, T)
    d2 = g.delta if isinstance(g, Gather) else g.delta[:, :, 0]  # (B', S, F)
    dots = jnp.einsum("btf,csf->btcs", f.delta, d2)
    if isinstance(g, Gather):
        weight = (rows[:, :, None, None] == _gather_rows(g)[None, None]).astype(dots.dtype)
    else:
        a = _outer_a(g)[:, :, 0]  # (B', S, rows)
        weight = jnp.moveaxis(jnp.take(a, rows, axis=2), (2, 3), (0, 1))  # (B, T, B', S)
    return jnp.sum(weight * dots, axis=(1, 3))


def cross(f: Any, g: Any, method: str = "auto") -> Array:
    """``⟨g_i, g'_j⟩`` for every pair, ``(B, B')``: ``f`` a factor of a leaf over one
    batch, ``g`` a factor of the same leaf over another, no ``g_i`` formed in the
    Gram forms.

    Outer–outer: ``Σ_{t,s} (ã_it·ã'_js)(δ_it·δ'_js)`` per group (one position:
    ``(ã_i·ã'_j)(δ_i·δ'_j)``, two ``B×B'`` Grams); gather–gather:
    ``Σ_{t,s} [row_it = row'_js](δ_it·δ'_js)``; gather–outer (a shared table used
    transposed): ``Σ_{t,s} ã'_js[row_it](δ_it·δ'_js)``. Each is taken in that form or
    by materialising both sides' ``g`` (this leaf only) and multiplying, whichever
    :func:`cross_flops` says costs less (``method`` forces one); elementwise leaves and
    other pairs are materialised (``B·F`` numbers). A :class:`Sum` (shared leaf) is the
    sum over pairs of uses, its cross terms included.
    """
    if isinstance(f, Sum) or isinstance(g, Sum):
        fs = f.parts if isinstance(f, Sum) else (f,)
        gs = g.parts if isinstance(g, Sum) else (g,)
        return _add([cross(p, q, method) for p in fs for q in gs])
    if isinstance(f, Outer) and isinstance(g, Gather):
        return cross(g, f, method).T
    gram, materialise = cross_flops(f, g)
    use_gram = method == "gram" or (method == "auto" and gram < materialise)
    if use_gram and isinstance(f, Outer) and isinstance(g, Outer):
        a, a2 = _outer_a(f), _outer_a(g)
        if a.shape[1] == 1 and a2.shape[1] == 1:  # one position: (ã_i·ã'_j)(δ_i·δ'_j)
            grams = jnp.einsum("bgi,cgi->bcg", a[:, 0], a2[:, 0])
            return jnp.sum(grams * jnp.einsum("bgo,cgo->bcg", f.delta[:, 0], g.delta[:, 0]), -1)
        grams = jnp.einsum("btgi,csgi->bcgts", a, a2)
        return jnp.sum(grams * jnp.einsum("btgo,csgo->bcgts", f.delta, g.delta), (2, 3, 4))
    if (
        use_gram
        and isinstance(f, Gather)
        and (isinstance(g, Gather) or (isinstance(g, Outer) and g.delta.shape[2] == 1))
    ):
        return _gather_cross_gram(f, g)
    return _flat(per_example_grad(f)) @ _flat(per_example_grad(g)).T


def take_rows(f: Any, start: int, stop: int) -> Any:
    """The factor of the examples ``start:stop`` only (a batch that joined two sets of
    rows in one pass, split again)."""
    cut = lambda x: None if x is None else x[start:stop]  # noqa: E731
    if isinstance(f, Sum):
        return Sum(tuple(take_rows(p, start, stop) for p in f.parts))
    delta = f.delta[start:stop]
    if isinstance(f, Outer):
        return f._replace(a=tuple(b[start:stop] for b in f.blocks), delta=delta)
    if isinstance(f, Elementwise):
        return f._replace(u=cut(f.u), delta=delta)
    return f._replace(tokens=cut(f.tokens), delta=delta)


def project_flops(f: Any) -> int:
    """Approximate flops of :func:`project` (one weight-gradient-sized pass)."""
    if isinstance(f, Sum):
        return sum(project_flops(p) for p in f.parts)
    b, t = f.delta.shape[:2]
    return 2 * b * t * (_size(f) if isinstance(f, Outer) else f.delta.shape[-1])


def project(f: Any, v: Array) -> Array:
    """``⟨g_i, v⟩`` for every example, ``(batch,)``, for a fixed ``v`` shaped like the
    leaf, without forming ``g_i``: outer ``Σ_t (ã_it v)·δ_it`` (one matmul over ã with its blocks joined, the cost of
    the weight gradient's), elementwise ``(Σ_t u_it ⊙ δ_it)·v``, gather
    ``Σ_t v[row_it]·δ_it``."""
    if isinstance(f, Sum):
        return _add([project(p, v) for p in f.parts])
    if isinstance(f, Gather):
        rows = v[: f.delta.shape[1]] if f.tokens is None else v[f.tokens]  # (b, T, F) / (T, F)
        return jnp.sum((rows * f.delta).reshape(f.delta.shape[0], -1), axis=1)
    if isinstance(f, Elementwise):
        return _per_example_elementwise(f) @ v.reshape(-1)
    groups, o = f.delta.shape[2:]
    w = v.reshape(-1, groups, o)  # the leaf as (I, G, O), as _outer_to_leaf lays it out
    return _sum_rows(jnp.einsum("btgi,igo->btgo", _outer_a(f), w) * f.delta)


_CONTRACT_BATCH = (((0,), (0,)), ((), ()))


def sum_sq(f: Any) -> Array:
    """``Σ_i g_i²`` elementwise, shaped like the leaf."""
    if isinstance(f, Sum):  # the square of a sum: its g_i are formed
        g = per_example_grad(f)
        return jnp.sum(g * g, axis=0)
    if isinstance(f, Gather):
        return _gather_sum_sq(f)
    if isinstance(f, Elementwise):
        g = _per_example_elementwise(f)
        return jnp.sum(g * g, axis=0).reshape(f.shape)
    if f.delta.shape[1] == 1 and f.delta.shape[2] == 1:  # (a²)ᵀ(δ²): no g_i formed
        d = f.delta[:, 0, 0]
        d2 = d * d
        parts = [lax.dot_general(a[:, 0, 0] * a[:, 0, 0], d2, _CONTRACT_BATCH) for a in f.blocks]
        return _concat(parts, 0).reshape(f.shape)
    parts = [jnp.sum(g * g, axis=0) for g in _per_example_blocks(f)]
    return _outer_to_leaf(_concat(parts, 1), f.shape, batched=False)


def weighted(f: Any, c: Array, method: str = "auto") -> Array:
    """``Σ_i c_i g_i`` for weights ``c`` of shape ``(batch,)``, shaped like the leaf.

    Where the squared norm of this factor materialises ``g_i`` (``method``
    resolves as in :func:`sq_norm`), the sum reuses them (``Σ_i c_i g_i``, one
    cheap contraction after the products XLA shares with the norm's); else it
    is one re-weighted weight-gradient pass, ``ãᵀ(c ⊙ δ)``.
    """
    if isinstance(f, Sum):
        return _add([weighted(p, c, method) for p in f.parts])
    if isinstance(f, Gather):
        return _gather_weighted(f, c)
    if isinstance(f, Elementwise):
        g = _per_example_elementwise(f)
        return jnp.tensordot(c, g, axes=1).reshape(f.shape)
    if norm_method(f, method) == "materialise":
        parts = [jnp.tensordot(c, g, axes=1) for g in _per_example_blocks(f)]
        return _outer_to_leaf(_concat(parts, 1), f.shape, batched=False)
    if f.delta.shape[1] == 1 and f.delta.shape[2] == 1:
        d = f.delta[:, 0, 0] * c[:, None]
        parts = [lax.dot_general(a[:, 0, 0], d, _CONTRACT_BATCH) for a in f.blocks]
        return _concat(parts, 0).reshape(f.shape)
    d = f.delta * c[:, None, None, None]
    contract = (((0, 1), (0, 1)), ((2,), (2,)))  # (G, I_k, O)
    parts = [lax.dot_general(a, d, contract) for a in f.blocks]
    return _outer_to_leaf(_concat(parts, 1), f.shape, batched=False)


def _factors(layer: Any, params: Params, cache: Any, delta_out: Array) -> Any:
    return layer.grad_factors(params, cache, delta_out)


def _map(fn: Any, factors: Any) -> Any:
    return jtu.tree_map(fn, factors, is_leaf=is_leaf_factor)


def _leaves(factors: Any) -> list[Any]:
    return jtu.tree_leaves(factors, is_leaf=is_leaf_factor)


class Factorised:
    """Mixin: the per-example methods of a layer that implements ``grad_factors``.

    ``grad_factors(params, cache, delta_out)`` returns a pytree like params
    whose leaves are :class:`Outer` or :class:`Elementwise` factors; every
    method below takes the arguments of ``backward`` (``delta_out`` holds each
    example's unscaled ``∂ℓ_i/∂out`` in its row).
    """

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Any:
        raise NotImplementedError

    def per_example_grads(self, params: Params, cache: Any, delta_out: Array) -> Params:
        """``g_i``: like params with a leading batch axis on every leaf."""
        return _map(per_example_grad, _factors(self, params, cache, delta_out))

    def per_example_sq_norms(
        self, params: Params, cache: Any, delta_out: Array, *, method: str = "auto"
    ) -> Array:
        """``‖g_i‖²`` over this layer's params, ``(batch,)``."""
        leaves = _leaves(_factors(self, params, cache, delta_out))
        return sum((sq_norm(f, method) for f in leaves[1:]), sq_norm(leaves[0], method))

    def sum_grad_squared(self, params: Params, cache: Any, delta_out: Array) -> Params:
        """``Σ_i g_i²`` elementwise, like params."""
        return _map(sum_sq, _factors(self, params, cache, delta_out))

    def weighted_grads(
        self, params: Params, cache: Any, delta_out: Array, c: Array, *, method: str = "auto"
    ) -> Params:
        """``Σ_i c_i g_i``, like params; ``c`` is ``(batch,)``."""
        return _map(lambda f: weighted(f, c, method), _factors(self, params, cache, delta_out))
