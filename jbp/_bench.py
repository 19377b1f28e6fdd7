"""Side-by-side timing of jbp's gradients against their autodiff counterparts.

Each function is compiled first (compile time reported separately), then all
are timed interleaved, rotating the order each round, so that the noise of a
shared machine hits them alike. One sample is K back-to-back calls with one
block at the end (``jax.block_until_ready`` on all K outputs), K calibrated per
function so that a sample lasts at least ``MIN_SAMPLE_S`` (5 ms): on an
accelerator one blocked call would time dispatch and synchronisation, not the
computation. The reported time is the sample's time over K, per call. Each
sample follows an untimed call of the same function, so that one function's
memory traffic does not land on the next one's time. A ``dispatch floor`` row
times a trivial jitted function of the same arguments the same way: the
per-call overhead every row contains. The functions that materialise
per-example gradients (gigabytes at batch 1024) are timed in a second phase,
beside ``jax.grad`` again. Every ratio is to ``jax.grad`` timed in the same
phase of the run.

Memory: ``memory_mib`` is XLA's static estimate for the compiled function
(temporaries plus outputs, excluding the arguments), the same measure for
every row and every backend; ``peak_mib`` is the device's own count
(``memory_stats()['peak_bytes_in_use']``) where the backend reports one (not
on CPU, where it is None). See :func:`environment` for the record of the
device, versions and matmul precision that every table carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import itertools
import math
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._backprop import backprop, objective
from ._per_example import (
    clipped_grad,
    per_example_grads,
    per_example_norms,
    sum_grad_squared,
)
from ._report import current_precision
from .layers import LSTM, Conv, Dense, Flatten, Sequential, llama, mlp, transformer

K = TypeVar("K", bound=Hashable)


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One function at one batch size.

    ``median_ms`` and ``min_ms`` are per call, over the ``rounds`` samples of
    ``calls`` back-to-back calls each; ``ratio`` is ``median_ms`` over
    ``jax.grad``'s in the same phase of the run. ``memory_mib``: XLA's compiled
    estimate (temporaries plus outputs); ``peak_mib``: the rise of the device's
    ``peak_bytes_in_use`` over its ``bytes_in_use`` during the function's first
    call (None where the backend reports no memory, as on CPU; NaN where the call
    stayed under a high-water mark an earlier call had set).
    """

    batch: int
    name: str
    compile_s: float
    median_ms: float
    ratio: float
    memory_mib: float
    rounds: int
    min_ms: float = math.nan
    calls: int = 1
    peak_mib: float | None = None


# --- the environment and the timing method, shared by every table -------------------

#: A sample lasts at least this long: K back-to-back calls, K calibrated per function.
MIN_SAMPLE_S = 0.005
#: At most this many calls in one sample (a trivial function on a fast device).
MAX_CALLS = 10_000
#: The K outputs of a sample are held until its one block: at most this many bytes.
HELD_BYTES = 256 * 2**20

#: The matmul precisions a benchmark can run under (``jax.default_matmul_precision``).
PRECISIONS = ("default", "high", "highest")
#: The dtypes a benchmark takes; bfloat16 and float16 mean mixed precision.
BENCH_DTYPES = ("float32", "float64", "bfloat16", "float16")

#: The name of the row that times a trivial jitted function of the same arguments.
DISPATCH_FLOOR = "dispatch floor"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def matmul_precision() -> str:
    """The matmul precision in effect, lower case: ``"default"`` (also when unset),
    ``"high"``, ``"highest"`` or another value of ``jax_default_matmul_precision``
    (a ``jax.default_matmul_precision`` context included)."""
    return current_precision().lower()


def environment() -> dict[str, Any]:
    """The record every benchmark table carries: device, backend, versions, precision.

    Call it where the timing runs (inside any ``jax.default_matmul_precision``
    context), so that ``matmul_precision`` is the one in effect. On GPU and TPU
    ``"default"`` lets XLA run float32 matmuls in TF32 or bf16 passes; on CPU it
    is float32.

    Returns:
      A JSON-ready dict: ``device_kind`` (``jax.devices()[0].device_kind``),
      ``backend``, ``device_count``, ``platform_version``, ``jax_version``,
      ``jaxlib_version``, ``plugins`` (installed accelerator plugins and their
      versions), ``matmul_precision``, ``x64``, ``python``, ``machine``.
    """
    dev = jax.devices()[0]
    plugins = {
        name: v
        for name in ("jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "libtpu")
        if (v := _version(name)) is not None
    }
    return {
        "device_kind": dev.device_kind,
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "platform_version": str(getattr(dev.client, "platform_version", "")),
        "jax_version": jax.__version__,
        "jaxlib_version": _version("jaxlib"),
        "plugins": plugins,
        "matmul_precision": matmul_precision(),
        "x64": bool(jax.config.read("jax_enable_x64")),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def format_environment(env: Mapping[str, Any]) -> str:
    """One line of :func:`environment`'s record, for a table's text header."""
    plugins = "".join(f", {k} {v}" for k, v in env["plugins"].items())
    return (
        f"device {env['device_kind']} × {env['device_count']}, backend {env['backend']}, "
        f"jax {env['jax_version']}, jaxlib {env['jaxlib_version']}{plugins}, matmul precision "
        f"{env['matmul_precision']}, {env['machine']}, python {env['python']}"
    )


def timing_method(sample_s: float = MIN_SAMPLE_S) -> str:
    """The lines a table's text header gives on how it was timed and what memory shows."""
    peak = _memory_stats() is not None
    return (
        f"per call: K back-to-back calls, one block at the end, K calibrated so that a "
        f"sample lasts >= {sample_s * 1e3:g} ms; median and min over the rounds\n"
        "est. MiB: XLA's compiled estimate (temporaries + outputs); peak MiB: "
        + (
            "the device's peak_bytes_in_use during the first call"
            if peak
            else "none (this backend reports no memory_stats)"
        )
    )


def check_precision(precision: str | None) -> None:
    """A clear error for a matmul precision the benchmarks do not take."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}"
        )


@contextlib.contextmanager
def precision_context(precision: str | None) -> Iterator[None]:
    """``jax.default_matmul_precision(precision)`` around compile and run; None leaves
    the precision as JAX has it (``jax_default_matmul_precision``)."""
    check_precision(precision)
    if precision is None:
        yield
    else:
        with jax.default_matmul_precision(precision):
            yield


def _check_dtype(dtype: Any) -> Any:
    """The benchmark's dtype, checked: float32, float64 (with x64), bfloat16, float16."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in BENCH_DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(BENCH_DTYPES)}, got {dtype!r}")
    if dt == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "`dtype` float64 needs jax_enable_x64 (jax.config.update('jax_enable_x64', True)), "
            "which is off"
        )
    return dt


def _memory_stats() -> dict[str, Any] | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend has it
        return None
    return stats or None


def _nbytes(tree: Any) -> int:
    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jtu.tree_leaves(tree))


def _run_calls(call: Callable[[], Any], k: int) -> float:
    """Seconds for ``k`` back-to-back calls, one block at the end on all outputs."""
    t0 = time.perf_counter()
    outs = [call() for _ in range(k)]
    jax.block_until_ready(outs)
    return time.perf_counter() - t0


