"""Loss and accuracy curves as a PNG, several runs overlaid.

matplotlib is imported lazily, through its object-oriented API (no pyplot, no
global backend change): it is an optional dependency, in the ``test`` and
``experiments`` extras.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

# One style per run, drawn in order: the first thick and pale, later ones thin
# and dashed on top, so curves that coincide stay visible as one over the other.
_STYLES = (
    {"linewidth": 4.0, "alpha": 0.45},
    {"linewidth": 1.4, "linestyle": "--"},
    {"linewidth": 1.0, "linestyle": ":"},
)


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    note: str | None = None,
) -> str:
    """Write loss and accuracy curves per epoch to a PNG, one set of lines per run.

    Args:
      runs: run label (e.g. ``"backprop"``) to its per-epoch records, such as
        ``FitResult.history`` or the lines of a run's ``metrics.jsonl``; each
        record has ``epoch`` and any of ``train_loss``, ``test_loss``,
        ``train_accuracy``, ``test_accuracy`` (None values are skipped).
      path: the PNG file to write (its folder is created).
      title: a title above both panels.
      note: a line of text under the panels, e.g. the largest parameter
        difference between the runs.

    Returns:
      ``path`` as a string.

    Raises:
      ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib, which jbp does not install by default: "
            "pip install 'jbp[experiments]' (or pip install matplotlib)"
        ) from None
    if not runs:
        raise ValueError("`runs` is empty: give at least one run's records")
    path = os.fspath(path)
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for (label, records), style in zip(runs.items(), _cycle(len(runs)), strict=True):
        for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
            for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
                points = [
                    (r["epoch"], r[f"{split}_{metric}"])
                    for r in records
                    if r.get(f"{split}_{metric}") is not None
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    if metric == "accuracy":
                        ys = tuple(100 * y for y in ys)
                    ax.plot(xs, ys, color=colour, label=f"{label} {split}", **style)
    losses = [y for line in ax_loss.get_lines() for y in line.get_ydata()]
    log = bool(losses) and min(losses) > 0
    ax_loss.set(xlabel="epoch", ylabel="mean loss per example", title="loss")
    ax_loss.set_yscale("log" if log else "linear")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    if note:
        fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))  # type: ignore[union-attr,call-arg]
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _cycle(n: int) -> list[dict[str, Any]]:
    return [_STYLES[i % len(_STYLES)] for i in range(n)]
