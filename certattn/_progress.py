"""The command line's one progress bar (``certattn certify``, ``budget`` and ``verify``).

A :class:`Progress` draws one line on stderr, redrawn in place at most every 0.2 s:
a label, a bar, ``done/total`` units, the elapsed time and, when the caller sets ``eta``
from a cost model (``certattn verify`` does), an estimate of the time left.  It is off
unless enabled, and :func:`progress_enabled` decides that the same way for every
command: ``--quiet`` turns it off, ``--progress`` on, otherwise it is on when stderr is a
terminal (or the environment sets ``CERTATTN_PROGRESS=1``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

__all__ = ["Progress", "progress_enabled"]


def progress_enabled(flag: bool | None, stream: TextIO | None = None) -> bool:
    """Whether to draw progress: ``flag`` if given, else stderr is a tty or CERTATTN_PROGRESS=1.

    Parameters
    ----------
    flag : bool or None
        ``True`` (``--progress``), ``False`` (``--quiet``) or ``None`` (automatic).
    stream : file, optional
        The stream the bar goes to (default ``sys.stderr``).
    """
    if flag is not None:
        return bool(flag)
    if os.environ.get("CERTATTN_PROGRESS", "") == "1":
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or unusual stream
        return False


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line progress bar on stderr.

    Parameters
    ----------
    label : str
        Text before the bar (e.g. ``"certifying"`` or a theorem id).
    total : int
        Units of work in all (rows).
    unit : str
        Name of a unit, shown after the counts.
    stream : file, optional
        Where to draw (default ``sys.stderr``).

    Notes
    -----
    ``advance(n)`` adds ``n`` done units, ``update(done, total)`` sets them (the
    ``progress(done, total)`` callback of :func:`certattn.certify_topk`); calling the
    object is ``advance``.  ``eta`` (seconds), when set by the caller, is shown as the
    estimated time left; the bar never guesses one from the unit count alone, because
    units need not cost the same.  A write error on the stream switches the bar off.
    """

    _WIDTH = 24

    def __init__(
        self, label: str, total: int, *, unit: str = "rows", stream: TextIO | None = None
    ) -> None:
        self.label, self.total, self.unit = label, int(total), unit
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self.eta: float | None = None
        self.t0 = time.perf_counter()
        self._last = -1.0
        self._drawn = False
        self._dead = False

    def __call__(self, n: int) -> None:
        self.advance(n)

    def advance(self, n: int) -> None:
        """Add ``n`` finished units and redraw (at most every 0.2 s)."""
        self.update(self.done + int(n), self.total)

    def update(self, done: int, total: int | None = None) -> None:
        """Set the finished units (and the total) and redraw (at most every 0.2 s)."""
        self.done = int(done)
        if total is not None:
            self.total = int(total)
        now = time.perf_counter()
        if now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        self.draw()

    def draw(self) -> None:
        """Redraw the line now."""
        if self._dead:
            return
        frac = min(1.0, self.done / max(1, self.total))
        bar = "#" * int(self._WIDTH * frac)
        line = (
            f"{self.label} [{bar:<{self._WIDTH}}] {self.done:,}/{self.total:,} {self.unit} "
            f"{_clock(time.perf_counter() - self.t0)}"
        )
        if self.eta is not None:
            line += f", about {_clock(self.eta)} left"
        self._write("\r" + line + "\x1b[K")
        self._drawn = True

    def close(self) -> None:
        """Erase the line (the bar leaves nothing behind)."""
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or full: no progress, no crash
            self._dead = True
