"""How close is hand-written backprop to jax.grad as networks get deeper?

For every depth 1..8 (Dense layers) and dtype float32/float64, draws random
problems with ``jbp.random_problem`` (widths 1-32, any activation, any loss;
problem i of a depth is the same architecture in both dtypes), verifies each
with ``jbp.verify`` under jit, and records the worst relative error per
problem. Writes

- ``OUT/verify_sweep.csv``: one row per problem;
- ``OUT/verify_sweep.png``: median and max relative error against depth, log
  scale, one colour per dtype, with the dtype's tolerance as a dotted line;

and prints the table of medians and maxima. Runs on whatever backend JAX
finds. Most of the time is XLA compiling two gradients per problem: 0.3 s
(depth 1) to 1.2 s (depth 8) on a 2-core CPU, hence the default of 8 problems
per depth and dtype (about 100 s there); ``--per-depth 50`` takes about 10
minutes. Compiling is no faster on a GPU (0.6 s to 2.2 s a problem on an H100).

    python experiments/verify_sweep.py [--per-depth 8] [--seed 0] [--out experiments/out]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import time

import jax
import numpy as np

import jbp

DEPTHS = range(1, 9)
DTYPES = ("float32", "float64")
FIELDS = (
    "depth",
    "dtype",
    "index",
    "loss",
    "n_params",
    "leaves",
    "bitwise_leaves",
    "max_rel_err",
    "rtol",
    "ok",
    "seconds",
    "description",
)


def sweep(per_depth: int, seed: int, writer: csv.DictWriter) -> list[dict]:
    """Verify ``per_depth`` random problems for every depth and dtype; one dict each,
    also written to ``writer`` as it comes (a cut-off run keeps what it did)."""
    rows = []
    for depth in DEPTHS:
        start = time.perf_counter()
        for index in range(per_depth):
            for dtype in DTYPES:
                problem = jbp.random_problem(
                    np.random.default_rng((seed, depth, index)),
                    dtype=dtype,
                    min_depth=depth,
                    max_depth=depth,
                )
                t0 = time.perf_counter()
                report = jbp.verify(problem.net, problem.loss, problem.params, problem.x, problem.y)
                rows.append(
                    {
                        "depth": depth,
                        "dtype": dtype,
                        "index": index,
                        "loss": problem.loss,
                        "n_params": problem.n_params,
                        "leaves": len(report.rows),
                        "bitwise_leaves": report.n_bitwise,
                        "max_rel_err": report.max_rel_err,
                        "rtol": report.rtol,
                        "ok": report.ok,
                        "seconds": round(time.perf_counter() - t0, 4),
                        "description": problem.description,
                    }
                )
                writer.writerow(rows[-1])
        failed = sum(not r["ok"] for r in rows if r["depth"] == depth)
        print(
            f"  depth {depth}: {2 * per_depth} problems in {time.perf_counter() - start:.1f} s, "
            f"{failed} failed",
            flush=True,
        )
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Median and max relative error, failures and bitwise share per (dtype, depth)."""
    table = []
    for dtype in DTYPES:
        for depth in DEPTHS:
            cell = [r for r in rows if r["dtype"] == dtype and r["depth"] == depth]
            if not cell:
                continue
            errs = [r["max_rel_err"] if math.isfinite(r["max_rel_err"]) else math.inf for r in cell]
            leaves = sum(r["leaves"] for r in cell)
            table.append(
                {
                    "dtype": dtype,
                    "depth": depth,
                    "n": len(cell),
                    "median": statistics.median(errs),
                    "max": max(errs),
                    "rtol": cell[0]["rtol"],
                    "failed": sum(not r["ok"] for r in cell),
                    "bitwise": sum(r["bitwise_leaves"] for r in cell) / leaves
                    if leaves
                    else math.nan,
                }
            )
    return table


def format_table(table: list[dict]) -> str:
    header = (
        "dtype",
        "depth",
        "n",
        "median rel err",
        "max rel err",
        "tolerance",
        "failed",
        "bitwise",
    )
    lines = [header] + [
        (
            t["dtype"],
            str(t["depth"]),
            str(t["n"]),
            f"{t['median']:.2e}",
            f"{t['max']:.2e}",
            f"{t['rtol']:.0e}",
            str(t["failed"]),
            f"{100 * t['bitwise']:.0f}%",
        )
        for t in table
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            [line[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        )
        for line in lines
    )


def plot(table: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype, colour in zip(DTYPES, ("tab:blue", "tab:orange"), strict=True):
        cells = [t for t in table if t["dtype"] == dtype]
        if not cells:
            continue
        floor = float(np.finfo(dtype).eps) / 100  # zero error (bitwise) drawn here
        depths = [t["depth"] for t in cells]
        for stat, style in (("max", "-o"), ("median", "--s")):
            values = [max(t[stat], floor) for t in cells]
            ax.plot(depths, values, style, color=colour, label=f"{dtype} {stat}")
        ax.axhline(
            cells[0]["rtol"],
            color=colour,
            linestyle=":",
            label=f"{dtype} tolerance {cells[0]['rtol']:.0e}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("depth (Dense layers)")
    ax.set_ylabel("worst leaf error relative to scale")
    ax.set_title(title, fontsize=9)
    ax.text(
        0.01,
        0.01,
        "errors of exactly 0 are drawn at ε/100",
        transform=ax.transAxes,
        fontsize=7,
        color="grey",
    )
    ax.legend(fontsize=7, ncol=2, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "out"),
        help="output folder (default experiments/out)",
    )
    parser.add_argument(
        "--per-depth", type=int, default=8, help="problems per depth and dtype (default 8)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    args = parser.parse_args(argv)
    if args.per_depth < 1:
        parser.error(f"--per-depth must be at least 1, got {args.per_depth}")

    jax.config.update("jax_enable_x64", True)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, "
        f"{platform.machine()}, python {platform.python_version()}"
    )
    print(
        f"depths {DEPTHS.start}-{DEPTHS.stop - 1}, {args.per_depth} problems per depth and "
        f"dtype, seed {args.seed}, under jit"
    )
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "verify_sweep.csv")
    start = time.perf_counter()
    with open(csv_path, "w", newline="", encoding="utf-8", buffering=1) as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        rows = sweep(args.per_depth, args.seed, writer)
    seconds = time.perf_counter() - start
    table = summarise(rows)
    png_path = os.path.join(args.out, "verify_sweep.png")
    plot(
        table,
        png_path,
        f"jbp.backprop vs jax.grad, {args.per_depth} random problems per "
        f"point, backend {jax.default_backend()}",
    )
    print(format_table(table))
    failed = sum(not r["ok"] for r in rows)
    print(
        f"{len(rows)} problems in {seconds:.0f} s, {failed} failed; wrote {csv_path} and {png_path}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
