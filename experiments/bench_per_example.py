"""Per-example gradient analysis against vmap(jax.grad), side by side in one run.

MLP 784-512-512-10, relu, softmax_xent, float32, batches 64, 256, 1024 (by
default) on whatever backend JAX finds. Prints the table of median
milliseconds, ratios to jax.grad measured in the same run, compile seconds
and XLA's memory estimate, then the ratio targets of the cost model. The same
as ``jbp bench``; every option of ``jbp bench --help`` works here.

    python experiments/bench_per_example.py [--batches 64,256,1024] [--rounds 30]
"""

import sys

from jbp.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
