"""Poisson sampling in fixed shapes, the sampler DP-SGD's privacy accounting assumes.

Each step includes every one of the N training examples independently with
probability q (so the batch size is Binomial(N, q), mean ``q·N``), unlike
shuffling into fixed batches, whose privacy the Poisson accountants overstate.
The step's batch is padded to a fixed number of rows with an example mask
(False at padding rows, which hold zeros), so a jitted step compiles once.
A step's sample is a function of ``(seed, step)`` only: a resumed run draws
the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._checks import check_count

# How many standard deviations above q·N the default padding reaches: a batch
# larger than that has probability below 1e-9 per step (it gets a larger
# padding, not a cut).
PAD_SDS = 6.0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class PoissonSampler:
    """Poisson-sampled batches of a data set, padded to a fixed shape with an example mask.

    Args:
      dataset_size: N, the number of training examples.
      expected_batch_size: ``q·N``; each example joins a step with probability
        ``q = expected_batch_size / N``.
      seed: seeds the samples; step ``k``'s sample depends on ``(seed, k)`` only.
      multiple_of: pad every batch to a multiple of this (the physical chunk of
        an accumulating step).
      max_batch_size: a cap (truncated Poisson): a sample larger than the cap is
        cut to a uniformly random subset of the cap's size. This changes the
        mechanism: account for it as such (``jbp.dp_epsilon(...,
        dataset_size=N, max_batch_size=cap)``); a cap near ``q·N`` costs ε.
        None (default): no cut; batches are padded to ``padded_size`` =
        ``q·N + 6 sd`` rounded up to ``multiple_of``, and a rarer larger
        sample to the next multiple of ``multiple_of`` that holds it (a new
        shape, so one more compilation).

    Example:
      >>> sampler = PoissonSampler(1000, 50, seed=0)
      >>> idx, mask = sampler.sample(0)
      >>> idx.shape == mask.shape == (sampler.padded_size,), int(mask.sum()) > 0
      (True, True)
    """

    def __init__(
        self,
        dataset_size: int,
        expected_batch_size: float,
        *,
        seed: int = 0,
        multiple_of: int = 1,
        max_batch_size: int | None = None,
    ) -> None:
        check_count("dataset_size", dataset_size)
        check_count("multiple_of", multiple_of)
        e = expected_batch_size
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e <= dataset_size:
            raise ValueError(
                f"`expected_batch_size` must be in (0, dataset_size = {dataset_size}], got {e!r}"
            )
        if max_batch_size is not None:
            check_count("max_batch_size", max_batch_size)
        check_count("seed", seed, low=0)
        self.dataset_size = dataset_size
        self.expected_batch_size = float(e)
        self.sampling_rate = float(e) / dataset_size
        self.seed, self.multiple_of, self.max_batch_size = seed, multiple_of, max_batch_size
        if max_batch_size is not None:
            reach = max_batch_size
        else:
            sd = math.sqrt(self.expected_batch_size * (1 - self.sampling_rate))
            reach = min(dataset_size, math.ceil(self.expected_batch_size + PAD_SDS * sd))
        self.padded_size = _round_up(max(reach, 1), multiple_of)

    def __repr__(self) -> str:
        cap = "" if self.max_batch_size is None else f", max_batch_size={self.max_batch_size}"
        return (
            f"PoissonSampler(N={self.dataset_size}, q={self.sampling_rate:.6g}, "
            f"padded_size={self.padded_size}{cap})"
        )

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Step ``step``'s sample: ``(indices, example_mask)``, both ``(rows,)`` with
        ``rows = padded_size`` (more only for a rare large sample without a cap); the
        real examples first, in increasing order, then padding (index 0, mask False)."""
        rng = np.random.default_rng([self.seed, step, 0x50155])
        chosen = np.flatnonzero(rng.random(self.dataset_size) < self.sampling_rate)
        cap = self.max_batch_size
        if cap is not None and len(chosen) > cap:
            chosen = np.sort(rng.choice(chosen, size=cap, replace=False))
        rows = max(self.padded_size, _round_up(len(chosen), self.multiple_of))
        indices = np.zeros(rows, np.int64)
        indices[: len(chosen)] = chosen
        mask = np.zeros(rows, bool)
        mask[: len(chosen)] = True
        return indices, mask

    def batch(self, arrays: Any, step: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        """Step ``step``'s batch of each array (rows indexed by example): the chosen
        rows, then rows of zeros, and the example mask."""
        indices, mask = self.sample(step)
        n = int(mask.sum())
        out = []
        for a in arrays:
            a = np.asarray(a)
            if a.shape[0] != self.dataset_size:
                raise ValueError(
                    f"an array of {a.shape[0]} rows was given to a sampler of "
                    f"{self.dataset_size} examples"
                )
            b = np.zeros((len(indices), *a.shape[1:]), a.dtype)
            b[:n] = a[indices[:n]]
            out.append(b)
        return tuple(out), mask

    def batches(
        self, x: Any, y: Any, steps: int, *, start: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(x_batch, y_batch, example_mask)`` for steps ``start, ..., steps - 1``."""
        for step in range(start, steps):
            (xb, yb), mask = self.batch((x, y), step)
            yield xb, yb, mask
