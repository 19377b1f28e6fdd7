"""Autodiff references for the curvature quantities, and their comparison.

References are built from autodiff on the network output and the loss, never
from the δ rules: the Jacobian ``J = ∂out/∂θ`` by ``jax.jacfwd``, each
example's loss Hessian ``H_i`` by ``jax.hessian``, ``G = Σ_i w J_iᵀ H_i J_i``,
its diagonal, its per-example diagonals and products, the Kronecker factors'
exact cases, and ``jax.hessian`` of the objective for the Hessian diagonal.
They cost O(P²) memory: for small networks (tests, ``jbp verify --curvature``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree

from ._backprop import check_net, keeps_positions, objective, prepare
from ._checks import check_finite
from ._losses import Loss, get_loss
from ._report import PRECISION, GradientMismatch, _json_float, current_precision

Array = jax.Array
Params = Any


class GGNReference(NamedTuple):
    """``G`` (P × P), each example's ``J_iᵀ H_i J_i`` diagonal ``(batch, P)``, and
    ``unravel`` (a flat vector to a params-like tree)."""

    ggn: Array
    per_example_diag: Array
    unravel: Any


def reference_ggn(
    net: Any,
    loss: str | Loss,
    params: Params,
    x: Any,
    y: Any,
    *,
    mask: Any = None,
    dropout_key: Any = None,
) -> GGNReference:
    """The GGN by autodiff: ``J`` from ``jax.jacfwd`` of the network output, ``H_i`` from
    ``jax.hessian`` of each example's loss (with its own row of the padding mask)."""
    net, loss = check_net(net), get_loss(loss)
    batch = prepare(net, loss, params, x, y, mask, dropout_key)
    vector, unravel = ravel_pytree(params)
    out_shape = jax.eval_shape(lambda: net.forward(params, batch.x, batch.context)[0]).shape
    rows = batch.context.mask if keeps_positions(out_shape, batch.x.shape) else None

    @jax.jit
    def run(theta: Array, x: Array, y: Array, rows: Any) -> tuple[Array, Array]:
        def output(theta: Array) -> Array:
            return net.forward(unravel(theta), x, batch.context)[0]

        out = output(theta)
        b = out.shape[0]
        jac = jax.jacfwd(output)(theta).reshape(b, -1, theta.size)  # reference

        def example_loss(a: Array, yi: Array, mi: Any) -> Array:
            extra = {} if mi is None else {"mask": mi[None]}
            return loss.per_example(a[None], yi[None], **extra)[0]

        hess = jax.vmap(jax.hessian(example_loss))(out, y, rows)  # reference
        k = jac.shape[1]
        per_example = jnp.einsum("bkp,bkl,blq->bpq", jac, hess.reshape(b, k, k), jac)
        ggn = loss.scale(b) * jnp.sum(per_example, axis=0)
        return ggn, jnp.diagonal(per_example, axis1=1, axis2=2)

    ggn, diag = run(vector, batch.x, batch.y, rows)
    return GGNReference(ggn, diag, unravel)


def reference_hessian(
    net: Any, loss: str | Loss, params: Params, x: Any, y: Any, **keywords: Any
) -> Array:
    """``jax.hessian(objective)`` as a P × P matrix (flattened like ``ravel_pytree``)."""
    vector, unravel = ravel_pytree(params)
    fn = objective(net, loss)
    hessian = jax.hessian(lambda theta: fn(unravel(theta), x, y, **keywords))  # reference
    return jax.jit(hessian)(vector)


def flat(tree: Any) -> Array:
    """A params-like tree as one vector (``ravel_pytree``'s order)."""
    return ravel_pytree(tree)[0]


