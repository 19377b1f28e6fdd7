"""``jbp bench``: time jbp's gradients and per-example quantities against autodiff."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from typing import Any

import jax
import jax.numpy as jnp

import jbp

from .._bench import BENCH_TARGETS_DP, benchmark_dp, format_dp_benchmark
from .._bench_dots import BENCH_TARGETS_DOTS, benchmark_dots, format_dots_benchmark
from ._args import activation_name, device, int_at_least, json_safe, names_list

_BENCH_HELP = """\
Time, side by side and interleaved in one run, jax.grad, jbp.backprop,
vmap(jax.grad) per-example gradients, per_example_grads, norms via
vmap(jax.grad), per_example_norms, sum_grad_squared and clipped_grad on an
MLP (default 784-512-512-10, relu, softmax_xent, float32) at several batch
sizes. --arch cnn times the CNN benchmark instead: (B, 32, 32, 3) images,
Conv 3->32 3x3 SAME relu, Conv 32->64 3x3 stride 2 SAME relu, Conv 64->64 3x3
stride 2 SAME relu, Flatten, Dense 4096->10, B = 32 and 128; --arch
transformer the transformer benchmark: jbp.transformer(vocab=128, length=64,
features=128, heads=4, depth=2, mlp_ratio=4, gelu, causal) on (B, 64) tokens,
B = 16 and 64; --arch llama the llama benchmark: jbp.llama(vocab=256,
features=128, heads=4, kv_heads=2, depth=2, hidden=344, tie_embeddings=True)
on padded batches of (B, 64) tokens (real lengths evenly from 32 to 64, a
quarter of the positions padding, given as a mask, labels -1 there), B = 16
and 64; --arch lstm the LSTM benchmark: LSTM(32, 128, return_sequences=True),
LSTM(128, 128), Dense(128, 10) on (B, 32, 32) sequences, B = 32 and 128. Prints median milliseconds (compile time excluded, reported
separately), the ratio to jax.grad in the same run, XLA's memory estimate,
and the cost-model targets (met or MISSED).

--dp times a DP-SGD step (jbp.make_dp_step, max_norm 1, noise_multiplier 1,
adam) beside a non-private jax.grad step (jbp.make_step with
gradient_source="autodiff", adam) at expected batch E (--batches; default 256
for the MLP, 32 for the CNN), on the MLP (--arch mlp, --sizes) and the
benchmark CNN (--arch cnn); both when --arch is not given. The private step
takes a Poisson batch of jbp.PoissonSampler(N, E) (N = 60000 for the MLP,
50000 for the CNN, random data), padded to the sampler's padded_size (E +
6 sd, printed) with its example mask; the accumulating private step a
logical batch of expected size 4E in 4 physical chunks, beside 4 calls of
the jax.grad step on E rows each. Device steps are timed on batches
drawn beforehand; the host's sampling (numpy) is timed in rows of its own.
Targets: dp step <= 1.15 x jax.grad step, dp step in 4 chunks <= 1.2 x 4
jax.grad steps.

--dots times jbp.per_example_dots of B training against B query examples
(B = 256, or the one --batches value) beside materialising both sides'
per-example gradients with vmap(jax.grad) and multiplying, and the step of
fit(..., shapley=...) with 32 validation rows beside a plain jbp.make_step
(SGD), on the MLP, the CNN and the transformer (--arch picks one). Targets:
per_example_dots <= 0.1 x the materialised route on the MLP; the Shapley step
<= 1.3 x the plain step on the MLP and the CNN.

Exit status: 0 (a missed target is reported, not an error), 2 on bad arguments."""


def _ints(what: str, least_count: int) -> Any:
    """An argparse type for comma-separated positive integers, at least ``least_count``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(s) for s in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} such as 64,256, got {text!r}"
            ) from None
        if len(values) < least_count or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"need at least {least_count} positive {what}, got {text!r}"
            )
        return values

    return parse


