"""``jbp verify``: check jbp.backprop against jax.grad on random architectures."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

import jbp

from .._progress import Progress, format_duration
from .._report import PRECISION
from .._verify import Arbitration, _verify_with_gradients, arbitrate
from ._args import DTYPES, device, int_at_least, json_safe, loss_name, names_list, table

# Four problems of each family per dtype: 48 in all, about a minute on a 2-core
# CPU (the first run; a second finds its programs in the compilation cache).
DEFAULT_COUNT = 24
ARCHS = ("mlp", "cnn", "resnet", "transformer", "llama", "rnn")
# Default (max depth, max width) per family: Dense layers and widths for mlp,
# blocks and channels (or widths) for cnn and resnet.
LIMITS = {"mlp": (6, 32), "cnn": (3, 8), "resnet": (3, 8), "transformer": (2, 8), "llama": (2, 8),
          "rnn": (2, 8)}  # fmt: skip
PASSED, LIMITED, FAILED = "passed", "reference-limited", "failed"
# The environment variable naming the directory of XLA's persistent compilation
# cache for jbp verify; "off" (or "0", or empty) turns the cache off.
CACHE_ENV = "JBP_XLA_CACHE"
PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


_VERIFY_HELP = """\
Draw random architectures and check jbp.backprop against jax.grad on each with
jbp.verify. Families (--arch): mlp (Dense and Activation layers, any
registered activation, bias on or off, batches of 1-32 or a single example),
cnn (1-D and 2-D convolutions with random kernels, strides, paddings,
dilations and groups, pooling, norm layers, and a Flatten, global-pooling or
feature-map head), resnet (residual and Parallel sum/concat blocks on vectors
or images), transformer (jbp.transformer on integer tokens, or stacks of
attention, Dense and LayerNorm blocks on continuous sequences), llama (jbp.llama
and modern decoders and encoders: rotary positions, grouped-query attention,
SwiGLU gates, tied embeddings, GroupNorm, dropout; most batches padded, with a
padding mask and labels -1 where there is no target), rnn (RNN, LSTM and GRU
layers, stacked and bidirectional, on sequences or tokens, padded as llama);
all (the default) takes
them in turn. Problem i of a seed is the
same architecture for every dtype: jbp.random_problem(
np.random.default_rng((seed, i)), dtype=..., arch=..., ...).

The default, --count 24 with --arch all, is 4 problems of every family per
dtype (48 problems: about a minute on an idle 2-core CPU, two on a busy one);
--count 500 is the thorough sweep.

Mode: by default both gradients run under jax.jit, the way users run them, so
the share of bitwise-identical leaves is that of compiled code. Compiling the
two gradients is most of the time (about 1 s per problem on a 2-core CPU);
--no-jit runs them op by op, which is several times slower for random shapes
(each operation compiles once per new shape) and measures eager numerics.

Precision: every check (jbp, jax.grad, the float64 arbitration, curvature)
runs its matmuls and convolutions at "highest", whatever the default set by
jax_default_matmul_precision: a GPU's TF32 or a TPU's bfloat16 passes would
otherwise make float32 round-off look like mismatches. The header and the JSON
("precision") record it.

Compilation cache: the compiled programs are kept in XLA's persistent
compilation cache, so a second run of the same problems (the same seed and
flags, the same code and jax) loads them instead of compiling, in about a
quarter of the time. A program is found only if it is the same program: a
changed backward rule compiles again, and the report is the same either way.
The directory is $JBP_XLA_CACHE, else $XDG_CACHE_HOME/jbp/xla, else
~/.cache/jbp/xla (about 0.1 MB per problem; delete it at any time);
JBP_XLA_CACHE=off turns the cache off. If JAX's own jax_compilation_cache_dir
is set (JAX_COMPILATION_CACHE_DIR), that cache and its settings are used as
they are.

Progress: on a terminal, a tqdm bar on stderr; otherwise (a log file, a pipe,
CI) a plain line on stderr every 10 s, never a carriage return: problems done,
failures, the worst error so far, time elapsed and left. --quiet prints
neither. --json also records every problem in the order verified ("problems":
its dtype, index, family, status, worst leaf error and its dtype's worst error
so far, tolerance, bitwise leaves and seconds).

