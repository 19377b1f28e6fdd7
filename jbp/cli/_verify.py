"""``jbp verify``: check jbp.backprop against jax.grad on random architectures."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
import traceback
from typing import Any

import jax
import numpy as np

import jbp

from .._progress import Progress, format_duration
from ._args import DTYPES, device, int_at_least, json_safe, loss_name, names_list, table

DEFAULT_COUNT = 100
ARCHS = ("mlp", "cnn", "resnet", "transformer")
# Default (max depth, max width) per family: Dense layers and widths for mlp,
# blocks and channels (or widths) for cnn and resnet.
LIMITS = {"mlp": (6, 32), "cnn": (3, 8), "resnet": (3, 8), "transformer": (2, 8)}


_VERIFY_HELP = """\
Draw random architectures and check jbp.backprop against jax.grad on each with
jbp.verify. Families (--arch): mlp (Dense and Activation layers, any
registered activation, bias on or off, batches of 1-32 or a single example),
cnn (1-D and 2-D convolutions with random kernels, strides, paddings,
dilations and groups, pooling, norm layers, and a Flatten, global-pooling or
feature-map head), resnet (residual and Parallel sum/concat blocks on vectors
or images), transformer (jbp.transformer on integer tokens, or stacks of
attention, Dense and LayerNorm blocks on continuous sequences); all (the
default) takes them in turn. Problem i of a seed is the
same architecture for every dtype: jbp.random_problem(
np.random.default_rng((seed, i)), dtype=..., arch=..., ...).

Mode: by default both gradients run under jax.jit, the way users run them, so
the share of bitwise-identical leaves is that of compiled code. One compile
per gradient per architecture costs about 0.5 s per problem on a 2-core CPU;
--no-jit runs them op by op, which is several times slower for random shapes
(each operation compiles once per new shape) and measures eager numerics.

--curvature also checks every curvature quantity of each problem against its
autodiff reference (jbp.check_curvature: diag_ggn, per_example_diag_ggn,
sqrt_ggn, ggn_vector_product where every layer has a tangent rule,
diag_hessian on Dense/Activation chains). The references cost O(P²), so
with --curvature the mlp family defaults to depth 3 and width 8.