def add_bench(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time jbp's gradients and per-example quantities against jax.grad",
        description=_BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--arch",
        choices=("mlp", "cnn", "transformer", "llama", "lstm"),
        default=None,
        help="the MLP of --sizes (default), the benchmark CNN, transformer, llama or LSTM "
        "(with --dp: mlp or cnn; both when not given)",
    )
    p.add_argument(
        "--sizes",
        type=_ints("layer widths", 2),
        default=(784, 512, 512, 10),
        metavar="LIST",
        help="MLP layer widths (default 784,512,512,10)",
    )
    p.add_argument(
        "--batches",
        type=_ints("batch sizes", 1),
        default=None,
        metavar="LIST",
        help="batch sizes (default 64,256,1024 for the MLP, 32,128 for the CNN, 16,64 for "
        "the transformer and the llama)",
    )
    p.add_argument(
        "--activation",
        type=activation_name,
        default="relu",
        metavar="NAME",
        help="hidden activation (default relu)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="dtype of params and data (default float32)",
    )
    p.add_argument(
        "--rounds",
        type=int_at_least(3),
        default=30,
        metavar="N",
        help="interleaved timing rounds per batch size (default 30)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds after which a slow function stops being timed (default 10)",
    )
    p.add_argument(
        "--only",
        type=names_list("function", lambda: jbp.BENCH_FUNCTIONS),
        default=None,
        metavar="LIST",
        help="time only these functions (jax.grad always runs)",
    )
    p.add_argument(
        "--curvature",
        action="store_true",
        help="time the curvature quantities (diag_ggn MC and exact, per_example_diag_ggn, "
        "kfac, ggn_vector_product, diag_hessian) beside their autodiff routes on the MLP "
        "784-512-512-10 (--arch mlp, batch 256) or the benchmark CNN (--arch cnn, batch 32); "
        "--sizes, --activation, --dtype and --only do not apply",
    )
    p.add_argument(
        "--dp",
        action="store_true",
        help="time a DP-SGD step (jbp.make_dp_step on a padded Poisson batch, and in 4 "
        "accumulated chunks) beside jax.grad training steps, on the MLP and the CNN "
        "(--arch picks one); --activation, --dtype, --only and --curvature do not apply",
    )
    p.add_argument(
        "--dots",
        action="store_true",
        help="time per_example_dots of B training against B query examples beside "
        "materialising both sides with vmap(jax.grad), and the in-run Shapley step (32 "
        "validation rows) beside a plain step, on the MLP, the CNN and the transformer "
        "(--arch picks one; --batches the one B, default 256)",
    )
    p.add_argument(
        "--json", metavar="PATH", default=None, help="also write the rows and targets to PATH"
    )
    p.set_defaults(run=_run_bench, subparser=p)


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.dp:
        return _run_bench_dp(args, parser)
    if args.dots:
        return _run_bench_dots(args, parser)
    if args.arch is None:
        args.arch = "mlp"
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    what = {
        "cnn": "CNN (32,32,3) conv32-conv64/2-conv64/2-dense10, relu",
        "transformer": "transformer vocab 128, length 64, 128 features, 4 heads, depth 2, gelu, "
        "causal",
        "llama": "llama vocab 256, 128 features, 4 heads, 2 kv heads, depth 2, swiglu 344, "
        "tied embeddings, tokens (B, 64) with a quarter of the positions padding",
        "lstm": "LSTM(32→128, sequences) → LSTM(128→128) → Dense(128→10) on (B, 32, 32)",
    }.get(args.arch, f"MLP {'-'.join(map(str, args.sizes))}, {args.activation}")
    print(
        f"jbp bench: {what}, softmax_xent, "
        f"{args.dtype}; backend {device()}, jax {jax.__version__}, "
        f"{platform.machine()}, python {platform.python_version()}"
    )
    sys.stdout.flush()
    if args.curvature:
        if args.arch in ("transformer", "llama", "lstm"):
            parser.error("--curvature takes --arch mlp or cnn")
        what = "MLP 784-512-512-10, relu" if args.arch == "mlp" else what
        print(f"curvature rows on the {what}, softmax_xent, float32")
        rows = jbp.benchmark_curvature(
            arch=args.arch, batches=args.batches, rounds=args.rounds, budget_s=args.budget
        )
        print(jbp.format_benchmark(rows))
        checked = jbp.check_targets(rows, jbp.BENCH_TARGETS_CURVATURE)
        print("\ntargets (ratios measured in this run):")
        print(jbp.format_targets(checked))
        return 0
    rows = jbp.benchmark(
        args.sizes,
        arch=args.arch,
        batches=args.batches,
        activation=args.activation,
        dtype=jnp.dtype(args.dtype),
        rounds=args.rounds,
        budget_s=args.budget,
        only=args.only,
    )
    print(jbp.format_benchmark(rows))
    targets = {
        "cnn": jbp.BENCH_TARGETS_CNN,
        "transformer": jbp.BENCH_TARGETS_TRANSFORMER,
        "llama": jbp.BENCH_TARGETS_LLAMA,
        "lstm": jbp.BENCH_TARGETS_LSTM,
    }
    checked = jbp.check_targets(rows, targets.get(args.arch, jbp.BENCH_TARGETS))
    if checked:
        print("\ntargets (ratios measured in this run):")
        print(jbp.format_targets(checked))
    if args.json is not None:
        summary = {
            "command": "bench",
            "arch": args.arch,
            "sizes": list(args.sizes),
            "activation": args.activation,
            "dtype": args.dtype,
            "backend": jax.default_backend(),
            "device": device(),
            "jax_version": jax.__version__,
            "rows": [dataclasses.asdict(r) for r in rows],
            "targets": [
                {
                    "name": t.name,
                    "baseline": t.baseline,
                    "bound": t.bound,
                    "batch": batch,
                    "ratio": ratio,
                    "met": met,
                }
                for t, batch, ratio, met in checked
            ],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
            f.write("\n")
    return 0


def _run_bench_dp(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.curvature or args.only is not None or args.dtype != "float32":
        parser.error("--dp takes neither --curvature, --only nor --dtype")
    if args.arch not in (None, "mlp", "cnn"):
        parser.error("--dp takes --arch mlp or cnn")
    archs = ("mlp", "cnn") if args.arch is None else (args.arch,)
    print(
        f"jbp bench --dp: DP-SGD step beside jax.grad steps, softmax_xent, float32, adam; "
        f"backend {device()}, jax {jax.__version__}, {platform.machine()}, "
        f"python {platform.python_version()}"
    )
    sys.stdout.flush()
    summary: dict[str, Any] = {"command": "bench --dp", "device": device(), "runs": []}
    summary["jax_version"] = jax.__version__
    for arch in archs:
        what = (
            f"MLP {'-'.join(map(str, args.sizes))}, relu"
            if arch == "mlp"
            else "CNN (32,32,3) conv32-conv64/2-conv64/2-dense10, relu"
        )
        print(f"\n{what}")
        results = benchmark_dp(
            arch=arch, sizes=args.sizes, batches=args.batches, rounds=args.rounds,
            budget_s=args.budget,
        )  # fmt: skip
        print(format_dp_benchmark(results))
        checked = [c for r in results for c in jbp.check_targets(r.rows, BENCH_TARGETS_DP)]
        print("\ntargets (ratios measured in this run):")
        print(jbp.format_targets(checked))
        sys.stdout.flush()
        for r in results:
            summary["runs"].append(_run_record(r, jbp.check_targets(r.rows, BENCH_TARGETS_DP)))
    _write_json(args.json, summary)
    return 0


def _run_bench_dots(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.curvature or args.only is not None or args.dtype != "float32":
        parser.error("--dots takes neither --curvature, --only nor --dtype")
    if args.arch not in (None, "mlp", "cnn", "transformer"):
        parser.error("--dots takes --arch mlp, cnn or transformer")
    if args.batches is not None and len(args.batches) != 1:
        parser.error(f"--dots takes one batch size (B training = B query rows), got {args.batches}")
    archs = ("mlp", "cnn", "transformer") if args.arch is None else (args.arch,)
    batch = 256 if args.batches is None else args.batches[0]
    print(
        f"jbp bench --dots: per_example_dots and the in-run Shapley step, softmax_xent, "
        f"float32; backend {device()}, jax {jax.__version__}, {platform.machine()}, "
        f"python {platform.python_version()}"
    )
    summary: dict[str, Any] = {"command": "bench --dots", "device": device(), "runs": []}
    summary["jax_version"] = jax.__version__
    for arch in archs:
        sys.stdout.flush()
        result = benchmark_dots(
            arch=arch, sizes=args.sizes, batch=batch, query=batch, rounds=args.rounds,
            budget_s=args.budget,
        )  # fmt: skip
        print("\n" + format_dots_benchmark(result))
        checked = jbp.check_targets(result.rows, BENCH_TARGETS_DOTS[arch])
        if checked:
            print("targets (ratios measured in this run):")
            print(jbp.format_targets(checked))
        summary["runs"].append(_run_record(result, checked))
    _write_json(args.json, summary)
    return 0


def _run_record(result: Any, checked: Any) -> dict[str, Any]:
    """One benchmark run for ``--json``: its fields, its rows and its checked targets."""
    return {
        **{k: v for k, v in dataclasses.asdict(result).items() if k != "rows"},
        "rows": [dataclasses.asdict(row) for row in result.rows],
        "targets": [
            {"name": t.name, "baseline": t.baseline, "bound": t.bound, "ratio": ratio, "met": met}
            for t, _, ratio, met in checked
        ],
    }


def _write_json(path: str | None, summary: dict[str, Any]) -> None:
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
            f.write("\n")
