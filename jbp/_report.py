"""Gradient reports: leaf-by-leaf comparison (:func:`compare`) and the one report API.

Every check in jbp (:func:`jbp.verify`, :func:`jbp.check_layer`,
:func:`jbp.check_vjp`, :func:`jbp.compare`) returns a :class:`Report`: ``ok``,
``raise_if_failed()``, ``format()``/``str``, ``rows`` and ``to_json()``
(:class:`jbp.CurvatureReport` has the same interface).

Error measure: for each leaf, ``max |a − b|`` divided by the reference leaf's
scale ``max |b|``, so leaves near zero don't fail spuriously. A leaf that is
zero to round-off, its scale at most ``ZERO_ULPS`` ulps of the largest leaf's
(``max |b| ≤ 100·ε·max over leaves``: e.g. exactly zero, or the gradient of
attention's key bias, zero in exact arithmetic, where both sides hold
round-off), is measured against the largest leaf's scale instead. NaN or Inf
in either side is always a failure.

Default tolerances (``rel err ≤ rtol``), by the reference's dtype:
float64 ``1e-9``, float32 ``1e-4``, float16/bfloat16 ``1e-2``. They hold at
full matmul precision, and every jbp check computes both of its sides at
:data:`PRECISION` (``"highest"``), whatever the global default: GPUs run
float32 matmuls and convolutions in TF32 by default (operands rounded to 10
mantissa bits, unit round-off 2⁻¹¹ ≈ 4.9e-4) and TPUs in one bfloat16 pass
(7 bits, 2⁻⁸ ≈ 3.9e-3). The precision is recorded in every report
(``precision``, its header and JSON).

==================  ==============  ==============================================
reference dtype     default rtol    at a lower matmul precision
==================  ==============  ==============================================
float64             1e-9            the same: float64 has no reduced passes
float32             1e-4            "highest" only. At TF32 (emulated on a CPU:
                                    operands rounded to 10 bits) jbp and
                                    autodiff, rounding the same operands, mostly
                                    agree to ~1e-7 but reached 5.9e-4 (a
                                    transformer), and each was off the float64
                                    truth by up to 2.5e-3 (MLP, CNN, ResNet) and
                                    3.4e-2 (transformers, on small leaves); at
                                    one bfloat16 pass, up to 8.6e-4 apart and
                                    2.4e-1 off (experiments/precision_emulation).
                                    No tolerance separates such round-off from a
                                    wrong rule: check at "highest".
float16, bfloat16   1e-2            the same: the setting governs 32-bit inputs
==================  ==============  ==============================================
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np

DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
# The matmul precision every check computes both of its sides at (jax.default_matmul_precision).
PRECISION = "highest"
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
      note: why a row failed when that is not a large error, or what it checked.
      oracle: which reference the row was compared with, where a report mixes
        several (:func:`jbp.check_vjp`: ``"autodiff"`` or ``"finite differences"``).
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
    oracle: str = ""

    @classmethod
    def failure(
        cls,
        path: str,
        note: str,
        *,
        shape: tuple[int, ...] = (),
        layer: int | None = None,
        oracle: str = "",
    ) -> LeafRow:
        """A row that failed before any error could be measured (a shape or tree
        mismatch, a method that raised): errors NaN, relative error inf."""
        return cls(path, layer, shape, math.nan, math.nan, math.inf, False, False, note, oracle)

    def to_json(self) -> dict[str, Any]:
        """The row as JSON-ready values (NaN and inf as strings)."""
        return {
            "path": self.path,
            "shape": list(self.shape),
            "max_abs_err": _json_float(self.max_abs_err),
            "scale": _json_float(self.scale),
            "rel_err": _json_float(self.rel_err),
            "bitwise": self.bitwise,
            "ok": self.ok,
            "note": self.note,
            "oracle": self.oracle,
        }


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


@dataclasses.dataclass(frozen=True)
class RuleCheck:
    """One layer's own rule, checked on its own inside a network (see :attr:`Report.blame`).

    Attributes:
      path: where the layer sits, e.g. ``"layers[1].block.layers[0]"`` (``"loss"``
        for the loss's δ, ``"net"`` for the network's own combinator rule).
      layer: the layer's repr.
      rel_err: the worst relative error of its ``δ_in`` and gradient leaves, given
        autodiff's δ at its output, against autodiff of its own forward.
      ok: whether every leaf is within the tolerance.
      worst: the worst leaf, e.g. ``"grads['w']"`` or ``"delta_in"``.
    """

    path: str
    layer: str
    rel_err: float
    ok: bool
    worst: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layer": self.layer,
            "rel_err": _json_float(self.rel_err),
            "ok": self.ok,
            "worst": self.worst,
        }


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
        "autodiff …")``.
      rtol: the relative tolerance used.
      dtype: the reference's dtype name.
      precision: the matmul precision in effect.
      backend: the JAX backend.
      finite_differences: a :class:`FiniteDifferenceCheck` or None.
      taylor: a :class:`TaylorCheck` or None.
      layers: optional layer descriptions, used to name the first mismatch.
      rules_fn: computes the rule checks behind :attr:`rules` and :attr:`blame`
        (run on first access, only for a failed report: planted-bug property tests
        that read ``ok`` alone never pay for it).
      notes: what the check did not compare and why (e.g. integer inputs).
      title: what was checked (the first words of the text).
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
    rules_fn: Callable[[], tuple[RuleCheck, ...]] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )
    notes: tuple[str, ...] = ()
    title: str = "gradient check"

    @property
    def ok(self) -> bool:
        """All leaves agree and every oracle that ran passed."""
        return (
            all(r.ok for r in self.rows)
            and (self.finite_differences is None or self.finite_differences.ok)
            and (self.taylor is None or self.taylor.ok)
        )

    @functools.cached_property
    def rules(self) -> tuple[RuleCheck, ...]:
        """Each layer's own rule, checked in place given autodiff's δ at its output,
        in the order their forwards finish (the loss last); empty when every leaf
        agrees or the check has no layers."""
        if self.rules_fn is None or all(r.ok for r in self.rows):
            return ()
        return self.rules_fn()

    @property
    def blame(self) -> str | None:
        """The path of the layer whose own rule is wrong (e.g. ``"layers[2]"``,
        ``"layers[1].block.layers[0]"``; ``"loss"`` for the loss's δ; ``"layer"`` for
        the layer :func:`jbp.check_layer` checks), None when all agree or no single
        rule can be blamed. Walking backward from the output, it is the first layer
        whose ``backward``, given autodiff's δ at its output, returns a ``δ_in`` or a
        gradient that differs from autodiff of that layer alone; a combinator is
        blamed only when none of its children is (its own rule is wrong)."""
        return blame(self.rules)

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

    def format(self) -> str:
        """The report as text: a header, the table, the oracles, the blame."""
        return str(self)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready values (``json.dumps(report.to_json())``)."""
        fd, taylor = self.finite_differences, self.taylor
        return {
            "title": self.title,
            "ok": self.ok,
            "names": list(self.names),
            "rtol": self.rtol,
            "dtype": self.dtype,
            "precision": self.precision,
            "backend": self.backend,
            "max_rel_err": _json_float(self.max_rel_err),
            "n_bitwise": self.n_bitwise,
            "rows": [r.to_json() for r in self.rows],
            "finite_differences": None
            if fd is None
            else {
                "ok": fd.ok,
                "h": fd.h,
                "errors": [_json_float(e) for e in fd.errors],
                "tolerance": fd.tolerance,
            },
            "taylor": None
            if taylor is None
            else {"ok": taylor.ok, "order": _json_float(taylor.order)},
            "blame": self.blame,
            "rules": [r.to_json() for r in self.rules],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        status = "OK" if self.ok else "MISMATCH"
        lines = [
            f"{self.title}: {status}: {len(self.rows)} leaves, {self.n_bitwise} bitwise identical, "
            f"worst rel err {self.max_rel_err:.2e} (tolerance {self.rtol:.0e})",
            f"tested: {self.names[0]}; reference: {self.names[1]}; dtype {self.dtype}, "
            f"matmul precision {self.precision}, backend {self.backend}",
        ]
        oracles = any(r.oracle for r in self.rows)  # a column only where rows differ in it
        header = (
            "leaf",
            "shape",
            "max abs err",
            "rel err",
            "bitwise",
            *(("oracle",) * oracles),
            "ok",
        )
        table = [header]
        for r in self.rows:
            ok = ("ok" if r.ok else "FAIL") + (f" ({r.note})" if r.note else "")
            cells = (r.path, str(r.shape), f"{r.max_abs_err:.2e}", f"{r.rel_err:.2e}")
            table.append((*cells, "yes" if r.bitwise else "no", *((r.oracle,) * oracles), ok))
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
        if self.rules and not self.ok:
            failed = [r for r in self.rules if not r.ok]
            lines.append(
                f"own rules, each given autodiff's δ at its output ({len(self.rules)} checked, "
                f"{len(failed)} differ):"
            )
            lines += [
                f"  {r.path}: "
                + (r.worst if r.worst.startswith("raised") else f"{r.worst} off by {r.rel_err:.2e}")
                + f" ({_short(r.layer)})"
                for r in reversed(failed)
            ]
        if not self.ok and (self.rules or self.blame is not None):
            lines.append(
                f"blame: {self.blame}"
                if self.blame is not None
                else "blame: none (every rule agrees on its own; see the table)"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def blame(checks: tuple[RuleCheck, ...]) -> str | None:
    """Walking backward (the loss first, then the last layer to finish its forward),
    the first failed rule none of whose children failed; None if all passed."""
    failed = [c.path for c in checks if not c.ok]
    for c in reversed(checks):
        if c.ok:
            continue
        if c.path == "loss":
            return c.path
        prefix = "" if c.path in ("net", "layer") else c.path + "."  # the root holds all
        if not any(p not in (c.path, "loss") and p.startswith(prefix) for p in failed):
            return c.path
    return None


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _layer_of(path: tuple[Any, ...]) -> int | None:
    if path and isinstance(path[0], jtu.SequenceKey):
        return int(path[0].idx)
    return None


def current_precision() -> str:
    """The matmul precision in effect (``"default"`` when unset)."""
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
    roundoff: float | None = None,
) -> Report:
    """Compare two gradient pytrees leaf by leaf.

    The comparison itself runs on the host in float64; the report records the
    matmul precision in effect where ``compare`` is called (the global default,
    or a ``jax.default_matmul_precision`` context), as that of the gradients.
    Default tolerances by the reference's dtype, at full matmul precision
    (the module docs say what TF32 or bfloat16 passes do): float64 ``1e-9``,
    float32 ``1e-4``, float16 and bfloat16 ``1e-2``.

    Args:
      tested: the gradient under test, e.g. from ``jbp.backprop``.
      reference: the reference, e.g. from autodiff; errors are relative
        to its scale.
      rtol: relative tolerance; default by dtype (see module docs).
      atol: a leaf also passes if ``max |a − b| ≤ atol`` (default 0: only
        the relative test counts). Useful where the reference is exactly
        zero and round-off is not, e.g. a variance over identical examples.
      names: labels for the two sides, shown in the report.
      prefix: the name of the root in leaf paths.
      roundoff: the machine ε of the zero-to-round-off rule (module docs); default
        the reference dtype's. A mixed-precision check (float32 gradients of a
        bfloat16 computation) passes its compute dtype's.

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
            note = f"shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
            rows.append(LeafRow.failure(name, note, shape=tuple(b.shape), layer=layer))
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
        eps = eps if roundoff is None else roundoff
        zero = leaf_scale <= ZERO_ULPS * eps * global_scale
        scale = global_scale if zero else leaf_scale
        rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
        rows.append(
            LeafRow(
                name, layer, tuple(b.shape), err, scale, rel, bitwise, rel <= rtol or err <= atol
            )
        )
    return Report(
        tuple(rows), names, float(rtol), dtype, current_precision(), jax.default_backend()
    )
