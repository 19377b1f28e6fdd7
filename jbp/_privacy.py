"""The privacy ledger of DP-SGD: ε from σ, q and the steps, and σ for a target ε.

jbp keeps no accountant of its own. Every ε here comes from Google's
``dp-accounting`` (an optional dependency: ``pip install 'jbp[dp]'``):

- ``"pld"`` (default): privacy loss distributions (Koskela et al. 2020,
  Doroshenko et al. 2022), numerically tight, pessimistic by construction;
- ``"rdp"``: Rényi DP (Mironov et al. 2019), looser, faster.

The mechanism accounted is the one :func:`jbp.make_dp_step` runs on the
batches of :class:`jbp.PoissonSampler`: each step includes every training
example independently with probability ``q`` (Poisson sampling), clips each
example's gradient to L2 norm ``C``, adds Gaussian noise of standard deviation
``σ·C`` to the *sum* and divides by the expected batch size ``q·N``, a public
constant. Neighbouring data sets differ by adding or removing one example
(``ADD_OR_REMOVE_ONE``, the sensitivity of the clipped sum is ``C``); under
replace-one the sensitivity is ``2C``, so the same run's ε is that of
``σ/2``. A cap on the batch (``max_batch_size``: a Poisson batch larger than
the cap is cut to a random subset of the cap's size) is accounted for as
truncated Poisson sampling (``TruncatedSubsampledGaussianDpEvent``, PLD only):
a cap close to the expected batch costs ε (q·N = 64 of N = 1437, σ = 1, 330 steps:
a cap of 72 instead of 96 more than doubles it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from typing import Any

import numpy as np

from ._checks import check_count, check_number

ACCOUNTANTS = ("pld", "rdp")


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError:  # pragma: no cover - the test install has it
        raise ImportError(
            "the privacy ledger needs Google's dp-accounting: pip install 'jbp[dp]' "
            "(or pip install dp-accounting)"
        ) from None
    return dp_accounting


@contextlib.contextmanager
def _quiet_absl() -> Any:
    """dp-accounting's absl warnings held back (the result does not change)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"`accountant` must be one of {', '.join(map(repr, ACCOUNTANTS))}, got {accountant!r}"
        )
    return str(accountant)


@dataclasses.dataclass(frozen=True)
class _Mechanism:
    """One DP-SGD step as dp-accounting describes it (checked arguments)."""

    sampling_rate: float
    accountant: str = "pld"
    dataset_size: int | None = None
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        q = self.sampling_rate
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise ValueError(f"`sampling_rate` must be in (0, 1], got {q!r}")
        check_accountant(self.accountant)
        if self.max_batch_size is not None:
            check_count("max_batch_size", self.max_batch_size)
            if self.dataset_size is None:
                raise ValueError("`max_batch_size` (truncated Poisson) needs `dataset_size`")
            check_count("dataset_size", self.dataset_size)
            if self.accountant != "pld":
                raise ValueError(
                    "a capped batch (`max_batch_size`, truncated Poisson sampling) is accounted "
                    "by the PLD accountant only; use accountant='pld'"
                )

    def event(self, noise_multiplier: float) -> Any:
        dpa = _dp_accounting()
        if self.max_batch_size is not None:
            assert self.dataset_size is not None
            return dpa.TruncatedSubsampledGaussianDpEvent(
                self.dataset_size, self.sampling_rate, self.max_batch_size, noise_multiplier
            )
        return dpa.PoissonSampledDpEvent(self.sampling_rate, dpa.GaussianDpEvent(noise_multiplier))

    def fresh_accountant(self) -> Any:
        dpa = _dp_accounting()
        if self.accountant == "pld":
            return dpa.pld.PLDAccountant()  # add-or-remove-one is its default
        return dpa.rdp.RdpAccountant()

    def epsilon(self, noise_multiplier: float, steps: int, delta: float) -> float:
        if steps == 0:
            return 0.0
        if noise_multiplier == 0:
            return math.inf
        acc = self.fresh_accountant()
        with _quiet_absl():  # RDP warns of each Rényi order it drops, harmlessly
            acc.compose(self.event(noise_multiplier), steps)
            return float(acc.get_epsilon(delta))


