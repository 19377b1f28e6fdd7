"""Private training inside :func:`jbp.fit`: the sampler, σ, the ledger and the budget.

A :class:`PrivateRun` is made once per ``fit`` with ``privacy=``: it fixes
q = ``batch_size / N``, an epoch of ``round(N / batch_size)`` steps, the
Poisson sampler (padded to whole physical chunks), σ (given, or calibrated so
that the planned steps spend the target ε; a resumed run keeps the σ its
checkpoint recorded), the ledger, and the last step the ε budget allows.
"""

from __future__ import annotations

from typing import Any

from ._privacy import Ledger, Privacy, dp_noise_multiplier
from ._sampling import PoissonSampler


def check_privacy(privacy: Any) -> Privacy | None:
    if privacy is None or isinstance(privacy, Privacy):
        return privacy
    raise TypeError(
        "`privacy` must be a jbp.Privacy (e.g. jbp.Privacy(epsilon=3.0, delta=1e-5)) or None, "
        f"got {type(privacy).__name__}"
    )


class PrivateRun:
    """The private side of one run.

    Args:
      privacy: the checked :class:`Privacy`.
      n_train: N.
      batch_size: the expected batch size ``q·N``.
      seed: the run's seed (the sampler's too).
      epochs: the run's epochs; σ is calibrated for ``epochs`` × steps per epoch.
    """

    def __init__(
        self, privacy: Privacy, n_train: int, batch_size: int, seed: int, epochs: int
    ) -> None:
        self.privacy = privacy
        self.n_train, self.batch_size = n_train, batch_size
        self.sampling_rate = batch_size / n_train
        self.steps_per_epoch = max(1, round(n_train / batch_size))
        self.planned_steps = epochs * self.steps_per_epoch  # max_steps interrupts, not plans
        self.sampler = PoissonSampler(
            n_train,
            batch_size,
            seed=seed,
            multiple_of=privacy.physical_batch_size or 1,
            max_batch_size=privacy.max_batch_size,
        )
        self.noise_multiplier: float | None = privacy.noise_multiplier
        self.ledger: Ledger | None = None
        self.budget_steps: int | None = None

    def _accounting(self) -> dict[str, Any]:
        p = self.privacy
        cap = p.max_batch_size
        return {
            "accountant": p.accountant,
            "dataset_size": self.n_train if cap is not None else None,
            "max_batch_size": cap,
        }

    def resolve(self, saved: dict[str, Any] | None) -> None:
        """Fix σ (the checkpoint's, on a resume), the ledger and the budget."""
        p = self.privacy
        if saved is not None:
            mine = self.record(with_sigma=False)
            for key, value in mine.items():
                if saved.get(key) != value:
                    raise ValueError(
                        f"cannot resume: the run was trained with {key} = {saved.get(key)!r} "
                        f"but this call has {value!r}; the privacy ledger needs the same "
                        "mechanism throughout"
                    )
            if p.noise_multiplier is not None and p.noise_multiplier != saved["noise_multiplier"]:
                raise ValueError(
                    f"cannot resume: the run was trained with noise_multiplier = "
                    f"{saved['noise_multiplier']!r} but this call has {p.noise_multiplier!r}"
                )
            self.noise_multiplier = float(saved["noise_multiplier"])
        elif self.noise_multiplier is None:
            assert p.epsilon is not None
            self.noise_multiplier = dp_noise_multiplier(
                p.epsilon, p.delta, self.sampling_rate, self.planned_steps, **self._accounting()
            )
        self.ledger = Ledger(
            self.noise_multiplier, self.sampling_rate, p.delta, **self._accounting()
        )
        if p.epsilon is not None:
            self.budget_steps = self.ledger.steps_within(p.epsilon, self.planned_steps)

    def record(self, *, with_sigma: bool = True) -> dict[str, Any]:
        """The pinned fields of a private run's configuration (DESIGN.md, "Private
        training"), plus the target ε and the cap."""
        p = self.privacy
        out = {
            "sampling_rate": self.sampling_rate,
            "max_norm": p.max_norm,
            "delta": p.delta,
            "accountant": p.accountant,
            "expected_batch_size": self.batch_size,
            "max_batch_size": p.max_batch_size,
            "sampler": "poisson",
        }
        if with_sigma:
            out = {"noise_multiplier": self.noise_multiplier, **out, "target_epsilon": p.epsilon}
        return out

    def epsilon(self, steps: int) -> float:
        assert self.ledger is not None
        return self.ledger.epsilon(steps)

    def over_budget(self, step: int) -> bool:
        """Whether taking step ``step`` (0-based) would spend more than the budget."""
        return self.budget_steps is not None and step >= self.budget_steps

    def summary(self, steps: int) -> str:
        p = self.privacy
        return (
            f"DP-SGD: σ = {self.noise_multiplier:.4g}, q = {self.sampling_rate:.4g} (expected "
            f"batch {self.batch_size} of {self.n_train}, Poisson), C = {p.max_norm:g}, "
            f"{steps} steps: ε = {self.epsilon(steps):.4g} at δ = {p.delta:g} "
            f"({p.accountant.upper()}, add-or-remove-one)"
        )