def calibrate_calls(call: Callable[[], Any], sample_s: float = MIN_SAMPLE_S) -> int:
    """K: how many back-to-back calls of ``call`` make a sample of at least ``sample_s``
    seconds, from timed calls (one call, the least of two when under ``20 ·
    sample_s``; under ``4 · sample_s``, 4 pipelined calls, then scaled; each the
    least of two timings, so that one slow sample on a busy machine does not set
    K), at most :data:`MAX_CALLS` and at most what :data:`HELD_BYTES` of outputs
    allow."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(call())
    elapsed = time.perf_counter() - t0
    out_bytes = _nbytes(out)
    del out
    cap = MAX_CALLS if out_bytes == 0 else max(1, min(MAX_CALLS, HELD_BYTES // out_bytes))
    k = 1
    if elapsed < 20 * sample_s:  # a second call, so that one slow call decides nothing
        elapsed = min(elapsed, _run_calls(call, 1))
    if elapsed < 4 * sample_s and cap > 1:
        # Short: estimate from pipelined calls, the least of two timings. A single
        # blocked call on a busy machine also waits to be scheduled again after its
        # block (milliseconds), which set K = 1 for a 2 ms function.
        k = min(4, cap)
        elapsed = min(_run_calls(call, k), _run_calls(call, k))
    while elapsed < sample_s and k < cap:
        k = min(cap, max(k + 1, math.ceil(1.2 * k * sample_s / max(elapsed, 1e-9))))
        elapsed = min(_run_calls(call, k), _run_calls(call, k))
    return k


def _dispatch_floor(args: tuple[Any, ...]) -> Callable[..., Any]:
    """A trivial function of ``args`` (one element of the first floating leaf, plus 1),
    to be jitted with every argument kept: its time is the per-call overhead."""

    def floor(*a: Any) -> Any:
        for leaf in jtu.tree_leaves(a):
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
                return jnp.ravel(leaf)[:1] + 1
        return jnp.zeros((1,))

    return floor


def compile_calls(
    calls: Mapping[str, tuple[Callable[..., Any], tuple[Any, ...]]],
) -> tuple[dict[str, Any], dict[str, float], dict[str, Callable[[], Any]]]:
    """Compile each ``name: (fn, args)`` for its arguments: the compiled functions,
    their compile seconds, and argument-free calls to time (not yet called; see
    :func:`warm_up`). :data:`DISPATCH_FLOOR` is compiled with every argument kept."""
    compiled: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    bound: dict[str, Callable[[], Any]] = {}
    for name, (fn, args) in calls.items():
        t0 = time.perf_counter()
        jitted = jax.jit(fn, keep_unused=True) if name == DISPATCH_FLOOR else jax.jit(fn)
        compiled[name] = jitted.lower(*args).compile()
        compile_s[name] = time.perf_counter() - t0
        bound[name] = functools.partial(compiled[name], *args)
    return compiled, compile_s, bound


def warm_up(
    bound: Mapping[K, Callable[[], Any]], compiled: Mapping[K, Any]
) -> dict[K, float | None]:
    """Call each once (the warm-up), in ascending order of XLA's memory estimate, and
    read the device's peak memory around each call: ``name: peak MiB`` (see
    :class:`BenchRow`; None without ``memory_stats``)."""

    def estimate(name: K) -> float:
        m = _memory_mib(compiled[name])
        return 0.0 if math.isnan(m) else m

    peaks: dict[K, float | None] = {}
    for name in sorted(bound, key=estimate):
        before = _memory_stats()
        jax.block_until_ready(bound[name]())
        after = _memory_stats()
        if before is None or after is None or "peak_bytes_in_use" not in after:
            peaks[name] = None
        elif after["peak_bytes_in_use"] > before.get("peak_bytes_in_use", 0):
            rise = after["peak_bytes_in_use"] - before.get("bytes_in_use", 0)
            peaks[name] = rise / 2**20
        else:
            peaks[name] = math.nan
    return peaks


def _tree_norms(g: Any) -> jax.Array:
    leaves = jtu.tree_leaves(g)
    b = leaves[0].shape[0]
    return jnp.sqrt(sum(jnp.sum(leaf.reshape(b, -1) ** 2, axis=1) for leaf in leaves))


# Those that form every g_i, B·P numbers; timed in a phase of their own.
MATERIALISING = frozenset({"vmap(jax.grad)", "per_example_grads", "norms via vmap"})

# The functions :func:`benchmark` times, in table order.
BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad",
    "jbp.backprop",
    "vmap(jax.grad)",
    "per_example_grads",
    "norms via vmap",
    "per_example_norms",
    "sum_grad_squared",
    "clipped_grad",
)


# The CNN benchmark's rows (issue 9), a subset of BENCH_FUNCTIONS.
CNN_BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad",
    "jbp.backprop",
    "norms via vmap",
    "per_example_norms",
    "clipped_grad",
    "sum_grad_squared",
)
CNN_IN_SHAPE = (32, 32, 3)
# The transformer benchmark's rows (issue 10).
TRANSFORMER_BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad",
    "jbp.backprop",
    "norms via vmap",
    "per_example_norms",
    "clipped_grad",
)
TRANSFORMER_LENGTH = 64
# The llama benchmark's rows (issue 16): the transformer's, on a padded batch.
LLAMA_BENCH_FUNCTIONS = TRANSFORMER_BENCH_FUNCTIONS
LLAMA_LENGTH = 64


# The LSTM benchmark's rows (issue 17): the transformer's, on (B, 32, 32) sequences.
LSTM_BENCH_FUNCTIONS = TRANSFORMER_BENCH_FUNCTIONS
LSTM_IN_SHAPE = (32, 32)


def _lstm() -> Sequential:
    """The benchmark LSTM: two layers of 128 hidden units on 32 steps of 32 features,
    the first returning sequences, then a Dense head of 10 classes."""
    return Sequential([LSTM(32, 128, return_sequences=True), LSTM(128, 128), Dense(128, 10)])


def _llama() -> Sequential:
    """The benchmark llama: vocab 256, 128 features, 4 heads, 2 key/value heads,
    depth 2, SwiGLU hidden 344, tied embeddings."""
    return llama(256, 128, 4, 2, kv_heads=2, hidden=344, tie_embeddings=True)


def padded_lengths(batch: int, length: int) -> np.ndarray:
    """Real lengths of the benchmark's padded batches: evenly from ``length/2`` to
    ``length``, so about a quarter of the positions are padding."""
    return np.round(np.linspace(length // 2, length, batch)).astype(int)


def _transformer() -> Sequential:
    """The benchmark transformer, exactly the network of the PyTorch reference
    figures: vocab 128, length 64, 128 features, 4 heads, depth 2, MLP ratio 4,
    gelu, causal."""
    return transformer(128, TRANSFORMER_LENGTH, 128, 4, 2, mlp_ratio=4, activation="gelu")


def _cnn() -> Sequential:
    """The benchmark CNN, exactly the network of the PyTorch reference figures:
    (32, 32, 3) → Conv 3→32 3×3 SAME relu → Conv 32→64 3×3 stride 2 SAME relu →
    Conv 64→64 3×3 stride 2 SAME relu → Flatten → Dense 4096→10."""
    return Sequential(
        [
            Conv(3, 32, (3, 3), "relu"),
            Conv(32, 64, (3, 3), "relu", stride=2),
            Conv(64, 64, (3, 3), "relu", stride=2),
            Flatten(),
            Dense(4096, 10),
        ]
    )


def _functions(net: Any, loss: str, max_norm: float) -> dict[str, Callable[..., Any]]:
    """Every benchmark function as ``(params, x, y, mask)`` (``mask`` None: no padding)."""
    grad = jax.grad(objective(net, loss))  # reference

    def ref(p: Any, x: Any, y: Any, m: Any) -> Any:
        return grad(p, x, y, mask=m)

    per_ex_ref = jax.vmap(ref, in_axes=(None, 0, 0, 0))

    def ours(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda p, x, y, m: fn(p, x, y, mask=m)

    fns = {
        "jax.grad": ref,
        "jbp.backprop": ours(backprop(net, loss)),
        "vmap(jax.grad)": per_ex_ref,
        "per_example_grads": ours(per_example_grads(net, loss)),
        "norms via vmap": lambda p, x, y, m: _tree_norms(per_ex_ref(p, x, y, m)),
        "per_example_norms": ours(per_example_norms(net, loss)),
        "sum_grad_squared": ours(sum_grad_squared(net, loss)),
        "clipped_grad": ours(clipped_grad(net, loss, max_norm)),
    }
    assert tuple(fns) == BENCH_FUNCTIONS
    return fns


def _memory_mib(compiled: Any) -> float:
    try:
        m = compiled.memory_analysis()
        return (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
    except Exception:  # not every backend reports it
        return float("nan")


def _row(
    batch: int,
    name: str,
    times: list[float],
    base: float,
    compile_s: Mapping[str, float],
    compiled: Mapping[str, Any],
    calls: Mapping[str, int] | None = None,
    peaks: Mapping[str, float | None] | None = None,
) -> BenchRow:
    """One function's row: median and min time per call, ratio to ``base`` (jax.grad's
    median), K, the compiled memory estimate and the device peak."""
    med = statistics.median(times)
    return BenchRow(
        batch,
        name,
        compile_s[name],
        med * 1e3,
        med / base,
        _memory_mib(compiled[name]),
        len(times),
        min(times) * 1e3,
        1 if calls is None else calls[name],
        None if peaks is None else peaks.get(name),
    )


def _time_interleaved(
    compiled: Mapping[K, Callable[..., Any]],
    names: Sequence[K],
    args: tuple[Any, ...],
    rounds: int,
    budget_s: float,
    sample_s: float = MIN_SAMPLE_S,
) -> tuple[dict[K, list[float]], dict[K, int]]:
    """Seconds per call of each function, timed in rotating order, round by round, and
    K, the calls per sample: one sample is K back-to-back calls and one block."""
    calls = {name: calibrate_calls(functools.partial(compiled[name], *args), sample_s)
             for name in names}  # fmt: skip
    times: dict[K, list[float]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    for r in range(rounds):
        order = list(names[r % len(names) :]) + list(names[: r % len(names)])
        for name in order:
            if len(times[name]) >= 3 and spent[name] > budget_s:
                continue
            call = functools.partial(compiled[name], *args)
            # An untimed call first: the timed ones then start from this
            # function's own memory state, not from the previous function's.
            jax.block_until_ready(call())
            elapsed = _run_calls(call, calls[name])
            spent[name] += elapsed
            times[name].append(elapsed / calls[name])
    return times, calls


def benchmark(
    sizes: Sequence[int] = (784, 512, 512, 10),
    *,
    arch: str = "mlp",
    batches: Sequence[int] | None = None,
    activation: str = "relu",
    loss: str = "softmax_xent",
    dtype: Any = jnp.float32,
    rounds: int = 30,
    budget_s: float = 10.0,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    precision: str | None = None,
    sample_s: float = MIN_SAMPLE_S,
) -> list[BenchRow]:
    """Time jbp's gradient functions and their autodiff counterparts side by side.

    Args:
      sizes: MLP layer widths (``arch="mlp"``).
      arch: ``"mlp"`` (an MLP of ``sizes``), ``"cnn"``: the CNN on ``(B, 32, 32,
        3)`` images, Conv 3→32 3×3 SAME relu, Conv 32→64 3×3 stride 2 SAME relu,
        Conv 64→64 3×3 stride 2 SAME relu, Flatten, Dense 4096→10, timing
        :data:`CNN_BENCH_FUNCTIONS` by default; or ``"transformer"``:
        ``jbp.transformer(vocab=128, length=64, features=128, heads=4, depth=2,
        mlp_ratio=4, activation="gelu", causal=True)`` on tokens ``(B, 64)``
        with labels ``(B, 64)``, timing :data:`TRANSFORMER_BENCH_FUNCTIONS`; or
        ``"llama"``: ``jbp.llama(vocab=256, features=128, heads=4, kv_heads=2,
        depth=2, hidden=344, tie_embeddings=True)`` on padded batches of tokens
        ``(B, 64)``, real lengths evenly from 32 to 64 (a quarter of the
        positions padding: a mask, labels -1 there), timing
        :data:`LLAMA_BENCH_FUNCTIONS` (``sizes`` and ``activation`` unused for
        these); or ``"lstm"``: ``Sequential([LSTM(32, 128, return_sequences=True),
        LSTM(128, 128), Dense(128, 10)])`` on ``(B, 32, 32)`` sequences, timing
        :data:`LSTM_BENCH_FUNCTIONS`.
      batches: batch sizes to run (default :func:`default_batches`: on CPU 64,
        256, 1024 for the MLP; 32, 128 for the CNN and the LSTM; 16, 64 for the
        transformer and the llama; four times as large on an accelerator).
      activation, loss: the problem.
      dtype: float32 or float64 (params and inputs), or bfloat16 / float16: mixed
        precision, float32 params and inputs ``x`` in the low dtype, so every
        layer computes in it with float32 accumulation (MLP and CNN only: the
        token models would need a ``Cast`` after their embedding and the
        recurrent layers have no mixed precision).
      rounds: interleaved timing rounds (samples) per batch size.
      budget_s: a function stops being timed once it has 3 rounds and its
        timed calls have used this many seconds (keeps ``vmap(jax.grad)`` at large batches short).
      only: restrict to these function names (``jax.grad`` and the
        :data:`DISPATCH_FLOOR` row always run).
      log: called with a line per finished batch size.
      precision: ``"default"``, ``"high"`` or ``"highest"``: the
        ``jax.default_matmul_precision`` for compiling and running (None: as it is).
      sample_s: the shortest sample: K back-to-back calls are timed with one block.

    Returns:
      One :class:`BenchRow` per function and batch size, then the
      :data:`DISPATCH_FLOOR` row of that batch size.
    """
    if arch not in ("mlp", "cnn", "transformer", "llama", "lstm"):
        raise ValueError(
            f"`arch` must be 'mlp', 'cnn', 'transformer', 'llama' or 'lstm', got {arch!r}"
        )
    dtype = _check_dtype(dtype)
    low = dtype.itemsize < 4
    if low and arch not in ("mlp", "cnn"):
        raise ValueError(
            f"`dtype` {dtype.name} (mixed precision: float32 params, {dtype.name} inputs) "
            f"is for arch 'mlp' and 'cnn', got arch {arch!r}"
        )
    check_precision(precision)
    in_shape: tuple[int, ...]
    if arch == "cnn":
        net, in_shape = _cnn(), CNN_IN_SHAPE
        only = CNN_BENCH_FUNCTIONS if only is None else only
    elif arch == "transformer":
        net, in_shape = _transformer(), (TRANSFORMER_LENGTH,)
        only = TRANSFORMER_BENCH_FUNCTIONS if only is None else only
    elif arch == "llama":
        net, in_shape = _llama(), (LLAMA_LENGTH,)
        only = LLAMA_BENCH_FUNCTIONS if only is None else only
    elif arch == "lstm":
        net, in_shape = _lstm(), LSTM_IN_SHAPE
        only = LSTM_BENCH_FUNCTIONS if only is None else only
    else:
        net, in_shape = mlp(list(sizes), activation), (sizes[0],)
    batches = default_batches(arch) if batches is None else batches
    out_shape = net.output_shape(in_shape)
    classes = out_shape[-1]
    params = net.init(jax.random.key(0), jnp.float32 if low else dtype)
    fns = _functions(net, loss, max_norm=1.0)
    if only is not None:
        unknown = set(only) - set(fns)
        if unknown:
            raise ValueError(f"unknown benchmark functions {sorted(unknown)}; known: {list(fns)}")
        fns = {k: v for k, v in fns.items() if k == "jax.grad" or k in only}
    rows: list[BenchRow] = []
    for batch in batches:
        if arch in ("transformer", "llama"):  # token ids in, next-token labels out
            x = jax.random.randint(jax.random.key(1), (batch, *in_shape), 0, classes)
        else:
            x = jax.random.normal(jax.random.key(1), (batch, *in_shape), dtype)
        if loss == "softmax_xent":
            y = jax.random.randint(jax.random.key(2), (batch, *out_shape[:-1]), 0, classes)
        else:
            y = jax.random.uniform(jax.random.key(2), (batch, *out_shape), dtype)
        mask = None
        if arch == "llama":  # a quarter of the positions padding, labels -1 there
            lengths = padded_lengths(batch, in_shape[0])
            mask = jnp.asarray(np.arange(in_shape[0])[None] < lengths[:, None])
            if loss == "softmax_xent":
                y = jnp.where(mask, y, -1)
        args = (params, x, y, mask)
        calls = {name: (fn, args) for name, fn in fns.items()}
        calls[DISPATCH_FLOOR] = (_dispatch_floor(args), args)
        with precision_context(precision):
            compiled, compile_s, bound = compile_calls(calls)
            peaks = warm_up(bound, compiled)
            # Two phases, each with jax.grad as its own baseline: the functions
            # that materialise B·P numbers allocate and free gigabytes, whose page
            # faults would otherwise land on the fast functions timed beside them.
            names = [*fns, DISPATCH_FLOOR]
            heavy = [n for n in names if n in MATERIALISING]
            light = [n for n in names if n not in MATERIALISING]
            batch_rows = []
            for phase in (light, ["jax.grad", *heavy]) if heavy else (light,):
                times, k = _time_interleaved(bound, phase, (), rounds, budget_s, sample_s)
                base = statistics.median(times["jax.grad"])
                for name in phase:
                    if name == "jax.grad" and phase is not light:
                        continue
                    batch_rows.append(
                        _row(batch, name, times[name], base, compile_s, compiled, k, peaks)
                    )
        rows.extend(sorted(batch_rows, key=lambda r: names.index(r.name)))
        if log is not None:
            log(format_benchmark(rows[-len(names) :], header=False))
    return rows


# Default batch sizes: on CPU, and four times as large on an accelerator, where the
# CPU sizes are microseconds of work. Keys: (table, arch).
_BATCHES: dict[tuple[str, str], tuple[int, ...]] = {
    ("bench", "mlp"): (64, 256, 1024),
    ("bench", "cnn"): (32, 128),
    ("bench", "transformer"): (16, 64),
    ("bench", "llama"): (16, 64),
    ("bench", "lstm"): (32, 128),
    ("curvature", "mlp"): (256,),
    ("curvature", "cnn"): (32,),
    ("dp", "mlp"): (256,),
    ("dp", "cnn"): (32,),
    ("dots", "mlp"): (256,),
    ("dots", "cnn"): (256,),
    ("dots", "transformer"): (256,),
}
#: How much larger the default batches are on an accelerator than on CPU.
ACCELERATOR_BATCH_FACTOR = 4


def default_batches(arch: str, table: str = "bench", backend: str | None = None) -> tuple[int, ...]:
    """The default batch sizes of a benchmark table (``"bench"``, ``"curvature"``,
    ``"dp"``, ``"dots"``) for ``arch`` on ``backend`` (default: JAX's): the CPU sizes,
    times :data:`ACCELERATOR_BATCH_FACTOR` when the backend is not CPU."""
    cpu = _BATCHES[table, arch]
    if (backend or jax.default_backend()) == "cpu":
        return cpu
    return tuple(ACCELERATOR_BATCH_FACTOR * b for b in cpu)


@dataclasses.dataclass(frozen=True)
class BenchTarget:
    """A bound on the ratio of two functions' median times at one batch size.

    ``batch=None`` applies the bound at every batch size.
    """

    name: str
    baseline: str
    bound: float
    batch: int | None = None


# The cost model of DESIGN.md and the per-example issue, as ratios in one run.
BENCH_TARGETS: tuple[BenchTarget, ...] = (
    BenchTarget("jbp.backprop", "jax.grad", 1.05),
    BenchTarget("per_example_norms", "jax.grad", 0.8),
    BenchTarget("clipped_grad", "jax.grad", 1.15),
    BenchTarget("sum_grad_squared", "jax.grad", 1.4),
    BenchTarget("per_example_grads", "vmap(jax.grad)", 1.0),
    BenchTarget("per_example_norms", "norms via vmap", 1 / 30, 256),
)


# The CNN's targets (issue 9), as ratios in one run; PyTorch on the same network
# and kind of 2-core CPU: the best per-example norms 1.28–1.59× autograd.
BENCH_TARGETS_CNN: tuple[BenchTarget, ...] = (
    BenchTarget("jbp.backprop", "jax.grad", 1.05),
    BenchTarget("per_example_norms", "jax.grad", 1.2),
    BenchTarget("clipped_grad", "jax.grad", 1.35),
    BenchTarget("per_example_norms", "norms via vmap", 1.0),
)


# The transformer's targets (issue 10), as ratios in one run; PyTorch on the same
# network and kind of 2-core CPU: per-example norms 1.25–1.91× autograd, Opacus's
# full ghost-clipping step 2.14–2.42×.
BENCH_TARGETS_TRANSFORMER: tuple[BenchTarget, ...] = (
    BenchTarget("jbp.backprop", "jax.grad", 1.05),
    BenchTarget("per_example_norms", "jax.grad", 1.3),
    BenchTarget("clipped_grad", "jax.grad", 1.5),
    BenchTarget("per_example_norms", "norms via vmap", 1.0),
)


# The llama's targets (issue 16), as ratios in one run.
BENCH_TARGETS_LLAMA: tuple[BenchTarget, ...] = (
    BenchTarget("jbp.backprop", "jax.grad", 1.0),
    BenchTarget("per_example_norms", "jax.grad", 1.0),
    BenchTarget("clipped_grad", "jax.grad", 1.2),
    BenchTarget("per_example_norms", "norms via vmap", 0.5),
)


# The LSTM's targets (issue 17), as ratios in one run.
BENCH_TARGETS_LSTM: tuple[BenchTarget, ...] = (
    BenchTarget("jbp.backprop", "jax.grad", 1.0),
    BenchTarget("per_example_norms", "jax.grad", 1.1),
    BenchTarget("clipped_grad", "jax.grad", 1.3),
    BenchTarget("per_example_norms", "norms via vmap", 0.5),
)


def check_targets(
    rows: Sequence[BenchRow], targets: Sequence[BenchTarget] = BENCH_TARGETS
) -> list[tuple[BenchTarget, int, float, bool]]:
    """Each target at each batch size that has both functions:
    ``(target, batch, measured ratio, met)``."""
    by = {(r.batch, r.name): r.ratio for r in rows}  # each to jax.grad of its own phase
    out = []
    for t in targets:
        for batch in sorted({r.batch for r in rows}):
            if t.batch is not None and batch != t.batch:
                continue
            if (batch, t.name) not in by or (batch, t.baseline) not in by:
                continue
            ratio = by[batch, t.name] / by[batch, t.baseline]
            out.append((t, batch, ratio, ratio <= t.bound))
    return out


def format_targets(checked: Sequence[tuple[BenchTarget, int, float, bool]]) -> str:
    """One line per :func:`check_targets` result."""
    return "\n".join(
        f"batch {batch:>5}: {t.name} / {t.baseline} = {ratio:.3f} "
        f"(target ≤ {t.bound:.3g}) {'met' if met else 'MISSED'}"
        for t, batch, ratio, met in checked
    )


def format_benchmark(rows: Sequence[BenchRow], *, header: bool = True) -> str:
    """A fixed-width table of :func:`benchmark` rows: per call median and min ms, the
    ratio to ``jax.grad``, compile seconds, XLA's estimate (``est. MiB``), the device
    peak (``peak MiB``, ``-`` where the backend reports none), K calls per sample and
    the rounds."""

    def peak(r: BenchRow) -> str:
        return "-" if r.peak_mib is None else f"{r.peak_mib:.1f}"

    lines = []
    if header:
        lines.append(
            f"{'batch':>6}  {'function':<28} {'median ms':>10} {'min ms':>10} "
            f"{'× jax.grad':>10} {'compile s':>9} {'est. MiB':>9} {'peak MiB':>9} "
            f"{'K':>5} {'rounds':>6}"
        )
        lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r.batch:>6}  {r.name:<28} {r.median_ms:>10.3f} {r.min_ms:>10.3f} "
            f"{r.ratio:>10.2f} {r.compile_s:>9.2f} {r.memory_mib:>9.1f} {peak(r):>9} "
            f"{r.calls:>5} {r.rounds:>6}"
        )
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ScalingRow:
    """One function on ``devices`` devices at a fixed global batch."""

    devices: int
    name: str
    median_ms: float
    speedup: float  # time on the first device count (1 by default) / time on ``devices``
    rounds: int
    min_ms: float = math.nan
    calls: int = 1  # K, back-to-back calls per sample


def benchmark_scaling(
    sizes: Sequence[int] = (784, 512, 512, 10),
    *,
    batch: int = 1024,
    devices: Sequence[int] | None = None,
    activation: str = "relu",
    loss: str = "softmax_xent",
    dtype: Any = jnp.float32,
    rounds: int = 20,
    precision: str | None = None,
    sample_s: float = MIN_SAMPLE_S,
) -> list[ScalingRow]:
    """Data-parallel scaling: the same global batch split over 1, 2, 4, … devices.

    Times ``jbp.backprop``, ``per_example_norms``, ``clipped_grad`` and an adam
    training step (``jbp.make_step``) with params replicated and the batch
    sharded (:func:`jbp.shard_batch`), interleaved over device counts, each
    sample K back-to-back calls and one block (as :func:`benchmark`), and a
    :data:`DISPATCH_FLOOR` row per device count.

    Args:
      sizes: MLP layer widths.
      batch: the global batch; must divide by every device count.
      devices: device counts (default 1, 2, 4, … up to ``len(jax.devices())``).
      activation, loss, dtype: the problem.
      rounds: timing rounds.
      precision: the ``jax.default_matmul_precision`` (None: as it is).
      sample_s: the shortest sample.

    Returns:
      One :class:`ScalingRow` per device count and function.
    """
    import optax

    from ._sharding import make_mesh, replicate, shard_batch
    from ._train import init_state, make_step

    check_precision(precision)
    dtype = _check_dtype(dtype)
    if dtype.itemsize < 4:
        raise ValueError(
            f"`dtype` of benchmark_scaling must be float32 or float64, got {dtype.name} "
            "(mixed precision is timed by benchmark)"
        )
    available = len(jax.devices())
    if devices is None:
        devices = [2**k for k in range(available.bit_length()) if 2**k <= available]
    for n in devices:
        if n > available or batch % n:
            raise ValueError(f"cannot split a batch of {batch} over {n} of the {available} devices")
    net = mlp(list(sizes), activation)
    opt = optax.adam(1e-3)
    state = init_state(net, opt, jax.random.key(0), dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]), dtype)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])
    fns = {
        "jbp.backprop": lambda s, a, b: backprop(net, loss)(s.params, a, b),
        "per_example_norms": lambda s, a, b: per_example_norms(net, loss)(s.params, a, b),
        "clipped_grad": lambda s, a, b: clipped_grad(net, loss, 1.0)(s.params, a, b),
        "train step (adam)": make_step(net, loss, opt, jit=False),
    }
    compiled, args = {}, {}
    with precision_context(precision):
        for n in devices:
            mesh = make_mesh(n)
            args[n] = (replicate(state, mesh), *shard_batch((x, y), mesh))
            for name, fn in fns.items():
                compiled[n, name] = jax.jit(fn).lower(*args[n]).compile()
            floor = jax.jit(_dispatch_floor(args[n]), keep_unused=True)
            compiled[n, DISPATCH_FLOOR] = floor.lower(*args[n]).compile()
        keys = list(compiled)
        bound = {k: functools.partial(compiled[k], *args[k[0]]) for k in keys}
        for k in keys:
            jax.block_until_ready(bound[k]())  # warm-up
        times, calls = _time_interleaved(bound, keys, (), rounds, math.inf, sample_s)
    rows = []
    for n, name in keys:
        med = statistics.median(times[n, name])
        one = statistics.median(times[devices[0], name])
        rows.append(
            ScalingRow(
                n, name, med * 1e3, one / med, len(times[n, name]),
                min(times[n, name]) * 1e3, calls[n, name],
            )
        )  # fmt: skip
    return rows


def format_scaling(rows: Sequence[ScalingRow]) -> str:
    """A fixed-width table of :func:`benchmark_scaling` rows."""
    lines = [
        f"{'devices':>7}  {'function':<28} {'median ms':>10} {'min ms':>10} {'speedup':>8} "
        f"{'K':>5} {'rounds':>6}"
    ]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r.devices:>7}  {r.name:<28} {r.median_ms:>10.3f} {r.min_ms:>10.3f} "
            f"{r.speedup:>8.2f} {r.calls:>5} {r.rounds:>6}"
        )
    return "\n".join(lines)


# --- curvature (issue 11) ---------------------------------------------------------

# The curvature benchmark's rows: jbp's quantity, then its autodiff route.
CURVATURE_BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad",
    "diag_ggn mc",
    "diag_ggn mc (autodiff)",
    "diag_ggn exact",
    "diag_ggn exact (autodiff)",
    "per_example_diag_ggn mc",
    "per_example_diag_ggn mc (ad)",
    "kfac",
    "kfac (autodiff)",
    "ggn_vector_product",
    "ggn_vector_product (ad)",
    "diag_hessian",
    "hvp (autodiff)",
)

# Targets (issue 11), as ratios to jax.grad in one run; BackPACK 1.7.1 on the same
# MLP and kind of 2-core CPU: DiagGGNMC 1.72×, DiagGGNExact 4.20×, BatchDiagGGNMC
# 34.6×, KFAC 2.43×, KFLR 9.82×, DiagHessian 4.11×.
BENCH_TARGETS_CURVATURE: tuple[BenchTarget, ...] = (
    BenchTarget("diag_ggn mc", "jax.grad", 1.5),
    BenchTarget("diag_ggn exact", "jax.grad", 3.5),
    BenchTarget("kfac", "jax.grad", 2.0),
    BenchTarget("ggn_vector_product", "jax.grad", 2.5),
    BenchTarget("per_example_diag_ggn mc", "jax.grad", 3.0),
    BenchTarget("diag_hessian", "jax.grad", 4.0),
)


def _curvature_functions(net: Any, loss_name: str) -> dict[str, Callable[..., Any]]:
    """Every curvature row as ``fn(params, x, y, key, v)``. The autodiff routes send
    the same loss square-root columns through ``vmap`` of per-example ``jax.grad``
    (J_iᵀ s_ic for every column and example), or compose ``jvp``/``vjp``."""
    from ._curvature import (
        diag_ggn,
        diag_hessian,
        ggn_vector_product,
        kfac,
        per_example_diag_ggn,
    )
    from ._losses import get_loss

    loss = get_loss(loss_name)
    ref = jax.grad(objective(net, loss))  # reference
    sqrt_hessian, sample = loss.sqrt_hessian, loss.sample_sqrt_hessian
    assert sqrt_hessian is not None and sample is not None

    def column_grads(p: Any, x: Any, y: Any, cols: Any) -> Any:
        """``J_iᵀ s_ic`` for every column c and example i: leaves ``(C, B, *leaf)``."""

        def one(xi: Any, si: Any) -> Any:
            return jax.grad(lambda q: jnp.sum(net.forward(q, xi[None])[0][0] * si))(p)  # reference

        return jax.vmap(jax.vmap(one), in_axes=(None, 0))(x, cols)

    def ad_diag(p: Any, x: Any, y: Any, key: Any, mc: int | None, per_example: bool) -> Any:
        out = net.forward(p, x)[0]
        cols = sqrt_hessian(out, y) if mc is None else sample(key, out, y, mc)
        g = column_grads(p, x, y, cols)
        if per_example:
            return jtu.tree_map(lambda leaf: jnp.sum(leaf * leaf, axis=0), g)
        return jtu.tree_map(
            lambda leaf: loss.scale(x.shape[0]) * jnp.sum(leaf * leaf, axis=(0, 1)), g
        )

    def ad_kfac(p: Any, x: Any, y: Any, key: Any) -> Any:
        """MLP only: s per column and example as the bias gradient of each Dense layer,
        A from the forward's layer inputs."""
        out, caches = net.forward(p, x)
        cols = sample(key, out, y, 1)
        g = column_grads(p, x, y, cols)
        factors: list[dict[str, Any]] = []
        for layer_g, cache in zip(g, caches, strict=True):
            if not layer_g:
                factors.append({})
                continue
            a = cache[0]
            a1 = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
            s = layer_g["b"]
            factors.append(
                {
                    "a": a1.T @ a1 / a.shape[0],
                    "g": loss.scale(x.shape[0]) * jnp.einsum("cbo,cbp->op", s, s),
                }
            )
        return factors

    def ad_gvp(p: Any, x: Any, y: Any, key: Any, v: Any) -> Any:
        def f(q: Any) -> Any:
            return net.forward(q, x)[0]

        out, jv = jax.jvp(f, (p,), (v,))  # reference
        hjv = jax.jvp(jax.grad(lambda o: loss(o, y)), (out,), (jv,))[1]  # reference
        return jax.vjp(f, p)[1](hjv)[0]  # reference

    def ad_hvp(p: Any, x: Any, y: Any, key: Any, v: Any) -> Any:
        return jax.jvp(lambda q: ref(q, x, y), (p,), (v,))[1]  # reference

    dense_chain = all(isinstance(layer, Dense) for layer in net.layers)
    fns: dict[str, Callable[..., Any]] = {
        "jax.grad": lambda p, x, y, key, v: ref(p, x, y),
        "diag_ggn mc": lambda p, x, y, key, v: diag_ggn(net, loss, mc_samples=1)(p, x, y, key=key),
        "diag_ggn mc (autodiff)": lambda p, x, y, key, v: ad_diag(p, x, y, key, 1, False),
        "diag_ggn exact": lambda p, x, y, key, v: diag_ggn(net, loss)(p, x, y),
        "diag_ggn exact (autodiff)": lambda p, x, y, key, v: ad_diag(p, x, y, key, None, False),
        "per_example_diag_ggn mc": lambda p, x, y, key, v: per_example_diag_ggn(
            net, loss, mc_samples=1
        )(p, x, y, key=key),
        "per_example_diag_ggn mc (ad)": lambda p, x, y, key, v: ad_diag(p, x, y, key, 1, True),
        "kfac": lambda p, x, y, key, v: kfac(net, loss)(p, x, y, key=key),
        "kfac (autodiff)": lambda p, x, y, key, v: ad_kfac(p, x, y, key),
        "ggn_vector_product": lambda p, x, y, key, v: ggn_vector_product(net, loss)(p, x, y, v),
        "ggn_vector_product (ad)": ad_gvp,
        "diag_hessian": lambda p, x, y, key, v: diag_hessian(net, loss)(p, x, y),
        "hvp (autodiff)": ad_hvp,
    }
    if not dense_chain:  # the MLP-only rows
        for name in ("kfac (autodiff)", "diag_hessian"):
            del fns[name]
    return fns


def benchmark_curvature(
    *,
    arch: str = "mlp",
    batches: Sequence[int] | None = None,
    rounds: int = 20,
    budget_s: float = 10.0,
    only: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    precision: str | None = None,
    sample_s: float = MIN_SAMPLE_S,
) -> list[BenchRow]:
    """Time the curvature quantities and their autodiff routes beside ``jax.grad``.

    ``arch="mlp"``: the MLP 784-512-512-10 (relu, ``softmax_xent``, float32,
    default batch 256, 1024 on an accelerator); ``arch="cnn"``: the CNN of
    :func:`benchmark` (default batch 32, 128 on an accelerator). Rows: :data:`CURVATURE_BENCH_FUNCTIONS` (``kfac (autodiff)`` and
    ``diag_hessian`` for the MLP only). MC rows use one sampled column. The
    autodiff routes: the same loss square-root columns sent through ``vmap``
    of per-example ``jax.grad`` (diagonals, K-FAC's G), ``jvp``∘Hessian∘``vjp``
    (GGN-vector product) and one Hessian-vector product (``jvp`` of
    ``jax.grad``; an exact Hessian diagonal by autodiff needs P of them).
    Timing (K calls per sample), memory, the :data:`DISPATCH_FLOOR` row, ratios
    and ``precision`` as in :func:`benchmark`; ``only`` restricts the rows
    (``jax.grad`` always runs).
    """
    if arch not in ("mlp", "cnn"):
        raise ValueError(f"`arch` must be 'mlp' or 'cnn', got {arch!r}")
    check_precision(precision)
    in_shape: tuple[int, ...]
    if arch == "cnn":
        net, in_shape = _cnn(), CNN_IN_SHAPE
    else:
        net, in_shape = mlp([784, 512, 512, 10], "relu"), (784,)
    batches = default_batches(arch, "curvature") if batches is None else batches
    params = net.init(jax.random.key(0), jnp.float32)
    v = jtu.tree_map(
        lambda leaf: jax.random.normal(jax.random.key(3), leaf.shape, leaf.dtype), params
    )
    fns = _curvature_functions(net, "softmax_xent")
    if only is not None:
        unknown = set(only) - set(CURVATURE_BENCH_FUNCTIONS)
        if unknown:
            raise ValueError(
                f"unknown curvature rows {sorted(unknown)}; known: {list(CURVATURE_BENCH_FUNCTIONS)}"
            )
        fns = {k: f for k, f in fns.items() if k == "jax.grad" or k in only}
    names = [*fns, DISPATCH_FLOOR]
    rows: list[BenchRow] = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(1), (batch, *in_shape), jnp.float32)
        y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
        args = (params, x, y, jax.random.key(4), v)
        calls = {name: (fn, args) for name, fn in fns.items()}
        calls[DISPATCH_FLOOR] = (_dispatch_floor(args), args)
        with precision_context(precision):
            compiled, compile_s, bound = compile_calls(calls)
            peaks = warm_up(bound, compiled)
            times, k = _time_interleaved(bound, names, (), rounds, budget_s, sample_s)
        base = statistics.median(times["jax.grad"])
        rows.extend(
            _row(batch, name, times[name], base, compile_s, compiled, k, peaks) for name in names
        )
        if log is not None:
            log(format_benchmark([r for r in rows if r.batch == batch], header=False))
    return rows


