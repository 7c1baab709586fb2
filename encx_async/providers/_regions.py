"""The regions of a multi-region KMS service, and the calls that fail over between them.

Private: the names here may change in any release. :class:`RegionSet` is what
both modes of :class:`~encx_async.providers._multi_region.MultiRegionKMSService`
share: one :class:`Region` per provider under its circuit breaker, one call to
one region under the attempt timeout (:meth:`RegionSet.attempt`), a call that
moves on until a region answers (:meth:`RegionSet.failover`) and one that asks
several regions at once (:meth:`RegionSet.each`). :class:`Mode` is what each
mode implements on top of them.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Generic, Literal, TypeAlias, TypeVar

import anyio

from encx_async._exceptions import (
    ConfigurationError,
    DecryptionError,
    KMSError,
    KMSUnavailableError,
    RegionsUnavailableError,
)
from encx_async.kms import KeyManagementService, KeyRotationService
from encx_async.providers._breaker import Breaker, BreakerState, Ticket

__all__ = [
    "Call",
    "Gathered",
    "Mode",
    "MultiRegionMode",
    "MultiRegionStats",
    "Region",
    "RegionFailed",
    "RegionSet",
    "RegionStats",
    "arn_region",
    "is_multi_region_key",
    "is_region",
    "restated",
    "rotation",
    "with_region",
]

_log = logging.getLogger("encx_async.kms")

_T = TypeVar("_T")

MultiRegionMode = Literal["replicas", "every-region"]
"""How :class:`~encx_async.providers.aws.MultiRegionKMSService` spreads a data key
over the regions."""

_REGION_RE: Final = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_MAX_REGION: Final = 64  # AWS's are about 15 characters; the blob gives a name one length byte
_ARN_RE: Final = re.compile(
    r"^arn:(?P<partition>[a-z0-9-]+):kms:(?P<region>[a-z0-9-]*):(?P<account>[0-9]*):"
    r"(?P<type>key|alias)/(?P<name>.+)$"
)
_MRK_PREFIX: Final = "mrk-"


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


def arn_region(key_ref: str) -> str | None:
    """The region a KMS ARN names; ``None`` for ids and alias names."""
    if not key_ref.startswith("arn:"):
        return None
    match = _ARN_RE.fullmatch(key_ref)
    if match is None:
        raise ConfigurationError(f"{key_ref!r} is not a KMS key or alias ARN")
    return match["region"]


def with_region(arn: str, region: str) -> str:
    """A multi-region key's ARN with its region replaced (the same key, another replica)."""
    match = _ARN_RE.fullmatch(arn)
    assert match is not None
    return arn[: match.start("region")] + region + arn[match.end("region") :]


def is_region(name: str) -> bool:
    return len(name) <= _MAX_REGION and _REGION_RE.fullmatch(name) is not None


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


Call: TypeAlias = "Callable[[Region], Awaitable[_T]]"
"""What a multi-region call asks of one region."""


class Region:
    __slots__ = ("breaker", "calls", "failovers", "failures", "name", "service", "skipped")

    def __init__(self, name: str, service: KeyManagementService, breaker: Breaker) -> None:
        self.name = name
        self.service = service
        self.breaker = breaker
        self.calls = self.failures = self.failovers = self.skipped = 0


