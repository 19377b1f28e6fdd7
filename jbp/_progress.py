"""A tiny dependency-free progress bar on stderr, for the CLI and scripts.

On a terminal (and ``quiet`` off) it is one line, redrawn in place with ``\\r``::

    verify float32  137/500  27%  [#####...............]  2.4/s  ETA 2m31s  1 failed

Off a terminal (a log file, a pipe, CI) it draws nothing, unless ``log_every``
is given: then it writes a plain line every ``log_every`` seconds, and one at
the end if it wrote any, so a log shows signs of life without ``\\r`` noise::

    verify float32: 40/120 problems (33%), 1 failed, 35s elapsed, ETA 1m10s

Use it around a loop, or wrap an iterable::

    with Progress(total=len(items), label="verify") as bar:
        for item in items:
            work(item)
            bar.update()

    for item in Progress(items, label="verify"):
        work(item)
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

_BAR_WIDTH = 20


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


class Progress:
    """A progress bar: items done, percentage, items per second and ETA.

    Args:
      iterable: optional iterable to wrap; iterating the bar yields its items
        and counts each one.
      total: the number of items (default ``len(iterable)`` when it has one);
        without it the bar shows the count and rate only.
      label: text before the counts.
      quiet: never draw.
      stream: where to draw (default ``sys.stderr``); the bar is drawn only
        on a TTY.
      min_interval: least seconds between two redraws of the bar.
      log_every: off a TTY, write a plain line (:meth:`log_line`) every this
        many seconds, and a last one when the count reaches ``total`` if any
        was written; ``None`` (the default): write nothing off a TTY.
      unit: the name of the items in plain lines, e.g. ``"problems"``.
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
        log_every: float | None = None,
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
        self._last_draw = -float("inf")
        self._drawn = 0  # characters on the line now
        self._last_log = 0.0  # seconds after the start of the last plain line
        self._logged = 0  # plain lines written
        self._logged_complete = False  # the last plain line is written

    def __enter__(self) -> Progress:
        self._start = time.perf_counter()
        self._last_log = 0.0
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this Progress wraps no iterable; call update() instead")
        self._start = time.perf_counter()
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1, *, note: str | None = None) -> None:
        """Count ``n`` more items done; ``note`` replaces the text after the ETA."""
        self.n += n
        if note is not None:
            self.note = note
        self._draw(force=self.total is not None and self.n >= self.total)

    def line(self) -> str:
        """The text of the bar as it would be drawn now."""
        elapsed = time.perf_counter() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [self.label] if self.label else []
        if self.total:
            frac = min(self.n / self.total, 1.0)
            filled = round(frac * _BAR_WIDTH)
            parts += [
                f"{self.n}/{self.total}",
                f"{100 * frac:3.0f}%",
                "[" + "#" * filled + "." * (_BAR_WIDTH - filled) + "]",
            ]
        else:
            parts.append(str(self.n))
        parts.append(f"{rate:.3g}/s" if rate >= 0.1 or self.n == 0 else f"{1 / rate:.3g}s each")
        if self.total and 0 < self.n < self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        elif self.total and self.n >= self.total:
            parts.append(f"in {format_duration(elapsed)}")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

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

    def _draw(self, *, force: bool = False) -> None:
        if self.logging:
            self._log()
            return
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        columns = shutil.get_terminal_size((80, 24)).columns
        text = self.line()[: max(columns - 1, 1)]
        self.stream.write("\r" + text + " " * max(self._drawn - len(text), 0))
        self.stream.flush()
        self._drawn = len(text)

    def close(self) -> None:
        """Erase the bar, leaving the cursor at the start of an empty line."""
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0
