"""What a first accelerator run must tell, in one go, into one folder.

    python experiments/gpu_check.py [--quick] [--out DIR] [--stages LIST] [--deadline S]

Seven stages, each with its own time budget; a stage that fails or runs out of
time is recorded as such and the next one runs:

  env      device kind, backend, device count, jax/jaxlib/jbp versions, the
           configured float32 matmul precision and the one measured (a float32
           matmul at the default and at "highest" precision against float64)
  grads    per architecture (MLP, CNN, transformer, llama, LSTM; float32):
           jbp.backprop against autodiff (jax.grad), and both against a float64
           reference (the float32 problem upcast, x64), at the default and at the
           "highest" matmul precision (no float64 on a TPU: noted, skipped)
  conv     which kernels XLA picks for jbp's conv δ rule (input gradient), its
           filter gradient and the whole CNN gradient, beside autodiff's: the
           cuDNN custom calls (``__cudnn$convBackwardInput``, ...) or plain
           ``convolution`` ops (with any negative padding) of the optimised HLO,
           and the time of each function
  bench    ``jbp bench --json`` on the MLP, the CNN, the transformer and the
           curvature quantities at jbp bench's default batches (on an accelerator
           four times the CPU ones: MLP up to 4096), then the MLP at "highest" and
           in bfloat16 mixed precision: times (K back-to-back calls per sample) and
           ratios to jax.grad, with bench's own environment record
  verify   ``jbp verify --json`` (the default run): passed, reference-limited,
           failed, worst errors
  train    ``jbp train`` on digits (a short run): ms per step per epoch
  tests    pytest on a few fast test files: passed, failed, skipped

The folder (default ``experiments/out/gpu_check/<UTC timestamp>/``) gets
``summary.md`` (every figure with the device, versions and precision),
``summary.json`` (every stage's record), each stage's JSON and each command's
output. The full run is sized to stay under 8 minutes on one H100 (``--deadline``,
default 470 s, caps the sum of the stages' budgets); ``--quick`` runs every stage
at toy size (a CPU check of the script itself, about a minute on 2 cores).

Stages that need JAX run in child processes (``--child STAGE``), the CLI
stages as ``python -m jbp ...``: this process never starts a backend, so each
child has the accelerator's memory to itself, and a crash stays in its stage.
``JAX_DEFAULT_MATMUL_PRECISION`` is removed from the children's environment, so
"default" is the device's own default (TF32 for float32 on Ampere and Hopper).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

STAGES = ("env", "grads", "conv", "bench", "verify", "train", "tests")
CHILD_STAGES = ("env", "grads", "conv")  # run in-process in a child (they need JAX)
# Seconds per stage in the full run (an H100 run is meant to take well under them)
# and in --quick (toy sizes: a cap only).
BUDGETS = {
    "env": 45,
    "grads": 75,
    "conv": 40,
    "bench": 170,
    "verify": 120,
    "train": 40,
    "tests": 45,
}
QUICK_BUDGETS = dict.fromkeys(STAGES, 90)
DEADLINE = 470.0  # seconds for the whole full run: 8 minutes less a margin
QUICK_DEADLINE = 300.0
# A few fast, device-agnostic test files (each well under a minute on a CPU).
TEST_FILES = ("tests/test_progress.py", "tests/test_errors.py", "tests/test_layer_errors.py")
QUICK_TESTS = ("tests/test_progress.py", "-k", "plain_lines")
ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("default", "highest")


# --- helpers shared by the parent and the children ----------------------------


def _json_safe(value: Any) -> Any:
    """NaN and infinities as strings (strict JSON has neither); numpy scalars as Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JAX_DEFAULT_MATMUL_PRECISION", None)  # "default" is the device's own
    env["JBP_XLA_CACHE"] = "off"  # jbp verify compiles afresh, keeps nothing in ~/.cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(cmd: Sequence[str], timeout: float, log: Path) -> dict[str, Any]:
    """Run ``cmd`` in its own process group with stdout and stderr into ``log``;
    on timeout the whole group (its own children too) is ended."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=_child_env(),
            start_new_session=True,
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    text = log.read_text(encoding="utf-8", errors="replace")
    return {
        "command": shlex.join(cmd),
        "returncode": rc,
        "timed_out": timed_out,
        "seconds": time.perf_counter() - started,
        "log": log.name,
        "tail": text[-2000:],
    }


def _jbp(*args: str) -> list[str]:
    return [sys.executable, "-m", "jbp", *args]


# --- child stages (JAX in this process) ---------------------------------------


ZERO_ULPS = 100  # jbp.compare's rule: a leaf this many float32 ulps of the largest is zero


def _leaf_errors(tested: Any, reference: Any) -> tuple[float, str]:
    """The worst leaf error and its leaf, by jbp.compare's measure for a float32
    problem: max|t − r| / max|r|, where a leaf whose reference is zero to
    float32 round-off (max|r| ≤ 100 float32 ulps of the largest leaf's; e.g. the
    key bias of attention, whose exact gradient is 0) is measured against the
    largest leaf's scale; NaN or Inf: inf."""
    import jax
    import numpy as np

    flat_t = jax.tree_util.tree_flatten_with_path(tested)[0]
    refs = [np.asarray(r, np.float64) for r in jax.tree_util.tree_leaves(reference)]
    scales = [float(np.max(np.abs(r))) if r.size else 0.0 for r in refs]
    finite = [x for x in scales if math.isfinite(x)]
    largest = max(finite, default=0.0)
    eps = float(np.finfo(np.float32).eps)
    worst, where = 0.0, ""
    for (path, t), r, scale in zip(flat_t, refs, scales, strict=True):
        t64 = np.asarray(t, np.float64)
        diff = float(np.max(np.abs(t64 - r))) if r.size else 0.0
        if scale <= ZERO_ULPS * eps * largest:
            scale = largest
        if not (math.isfinite(diff) and math.isfinite(scale)):
            err = math.inf
        elif scale > 0:
            err = diff / scale
        else:
            err = 0.0 if diff == 0 else math.inf
        if err > worst or not where:
            worst, where = max(worst, err), jax.tree_util.keystr(path)
    return worst, where