class CurvatureMismatch(GradientMismatch):
    """Raised by :meth:`CurvatureReport.raise_if_failed` (a :class:`jbp.GradientMismatch`,
    so one ``except`` catches both); ``.report`` holds the report."""

    def __init__(self, report: CurvatureReport) -> None:
        AssertionError.__init__(self, str(report))
        self.report = report  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class CurvatureRow:
    """One quantity's relative error against its autodiff reference (max |Δ| over
    max |reference|; the absolute error where the reference is all zero).

    Attributes:
      quantity: e.g. ``"diag_ggn"``.
      error: the relative error (inf for a wrong shape or a non-finite value).
      tolerance: the largest error that passes.
      note: why the row failed when that is not a large error, or what it compared.
    """

    quantity: str
    error: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        """Finite and within the tolerance."""
        return math.isfinite(self.error) and self.error <= self.tolerance

    @property
    def passed(self) -> bool:
        """The same as :attr:`ok` (the older name)."""
        return self.ok

    def to_json(self) -> dict[str, Any]:
        """The row as JSON-ready values (NaN and inf as strings)."""
        return {
            "quantity": self.quantity,
            "error": _json_float(self.error),
            "tolerance": self.tolerance,
            "ok": self.ok,
            "note": self.note,
        }


@dataclasses.dataclass(frozen=True)
class CurvatureReport:
    """The result of :func:`check_curvature`, with :class:`jbp.Report`'s interface:
    ``ok``, ``raise_if_failed()``, ``format()``/``str``, ``rows`` and ``to_json()``.

    Attributes:
      rows: one :class:`CurvatureRow` per checked quantity.
      skipped: the quantities not checked at all, each with the reason, e.g.
        ``"diag_hessian (not a Dense/Activation chain with f'')"``.
      dtype: the params' dtype name.
      precision: the matmul precision the comparisons ran under.
      backend: the JAX backend.
      notes: what a checked quantity did not cover and why (e.g. the Kronecker
        leaves K-FAC only approximates).
    """

    rows: tuple[CurvatureRow, ...]
    skipped: tuple[str, ...] = ()
    dtype: str = "unknown"
    precision: str = "unknown"
    backend: str = "unknown"
    notes: tuple[str, ...] = ()
    title: str = "curvature check"

    @property
    def ok(self) -> bool:
        """Every checked quantity agrees with its reference."""
        return all(r.ok for r in self.rows)

    @property
    def passed(self) -> bool:
        """The same as :attr:`ok` (the older name)."""
        return self.ok

    @property
    def max_rel_err(self) -> float:
        """The worst error over the rows (inf if any is not finite)."""
        return max(
            (r.error if math.isfinite(r.error) else math.inf for r in self.rows), default=0.0
        )

    @property
    def worst(self) -> float:
        """The same as :attr:`max_rel_err`."""
        return self.max_rel_err

    def raise_if_failed(self) -> CurvatureReport:
        """Raise :class:`CurvatureMismatch` unless :attr:`ok`; returns self."""
        if not self.ok:
            raise CurvatureMismatch(self)
        return self

    def format(self) -> str:
        """The report as text: a header, one line per quantity, what was skipped."""
        return str(self)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready values (``json.dumps(report.to_json())``)."""
        return {
            "title": self.title,
            "ok": self.ok,
            "dtype": self.dtype,
            "precision": self.precision,
            "backend": self.backend,
            "max_rel_err": _json_float(self.max_rel_err),
            "rows": [r.to_json() for r in self.rows],
            "skipped": list(self.skipped),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        status = "OK" if self.ok else "MISMATCH"
        tolerances = {r.tolerance for r in self.rows}
        tol = f" (tolerance {tolerances.pop():.0e})" if len(tolerances) == 1 else ""
        lines = [
            f"{self.title}: {status}: {len(self.rows)} quantities, worst rel err "
            f"{self.max_rel_err:.2e}{tol}; dtype {self.dtype}, matmul precision "
            f"{self.precision}, backend {self.backend}"
        ]
        lines += [
            f"{r.quantity:22s} {r.error:9.2e}  (tol {r.tolerance:.0e})  "
            f"{'ok' if r.ok else 'MISMATCH'}" + (f" ({r.note})" if r.note else "")
            for r in self.rows
        ]
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _error(got: Any, want: Any) -> float:
    got, want = jnp.asarray(got), jnp.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    diff = float(jnp.max(jnp.abs(got - want))) if want.size else 0.0
    scale = float(jnp.max(jnp.abs(want))) if want.size else 0.0
    if not jnp.all(jnp.isfinite(got)):
        return float("inf")
    return diff / scale if scale > 0 else diff


def _default_rtol(dtype: Any) -> float:
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _has_tangents(net: Any) -> bool:
    from .layers._base import children, walk_layers

    return all(
        callable(getattr(layer, "tangent", None))
        for _, layer in walk_layers(net)
        if not children(layer)
    )


def _hessian_applies(net: Any, x: Any) -> bool:
    from ._activations import get_activation
    from .layers import Activation, Dense, Sequential

    def ok(layer: Any) -> bool:
        if isinstance(layer, Sequential):
            return all(ok(child) for child in layer.layers)
        if isinstance(layer, Dense):
            return get_activation(layer.activation).second_derivative is not None
        if isinstance(layer, Activation):
            return get_activation(layer.name).second_derivative is not None
        return False

    return ok(net) and jnp.ndim(x) in (1, 2)


KFAC_INEXACT = (
    "exact only for one example at one position: K-FAC approximates the GGN block otherwise"
)


class _KroneckerForm(NamedTuple):
    """What :func:`jbp.kfac` forms for one outer-product leaf, read from shapes alone:
    zeros of length T (its positions per example) and of length 1 if the matching bias
    is folded into A (0 if not)."""

    positions: Any
    bias: Any


def _kronecker_forms(
    net: Any, loss: Loss, params: Params, x: Any, y: Any, mask: Any, dropout_key: Any
) -> dict[str, tuple[int, str | None]]:
    """Per Kronecker leaf of :func:`jbp.kfac` (by path, e.g. ``"[0]['w']"``): its
    positions per example and the path of the bias its A covers (None if none), by
    ``jax.eval_shape`` of the column walk (traced, never run). The bias rule is
    :func:`jbp.kfac`'s documented one: the matching bias of plain elementwise form."""
    from . import _curvature as curv
    from .layers._factors import Elementwise, Outer

    def forms(params: Params, x: Any, y: Any) -> Any:
        run = curv._columns(net, loss, params, x, y, None, None, mask, dropout_key)

        def layer(_leaf: Any, factors: Any) -> dict[str, _KroneckerForm]:
            if not isinstance(factors, dict):
                return {}
            result = {}
            for k, f in factors.items():
                if isinstance(f, Outer):
                    b = factors.get(curv._bias_key(k))
                    bias = isinstance(b, Elementwise) and b.u is None and k.startswith("w")
                    result[k] = _KroneckerForm(jnp.zeros(f.delta.shape[2]), jnp.zeros(int(bias)))
            return result

        return curv._fill(run, layer)

    shapes = jax.eval_shape(forms, params, x, y)
    found = jtu.tree_leaves_with_path(shapes, is_leaf=lambda v: isinstance(v, _KroneckerForm))
    result = {}
    for path, form in found:
        bias = (*path[:-1], jtu.DictKey(curv._bias_key(path[-1].key)))
        result[jtu.keystr(path)] = (
            form.positions.shape[0],
            jtu.keystr(bias) if form.bias.shape[0] else None,
        )
    return result