def dp_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "pld",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> float:
    """ε spent by ``steps`` DP-SGD steps (add-or-remove-one neighbours), from dp-accounting.

    Args:
      noise_multiplier: σ, the noise's standard deviation over the clipping norm.
      sampling_rate: q, each example's probability of joining a step (Poisson).
      steps: the number of steps taken (0 gives ε = 0).
      delta: the δ of the (ε, δ) guarantee, in (0, 1).
      accountant: ``"pld"`` (default, tight) or ``"rdp"``.
      dataset_size, max_batch_size: for a capped batch (truncated Poisson), N and
        the cap; PLD only.

    Returns:
      ε (``inf`` for σ = 0).

    Example:
      >>> round(dp_epsilon(3.0, 0.1, 512, 1e-6), 2)
      3.77
    """
    check_number("noise_multiplier", noise_multiplier, low=0.0, closed=True)
    check_count("steps", steps, low=0)
    check_number("delta", delta, low=0.0, high=1.0)
    mech = _Mechanism(sampling_rate, accountant, dataset_size, max_batch_size)
    return mech.epsilon(float(noise_multiplier), steps, float(delta))


def dp_noise_multiplier(
    epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    *,
    accountant: str = "pld",
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> float:
    """The smallest σ whose ``steps`` steps spend at most ``epsilon`` (dp-accounting's
    ``calibrate_dp_mechanism``, then raised until ε is within the target: Brent's
    tolerance may land on either side).

    Example:
      >>> round(dp_noise_multiplier(1.0, 1e-6, 0.1, 512), 2)
      9.66
    """
    target = check_number("epsilon", epsilon, low=0.0)
    delta = check_number("delta", delta, low=0.0, high=1.0)
    steps = check_count("steps", steps)
    mech = _Mechanism(sampling_rate, accountant, dataset_size, max_batch_size)
    return _calibrate(mech, target, delta, steps)


@functools.lru_cache(maxsize=64)
def _calibrate(mech: _Mechanism, target: float, delta: float, steps: int) -> float:
    dpa = _dp_accounting()
    with _quiet_absl():
        sigma = dpa.calibrate_dp_mechanism(
            mech.fresh_accountant,
            lambda s: dpa.SelfComposedDpEvent(mech.event(s), steps),
            target,
            delta,
            tol=1e-5,
        )
    sigma = float(sigma) * (1 + 1e-4)
    while mech.epsilon(sigma, steps, delta) > target:  # Brent's tolerance, on the safe side
        sigma *= 1 + 1e-3
    return sigma


@dataclasses.dataclass(frozen=True)
class Privacy:
    """Private training for :func:`jbp.fit`: DP-SGD with Poisson sampling and a ledger.

    With ``privacy=Privacy(...)``, ``fit``'s ``batch_size`` is the *expected*
    (logical) batch size ``q·N``: each step includes every training example
    independently with probability ``q = batch_size / N``, an epoch is
    ``round(N / batch_size)`` steps, and each step's batch is padded to a fixed
    shape with an example mask, so the step compiles once.

    Attributes:
      max_norm: C, the per-example clipping norm (default 1.0).
      noise_multiplier: σ; None: calibrated so that the run's planned steps
        (``epochs`` × steps per epoch; ``max_steps`` interrupts a run, it does not
        change its plan) spend exactly ``epsilon``.
      epsilon: the target ε. With ``noise_multiplier`` too it is a budget: the
        run stops before the first step that would exceed it.
      delta: the δ of the guarantee (default 1e-5; keep it below 1/N).
      accountant: ``"pld"`` (default) or ``"rdp"``.
      physical_batch_size: examples per chunk of the step (Opacus's virtual
        steps): the padded logical batch is processed in chunks of this size,
        their clipped sums accumulated inside the step, the noise added once.
        None: one chunk.
      max_batch_size: cap the logical batch (truncated Poisson, accounted as
        such; PLD only). None (default): no cap; the batch is padded to
        ``q·N + 6·sd`` (rounded up to whole chunks), and the rare larger batch
        gets a larger padding (one more compilation) rather than being cut.
    """

    max_norm: float = 1.0
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "pld"
    physical_batch_size: int | None = None
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_number("max_norm", self.max_norm, low=0.0)
        if self.noise_multiplier is None and self.epsilon is None:
            raise ValueError(
                "Privacy needs `noise_multiplier` (σ) or `epsilon` (a target ε to calibrate σ "
                "for), or both (σ with an ε budget)"
            )
        if self.noise_multiplier is not None:
            check_number("noise_multiplier", self.noise_multiplier, low=0.0)
        if self.epsilon is not None:
            check_number("epsilon", self.epsilon, low=0.0)
        check_number("delta", self.delta, low=0.0, high=1.0)
        check_accountant(self.accountant)
        if self.physical_batch_size is not None:
            check_count("physical_batch_size", self.physical_batch_size)
        if self.max_batch_size is not None:
            check_count("max_batch_size", self.max_batch_size)
            if self.accountant != "pld":
                raise ValueError(
                    "`max_batch_size` (truncated Poisson sampling) is accounted by the PLD "
                    "accountant only; use accountant='pld' or no cap"
                )


class Ledger:
    """ε after any number of steps of one private run (σ, q, δ and the accountant fixed).

    Args:
      noise_multiplier, sampling_rate, delta, accountant, dataset_size,
      max_batch_size: as :func:`dp_epsilon`.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        *,
        accountant: str = "pld",
        dataset_size: int | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.mechanism = _Mechanism(sampling_rate, accountant, dataset_size, max_batch_size)
        self._memo: dict[int, float] = {}

    def epsilon(self, steps: int) -> float:
        """ε spent by the first ``steps`` steps."""
        if steps not in self._memo:
            self._memo[steps] = self.mechanism.epsilon(self.noise_multiplier, steps, self.delta)
        return self._memo[steps]

    def steps_within(self, budget: float, upto: int) -> int:
        """The most steps, at most ``upto``, whose ε stays within ``budget`` (bisection;
        ε grows with the steps)."""
        if self.epsilon(upto) <= budget:
            return upto
        lo, hi = 0, upto  # ε(lo) ≤ budget < ε(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= budget else (lo, mid)
        return lo


def audit_epsilon(
    canaries: int, guesses: int, correct: int, delta: float, *, confidence: float = 0.95
) -> float:
    """A lower bound on ε from a one-run privacy audit (Steinke, Nasr & Jagielski 2023).

    The audit: ``canaries`` examples, each put in the training set independently
    with probability 1/2; after training, an attack guesses, for ``guesses`` of
    them, whether each was in, and ``correct`` guesses are right. If training is
    (ε, δ)-DP, the chance of that many right guesses or more is at most
    ``P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2mδ·max_i P[v−i ≤ Binomial(r, ·) < v]/i``
    (their Theorem 3 with the δ term of their Proposition 5.7's algorithm), for
    ``m`` canaries, ``r`` guesses and ``v`` right ones. Returned: the largest ε
    that this rejects at ``confidence``, 0 if none. The guesses (which canaries,
    how many) must be fixed before looking at the scores, or the bound is void.

    Example:
      >>> round(audit_epsilon(100, 20, 20, 0.0), 4)  # 20 of 20 right, pure DP
      1.8227
    """
    from scipy.stats import binom

    m = check_count("canaries", canaries)
    r = check_count("guesses", guesses)
    v = check_count("correct", correct, low=0)
    if not v <= r <= m:
        raise ValueError(f"need correct ≤ guesses ≤ canaries, got {correct}, {guesses}, {canaries}")
    delta = check_number("delta", delta, low=0.0, high=1.0, closed=True)
    beta = 1 - check_number("confidence", confidence, low=0.0, high=1.0)

    def p_value(eps: float) -> float:
        q = 1 / (1 + math.exp(-eps))
        tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) ≥ v]
        below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[= v-1], P[= v-2], ...
        alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1))) if v else 0.0
        return min(1.0, tail + 2 * m * delta * alpha)

    if p_value(0.0) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(mid) < beta else (lo, mid)
    return lo
