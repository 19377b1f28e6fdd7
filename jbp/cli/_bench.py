"""``jbp bench``: time jbp's gradients and per-example quantities against autodiff."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp

import jbp

from .._bench import (
    BENCH_TARGETS_DP,
    MIN_SAMPLE_S,
    PRECISIONS,
    benchmark_dp,
    environment,
    format_dp_benchmark,
    format_environment,
    format_scaling,
    precision_context,
    timing_method,
)
from .._bench_dots import BENCH_TARGETS_DOTS, benchmark_dots, format_dots_benchmark
from ._args import activation_name, int_at_least, json_safe, names_list

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
LSTM(128, 128), Dense(128, 10) on (B, 32, 32) sequences, B = 32 and 128.

How it times: every function is compiled and warmed up first, then all are
timed interleaved, round by round; one sample is K back-to-back calls with
one block at the end, K calibrated per function so that a sample lasts at
least --sample-ms (5 ms), so that on an accelerator a row measures the
computation, not the dispatch. Prints per call the median and min
milliseconds over the rounds (compile time excluded, reported separately),
the ratio to jax.grad in the same run, XLA's compiled memory estimate (est.
MiB), the device's peak memory (peak MiB: memory_stats()'s
peak_bytes_in_use; none on CPU), K, and the cost-model targets (met or
MISSED). A "dispatch floor" row times a trivial jitted function of the same
arguments the same way: the per-call overhead in every row. The header gives
the device kind, backend, jax and jaxlib versions and the matmul precision.

Default batches are the ones above on CPU and four times as large on an
accelerator (a GPU or TPU backend): MLP 256,1024,4096; CNN and LSTM 128,512;
transformer and llama 64,256; --curvature MLP 1024, CNN 128; --dp MLP 1024,
CNN 128; --dots 1024; --scaling a global batch of 4096 (1024 on CPU).

--precision default|high|highest runs everything (compile and run) under
jax.default_matmul_precision (not given: as JAX has it; at 'default' float32
matmuls use TF32 or bf16 passes on GPU and TPU). --dtype bfloat16 is mixed
precision: float32 params, bfloat16 inputs, every layer computing in
bfloat16 with float32 accumulation (MLP and CNN only).

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

--scaling times data-parallel scaling: the same global batch (--batches, one
value) split over 1, 2, 4, ... of the available devices, params replicated:
jbp.backprop, per_example_norms, clipped_grad and an adam step on the MLP of
--sizes.

--json PATH writes every table in one form: {"schema", "command",
"environment" (device_kind, backend, device_count, jax_version,
jaxlib_version, matmul_precision, ...), "timing", "memory", "runs": [{the
run's fields, "rows": [...], "targets": [...]}]}.

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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of milliseconds, got {text!r}"
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


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
        help="batch sizes (default on CPU 64,256,1024 for the MLP, 32,128 for the CNN and "
        "the LSTM, 16,64 for the transformer and the llama; four times as large on an "
        "accelerator)",
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
        choices=("float32", "float64", "bfloat16"),
        default="float32",
        help="dtype of params and data (default float32); bfloat16: mixed precision, float32 "
        "params and bfloat16 inputs (--arch mlp or cnn)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="matmul precision for compiling and running, jax.default_matmul_precision "
        "(not given: as JAX has it, JAX_DEFAULT_MATMUL_PRECISION or else 'default': TF32 or "
        "bf16 passes for float32 on GPU/TPU, float32 on CPU); the header says which",
    )
    p.add_argument(
        "--sample-ms",
        type=_positive_float,
        default=MIN_SAMPLE_S * 1e3,
        metavar="MS",
        help="shortest timed sample: K back-to-back calls, one block (default 5)",
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
        "--scaling",
        action="store_true",
        help="time data-parallel scaling: one global batch (--batches, one value; default "
        "1024, 4096 on an accelerator) over 1, 2, 4, ... devices, the MLP of --sizes",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write the environment, rows and targets to PATH (every table)",
    )
    p.set_defaults(run=_run_bench, subparser=p)


_MODES = ("curvature", "dp", "dots", "scaling")


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    modes = [m for m in _MODES if getattr(args, m)]
    if len(modes) > 1:
        parser.error(f"give at most one of --curvature, --dp, --dots, --scaling, got {modes}")
    mode = modes[0] if modes else None
    if mode is not None:
        if args.dtype != "float32":
            parser.error(
                f"--{mode} takes --dtype float32 (its rows are float32), got --dtype {args.dtype}"
            )
        if args.only is not None:
            parser.error(f"--{mode} does not take --only")
    if args.dtype == "bfloat16" and args.arch not in (None, "mlp", "cnn"):
        parser.error(
            "--dtype bfloat16 (mixed precision: float32 params, bfloat16 inputs) takes --arch "
            f"mlp or cnn, got --arch {args.arch}"
        )
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    run = {
        None: _run_bench_table,
        "curvature": _run_bench_curvature,
        "dp": _run_bench_dp,
        "dots": _run_bench_dots,
        "scaling": _run_bench_scaling,
    }[mode]
    with precision_context(args.precision):
        env = environment()
        return run(args, parser, env)


def _header(title: str, env: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"{title}; {format_environment(env)}")
    print(timing_method(args.sample_ms / 1e3))
    sys.stdout.flush()


def _describe(arch: str, args: argparse.Namespace) -> str:
    return {
        "cnn": "CNN (32,32,3) conv32-conv64/2-conv64/2-dense10, relu",
        "transformer": "transformer vocab 128, length 64, 128 features, 4 heads, depth 2, gelu, "
        "causal",
        "llama": "llama vocab 256, 128 features, 4 heads, 2 kv heads, depth 2, swiglu 344, "
        "tied embeddings, tokens (B, 64) with a quarter of the positions padding",
        "lstm": "LSTM(32→128, sequences) → LSTM(128→128) → Dense(128→10) on (B, 32, 32)",
    }.get(arch, f"MLP {'-'.join(map(str, args.sizes))}, {args.activation}")


def _dtype_text(dtype: str) -> str:
    if dtype == "bfloat16":
        return "bfloat16 mixed precision (float32 params, bfloat16 inputs)"
    return dtype


def _run_bench_table(args: argparse.Namespace, parser: argparse.ArgumentParser, env: Any) -> int:
    arch = "mlp" if args.arch is None else args.arch
    _header(
        f"jbp bench: {_describe(arch, args)}, softmax_xent, {_dtype_text(args.dtype)}", env, args
    )
    rows = jbp.benchmark(
        args.sizes,
        arch=arch,
        batches=args.batches,
        activation=args.activation,
        dtype=jnp.dtype(args.dtype),
        rounds=args.rounds,
        budget_s=args.budget,
        only=args.only,
        sample_s=args.sample_ms / 1e3,
    )
    print(jbp.format_benchmark(rows))
    targets = {
        "cnn": jbp.BENCH_TARGETS_CNN,
        "transformer": jbp.BENCH_TARGETS_TRANSFORMER,
        "llama": jbp.BENCH_TARGETS_LLAMA,
        "lstm": jbp.BENCH_TARGETS_LSTM,
    }
    checked = jbp.check_targets(rows, targets.get(arch, jbp.BENCH_TARGETS))
    if checked:
        print("\ntargets (ratios measured in this run):")
        print(jbp.format_targets(checked))
    run = {
        "arch": arch,
        "sizes": list(args.sizes) if arch == "mlp" else None,
        "activation": args.activation if arch == "mlp" else None,
        "loss": "softmax_xent",
        "dtype": args.dtype,
        "batches": sorted({r.batch for r in rows}),
    }
    _write_json(args, "bench", env, [_run_record(run, rows, checked)])
    return 0


def _run_bench_curvature(
    args: argparse.Namespace, parser: argparse.ArgumentParser, env: Any
) -> int:
    arch = "mlp" if args.arch is None else args.arch
    if arch not in ("mlp", "cnn"):
        parser.error(f"--curvature takes --arch mlp or cnn, got --arch {arch}")
    what = "MLP 784-512-512-10, relu" if arch == "mlp" else _describe(arch, args)
    _header(f"jbp bench --curvature: {what}, softmax_xent, float32", env, args)
    rows = jbp.benchmark_curvature(
        arch=arch,
        batches=args.batches,
        rounds=args.rounds,
        budget_s=args.budget,
        sample_s=args.sample_ms / 1e3,
    )
    print(jbp.format_benchmark(rows))
    checked = jbp.check_targets(rows, jbp.BENCH_TARGETS_CURVATURE)
    print("\ntargets (ratios measured in this run):")
    print(jbp.format_targets(checked))
    run = {"arch": arch, "loss": "softmax_xent", "dtype": "float32",
           "batches": sorted({r.batch for r in rows})}  # fmt: skip
    _write_json(args, "bench --curvature", env, [_run_record(run, rows, checked)])
    return 0


def _run_bench_dp(args: argparse.Namespace, parser: argparse.ArgumentParser, env: Any) -> int:
    if args.arch not in (None, "mlp", "cnn"):
        parser.error(f"--dp takes --arch mlp or cnn, got --arch {args.arch}")
    archs = ("mlp", "cnn") if args.arch is None else (args.arch,)
    _header("jbp bench --dp: DP-SGD step beside jax.grad steps, softmax_xent, float32, adam",
            env, args)  # fmt: skip
    runs = []
    for arch in archs:
        what = (
            f"MLP {'-'.join(map(str, args.sizes))}, relu"
            if arch == "mlp"
            else "CNN (32,32,3) conv32-conv64/2-conv64/2-dense10, relu"
        )
        print(f"\n{what}")
        results = benchmark_dp(
            arch=arch, sizes=args.sizes, batches=args.batches, rounds=args.rounds,
            budget_s=args.budget, sample_s=args.sample_ms / 1e3,
        )  # fmt: skip
        print(format_dp_benchmark(results))
        checked = [c for r in results for c in jbp.check_targets(r.rows, BENCH_TARGETS_DP)]
        print("\ntargets (ratios measured in this run):")
        print(jbp.format_targets(checked))
        sys.stdout.flush()
        for r in results:
            fields = {k: v for k, v in dataclasses.asdict(r).items() if k != "rows"}
            runs.append(_run_record(fields, r.rows, jbp.check_targets(r.rows, BENCH_TARGETS_DP)))
    _write_json(args, "bench --dp", env, runs)
    return 0


def _run_bench_dots(args: argparse.Namespace, parser: argparse.ArgumentParser, env: Any) -> int:
    if args.arch not in (None, "mlp", "cnn", "transformer"):
        parser.error(f"--dots takes --arch mlp, cnn or transformer, got --arch {args.arch}")
    if args.batches is not None and len(args.batches) != 1:
        parser.error(f"--dots takes one batch size (B training = B query rows), got {args.batches}")
    archs = ("mlp", "cnn", "transformer") if args.arch is None else (args.arch,)
    batch = None if args.batches is None else args.batches[0]
    _header("jbp bench --dots: per_example_dots and the in-run Shapley step, softmax_xent, "
            "float32", env, args)  # fmt: skip
    runs = []
    for arch in archs:
        sys.stdout.flush()
        result = benchmark_dots(
            arch=arch, sizes=args.sizes, batch=batch, query=batch, rounds=args.rounds,
            budget_s=args.budget, sample_s=args.sample_ms / 1e3,
        )  # fmt: skip
        print("\n" + format_dots_benchmark(result))
        checked = jbp.check_targets(result.rows, BENCH_TARGETS_DOTS[arch])
        if checked:
            print("targets (ratios measured in this run):")
            print(jbp.format_targets(checked))
        fields = {k: v for k, v in dataclasses.asdict(result).items() if k != "rows"}
        runs.append(_run_record(fields, result.rows, checked))
    _write_json(args, "bench --dots", env, runs)
    return 0


def _run_bench_scaling(args: argparse.Namespace, parser: argparse.ArgumentParser, env: Any) -> int:
    if args.arch not in (None, "mlp"):
        parser.error(f"--scaling takes --arch mlp, got --arch {args.arch}")
    if args.batches is not None and len(args.batches) != 1:
        parser.error(f"--scaling takes one global batch size, got {args.batches}")
    if args.batches is None:
        batch = 1024 if jax.default_backend() == "cpu" else 4096
    else:
        batch = args.batches[0]
    _header(
        f"jbp bench --scaling: global batch {batch} over 1, 2, 4, ... devices, MLP "
        f"{'-'.join(map(str, args.sizes))}, {args.activation}, softmax_xent, float32",
        env,
        args,
    )
    try:
        rows = jbp.benchmark_scaling(
            args.sizes, batch=batch, activation=args.activation, rounds=args.rounds,
            sample_s=args.sample_ms / 1e3,
        )  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    print(format_scaling(rows))
    run = {"arch": "mlp", "sizes": list(args.sizes), "activation": args.activation,
           "loss": "softmax_xent", "dtype": "float32", "batch": batch}  # fmt: skip
    _write_json(args, "bench --scaling", env, [_run_record(run, rows, [])])
    return 0


#: The form of every table's ``--json``.
JSON_SCHEMA = "jbp.bench/2"


def _run_record(fields: dict[str, Any], rows: Any, checked: Any) -> dict[str, Any]:
    """One benchmark run for ``--json``: its fields, its rows and its checked targets."""
    return {
        **fields,
        "rows": [dataclasses.asdict(row) for row in rows],
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


def _write_json(
    args: argparse.Namespace, command: str, env: dict[str, Any], runs: list[dict[str, Any]]
) -> None:
    """Every table's ``--json``: one schema, the environment block, then the runs."""
    if args.json is None:
        return
    summary = {
        "schema": JSON_SCHEMA,
        "command": command,
        "environment": env,
        "timing": {
            "method": "K back-to-back calls per sample, one block at the end; ms per call",
            "min_sample_ms": args.sample_ms,
            "rounds": args.rounds,
            "budget_s": args.budget,
        },
        "memory": {
            "memory_mib": "XLA's compiled estimate: temporaries + outputs, arguments excluded",
            "peak_mib": "the device's memory_stats() peak_bytes_in_use rise during the first "
            "call; null where the backend reports none (CPU)",
        },
        "runs": runs,
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(json_safe(summary), f, indent=2, allow_nan=False)
        f.write("\n")
