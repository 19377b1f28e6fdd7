"""experiments/gpu_check.py --quick: every stage runs at toy size and lands in the summary.

About a minute on an idle 2-core CPU (seven processes, each starting JAX and
compiling), so it is marked slow: ``pytest -m slow tests/test_gpu_check.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "gpu_check.py"
STAGES = ("env", "grads", "conv", "bench", "verify", "train", "tests")


@pytest.mark.slow
def test_quick_mode_writes_a_summary_with_every_stage(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for stage in STAGES:
        assert f"\n## {stage}\n\nstatus ok, " in summary, stage
        assert stages[stage]["status"] == "ok", stages[stage]
    env = stages["env"]["result"]
    assert env["backend"] == jax.default_backend() and env["jax"] == jax.__version__
    assert env["jaxlib"]
    assert env["matmul_rel_err"]["highest"] < 1e-5  # "highest": float32 matmuls in float32
    # Every architecture: jbp agrees with autodiff and with the float64 reference.
    grads = stages["grads"]["result"]["rows"]
    assert [r["arch"] for r in grads] == ["mlp", "cnn", "transformer", "llama", "lstm"]
    for row in grads:
        for prec in ("default", "highest") if row["arch"] == "mlp" else ("default",):
            figures = row[prec]
            for key in ("jbp_vs_autodiff", "jbp_vs_float64", "autodiff_vs_float64"):
                assert 0 <= figures[key] <= 1e-4, (row["arch"], prec, key, figures)
    conv = stages["conv"]["result"]["rows"]
    assert {r["function"] for r in conv} >= {"jbp δ rule (input gradient)", "jbp.backprop"}
    for row in conv:
        assert row["convolution_ops"] >= 1, row
        if row["function"].startswith("jbp"):  # the δ rule's point: no negative padding
            assert not row["negative_padding"], row
        assert math.isfinite(row["ms"]) and row["ms"] > 0
    for run in stages["bench"]["result"]["runs"]:
        names = {r["name"] for r in run["rows"]}
        assert {"jax.grad", "jbp.backprop"} <= names, run
        assert run["environment"]["backend"] == env["backend"]
    verify = stages["verify"]["result"]["by_dtype"]["float32"]
    assert verify["tried"] == verify["passed"] == 2
    epochs = stages["train"]["result"]["epochs"]
    assert len(epochs) == 2 and all(e["ms_per_step"] > 0 for e in epochs)
    counts = stages["tests"]["result"]["counts"]
    assert counts["passed"] == counts["tests"] >= 1
    # Every section carries the device and versions.
    assert summary.count(
        f"{env['device_kind']} ({env['backend']}), jax {env['jax']}, jaxlib {env['jaxlib']}"
    ) >= len(STAGES)