# --- private training, DP-SGD (issue 18) --------------------------------------------

# The DP benchmark's rows, in table order: the non-private jax.grad step and the
# private step at expected batch E, what the padding and the clipping each cost,
# then the accumulating private step (4 physical chunks) beside 4 jax.grad steps,
# and the host's share (numpy Poisson sampling and gathering, not in any other row).
DP_BENCH_FUNCTIONS: tuple[str, ...] = (
    "jax.grad step",
    "dp step",
    "dp step, chunks of E/4",
    "dp step, E rows",
    "jax.grad step, padded rows",
    "noise draw",
    "4 × jax.grad step",
    "dp step, 4 chunks",
    "host: sampler.batch",
    "host: sampler.batch, 4E",
)

# Targets (issue 18), as ratios in one run.
BENCH_TARGETS_DP: tuple[BenchTarget, ...] = (
    BenchTarget("dp step", "jax.grad step", 1.15),
    BenchTarget("dp step, chunks of E/4", "jax.grad step", 1.15),
    BenchTarget("dp step, 4 chunks", "4 × jax.grad step", 1.2),
)

# The physical chunks of the accumulating private step in :func:`benchmark_dp`.
DP_CHUNKS = 4

# The data set each arch samples from: MNIST's and CIFAR-10's training-set sizes.
DP_DATASET_SIZES = {"mlp": 60_000, "cnn": 50_000}


