"""Compare gradients leaf by leaf, and verify jbp.backprop against three oracles.

The oracles: ``jax.grad(objective)`` (always), float64 central finite
differences along random unit directions, and the Taylor-remainder test
``|C(θ + h v) − C(θ) − h ⟨g, v⟩| = O(h²)`` (both with ``finite_differences=True``).

Error measure: for each leaf, ``max |a − b|`` divided by the reference leaf's
scale ``max |b|``, so leaves near zero don't fail spuriously. A leaf that is
zero to round-off, its scale at most ``ZERO_ULPS`` ulps of the largest leaf's
(``max |b| ≤ 100·ε·max over leaves``: e.g. exactly zero, or the gradient of
attention's key bias, zero in exact arithmetic, where both sides hold
round-off), is measured against the largest leaf's scale instead. NaN or Inf
in either side is always a failure.

Default tolerances (``rel err ≤ rtol``), by the reference's dtype:
float64 ``1e-9``, float32 ``1e-4``, float16/bfloat16 ``1e-2``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._backprop import backprop, check_net, objective
from ._losses import Loss, get_loss

DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
FD_RTOL = 1e-6
ZERO_ULPS = 100  # a leaf this many ulps of the largest leaf (or fewer) is zero to round-off
TAYLOR_MIN_ORDER = 1.8


class GradientMismatch(AssertionError):
    """Raised by :meth:`Report.raise_if_failed`; ``.report`` holds the table."""

    def __init__(self, report: Report) -> None:
        super().__init__(str(report))
        self.report = report


@dataclasses.dataclass(frozen=True)
class LeafRow:
    """One leaf of a comparison.

    Attributes:
      path: e.g. ``"params[1]['w']"``.
      layer: the layer index (first key of the path), or None.
      shape: the leaf's shape.
      max_abs_err: ``max |a − b|`` (NaN if either side is not finite).
      scale: the reference scale the error is divided by.
      rel_err: ``max_abs_err / scale``.
      bitwise: whether both leaves are bitwise identical.
      ok: finite on both sides, same shape, and ``rel_err ≤ rtol``.
      note: why a row failed when that is not a large error.
    """

    path: str
    layer: int | None
    shape: tuple[int, ...]
    max_abs_err: float
    scale: float
    rel_err: float
    bitwise: bool
    ok: bool
    note: str = ""


@dataclasses.dataclass(frozen=True)
class FiniteDifferenceCheck:
    """Central differences ``(C(θ+hv) − C(θ−hv)) / 2h`` against ``⟨g, v⟩``.

    ``tolerance`` is ``FD_RTOL·‖g‖`` plus a roundoff allowance ``1e3·ε·|C|/h``.
    """

    h: float
    finite_differences: tuple[float, ...]
    directional: tuple[float, ...]
    errors: tuple[float, ...]
    tolerance: float
    grad_norm: float

    @property
    def ok(self) -> bool:
        return all(math.isfinite(e) and e <= self.tolerance for e in self.errors)


@dataclasses.dataclass(frozen=True)
class TaylorCheck:
    """The Taylor remainder ``r(h) = |C(θ+hv) − C(θ) − h⟨g,v⟩|`` for halving h.

    ``order`` is the median of ``log2(r(h)/r(h/2))`` over the last three pairs
    above the roundoff floor (NaN if every remainder is at the floor, which
    passes: the function is linear along ``v`` to working precision). A right
    gradient gives order ≈ 2, a wrong one ≈ 1.
    """

    hs: tuple[float, ...]
    remainders: tuple[float, ...]
    order: float

    @property
    def ok(self) -> bool:
        if any(not math.isfinite(r) for r in self.remainders):
            return False
        return math.isnan(self.order) or self.order >= TAYLOR_MIN_ORDER


@dataclasses.dataclass(frozen=True)
class Report:
    """The result of :func:`compare` or :func:`verify`.

    Attributes:
      rows: one :class:`LeafRow` per leaf, in tree order.
      names: ``(tested, reference)``, e.g. ``("manual (jbp.backprop)",
        "autodiff (jax.grad)")``.
      rtol: the relative tolerance used.
      dtype: the reference's dtype name.
      precision: the matmul precision in effect.
      backend: the JAX backend.
      finite_differences: a :class:`FiniteDifferenceCheck` or None.
      taylor: a :class:`TaylorCheck` or None.
      layers: optional layer descriptions, used to name the first mismatch.
    """

    rows: tuple[LeafRow, ...]
    names: tuple[str, str]
    rtol: float
    dtype: str
    precision: str
    backend: str
    finite_differences: FiniteDifferenceCheck | None = None
    taylor: TaylorCheck | None = None
    layers: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """All leaves agree and every oracle that ran passed."""
        return (
            all(r.ok for r in self.rows)
            and (self.finite_differences is None or self.finite_differences.ok)
            and (self.taylor is None or self.taylor.ok)
        )

    @property
    def n_bitwise(self) -> int:
        """How many leaves are bitwise identical."""
        return sum(r.bitwise for r in self.rows)

    @property
    def max_rel_err(self) -> float:
        """The worst relative error over all leaves (inf if any is not finite)."""
        errs = [r.rel_err if math.isfinite(r.rel_err) else math.inf for r in self.rows]
        return max(errs, default=0.0)

    @property
    def first_mismatch(self) -> LeafRow | None:
        """The failing row of the lowest layer index (where the two part first,
        counting from the input), or None."""
        bad = [r for r in self.rows if not r.ok]
        if not bad:
            return None
        return min(bad, key=lambda r: r.layer if r.layer is not None else math.inf)

    def raise_if_failed(self) -> Report:
        """Raise :class:`GradientMismatch` unless :attr:`ok`; returns self."""
        if not self.ok:
            raise GradientMismatch(self)
        return self

    def __str__(self) -> str:
        status = "OK" if self.ok else "MISMATCH"
        lines = [
            f"gradient check: {status}: {len(self.rows)} leaves, {self.n_bitwise} bitwise identical, "
            f"worst rel err {self.max_rel_err:.2e} (tolerance {self.rtol:.0e})",
            f"tested: {self.names[0]}; reference: {self.names[1]}; dtype {self.dtype}, "
            f"matmul precision {self.precision}, backend {self.backend}",
        ]
        header = ("leaf", "shape", "max abs err", "rel err", "bitwise", "ok")
        table = [header] + [
            (
                r.path,
                str(r.shape),
                f"{r.max_abs_err:.2e}",
                f"{r.rel_err:.2e}",
                "yes" if r.bitwise else "no",
                ("ok" if r.ok else "FAIL") + (f" ({r.note})" if r.note else ""),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        fd = self.finite_differences
        if fd is not None:
            lines.append(
                f"finite differences (float64, {len(fd.errors)} directions, h={fd.h:.0e}): "
                f"worst |fd − ⟨g,v⟩| {max(fd.errors, default=0.0):.2e} "
                f"(tolerance {fd.tolerance:.2e}, ‖g‖ {fd.grad_norm:.2e}): "
                f"{'ok' if fd.ok else 'FAIL'}"
            )
        if self.taylor is not None:
            order = (
                "n/a (linear to roundoff)"
                if math.isnan(self.taylor.order)
                else f"{self.taylor.order:.2f}"
            )
            lines.append(
                f"Taylor remainder: observed order {order} (expected 2, need ≥ "
                f"{TAYLOR_MIN_ORDER}): {'ok' if self.taylor.ok else 'FAIL'}"
            )
        first = self.first_mismatch
        if first is not None:
            where = first.path
            if first.layer is not None and first.layer < len(self.layers):
                where += f" in layer {first.layer}: {self.layers[first.layer]}"
            lines.append(f"first mismatch: {where}")
        return "\n".join(lines)


def _layer_of(path: tuple[Any, ...]) -> int | None:
    if path and isinstance(path[0], jtu.SequenceKey):
        return int(path[0].idx)
    return None


def _precision() -> str:
    # The attribute (not config.read) sees jax.default_matmul_precision(...) contexts.
    value = getattr(jax.config, "jax_default_matmul_precision", None)
    return str(value) if value is not None else "default"


def compare(
    tested: Any,
    reference: Any,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    names: tuple[str, str] = ("tested", "reference"),
    prefix: str = "params",
) -> Report:
    """Compare two gradient pytrees leaf by leaf.

    Args:
      tested: the gradient under test, e.g. from ``jbp.backprop``.
      reference: the reference, e.g. from ``jax.grad``; errors are relative
        to its scale.
      rtol: relative tolerance; default by dtype (see module docs).
      atol: a leaf also passes if ``max |a − b| ≤ atol`` (default 0: only
        the relative test counts). Useful where the reference is exactly
        zero and round-off is not, e.g. a variance over identical examples.
      names: labels for the two sides, shown in the report.
      prefix: the name of the root in leaf paths.

    Returns:
      A :class:`Report`. It never raises on a mismatch; call
      ``.raise_if_failed()`` for that.

    Raises:
      ValueError: if the two trees have different structures.
    """
    ta, tb = jtu.tree_structure(tested), jtu.tree_structure(reference)
    if ta != tb:  # type: ignore[operator]  # PyTreeDef has __eq__
        raise ValueError(f"`tested` and `reference` have different tree structures: {ta} vs {tb}")
    paths = [path for path, _ in jtu.tree_leaves_with_path(tested)]
    host = jax.device_get(
        list(zip(jtu.tree_leaves(tested), jtu.tree_leaves(reference), strict=True))
    )
    refs = [np.asarray(b) for _, b in host]
    dtype = np.result_type(*[r.dtype for r in refs]).name if refs else "float32"
    if rtol is None:
        rtol = DEFAULT_RTOL.get(dtype, 1e-4)
    ref_scales = [
        float(np.max(np.abs(r.astype(np.float64)))) if r.size and np.all(np.isfinite(r)) else 0.0
        for r in refs
    ]
    global_scale = max(ref_scales, default=0.0)
    rows = []
    for path, (a, b), leaf_scale in zip(paths, host, ref_scales, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        name = prefix + jtu.keystr(path)
        layer = _layer_of(path)
        if a.shape != b.shape:
            rows.append(
                LeafRow(
                    name,
                    layer,
                    tuple(b.shape),
                    math.nan,
                    math.nan,
                    math.inf,
                    False,
                    False,
                    f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}",
                )
            )
            continue
        bitwise = a.dtype == b.dtype and a.tobytes() == b.tobytes()
        finite = bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
        if not finite:
            side = names[0] if not np.all(np.isfinite(a)) else names[1]
            rows.append(
                LeafRow(
                    name,
                    layer,
                    tuple(b.shape),
                    math.nan,
                    leaf_scale,
                    math.nan,
                    False,
                    False,
                    f"non-finite values in {side}",
                )
            )
            continue
        err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        eps = float(np.finfo(b.dtype).eps) if np.issubdtype(b.dtype, np.inexact) else 0.0
        zero = leaf_scale <= ZERO_ULPS * eps * global_scale
        scale = global_scale if zero else leaf_scale
        rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
        rows.append(
            LeafRow(
                name, layer, tuple(b.shape), err, scale, rel, bitwise, rel <= rtol or err <= atol
            )
        )
    return Report(tuple(rows), names, float(rtol), dtype, _precision(), jax.default_backend())


def _to64(tree: Any) -> Any:
    def cast(a: Any) -> Any:
        a = jnp.asarray(a)
        return a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jtu.tree_map(cast, tree)


def _unit_direction(key: jax.Array, params: Any) -> Any:
    leaves, treedef = jtu.tree_flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    vs = [
        jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=False)
    ]
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in vs))
    return jtu.tree_unflatten(treedef, [v / norm for v in vs])


def _dot(a: Any, b: Any) -> float:
    return float(
        sum(jnp.sum(x * y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True))
    )


def _axpy(h: float, v: Any, p: Any) -> Any:
    return jtu.tree_map(lambda vi, pi: pi + h * vi, v, p)


def finite_difference_checks(
    net: Any,
    loss: str | Loss,
    params: Any,
    x: Any,
    y: Any,
    *,
    key: jax.Array,
    directions: int = 4,
    h: float = 1e-5,
) -> tuple[FiniteDifferenceCheck, TaylorCheck]:
    """Float64 central differences and the Taylor-remainder test of ``jbp.backprop``.

    Params, ``x`` and real-valued ``y`` are cast to float64 (64-bit types are
    enabled for the duration). Directions are random unit vectors in
    parameter space.
    """
    with jax.enable_x64(True):
        p64, x64, y64 = _to64(params), _to64(x), _to64(y)
        f = jax.jit(objective(net, loss))
        g = jax.jit(backprop(net, loss))(p64, x64, y64)
        gnorm = math.sqrt(_dot(g, g))
        c0 = float(f(p64, x64, y64))
        eps = float(np.finfo(np.float64).eps)
        keys = jax.random.split(key, directions + 1)
        fds, gvs, errs, cmax = [], [], [], abs(c0)
        for k in keys[:directions]:
            v = _unit_direction(k, p64)
            cp, cm = float(f(_axpy(h, v, p64), x64, y64)), float(f(_axpy(-h, v, p64), x64, y64))
            cmax = max(cmax, abs(cp), abs(cm))
            fd, gv = (cp - cm) / (2 * h), _dot(g, v)
            fds.append(fd)
            gvs.append(gv)
            errs.append(abs(fd - gv) if math.isfinite(fd) and math.isfinite(gv) else math.inf)
        tolerance = FD_RTOL * gnorm + 1e3 * eps * cmax / h
        fd_check = FiniteDifferenceCheck(h, tuple(fds), tuple(gvs), tuple(errs), tolerance, gnorm)

        v = _unit_direction(keys[-1], p64)
        gv = _dot(g, v)
        hs = tuple(1e-2 * 2.0**-k for k in range(12))
        rs, floors = [], []
        for hk in hs:
            ck = float(f(_axpy(hk, v, p64), x64, y64))
            rs.append(abs(ck - c0 - hk * gv) if math.isfinite(ck) else math.inf)
            floors.append(100 * eps * (abs(ck) + abs(c0) + abs(hk * gv)))
        orders = [
            math.log2(rs[k] / rs[k + 1])
            for k in range(len(hs) - 1)
            if rs[k + 1] > 10 * floors[k + 1] and math.isfinite(rs[k])
        ]
        order = float(np.median(orders[-3:])) if orders else math.nan
        taylor = TaylorCheck(hs, tuple(rs), order)
    return fd_check, taylor


def verify(
    net: Any,
    loss: str | Loss,
    params: Any,
    x: Any,
    y: Any,
    *,
    finite_differences: bool = False,
    jit: bool = True,
    rtol: float | None = None,
    key: jax.Array | None = None,
    directions: int = 4,
) -> Report:
    """Check ``jbp.backprop(net, loss)`` against ``jax.grad(jbp.objective(net, loss))``.

    Both run under ``jax.default_matmul_precision("highest")`` (on GPU/TPU,
    float32 matmuls would otherwise use TF32/bf16 passes); the report records
    the precision and backend.

    Args:
      net, loss: the network and loss (name or :class:`Loss`).
      params, x, y: a problem instance; ``x`` ``(batch, fan_in)`` or ``(fan_in,)``.
      finite_differences: also run float64 central differences along
        ``directions`` random unit directions and the Taylor-remainder test.
      jit: run both gradients under ``jax.jit`` (default) or eagerly.
      rtol: relative tolerance (default by dtype, see module docs).
      key: PRNG key for the finite-difference directions (default key 0).
      directions: number of finite-difference directions.

    Returns:
      A :class:`Report`; ``report.raise_if_failed()`` raises
      :class:`GradientMismatch` with the table.

    Example:
      >>> import jax, jax.numpy as jnp, jbp
      >>> net = jbp.mlp([3, 4, 2], "tanh")
      >>> params = net.init(jax.random.key(0))
      >>> x, y = jnp.ones((5, 3), jnp.float32), jnp.zeros((5, 2), jnp.float32)
      >>> jbp.verify(net, "half_sse", params, x, y).ok
      True
    """
    net = check_net(net)
    loss = get_loss(loss)
    manual = backprop(net, loss)
    reference = jax.grad(objective(net, loss))  # reference
    if jit:
        manual, reference = jax.jit(manual), jax.jit(reference)
    with jax.default_matmul_precision("highest"):
        g_manual = manual(params, x, y)
        g_ref = reference(params, x, y)
        report = compare(
            g_manual,
            g_ref,
            rtol=rtol,
            names=("manual (jbp.backprop)", "autodiff (jax.grad)"),
        )
    fd = taylor = None
    if finite_differences:
        fd, taylor = finite_difference_checks(
            net,
            loss,
            params,
            x,
            y,
            key=jax.random.key(0) if key is None else key,
            directions=directions,
        )
    return dataclasses.replace(
        report,
        finite_differences=fd,
        taylor=taylor,
        layers=tuple(repr(layer) for layer in net.layers),
    )
