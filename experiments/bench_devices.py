"""The per-example benchmark and a data-parallel scaling table, on whatever backend JAX finds.

First the table of ``jbp bench`` (MLP 784-512-512-10, relu, softmax_xent,
float32, batches 64, 256, 1024: jax.grad, jbp.backprop, the per-example
quantities and their vmap(jax.grad) counterparts, ratios in one run), then
the same global batch (default 1024) split over 1, 2, 4, … devices, params
replicated: jbp.backprop, per_example_norms, clipped_grad and an adam
training step, with the speed-up over one device.

On a CPU with no accelerator, ``--simulate N`` asks XLA for N host devices
(they share the machine's cores, so the table shows the cost of partitioning,
not a speed-up).

    python experiments/bench_devices.py [--simulate 4] [--batch 1024] [--skip-per-example]
"""

from __future__ import annotations

import argparse
import os
import platform


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--simulate",
        type=int,
        default=None,
        metavar="N",
        help="simulate N CPU devices (only before JAX starts; CPU only)",
    )
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-per-example", action="store_true", help="only the scaling table")
    args = parser.parse_args(argv)
    if args.simulate:
        flag = "--xla_force_host_platform_device_count"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={args.simulate}"

    import jax

    import jbp
    from jbp.cli import main as jbp_main

    devices = jax.devices()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} × "
        f"{devices[0].device_kind}, {platform.machine()}, python {platform.python_version()}"
    )
    if not args.skip_per_example:
        jbp_main(["bench"])
        print()
    rows = jbp.benchmark_scaling(batch=args.batch, rounds=args.rounds)
    print(f"data-parallel scaling, global batch {args.batch}, MLP 784-512-512-10 relu, float32:")
    print(jbp.format_scaling(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