def _up(t: Any) -> Any:
    """A float array as float64 (exactly); integer tokens and labels as they are."""
    import numpy as np

    return t.astype(np.float64) if np.issubdtype(t.dtype, np.floating) else t


def _precision(name: str) -> Any:
    import jax

    return contextlib.nullcontext() if name == "default" else jax.default_matmul_precision(name)


def _environment() -> dict[str, Any]:
    """Device, versions and the matmul precision, configured and measured."""
    import jax
    import jaxlib
    import numpy as np

    import jbp

    dev = jax.devices()[0]
    env: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jbp": jbp.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        # None: the backend's own default (TF32 for float32 on Ampere/Hopper GPUs).
        "matmul_precision_config": getattr(jax.config, "jax_default_matmul_precision", None),
        "x64": bool(getattr(jax.config, "jax_enable_x64", False)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    with contextlib.suppress(Exception):
        stats = dev.memory_stats()
        if stats:
            env["memory_bytes_limit"] = stats.get("bytes_limit")
    # The precision a float32 matmul gets: its error against float64 (float32
    # round-off is about 1e-7 here, TF32 about 1e-3, one bfloat16 pass about 1e-2).
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    b = rng.standard_normal((512, 512)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    measured = {}
    for name in PRECISIONS:
        with _precision(name):
            got = np.asarray(jax.jit(lambda x, y: x @ y)(a, b), np.float64)
        measured[name] = float(np.max(np.abs(got - exact)) / np.max(np.abs(exact)))
    env["matmul_rel_err"] = measured
    env["matmul_precision_effective"] = (
        "float32" if measured["default"] < 1e-5 else "reduced (TF32 or bfloat16 passes)"
    )
    return env


def _architectures(quick: bool) -> dict[str, tuple[Any, Callable[[Any], tuple[Any, Any]]]]:
    """name -> (net, make(rng) -> (x, y)); float32 problems, softmax_xent."""
    import numpy as np

    import jbp

    def images(b: int, shape: tuple[int, ...], classes: int) -> Callable[[Any], Any]:
        return lambda rng: (
            rng.standard_normal((b, *shape)).astype(np.float32),
            rng.integers(0, classes, b).astype(np.int32),
        )

    def tokens(b: int, t: int, vocab: int) -> Callable[[Any], Any]:
        return lambda rng: (
            rng.integers(0, vocab, (b, t)).astype(np.int32),
            rng.integers(0, vocab, (b, t)).astype(np.int32),
        )

    if quick:
        return {
            "mlp": (jbp.mlp([8, 8, 4], activation="relu"), images(4, (8,), 4)),
            "cnn": (
                jbp.Sequential(
                    [
                        jbp.Conv(3, 4, (3, 3), "relu"),
                        jbp.Conv(4, 4, (3, 3), "relu", stride=2),
                        jbp.Flatten(),
                        jbp.Dense(64, 3),
                    ]
                ),
                images(2, (8, 8, 3), 3),
            ),
            "transformer": (jbp.transformer(16, 8, 8, 2, 1), tokens(2, 8, 16)),
            "llama": (jbp.llama(16, 8, 2, 1, kv_heads=1, hidden=8), tokens(2, 8, 16)),
            "lstm": (
                jbp.Sequential([jbp.LSTM(4, 8), jbp.Dense(8, 3)]),
                images(2, (5, 4), 3),
            ),
        }
    return {  # the benchmark networks (jbp bench --arch ...)
        "mlp": (jbp.mlp([784, 512, 512, 10], activation="relu"), images(256, (784,), 10)),
        "cnn": (
            jbp.Sequential(
                [
                    jbp.Conv(3, 32, (3, 3), "relu"),
                    jbp.Conv(32, 64, (3, 3), "relu", stride=2),
                    jbp.Conv(64, 64, (3, 3), "relu", stride=2),
                    jbp.Flatten(),
                    jbp.Dense(4096, 10),
                ]
            ),
            images(64, (32, 32, 3), 10),
        ),
        "transformer": (jbp.transformer(128, 64, 128, 4, 2), tokens(16, 64, 128)),
        "llama": (jbp.llama(256, 128, 4, 2, kv_heads=2, hidden=344), tokens(16, 64, 256)),
        "lstm": (
            jbp.Sequential(
                [jbp.LSTM(32, 128, return_sequences=True), jbp.LSTM(128, 128), jbp.Dense(128, 10)]
            ),
            images(32, (32, 32), 10),
        ),
    }


def _stage_grads(quick: bool, save: Callable[[dict[str, Any]], None]) -> None:
    """jbp against autodiff, both against float64, per architecture and precision;
    ``save`` gets the record after every architecture (a timeout keeps those done)."""
    import jax
    import numpy as np

    tpu = jax.default_backend() == "tpu"
    rows: list[dict[str, Any]] = []
    record = {
        "loss": "softmax_xent",
        "dtype": "float32",
        "error": "per leaf max|tested − reference| / max|reference|, the worst leaf",
        "float32_tolerance": 1e-4,  # jbp's default float32 rtol (jbp.compare)
        "note": "no float64 on a TPU: the float64 reference columns are skipped" if tpu else None,
        "rows": rows,
    }
    for name, (net, make) in _architectures(quick).items():
        started = time.perf_counter()
        row: dict[str, Any] = {"arch": name}
        rows.append(row)
        # --quick checks the script: both precisions on the MLP only (a CPU has one).
        precisions = PRECISIONS if not quick or name == "mlp" else PRECISIONS[:1]
        try:
            x, y = make(np.random.default_rng(0))
            _grads_row(row, net, x, y, precisions, float64=not tpu)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        row["seconds"] = time.perf_counter() - started
        print(f"grads {name}: {row}", flush=True)
        save(record)


def _grads_row(
    row: dict[str, Any], net: Any, x: Any, y: Any, precisions: Sequence[str], float64: bool
) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jbp

    jax.config.update("jax_enable_x64", False)  # float32 as users run it
    params = net.init(jax.random.key(0), dtype=jnp.float32)
    row["batch"] = int(x.shape[0])
    row["n_params"] = int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))
    got = {}
    for prec in precisions:
        with _precision(prec):
            ours = jax.jit(jbp.backprop(net, "softmax_xent"))(params, x, y)
            ref = jax.jit(jax.grad(jbp.objective(net, "softmax_xent")))(params, x, y)
        got[prec] = ours, ref = jax.device_get((ours, ref))
        err, leaf = _leaf_errors(ours, ref)
        pairs = zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), strict=True)
        row[prec] = {
            "jbp_vs_autodiff": err,
            "jbp_vs_autodiff_leaf": leaf,
            "bitwise_leaves": sum(bool(np.array_equal(a, b)) for a, b in pairs),
            "leaves": len(jax.tree_util.tree_leaves(ours)),
        }
    if not float64:
        return
    jax.config.update("jax_enable_x64", True)
    try:
        p64 = jax.tree_util.tree_map(lambda p: _up(np.asarray(p)), params)
        with jax.default_matmul_precision("highest"):
            exact = jax.jit(jax.grad(jbp.objective(net, "softmax_xent")))(p64, _up(x), y)
        exact = jax.device_get(exact)
        for prec, (ours, ref) in got.items():
            row[prec]["jbp_vs_float64"], row[prec]["jbp_vs_float64_leaf"] = _leaf_errors(
                ours, exact
            )
            row[prec]["autodiff_vs_float64"], _ = _leaf_errors(ref, exact)
    finally:
        jax.config.update("jax_enable_x64", False)