def _flat_index(params: Params) -> dict[str, np.ndarray]:
    """Each leaf's positions in ``ravel_pytree``'s vector, shaped like the leaf, by path."""
    index, offset = {}, 0
    for path, leaf in jtu.tree_leaves_with_path(params):
        size = int(np.prod(np.shape(leaf)))
        index[jtu.keystr(path)] = np.arange(offset, offset + size).reshape(np.shape(leaf))
        offset += size
    return index


def _check_kfac(
    net: Any,
    loss: Loss,
    params: Params,
    x: Any,
    y: Any,
    ggn: Array,
    tol: float,
    mask: Any = None,
    dropout_key: Any = None,
) -> tuple[list[CurvatureRow], list[str], list[str]]:
    """KFLR's ``a ⊗ g`` against the GGN block of ``[w; b]`` of every Kronecker leaf at one
    position, for a batch of one example: (the row or none, skipped, notes)."""
    from . import _curvature as curv

    batch = prepare(net, loss, params, x, y, mask, dropout_key).x.shape[0]
    if batch != 1:
        return [], [f"kfac ({KFAC_INEXACT}; here {batch} examples)"], []
    forms = _kronecker_forms(net, loss, params, x, y, mask, dropout_key)
    notes = [
        f"kfac: params{path} not compared ({t} positions per example: K-FAC approximates "
        "its GGN block)"
        for path, (t, _) in forms.items()
        if t != 1
    ]
    exact = {path: bias for path, (t, bias) in forms.items() if t == 1}
    if not exact:
        return (
            [],
            [f"kfac ({KFAC_INEXACT}; here no Kronecker-factored leaf is at one position)"],
            notes,
        )
    factors = jax.jit(curv.kfac(net, loss, kind="kflr"))(
        params, x, y, mask=mask, dropout_key=dropout_key
    )
    found = {
        jtu.keystr(path): kf
        for path, kf in jtu.tree_leaves_with_path(
            factors, is_leaf=lambda v: isinstance(v, curv.KroneckerFactors)
        )
    }
    index, reference = _flat_index(params), np.asarray(jax.device_get(ggn))
    got, want, wrong = [], [], []
    for path, bias in exact.items():
        kf = found.get(path)
        if kf is None:
            wrong.append(f"params{path} has no KroneckerFactors")
            continue
        a, g = np.asarray(kf.a), np.asarray(kf.g)
        w = index[path]
        groups = a.shape[0] if a.ndim == 3 else 1
        lead = () if groups == 1 else (groups,)
        out = g.shape[-1] if g.ndim else 0
        n = w.size // (groups * out) if groups * out else 0
        side = n + (bias is not None)
        if n * groups * out != w.size or (a.shape, g.shape) != (
            (*lead, side, side),
            (*lead, out, out),
        ):
            with_bias = f" and its bias params{bias}" if bias is not None else ""
            wrong.append(
                f"params{path}: a {a.shape}, g {g.shape} do not factor the block of a leaf "
                f"{w.shape}{with_bias}"
            )
            continue
        rows = w.reshape(n, groups, out)
        b = None if bias is None else index[bias].reshape(groups, out)
        for k in range(groups):
            idx = rows[:, k] if b is None else np.concatenate([rows[:, k], b[k][None]])
            idx = idx.ravel()
            a_k, g_k = (a, g) if groups == 1 else (a[k], g[k])
            got.append(np.kron(a_k, g_k).ravel())
            want.append(reference[np.ix_(idx, idx)].ravel())
    if wrong:
        return [CurvatureRow("kfac", math.inf, tol, "; ".join(wrong))], [], notes
    error = _error(np.concatenate(got), np.concatenate(want))
    leaves = f"{len(exact)} lea{'f' if len(exact) == 1 else 'ves'}"
    note = f"kind='kflr': a ⊗ g against G's block of {leaves} at one position"
    return [CurvatureRow("kfac", error, tol, note)], [], notes


