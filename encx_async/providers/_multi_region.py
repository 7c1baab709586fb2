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
    :meth:`~MultiRegionKMSService.get_key_id` (which an opening
    :class:`~encx_async.Crypto` checks its key with) refuses one.

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

This module checks the arguments and hands each call to its mode:
:mod:`~encx_async.providers._mode_replicas` or
:mod:`~encx_async.providers._mode_every_region`, both built on the regions,
attempts and failover of :mod:`~encx_async.providers._regions` and the
breakers of :mod:`~encx_async.providers._breaker`. What a mode needs of a
provider beyond :class:`~encx_async.kms.KeyManagementService` (making and
replicating multi-region keys) is a protocol of
:mod:`~encx_async.providers._replication`, never a provider's class.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Final, Self, TypedDict, Unpack

from encx_async._context import normalize_context
from encx_async._exceptions import ConfigurationError, RegionsUnavailableError
from encx_async._keystore._default import DefaultDatabase, variant
from encx_async.kms import KeyDeletion, KeyManagementService
from encx_async.providers._breaker import Breaker, BreakerState
from encx_async.providers._common import (
    ProviderResource,
    as_bytes,
    check_alias_name,
    check_description,
    check_key_ref,
    check_plaintext,
)
from encx_async.providers._mode_every_region import EveryRegion
from encx_async.providers._mode_replicas import Replicas
from encx_async.providers._regions import (
    Mode,
    MultiRegionMode,
    MultiRegionStats,
    Region,
    RegionSet,
    RegionStats,
    is_multi_region_key,
    is_region,
    rotation,
)

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

_MODES: Final[Mapping[str, type[Mode]]] = {mode.name: mode for mode in (Replicas, EveryRegion)}


