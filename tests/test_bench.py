"""``jbp bench`` and the benchmark helpers, end to end on a tiny network (no timing asserted)."""

from __future__ import annotations

import importlib.metadata
import json
import math

import jax
import jax.numpy as jnp
import pytest

import jbp
from jbp import _bench
from jbp._bench import BENCH_TARGETS_DP, DISPATCH_FLOOR, DP_BENCH_FUNCTIONS
from jbp.cli import main

# Short samples keep K (the back-to-back calls per sample) small in these tests.
FAST = ["--rounds", "3", "--sample-ms", "0.2"]


def _check_environment(summary, precision=None):
    """The JSON's environment block says what JAX says, and the schema is the one;
    without --precision, the precision JAX has (the suite's conftest sets one)."""
    precision = _bench.matmul_precision() if precision is None else precision
    assert summary["schema"] == "jbp.bench/2"
    env = summary["environment"]
    assert env["device_kind"] == jax.devices()[0].device_kind
    assert env["backend"] == jax.default_backend()
    assert env["device_count"] == jax.device_count()
    assert env["jax_version"] == jax.__version__
    assert env["jaxlib_version"] == importlib.metadata.version("jaxlib")
    assert env["matmul_precision"] == precision
    assert summary["timing"]["min_sample_ms"] > 0 and "peak_mib" in summary["memory"]


def _check_rows(rows):
    for r in rows:
        assert r["calls"] >= 1 and r["rounds"] >= 3, r
        assert 0 < r["min_ms"] <= r["median_ms"], r
        if jax.default_backend() == "cpu" and "peak_mib" in r:  # CPU has no memory_stats
            assert r["peak_mib"] is None


