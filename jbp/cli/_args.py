"""Argument types shared by the subcommands: one clear message per bad value."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

import jbp

DTYPES = ("float32", "float64")


def names_list(kind: str, known: Callable[[], Sequence[str]]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type for a comma-separated list of names out of ``known()``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"give at least one {kind} name")
        choices = tuple(known())
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {name!r}; known {kind}s: {', '.join(choices)}"
                )
        return names

    return parse


def loss_name(text: str) -> str:
    known = jbp.loss_names()
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown loss {text!r}; known losses: {', '.join(known)}")
    return text


def int_at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def hidden_widths(text: str) -> tuple[int, ...]:
    """Comma-separated hidden layer widths, or ``none`` for no hidden layer."""
    if text.strip().lower() in ("", "none"):
        return ()
    widths = []
    for part in text.split(","):
        try:
            width = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated layer widths such as 128,64, got {text!r}"
            ) from None
        if width < 1:
            raise argparse.ArgumentTypeError(f"layer widths must be at least 1, got {width}")
        widths.append(width)
    return tuple(widths)


def channel_counts(text: str) -> tuple[int, ...]:
    """Comma-separated channel counts of convolution layers, at least one."""
    counts = []
    for part in text.split(","):
        try:
            count = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated channel counts such as 32,64, got {text!r}"
            ) from None
        if count < 1:
            raise argparse.ArgumentTypeError(f"channel counts must be at least 1, got {count}")
        counts.append(count)
    return tuple(counts)


def positive_float(text: str) -> float:
    """A positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def activation_name(text: str) -> str:
    """One registered activation name."""
    if text not in jbp.activation_names():
        known = ", ".join(jbp.activation_names())
        raise argparse.ArgumentTypeError(f"unknown activation {text!r}; known: {known}")
    return text


def table(rows: Sequence[tuple[str, ...]]) -> str:
    """Fixed-width columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def device() -> str:
    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    return backend if kind == backend else f"{backend} ({kind})"


def simulate_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices, unless ``XLA_FLAGS`` already says how many.

    XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts
    its backends, so this works only before the first computation (as in a
    fresh ``jbp`` process); on a GPU/TPU machine the accelerator's devices are
    used and the flag changes nothing that jbp uses.
    """
    flag = "--xla_force_host_platform_device_count"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}={n}".strip()
