"""Per-example gradient analysis against vmap(jax.grad), side by side in one run.

MLP 784-512-512-10, relu, softmax_xent, float32, batches 64, 256, 1024 (by
default; 256, 1024, 4096 on an accelerator) on whatever backend JAX finds.
Prints the device, versions and matmul precision, then the table of per-call
median and min milliseconds (K back-to-back calls per sample, one block),
ratios to jax.grad measured in the same run, compile seconds, XLA's memory
estimate and the device's peak memory, a dispatch-floor row, then the ratio
targets of the cost model. The same as ``jbp bench``; every option of ``jbp
bench --help`` works here (``--precision``, ``--dtype bfloat16``, ``--json``).

    python experiments/bench_per_example.py [--batches 64,256,1024] [--rounds 30]
"""

import sys

from jbp.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
