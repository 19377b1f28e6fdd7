"""Progress (jbp._progress): a tqdm bar on a terminal, plain lines in a log, and
the per-problem figures of ``jbp verify --json``."""

from __future__ import annotations

import io
import json
import math

import pytest

from jbp import _progress
from jbp._progress import Progress, format_duration
from jbp.cli import _verify as verify_cli
from jbp.cli import main


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_tqdm_bar_on_a_terminal_and_erases_it():
    stream = _Terminal()
    items = list(Progress(range(3), label="work", stream=stream, min_interval=0.0, unit="problems"))
    assert items == [0, 1, 2]
    text = stream.getvalue()
    assert "work: 100%|" in text and "3/3 [" in text and "problems/s" in text  # tqdm's meter
    assert text.startswith("\r") and text.endswith("\r")  # redrawn in place, then erased
    assert "\n" not in text
    stream = _Terminal()
    with Progress(total=4, label="verify", stream=stream, min_interval=0.0) as bar:
        bar.update(note="1 failed")
        assert "1/4" in bar.line() and "1 failed" in bar.line() and "25%" in bar.line()
        bar.update(3)
    assert "1 failed" in stream.getvalue() and "4/4" in stream.getvalue()
    assert bar.n == 4
    with pytest.raises(TypeError, match="wraps no iterable"):
        iter(Progress(total=2, stream=stream)).__next__()


def test_progress_writes_plain_lines_off_a_terminal(monkeypatch):
    stream = io.StringIO()
    with Progress(total=3, label="verify", stream=stream, log_every=0.0, unit="problems") as bar:
        bar.update(note="0 failed")
        bar.update(2)
        bar.update(0)  # complete already: no second last line
    assert stream.getvalue().splitlines() == [
        "verify: 1/3 problems (33%), 0 failed, 0s elapsed, ETA 0s",
        "verify: 3/3 problems (100%), 0 failed, done in 0s",
    ]
    # The default: a line every LOG_EVERY (10) seconds, on a simulated clock.
    clock = [0.0]
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    with Progress(total=100, label="epoch 1/2", stream=stream) as bar:
        for t in (5.0, 12.0, 15.0, 23.0, 40.0):
            clock[0] = t
            bar.update(20, note=f"loss {t:.0f}")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines == [
        "epoch 1/2: 40/100 (40%), loss 12, 12s elapsed, ETA 18s",
        "epoch 1/2: 80/100 (80%), loss 23, 23s elapsed, ETA 6s",  # 11 s after the last line
        "epoch 1/2: 100/100 (100%), loss 40, done in 40s",
    ]
    # No plain line when none was due before the count completed (so no last line
    # either), when quiet, or with log_every=None; on a terminal, the bar only.
    for stream, quiet, every in [
        (io.StringIO(), False, 60.0),
        (io.StringIO(), False, None),
        (io.StringIO(), True, 0.0),
        (_Terminal(), True, 0.0),
        (_Terminal(), False, 0.0),
    ]:
        with Progress(total=2, stream=stream, quiet=quiet, log_every=every) as bar:
            clock[0] += 100.0
            bar.update(2)
        assert "\n" not in stream.getvalue()
        assert (stream.getvalue() != "") == (isinstance(stream, _Terminal) and not quiet)
    assert [format_duration(s) for s in (42.4, 185, 3725)] == ["42s", "3m05s", "1h02m"]


def test_verify_json_lists_every_problem_with_the_worst_error_so_far(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(verify_cli.CACHE_ENV, "off")
    monkeypatch.setattr(verify_cli, "PROGRESS_EVERY", 0.0)  # a progress line per problem
    path = tmp_path / "summary.json"
    argv = ["verify", "--count", "3", "--dtype", "float32", "--arch", "mlp", "--max-width", "6"]
    assert main([*argv, "--max-depth", "2", "--json", str(path)]) == 0
    err = capsys.readouterr().err
    problems = json.loads(path.read_text())["problems"]
    assert [(p["dtype"], p["index"], p["arch"]) for p in problems] == [
        ("float32", i, "mlp") for i in range(3)
    ]
    running = 0.0
    for p, line in zip(problems, err.splitlines(), strict=True):
        assert p["status"] == "passed" and 0 <= p["max_rel_err"] <= p["tolerance"]
        running = max(running, p["max_rel_err"])
        assert p["worst_so_far"] == running
        assert 0 <= p["bitwise_leaves"] <= p["leaves"] > 0 and p["n_params"] > 0
        assert math.isfinite(p["seconds"]) and p["seconds"] > 0
        assert f"worst rel err {running:.1e}" in line  # the log line showed the same figure
