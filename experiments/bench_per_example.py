"""Per-example gradient analysis against vmap(jax.grad), side by side in one run.

MLP 784-512-512-10, relu, softmax_xent, float32, batches 64, 256, 1024 (by
default) on whatever backend JAX finds. Prints the table of median
milliseconds, ratios to jax.grad measured in the same run, compile seconds
and XLA's memory estimate, then the ratio targets of the cost model.

    python experiments/bench_per_example.py [--batches 64,256,1024] [--rounds 30]
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp

import jbp

TARGETS = [  # (function, compared with, bound on the ratio, batch or None for every batch)
    ("jbp.backprop", "jax.grad", 1.05, None),
    ("per_example_norms", "jax.grad", 0.8, None),
    ("clipped_grad", "jax.grad", 1.15, None),
    ("sum_grad_squared", "jax.grad", 1.4, None),
    ("per_example_grads", "vmap(jax.grad)", 1.0, None),
    ("per_example_norms", "norms via vmap", 1 / 30, 256),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per slow function")
    parser.add_argument("--sizes", default="784,512,512,10")
    args = parser.parse_args(argv)

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}, "
          f"{platform.machine()}, python {platform.python_version()}")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"MLP {'-'.join(map(str, sizes))}, relu, softmax_xent, float32")
    rows = jbp.benchmark(
        sizes, batches=[int(b) for b in args.batches.split(",")], rounds=args.rounds,
        budget_s=args.budget, dtype=jnp.float32,
    )
    print(jbp.format_benchmark(rows))
    print("\ntargets (ratios measured in this run):")
    by = {(r.batch, r.name): r.median_ms for r in rows}
    missed = 0
    for name, base, bound, only in TARGETS:
        for batch in sorted({r.batch for r in rows}):
            if only is not None and batch != only:
                continue
            ratio = by[batch, name] / by[batch, base]
            ok = ratio <= bound
            missed += not ok
            print(f"  batch {batch:>5}: {name} / {base} = {ratio:.3f} (target ≤ {bound:.3g}) "
                  f"{'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