Exit status: 0 if every problem passes, 1 on any mismatch, 2 on bad arguments."""
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
        help="architecture family (default all: mlp, cnn, resnet and transformer in turn)",
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
        help="most Dense layers (mlp, default 6), blocks (cnn, resnet, default 3) or "
        "transformer depth (default 2)",
    )
    p.add_argument(
        "--max-width",
        type=int_at_least(1),
        default=None,
        metavar="W",
        help="largest width (mlp, default 32), channel count (cnn, resnet, default 8) or "
        "vocabulary and width (transformer, default 8)",
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
        help="also check the curvature quantities against autodiff (jbp.check_curvature)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar and no header: print the summary only"
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
    curvature: jbp.CurvatureReport | None = None  # with --curvature

    @property
    def ok(self) -> bool:
        curvature_ok = self.curvature is None or self.curvature.passed
        return self.report is not None and self.report.ok and curvature_ok

    @property
    def rel_err(self) -> float:
        return math.inf if self.report is None else self.report.max_rel_err

    def details(self) -> str:
        text = self.error if self.report is None else str(self.report)
        if self.curvature is not None:
            text += "\ncurvature check:\n" + self.curvature.format()
        return text


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
    start = time.perf_counter()
    report, error = None, ""
    try:
        report = jbp.verify(
            problem.net,
            problem.loss,
            problem.params,
            problem.x,
            problem.y,
            finite_differences=args.finite_differences,
            jit=args.jit,
        )
    except Exception as e:  # a crash on one problem is a failure to report, not a CLI crash
        error = "verification raised:\n" + "".join(traceback.format_exception_only(e)).rstrip()
    curvature = None
    if args.curvature and report is not None:
        try:
            curvature = jbp.check_curvature(
                problem.net, problem.loss, problem.params, problem.x, problem.y
            )
        except Exception as e:
            report, error = (
                None,
                (
                    "curvature check raised:\n"
                    + "".join(traceback.format_exception_only(e)).rstrip()
                ),
            )
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
    )


def _curvature_summary(outcomes: list[_Outcome]) -> dict[str, dict[str, Any]]:
    """Per quantity: problems checked, failed and the worst error."""
    out: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        if o.curvature is None:
            continue
        for row in o.curvature.rows:
            q = out.setdefault(row.quantity, {"checked": 0, "failed": 0, "worst": 0.0})
            q["checked"] += 1
            q["failed"] += int(not row.passed)
            q["worst"] = max(q["worst"], row.error)
    return out


def _dtype_summary(outcomes: list[_Outcome], seconds: float) -> dict[str, Any]:
    reports = [o.report for o in outcomes if o.report is not None]
    leaves = sum(len(r.rows) for r in reports)
    bitwise = sum(r.n_bitwise for r in reports)
    worst = max(outcomes, key=lambda o: o.rel_err if not math.isnan(o.rel_err) else math.inf)
    summary: dict[str, Any] = {
        "tried": len(outcomes),
        "failed": sum(not o.ok for o in outcomes),
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
            "failed": sum(not o.ok for o in mine),
            "worst_rel_err": max(o.rel_err for o in mine),
            "leaves": leaves,
            "bitwise_leaves": bitwise,
            "bitwise_share": bitwise / leaves if leaves else math.nan,
        }
    return out


def _format_by_arch(summaries: dict[str, dict[str, Any]]) -> str:
    rows = [("dtype", "arch", "tried", "failed", "worst rel err", "bitwise leaves")]
    for dtype, s in summaries.items():
        for arch, a in s["by_arch"].items():
            rows.append(
                (
                    dtype,
                    arch,
                    str(a["tried"]),
                    str(a["failed"]),
                    f"{a['worst_rel_err']:.2e}",
                    f"{a['bitwise_leaves']}/{a['leaves']} ({100 * a['bitwise_share']:.1f}%)",
                )
            )
    return table(rows)


def _format_summary(summaries: dict[str, dict[str, Any]]) -> str:
    rows = [
        (
            "dtype",
            "tried",
            "failed",
            "worst rel err",
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
                str(s["failed"]),
                f"{s['worst_rel_err']:.2e}",
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
        for quantity, q in s.get("curvature", {}).items():
            lines.append(
                f"curvature {dtype}: {quantity:<20} checked {q['checked']:>4}, failed "
                f"{q['failed']}, worst rel err {q['worst']:.2e}"
            )
        if "taylor_failed" in s:
            lines.append(
                f"oracles {dtype}: finite differences failed "
                f"{s['finite_differences_failed']}/{s['tried']}, Taylor test failed "
                f"{s['taylor_failed']}/{s['tried']} (lowest order "
                f"{s['taylor_min_order']:.2f})"
            )
    return "\n".join(lines)


def _outcome_json(args: argparse.Namespace, o: _Outcome) -> dict[str, Any]:
    return {
        "dtype": o.dtype,
        "arch": o.arch,
        "index": o.index,
        "n_params": o.n_params,
        "description": o.description,
        "max_rel_err": o.rel_err,
        "reproduce": _sampler_call(args, o.index, o.dtype),
        "report": o.details(),
    }


def _run_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.max_depth is not None and args.min_depth > args.max_depth:
        parser.error(f"--min-depth {args.min_depth} is larger than --max-depth {args.max_depth}")
    if args.loss == "softmax_xent" and args.max_width is not None and args.max_width < 2:
        parser.error("--loss softmax_xent needs at least 2 outputs: use --max-width 2 or more")
    dtypes = tuple(dict.fromkeys(args.dtype))  # keep order, drop repeats
    if "float64" in dtypes or args.finite_differences:
        jax.config.update("jax_enable_x64", True)
    mode = "jit" if args.jit else "eager (no jit)"
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
            f"backend {device()}, "
            f"jax {jax.__version__}, python {platform.python_version()}"
        )
        sys.stdout.flush()

    outcomes: dict[str, list[_Outcome]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for dtype in dtypes:
        start = time.perf_counter()
        done: list[_Outcome] = []
        with Progress(total=args.count, label=f"verify {dtype}", quiet=args.quiet) as bar:
            for index in range(args.count):
                done.append(_verify_one(args, index, dtype))
                failed = sum(not o.ok for o in done)
                bar.update(note=f"{failed} failed" if failed else "")
        outcomes[dtype] = done
        summaries[dtype] = _dtype_summary(done, time.perf_counter() - start)
        if args.curvature:
            summaries[dtype]["curvature"] = _curvature_summary(done)

    print(_format_summary(summaries))
    failures = [o for dtype in dtypes for o in outcomes[dtype] if not o.ok]
    total = sum(len(v) for v in outcomes.values())
    smallest = min(failures, key=lambda o: (o.n_params, o.index)) if failures else None
    if smallest is None:
        print(
            f"OK: all {total} problems pass "
            f"({format_duration(sum(s['seconds'] for s in summaries.values()))})"
        )
    else:
        by_dtype = ", ".join(f"{d}: {summaries[d]['failed']}" for d in dtypes)
        print(f"FAILED: {len(failures)} of {total} problems ({by_dtype})")
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
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
            "jbp_version": jbp.__version__,
            "by_dtype": summaries,
            "failures": [_outcome_json(args, o) for o in failures],
            "smallest_failure": None if smallest is None else _outcome_json(args, smallest),
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
            f.write("\n")
    return 1 if failures else 0