class _Options(TypedDict, total=False):
    """The keyword arguments :meth:`MultiRegionKMSService.from_regions` passes on."""

    mode: MultiRegionMode
    primary: str | None
    attempt_timeout: float
    failure_threshold: int
    reset_timeout: float
    max_reset_timeout: float
    min_regions: int
    clock: Callable[[], float]


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
        region can serve probes sooner (below).
    :param min_regions: in ``"every-region"`` mode, how many regions a wrap
        needs (1 by default: a wrap made while a region is down lacks that
        region's copy; raise it to refuse such wraps).
    :param clock: monotonic seconds for the breakers; tests pass a fake one.

    Only unavailability (a :class:`~encx_async.KMSUnavailableError`, or no
    answer within ``attempt_timeout``) moves a call to the next region; a wrong
    key, a denied permission or a ciphertext that does not match is raised from
    the region that answered. Each region has a circuit breaker: after
    ``failure_threshold`` such failures in a row it opens and calls skip the
    region; after the open period one call probes it, and success closes the
    breaker. A call that no other region can serve probes the skipped regions
    early, the one whose latest failure is oldest first. A region has at most
    one probe out at a time (other callers wait for its outcome) and none
    within ``attempt_timeout`` of its latest failure; an early probe that fails
    leaves the open period as it was. docs/multi-region.md ("Failover and the
    circuit breaker") has the details.

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
        regions: list[Region] = []
        for service in services:
            if not isinstance(service, KeyManagementService):
                raise TypeError(
                    f"each service must implement KeyManagementService, not "
                    f"{type(service).__name__}"
                )
            name = getattr(service, "region", None)
            if not isinstance(name, str) or not is_region(name):
                raise ConfigurationError(
                    f"{service!r} does not say its region; give each KMSService Config(region=...)"
                )
            if any(region.name == name for region in regions):
                raise ConfigurationError(f"two services for region {name}: give one per region")
            breaker = Breaker(
                failure_threshold, reset_timeout, max_reset_timeout, float(attempt_timeout)
            )
            regions.append(Region(name, service, breaker))
        if min_regions > len(regions):
            raise ConfigurationError(
                f"min_regions={min_regions} is more than the {len(regions)} region(s) given"
            )
        by_name = {region.name: region for region in regions}
        primary_name = regions[0].name if primary is None else primary
        if primary_name not in by_name:
            raise ConfigurationError(
                f"primary region {primary_name!r} is not one of {', '.join(by_name)}"
            )
        self._regions = RegionSet(
            regions, by_name[primary_name], attempt_timeout=float(attempt_timeout), clock=clock
        )
        self._mode: Mode = _MODES[mode](self._regions, min_regions=min_regions)
        self._owned: tuple[KeyManagementService, ...] = ()
        self._opened = False
        self._closed = False

    @classmethod
    def from_regions(
        cls,
        regions: Sequence[str],
        config: Config | None = None,
        *,
        endpoint_urls: Mapping[str, str] | None = None,
        **options: Unpack[_Options],
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
        self = cls(services, **options)
        self._owned = tuple(services)
        return self

    # -- introspection ---------------------------------------------------------

    @property
    def mode(self) -> MultiRegionMode:
        return self._mode.name

    @property
    def regions(self) -> tuple[str, ...]:
        """The region names, nearest first."""
        return tuple(region.name for region in self._regions.all)

    @property
    def primary(self) -> str:
        return self._regions.primary.name

    def service(self, region: str) -> KeyManagementService:
        """The provider of ``region``."""
        try:
            return self._regions.by_name[region].service
        except KeyError:
            raise ConfigurationError(
                f"region {region!r} is not one of {', '.join(self._regions.by_name)}"
            ) from None

    def stats(self) -> MultiRegionStats:
        """Calls, failures, failovers and breaker state per region, as of now."""
        return self._regions.stats()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._opened else "not opened"
        return (
            f"{type(self).__name__}(mode={self.mode!r}, regions={list(self.regions)!r}, "
            f"primary={self.primary!r}, {state})"
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

    # -- KeyManagementService --------------------------------------------------

    async def get_key_id(self, alias: str) -> str:
        """Resolve an alias, key id or ARN.

        ``"replicas"``: through the nearest region that answers (an alias
        name must exist in each region it is resolved in); a multi-region
        key's ARN comes back in the primary region, and a key that is not
        multi-region is refused with :class:`~encx_async.ConfigurationError`
        (it lives in one region, so nothing about it could fail over; this is
        what an opening :class:`~encx_async.Crypto` checks its key with).
        ``"every-region"``: an alias name is resolved in every region (all
        must answer), and the result is the composite id; a composite id is
        checked in the regions that answer (at least one) and returned.
        """
        key_ref = check_key_ref(alias)
        await self._ensure_open()
        return await self._mode.get_key_id(key_ref)

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
        return await self._mode.create_key(description, alias)

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Wrap ``plaintext_dek``: in the primary region first (``"replicas"``), or
        in every region at once (``"every-region"``, at least ``min_regions``)."""
        key_ref = check_key_ref(key_id)
        plaintext = check_plaintext(plaintext_dek)
        context = normalize_context(context)
        await self._ensure_open()
        return await self._mode.encrypt_dek(key_ref, plaintext, context)

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Unwrap through the nearest region that answers (and, in every-region
        mode, holds a copy)."""
        key_ref = check_key_ref(key_id)
        blob = as_bytes(ciphertext_dek, "wrapped data key")
        context = normalize_context(context)
        await self._ensure_open()
        return await self._mode.decrypt_dek(key_ref, blob, context)

    # -- KeyRotationService ----------------------------------------------------

    async def update_alias(self, alias: str, key_id: str) -> None:
        """Point ``alias`` at ``key_id`` in every region the key is in; all must answer."""
        check_alias_name(alias)
        key_ref = check_key_ref(key_id)
        await self._ensure_open()
        await self._mode.update_alias(alias, key_ref)

    async def rotate_key_material(self, key_id: str) -> None:
        """New key material now, in the key's home (each region's key in every-region mode).

        A multi-region key rotates in the primary region, and KMS gives the new
        material to its replicas.
        """
        key_ref = check_key_ref(key_id)
        await self._ensure_open()
        regions, ref = self._mode.homes(key_ref, "rotate_key_material")
        await self._regions.each(
            "rotate_key_material",
            regions,
            lambda region: rotation(region).rotate_key_material(ref(region)),
        )

    async def enable_key_rotation(self, key_id: str, *, period_days: int | None = None) -> None:
        """Turn on scheduled rotation where :meth:`rotate_key_material` would rotate."""
        key_ref = check_key_ref(key_id)
        await self._ensure_open()
        regions, ref = self._mode.homes(key_ref, "enable_key_rotation")
        await self._regions.each(
            "enable_key_rotation",
            regions,
            lambda region: rotation(region).enable_key_rotation(
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
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Move a wrapped data key to another key inside the KMS (``ReEncrypt``).

        It is unwrapped with ``context`` and wrapped again with
        ``destination_context`` (by default ``context``), in every region alike.

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
        target_context = (
            context if destination_context is None else normalize_context(destination_context)
        )
        await self._ensure_open()
        return await self._mode.re_encrypt_dek(blob, source, destination, context, target_context)

    # -- KeyDeletion -------------------------------------------------------------

    async def schedule_key_deletion(self, key_id: str, *, pending_days: int = 7) -> None:
        """Schedule the key's deletion in every region it is in; all must answer.

        ``"every-region"``: each region's part. ``"replicas"``: the replicas
        and the primary at once (KMS deletes the primary only after its
        replicas; meanwhile it is ``PendingReplicaDeletion``).
        """
        key_ref = check_key_ref(key_id)
        await self._ensure_open()
        regions, ref = self._mode.everywhere(key_ref, "schedule_key_deletion")
        await self._regions.each(
            "schedule_key_deletion",
            regions,
            lambda region: _deletion(region).schedule_key_deletion(
                ref(region), pending_days=pending_days
            ),
        )

    async def default_database(self, kek_alias: str) -> str | None:
        """Where a Crypto given no database keeps the versions: the primary
        region's choice, in a file of its own per mode (``keys.multi-region-
        replicas.db``), since the key ids of this service are not the ones a
        single region's service would record."""
        service = self._regions.primary.service
        if not isinstance(service, DefaultDatabase):
            return None
        chosen = await service.default_database(kek_alias)
        return None if chosen is None else variant(chosen, f"multi-region-{self._mode.name}")

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
        return self._mode.partial_wrap(key_id, wrapped_dek)


def _deletion(region: Region) -> KeyDeletion:
    service = region.service
    if not isinstance(service, KeyDeletion):
        raise ConfigurationError(
            f"the service of region {region.name} does not implement KeyDeletion"
        )
    return service


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name} must be a number > 0, not {value!r}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, not {value!r}")