_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CONV = re.compile(r"[\]\}] convolution\(")
_WINDOW = re.compile(r"window=\{([^}]*)\}")


def _kernels(hlo: str) -> dict[str, Any]:
    """The convolution kernels of an optimised HLO module: the custom-call targets
    (cuDNN's ``__cudnn$conv...`` and any other), the plain ``convolution`` ops, and
    each convolution's kind and window (``pad=`` with a negative entry: negative
    padding; ``lhs_dilate``: a transposed convolution)."""
    targets: dict[str, int] = {}
    for t in _TARGET.findall(hlo):
        targets[t] = targets.get(t, 0) + 1
    convs = []
    for line in hlo.splitlines():
        target = _TARGET.search(line)
        if _CONV.search(line):
            kind = "convolution"
        elif target and "conv" in target.group(1).lower():
            kind = target.group(1)
        else:
            continue
        window = _WINDOW.search(line)
        convs.append(f"{kind} {window.group(1) if window else ''}".strip())
    return {
        "custom_calls": targets,
        "convolution_ops": len(_CONV.findall(hlo)),
        "kernels": sorted(set(convs)),
        "negative_padding": any(re.search(r"pad=\S*-\d", c) for c in convs),
    }


def _time_ms(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[float, float]:
    """Median and min over 7 samples of K back-to-back calls (one block per sample;
    K so that a sample lasts about 5 ms, from the fastest of 3 single calls), in
    milliseconds per call."""
    import jax

    jax.block_until_ready(fn(*args))
    singles = []
    for _ in range(3):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        singles.append(time.perf_counter() - started)
    k = max(1, min(1000, math.ceil(5e-3 / max(min(singles), 1e-7))))
    samples = []
    for _ in range(7):
        started = time.perf_counter()
        out = None
        for _ in range(k):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - started) / k)
    return 1e3 * sorted(samples)[3], 1e3 * min(samples)


