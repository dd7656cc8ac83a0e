"""Progress of long steps: a tqdm bar on a terminal, plain lines in a log file.

    progress(iterable=None, total=None, desc=..., unit=..., enabled=True) -> Progress

A tqdm bar redraws itself with carriage returns; written to a file (a CI log, `nohup`, `| tee`)
every redraw stays in it and the log fills with one huge line. When the stream is not a terminal
`Progress` prints a line when the step starts, then at most one every `LINE_EVERY_S` seconds, and
one when it ends: `done` with the count and time, or, when the caller stops early, `stopped at n/N`
with the caller's reason (a search that ends at its first passing candidate must not look like an
abort).
"""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 30.0


class Progress:
    """tqdm's `update`, iteration and context-manager use, plus `close(note)` for an early stop."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, stream=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.closed = False
        self._t0 = self._last = time.monotonic()
        self._bar = None
        if not enabled:
            return
        if is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream)
        else:
            self._line(f"{self._count()} {unit}s" if total is not None else "started")

    # ------------------------------------------------------------------ tqdm's interface
    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= LINE_EVERY_S:
            self._last = now
            self._line(f"{self._count()} {self._pct()}({now - self._t0:.0f} s)")

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def close(self, note: str | None = None) -> None:
        """End the step. `note`: why it ends before its total (printed after the count)."""
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        complete = self.total is None or self.n >= self.total
        took = f"{time.monotonic() - self._t0:.1f} s"
        if complete and note is None:
            if self._bar is None:
                self._line(f"done, {self.n} {self.unit}s in {took}")
            return
        what = "done" if complete else f"stopped at {self._count()}"
        self._line(f"{what} after {took}" + (f": {note}" if note else ""))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plain lines
    def _count(self) -> str:
        return f"{self.n}/{self.total}" if self.total is not None else str(self.n)

    def _pct(self) -> str:
        return f"{100 * self.n / self.total:.0f}% " if self.total else ""

    def _line(self, text: str) -> None:
        print(f"[{self.desc}] {text}" if self.desc else text, file=self.stream, flush=True)


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


progress = Progress  # the name call sites use, as with tqdm