def check_curvature(
    net: Any,
    loss: str | Loss,
    params: Params,
    x: Any,
    y: Any,
    *,
    rtol: float | None = None,
    seed: int = 0,
    mask: Any = None,
    dropout_key: Any = None,
) -> CurvatureReport:
    """Check every curvature quantity on one problem against its autodiff reference.

    Quantities (each jitted): ``diag_ggn`` and ``per_example_diag_ggn`` against
    the diagonals of ``Σ_i w J_iᵀ H_i J_i``; ``sqrt_ggn`` by ``Σ_{c,i} v_ic v_icᵀ
    = G``; ``kfac`` (``kind="kflr"``: exact columns) by ``a ⊗ g`` against G's
    block of ``[w; b]`` for every Kronecker leaf, where K-FAC is exact: a batch
    of one example and a leaf at one position (otherwise ``skipped`` or
    ``notes`` say what was not compared; ``kind="kfac"`` differs only in its
    Monte-Carlo columns); ``ggn_vector_product`` against ``G v`` for a random
    ``v`` (where every layer has a ``tangent`` rule); ``diag_hessian`` against
    the diagonal of ``jax.hessian(objective)`` (chains of Dense and Activation
    layers whose activations have ``f''``). ``rtol``: 1e-9 in float64, 1e-4 in
    float32 by default. ``mask`` and ``dropout_key`` as for :func:`jbp.backprop`.
    Everything runs under ``jax.default_matmul_precision("highest")``, whatever
    the global default (the report records it).
    References cost O(P²) memory: keep problems small.

    Returns:
      A :class:`CurvatureReport` (``ok``, ``raise_if_failed()``, ``format()``,
      ``rows``, ``to_json()``). It never raises on a mismatch.
    """
    with jax.default_matmul_precision(PRECISION):
        return _check_curvature(net, loss, params, x, y, rtol, seed, mask, dropout_key)


