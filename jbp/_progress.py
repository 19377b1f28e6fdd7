"""Progress on stderr for the CLI and scripts: a tqdm bar on a terminal, plain
lines in a log.

On a terminal (and ``quiet`` off) it is a `tqdm <https://tqdm.github.io>`_ bar,
redrawn in place and erased when the work ends::

    verify float32:  27%|██▋       | 137/500 [00:57<02:31,  2.40problems/s, 1 failed]

Off a terminal (a log file, a pipe, CI) it never writes a carriage return:
every ``log_every`` seconds (10 by default) it writes one plain line, and one
at the end if it wrote any, so a log of long work shows signs of life::

    verify float32: 40/120 problems (33%), 1 failed, 35s elapsed, ETA 1m10s

Use it around a loop, or wrap an iterable::

    with Progress(total=len(items), label="verify") as bar:
        for item in items:
            work(item)
            bar.update(note="1 failed")

    for item in Progress(items, label="verify"):
        work(item)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

# Seconds between two plain lines off a terminal, unless ``log_every`` says otherwise.
LOG_EVERY = 10.0


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Bar(tqdm):  # type: ignore[misc]
    """tqdm without its monitor thread: a bar that is redrawn on every update
    needs no watchdog, and no thread outlives the work."""

    monitor_interval = 0


class Progress:
    """Progress of a count of items: a tqdm bar on a terminal, plain lines off one.

    Args:
      iterable: optional iterable to wrap; iterating the bar yields its items
        and counts each one.
      total: the number of items (default ``len(iterable)`` when it has one);
        without it the bar shows the count and rate only.
      label: text before the counts.
      quiet: write nothing.
      stream: where to write (default ``sys.stderr``); the bar is drawn only
        on a TTY, which tqdm is given as its ``file``.
      min_interval: least seconds between two redraws of the bar.
      log_every: off a TTY, write a plain line (:meth:`log_line`) every this
        many seconds (default :data:`LOG_EVERY`, 10 s), and a last one when the
        count reaches ``total`` if any was written; ``None``: nothing off a TTY.
      unit: the name of the items, e.g. ``"problems"`` (the bar's rate and the
        plain lines use it).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        label: str = "",
        quiet: bool = False,
        stream: TextIO | None = None,
        min_interval: float = 0.1,
        log_every: float | None = LOG_EVERY,
        unit: str = "",
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable = iterable
        self.total = total
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        tty = _is_tty(self.stream)
        self.enabled = not quiet and tty  # the bar
        self.logging = not quiet and not tty and log_every is not None  # plain lines
        self.min_interval = min_interval
        self.log_every = log_every
        self.unit = unit
        self.n = 0
        self.note = ""
        self._start = time.perf_counter()
        self._bar: tqdm | None = None
        self._last_log = 0.0  # seconds after the start of the last plain line
        self._logged = 0  # plain lines written
        self._logged_complete = False  # the last plain line is written
        self._closed = False

    def _open_bar(self) -> None:
        if self.enabled and self._bar is None and not self._closed:
            self._bar = _Bar(
                total=self.total,
                initial=self.n,
                desc=self.label or None,
                unit=self.unit or "it",
                file=self.stream,
                mininterval=self.min_interval,
                miniters=1,
                leave=False,  # erased at the end: the summary that follows stands alone
                dynamic_ncols=True,
            )
            if self.note:
                self._bar.set_postfix_str(self.note)

    def __enter__(self) -> Progress:
        self._start = time.perf_counter()
        self._last_log = 0.0
        self._open_bar()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this Progress wraps no iterable; call update() instead")
        self._start = time.perf_counter()
        self._open_bar()
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1, *, note: str | None = None) -> None:
        """Count ``n`` more items done; ``note`` replaces the text after the counts."""
        self.n += n
        if note is not None:
            self.note = note
        if self.logging:
            self._log()
            return
        self._open_bar()
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            if self.total is not None and self.n >= self.total:
                self._bar.refresh()  # the last count is drawn whatever the interval

    def line(self) -> str:
        """The text of the bar as tqdm would draw it now (without a width limit)."""
        return str(
            tqdm.format_meter(
                self.n,
                self.total,
                time.perf_counter() - self._start,
                prefix=self.label,
                postfix=self.note or None,
                unit=self.unit or "it",
            )
        )

    def log_line(self) -> str:
        """The plain line written off a terminal, e.g. ``verify float32: 40/120
        problems (33%), 1 failed, 35s elapsed, ETA 1m10s``."""
        elapsed = time.perf_counter() - self._start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        parts = [" ".join(filter(None, [count, self.unit]))]
        if self.total:
            parts[0] += f" ({100 * min(self.n / self.total, 1.0):.0f}%)"
        if self.note:
            parts.append(self.note)
        if self.total is not None and self.n >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        else:
            parts.append(f"{format_duration(elapsed)} elapsed")
        if self.total and 0 < self.n < self.total:
            parts.append(f"ETA {format_duration((self.total - self.n) * elapsed / self.n)}")
        return (f"{self.label}: " if self.label else "") + ", ".join(parts)

    def _log(self) -> None:
        """Write a plain line when ``log_every`` seconds have passed since the
        last one, and a last one when the count completes if any was written."""
        assert self.log_every is not None
        elapsed = time.perf_counter() - self._start
        complete = self.total is not None and self.n >= self.total
        if complete:
            due = self._logged > 0 and not self._logged_complete
        else:
            due = self.n > 0 and elapsed - self._last_log >= self.log_every
        if due:
            self.stream.write(self.log_line() + "\n")
            self.stream.flush()
            self._logged += 1
            self._last_log = elapsed
            self._logged_complete = complete

    def close(self) -> None:
        """Erase the bar (on a terminal), leaving the cursor at the start of an
        empty line; off one, nothing more is written. Closing twice is harmless."""
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
