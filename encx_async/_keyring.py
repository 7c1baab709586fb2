"""The KEK versions one Crypto knows, kept in step with the key store.

Encryption uses the newest active version; decryption looks a version up. The
first message after each ``check_interval`` starts a background re-read of the
versions (and a PostgreSQL change announcement starts one at once), so every
busy instance of a fleet moves to a new version within that bound, and a
database outage never stops work on the versions already known. An idle
instance reads nothing: the interval is measured by an injectable clock that
only messages read, not by a timer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from encx_async._exceptions import (
    ConfigurationError,
    KeyStoreCorruptError,
    KeyVersionError,
    KeyVersionNotFoundError,
)
from encx_async._keystore import KEKVersion, KeyState, KeyStore, NewKey

__all__ = ["KeyRing"]

logger = logging.getLogger("encx_async.keys")
#: How far above the newest known version a ciphertext's version may be and
#: still send us to the database: a forged number must not turn every decrypt
#: into a query, and a fleet is never this many rotations behind.
_LOOKAHEAD = 1000


def _nothing() -> None:
    pass


class KeyRing:
    def __init__(
        self,
        store: KeyStore,
        alias: str,
        *,
        check_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.alias = alias
        self._check_interval = check_interval
        #: a monotonic clock in seconds (a fake one in tests)
        self.clock = clock
        self._versions: dict[int, KEKVersion] = {}
        #: usable (not retired) versions → key id: what the hot path reads
        self.key_ids: dict[int, str] = {}
        self.current = 0
        #: when, by ``clock``, to look for another instance's changes next
        self.next_check = -math.inf
        #: called when the usable versions or the current one change
        self.on_change: Callable[[], None] = _nothing
        self._reload: asyncio.Task[None] | None = None  # background re-read
        self._lookup: asyncio.Task[None] | None = None  # re-read for an unknown version
        self._started = 0  # re-reads begun, and the latest applied
        self._applied = 0

    # -- loading -----------------------------------------------------------------

    async def start(self, first_key: NewKey) -> KEKVersion:
        """Read the versions, creating version 1 (race-safely) if there is none."""
        await self.store.initial_version(self.alias, first_key)
        await self.reload()
        return self._versions[self.current]

    async def reload(self) -> None:
        """Re-read the versions. Of overlapping re-reads, only the last one begun is
        applied: one that began before a rotation committed must not undo it."""
        self._started += 1
        ticket = self._started
        versions = await self.store.versions(self.alias)
        if ticket > self._applied:
            self._applied = ticket
            self.install(versions)

    def install(self, versions: list[KEKVersion]) -> None:
        active = [v for v in versions if v.state == "active"]
        if not active:
            raise KeyStoreCorruptError(
                f"alias {self.alias!r} has no active KEK version in {self.store.url}"
            )
        self._versions = {v.version: v for v in versions}
        key_ids = {v.version: v.key_id for v in versions if v.state != "retired"}
        newest = max(v.version for v in active)
        changed = key_ids != self.key_ids or newest != self.current
        # Updated in place: the Crypto's hot path holds this very dict.
        self.key_ids.clear()
        self.key_ids.update(key_ids)
        if newest != self.current and self.current:
            logger.info("KEK %s: now encrypting under version %d", self.alias, newest)
        self.current = newest
        if changed:
            self.on_change()
        self._wait_for_next_check()

    def check_if_due(self) -> None:
        """Start a background re-read if ``check_interval`` has passed since the last."""
        if self.clock() >= self.next_check:
            self.check_soon()

    def check_soon(self) -> None:
        """Start a background re-read unless one is running (cheap to call often)."""
        self._wait_for_next_check()
        if self._reload is None or self._reload.done():
            self._reload = asyncio.ensure_future(self._background_reload())

    def _wait_for_next_check(self) -> None:
        self.next_check = self.clock() + self._check_interval

    async def _background_reload(self) -> None:
        try:
            await self.reload()
        except Exception as exc:  # keep serving the versions already known
            reason = type(exc).__name__
            logger.warning("KEK %s: could not re-read versions (%s)", self.alias, reason)

    # -- lookups -----------------------------------------------------------------

    async def key_id_for(self, version: int) -> str:
        """The key id of ``version``, re-reading the store for one newer than known."""
        key_id = self.key_ids.get(version)
        if key_id is not None:
            return key_id
        newest = max(self._versions, default=0)
        # Versions are numbered without gaps, so only a number above the newest
        # known can be new. One far above it is forged, and not worth a query.
        if newest < version <= newest + _LOOKAHEAD:
            for _ in range(2):
                # Join a re-read under way; if it began before the version was
                # written it may miss it, so then read once more, ourselves.
                joined = self._lookup is not None and not self._lookup.done()
                if not joined:
                    self._lookup = asyncio.ensure_future(self.reload())
                assert self._lookup is not None
                await asyncio.shield(self._lookup)
                if version in self._versions or not joined:
                    break
        found = self._versions.get(version)
        if found is None:
            raise KeyVersionNotFoundError(
                f"KEK version {version} of {self.alias!r} is not in {self.store.url}"
            )
        if found.state == "retired":
            raise KeyVersionError(
                f"KEK version {version} of {self.alias!r} is retired; "
                "rewrap data before retiring its version"
            )
        return found.key_id

    def binds(self, version: int) -> bool:
        """Whether ``version``'s DEKs carry its number in their KMS encryption context.

        Only a version the store records as unbound (from before the binding)
        is not; one not known here counts as bound, so that an unwrap of it fails
        rather than goes without the check.
        """
        found = self._versions.get(version)
        return found is None or found.version_bound

    def versions(self) -> list[KEKVersion]:
        return sorted(self._versions.values(), key=lambda v: v.version)

    # -- changes -----------------------------------------------------------------

    async def rotate(self, new_key: NewKey) -> KEKVersion:
        created = await self.store.next_version(self.alias, new_key)
        await self.reload()
        return created

    async def set_state(self, version: int, state: KeyState) -> KEKVersion:
        changed = await self.store.set_state(self.alias, version, state)
        await self.reload()
        if changed.state != state:
            raise ConfigurationError(
                f"KEK version {version} of {self.alias!r} is the active version in "
                f"{self.store.url}: rotate before retiring it"
            )
        return changed

    async def aclose(self) -> None:
        tasks = [t for t in (self._reload, self._lookup) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.aclose()
