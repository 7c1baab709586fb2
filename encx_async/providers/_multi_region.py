"""One key management service over the KMS of several regions, with failover.

:class:`MultiRegionKMSService` is a :class:`~encx_async.kms.KeyManagementService`
(and :class:`~encx_async.kms.KeyRotationService`) made of one provider per
region, listed nearest first. It works in one of two modes:

``"replicas"``
    One wrapped data key, under a multi-region key (``mrk-...``) that has a
    replica in every region. Wraps go to the primary region first, unwraps to
    the nearest region; either moves on to the next region when one is
    unavailable. The wrapped key is exactly what KMS returned, so data written
    through a plain :class:`~encx_async.providers.aws.KMSService` reads back
    through this service and the other way round. A key that is not
    multi-region lives in one region and gets no failover, so
    :meth:`~MultiRegionKMSService.get_key_id` (which
    :meth:`Crypto.create <encx_async.Crypto.create>` checks its key with)
    refuses one.

``"every-region"``
    The data key is wrapped under a separate key in every region (the AWS
    Encryption SDK's multi-keyring), and the copies are stored together, so
    any one region can unwrap it. The key "id" is a composite naming one key
    per region (``multi-region:us-east-1=arn:...,eu-west-1=arn:...``), which
    the key-version database stores like any other id. A wrap made while a
    region is down lacks that region's copy; the service says so
    (:class:`~encx_async.PartialWrapping`), so a DEK cache keeps such a key only
    until the region may answer again, and a rewrap adds the missing copies.

Only :class:`~encx_async.KMSUnavailableError` (timeouts, throttling, 5xx,
connection failures) and a region that does not answer within
``attempt_timeout`` move a call on to the next region. A wrong key, a denied
permission or a ciphertext that does not match are answers, not outages, and
are raised from the region that gave them.

Each region has a circuit breaker: after ``failure_threshold`` consecutive
failures it opens and the region is skipped for ``reset_timeout`` seconds;
then one call probes it (half-open), which closes the breaker on success or
opens it again, for twice as long each time the region fails again soon after
recovering, up to ``max_reset_timeout``. Arguments refused before a request
and a closed regional service leave the breaker as it was.

An open breaker only steers calls to other regions. A call that no other
region can serve (they failed, or are skipped too) probes the skipped regions
before its time, the one whose latest failure is oldest first: that region
has had the longest to recover. One probe per region is out at a time; a call
with nowhere else to go waits for its outcome (within ``attempt_timeout``) and
then uses the region or gives up on it. A region is not probed early within
``attempt_timeout`` of its latest failure, so a total outage costs a probe per
region every ``attempt_timeout`` seconds, not one per call. An early probe
that fails leaves the open period as it was; one that succeeds closes the
breaker.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import (
    TYPE_CHECKING,
    Final,
    Generic,
    Literal,
    Protocol,
    Self,
    TypeAlias,
    TypeVar,
    runtime_checkable,
)

import anyio

from encx_async._context import normalize_context
from encx_async._envelope import MAX_WRAPPED_DEK
from encx_async._exceptions import (
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    KMSError,
    KMSRegionMismatchError,
    KMSUnavailableError,
    RegionsUnavailableError,
)
from encx_async.kms import KeyManagementService, KeyRotationService
from encx_async.providers._common import (
    DECRYPT_FAILED,
    ProviderResource,
    as_bytes,
    check_alias_name,
    check_description,
    check_key_ref,
    check_plaintext,
)
from encx_async.providers.local import LocalKMSService

if TYPE_CHECKING:
    from encx_async.providers._aws_client import Config

__all__ = [
    "BreakerState",
    "MultiRegionKMSService",
    "MultiRegionMode",
    "MultiRegionStats",
    "RegionStats",
    "RegionsUnavailableError",
    "is_multi_region_key",
]

_log = logging.getLogger("encx_async.kms")

_T = TypeVar("_T")

_Call: TypeAlias = "Callable[[_Region], Awaitable[_T]]"

MultiRegionMode = Literal["replicas", "every-region"]
"""How :class:`MultiRegionKMSService` spreads a data key over the regions."""

BreakerState = Literal["closed", "open", "half-open"]
"""A region's circuit breaker: in use, skipped, or letting one probe through."""

_MODES: Final = ("replicas", "every-region")
_COMPOSITE_PREFIX: Final = "multi-region:"
_REGION_RE: Final = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_MAX_REGION: Final = 64  # AWS's are about 15 characters; the blob gives a name one length byte
_ARN_RE: Final = re.compile(
    r"^arn:(?P<partition>[a-z0-9-]+):kms:(?P<region>[a-z0-9-]*):(?P<account>[0-9]*):"
    r"(?P<type>key|alias)/(?P<name>.+)$"
)
_MRK_PREFIX: Final = "mrk-"
# The every-region wrapped key: magic, format version, count, then per region
# (region length, region, key length, key). No KMS ciphertext starts with "EXMR".
_BLOB_MAGIC: Final = b"EXMR"
_BLOB_VERSION: Final = 1


def is_multi_region_key(key_ref: str) -> bool:
    """Whether ``key_ref`` names a multi-region key: an ``mrk-`` id or a key ARN with one.

    Aliases are regional, so an alias (or alias ARN) never counts, even when
    it points at a multi-region key.
    """
    if key_ref.startswith("arn:"):
        match = _ARN_RE.fullmatch(key_ref)
        return match is not None and match["type"] == "key" and _is_mrk_id(match["name"])
    return _is_mrk_id(key_ref)


