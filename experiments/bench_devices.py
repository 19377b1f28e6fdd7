"""The per-example benchmark and a data-parallel scaling table, on whatever backend JAX finds.

First the table of ``jbp bench`` (MLP 784-512-512-10, relu, softmax_xent,
float32; batches 64, 256, 1024 on CPU, 256, 1024, 4096 on an accelerator:
jax.grad, jbp.backprop, the per-example quantities and their vmap(jax.grad)
counterparts, ratios in one run), then ``jbp bench --scaling``: the same global
batch (default 1024 on CPU, 4096 on an accelerator) split over 1, 2, 4, …
devices, params replicated: jbp.backprop, per_example_norms, clipped_grad and
an adam training step, with the speed-up over one device. Both tables carry
the device kind, backend, jax/jaxlib versions and matmul precision; with
``--json DIR`` each is also written as ``DIR/bench.json`` and
``DIR/scaling.json`` (the schema of ``jbp bench --json``).

On a CPU with no accelerator, ``--simulate N`` asks XLA for N host devices
(they share the machine's cores, so the table shows the cost of partitioning,
not a speed-up).

    python experiments/bench_devices.py [--simulate 4] [--batch 1024] [--skip-per-example]
        [--precision default|high|highest] [--json DIR]
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--simulate",
        type=int,
        default=None,
        metavar="N",
        help="simulate N CPU devices (only before JAX starts; CPU only)",
    )
    parser.add_argument("--batch", type=int, default=None, help="the scaling table's global batch")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--skip-per-example", action="store_true", help="only the scaling table")
    parser.add_argument("--precision", choices=("default", "high", "highest"), default=None)
    parser.add_argument("--json", metavar="DIR", default=None, help="write the tables' JSON here")
    args = parser.parse_args(argv)
    if args.simulate:
        flag = "--xla_force_host_platform_device_count"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={args.simulate}"

    from jbp.cli import main as jbp_main

    common = ["--rounds", str(args.rounds)]
    if args.precision is not None:
        common += ["--precision", args.precision]

    def json_to(name: str) -> list[str]:
        if args.json is None:
            return []
        os.makedirs(args.json, exist_ok=True)
        return ["--json", os.path.join(args.json, name)]

    if not args.skip_per_example:
        jbp_main(["bench", *common, *json_to("bench.json")])
        print()
    batch = [] if args.batch is None else ["--batches", str(args.batch)]
    return jbp_main(["bench", "--scaling", *batch, *common, *json_to("scaling.json")])


if __name__ == "__main__":
    raise SystemExit(main())