@dataclasses.dataclass(frozen=True)
class DPBench:
    """One :func:`benchmark_dp` run at one expected batch size."""

    arch: str
    dataset_size: int
    expected_batch: int  # E
    padded_size: int  # the rows of the private step: E + 6 sd, rounded up
    chunk: int  # the physical batch of the accumulating step: E
    accumulated_padded_size: int  # its rows: 4E + 6 sd, rounded up to whole chunks
    rows: tuple[BenchRow, ...]


def _draws(sampler: Any, arrays: tuple[Any, ...]) -> Callable[[], Any]:
    """A call that draws the sampler's next step's batch on the host (a fresh sample
    each call, as in training)."""
    steps = itertools.count(1)
    return lambda: sampler.batch(arrays, next(steps))


# Poisson batches each chunked row cycles through, one per call: its time depends on
# the batch's size (the chunks after the last real example are skipped).
DP_DRAWS = 8


def _cycle(compiled: Any, calls: list[tuple[Any, ...]]) -> Callable[[], Any]:
    """A call that runs ``compiled`` on the next of ``calls``' arguments, in turn."""
    turn = itertools.cycle(calls)
    return lambda: compiled(*next(turn))


def benchmark_dp(
    *,
    arch: str = "mlp",
    sizes: Sequence[int] = (784, 512, 512, 10),
    batches: Sequence[int] | None = None,
    dataset_size: int | None = None,
    rounds: int = 30,
    budget_s: float = 10.0,
    log: Callable[[str], None] | None = None,
    precision: str | None = None,
    sample_s: float = MIN_SAMPLE_S,
) -> list[DPBench]:
    """Time a DP-SGD step (``jbp.make_dp_step``) beside a non-private ``jax.grad`` step.

    The network: ``arch="mlp"`` an MLP of ``sizes`` (relu; default 784-512-512-10,
    batch 256, 1024 on an accelerator), ``"cnn"`` the CNN of :func:`benchmark` on
    (32, 32, 3) images (batch 32, 128 on an accelerator); ``softmax_xent``, float32, ``optax.adam(1e-3)`` in every step.
    Fixed data: ``dataset_size`` random normal inputs and random labels (default
    60000 for the MLP, 50000 for the CNN). At each expected batch E of ``batches``:

    - ``jax.grad step``: ``make_step(gradient_source="autodiff")`` on E rows,
      the baseline of every ratio.
    - ``dp step``: ``make_dp_step(max_norm=1, noise_multiplier=1,
      expected_batch_size=E)`` on a Poisson batch of ``PoissonSampler(N, E)``:
      ``padded_size`` rows (E + 6 sd, rounded up) with its example mask, in one
      pass over every row.
    - ``dp step, chunks of E/4``: the same step with ``physical_batch_size=E/4``
      on batches sampled with ``multiple_of=E/4``: the chunks after the last real
      example are skipped, so the step costs about its real rows; timed over
      ``DP_DRAWS`` Poisson batches in turn (its time depends on the batch's size).
    - ``dp step, E rows``: the same private step on exactly E rows, no padding.
    - ``jax.grad step, padded rows``: the baseline on ``padded_size`` rows.
    - ``noise draw``: the Gaussian noise alone, one normal per parameter.
    - ``4 × jax.grad step``: 4 calls of the baseline's compiled step on 4
      batches of E rows, the state passed on, blocking once at the end. (Not
      one call of a ``lax.scan`` over the 4 steps: on CPU, XLA runs the CNN's
      convolutions inside a loop body about 30× slower, 2.6 s for the 4 steps.)
    - ``dp step, 4 chunks``: the private step on a logical batch of expected
      size 4E, sampled with ``multiple_of=E`` and ``physical_batch_size=E``:
      the chunks holding real examples (4 or 5, mostly) accumulated by the
      step's own loop, one noise draw, one update; over ``DP_DRAWS`` batches
      in turn.
    - ``host: sampler.batch`` (and ``, 4E``): drawing a Poisson sample and
      gathering its padded batch on the host with numpy, per step. Every
      device row is timed on a batch drawn beforehand, so no device row
      includes this.

    Every function is compiled and warmed up first, then all are timed
    interleaved as in :func:`benchmark` (K calls per sample, the
    :data:`DISPATCH_FLOOR` row with the ``jax.grad step``'s arguments, memory,
    ``precision``); the ratios are to ``jax.grad step``.

    Returns:
      One :class:`DPBench` per expected batch size.
    """
    import optax

    from ._sampling import PoissonSampler
    from ._train import init_state, make_dp_step, make_step

    if arch not in ("mlp", "cnn"):
        raise ValueError(f"`arch` must be 'mlp' or 'cnn', got {arch!r}")
    check_precision(precision)
    in_shape: tuple[int, ...]
    if arch == "cnn":
        net, in_shape = _cnn(), CNN_IN_SHAPE
    else:
        net, in_shape = mlp(list(sizes), "relu"), (sizes[0],)
    batches = default_batches(arch, "dp") if batches is None else batches
    n = DP_DATASET_SIZES[arch] if dataset_size is None else dataset_size
    classes = net.output_shape(in_shape)[-1]
    rng = np.random.default_rng(0)
    data_x = rng.standard_normal((n, *in_shape), dtype=np.float32)
    data_y = rng.integers(0, classes, n).astype(np.int32)
    opt = optax.adam(1e-3)
    state = init_state(net, opt, jax.random.key(0))
    loss = "softmax_xent"
    ref_step = make_step(net, loss, opt, gradient_source="autodiff", jit=False)

    def noise(s: Any) -> Any:
        leaves = jtu.tree_leaves(s.params)
        keys = jax.random.split(s.key, len(leaves))
        return [jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys, strict=True)]

    chunks = DP_CHUNKS
    out = []
    for e in batches:
        if not 0 < chunks * e <= n:
            raise ValueError(f"{chunks} × batch {e} does not fit a data set of {n} examples")
        sampler = PoissonSampler(n, e, seed=0)
        quarter = max(1, e // 4)
        small = PoissonSampler(n, e, seed=0, multiple_of=quarter)
        chunk = e
        big = PoissonSampler(n, chunks * e, seed=0, multiple_of=chunk)
        dp = make_dp_step(
            net, loss, opt, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=e, jit=False
        )
        dp_quarters = make_dp_step(
            net, loss, opt, max_norm=1.0, noise_multiplier=1.0, expected_batch_size=e,
            physical_batch_size=quarter, jit=False,
        )  # fmt: skip
        dp_acc = make_dp_step(
            net,
            loss,
            opt,
            max_norm=1.0,
            noise_multiplier=1.0,
            expected_batch_size=chunks * e,
            physical_batch_size=chunk,
            jit=False,
        )
        (xp, yp), mp = sampler.batch((data_x, data_y), 0)

        def drawn(sam: Any) -> list[tuple[Any, ...]]:
            calls = []
            for k in range(DP_DRAWS):
                (xs, ys), ms = sam.batch((data_x, data_y), k)
                calls.append((state, jnp.asarray(xs), jnp.asarray(ys), None, jnp.asarray(ms)))
            return calls

        quarter_calls, big_calls = drawn(small), drawn(big)
        x_e, y_e = jnp.asarray(data_x[:e]), jnp.asarray(data_y[:e])
        parts = [
            (jnp.asarray(data_x[k * e : (k + 1) * e]), jnp.asarray(data_y[k * e : (k + 1) * e]))
            for k in range(chunks)
        ]
        device_rows: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
            "jax.grad step": (ref_step, (state, x_e, y_e)),
            "dp step": (dp, (state, jnp.asarray(xp), jnp.asarray(yp), None, jnp.asarray(mp))),
            "dp step, E rows": (dp, (state, x_e, y_e)),
            "jax.grad step, padded rows": (ref_step, (state, jnp.asarray(xp), jnp.asarray(yp))),
            "noise draw": (noise, (state,)),
            DISPATCH_FLOOR: (_dispatch_floor((state, x_e, y_e)), (state, x_e, y_e)),
        }
        cycled = {
            "dp step, chunks of E/4": (dp_quarters, quarter_calls),
            "dp step, 4 chunks": (dp_acc, big_calls),
        }
        with precision_context(precision):
            compiled, compile_s, bound = compile_calls(device_rows)
            peaks = warm_up(bound, compiled)
            for name, (fn, calls) in cycled.items():
                t0 = time.perf_counter()
                compiled[name] = jax.jit(fn).lower(*calls[0]).compile()
                compile_s[name] = time.perf_counter() - t0
                bound[name] = _cycle(compiled[name], calls)
                for _ in calls:
                    jax.block_until_ready(bound[name]())  # warm-up

            def ref_steps(c: Any = compiled["jax.grad step"], batches: Any = parts) -> Any:
                st = state
                for xk, yk in batches:
                    st, metrics = c(st, xk, yk)
                return st, metrics

            jax.block_until_ready(ref_steps())
            bound["4 × jax.grad step"] = ref_steps
            compiled["4 × jax.grad step"] = compiled["jax.grad step"]
            compile_s["4 × jax.grad step"] = compile_s["jax.grad step"]
            for name, sam in (("host: sampler.batch", sampler), ("host: sampler.batch, 4E", big)):
                bound[name] = _draws(sam, (data_x, data_y))
                compiled[name], compile_s[name] = None, 0.0
            names = [*DP_BENCH_FUNCTIONS, DISPATCH_FLOOR]
            times, k = _time_interleaved(bound, names, (), rounds, budget_s, sample_s)
        base = statistics.median(times["jax.grad step"])
        rows = tuple(
            _row(e, name, times[name], base, compile_s, compiled, k, peaks) for name in names
        )
        result = DPBench(arch, n, e, len(mp), chunk, big.padded_size, rows)
        out.append(result)
        if log is not None:
            log(format_dp_benchmark([result]))
    return out


def format_dp_benchmark(results: Sequence[DPBench]) -> str:
    """:func:`benchmark_dp`'s results: per expected batch, the padded sizes, then the rows."""
    parts = []
    for r in results:
        parts.append(
            f"expected batch E = {r.expected_batch} of N = {r.dataset_size} "
            f"(q = {r.expected_batch / r.dataset_size:.4g}): the private step's batch is padded "
            f"to {r.padded_size} rows ({r.padded_size / r.expected_batch:.2f} E); the "
            f"accumulating step's (4E) to {r.accumulated_padded_size} rows = "
            f"{r.accumulated_padded_size // r.chunk} chunks of E, those after the last real "
            "example skipped\n" + format_benchmark(r.rows)
        )
    return "\n\n".join(parts)