def _is_mrk_id(key_id: str) -> bool:
    return key_id.startswith(_MRK_PREFIX) and len(key_id) > len(_MRK_PREFIX)


def _arn_region(key_ref: str) -> str | None:
    """The region a KMS ARN names; ``None`` for ids and alias names."""
    if not key_ref.startswith("arn:"):
        return None
    match = _ARN_RE.fullmatch(key_ref)
    if match is None:
        raise ConfigurationError(f"{key_ref!r} is not a KMS key or alias ARN")
    return match["region"]


def _with_region(arn: str, region: str) -> str:
    """A multi-region key's ARN with its region replaced (the same key, another replica)."""
    match = _ARN_RE.fullmatch(arn)
    assert match is not None
    return arn[: match.start("region")] + region + arn[match.end("region") :]


@dataclass(frozen=True, slots=True)
class RegionStats:
    """What one region of a :class:`MultiRegionKMSService` has done since it opened."""

    region: str
    #: requests sent to this region
    calls: int
    #: of those, the ones that were unavailable or timed out
    failures: int
    #: calls that moved on from this region to the next (failed or skipped here)
    failovers: int
    #: calls that did not try this region because its breaker was open
    skipped: int
    breaker: BreakerState
    #: availability failures in a row, reset by any answer
    consecutive_failures: int
    #: seconds until an open breaker lets a probe through; ``None`` unless open
    retry_in: float | None


@dataclass(frozen=True, slots=True)
class MultiRegionStats:
    """A snapshot of :meth:`MultiRegionKMSService.stats`, regions nearest first."""

    regions: tuple[RegionStats, ...]
    #: calls that failed with :class:`RegionsUnavailableError`
    unavailable: int
    #: every-region wraps that left out at least one region (it was down)
    partial_wraps: int

    def region(self, name: str) -> RegionStats:
        """The statistics of the region ``name``; KeyError if it is not one of them."""
        for stats in self.regions:
            if stats.region == name:
                return stats
        raise KeyError(name)


_Ticket: TypeAlias = Literal["call", "probe", "early"]


class _Breaker:
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

    def acquire(self, now: float, *, last_resort: bool) -> _Ticket | Literal["wait"] | None:
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

    def answered(self, ticket: _Ticket, now: float) -> None:
        """The region answered (with a result or an error that is not an outage)."""
        self.failures = 0
        if ticket != "call":
            self.open_until = None
            self._end_probe()
            # Its trips count until it has stayed up as long as it was last left alone.
            self.calm_after = now + self._open_time()

    def failed(self, ticket: _Ticket, now: float) -> bool:
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

    def release(self, ticket: _Ticket) -> None:
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


class _Region:
    __slots__ = ("breaker", "calls", "failovers", "failures", "name", "service", "skipped")

    def __init__(self, name: str, service: KeyManagementService, breaker: _Breaker) -> None:
        self.name = name
        self.service = service
        self.breaker = breaker
        self.calls = self.failures = self.failovers = self.skipped = 0


class _Gathered(Generic[_T]):
    """What a call to several regions at once came to, region by region."""

    def __init__(self, regions: Sequence[_Region]) -> None:
        self.names = [region.name for region in regions]
        self.results: dict[str, _T] = {}
        self.failed: dict[str, _RegionFailed] = {}
        self.errors: dict[str, Exception] = {}

    def skipped(self, name: str) -> bool:
        failed = self.failed.get(name)
        return failed is not None and failed.skipped

    def require(self, owner: MultiRegionKMSService, operation: str, needed: int) -> dict[str, _T]:
        """The results, if there are ``needed`` and no region answered with an error."""
        for name in self.names:
            if name in self.errors:
                raise self.errors[name]
        if len(self.results) >= needed:
            return self.results
        owner._unavailable += 1
        raise RegionsUnavailableError(
            operation,
            [(name, self.failed[name].reason) for name in self.names if name in self.failed],
            succeeded=[name for name in self.names if name in self.results],
            needed=needed if self.results else None,
        ) from next((f.error for f in self.failed.values() if f.error is not None), None)


