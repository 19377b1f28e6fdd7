"""Benchmark: jbp.backprop against jax.grad, side by side, on whatever backend JAX finds.

MLP 784-512-512-10, relu, softmax_xent, float32. For each batch size, both
gradient functions are compiled (compile time reported separately), then timed
interleaved (alternating order each round) so that machine noise hits both
alike; the table gives median milliseconds, the ratio backprop / jax.grad, the
cost-model floor 6·B·P flops at the measured matmul rate, and XLA's static
memory estimate (temporaries + outputs) of each compiled function.

    python experiments/bench_backprop.py [--batches 64,256,1024] [--rounds 50]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import jbp


def _compile(fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _memory(compiled) -> float:
    try:
        m = compiled.memory_analysis()
        return (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
    except Exception:  # not every backend reports it
        return float("nan")


def _time(compiled, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} python {platform.python_version()}")
    net = jbp.mlp([784, 512, 512, 10], "relu")
    params = net.init(jax.random.key(0), jnp.float32)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    fns = {
        "jax.grad": jax.grad(jbp.objective(net, "softmax_xent")),  # reference
        "jbp.backprop": jbp.backprop(net, "softmax_xent"),
    }
    header = f"{'batch':>6} {'function':<14} {'compile s':>9} {'median ms':>10} {'ratio':>6} {'GFLOP/s':>8} {'mem MiB':>8}"
    print(header)
    print("-" * len(header))
    for batch in [int(b) for b in args.batches.split(",")]:
        x = jax.random.normal(jax.random.key(1), (batch, 784), jnp.float32)
        y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
        compiled, compile_s = {}, {}
        for name, fn in fns.items():
            compiled[name], compile_s[name] = _compile(fn, params, x, y)
            jax.block_until_ready(compiled[name](params, x, y))
        times: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(_time(compiled[name], (params, x, y)))
        base = statistics.median(times["jax.grad"])
        for name in names:
            med = statistics.median(times[name])
            print(
                f"{batch:>6} {name:<14} {compile_s[name]:>9.2f} {med * 1e3:>10.3f} "
                f"{med / base:>6.2f} {6 * batch * n_params / med / 1e9:>8.1f} "
                f"{_memory(compiled[name]):>8.2f}"
            )


if __name__ == "__main__":
    main()
