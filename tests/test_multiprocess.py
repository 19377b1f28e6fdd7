"""Two processes, two CPU devices each, one mesh: ``jbp train`` as a multi-host run would go.

Each process is started with ``--coordinator/--num-processes/--process-id`` (so
``jax.distributed.initialize`` with gloo collectives on CPU). Only process 0
prints and writes the run folder; the result equals the one-process run. Both
runs are pinned to the CPU (``JAX_PLATFORMS=cpu`` for the two processes, the
CPU as default device for the one in this process), so a GPU/TPU machine runs
the same test; the processes inherit conftest's XLA_PYTHON_CLIENT_PREALLOCATE.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import jax
import pytest

from jbp.cli import main

ARGS = ["train", "--data", "moons", "--hidden", "8", "--epochs", "2", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _accuracy(text: str) -> str:
    match = re.search(r"backprop: test accuracy (\d+\.\d\d% \(\d+/\d+\))", text)
    assert match, text
    return match.group(1)


def test_two_processes_train_like_one(tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each process: 2 devices
    env["JAX_PLATFORMS"] = "cpu"  # simulated hosts, whatever accelerator this machine has
    port = _free_port()
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jbp", *ARGS, "--devices", "4", "--run-dir", str(run_dir),
             "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(2)
    ]  # fmt: skip
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-process run did not finish in 240 s")
        assert p.returncode == 0, err
        outs.append(out)
    with jax.default_device(jax.devices("cpu")[0]):
        assert main(ARGS) == 0
    one_process = _accuracy(capsys.readouterr().out)
    assert _accuracy(outs[0]) == one_process
    assert "test accuracy" not in outs[1]  # process 1 prints nothing
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # written once, by process 0
    assert (run_dir / "checkpoint.npz").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--coordinator", "localhost:1"], "--coordinator, --num-processes and --process-id go together"),
        (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id 2 must be below --num-processes 2"),
        (["--distributed", "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "0"],
         "--distributed reads the cluster's settings"),
        (["--devices", "3", "--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "0"],
         "--devices 3 does not split over 2 processes"),
    ],
)  # fmt: skip
def test_distributed_argument_errors(capsys, argv, message):
    assert main([*ARGS, *argv]) == 2
    assert message in capsys.readouterr().err
