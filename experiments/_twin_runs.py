"""Shared by the training experiments: compare a backprop run with an autodiff run
from the same seed (curves, parameters) and plot them overlaid. Public API only."""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp

import jbp

SOURCES = ("backprop", "autodiff")


def fit_twins(
    net: Any, optimizer: Any, data: jbp.Dataset, args: Any, **fit_options: Any
) -> dict[str, tuple]:
    """``jbp.fit`` on softmax_xent once per gradient source, from the same seed
    (``args``: epochs, batch_size, seed, dtype; ``fit_options``: any other keyword
    of ``jbp.fit``, e.g. ``check_every``); each source's result and seconds."""
    runs = {}
    for source in SOURCES:
        start = time.perf_counter()
        result = jbp.fit(
            net,
            "softmax_xent",
            optimizer,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            dtype=jnp.dtype(args.dtype),
            gradient_source=source,
            **fit_options,
        )
        runs[source] = (result, time.perf_counter() - start)
    return runs


def report_twin_runs(a: jbp.FitResult, b: jbp.FitResult, dtype: str, path: str, title: str) -> str:
    """Print the largest per-epoch curve differences and the parameter comparison of
    run ``a`` (backprop) and ``b`` (autodiff); write both runs' curves to ``path``."""
    for key in ("train_loss", "test_loss", "test_accuracy"):
        worst = max(abs(ra[key] - rb[key]) for ra, rb in zip(a.history, b.history, strict=True))
        print(f"largest per-epoch |difference| in {key}: {worst:.3g}")
    report = jbp.compare(a.state.params, b.state.params, names=("backprop run", "autodiff run"))
    worst = max(row.max_abs_err for row in report.rows)
    print("parameters after training, backprop run vs autodiff run:")
    print(report)
    note = (
        f"largest |parameter difference| after {int(a.state.step)} steps: {worst:.3g} "
        f"({dtype}; {report.n_bitwise} of {len(report.rows)} leaves bitwise identical)"
    )
    print(note)
    written = jbp.plot_curves(
        {"backprop": a.history, "autodiff": b.history}, path, title=title, note=note
    )
    print(f"wrote {written}")
    return written
