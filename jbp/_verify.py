"""Compare gradients leaf by leaf, and verify jbp.backprop against three oracles.

The oracles: ``jax.grad(objective)`` (always), float64 central finite
differences along random unit directions, and the Taylor-remainder test
``|C(θ + h v) − C(θ) − h ⟨g, v⟩| = O(h²)`` (both with ``finite_differences=True``).

Reports and the error measure: :mod:`jbp._report`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from . import _blame
from ._backprop import backprop, check_net, objective, prepare
from ._checks import check_finite
from ._losses import Loss, get_loss
from ._precision import MIXED_RTOL_UNITS, is_low, mixed_rtol, unit_roundoff
from ._protocol import walk_layers
from ._report import (
    DEFAULT_RTOL,
    FD_RTOL,
    PRECISION,
    ZERO_ULPS,
    FiniteDifferenceCheck,
    Report,
    RuleCheck,
    TaylorCheck,
    compare,
)
from .layers._cast import Cast


def compute_dtype(net: Any, x: Any) -> Any:
    """The low-precision dtype a call of ``net`` on ``x`` computes in: of ``x``'s dtype
    (if low precision) and every :class:`jbp.Cast` layer's, the one of largest
    round-off; None when the whole call computes in float32 or float64."""
    dtypes = [jnp.dtype(layer.dtype) for _, layer in walk_layers(net) if isinstance(layer, Cast)]
    if hasattr(x, "dtype"):
        dtypes.append(jnp.dtype(x.dtype))
    low = [d for d in dtypes if is_low(d)]
    return max(low, key=lambda d: float(jnp.finfo(d).eps)) if low else None


def _to64(tree: Any) -> Any:
    """Every floating array leaf cast to float64; other leaves (integer arrays, Python
    scalars and strings held fixed, float0 cotangents) as they are."""

    def cast(a: Any) -> Any:
        floating = hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
        return a.astype(jnp.float64) if floating else a

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
    mask: Any = None,
    dropout_key: Any = None,
) -> tuple[FiniteDifferenceCheck, TaylorCheck]:
    """Float64 central differences and the Taylor-remainder test of ``jbp.backprop``.

    Params, ``x`` and real-valued ``y`` are cast to float64 (64-bit types are
    enabled for the duration). Directions are random unit vectors in
    parameter space. Runs at matmul precision ``"highest"``.
    """
    with jax.enable_x64(True), jax.default_matmul_precision(PRECISION):
        p64, x64, y64 = _to64(params), _to64(x), _to64(y)
        kw = {"mask": mask, "dropout_key": dropout_key}
        f = jax.jit(functools.partial(objective(net, loss), **kw))
        g = jax.jit(backprop(net, loss))(p64, x64, y64, **kw)
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
        taylor = taylor_check(lambda h: float(f(_axpy(h, v, p64), x64, y64)), c0, _dot(g, v))
    return fd_check, taylor


def taylor_check(value_at: Any, c0: float, gv: float) -> TaylorCheck:
    """The Taylor-remainder test along one direction ``v``: ``value_at(h)`` is
    ``C(θ + h v)`` in float64, ``c0 = C(θ)`` and ``gv = ⟨g, v⟩`` for the gradient
    under test; ``h = 10⁻² · 2⁻ᵏ``, ``k = 0..11``."""
    eps = float(np.finfo(np.float64).eps)
    hs = tuple(1e-2 * 2.0**-k for k in range(12))
    rs, floors = [], []
    for hk in hs:
        ck = value_at(hk)
        rs.append(abs(ck - c0 - hk * gv) if math.isfinite(ck) else math.inf)
        floors.append(100 * eps * (abs(ck) + abs(c0) + abs(hk * gv)))
    orders = [
        math.log2(rs[k] / rs[k + 1])
        for k in range(len(hs) - 1)
        if rs[k + 1] > 10 * floors[k + 1] and math.isfinite(rs[k])
    ]
    order = float(np.median(orders[-3:])) if orders else math.nan
    return TaylorCheck(hs, tuple(rs), order)


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
    mask: Any = None,
    dropout_key: Any = None,
) -> Report:
    """Check ``jbp.backprop(net, loss)`` against ``jax.grad(jbp.objective(net, loss))``.

    Both gradients (and the finite differences, and the blame's per-layer
    checks) run under ``jax.default_matmul_precision("highest")``, whatever the
    global default: on GPU/TPU, float32 matmuls and convolutions would otherwise
    use TF32 or bfloat16 passes, whose round-off (~1e-3 relative) the float32
    tolerance would report as mismatches. The report records the precision and
    backend (``report.precision``, its header, ``to_json()``).

    Default tolerances (relative to each leaf's scale, see :func:`jbp.compare`):

    ======================  ============  =========================================
    dtype of the problem    ``rtol``      precision
    ======================  ============  =========================================
    float64                 1e-9          any (float64 has no reduced passes)
    float32                 1e-4          "highest" (always, in ``verify``)
    float16, bfloat16       1e-2          any (bfloat16 8-, float16 11-bit significand)
    ======================  ============  =========================================

    Args:
      net, loss: the network and loss (name or :class:`Loss`).
      params, x, y: a problem instance; ``x`` ``(batch, fan_in)`` or ``(fan_in,)``.
      finite_differences: also run float64 central differences along
        ``directions`` random unit directions and the Taylor-remainder test.
      jit: run both gradients under ``jax.jit`` (default) or eagerly.
      rtol: relative tolerance (default by dtype, see module docs).
      key: PRNG key for the finite-difference directions (default key 0).
      directions: number of finite-difference directions.
      mask, dropout_key: as for :func:`jbp.backprop` (a padding mask; a dropout
        key, given to both sides, so that both drop the same values).

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
    return _verify_with_gradients(
        net,
        loss,
        params,
        x,
        y,
        finite_differences=finite_differences,
        jit=jit,
        rtol=rtol,
        key=key,
        directions=directions,
        mask=mask,
        dropout_key=dropout_key,
    )[0]


def _verify_with_gradients(
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
    mask: Any = None,
    dropout_key: Any = None,
) -> tuple[Report, Any, Any]:
    """:func:`verify`, also returning ``jbp``'s gradient and jax.grad's (for
    :func:`arbitrate`, which then need not compute them again)."""
    net = check_net(net)
    loss = get_loss(loss)
    for name, value in (("params", params), ("x", x), ("y", y)):
        check_finite(value, name)
    kw = {"mask": mask, "dropout_key": dropout_key}
    g_manual, g_ref = _gradients(net, loss, params, x, y, jit, **kw)
    low = compute_dtype(net, x)  # mixed precision: tolerance and zero rule of the compute dtype
    if low is not None and rtol is None:
        rtol = mixed_rtol(low)
    with jax.default_matmul_precision(PRECISION):
        report = compare(
            g_manual,
            g_ref,
            rtol=rtol,
            names=("manual (jbp.backprop)", "autodiff (jax.grad)"),
            roundoff=None if low is None else float(jnp.finfo(low).eps),
        )
    if low is not None:
        report = dataclasses.replace(
            report,
            notes=(
                *report.notes,
                f"computed in {low.name} (unit round-off u = {unit_roundoff(low):.2e}); "
                f"reference: autodiff of the same mixed-precision forward; default "
                f"tolerance {MIXED_RTOL_UNITS}u",
            ),
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
            **kw,
        )
    report = dataclasses.replace(
        report,
        finite_differences=fd,
        taylor=taylor,
        layers=tuple(repr(layer) for layer in net.layers),
        rules_fn=functools.partial(_network_rules, net, loss, params, x, y, rtol, **kw),
    )
    return report, g_manual, g_ref


def _network_rules(
    net: Any, loss: Loss, params: Any, x: Any, y: Any, rtol: float | None, **kw: Any
) -> tuple[RuleCheck, ...]:
    """Every layer's own rule in ``net`` and the loss's δ (see :attr:`Report.blame`),
    at matmul precision ``"highest"`` (this runs when a failed report's blame is
    first read, outside :func:`verify`)."""
    with jax.default_matmul_precision(PRECISION):
        b = prepare(net, loss, params, x, y, kw["mask"], kw["dropout_key"])
        out, _ = jax.jit(net.forward)(params, b.x, b.context)
        checks = _blame.rule_checks(
            net, params, b.x, b.context, lambda o: b.loss(o, b.y), root_path="net", rtol=rtol
        )
        return (*checks, _blame.loss_check(b.loss, out, b.y, rtol))


REFERENCE_LIMITED = "reference-limited"


@dataclasses.dataclass(frozen=True)
class ArbitratedLeaf:
    """One failing leaf, measured against both references.

    All three errors are ``max |·|`` over the leaf divided by the same
    ``scale``: the second reference's leaf scale ``max |R2|`` (its largest
    leaf's scale when the leaf is zero to round-off, as in :func:`compare`).

    Attributes:
      path: e.g. ``"params[2]['wq']"``.
      scale: the common scale.
      tested_vs_reference: ``jbp`` vs R1 (the reference of the sweep).
      tested_vs_second: ``jbp`` vs R2 (the arbitrating reference).
      reference_spread: R1 vs R2, how far the references disagree.
      limited: whether this leaf is reference-limited (see :func:`arbitrate`).
    """

    path: str
    scale: float
    tested_vs_reference: float
    tested_vs_second: float
    reference_spread: float
    limited: bool


@dataclasses.dataclass(frozen=True)
class Arbitration:
    """The result of :func:`arbitrate`.

    Attributes:
      verdict: ``"passed"`` (no leaf failed against R1), ``"reference-limited"``
        (every failing leaf is) or ``"failed"``.
      leaves: one :class:`ArbitratedLeaf` per leaf that failed against R1.
      names: ``(R1, R2)``, e.g. ``("jit(jax.grad)", "jit(jax.grad) in float64 …")``.
      rtol: the tolerance.
      note: why the verdict is ``"failed"`` when no leaf says so (non-finite
        values, a failed oracle), else empty.
    """

    verdict: str
    leaves: tuple[ArbitratedLeaf, ...]
    names: tuple[str, str]
    rtol: float
    note: str = ""

    @property
    def limited(self) -> bool:
        return self.verdict == REFERENCE_LIMITED

    def __str__(self) -> str:
        lines = [
            f"arbitration: {self.verdict}: R1 {self.names[0]}, R2 {self.names[1]} "
            f"(tolerance {self.rtol:.0e})" + (f": {self.note}" if self.note else "")
        ]
        if self.leaves:
            header = ("leaf", "scale", "jbp vs R1", "jbp vs R2", "R1 vs R2", "limited")
            table = [header] + [
                (
                    leaf.path,
                    f"{leaf.scale:.2e}",
                    f"{leaf.tested_vs_reference:.2e}",
                    f"{leaf.tested_vs_second:.2e}",
                    f"{leaf.reference_spread:.2e}",
                    "yes" if leaf.limited else "NO",
                )
                for leaf in self.leaves
            ]
            widths = [max(len(row[i]) for row in table) for i in range(len(header))]
            for row in table:
                lines.append(
                    "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                )
        return "\n".join(lines)


def _gradients(
    net: Any, loss: Loss, params: Any, x: Any, y: Any, jit: bool, **kw: Any
) -> tuple[Any, Any]:
    manual, reference = backprop(net, loss), jax.grad(objective(net, loss))  # reference
    if jit:
        manual, reference = jax.jit(manual), jax.jit(reference)
    with jax.default_matmul_precision(PRECISION):
        return manual(params, x, y, **kw), reference(params, x, y, **kw)


def _second_name(dtype: str, jit: bool) -> str:
    if dtype != "float64":
        return "jit(jax.grad) in float64 (params, x, y upcast)"
    return "eager jax.grad (float64)" if jit else "jit(jax.grad) (float64)"


def _second_reference(
    net: Any, loss: Loss, params: Any, x: Any, y: Any, dtype: str, jit: bool, **kw: Any
) -> Any:
    """R2: float64 jit(jax.grad) of the upcast problem for a float32 (or lower)
    problem; for float64, jax.grad in the other mode (eager if R1 was jitted)."""
    grad = functools.partial(jax.grad(objective(net, loss)), **kw)  # reference
    with jax.enable_x64(True), jax.default_matmul_precision(PRECISION):
        if dtype != "float64":
            return jax.device_get(jax.jit(grad)(_to64(params), _to64(x), _to64(y)))
        return jax.device_get(grad(params, x, y) if jit else jax.jit(grad)(params, x, y))


def arbitrate(
    net: Any,
    loss: str | Loss,
    params: Any,
    x: Any,
    y: Any,
    report: Report | None = None,
    *,
    tested: Any = None,
    reference: Any = None,
    second: Any = None,
    jit: bool = True,
    rtol: float | None = None,
    mask: Any = None,
    dropout_key: Any = None,
) -> Arbitration:
    """Arbitrate a failed gradient check with a second, independent reference.

    R1 is the reference of the check (``jax.grad``, jitted when ``jit``). R2 is,
    for a float32 problem, ``jit(jax.grad)`` of the same problem with params and
    floating ``x``, ``y`` upcast to float64; for a float64 problem, ``jax.grad``
    in another operation order: eager when R1 was jitted, jitted otherwise.

    A leaf that fails against R1 is *reference-limited* when ``jbp`` is at least
    as close to the truth as the references can tell, and either ``jbp`` is
    within ``rtol`` of R2 or the references' own spread ``max|R1 − R2|``
    exceeds ``rtol`` (all relative to the leaf's scale, see
    :class:`ArbitratedLeaf`). "As close as the references can tell":

    - float32 (R2 is the more accurate one): ``max|jbp − R2| ≤ max|R1 − R2|``,
      ``jbp`` is at least as close to R2 as R1 is.
    - float64 (R1 and R2 are equally accurate, neither is privileged): ``jbp``
      is within the references' spread of one of them, ``min(max|jbp − R1|,
      max|jbp − R2|) ≤ max|R1 − R2|``. Where all three differ by round-off
      only, which of R1, R2 ``jbp`` lands nearer is a coin flip; a wrong
      gradient is far from both.

    Given the first condition the second always holds (if the spread is within
    ``rtol``, so is the nearer distance); it states what is being claimed:
    either ``jbp`` is right to ``rtol``, or the leaf cannot be resolved to
    ``rtol`` at this precision. NaN or Inf in ``jbp``, R1 or R2 is never
    reference-limited, nor is a failed finite-difference or Taylor oracle.

    Args:
      net, loss, params, x, y: the problem, as given to :func:`verify`.
      report: the check's :class:`Report`, for its tolerance and oracles
        (optional).
      tested, reference: ``jbp``'s gradient and R1, when already at hand
        (default: recomputed as :func:`verify` does).
      second: R2, when already at hand (default: computed, if needed).
      jit: whether R1 (and ``jbp``) run under ``jax.jit``.
      rtol: the tolerance (default: the report's, else by dtype).
      mask, dropout_key: as given to :func:`verify`.

    Returns:
      An :class:`Arbitration`: ``"passed"`` (R2 is not computed),
      ``"reference-limited"`` or ``"failed"``.
    """
    net = check_net(net)
    loss = get_loss(loss)
    kw = {"mask": mask, "dropout_key": dropout_key}
    if tested is None or reference is None:
        g_tested, g_reference = _gradients(net, loss, params, x, y, jit, **kw)
        tested = g_tested if tested is None else tested
        reference = g_reference if reference is None else reference
    if rtol is None and report is not None:
        rtol = report.rtol
    first = compare(tested, reference, rtol=rtol)
    rtol = first.rtol
    r1_name = ("jit(jax.grad)" if jit else "eager jax.grad") + f" ({first.dtype})"
    oracle_failed = report is not None and (
        (report.finite_differences is not None and not report.finite_differences.ok)
        or (report.taylor is not None and not report.taylor.ok)
    )
    if first.ok and not oracle_failed:
        return Arbitration("passed", (), (r1_name, "not needed"), rtol)
    if second is None:
        second = _second_reference(net, loss, params, x, y, first.dtype, jit, **kw)
    names = (r1_name, _second_name(first.dtype, jit))
    trees = [jtu.tree_leaves(jax.device_get(t)) for t in (tested, reference, second)]
    as64 = [[np.asarray(a, np.float64) for a in leaves] for leaves in trees]
    if any(len({a.shape for a in leaf}) > 1 for leaf in zip(*as64, strict=True)):
        return Arbitration("failed", (), names, rtol, "shape mismatch")
    if any(not np.all(np.isfinite(a)) for leaves in as64 for a in leaves):
        return Arbitration("failed", (), names, rtol, "non-finite values")
    symmetric = first.dtype == "float64"  # R2 no more accurate than R1
    eps = float(jnp.finfo(first.dtype).eps) if first.dtype in DEFAULT_RTOL else 0.0
    scales = [float(np.max(np.abs(r))) if r.size else 0.0 for r in as64[2]]
    global_scale = max(scales, default=0.0)
    leaves = []
    for row, t, r1, r2, leaf_scale in zip(first.rows, *as64, scales, strict=True):
        if row.ok:
            continue
        scale = global_scale if leaf_scale <= ZERO_ULPS * eps * global_scale else leaf_scale
        d_t1, d_t2, d_12 = (
            float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in ((t, r1), (t, r2), (r1, r2))
        )

        def rel(d: float, scale: float = scale) -> float:
            return d / scale if scale > 0 else (0.0 if d == 0 else math.inf)

        nearest = min(d_t1, d_t2) if symmetric else d_t2
        limited = nearest <= d_12 and (rel(nearest) <= rtol or rel(d_12) > rtol)
        leaves.append(ArbitratedLeaf(row.path, scale, rel(d_t1), rel(d_t2), rel(d_12), limited))
    if oracle_failed:
        return Arbitration("failed", tuple(leaves), names, rtol, "an oracle failed")
    verdict = REFERENCE_LIMITED if all(leaf.limited for leaf in leaves) else "failed"
    return Arbitration(verdict, tuple(leaves), names, rtol)