def _check_curvature(
    net: Any,
    loss: str | Loss,
    params: Params,
    x: Any,
    y: Any,
    rtol: float | None,
    seed: int,
    mask: Any,
    dropout_key: Any,
) -> CurvatureReport:
    from . import _curvature as curv

    net, loss = check_net(net), get_loss(loss)
    for name, value in (("params", params), ("x", x), ("y", y)):
        check_finite(value, name)
    kw = {"mask": mask, "dropout_key": dropout_key}
    ref = reference_ggn(net, loss, params, x, y, **kw)
    flat_params, _ = ravel_pytree(params)
    tol = _default_rtol(flat_params.dtype) if rtol is None else rtol
    rows: list[CurvatureRow] = []
    skipped: list[str] = []

    def row(name: str, got: Array, want: Array) -> None:
        rows.append(CurvatureRow(name, _error(got, want), tol))

    row(
        "diag_ggn",
        flat(jax.jit(curv.diag_ggn(net, loss))(params, x, y, **kw)),
        jnp.diagonal(ref.ggn),
    )
    per_example = jax.jit(curv.per_example_diag_ggn(net, loss))(params, x, y, **kw)
    row("per_example_diag_ggn", jax.vmap(flat)(per_example), ref.per_example_diag)
    columns = jax.vmap(jax.vmap(flat))(jax.jit(curv.sqrt_ggn(net, loss))(params, x, y, **kw))
    row("sqrt_ggn", jnp.einsum("cbp,cbq->pq", columns, columns), ref.ggn)
    kfac_rows, kfac_skipped, notes = _check_kfac(net, loss, params, x, y, ref.ggn, tol, **kw)
    rows += kfac_rows
    skipped += kfac_skipped
    if _has_tangents(net):
        v = jax.random.normal(jax.random.key(seed), flat_params.shape, flat_params.dtype)
        gv = jax.jit(curv.ggn_vector_product(net, loss))(params, x, y, ref.unravel(v), **kw)
        row("ggn_vector_product", flat(gv), ref.ggn @ v)
    else:
        skipped.append("ggn_vector_product (a layer has no tangent rule)")
    if _hessian_applies(net, x):
        hess = reference_hessian(net, loss, params, x, y, **kw)
        row(
            "diag_hessian",
            flat(jax.jit(curv.diag_hessian(net, loss))(params, x, y, **kw)),
            jnp.diagonal(hess),
        )
    else:
        skipped.append("diag_hessian (not a Dense/Activation chain with f'')")
    return CurvatureReport(
        tuple(rows),
        tuple(skipped),
        dtype=jnp.dtype(flat_params.dtype).name,
        precision=current_precision(),
        backend=jax.default_backend(),
        notes=tuple(notes),
    )