class _RegionFailed(Exception):
    """Internal: one region was unavailable for one call. Never escapes this module."""

    def __init__(
        self, reason: str, error: BaseException | None = None, *, skipped: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.skipped = skipped  # not tried: its breaker is open


@runtime_checkable
class _CreatesMultiRegionKeys(Protocol):
    async def create_key(
        self, description: str, *, alias: str | None = None, multi_region: bool = False
    ) -> str: ...

    async def create_alias(self, alias: str, key_id: str) -> None: ...


@runtime_checkable
class _ReplicatesByRegion(Protocol):
    async def replicate_key(self, key_id: str, replica_region: str) -> str: ...


class MultiRegionKMSService(ProviderResource):
    """The KMS of several regions as one key management service, with failover.

    :param services: one provider per region, **nearest first**: unwraps try
        them in this order. Each must know its region (``Config(region=...)``
        for a :class:`~encx_async.providers.aws.KMSService`). They are
        borrowed: this service never opens or closes them; whoever made them
        does (see :meth:`from_regions` for services it owns).
    :param mode: ``"replicas"`` (one wrapped key under a multi-region key) or
        ``"every-region"`` (the key wrapped under a key in every region).
    :param primary: the region wraps go to first in ``"replicas"`` mode; the
        first of ``services`` by default.
    :param attempt_timeout: seconds one region has to answer one call before
        the call moves on, whatever the region's own timeouts and retries
        (keep those short too: ``Config(max_attempts=1, connect_timeout=...)``).
    :param failure_threshold: availability failures in a row that open a
        region's breaker.
    :param reset_timeout: seconds an opened breaker skips its region before
        letting a probe through; doubled each time the region fails again
        soon after recovering, up to ``max_reset_timeout``. A call no other
        region can serve probes sooner (see the module's documentation).
    :param min_regions: in ``"every-region"`` mode, how many regions a wrap
        needs (1 by default: a wrap made while a region is down lacks that
        region's copy; raise it to refuse such wraps).
    :param clock: monotonic seconds for the breakers; tests pass a fake one.

    It is an anyio ``AsyncResource``: ``async with`` or :meth:`aclose`
    (idempotent; later calls raise :class:`~encx_async.ClosedError`). It also
    implements :class:`~encx_async.PartialWrapping`. When every region a call
    may use fails (probed early if its breaker was open), it raises
    :class:`RegionsUnavailableError` (a :class:`~encx_async.KMSUnavailableError`)
    naming the regions and why each was not used. Messages never hold key
    material; :meth:`stats` counts calls, failures and failovers per region.
    """

    def __init__(
        self,
        services: Sequence[KeyManagementService],
        *,
        mode: MultiRegionMode = "replicas",
        primary: str | None = None,
        attempt_timeout: float = 5.0,
        failure_threshold: int = 3,
        reset_timeout: float = 30.0,
        max_reset_timeout: float = 300.0,
        min_regions: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in _MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")
        _check_number("attempt_timeout", attempt_timeout)
        _check_number("reset_timeout", reset_timeout)
        _check_number("max_reset_timeout", max_reset_timeout)
        if max_reset_timeout < reset_timeout:
            raise ConfigurationError("max_reset_timeout must be at least reset_timeout")
        _check_count("failure_threshold", failure_threshold)
        _check_count("min_regions", min_regions)
        if not callable(clock):
            raise TypeError("clock must be a callable returning monotonic seconds")
        services = list(services)
        if not services:
            raise ConfigurationError("MultiRegionKMSService needs at least one regional service")
        regions: list[_Region] = []
        for service in services:
            if not isinstance(service, KeyManagementService):
                raise TypeError(
                    f"each service must implement KeyManagementService, not "
                    f"{type(service).__name__}"
                )
            name = getattr(service, "region", None)
            if not isinstance(name, str) or not _is_region(name):
                raise ConfigurationError(
                    f"{service!r} does not say its region; give each KMSService Config(region=...)"
                )
            if any(region.name == name for region in regions):
                raise ConfigurationError(f"two services for region {name}: give one per region")
            breaker = _Breaker(
                failure_threshold, reset_timeout, max_reset_timeout, float(attempt_timeout)
            )
            regions.append(_Region(name, service, breaker))
        if min_regions > len(regions):
            raise ConfigurationError(
                f"min_regions={min_regions} is more than the {len(regions)} region(s) given"
            )
        primary_name = regions[0].name if primary is None else primary
        self._by_name = {region.name: region for region in regions}
        if primary_name not in self._by_name:
            raise ConfigurationError(
                f"primary region {primary_name!r} is not one of {', '.join(self._by_name)}"
            )
        self._regions = tuple(regions)
        self._primary = self._by_name[primary_name]
        self._wrap_order = (self._primary, *(r for r in regions if r is not self._primary))
        self._mode: MultiRegionMode = mode
        self._attempt_timeout = float(attempt_timeout)
        self._min_regions = min_regions
        self._clock = clock
        self._owned: tuple[KeyManagementService, ...] = ()
        self._opened = False
        self._closed = False
        self._unavailable = 0
        self._partial_wraps = 0

    @classmethod
    def from_regions(
        cls,
        regions: Sequence[str],
        config: Config | None = None,
        *,
        endpoint_urls: Mapping[str, str] | None = None,
        mode: MultiRegionMode = "replicas",
        primary: str | None = None,
        attempt_timeout: float = 5.0,
        failure_threshold: int = 3,
        reset_timeout: float = 30.0,
        max_reset_timeout: float = 300.0,
        min_regions: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> Self:
        """One :class:`~encx_async.providers.aws.KMSService` per region, owned by the result.

        ``regions`` are nearest first. Every service takes ``config`` with its
        own region (and its ``endpoint_urls`` entry, if any), and all share one
        aiobotocore session: ``config.session``, or one made for
        ``config.profile``. The services are opened with this one and closed
        by its :meth:`aclose`. The other arguments are the constructor's.
        """
        from aiobotocore.session import AioSession

        from encx_async.providers._aws_client import Config
        from encx_async.providers._kms import KMSService

        base = config if config is not None else Config()
        if isinstance(regions, str):
            raise TypeError("regions must be a sequence of region names, not a str")
        endpoints = dict(endpoint_urls or {})
        unknown = set(endpoints) - set(regions)
        if unknown:
            raise ConfigurationError(
                f"endpoint_urls names region(s) not in regions: {', '.join(sorted(unknown))}"
            )
        session = base.session if base.session is not None else AioSession(profile=base.profile)
        services = [
            KMSService(
                replace(
                    base,
                    region=region,
                    session=session,
                    profile=None,
                    endpoint_url=endpoints.get(region, base.endpoint_url),
                )
            )
            for region in regions
        ]
        self = cls(
            services,
            mode=mode,
            primary=primary,
            attempt_timeout=attempt_timeout,
            failure_threshold=failure_threshold,
            reset_timeout=reset_timeout,
            max_reset_timeout=max_reset_timeout,
            min_regions=min_regions,
            clock=clock,
        )
        self._owned = tuple(services)
        return self

    # -- introspection ---------------------------------------------------------

    @property
    def mode(self) -> MultiRegionMode:
        return self._mode

    @property
    def regions(self) -> tuple[str, ...]:
        """The region names, nearest first."""
        return tuple(region.name for region in self._regions)

    @property
    def primary(self) -> str:
        return self._primary.name

    def service(self, region: str) -> KeyManagementService:
        """The provider of ``region``."""
        try:
            return self._by_name[region].service
        except KeyError:
            raise ConfigurationError(
                f"region {region!r} is not one of {', '.join(self._by_name)}"
            ) from None

    def stats(self) -> MultiRegionStats:
        """Calls, failures, failovers and breaker state per region, as of now."""
        now = self._clock()
        regions = []
        for region in self._regions:
            breaker = region.breaker
            state = breaker.state(now)
            retry_in = None
            if state == "open" and breaker.open_until is not None:
                retry_in = max(breaker.open_until - now, 0.0)
            regions.append(
                RegionStats(
                    region=region.name,
                    calls=region.calls,
                    failures=region.failures,
                    failovers=region.failovers,
                    skipped=region.skipped,
                    breaker=state,
                    consecutive_failures=breaker.failures,
                    retry_in=retry_in,
                )
            )
        return MultiRegionStats(tuple(regions), self._unavailable, self._partial_wraps)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._opened else "not opened"
        return (
            f"{type(self).__name__}(mode={self._mode!r}, regions={list(self.regions)!r}, "
            f"primary={self._primary.name!r}, {state})"
        )

    # -- lifecycle -------------------------------------------------------------

    async def _ensure_open(self) -> None:
        self._raise_if_closed()
        if self._opened:
            return
        try:
            for service in self._owned:
                await service.__aenter__()
        except BaseException:
            await self.aclose()  # the services opened so far must not leak
            raise
        self._opened = True

    async def aclose(self) -> None:
        """Close the services this one owns (none when they were passed in); idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for service in self._owned:
            try:
                await service.aclose()
            except Exception as exc:  # close the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- one region, one attempt -----------------------------------------------

    async def _attempt(self, region: _Region, call: _Call[_T], *, last_resort: bool = False) -> _T:
        """Call one region under its breaker and the attempt timeout.

        Raises :class:`_RegionFailed` when the region is skipped or unavailable,
        and whatever the region answered otherwise. ``last_resort``: no other
        region can serve the call (see :meth:`_Breaker.acquire`).
        """
        breaker = region.breaker
        ticket = await self._ticket(breaker, last_resort)
        if ticket is None:
            raise _RegionFailed("circuit open", skipped=True)
        region.calls += 1
        settled = False
        try:
            with anyio.fail_after(self._attempt_timeout):
                result = await call(region)
        except (KMSUnavailableError, TimeoutError) as exc:
            settled = True
            region.failures += 1
            opened = breaker.failed(ticket, self._clock())
            if isinstance(exc, KMSUnavailableError):
                reason = f"{type(exc).__name__}: {exc}"
            else:
                reason = f"no answer within {self._attempt_timeout:g} s"
            if opened:
                _log.warning(
                    "KMS region %s is unavailable; skipping it for %.0f s (%s)",
                    region.name,
                    (breaker.open_until or 0.0) - self._clock(),
                    reason,
                )
            raise _RegionFailed(reason, exc) from None
        except Exception as exc:
            if _is_answer(exc):
                settled = True
                breaker.answered(ticket, self._clock())
            raise
        finally:
            if not settled:  # cancelled, or refused before asking: says nothing of the region
                breaker.release(ticket)
        breaker.answered(ticket, self._clock())
        if ticket != "call":
            _log.warning("KMS region %s answered again; using it", region.name)
        return result

    async def _ticket(self, breaker: _Breaker, last_resort: bool) -> _Ticket | None:
        while True:
            ticket = breaker.acquire(self._clock(), last_resort=last_resort)
            if ticket != "wait":
                return ticket
            # One probe per region at a time: the others hear how it went.
            await breaker.probe_ended()

    async def _failover(
        self,
        operation: str,
        order: Sequence[_Region],
        call: _Call[_T],
    ) -> _T:
        """Try ``order`` until a region answers; RegionsUnavailableError if none does.

        When every region has failed or is skipped, the skipped ones are tried
        as a last resort, the one whose latest failure is oldest first.
        """
        failed: dict[_Region, _RegionFailed] = {}

        def candidates() -> Iterator[tuple[_Region, bool]]:
            yield from ((region, False) for region in order)
            # Reached only once every region of ``order`` has failed or been skipped.
            skipped = [region for region in order if failed[region].skipped]
            for region in sorted(skipped, key=lambda region: region.breaker.failed_at):
                yield region, True

        previous: _Region | None = None
        last: BaseException | None = None
        try:
            for region, last_resort in candidates():
                if previous is not None and previous is not region:
                    previous.failovers += 1
                    _log.debug(
                        "KMS %s moves on from region %s to %s (%s)",
                        operation,
                        previous.name,
                        region.name,
                        failed[previous].reason,
                    )
                try:
                    result = await self._attempt(region, call, last_resort=last_resort)
                except _RegionFailed as exc:
                    failed[region] = exc
                    last = exc.error or last
                    previous = region
                    continue
                failed.pop(region, None)
                return result
        finally:
            _count_skips(failed)
        self._unavailable += 1
        raise RegionsUnavailableError(
            operation, [(region.name, failed[region].reason) for region in order]
        ) from last

    async def _each(
        self,
        operation: str,
        regions: Sequence[_Region],
        call: _Call[_T],
        *,
        needed: int | None = None,
    ) -> dict[str, _T]:
        """Call several regions at once; their results by region name.

        An answer that is an error is raised (the nearest region's first).
        Fewer than ``needed`` results (all of them by default) raise
        :class:`RegionsUnavailableError`.
        """
        needed = len(regions) if needed is None else needed
        gathered = await self._gather(regions, call, needed)
        return gathered.require(self, operation, needed)

    async def _gather(
        self, regions: Sequence[_Region], call: _Call[_T], needed: int
    ) -> _Gathered[_T]:
        """Call ``regions`` at once; if fewer than ``needed`` answer, the skipped
        ones are tried again as a last resort."""
        gathered = _Gathered[_T](regions)

        async def run(region: _Region, last_resort: bool) -> None:
            try:
                gathered.results[region.name] = await self._attempt(
                    region, call, last_resort=last_resort
                )
            except _RegionFailed as exc:
                gathered.failed[region.name] = exc
                return
            except Exception as exc:
                gathered.errors[region.name] = exc
            gathered.failed.pop(region.name, None)

        async def each(regions: Sequence[_Region], last_resort: bool) -> None:
            async with anyio.create_task_group() as group:
                for region in regions:
                    group.start_soon(run, region, last_resort)

        try:
            await each(regions, False)
            if len(gathered.results) < needed and not gathered.errors:
                await each([r for r in regions if gathered.skipped(r.name)], True)
        finally:
            _count_skips({r: gathered.failed[r.name] for r in regions if r.name in gathered.failed})
        return gathered

    # -- routing (replicas mode) -----------------------------------------------

    def _plan(self, key_ref: str, order: Sequence[_Region]) -> tuple[_Region, ...]:
        """The regions a call about ``key_ref`` may use, in the order to try them.

        A multi-region key and an alias name may use every region (aliases
        are regional: give the alias to the replica in each region); any other
        key lives in one region: the one its ARN names, the primary for a bare
        id, the alias ARN's for an alias ARN.
        """
        if is_multi_region_key(key_ref) or key_ref.startswith("alias/"):
            return tuple(order)
        region = _arn_region(key_ref)
        if region is None:
            return (self._primary,)
        home = self._by_name.get(region)
        if home is None:
            raise KMSRegionMismatchError(
                f"{key_ref!r} is in region {region or '(none)'}, but this "
                f"MultiRegionKMSService uses {', '.join(self._by_name)}; only multi-region "
                "keys (mrk-...) move between regions"
            )
        return (home,)

    def _canonical(self, key_ref: str) -> str:
        """A multi-region key's ARN in the primary region, so one key has one stored id."""
        if key_ref.startswith("arn:") and is_multi_region_key(key_ref):
            return _with_region(key_ref, self._primary.name)
        return key_ref

    # -- composite ids (every-region mode) -------------------------------------

    def _parts(self, key_ref: str) -> dict[str, str]:
        """The key of each region that ``key_ref`` names in every-region mode."""
        if key_ref.startswith(_COMPOSITE_PREFIX):
            return _parse_composite(key_ref)
        if key_ref.startswith("alias/"):
            return {region.name: key_ref for region in self._regions}
        raise ConfigurationError(
            f"in every-region mode a key is an alias name that exists in every region, or a "
            f"'{_COMPOSITE_PREFIX}...' id from get_key_id or create_key; {key_ref!r} names "
            "a single key"
        )

    def _composite(self, parts: Mapping[str, str]) -> str:
        ordered = [r.name for r in self._regions if r.name in parts]
        ordered += sorted(name for name in parts if name not in self._by_name)
        return _COMPOSITE_PREFIX + ",".join(f"{name}={parts[name]}" for name in ordered)

    def _served(self, parts: Mapping[str, str], operation: str) -> list[_Region]:
        """The regions of ``parts``, nearest first; every one of them must be served here."""
        missing = [name for name in parts if name not in self._by_name]
        if missing:
            raise ConfigurationError(
                f"KMS {operation}: the key has a part in region(s) {', '.join(missing)}, which "
                f"this MultiRegionKMSService ({', '.join(self._by_name)}) does not serve"
            )
        return [region for region in self._regions if region.name in parts]

    def _homes(
        self, key_ref: str, operation: str
    ) -> tuple[list[_Region], Callable[[_Region], str]]:
        """Where a key's material is managed, and the key's reference in each of those regions.

        Every region's part in every-region mode; otherwise the key's one home,
        which for a multi-region key (or an alias) is the primary region.
        """
        if self._mode == "every-region":
            parts = self._parts(key_ref)
            return self._served(parts, operation), lambda region: parts[region.name]
        if is_multi_region_key(key_ref) or key_ref.startswith("alias/"):
            return [self._primary], lambda _: key_ref
        return [self._plan(key_ref, self._regions)[0]], lambda _: key_ref

    # -- KeyManagementService --------------------------------------------------

    async def get_key_id(self, alias: str) -> str:
        """Resolve an alias, key id or ARN.

        ``"replicas"``: through the nearest region that answers (an alias
        name must exist in each region it is resolved in); a multi-region
        key's ARN comes back in the primary region, and a key that is not
        multi-region is refused with :class:`~encx_async.ConfigurationError`
        (it lives in one region, so nothing about it could fail over; this is
        what :meth:`Crypto.create <encx_async.Crypto.create>` checks its key
        with). ``"every-region"``: an alias name is resolved in every region
        (all must answer), and the result is the composite id; a composite id
        is checked in the regions that answer (at least one) and returned.
        """
        key_ref = check_key_ref(alias)
        await self._ensure_open()
        if self._mode == "replicas":
            found = await self._failover(
                "get_key_id",
                self._plan(key_ref, self._regions),
                lambda region: region.service.get_key_id(key_ref),
            )
            if not is_multi_region_key(found):
                raise ConfigurationError(
                    f"{key_ref!r} is key {found}, which is not a multi-region key: it lives in "
                    "one region, so mode='replicas' could not fail over. Use a multi-region "
                    "key (mrk-...; create_key makes one in this mode), or mode='every-region' "
                    "for an ordinary key in every region"
                )
            return self._canonical(found)
        parts = self._parts(key_ref)
        resolved = await self._each(
            "get_key_id",
            self._served(parts, "get_key_id"),
            lambda region: region.service.get_key_id(parts[region.name]),
            needed=1 if key_ref.startswith(_COMPOSITE_PREFIX) else None,
        )
        return self._composite({**parts, **resolved})

    async def create_key(self, description: str, *, alias: str | None = None) -> str:
        """Create the key, and ``alias`` for it, in every region; every region must answer.

        ``"replicas"``: a multi-region key in the primary region, replicated to
        the others (the alias is created in each); returns the primary's id.
        ``"every-region"``: one key per region, at once; returns the composite
        id. If a region fails, the error names the keys that were made.
        """
        check_description(description)
        if alias is not None:
            check_alias_name(alias)
        await self._ensure_open()
        if self._mode == "every-region":
            gathered = await self._gather(
                self._regions,
                lambda region: region.service.create_key(description, alias=alias),
                len(self._regions),
            )
            try:
                return self._composite(gathered.require(self, "create_key", len(self._regions)))
            except KMSError as exc:
                if not gathered.results:
                    raise
                made = ", ".join(f"{n}: {k}" for n, k in gathered.results.items())
                raise _restated(exc, f"{exc} (keys made: {made})") from exc
        return await self._create_multi_region_key(description, alias)

    async def _create_multi_region_key(self, description: str, alias: str | None) -> str:
        primary = self._primary.service
        if not isinstance(primary, _CreatesMultiRegionKeys):
            raise ConfigurationError(
                f"the service of region {self._primary.name} cannot create multi-region keys"
            )
        key_id = await self._failover(
            "create_key",
            (self._primary,),
            lambda _: primary.create_key(description, alias=alias, multi_region=True),
        )
        done = [self._primary.name]
        for region in self._wrap_order[1:]:
            try:
                await self._failover("create_key", (region,), _replicator(primary, key_id, alias))
            except KMSError as exc:
                raise _restated(
                    exc,
                    f"multi-region key {key_id} was made in {', '.join(done)} but not replicated "
                    f"to {region.name}: {exc}; replicate it there, or schedule its deletion",
                ) from exc
            done.append(region.name)
        return self._canonical(key_id)

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Wrap ``plaintext_dek``: in the primary region first (``"replicas"``), or
        in every region at once (``"every-region"``, at least ``min_regions``)."""
        key_ref = check_key_ref(key_id)
        plaintext = check_plaintext(plaintext_dek)
        context = normalize_context(context)
        await self._ensure_open()
        if self._mode == "replicas":
            return await self._failover(
                "encrypt_dek",
                self._plan(key_ref, self._wrap_order),
                lambda region: region.service.encrypt_dek(key_ref, plaintext, context=context),
            )
        parts = self._parts(key_ref)
        regions = self._served(parts, "encrypt_dek")
        wrapped = await self._each(
            "encrypt_dek",
            regions,
            lambda region: region.service.encrypt_dek(
                parts[region.name], plaintext, context=context
            ),
            needed=min(self._min_regions, len(regions)),
        )
        if len(wrapped) < len(regions):
            self._partial_wraps += 1
            _log.warning(
                "KMS encrypt_dek wrapped a data key in %s only (%s unavailable)",
                ", ".join(wrapped),
                ", ".join(r.name for r in regions if r.name not in wrapped),
            )
        return _pack([(r.name, wrapped[r.name]) for r in regions if r.name in wrapped])

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Unwrap through the nearest region that answers (and, in every-region
        mode, holds a copy)."""
        key_ref = check_key_ref(key_id)
        blob = as_bytes(ciphertext_dek, "wrapped data key")
        context = normalize_context(context)
        await self._ensure_open()
        if self._mode == "replicas":
            return await self._failover(
                "decrypt_dek",
                self._plan(key_ref, self._regions),
                lambda region: region.service.decrypt_dek(key_ref, blob, context=context),
            )
        parts = self._parts(key_ref)
        copies = dict(_unpack(blob))
        order = [r for r in self._regions if r.name in parts and r.name in copies]
        if not order:
            raise DecryptionError(DECRYPT_FAILED)
        return await self._failover(
            "decrypt_dek",
            order,
            lambda region: region.service.decrypt_dek(
                parts[region.name], copies[region.name], context=context
            ),
        )

    # -- KeyRotationService ----------------------------------------------------

    async def update_alias(self, alias: str, key_id: str) -> None:
        """Point ``alias`` at ``key_id`` in every region the key is in; all must answer."""
        check_alias_name(alias)
        key_ref = check_key_ref(key_id)
        await self._ensure_open()
        if self._mode == "every-region":
            parts = self._parts(key_ref)
            regions = self._served(parts, "update_alias")
            await self._each(
                "update_alias",
                regions,
                lambda region: _rotation(region).update_alias(alias, parts[region.name]),
            )
            return
        await self._each(
            "update_alias",
            self._plan(key_ref, self._regions),
            lambda region: _rotation(region).update_alias(alias, key_ref),
        )

    async def rotate_key_material(self, key_id: str) -> None:
        """New key material now, in the key's home (each region's key in every-region mode).

        A multi-region key rotates in the primary region, and KMS gives the new
        material to its replicas.
        """
        key_ref = check_key_ref(key_id)
        await self._ensure_open()
        regions, ref = self._homes(key_ref, "rotate_key_material")
        await self._each(
            "rotate_key_material",
            regions,
            lambda region: _rotation(region).rotate_key_material(ref(region)),
        )

    async def enable_key_rotation(self, key_id: str, *, period_days: int | None = None) -> None:
        """Turn on scheduled rotation where :meth:`rotate_key_material` would rotate."""
        key_ref = check_key_ref(key_id)
        await self._ensure_open()
        regions, ref = self._homes(key_ref, "enable_key_rotation")
        await self._each(
            "enable_key_rotation",
            regions,
            lambda region: _rotation(region).enable_key_rotation(
                ref(region), period_days=period_days
            ),
        )

    async def re_encrypt_dek(
        self,
        ciphertext_dek: bytes,
        *,
        source_key_id: str,
        destination_key_id: str,
        context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Move a wrapped data key to another key inside the KMS (``ReEncrypt``).

        ``"replicas"``: in the nearest region that has both keys and answers.
        ``"every-region"``: each region's copy moves to that region's part of
        the destination, and every such region must answer (retry later
        otherwise: the old wrapped key still works). Copies for regions the
        destination has no key in are dropped. A region of the destination
        that has no copy (the key was wrapped while it was down) gets one: the
        data key is unwrapped in the nearest region that holds a copy and
        wrapped in the missing regions, so it passes through this process, as
        on a decrypt. With ``source_key_id == destination_key_id`` that
        completes a partial wrap.
        """
        blob = as_bytes(ciphertext_dek, "wrapped data key")
        source = check_key_ref(source_key_id)
        destination = check_key_ref(destination_key_id)
        context = normalize_context(context)
        await self._ensure_open()
        if self._mode == "replicas":
            usable = self._plan(destination, self._regions)
            order = [r for r in self._plan(source, self._regions) if r in usable]
            if not order:
                raise KMSRegionMismatchError(
                    f"{source!r} and {destination!r} share no region, so the KMS "
                    "cannot move a data key between them"
                )
            return await self._failover(
                "re_encrypt_dek",
                order,
                lambda region: _rotation(region).re_encrypt_dek(
                    blob, source_key_id=source, destination_key_id=destination, context=context
                ),
            )
        sources, destinations = self._parts(source), self._parts(destination)
        copies = _unpack(blob)
        held = dict(copies)
        readable = [r for r in self._regions if r.name in held and r.name in sources]
        if not readable:
            raise DecryptionError(DECRYPT_FAILED)
        # Even under the same key: after a KMS-managed rotation that moves the
        # copy to the newest key material.
        moving = [r for r in readable if r.name in destinations]
        out: dict[str, bytes] = {}
        if moving:
            out |= await self._each(
                "re_encrypt_dek",
                moving,
                lambda region: _rotation(region).re_encrypt_dek(
                    held[region.name],
                    source_key_id=sources[region.name],
                    destination_key_id=destinations[region.name],
                    context=context,
                ),
            )
        missing = [r for r in self._regions if r.name in destinations and r not in moving]
        if missing:
            plaintext = await self._failover(
                "re_encrypt_dek",
                readable,
                lambda region: region.service.decrypt_dek(
                    sources[region.name], held[region.name], context=context
                ),
            )
            out |= await self._each(
                "re_encrypt_dek",
                missing,
                lambda region: region.service.encrypt_dek(
                    destinations[region.name], plaintext, context=context
                ),
            )
        names = [name for name, _ in copies if name in out]
        names += [region.name for region in missing if region.name not in names]
        return _pack([(name, out[name]) for name in names])

    # -- PartialWrapping -------------------------------------------------------

    def partial_wrap(self, key_id: str, wrapped_dek: bytes) -> float | None:
        """Whether ``wrapped_dek`` lacks a copy that :meth:`encrypt_dek` makes under ``key_id``.

        ``None`` when it lacks none (and always in ``"replicas"`` mode, or for
        bytes that are no every-region wrapped key); else the seconds until
        the soonest of the missing regions may be called again: 0 if its
        breaker is closed, what is left of its open period, or
        ``attempt_timeout`` while a probe of it is out. See
        :class:`~encx_async.PartialWrapping`.
        """
        if self._mode != "every-region":
            return None
        try:
            parts = self._parts(key_id)
            copies = {name for name, _ in _unpack(bytes(wrapped_dek))}
        except (ConfigurationError, DecryptionError):
            return None
        missing = [r for r in self._regions if r.name in parts and r.name not in copies]
        if not missing:
            return None
        now = self._clock()
        return min(region.breaker.retry_in(now) for region in missing)


def _count_skips(failed: Mapping[_Region, _RegionFailed]) -> None:
    """Count the regions a call ended up not trying because their breakers were open."""
    for region, exc in failed.items():
        if exc.skipped:
            region.skipped += 1


def _is_answer(exc: Exception) -> bool:
    """Whether a region's error is its KMS answering (a wrong key, a denied call...).

    A ValueError (a bad argument, an ARN of another region) or a ClosedError
    was raised before the region was asked, so it says nothing about it.
    """
    return isinstance(exc, KMSError | DecryptionError) and not isinstance(exc, ValueError)


def _restated(exc: KMSError, message: str) -> KMSError:
    """``exc`` with ``message`` for its text: the same class, code and region failures."""
    if isinstance(exc, RegionsUnavailableError):
        # Its constructor writes the message from the failures: keep those, set the text.
        again = RegionsUnavailableError(exc.operation, exc.failures)
        again.args = (message,)
        return again
    return type(exc)(message, code=exc.code)


def _rotation(region: _Region) -> KeyRotationService:
    service = region.service
    if not isinstance(service, KeyRotationService):
        raise ConfigurationError(
            f"the service of region {region.name} does not implement KeyRotationService"
        )
    return service


def _replicator(primary: _CreatesMultiRegionKeys, key_id: str, alias: str | None) -> _Call[None]:
    """Replicate ``key_id`` from the primary into a region, and give it ``alias`` there."""

    async def replicate(region: _Region) -> None:
        service = region.service
        if isinstance(primary, LocalKMSService) and isinstance(service, LocalKMSService):
            await primary.replicate_key(key_id, service, alias=alias)
            return
        if not isinstance(primary, _ReplicatesByRegion) or not isinstance(
            service, _CreatesMultiRegionKeys
        ):
            raise ConfigurationError(f"the services cannot replicate keys into {region.name}")
        replica = await primary.replicate_key(key_id, region.name)
        if alias is None:
            return
        try:
            await service.create_alias(alias, replica)
        except KMSError as exc:
            # Already there and naming the replica (a retried create) is what we want.
            if exc.code != "AlreadyExistsException" or await service.get_key_id(alias) != replica:
                raise

    return replicate


def _parse_composite(key_ref: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    body = key_ref[len(_COMPOSITE_PREFIX) :]
    for item in body.split(","):
        region, sep, ref = item.partition("=")
        if not sep or not _is_region(region) or not ref or region in parts:
            raise ConfigurationError(
                f"{key_ref!r} is not a multi-region key id "
                f"('{_COMPOSITE_PREFIX}<region>=<key>,<region>=<key>...')"
            )
        parts[region] = ref
    return parts


def _pack(copies: Sequence[tuple[str, bytes]]) -> bytes:
    """The every-region wrapped key: each region's copy, named by region."""
    # Sized first: within the envelope's limit every count and length fits its field.
    size = len(_BLOB_MAGIC) + 2 + sum(3 + len(region) + len(copy) for region, copy in copies)
    if size > MAX_WRAPPED_DEK:
        raise EncryptionError(
            f"the data key wrapped in {len(copies)} regions takes {size} bytes, more than "
            f"the {MAX_WRAPPED_DEK} an envelope holds; use fewer regions"
        )
    out = bytearray(_BLOB_MAGIC)
    out += bytes([_BLOB_VERSION, len(copies)])
    for region, copy in copies:
        name = region.encode("ascii")
        out += bytes([len(name)]) + name + len(copy).to_bytes(2, "big") + copy
    return bytes(out)


def _unpack(blob: bytes) -> list[tuple[str, bytes]]:
    """The copies of :func:`_pack`; DecryptionError for anything else."""
    head = len(_BLOB_MAGIC) + 2
    if len(blob) < head or blob[: len(_BLOB_MAGIC)] != _BLOB_MAGIC:
        raise DecryptionError(DECRYPT_FAILED)
    if blob[len(_BLOB_MAGIC)] != _BLOB_VERSION:
        raise DecryptionError(DECRYPT_FAILED)
    count = blob[len(_BLOB_MAGIC) + 1]
    copies: list[tuple[str, bytes]] = []
    at = head
    for _ in range(count):
        if at >= len(blob):
            raise DecryptionError(DECRYPT_FAILED)
        name_end = at + 1 + blob[at]
        copy_start = name_end + 2
        if copy_start > len(blob):
            raise DecryptionError(DECRYPT_FAILED)
        try:
            region = blob[at + 1 : name_end].decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionError(DECRYPT_FAILED) from None
        copy_end = copy_start + int.from_bytes(blob[name_end:copy_start], "big")
        if not _is_region(region) or copy_end > len(blob) or copy_end == copy_start:
            raise DecryptionError(DECRYPT_FAILED)
        if any(region == seen for seen, _ in copies):
            raise DecryptionError(DECRYPT_FAILED)
        copies.append((region, blob[copy_start:copy_end]))
        at = copy_end
    if at != len(blob) or not copies:
        raise DecryptionError(DECRYPT_FAILED)
    return copies


def _is_region(name: str) -> bool:
    return len(name) <= _MAX_REGION and _REGION_RE.fullmatch(name) is not None


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name} must be a number > 0, not {value!r}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, not {value!r}")