def _stage_conv(quick: bool, save: Callable[[dict[str, Any]], None]) -> None:
    """The kernels of jbp's conv δ rule and filter gradient beside autodiff's;
    ``save`` gets the record after every function."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jbp

    jax.config.update("jax_enable_x64", False)
    b = 2 if quick else 64
    size = 8 if quick else 32
    chans = (3, 4, 4) if quick else (3, 32, 64)
    layers = {  # the benchmark CNN's convolutions, identity activation
        "conv1 3x3 stride 1": (jbp.Conv(chans[0], chans[1], (3, 3)), (b, size, size, chans[0])),
        "conv2 3x3 stride 2": (
            jbp.Conv(chans[1], chans[2], (3, 3), stride=2),
            (b, size, size, chans[1]),
        ),
        "conv3 3x3 stride 2": (
            jbp.Conv(chans[2], chans[2], (3, 3), stride=2),
            (b, size // 2, size // 2, chans[2]),
        ),
    }
    if quick:  # the script's check: the stride-2 layer, where the δ rule differs most
        layers = {k: v for k, v in layers.items() if k.startswith("conv2")}
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    record = {"batch": b, "dtype": "float32", "precision": "default", "rows": rows}
    for name, (conv, shape) in layers.items():
        params = conv.init(jax.random.key(0), dtype=jnp.float32)
        a = rng.standard_normal(shape).astype(np.float32)
        out_shape = jax.eval_shape(lambda p, x, c=conv: c.forward(p, x)[0], params, a).shape
        d = rng.standard_normal(out_shape).astype(np.float32)

        def jbp_input(p: Any, x: Any, dd: Any, c: Any = conv) -> Any:
            return c.backward(p, c.forward(p, x)[1], dd)[1]

        def jbp_filter(p: Any, x: Any, dd: Any, c: Any = conv) -> Any:
            return c.backward(p, c.forward(p, x)[1], dd)[0]["w"]

        def ad_input(p: Any, x: Any, dd: Any, c: Any = conv) -> Any:
            return jax.vjp(lambda x_: c.forward(p, x_)[0], x)[1](dd)[0]

        def ad_filter(p: Any, x: Any, dd: Any, c: Any = conv) -> Any:
            return jax.vjp(lambda p_: c.forward(p_, x)[0], p)[1](dd)[0]["w"]

        for fname, fn in (
            ("jbp δ rule (input gradient)", jbp_input),
            ("autodiff input gradient", ad_input),
            ("jbp filter gradient", jbp_filter),
            ("autodiff filter gradient", ad_filter),
        ):
            rows.append(_conv_row(name, fname, fn, (params, a, d)))
            save(record)
    # The whole benchmark CNN's gradient, both ways.
    net, make = _architectures(quick)["cnn"]
    x, y = make(np.random.default_rng(0))
    params = net.init(jax.random.key(0), dtype=jnp.float32)
    for fname, fn in (
        ("jbp.backprop", jbp.backprop(net, "softmax_xent")),
        ("jax.grad", jax.grad(jbp.objective(net, "softmax_xent"))),
    ):
        rows.append(_conv_row(f"CNN, batch {x.shape[0]}", fname, fn, (params, x, y)))
        save(record)


def _conv_row(
    layer: str, name: str, fn: Callable[..., Any], args: tuple[Any, ...]
) -> dict[str, Any]:
    import jax

    row: dict[str, Any] = {"layer": layer, "function": name}
    try:
        jitted = jax.jit(fn)
        row.update(_kernels(str(jitted.lower(*args).compile().as_text())))
        row["ms"], row["min_ms"] = _time_ms(jitted, args)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def _child(stage: str, out: Path, quick: bool) -> int:
    """Run one JAX stage; its JSON is rewritten as it goes (a timeout keeps what is done)."""
    path = out / f"{stage}.json"
    if stage == "env":
        _write_json(path, _environment())
    else:
        run = {"grads": _stage_grads, "conv": _stage_conv}[stage]
        run(quick, lambda record: _write_json(path, record))
    return 0


# --- CLI stages (run from the parent) -----------------------------------------


def _bench_runs(quick: bool, backend: str) -> list[tuple[str, list[str]]]:
    """(name, jbp bench arguments) per run; --quick: two toy runs (the script's check).
    The main runs take jbp bench's default batches, four times the CPU ones on an
    accelerator (MLP 256,1024,4096; CNN 128,512; transformer 64,256; curvature 1024)."""
    if quick:
        only = ["--only", "jax.grad,jbp.backprop", "--rounds", "3", "--budget", "1"]
        return [
            ("mlp", ["--arch", "mlp", "--sizes", "16,16,4", "--batches", "8", *only]),
            ("cnn", ["--arch", "cnn", "--batches", "1", *only]),
        ]
    common = ["--rounds", "10", "--budget", "5"]
    fast = ["--only", "jax.grad,jbp.backprop,per_example_norms,clipped_grad"]
    big = ["--batches", "1024" if backend == "cpu" else "4096"]
    return [  # in order of importance: a short budget cuts the last
        ("mlp", ["--arch", "mlp", *common, "--precision", "default"]),
        ("cnn", ["--arch", "cnn", *common, "--precision", "default"]),
        ("transformer", ["--arch", "transformer", *common, "--precision", "default"]),
        ("curvature", ["--curvature", "--arch", "mlp", *common, "--precision", "default"]),
        ("mlp_highest", ["--arch", "mlp", *big, *fast, *common, "--precision", "highest"]),
        (
            "mlp_bfloat16",
            [
                "--arch",
                "mlp",
                *big,
                *fast,
                *common,
                "--dtype",
                "bfloat16",
                "--precision",
                "default",
            ],
        ),
    ]


# Shares of the bench stage's budget (the MLP's table is the largest).
BENCH_WEIGHTS = {"mlp": 3.0, "cnn": 2.0, "transformer": 2.0, "curvature": 2.0}
BENCH_COLUMNS = ("batch", "name", "median_ms", "min_ms", "ratio", "calls", "memory_mib", "peak_mib")


def _stage_bench(out: Path, quick: bool, budget: float) -> dict[str, Any]:
    env = out / "env.json"
    backend = json.loads(env.read_text()).get("backend", "?") if env.exists() else "?"
    runs = _bench_runs(quick, backend)
    record: dict[str, Any] = {"runs": []}
    if quick:
        record["note"] = (
            "--quick: two toy runs; the transformer and curvature runs are full-run only"
        )
    deadline = time.perf_counter() + budget
    weights = [BENCH_WEIGHTS.get(name, 1.0) for name, _ in runs]
    for i, (name, args) in enumerate(runs):
        left = deadline - time.perf_counter()
        share = left * weights[i] / sum(weights[i:])  # of what is left, by weight
        path = out / f"bench_{name}.json"
        run = {
            "name": name,
            **_run(_jbp("bench", *args, "--json", str(path)), share, out / f"bench_{name}.txt"),
        }
        if path.exists():
            data = json.loads(path.read_text())
            run["json"] = path.name
            # jbp.bench/2: {"environment", "timing", "runs": [{..., "rows", "targets"}]};
            # a flat {"rows", "targets", backend...} is read too.
            tables = data.get("runs") or [data]
            run["environment"] = data.get("environment") or {
                k: v for k, v in data.items() if k not in ("rows", "targets", "runs")
            }
            run["rows"] = [dict(r) for t in tables for r in t.get("rows", [])]  # compile_s too
            run["targets"] = [x for t in tables for x in t.get("targets", [])]
        else:
            run["note"] = "no JSON written: the table is in the text output only"
        record["runs"].append(run)
    record["ok"] = all(r["returncode"] == 0 for r in record["runs"])
    return record


def _stage_verify(out: Path, quick: bool, budget: float) -> dict[str, Any]:
    path = out / "verify.json"
    args = (
        [
            "--count",
            "2",
            "--dtype",
            "float32",
            "--arch",
            "mlp",
            "--max-depth",
            "2",
            "--max-width",
            "6",
        ]
        if quick
        else []
    )
    run = _run(_jbp("verify", *args, "--json", str(path)), budget, out / "verify.txt")
    record: dict[str, Any] = {"run": run}
    if path.exists():
        data = json.loads(path.read_text())
        record["environment"] = {
            k: v
            for k, v in data.items()
            if k in ("backend", "jax_version", "jbp_version") or "precision" in k
        }
        keys = (
            "tried",
            "passed",
            "reference_limited",
            "failed",
            "worst_rel_err",
            "worst_passing_rel_err",
            "tolerance",
            "bitwise_share",
            "seconds",
        )
        record["by_dtype"] = {
            dtype: {k: s.get(k) for k in keys if k in s}
            | {k: v for k, v in s.items() if "precision" in k}
            for dtype, s in data.get("by_dtype", {}).items()
        }
        record["ok"] = bool(data.get("ok"))
    else:  # cut short: the last progress line of each dtype (plain lines in the log)
        last: dict[str, str] = {}
        for line in (out / "verify.txt").read_text(errors="replace").splitlines():
            m = re.match(r"verify (\w+): (\d+/\d+ problems.*)", line)
            if m:
                last[m.group(1)] = m.group(2)
        record["progress"] = last
    # Exit status 1 is a verification failure: recorded, not a stage failure.
    record["stage_ok"] = run["returncode"] in (0, 1) and path.exists()
    return record


def _stage_train(out: Path, quick: bool, budget: float) -> dict[str, Any]:
    run_dir = out / "train_digits"
    # --quick: two epochs of 3 steps (batch 512), the second one's steps compiled already.
    args = ["--epochs", "2", "--batch-size", "512", "--hidden", "8"] if quick else ["--epochs", "3"]
    run = _run(
        _jbp("train", "--data", "digits", *args, "--run-dir", str(run_dir)),
        budget,
        out / "train.txt",
    )
    record: dict[str, Any] = {"run": run, "data": "digits", "model": "mlp (jbp train's default)"}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        record["epochs"] = [
            {
                "epoch": e.get("epoch"),
                "step": e.get("step"),
                "ms_per_step": None if e.get("step_time") is None else 1e3 * e["step_time"],
                "epoch_seconds": e.get("epoch_time"),
                "test_accuracy": e.get("test_accuracy"),
            }
            for e in epochs
        ]
    config = run_dir / "config.json"
    if config.exists():
        cfg = json.loads(config.read_text())
        record["config"] = {
            k: cfg[k] for k in ("batch_size", "dtype", "optimizer", "hidden") if k in cfg
        }
    record["stage_ok"] = run["returncode"] == 0
    return record


def _stage_tests(out: Path, quick: bool, budget: float) -> dict[str, Any]:
    xml = out / "tests.xml"
    files = list(QUICK_TESTS if quick else TEST_FILES)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
    ]
    run = _run(cmd, budget, out / "tests.txt")
    record: dict[str, Any] = {
        "run": run,
        "files": files,
        "precision": "conftest's: highest unless JAX_DEFAULT_MATMUL_PRECISION says otherwise",
    }
    if xml.exists():
        suites = ElementTree.parse(xml).getroot()
        counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
        for suite in suites.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        counts["passed"] = (
            counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        )
        record["counts"] = counts
        record["not_passed"] = [
            f"{case.get('classname')}::{case.get('name')}: {child.tag}"
            for case in suites.iter("testcase")
            for child in case
            if child.tag in ("failure", "error", "skipped")
        ]
    record["stage_ok"] = run["returncode"] in (0, 1) and xml.exists()
    return record


# --- the summary --------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2e") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str) or (spec == "d" and not isinstance(value, int)):
        return str(value)
    return format(value, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _summary_md(records: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    env = records.get("env", {}).get("result") or {}
    tag = (
        f"{env.get('device_kind', '?')} ({env.get('backend', '?')}), jax {env.get('jax', '?')}, "
        f"jaxlib {env.get('jaxlib', '?')}"
    )
    lines = [
        "# jbp GPU check",
        "",
        f"{meta['started']} UTC, {'--quick (toy sizes)' if meta['quick'] else 'full run'}, "
        f"{meta['seconds']:.0f} s in all; {tag}.",
        "",
        "| stage | status | seconds | budget |",
        "|---|---|---|---|",
    ]
    for stage in STAGES:
        r = records.get(stage, {"status": "not run", "seconds": 0.0, "budget": 0})
        lines.append(f"| {stage} | {r['status']} | {r['seconds']:.1f} | {r['budget']:.0f} |")
    for stage in STAGES:
        if stage not in records:
            lines += ["", f"## {stage}", "", "not run (--stages)"]
            continue
        r = records[stage]
        lines += ["", f"## {stage}", ""]
        lines.append(f"status {r['status']}, {r['seconds']:.1f} s of {r['budget']:.0f} s; {tag}.")
        if r.get("error"):
            lines += ["", "```", r["error"][-1500:], "```"]
        res = r.get("result")
        if res:
            try:
                lines += ["", *_SECTIONS[stage](res)]
            except Exception as e:  # a record this summary cannot lay out: see summary.json
                lines += ["", f"(cannot lay out this stage's record: {type(e).__name__}: {e})"]
    return "\n".join(lines) + "\n"


def _md_env(e: dict[str, Any]) -> list[str]:
    err = e.get("matmul_rel_err", {})
    return [
        f"- device: {e['device_kind']} ×{e['device_count']}, backend {e['backend']}, "
        f"{e['machine']}",
        f"- versions: jax {e['jax']}, jaxlib {e['jaxlib']}, jbp {e['jbp']}, numpy {e['numpy']}, "
        f"python {e['python']}",
        f"- float32 matmul precision: configured {e['matmul_precision_config']!r} (None: the "
        f"backend's default); measured relative error of a 512×512 matmul against float64: "
        f"default {_fmt(err.get('default'))}, highest {_fmt(err.get('highest'))} → "
        f"{e['matmul_precision_effective']}",
        f"- memory limit: {_fmt(e.get('memory_bytes_limit'), ',')} bytes; XLA_FLAGS "
        f"{e['xla_flags']!r}",
    ]


def _md_grads(g: dict[str, Any]) -> list[str]:
    rows = []
    for r in g["rows"]:
        if "error" in r:
            rows.append([r["arch"], "error", r["error"][:120], "", "", "", ""])
            continue
        for prec in [q for q in PRECISIONS if q in r]:
            p = r[prec]
            rows.append(
                [
                    r["arch"],
                    prec,
                    f"{r['n_params']:,} / B {r['batch']}",
                    _fmt(p["jbp_vs_autodiff"]),
                    _fmt(p.get("jbp_vs_float64")),
                    _fmt(p.get("autodiff_vs_float64")),
                    f"{p['bitwise_leaves']}/{p['leaves']}",
                ]
            )
    lines = [
        f"float32 gradients ({g['loss']}); error: {g['error']}; the float64 reference is the "
        f"float32 problem upcast, at 'highest'; jbp's float32 tolerance is "
        f"{g['float32_tolerance']:.0e}.",
        "",
        *_table(
            [
                "arch",
                "precision",
                "params / batch",
                "jbp vs autodiff",
                "jbp vs float64",
                "autodiff vs float64",
                "bitwise leaves",
            ],
            rows,
        ),
    ]
    if g.get("note"):
        lines += ["", g["note"]]
    return lines


def _md_conv(c: dict[str, Any]) -> list[str]:
    rows = []
    kinds: dict[tuple[str, str], set[str]] = {}  # (layer, function) -> kernel kinds
    for r in c["rows"]:
        if "error" in r:
            rows.append([r["layer"], r["function"], "error: " + r["error"][:100], *[""] * 6])
            continue
        calls = ", ".join(f"{k} ×{v}" for k, v in r["custom_calls"].items()) or "none"
        kernels = r.get("kernels", [])
        kinds[r["layer"], r["function"]] = {k.split(" ", 1)[0] for k in kernels}
        rows.append(
            [
                r["layer"],
                r["function"],
                calls,
                str(r["convolution_ops"]),
                "; ".join(kernels),
                "yes" if r["negative_padding"] else "no",
                _fmt(r.get("ms"), ".3f"),
                _fmt(r.get("min_ms"), ".3f"),
            ]
        )
    verdicts = []
    for (layer, function), mine in kinds.items():
        if not function.startswith("jbp δ"):
            continue
        theirs = kinds.get((layer, "autodiff input gradient"))
        if theirs is not None:
            same = "the same kernel kinds as" if mine == theirs else "other kernels than"
            verdicts.append(
                f"- {layer}: jbp's δ rule uses {', '.join(sorted(mine)) or 'no convolution'}, "
                f"{same} autodiff's input gradient ({', '.join(sorted(theirs)) or 'none'})"
            )
    return [
        f"Kernels in the optimised HLO (custom-call targets; plain convolution ops; each "
        f"convolution's kind and window), batch {c['batch']}, float32, {c['precision']} "
        f"precision; ms: median (and min) of 7 samples of K back-to-back calls.",
        "",
        *_table(
            [
                "layer",
                "function",
                "custom calls",
                "convolution ops",
                "kernels (window)",
                "negative padding",
                "ms",
                "min ms",
            ],
            rows,
        ),
        "",
        *verdicts,
    ]


def _md_bench(b: dict[str, Any]) -> list[str]:
    lines: list[str] = [b["note"], ""] if b.get("note") else []
    for run in b["runs"]:
        env = run.get("environment", {})
        keys = ("device_kind", "backend", "jax_version", "jaxlib_version", "matmul_precision")
        what = ", ".join(f"{k} {env[k]}" for k in keys if k in env) or str(env)[:300]
        lines += [
            f"**{run['name']}**: `{run['command'].split(' -m ', 1)[-1]}` → exit "
            f"{run['returncode']}{' (timed out)' if run['timed_out'] else ''}, "
            f"{run['seconds']:.0f} s; {what or run.get('note', '')}",
            "",
        ]
        if run.get("rows"):
            header = [
                "batch",
                "function",
                "ms",
                "min ms",
                "ratio to jax.grad",
                "K",
                "est. MiB",
                "peak MiB",
            ]
            specs = ("d", "s", ".3f", ".3f", ".2f", "d", ".1f", ".1f")
            lines += _table(
                header,
                [
                    [_fmt(r.get(k), f) for k, f in zip(BENCH_COLUMNS, specs, strict=True)]
                    for r in run["rows"]
                ],
            )
            lines.append("")
        for t in run.get("targets", []):
            lines.append(
                f"- target {t.get('name')} / {t.get('baseline')} ≤ {t.get('bound')} at batch "
                f"{t.get('batch', '?')}: {_fmt(t.get('ratio'), '.3f')} "
                f"{'met' if t.get('met') else 'MISSED'}"
            )
        lines.append("")
    return lines


VERIFY_COLUMNS = {
    "tried": "d",
    "passed": "d",
    "reference_limited": "d",
    "failed": "d",
    "worst_rel_err": ".2e",
    "worst_passing_rel_err": ".2e",
    "tolerance": ".0e",
    "seconds": ".1f",
}


def _md_verify(v: dict[str, Any]) -> list[str]:
    run = v["run"]
    lines = [
        f"`{run['command'].split(' -m ', 1)[-1]}` → exit {run['returncode']}, "
        f"{run['seconds']:.0f} s; {v.get('environment', {})}",
        "",
    ]
    if v.get("by_dtype"):
        lines += _table(
            ["dtype", *VERIFY_COLUMNS],
            [
                [d, *(_fmt(s.get(k), f) for k, f in VERIFY_COLUMNS.items())]
                for d, s in v["by_dtype"].items()
            ],
        )
    for dtype, text in v.get("progress", {}).items():
        lines.append(f"- cut short; the last progress line of {dtype}: {text}")
    return lines


def _md_train(t: dict[str, Any]) -> list[str]:
    run = t["run"]
    lines = [
        f"`{run['command'].split(' -m ', 1)[-1]}` → exit {run['returncode']}, "
        f"{run['seconds']:.0f} s; {t['model']}, {t.get('config', {})}, default precision",
        "",
    ]
    if t.get("epochs"):
        lines += _table(
            ["epoch", "step", "ms/step", "epoch s", "test accuracy"],
            [
                [
                    str(e["epoch"]),
                    str(e["step"]),
                    _fmt(e["ms_per_step"], ".3f"),
                    _fmt(e["epoch_seconds"], ".2f"),
                    _fmt(e["test_accuracy"], ".4f"),
                ]
                for e in t["epochs"]
            ],
        )
        lines += ["", "(the first epoch's steps include compiling)"]
    return lines


def _md_tests(t: dict[str, Any]) -> list[str]:
    run = t["run"]
    lines = [
        f"`pytest {' '.join(t['files'])}` → exit {run['returncode']}, {run['seconds']:.0f} s; "
        f"precision {t['precision']}",
        "",
    ]
    if t.get("counts"):
        c = t["counts"]
        lines.append(
            f"passed {c['passed']}, failed {c['failures']}, errors {c['errors']}, "
            f"skipped {c['skipped']} of {c['tests']}"
        )
        lines += [f"- {x}" for x in t.get("not_passed", [])]
    return lines


_SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "env": _md_env,
    "grads": _md_grads,
    "conv": _md_conv,
    "bench": _md_bench,
    "verify": _md_verify,
    "train": _md_train,
    "tests": _md_tests,
}
_CLI_STAGES: dict[str, Callable[[Path, bool, float], dict[str, Any]]] = {
    "bench": _stage_bench,
    "verify": _stage_verify,
    "train": _stage_train,
    "tests": _stage_tests,
}


def _environment_tag(out: Path) -> dict[str, Any]:
    """Device, versions and precision from the env stage, for every stage's record."""
    path = out / "env.json"
    env = json.loads(path.read_text()) if path.exists() else {}
    keys = (
        "device_kind",
        "backend",
        "device_count",
        "jax",
        "jaxlib",
        "jbp",
        "matmul_precision_config",
        "matmul_precision_effective",
    )
    return {k: env.get(k) for k in keys}


def _run_stage(stage: str, out: Path, quick: bool, budget: float) -> dict[str, Any]:
    started = time.perf_counter()
    record: dict[str, Any] = {"stage": stage, "budget": budget}
    try:
        if stage in CHILD_STAGES:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                stage,
                "--out",
                str(out),
                *(["--quick"] if quick else []),
            ]
            run = _run(cmd, budget, out / f"{stage}.log")
            record["run"] = run
            path = out / f"{stage}.json"
            if path.exists():  # complete, or what was done before a failure or timeout
                record["result"] = json.loads(path.read_text())
            if run["returncode"] == 0 and path.exists():
                record["status"] = "ok"
            else:
                record["status"] = "timed out" if run["timed_out"] else "failed"
                record["error"] = run["tail"]
        else:
            result = _CLI_STAGES[stage](out, quick, budget)
            record["result"] = result
            runs = result["runs"] if "runs" in result else [result["run"]]
            ok = result.get("stage_ok", result.get("ok", False))
            if any(r["timed_out"] for r in runs):
                record["status"] = "timed out"
            else:
                record["status"] = "ok" if ok else "failed"
            if record["status"] != "ok":
                record["error"] = "\n".join(r["tail"][-600:] for r in runs)
    except Exception as e:  # a stage's failure is recorded, never fatal
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
    record["seconds"] = time.perf_counter() - started
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join((__doc__ or "").splitlines()[2:]),
    )
    parser.add_argument("--quick", action="store_true", help="every stage at toy size (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="the output folder")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated (default {','.join(STAGES)})"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds for all stages (default {DEADLINE:.0f}; {QUICK_DEADLINE:.0f} with --quick)",
    )
    parser.add_argument("--child", choices=CHILD_STAGES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return _child(args.child, args.out, args.quick)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if not stages:
        parser.error(f"--stages: give at least one of {', '.join(STAGES)}")
    if unknown:
        parser.error(f"--stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or ROOT / "experiments" / "out" / "gpu_check" / now.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline or (QUICK_DEADLINE if args.quick else DEADLINE)
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    flags = os.environ.get("XLA_FLAGS", "")
    if args.quick and "--xla_backend_optimization_level" not in flags:
        # A check of the script, not of speed: LLVM at -O0 compiles about a third faster.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    started = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    for stage in [s for s in STAGES if s in stages]:
        left = deadline - (time.perf_counter() - started)
        budget = min(budgets[stage], left)
        if budget < 5:
            records[stage] = {
                "stage": stage,
                "status": "skipped: out of time",
                "seconds": 0.0,
                "budget": max(budget, 0.0),
            }
        else:
            print(f"gpu_check: {stage} (budget {budget:.0f} s) ...", flush=True)
            records[stage] = _run_stage(stage, out, args.quick, budget)
            records[stage]["environment"] = _environment_tag(out)
            print(
                f"gpu_check: {stage} {records[stage]['status']} in "
                f"{records[stage]['seconds']:.1f} s",
                flush=True,
            )
        meta = {
            "started": now.strftime("%Y-%m-%d %H:%M:%S"),
            "quick": args.quick,
            "seconds": time.perf_counter() - started,
            "deadline": deadline,
            "out": str(out),
        }
        # Rewritten after every stage: a run cut short still leaves its summary.
        _write_json(out / "summary.json", {"meta": meta, "stages": records})
        (out / "summary.md").write_text(_summary_md(records, meta), encoding="utf-8")
    print(f"gpu_check: {meta['seconds']:.0f} s; summary in {out / 'summary.md'}")
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
