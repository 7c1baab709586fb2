"""A one-line progress counter on stderr, for records, bytes or elapsed time.

The same counter the benchmarks draw (``Progress(label, total, enabled=...)``,
``advance``, ``close``), plus byte counts, work of unknown size (stdin) and
work that reports nothing until it ends (a file handed to the library whole).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Literal, Self, TextIO

__all__ = ["Progress", "Unit", "format_bytes", "progress_default"]

Unit = Literal["items", "bytes", "seconds"]

#: redraws of a counter without a total are at least this far apart (seconds)
_MIN_INTERVAL = 0.1


def format_bytes(count: float) -> str:
    """``1.5 MiB``: a byte count for people."""
    if count < 1024:
        return f"{count:,.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024 or unit == "GiB":
            break
    return f"{count:,.1f} {unit}"


def progress_default() -> bool:
    """Progress is drawn on a terminal only, so logs and captured output stay clean."""
    return sys.stderr.isatty()


class Progress:
    """A counter redrawn in place on one stderr line.

    With a ``total`` it is redrawn every 2% and shows the share done. With
    ``total=None`` it shows the count alone, at most ten times a second.
    ``unit="bytes"`` prints sizes (``3.5 MiB``) rather than counts;
    ``unit="seconds"`` prints the time since it started (``advance(0)``
    redraws it). Disabled, it only counts (:attr:`done`).
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        enabled: bool,
        unit: Unit = "items",
        stream: TextIO | None = None,
    ) -> None:
        self._label = label
        self._unit = unit
        self._total = None if total is None or unit == "seconds" else max(total, 1)
        self._step = 0 if self._total is None else max(1, self._total // 50)
        self._next = self._step
        self._enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._started = time.monotonic()
        self._drawn_at = 0.0
        self._width = 0
        self.done = 0
        self._draw()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if not self._enabled:
            return
        if self._total is None:
            # The first count at once (something is happening), then ten a second.
            if self.done == count or time.monotonic() - self._drawn_at >= _MIN_INTERVAL:
                self._draw()
        elif self.done >= self._next:
            self._next = self.done + self._step
            self._draw()

    def _amount(self, value: int) -> str:
        if self._unit == "bytes":
            return format_bytes(value)
        if self._unit == "seconds":
            return f"{time.monotonic() - self._started:.1f} s"
        return f"{value:,}"

    def _draw(self) -> None:
        if not self._enabled:
            return
        self._drawn_at = time.monotonic()
        text = f"\r{self._label}: {self._amount(self.done)}"
        if self._total is not None:
            percent = 100 * self.done / self._total
            text += f"/{self._amount(self._total)} ({percent:3.0f}%)"
        # Padded over the tail of a longer earlier line.
        self._width = max(self._width, len(text))
        self._stream.write(text.ljust(self._width))
        self._stream.flush()

    def close(self) -> None:
        if self._enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
