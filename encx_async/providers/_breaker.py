"""The circuit breaker of one region of a multi-region KMS service.

Private: the names here may change in any release. How the breakers behave
is documented in :mod:`encx_async.providers._multi_region`.
"""

from __future__ import annotations

import math
from typing import Literal, TypeAlias

import anyio

__all__ = ["Breaker", "BreakerState", "Ticket"]

BreakerState = Literal["closed", "open", "half-open"]
"""A region's circuit breaker: in use, skipped, or letting one probe through."""

Ticket: TypeAlias = Literal["call", "probe", "early"]


class Breaker:
    """A region's circuit breaker, on an injected clock. Not thread-safe: one event loop.

    A ticket says how a call may use the region: ``"call"`` (closed),
    ``"probe"`` (the half-open probe, once the open period is over) or
    ``"early"`` (a probe before then, for a call no other region can serve).
    At most one probe is in flight; callers with nowhere else to go wait for it.
    """

    __slots__ = (
        "_gap",
        "_max_reset",
        "_reset",
        "_threshold",
        "calm_after",
        "failed_at",
        "failures",
        "open_until",
        "probe_over",
        "probing",
        "trips",
    )

    def __init__(self, threshold: int, reset: float, max_reset: float, gap: float) -> None:
        self._threshold = threshold
        self._reset = reset
        self._max_reset = max_reset
        # attempt_timeout: an early probe comes at least this long after the
        # region's latest failure, and any probe ends within it
        self._gap = gap
        self.failures = 0
        self.trips = 0  # openings since the region last stayed healthy for a while
        self.open_until: float | None = None
        self.calm_after = 0.0
        self.failed_at = -math.inf  # the latest availability failure seen
        self.probing = False
        self.probe_over: anyio.Event | None = None  # made by the first caller to wait

    def state(self, now: float) -> BreakerState:
        if self.open_until is None:
            return "closed"
        return "half-open" if self.probing or now >= self.open_until else "open"

    def acquire(self, now: float, *, last_resort: bool) -> Ticket | Literal["wait"] | None:
        """May a call use the region now? ``None``: skip it; ``"wait"``: for the probe.

        ``last_resort``: no other region can serve the call, so an open breaker
        lets it probe early (unless the region failed within the gap) or wait
        for the probe in flight.
        """
        if self.open_until is None:
            return "call"
        if self.probing:
            return "wait" if last_resort else None
        if now >= self.open_until:
            self.probing = True
            return "probe"
        if last_resort and now - self.failed_at >= self._gap:
            self.probing = True
            return "early"
        return None

    async def probe_ended(self) -> None:
        if self.probe_over is None:
            self.probe_over = anyio.Event()
        await self.probe_over.wait()

    def answered(self, ticket: Ticket, now: float) -> None:
        """The region answered (with a result or an error that is not an outage)."""
        self.failures = 0
        if ticket != "call":
            self.open_until = None
            self._end_probe()
            # Its trips count until it has stayed up as long as it was last left alone.
            self.calm_after = now + self._open_time()

    def failed(self, ticket: Ticket, now: float) -> bool:
        """The region was unavailable; True if that opened the breaker."""
        self.failed_at = now
        if ticket == "probe":
            self._end_probe()
            self._open(now)
            return True
        if ticket == "early":
            # Probed ahead of time out of need: its open period stays as it was.
            self._end_probe()
            return False
        if self.open_until is not None:
            return False  # a call from before the breaker opened: already counted
        self.failures += 1
        if self.failures < self._threshold:
            return False
        self._open(now)
        return True

    def release(self, ticket: Ticket) -> None:
        """A call ended without telling anything (cancelled)."""
        if ticket != "call":
            self._end_probe()

    def retry_in(self, now: float) -> float:
        """Seconds until a call may reach the region (a probe in flight ends within ``gap``)."""
        if self.probing:
            return self._gap
        if self.open_until is None:
            return 0.0
        return max(self.open_until - now, 0.0)

    def _end_probe(self) -> None:
        self.probing = False
        if self.probe_over is not None:
            self.probe_over.set()
            self.probe_over = None

    def _open(self, now: float) -> None:
        if self.open_until is None and now >= self.calm_after:
            self.trips = 0  # up (or idle) long enough since it recovered: a fresh outage
        self.trips += 1
        self.failures = 0
        self.open_until = now + self._open_time()

    def _open_time(self) -> float:
        return float(min(self._reset * 2 ** max(self.trips - 1, 0), self._max_reset))