class Gathered(Generic[_T]):
    """What a call to several regions at once came to, region by region."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self.names = [region.name for region in regions]
        self.results: dict[str, _T] = {}
        self.failed: dict[str, RegionFailed] = {}
        self.errors: dict[str, Exception] = {}

    def skipped(self, name: str) -> bool:
        failed = self.failed.get(name)
        return failed is not None and failed.skipped

    def require(self, owner: RegionSet, operation: str, needed: int) -> dict[str, _T]:
        """The results, if there are ``needed`` and no region answered with an error."""
        for name in self.names:
            if name in self.errors:
                raise self.errors[name]
        if len(self.results) >= needed:
            return self.results
        owner.unavailable += 1
        raise RegionsUnavailableError(
            operation,
            [(name, self.failed[name].reason) for name in self.names if name in self.failed],
            succeeded=[name for name in self.names if name in self.results],
            needed=needed if self.results else None,
        ) from next((f.error for f in self.failed.values() if f.error is not None), None)


class RegionFailed(Exception):
    """Internal: one region was unavailable for one call. Never escapes the service."""

    def __init__(
        self, reason: str, error: BaseException | None = None, *, skipped: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.skipped = skipped  # not tried: its breaker is open


class RegionSet:
    """The regions, nearest first, and the calls that go to them; counts what they did."""

    def __init__(
        self,
        regions: Sequence[Region],
        primary: Region,
        *,
        attempt_timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.all = tuple(regions)
        self.by_name = {region.name: region for region in regions}
        self.primary = primary
        #: the primary first, then the others nearest first
        self.wrap_order = (primary, *(r for r in regions if r is not primary))
        self.attempt_timeout = attempt_timeout
        self.clock = clock
        #: calls that failed with RegionsUnavailableError
        self.unavailable = 0
        #: every-region wraps that left out at least one region
        self.partial_wraps = 0

    def stats(self) -> MultiRegionStats:
        now = self.clock()
        regions = []
        for region in self.all:
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
        return MultiRegionStats(tuple(regions), self.unavailable, self.partial_wraps)

    async def attempt(self, region: Region, call: Call[_T], *, last_resort: bool = False) -> _T:
        """Call one region under its breaker and the attempt timeout.

        Raises :class:`RegionFailed` when the region is skipped or unavailable,
        and whatever the region answered otherwise. ``last_resort``: no other
        region can serve the call (see :meth:`Breaker.acquire`).
        """
        breaker = region.breaker
        ticket = await self._ticket(breaker, last_resort)
        if ticket is None:
            raise RegionFailed("circuit open", skipped=True)
        region.calls += 1
        settled = False
        try:
            with anyio.fail_after(self.attempt_timeout):
                result = await call(region)
        except (KMSUnavailableError, TimeoutError) as exc:
            settled = True
            region.failures += 1
            opened = breaker.failed(ticket, self.clock())
            if isinstance(exc, KMSUnavailableError):
                reason = f"{type(exc).__name__}: {exc}"
            else:
                reason = f"no answer within {self.attempt_timeout:g} s"
            if opened:
                _log.warning(
                    "KMS region %s is unavailable; skipping it for %.0f s (%s)",
                    region.name,
                    (breaker.open_until or 0.0) - self.clock(),
                    reason,
                )
            raise RegionFailed(reason, exc) from None
        except Exception as exc:
            if _is_answer(exc):
                settled = True
                breaker.answered(ticket, self.clock())
            raise
        finally:
            if not settled:  # cancelled, or refused before asking: says nothing of the region
                breaker.release(ticket)
        breaker.answered(ticket, self.clock())
        if ticket != "call":
            _log.warning("KMS region %s answered again; using it", region.name)
        return result

    async def _ticket(self, breaker: Breaker, last_resort: bool) -> Ticket | None:
        while True:
            ticket = breaker.acquire(self.clock(), last_resort=last_resort)
            if ticket != "wait":
                return ticket
            # One probe per region at a time: the others hear how it went.
            await breaker.probe_ended()

    async def failover(
        self,
        operation: str,
        order: Sequence[Region],
        call: Call[_T],
    ) -> _T:
        """Try ``order`` until a region answers; RegionsUnavailableError if none does.

        When every region has failed or is skipped, the skipped ones are tried
        as a last resort, the one whose latest failure is oldest first.
        """
        failed: dict[Region, RegionFailed] = {}

        def candidates() -> Iterator[tuple[Region, bool]]:
            yield from ((region, False) for region in order)
            # Reached only once every region of ``order`` has failed or been skipped.
            skipped = [region for region in order if failed[region].skipped]
            for region in sorted(skipped, key=lambda region: region.breaker.failed_at):
                yield region, True

        previous: Region | None = None
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
                    result = await self.attempt(region, call, last_resort=last_resort)
                except RegionFailed as exc:
                    failed[region] = exc
                    last = exc.error or last
                    previous = region
                    continue
                failed.pop(region, None)
                return result
        finally:
            _count_skips(failed)
        self.unavailable += 1
        raise RegionsUnavailableError(
            operation, [(region.name, failed[region].reason) for region in order]
        ) from last

    async def each(
        self,
        operation: str,
        regions: Sequence[Region],
        call: Call[_T],
        *,
        needed: int | None = None,
    ) -> dict[str, _T]:
        """Call several regions at once; their results by region name.

        An answer that is an error is raised (the nearest region's first).
        Fewer than ``needed`` results (all of them by default) raise
        :class:`RegionsUnavailableError`.
        """
        needed = len(regions) if needed is None else needed
        gathered = await self.gather(regions, call, needed)
        return gathered.require(self, operation, needed)

    async def gather(self, regions: Sequence[Region], call: Call[_T], needed: int) -> Gathered[_T]:
        """Call ``regions`` at once; if fewer than ``needed`` answer, the skipped
        ones are tried again as a last resort."""
        gathered = Gathered[_T](regions)

        async def run(region: Region, last_resort: bool) -> None:
            try:
                gathered.results[region.name] = await self.attempt(
                    region, call, last_resort=last_resort
                )
            except RegionFailed as exc:
                gathered.failed[region.name] = exc
                return
            except Exception as exc:
                gathered.errors[region.name] = exc
            gathered.failed.pop(region.name, None)

        async def each(regions: Sequence[Region], last_resort: bool) -> None:
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


def _count_skips(failed: Mapping[Region, RegionFailed]) -> None:
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


def restated(exc: KMSError, message: str) -> KMSError:
    """``exc`` with ``message`` for its text: the same class, code and region failures."""
    if isinstance(exc, RegionsUnavailableError):
        # Its constructor writes the message from the failures: keep those, set the text.
        again = RegionsUnavailableError(exc.operation, exc.failures)
        again.args = (message,)
        return again
    return type(exc)(message, code=exc.code)


def rotation(region: Region) -> KeyRotationService:
    service = region.service
    if not isinstance(service, KeyRotationService):
        raise ConfigurationError(
            f"the service of region {region.name} does not implement KeyRotationService"
        )
    return service


class Mode(ABC):
    """How one mode spreads keys and wrapped data keys over the regions.

    :class:`~encx_async.providers._multi_region.MultiRegionKMSService` checks
    the arguments and opens the services, then hands each call to its mode.
    """

    name: ClassVar[MultiRegionMode]

    def __init__(self, regions: RegionSet, *, min_regions: int) -> None:
        self.regions = regions
        self.min_regions = min_regions

    @abstractmethod
    async def get_key_id(self, key_ref: str) -> str: ...

    @abstractmethod
    async def create_key(self, description: str, alias: str | None) -> str: ...

    @abstractmethod
    async def encrypt_dek(
        self, key_ref: str, plaintext: bytes, context: Mapping[str, str]
    ) -> bytes: ...

    @abstractmethod
    async def decrypt_dek(self, key_ref: str, blob: bytes, context: Mapping[str, str]) -> bytes: ...

    @abstractmethod
    async def update_alias(self, alias: str, key_ref: str) -> None: ...

    @abstractmethod
    def homes(self, key_ref: str, operation: str) -> tuple[list[Region], Callable[[Region], str]]:
        """Where a key's material is managed, and the key's reference in each of those regions."""

    def everywhere(
        self, key_ref: str, operation: str
    ) -> tuple[list[Region], Callable[[Region], str]]:
        """Every region the key is in, and its reference there (what deleting it reaches)."""
        return self.homes(key_ref, operation)

    @abstractmethod
    async def re_encrypt_dek(
        self,
        blob: bytes,
        source: str,
        destination: str,
        context: Mapping[str, str],
        destination_context: Mapping[str, str],
    ) -> bytes: ...

    def partial_wrap(self, key_id: str, wrapped_dek: bytes) -> float | None:
        """See :meth:`~encx_async.providers._multi_region.MultiRegionKMSService.partial_wrap`."""
        return None
