"""``jbp bench`` and the benchmark helpers, end to end on a tiny network (no timing asserted)."""

from __future__ import annotations

import json

import pytest

import jbp
from jbp._bench import BENCH_TARGETS_DP, DP_BENCH_FUNCTIONS
from jbp.cli import main


def test_bench_runs_every_function_and_reports_the_targets(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "6,5,3", "--batches", "4,8", "--rounds", "3", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "jbp bench: MLP 6-5-3, relu, softmax_xent, float32" in out
    for name in jbp.BENCH_FUNCTIONS:
        assert out.count(f"  {name} ") == 2, name  # one row per batch size
    assert "targets (ratios measured in this run):" in out
    summary = json.loads(path.read_text())
    assert [r["batch"] for r in summary["rows"]] == [4] * 8 + [8] * 8
    assert {r["name"] for r in summary["rows"]} == set(jbp.BENCH_FUNCTIONS)
    for r in summary["rows"]:
        assert r["median_ms"] > 0 and r["rounds"] >= 3
    base = {r["batch"]: r["median_ms"] for r in summary["rows"] if r["name"] == "jax.grad"}
    for r in summary["rows"]:  # the materialising ones are timed beside jax.grad again
        if r["name"] not in jbp.MATERIALISING:
            assert r["ratio"] == pytest.approx(r["median_ms"] / base[r["batch"]])
        assert r["ratio"] > 0
    # Every per-batch target appears at both batch sizes; the batch-256 one at neither.
    assert len(summary["targets"]) == 2 * sum(t.batch is None for t in jbp.BENCH_TARGETS)


def test_bench_only(capsys):
    assert (
        main(
            [
                "bench",
                "--sizes",
                "4,3",
                "--batches",
                "2",
                "--rounds",
                "3",
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
    ],
)
def test_bench_bad_arguments(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: jbp bench")
    assert message in err


def test_benchmark_rejects_unknown_functions():
    with pytest.raises(ValueError, match=r"unknown benchmark functions \['nope'\]; known: "):
        jbp.benchmark((3, 2), batches=(2,), only=["nope"])


def test_benchmark_scaling_over_simulated_devices():
    rows = jbp.benchmark_scaling((6, 5, 3), batch=8, devices=(1, 2, 4), rounds=3)
    assert [(r.devices, r.name) for r in rows][:4] == [
        (1, "jbp.backprop"), (1, "per_example_norms"), (1, "clipped_grad"),
        (1, "train step (adam)"),
    ]  # fmt: skip
    assert {r.devices for r in rows} == {1, 2, 4} and len(rows) == 12
    for r in rows:
        assert r.median_ms > 0 and r.rounds == 3
        if r.devices == 1:
            assert r.speedup == 1.0
    assert "devices  function" in jbp.format_scaling(rows)
    with pytest.raises(ValueError, match="cannot split a batch of 6 over 4 of the"):
        jbp.benchmark_scaling((6, 5, 3), batch=6, devices=(4,))


def test_bench_cnn_times_the_cnn_rows_and_checks_its_targets(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--arch", "cnn", "--batches", "2", "--rounds", "3", "--json", str(path)]
    assert main([*argv, "--only", "per_example_norms,norms via vmap"]) == 0
    out = capsys.readouterr().out
    assert "jbp bench: CNN (32,32,3) conv32-conv64/2-conv64/2-dense10, relu" in out
    summary = json.loads(path.read_text())
    assert summary["arch"] == "cnn"
    assert [r["name"] for r in summary["rows"]] == [
        "jax.grad",
        "norms via vmap",
        "per_example_norms",
    ]
    assert {(t["name"], t["baseline"]) for t in summary["targets"]} == {
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
    argv = ["bench", "--arch", "transformer", "--batches", "2", "--rounds", "3"]
    assert main([*argv, "--only", "per_example_norms", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "jbp bench: transformer vocab 128, length 64, 128 features, 4 heads" in out
    summary = json.loads(path.read_text())
    assert [r["name"] for r in summary["rows"]] == ["jax.grad", "per_example_norms"]
    assert [(t["name"], t["baseline"]) for t in summary["targets"]] == [
        ("per_example_norms", "jax.grad")
    ]
    assert set(jbp.TRANSFORMER_BENCH_FUNCTIONS) <= set(jbp.BENCH_FUNCTIONS)


def test_bench_curvature_times_every_curvature_row_and_checks_its_targets(capsys):
    argv = ["bench", "--curvature", "--batches", "2", "--rounds", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "curvature rows on the MLP 784-512-512-10" in out
    for name in jbp.CURVATURE_BENCH_FUNCTIONS:
        assert f"  {name} " in out, name
    assert out.count("(target ≤") == len(jbp.BENCH_TARGETS_CURVATURE)
    with pytest.raises(ValueError, match=r"unknown curvature rows \['kfc'\]"):
        jbp.benchmark_curvature(only=["kfc"])


def test_bench_dp_times_the_private_step_and_checks_its_targets(tmp_path, capsys):
    path = tmp_path / "dp.json"
    argv = ["bench", "--dp", "--arch", "mlp", "--sizes", "6,5,3", "--batches", "4"]
    assert main([*argv, "--rounds", "3", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MLP 6-5-3, relu" in out and "expected batch E = 4 of N = 60000" in out
    for name in DP_BENCH_FUNCTIONS:
        assert f"  {name} " in out, name
    assert out.count("(target ≤") == len(BENCH_TARGETS_DP)
    (run,) = json.loads(path.read_text())["runs"]
    assert run["padded_size"] > run["expected_batch"] == 4
    assert run["chunk"] == 4 and run["accumulated_padded_size"] % 4 == 0
    assert run["accumulated_padded_size"] > 4 * run["expected_batch"]
    assert [r["name"] for r in run["rows"]] == list(DP_BENCH_FUNCTIONS)
    assert main(["bench", "--dp", "--arch", "lstm"]) == 2


def test_bench_dots_times_dot_products_and_the_shapley_step(tmp_path, capsys):
    from jbp._bench_dots import DOTS_BENCH_FUNCTIONS

    path = tmp_path / "dots.json"
    argv = ["bench", "--dots", "--arch", "mlp", "--sizes", "6,5,3", "--batches", "4"]
    assert main([*argv, "--rounds", "3", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mlp: B = 4 training rows, B_other = 4 query rows, V = 32 validation" in out
    for name in DOTS_BENCH_FUNCTIONS:
        assert f"  {name} " in out, name
    assert out.count("(target ≤") == 2
    (run,) = json.loads(path.read_text())["runs"]
    assert [r["name"] for r in run["rows"]] == list(DOTS_BENCH_FUNCTIONS)
    assert {t["name"] for t in run["targets"]} == {"per_example_dots", "shapley step"}
    assert main(["bench", "--dots", "--arch", "lstm"]) == 2
    assert main(["bench", "--dots", "--batches", "4,8"]) == 2