Reference-limited: a problem that fails against jax.grad (R1) is arbitrated
with a second, independent reference R2: for float32, jit(jax.grad) of the
problem upcast to float64; for float64, eager jax.grad (jitted under
--no-jit), another operation order. A failing leaf is reference-limited when
jbp is as close to the truth as the references can tell (float32:
max|jbp - R2| <= max|R1 - R2|; float64: within the references' spread of one
of them) and either within the tolerance of R2 or unresolvable at this
precision (the references' own spread exceeds the tolerance); NaN/Inf never
is. A problem whose every failing leaf is reference-limited is counted as
reference-limited, neither passed nor failed, and always listed with its
reproduce line, its leaves and the three errors (jbp vs R1, jbp vs R2, R1 vs
R2). "worst passing" is the worst error over the problems that passed.

--curvature also checks every curvature quantity of each problem against its
autodiff reference (jbp.check_curvature: diag_ggn, per_example_diag_ggn,
sqrt_ggn, ggn_vector_product where every layer has a tangent rule,
diag_hessian on Dense/Activation chains) and counts, per quantity, the
problems it was checked on, failed on and skipped on (not applicable), with
the worst error. The references cost O(P²), so with --curvature the mlp
family defaults to depth 3 and width 8 (--max-depth 3 --max-width 8) unless
those flags are given; the other families' defaults are already that small.
A curvature mismatch (or a curvature check that raises) fails the problem.

Exit status: 0 if no problem fails (reference-limited problems do not fail
the run), 1 on any gradient or curvature mismatch, 2 on bad arguments."""
# The mlp family's default limits with --curvature (O(P²) references).
CURVATURE_LIMITS = {"mlp": (3, 8)}


def add_verify(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check jbp.backprop against jax.grad on random architectures",
        description=_VERIFY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--count",
        type=int_at_least(1),
        default=DEFAULT_COUNT,
        metavar="N",
        help=f"architectures per dtype (default {DEFAULT_COUNT})",
    )
    p.add_argument(
        "--dtype",
        type=names_list("dtype", lambda: DTYPES),
        default=DTYPES,
        metavar="LIST",
        help="comma-separated dtypes (default float32,float64)",
    )
    p.add_argument(
        "--arch",
        choices=(*ARCHS, "all"),
        default="all",
        help="architecture family (default all: mlp, cnn, resnet, transformer, llama and rnn in turn)",
    )
    p.add_argument(
        "--min-depth",
        type=int_at_least(1),
        default=1,
        metavar="D",
        help="fewest Dense layers of an mlp (default 1)",
    )
    p.add_argument(
        "--max-depth",
        type=int_at_least(1),
        default=None,
        metavar="D",
        help="most Dense layers (mlp, default 6; 3 with --curvature), blocks (cnn, resnet, "
        "default 3) or transformer depth (default 2)",
    )
    p.add_argument(
        "--max-width",
        type=int_at_least(1),
        default=None,
        metavar="W",
        help="largest width (mlp, default 32; 8 with --curvature), channel count (cnn, "
        "resnet, default 8) or vocabulary and width (transformer, default 8)",
    )
    p.add_argument(
        "--loss",
        type=loss_name,
        default=None,
        metavar="NAME",
        help=f"one of {', '.join(jbp.loss_names())} (default: drawn per problem)",
    )
    p.add_argument(
        "--activations",
        type=names_list("activation", jbp.activation_names),
        default=None,
        metavar="LIST",
        help="comma-separated activation names to draw from (default: all registered)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the problem sampler (default 0)")
    p.add_argument(
        "--finite-differences",
        action="store_true",
        help="also check against float64 central differences and the Taylor test",
    )
    p.add_argument(
        "--no-jit",
        dest="jit",
        action="store_false",
        help="verify eagerly, op by op (default: under jax.jit)",
    )
    p.add_argument(
        "--curvature",
        action="store_true",
        help="also check the curvature quantities against autodiff (jbp.check_curvature); "
        "smaller mlp defaults: --max-depth 3 --max-width 8",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress (bar or lines) and no header: print the summary only",
    )
    p.add_argument(
        "--json", metavar="PATH", default=None, help="also write a machine-readable summary to PATH"
    )
    p.set_defaults(run=_run_verify, subparser=p)


def _arch(args: argparse.Namespace, index: int) -> str:
    return ARCHS[index % len(ARCHS)] if args.arch == "all" else args.arch


def _limits(args: argparse.Namespace, arch: str) -> tuple[int, int]:
    """``(max_depth, max_width)`` for ``arch``: the flags, or the family's defaults."""
    depth, width = (CURVATURE_LIMITS if args.curvature else LIMITS).get(arch, LIMITS[arch])
    return (
        depth if args.max_depth is None else args.max_depth,
        width if args.max_width is None else args.max_width,
    )


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """One verified problem."""

    dtype: str
    arch: str
    index: int
    description: str
    n_params: int
    report: jbp.Report | None  # None when verification raised
    error: str
    seconds: float
    curvature: jbp.CurvatureReport | None = None  # with --curvature, unless it raised
    arbitration: Arbitration | None = None  # for a gradient check that failed
    curvature_error: str = ""  # the exception of a curvature check that raised

    @property
    def gradient_status(self) -> str:
        """PASSED, LIMITED (every failing leaf reference-limited) or FAILED."""
        if self.report is None:
            return FAILED
        if self.report.ok:
            return PASSED
        return LIMITED if self.arbitration is not None and self.arbitration.limited else FAILED

    @property
    def curvature_ok(self) -> bool:
        """No curvature check raised or mismatched (True when none ran)."""
        return not self.curvature_error and (self.curvature is None or self.curvature.passed)

    @property
    def status(self) -> str:
        """The gradient's status, or FAILED on a curvature failure."""
        return self.gradient_status if self.curvature_ok else FAILED

    @property
    def ok(self) -> bool:
        return self.status == PASSED

    @property
    def rel_err(self) -> float:
        return math.inf if self.report is None else self.report.max_rel_err

    def details(self) -> str:
        parts = [self.error if self.report is None else str(self.report)]
        if self.report is not None and self.error:  # arbitration raised
            parts.append(self.error)
        if self.arbitration is not None:
            parts.append(str(self.arbitration))
        if self.curvature is not None:  # its first line: "curvature check: OK|MISMATCH: ..."
            parts.append(self.curvature.format())
        if self.curvature_error:
            parts.append(self.curvature_error)
        return "\n".join(parts)


def _sampler_call(args: argparse.Namespace, index: int, dtype: str) -> str:
    """The Python call that rebuilds problem ``index`` on its own."""
    arch = _arch(args, index)
    kw = [f"dtype={dtype!r}"]
    if arch != "mlp":
        kw.append(f"arch={arch!r}")
    if args.loss is not None:
        kw.append(f"loss={args.loss!r}")
    max_depth, max_width = _limits(args, arch)
    for name, value, default in (
        ("min_depth", args.min_depth, 1),
        ("max_depth", max_depth, 6),
        ("max_width", max_width, 32),
    ):
        if value != default:
            kw.append(f"{name}={value}")
    if args.activations is not None:
        kw.append(f"activations={list(args.activations)!r}")
    return f"jbp.random_problem(np.random.default_rng(({args.seed}, {index})), {', '.join(kw)})"


def _verify_one(args: argparse.Namespace, index: int, dtype: str) -> _Outcome:
    arch = _arch(args, index)
    max_depth, max_width = _limits(args, arch)
    problem = jbp.random_problem(
        np.random.default_rng((args.seed, index)),
        dtype=dtype,
        arch=arch,
        loss=args.loss,
        min_depth=min(args.min_depth, max_depth),
        max_depth=max_depth,
        max_width=max_width,
        activations=args.activations,
    )
    problem_args = (problem.net, problem.loss, problem.params, problem.x, problem.y)
    kw = problem.keywords  # the padding mask and dropout key, if any
    start = time.perf_counter()
    report, error = None, ""
    tested = reference = None
    try:
        report, tested, reference = _verify_with_gradients(
            *problem_args, finite_differences=args.finite_differences, jit=args.jit, **kw
        )
    except Exception as e:  # a crash on one problem is a failure to report, not a CLI crash
        error = "verification raised:\n" + _exception(e)
    arbitration = None
    if report is not None and not report.ok:
        try:
            arbitration = arbitrate(
                *problem_args, report, tested=tested, reference=reference, jit=args.jit, **kw
            )
        except Exception as e:  # unarbitrated, the problem stays failed
            error = "arbitration raised:\n" + _exception(e)
    curvature, curvature_error = None, ""
    if args.curvature:
        try:
            curvature = jbp.check_curvature(*problem_args, **kw)
        except Exception as e:
            curvature_error = "curvature check raised:\n" + _exception(e)
    return _Outcome(
        dtype,
        arch,
        index,
        problem.description,
        problem.n_params,
        report,
        error,
        time.perf_counter() - start,
        curvature,
        arbitration,
        curvature_error,
    )


def _cache_dir() -> tuple[str | None, str]:
    """The directory for XLA's persistent compilation cache (None: leave JAX's
    settings alone) and how the header describes the cache."""
    own = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if own:  # the user's own, set for JAX
        return None, f"{own} (jax_compilation_cache_dir)"
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None and chosen.strip().lower() in ("", "0", "off"):
        return None, f"off ({CACHE_ENV}={chosen})"
    if chosen:
        path = Path(chosen).expanduser()
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jbp" / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: verify without the cache
        return None, f"off (cannot create {path}: {e.strerror})"
    return str(path), str(path)


@contextlib.contextmanager
def _compilation_cache(path: str | None) -> Iterator[None]:
    """Keep every program compiled inside in XLA's persistent cache at ``path``
    (even the quick ones: jax's threshold of 1 s would keep none of ours);
    restore JAX's settings on the way out. ``None``: change nothing."""
    if path is None:
        yield
        return
    before = jax.config.jax_persistent_cache_min_compile_time_secs  # type: ignore[attr-defined]
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
        compilation_cache.reset_cache()  # later compiles in this process: no cache


def _exception(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(e)).rstrip()


def _curvature_summary(outcomes: list[_Outcome]) -> dict[str, Any]:
    """Per quantity: problems checked, passed, failed and skipped on, the worst
    error and the tolerance; and how many problems' curvature check raised."""
    quantities: dict[str, dict[str, Any]] = {}

    def entry(quantity: str) -> dict[str, Any]:
        return quantities.setdefault(
            quantity,
            {"checked": 0, "passed": 0, "failed": 0, "skipped": 0, "worst": 0.0, "tolerance": None},
        )

    for o in outcomes:
        if o.curvature is None:
            continue
        for row in o.curvature.rows:
            q = entry(row.quantity)
            q["checked"] += 1
            q["passed"] += int(row.passed)
            q["failed"] += int(not row.passed)
            q["worst"] = max(q["worst"], row.error) if math.isfinite(row.error) else math.inf
            q["tolerance"] = row.tolerance
        for reason in o.curvature.skipped:
            entry(reason.split(" ", 1)[0])["skipped"] += 1
    return {
        "quantities": quantities,
        "raised": sum(bool(o.curvature_error) for o in outcomes),
        "failed_problems": sum(not o.curvature_ok for o in outcomes),
    }


def _counts(outcomes: list[_Outcome]) -> dict[str, Any]:
    """Passed, reference-limited and failed problems, and the worst error over
    those that passed (NaN when none did)."""
    passing = [o.rel_err for o in outcomes if o.status == PASSED]
    return {
        "passed": len(passing),
        "reference_limited": sum(o.status == LIMITED for o in outcomes),
        "failed": sum(o.status == FAILED for o in outcomes),
        "worst_passing_rel_err": max(passing, default=math.nan),
    }


def _dtype_summary(outcomes: list[_Outcome], seconds: float) -> dict[str, Any]:
    reports = [o.report for o in outcomes if o.report is not None]
    leaves = sum(len(r.rows) for r in reports)
    bitwise = sum(r.n_bitwise for r in reports)
    worst = max(outcomes, key=lambda o: o.rel_err if not math.isnan(o.rel_err) else math.inf)
    summary: dict[str, Any] = {
        "tried": len(outcomes),
        **_counts(outcomes),
        "worst_rel_err": worst.rel_err,
        "worst_problem": {
            "index": worst.index,
            "n_params": worst.n_params,
            "description": worst.description,
        },
        "tolerance": reports[0].rtol if reports else math.nan,
        "leaves": leaves,
        "bitwise_leaves": bitwise,
        "bitwise_share": bitwise / leaves if leaves else math.nan,
        "seconds": seconds,
        "verify_seconds": sum(o.seconds for o in outcomes),
        "by_arch": _arch_summary(outcomes),
    }
    if any(r.finite_differences is not None for r in reports):
        summary["finite_differences_failed"] = sum(
            r.finite_differences is not None and not r.finite_differences.ok for r in reports
        )
        orders = [r.taylor.order for r in reports if r.taylor is not None]
        finite = [o for o in orders if math.isfinite(o)]
        summary["taylor_failed"] = sum(r.taylor is not None and not r.taylor.ok for r in reports)
        summary["taylor_min_order"] = min(finite, default=math.nan)
    return summary


def _arch_summary(outcomes: list[_Outcome]) -> dict[str, dict[str, Any]]:
    """Tried, failed, worst error and bitwise share of each family."""
    out = {}
    for arch in ARCHS:
        mine = [o for o in outcomes if o.arch == arch]
        if not mine:
            continue
        reports = [o.report for o in mine if o.report is not None]
        leaves = sum(len(r.rows) for r in reports)
        bitwise = sum(r.n_bitwise for r in reports)
        out[arch] = {
            "tried": len(mine),
            **_counts(mine),
            "worst_rel_err": max(o.rel_err for o in mine),
            "leaves": leaves,
            "bitwise_leaves": bitwise,
            "bitwise_share": bitwise / leaves if leaves else math.nan,
        }
    return out


def _sci(value: float) -> str:
    """``1.23e-05``, or ``n/a`` for NaN (no problem to take the worst of)."""
    return "n/a" if math.isnan(value) else f"{value:.2e}"


def _format_by_arch(summaries: dict[str, dict[str, Any]]) -> str:
    rows = [
        (
            "dtype",
            "arch",
            "tried",
            "passed",
            "ref-limited",
            "failed",
            "worst rel err",
            "worst passing",
            "bitwise leaves",
        )
    ]
    for dtype, s in summaries.items():
        for arch, a in s["by_arch"].items():
            rows.append(
                (
                    dtype,
                    arch,
                    str(a["tried"]),
                    str(a["passed"]),
                    str(a["reference_limited"]),
                    str(a["failed"]),
                    f"{a['worst_rel_err']:.2e}",
                    _sci(a["worst_passing_rel_err"]),
                    f"{a['bitwise_leaves']}/{a['leaves']} ({100 * a['bitwise_share']:.1f}%)",
                )
            )
    return table(rows)


def _format_summary(summaries: dict[str, dict[str, Any]]) -> str:
    rows = [
        (
            "dtype",
            "tried",
            "passed",
            "ref-limited",
            "failed",
            "worst rel err",
            "worst passing",
            "tolerance",
            "bitwise leaves",
            "time",
            "per problem",
        )
    ]
    for dtype, s in summaries.items():
        rows.append(
            (
                dtype,
                str(s["tried"]),
                str(s["passed"]),
                str(s["reference_limited"]),
                str(s["failed"]),
                f"{s['worst_rel_err']:.2e}",
                _sci(s["worst_passing_rel_err"]),
                f"{s['tolerance']:.0e}",
                f"{s['bitwise_leaves']}/{s['leaves']} ({100 * s['bitwise_share']:.1f}%)",
                f"{s['seconds']:.1f} s",
                f"{1e3 * s['seconds'] / s['tried']:.0f} ms",
            )
        )
    lines = [table(rows)]
    if any(len(s["by_arch"]) > 1 for s in summaries.values()):
        lines.append(_format_by_arch(summaries))
    for dtype, s in summaries.items():
        w = s["worst_problem"]
        lines.append(
            f"worst {dtype}: {s['worst_rel_err']:.2e} in problem {w['index']} "
            f"({w['n_params']} params): {w['description']}"
        )
        if "curvature" in s:
            lines.extend(_format_curvature(dtype, s["curvature"]))
        if "taylor_failed" in s:
            lines.append(
                f"oracles {dtype}: finite differences failed "
                f"{s['finite_differences_failed']}/{s['tried']}, Taylor test failed "
                f"{s['taylor_failed']}/{s['tried']} (lowest order "
                f"{s['taylor_min_order']:.2f})"
            )
    return "\n".join(lines)


def _format_curvature(dtype: str, c: dict[str, Any]) -> list[str]:
    lines = []
    for quantity, q in c["quantities"].items():
        worst = "n/a" if not q["checked"] else f"{q['worst']:.2e}"
        tol = "" if q["tolerance"] is None else f" (tolerance {q['tolerance']:.0e})"
        lines.append(
            f"curvature {dtype}: {quantity:<20} checked {q['checked']:>4}, failed "
            f"{q['failed']}, skipped {q['skipped']}, worst rel err {worst}{tol}"
        )
    if c["raised"]:
        lines.append(f"curvature {dtype}: the check raised on {c['raised']} problem(s)")
    return lines


def _limited_json(args: argparse.Namespace, o: _Outcome) -> dict[str, Any]:
    a = o.arbitration
    assert a is not None
    return {
        "dtype": o.dtype,
        "arch": o.arch,
        "index": o.index,
        "n_params": o.n_params,
        "description": o.description,
        "reproduce": _sampler_call(args, o.index, o.dtype),
        "references": {"R1": a.names[0], "R2": a.names[1]},
        "tolerance": a.rtol,
        "leaves": [
            {
                "path": leaf.path,
                "scale": leaf.scale,
                "jbp_vs_r1": leaf.tested_vs_reference,
                "jbp_vs_r2": leaf.tested_vs_second,
                "r1_vs_r2": leaf.reference_spread,
            }
            for leaf in a.leaves
        ],
    }


def _format_limited(args: argparse.Namespace, o: _Outcome) -> str:
    assert o.arbitration is not None
    return "\n".join(
        [
            f"reference-limited: {o.dtype} problem {o.index}, {o.n_params} params: {o.description}",
            f"  reproduce: {_sampler_call(args, o.index, o.dtype)}",
            "  " + str(o.arbitration).replace("\n", "\n  "),
        ]
    )


def _outcome_json(args: argparse.Namespace, o: _Outcome) -> dict[str, Any]:
    return {
        "dtype": o.dtype,
        "arch": o.arch,
        "index": o.index,
        "n_params": o.n_params,
        "description": o.description,
        "max_rel_err": o.rel_err,
        "status": o.status,
        "reproduce": _sampler_call(args, o.index, o.dtype),
        "report": o.details(),
        # The layer whose own rule is wrong (jbp.Report.blame), None if none can be named.
        "blame": None if o.report is None else o.report.blame,
    }


def _worst(outcomes: list[_Outcome]) -> float:
    """The largest error of ``outcomes``, a NaN counted as inf (0 for none)."""
    return max((math.inf if math.isnan(o.rel_err) else o.rel_err for o in outcomes), default=0.0)


def _problems_json(outcomes: list[_Outcome]) -> list[dict[str, Any]]:
    """One record per problem in the order verified: its worst leaf error and the
    worst error of its dtype so far (what the progress line showed after it)."""
    records, worst = [], 0.0
    for o in outcomes:
        worst = max(worst, _worst([o]))
        leaves = 0 if o.report is None else len(o.report.rows)
        records.append(
            {
                "dtype": o.dtype,
                "index": o.index,
                "arch": o.arch,
                "n_params": o.n_params,
                "status": o.status,
                "max_rel_err": o.rel_err,
                "worst_so_far": worst,
                "tolerance": None if o.report is None else o.report.rtol,
                "leaves": leaves,
                "bitwise_leaves": 0 if o.report is None else o.report.n_bitwise,
                "seconds": o.seconds,
            }
        )
    return records


def _verify_dtype(args: argparse.Namespace, dtype: str) -> list[_Outcome]:
    """Problems 0 to ``args.count - 1`` in ``dtype``, with a progress bar on a
    terminal or a line every PROGRESS_EVERY seconds off one."""
    done: list[_Outcome] = []
    with Progress(
        total=args.count,
        label=f"verify {dtype}",
        quiet=args.quiet,
        log_every=PROGRESS_EVERY,
        unit="problems",
    ) as bar:
        for index in range(args.count):
            done.append(_verify_one(args, index, dtype))
            notes = [f"{sum(o.status == FAILED for o in done)} failed"]
            n_limited = sum(o.status == LIMITED for o in done)
            notes += [f"{n_limited} ref-limited"] * bool(n_limited)
            notes.append(f"worst rel err {_worst(done):.1e}")
            bar.update(note=", ".join(notes))
    return done


def _run_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.max_depth is not None and args.min_depth > args.max_depth:
        parser.error(f"--min-depth {args.min_depth} is larger than --max-depth {args.max_depth}")
    if args.loss == "softmax_xent" and args.max_width is not None and args.max_width < 2:
        parser.error("--loss softmax_xent needs at least 2 outputs: use --max-width 2 or more")
    dtypes = tuple(dict.fromkeys(args.dtype))  # keep order, drop repeats
    if "float64" in dtypes or args.finite_differences:
        jax.config.update("jax_enable_x64", True)
    mode = "jit" if args.jit else "eager (no jit)"
    cache_path, cache_text = _cache_dir()
    if not args.quiet:
        acts = ", ".join(args.activations) if args.activations else "all registered"
        archs = ARCHS if args.arch == "all" else (args.arch,)
        limits = ", ".join(
            f"{a} depth {min(args.min_depth, _limits(args, a)[0]) if a == 'mlp' else 1}-"
            f"{_limits(args, a)[0]} width 1-{_limits(args, a)[1]}"
            for a in archs
        )
        print(
            f"jbp verify: {args.count} random architectures per dtype, seed {args.seed}, "
            f"{limits}, loss {args.loss or 'drawn per problem'}, activations {acts}"
        )
        print(
            f"mode {mode}, finite differences {'on' if args.finite_differences else 'off'}, "
            f"matmul precision {PRECISION} (both sides, whatever the default), "
            f"backend {device()}, "
            f"jax {jax.__version__}, python {platform.python_version()}, "
            f"compilation cache {cache_text}"
        )
        sys.stdout.flush()

    outcomes: dict[str, list[_Outcome]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    with _compilation_cache(cache_path):
        for dtype in dtypes:
            start = time.perf_counter()
            outcomes[dtype] = _verify_dtype(args, dtype)
            summaries[dtype] = _dtype_summary(outcomes[dtype], time.perf_counter() - start)
            if args.curvature:
                summaries[dtype]["curvature"] = _curvature_summary(outcomes[dtype])

    print(_format_summary(summaries))
    every = [o for dtype in dtypes for o in outcomes[dtype]]
    failures = [o for o in every if o.status == FAILED]
    limited = [o for o in every if o.status == LIMITED]
    for o in limited:
        print(_format_limited(args, o))
    total = len(every)
    smallest = min(failures, key=lambda o: (o.n_params, o.index)) if failures else None
    took = format_duration(sum(s["seconds"] for s in summaries.values()))
    if smallest is None and not limited:
        print(f"OK: all {total} problems pass ({took})")
    elif smallest is None:
        by_dtype = ", ".join(f"{d}: {summaries[d]['reference_limited']}" for d in dtypes)
        print(
            f"OK: no problem fails: {total - len(limited)} of {total} pass, {len(limited)} "
            f"reference-limited ({by_dtype}) ({took})"
        )
    else:
        by_dtype = ", ".join(f"{d}: {summaries[d]['failed']}" for d in dtypes)
        extra = f", {len(limited)} reference-limited" if limited else ""
        print(f"FAILED: {len(failures)} of {total} problems ({by_dtype}){extra}")
        print(
            f"smallest failing problem: {smallest.dtype} problem {smallest.index}, "
            f"{smallest.n_params} params: {smallest.description}"
        )
        print(f"reproduce: {_sampler_call(args, smallest.index, smallest.dtype)}")
        print(smallest.details())

    if args.json is not None:
        summary = {
            "command": "verify",
            "ok": not failures,
            "count": args.count,
            "dtypes": list(dtypes),
            "seed": args.seed,
            "arch": args.arch,
            "min_depth": args.min_depth,
            "max_depth": args.max_depth,
            "max_width": args.max_width,
            "loss": args.loss,
            "activations": list(args.activations) if args.activations else None,
            "jit": args.jit,
            "finite_differences": args.finite_differences,
            "curvature": args.curvature,
            "precision": PRECISION,  # every check's matmul precision (jbp and references)
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "jbp_version": jbp.__version__,
            "by_dtype": summaries,
            "failures": [_outcome_json(args, o) for o in failures],
            "reference_limited": [_limited_json(args, o) for o in limited],
            "smallest_failure": None if smallest is None else _outcome_json(args, smallest),
            # Per problem, in the order verified: its worst error and its dtype's worst so far.
            "problems": [r for dtype in dtypes for r in _problems_json(outcomes[dtype])],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
            f.write("\n")
    return 1 if failures else 0