def test_bench_runs_every_function_and_reports_the_targets(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "6,5,3", "--batches", "4", *FAST, "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "jbp bench: MLP 6-5-3, relu, softmax_xent, float32; device " in out
    assert f"jax {jax.__version__}, jaxlib " in out
    assert f"matmul precision {_bench.matmul_precision()}," in out
    assert "K back-to-back calls, one block at the end" in out
    for name in [*jbp.BENCH_FUNCTIONS, DISPATCH_FLOOR]:
        assert out.count(f"  {name} ") == 1, name
    assert "targets (ratios measured in this run):" in out
    summary = json.loads(path.read_text())
    _check_environment(summary)
    assert summary["command"] == "bench"
    (run,) = summary["runs"]
    assert run["arch"] == "mlp" and run["sizes"] == [6, 5, 3] and run["dtype"] == "float32"
    assert [r["batch"] for r in run["rows"]] == [4] * 9
    assert [r["name"] for r in run["rows"]] == [*jbp.BENCH_FUNCTIONS, DISPATCH_FLOOR]
    _check_rows(run["rows"])
    base = {r["batch"]: r["median_ms"] for r in run["rows"] if r["name"] == "jax.grad"}
    for r in run["rows"]:  # the materialising ones are timed beside jax.grad again
        if r["name"] not in jbp.MATERIALISING:
            assert r["ratio"] == pytest.approx(r["median_ms"] / base[r["batch"]])
        assert r["ratio"] > 0
    # Every per-batch target appears; the batch-256 one does not.
    assert len(run["targets"]) == sum(t.batch is None for t in jbp.BENCH_TARGETS)
    assert {t["batch"] for t in run["targets"]} == {4}


def test_bench_precision_and_bfloat16_mixed_precision(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "6,5,3", "--batches", "4", "--dtype", "bfloat16"]
    argv += ["--precision", "default", "--only", "jbp.backprop", *FAST, "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bfloat16 mixed precision (float32 params, bfloat16 inputs)" in out
    assert "matmul precision default," in out
    summary = json.loads(path.read_text())
    _check_environment(summary, "default")
    (run,) = summary["runs"]
    assert run["dtype"] == "bfloat16"
    assert [r["name"] for r in run["rows"]] == ["jax.grad", "jbp.backprop", DISPATCH_FLOOR]
    before = _bench.matmul_precision()
    with _bench.precision_context("high"):
        assert _bench.matmul_precision() == "high"
    assert _bench.matmul_precision() == before  # the context is left


def test_bench_only(capsys):
    assert (
        main(
            [
                "bench",
                "--sizes",
                "4,3",
                "--batches",
                "2",
                *FAST,
                "--only",
                "per_example_norms",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "per_example_norms" in out and "jax.grad" in out
    assert "clipped_grad" not in out


def test_check_targets_uses_ratios_of_the_same_batch():
    rows = [
        jbp.BenchRow(64, "jax.grad", 0.0, 10.0, 1.0, 0.0, 3),
        jbp.BenchRow(64, "per_example_norms", 0.0, 7.0, 0.7, 0.0, 3),
        jbp.BenchRow(128, "jax.grad", 0.0, 20.0, 1.0, 0.0, 3),
        jbp.BenchRow(128, "per_example_norms", 0.0, 18.0, 0.9, 0.0, 3),
    ]
    target = jbp.BenchTarget("per_example_norms", "jax.grad", 0.8)
    checked = jbp.check_targets(rows, [target])
    assert [(b, round(r, 6), met) for _, b, r, met in checked] == [
        (64, 0.7, True),
        (128, 0.9, False),
    ]
    text = jbp.format_targets(checked)
    assert "batch    64: per_example_norms / jax.grad = 0.700 (target ≤ 0.8) met" in text
    assert "batch   128: per_example_norms / jax.grad = 0.900 (target ≤ 0.8) MISSED" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "5"], "argument --sizes: need at least 2 positive layer widths, got '5'"),
        (["--batches", "0,3"], "argument --batches: need at least 1 positive batch sizes"),
        (["--sizes", "a,b"], "expected comma-separated layer widths such as 64,256, got 'a,b'"),
        (["--only", "nope"], "unknown function 'nope'; known functions: jax.grad, "),
        (["--rounds", "2"], "argument --rounds: must be at least 3, got 2"),
        (["--activation", "relu,tanh"], "unknown activation 'relu,tanh'; known: "),
        (
            ["--precision", "fast"],
            "argument --precision: invalid choice: 'fast' (choose from 'default', 'high', "
            "'highest')",
        ),
        (
            ["--dtype", "int8"],
            "argument --dtype: invalid choice: 'int8' (choose from 'float32', 'float64', "
            "'bfloat16')",
        ),
        (
            ["--dtype", "bfloat16", "--arch", "lstm"],
            "--dtype bfloat16 (mixed precision: float32 params, bfloat16 inputs) takes --arch "
            "mlp or cnn, got --arch lstm",
        ),
        (
            ["--curvature", "--dtype", "bfloat16"],
            "--curvature takes --dtype float32 (its rows are float32), got --dtype bfloat16",
        ),
        (["--dp", "--dtype", "float64"], "--dp takes --dtype float32 (its rows are float32)"),
        (["--sample-ms", "0"], "argument --sample-ms: must be a positive number, got '0'"),
        (["--sample-ms", "x"], "argument --sample-ms: expected a number of milliseconds, got 'x'"),
        (["--dp", "--dots"], "give at most one of --curvature, --dp, --dots, --scaling, got"),
        (["--scaling", "--batches", "4,8"], "--scaling takes one global batch size, got (4, 8)"),
        (["--scaling", "--arch", "cnn"], "--scaling takes --arch mlp, got --arch cnn"),
        (["--curvature", "--arch", "lstm"], "--curvature takes --arch mlp or cnn, got --arch lstm"),
        (["--curvature", "--only", "jax.grad"], "--curvature does not take --only"),
    ],
)
def test_bench_bad_arguments(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: jbp bench")
    assert message in err


def test_benchmark_rejects_unknown_functions_precisions_and_dtypes():
    with pytest.raises(ValueError, match=r"unknown benchmark functions \['nope'\]; known: "):
        jbp.benchmark((3, 2), batches=(2,), only=["nope"])
    bad_precision = r"`precision` must be one of 'default', 'high', 'highest', got 'fast'"
    for bench in (jbp.benchmark, jbp.benchmark_curvature, jbp.benchmark_dp):
        with pytest.raises(ValueError, match=bad_precision):
            bench(batches=(2,), precision="fast")
    with pytest.raises(ValueError, match=bad_precision):
        jbp.benchmark_scaling((3, 2), batch=2, precision="fast")
    with pytest.raises(ValueError, match=r"`dtype` must be one of float32, float64, bfloat16, "):
        jbp.benchmark((3, 2), batches=(2,), dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"`dtype` must be one of .*, got 'float8'"):
        jbp.benchmark((3, 2), batches=(2,), dtype="float8")
    with pytest.raises(ValueError, match=r"`dtype` bfloat16 \(mixed precision: float32 params, "
                       r"bfloat16 inputs\) is for arch 'mlp' and 'cnn', got arch 'llama'"):  # fmt: skip
        jbp.benchmark(arch="llama", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"`dtype` of benchmark_scaling must be float32 or "):
        jbp.benchmark_scaling((3, 2), batch=2, dtype=jnp.bfloat16)
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"`dtype` float64 needs jax_enable_x64"):
            jbp.benchmark((3, 2), batches=(2,), dtype=jnp.float64)


def test_calls_per_sample_peak_memory_and_default_batches(monkeypatch):
    """K is at least 1 and held outputs are capped; the device peak is the rise of
    peak_bytes_in_use over bytes_in_use, NaN under an earlier high-water mark."""
    out = jnp.zeros(100, jnp.float32)  # 400 bytes per call
    assert _bench.calibrate_calls(lambda: out, sample_s=1e-4) >= 1
    monkeypatch.setattr(_bench, "HELD_BYTES", 1000)
    assert _bench.calibrate_calls(lambda: out, sample_s=10.0) == 2  # 2 × 400 ≤ 1000
    stats = iter(
        [
            {"bytes_in_use": 50, "peak_bytes_in_use": 100},  # before a
            {"bytes_in_use": 50, "peak_bytes_in_use": 50 + 3 * 2**20},  # after a
            {"bytes_in_use": 50, "peak_bytes_in_use": 50 + 3 * 2**20},  # before b
            {"bytes_in_use": 50, "peak_bytes_in_use": 50 + 3 * 2**20},  # after b: no rise
        ]
    )
    monkeypatch.setattr(_bench, "_memory_stats", lambda: next(stats))
    monkeypatch.setattr(_bench, "_memory_mib", lambda c: c)  # the estimate orders the calls
    peaks = _bench.warm_up({"b": lambda: out, "a": lambda: out}, {"a": 1.0, "b": 2.0})
    assert peaks["a"] == 3.0 and math.isnan(peaks["b"])
    assert _bench.default_batches("mlp", backend="cpu") == (64, 256, 1024)
    assert _bench.default_batches("mlp", backend="gpu") == (256, 1024, 4096)
    assert _bench.default_batches("cnn", "curvature", backend="tpu") == (128,)


def test_bench_scaling_over_simulated_devices(tmp_path, capsys):
    path = tmp_path / "scaling.json"
    argv = ["bench", "--scaling", "--sizes", "6,5,3", "--batches", "8", *FAST]
    assert main([*argv, "--json", str(path)]) == 0
    assert (
        "jbp bench --scaling: global batch 8 over 1, 2, 4, ... devices" in capsys.readouterr().out
    )
    summary = json.loads(path.read_text())
    _check_environment(summary)
    (run,) = summary["runs"]
    rows = run["rows"]
    names = ["jbp.backprop", "per_example_norms", "clipped_grad", "train step (adam)"]
    assert [r["name"] for r in rows][:5] == [*names, DISPATCH_FLOOR]
    assert [r["devices"] for r in rows] == [n for n in (1, 2, 4) for _ in range(5)]
    _check_rows(rows)
    for r in rows:
        if r["devices"] == 1:
            assert r["speedup"] == 1.0
    with pytest.raises(ValueError, match="cannot split a batch of 6 over 4 of the"):
        jbp.benchmark_scaling((6, 5, 3), batch=6, devices=(4,))
    assert main([*argv[:-2], "--batches", "6"]) == 2  # 6 over 4 devices


def test_bench_cnn_times_the_cnn_rows_and_checks_its_targets(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--arch", "cnn", "--batches", "2", *FAST, "--json", str(path)]
    assert main([*argv, "--only", "per_example_norms,norms via vmap"]) == 0
    out = capsys.readouterr().out
    assert "jbp bench: CNN (32,32,3) conv32-conv64/2-conv64/2-dense10, relu" in out
    (run,) = json.loads(path.read_text())["runs"]
    assert run["arch"] == "cnn" and run["sizes"] is None
    assert [r["name"] for r in run["rows"]] == [
        "jax.grad",
        "norms via vmap",
        "per_example_norms",
        DISPATCH_FLOOR,
    ]
    assert {(t["name"], t["baseline"]) for t in run["targets"]} == {
        ("per_example_norms", "jax.grad"),
        ("per_example_norms", "norms via vmap"),
    }
    assert set(jbp.CNN_BENCH_FUNCTIONS) <= set(jbp.BENCH_FUNCTIONS)
    assert {t.name for t in jbp.BENCH_TARGETS_CNN} <= set(jbp.CNN_BENCH_FUNCTIONS)


def test_bench_arch_is_checked():
    with pytest.raises(
        ValueError,
        match=r"`arch` must be .mlp., .cnn., .transformer., .llama. or .lstm., got .gpt.",
    ):
        jbp.benchmark(arch="gpt")


def test_bench_transformer_times_tokens_and_checks_its_targets(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--arch", "transformer", "--batches", "2", *FAST]
    assert main([*argv, "--only", "per_example_norms", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "jbp bench: transformer vocab 128, length 64, 128 features, 4 heads" in out
    (run,) = json.loads(path.read_text())["runs"]
    assert [r["name"] for r in run["rows"]] == ["jax.grad", "per_example_norms", DISPATCH_FLOOR]
    assert [(t["name"], t["baseline"]) for t in run["targets"]] == [
        ("per_example_norms", "jax.grad")
    ]
    assert set(jbp.TRANSFORMER_BENCH_FUNCTIONS) <= set(jbp.BENCH_FUNCTIONS)


def test_bench_curvature_times_every_curvature_row_and_checks_its_targets(tmp_path, capsys):
    path = tmp_path / "curvature.json"
    argv = ["bench", "--curvature", "--batches", "2", *FAST, "--precision", "high"]
    assert main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "jbp bench --curvature: MLP 784-512-512-10, relu, softmax_xent, float32" in out
    assert "matmul precision high" in out
    for name in [*jbp.CURVATURE_BENCH_FUNCTIONS, DISPATCH_FLOOR]:
        assert f"  {name} " in out, name
    assert out.count("(target ≤") == len(jbp.BENCH_TARGETS_CURVATURE)
    summary = json.loads(path.read_text())
    _check_environment(summary, "high")
    assert summary["command"] == "bench --curvature"
    (run,) = summary["runs"]
    assert [r["name"] for r in run["rows"]] == [*jbp.CURVATURE_BENCH_FUNCTIONS, DISPATCH_FLOOR]
    _check_rows(run["rows"])
    assert len(run["targets"]) == len(jbp.BENCH_TARGETS_CURVATURE)
    with pytest.raises(ValueError, match=r"unknown curvature rows \['kfc'\]"):
        jbp.benchmark_curvature(only=["kfc"])


def test_bench_dp_times_the_private_step_and_checks_its_targets(tmp_path, capsys):
    path = tmp_path / "dp.json"
    argv = ["bench", "--dp", "--arch", "mlp", "--sizes", "6,5,3", "--batches", "4"]
    assert main([*argv, *FAST, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MLP 6-5-3, relu" in out and "expected batch E = 4 of N = 60000" in out
    for name in [*DP_BENCH_FUNCTIONS, DISPATCH_FLOOR]:
        assert f"  {name} " in out, name
    assert out.count("(target ≤") == len(BENCH_TARGETS_DP)
    summary = json.loads(path.read_text())
    _check_environment(summary)
    (run,) = summary["runs"]
    assert run["padded_size"] > run["expected_batch"] == 4
    assert run["chunk"] == 4 and run["accumulated_padded_size"] % 4 == 0
    assert run["accumulated_padded_size"] > 4 * run["expected_batch"]
    assert [r["name"] for r in run["rows"]] == [*DP_BENCH_FUNCTIONS, DISPATCH_FLOOR]
    assert main(["bench", "--dp", "--arch", "lstm"]) == 2


def test_bench_dots_times_dot_products_and_the_shapley_step(tmp_path, capsys):
    from jbp._bench_dots import DOTS_BENCH_FUNCTIONS

    path = tmp_path / "dots.json"
    argv = ["bench", "--dots", "--arch", "mlp", "--sizes", "6,5,3", "--batches", "4"]
    assert main([*argv, *FAST, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mlp: B = 4 training rows, B_other = 4 query rows, V = 32 validation" in out
    for name in DOTS_BENCH_FUNCTIONS:
        assert f"  {name} " in out, name
    assert out.count("(target ≤") == 2
    summary = json.loads(path.read_text())
    _check_environment(summary)
    (run,) = summary["runs"]
    assert [r["name"] for r in run["rows"]] == [*DOTS_BENCH_FUNCTIONS, DISPATCH_FLOOR]
    assert {t["name"] for t in run["targets"]} == {"per_example_dots", "shapley step"}
    assert main(["bench", "--dots", "--arch", "lstm"]) == 2
    assert main(["bench", "--dots", "--batches", "4,8"]) == 2
