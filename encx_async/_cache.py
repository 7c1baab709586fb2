"""DEKCache: reuse data keys within safe limits, and never ask the KMS twice at once.

Two sides, each a bounded LRU map with a TTL:

* encrypt side, keyed by (KEK id, KEK version, context): one DEK and its wrapped
  form serve up to ``max_messages_per_dek`` messages and ``max_bytes_per_dek``
  bytes for ``ttl`` seconds. A use is counted *before* the key is handed out, and
  a key that reaches a limit is never handed out again;
* decrypt side, keyed by an envelope's binding (KEK version, wrapped DEK,
  key commitment) and context: unwrapped DEKs for
  ``ttl`` seconds.

Misses are single-flight: the first caller starts the KMS call as a task of its
own and every concurrent caller for the same entry awaits that task through
:func:`asyncio.shield`, so a cancelled caller cancels nobody else, and a failure
reaches every waiter and is not cached. Within ``refresh_ahead`` seconds of an
entry's end (and, if asked, near its last uses), one background task fetches its
successor while callers keep using the current entry; the successor takes over
only when the current entry ends, so no use of a key is wasted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from ._exceptions import ClosedError, ConfigurationError
from ._fork import forget_in_child

__all__ = ["NIST_GCM_RANDOM_NONCE_LIMIT", "CacheSideStats", "DEKCache", "DEKCacheStats"]

logger = logging.getLogger("encx_async.cache")

#: NIST SP 800-38D, 8.3: at most 2**32 AES-GCM invocations with random 96-bit
#: nonces under one key. No setting can exceed it.
NIST_GCM_RANDOM_NONCE_LIMIT = 2**32
_REASONS = ("ttl", "messages", "bytes")
_UNBOUNDED = 1 << 64  # above any count a process can reach
#: times a caller waits for a key that others then use up or evict, before it
#: gets one of its own
_ROUNDS = 3


class _Value(Protocol):
    """What the cache needs of a cached key (a Sealer): wiping, and how long it
    may be kept (``None``: the ttl)."""

    lifetime: float | None

    def wipe(self) -> None: ...


V = TypeVar("V", bound=_Value)
#: Makes the value for a cache key (a KMS call); given by the Crypto that owns the cache.
Loader = Callable[[Hashable], Awaitable[V]]


async def _unbound(key: Hashable) -> Any:
    raise RuntimeError("this DEKCache is not attached to a Crypto")


@dataclass(frozen=True, slots=True)
class CacheSideStats:
    """Counters of one side of the cache since it was created (in this process)."""

    #: lookups served by a cached key, without waiting
    hits: int
    #: lookups that started a KMS call, and waited for it
    misses: int
    #: lookups that found a KMS call for their entry under way and waited for it
    coalesced: int
    #: background refresh-ahead fetches started, and how many of them failed
    refreshes: int
    refresh_failures: int
    #: entries dropped to respect ``max_entries``
    evictions: int
    #: entries retired by reason: "ttl", "messages", "bytes"
    expirations: Mapping[str, int]
    entries: int


@dataclass(frozen=True, slots=True)
class DEKCacheStats:
    encrypt: CacheSideStats
    decrypt: CacheSideStats

    @property
    def hit_ratio(self) -> float:
        """The share of lookups, both sides together, that made no KMS call of their own:
        ``(hits + coalesced) / (hits + coalesced + misses)``, 0.0 before any lookup.

        A coalesced wait cost no KMS request, though it waited for one, so
        ``1 - hit_ratio`` is the share of lookups that sent a request: what the
        KMS bill and quota see. The share that waited for the KMS is
        ``(misses + coalesced)`` over the same total.
        """
        saved = self.encrypt.hits + self.decrypt.hits
        saved += self.encrypt.coalesced + self.decrypt.coalesced
        total = saved + self.encrypt.misses + self.decrypt.misses
        return saved / total if total else 0.0


class _Entry(Generic[V]):
    __slots__ = ("bytes", "dead", "expires_at", "messages", "refresh_at", "refreshing", "value")

    def __init__(self, value: V, now: float, ttl: float, refresh_ahead: float) -> None:
        self.value = value
        self.expires_at = now + ttl
        self.refresh_at = now + ttl - refresh_ahead
        self.messages = 0
        self.bytes = 0
        self.refreshing = False
        self.dead = False  # retired: never handed out again


@dataclass(slots=True)
class _Limits:
    ttl: float
    max_entries: int
    refresh_ahead: float
    max_messages: int | None = None
    max_bytes: int | None = None
    refresh_ahead_uses: float = 0.0

    def near_end(self, entry: _Entry[V], now: float) -> bool:
        if now >= entry.refresh_at:
            # An unwrapped key read once near its end is not worth a KMS call;
            # refresh only keys that are being reused (the encrypt side always is):
            # read twice before this read, which is counted already.
            return self.max_messages is not None or entry.messages >= 3
        if not self.refresh_ahead_uses or self.max_messages is None or self.max_bytes is None:
            return False
        share = 1.0 - self.refresh_ahead_uses
        return entry.messages >= self.max_messages * share or entry.bytes >= self.max_bytes * share


@dataclass(slots=True)
class _Side(Generic[V]):
    limits: _Limits
    clock: Callable[[], float]
    loader: Loader[V] = field(default=_unbound)
    entries: OrderedDict[Hashable, _Entry[V]] = field(default_factory=OrderedDict)
    inflight: dict[Hashable, asyncio.Task[_Entry[V]]] = field(default_factory=dict)
    successors: dict[Hashable, _Entry[V]] = field(default_factory=dict)
    tasks: set[asyncio.Task[_Entry[V]]] = field(default_factory=set)
    closed: bool = False
    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    refreshes: int = 0
    refresh_failures: int = 0
    evictions: int = 0
    expirations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_REASONS, 0))

    #: a use that leaves an entry's counts below these needs no bookkeeping but
    #: the counts: it reaches no limit and starts no refresh-ahead (what the
    #: Crypto's fast path checks; ints, compared with ints on every message)
    quiet_messages: int = field(init=False)
    quiet_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        limits = self.limits
        quiet = 1.0 - limits.refresh_ahead_uses if limits.refresh_ahead_uses else 1.0

        def bound(limit: int | None) -> int:
            # For a count n and a real q, n < q exactly when n < ceil(q); min()
            # keeps a float rounded up from letting the last use through.
            return _UNBOUNDED if limit is None else min(limit, math.ceil(limit * quiet))

        self.quiet_messages = bound(limits.max_messages)
        self.quiet_bytes = bound(limits.max_bytes)

    def stats(self) -> CacheSideStats:
        return CacheSideStats(
            hits=self.hits,
            misses=self.misses,
            coalesced=self.coalesced,
            refreshes=self.refreshes,
            refresh_failures=self.refresh_failures,
            evictions=self.evictions,
            expirations=MappingProxyType(dict(self.expirations)),
            entries=len(self.entries),
        )

    def take(self, key: Hashable, cost: int | None, uses: int = 1) -> V | None:
        """The cached value for ``key`` with ``uses`` uses counted, or None on a miss.

        Synchronous, so a hit costs no extra await. ``cost`` (encrypt side only)
        is the size of the messages about to use the key, ``uses`` their number
        (the fields of one record share a key).
        """
        if self.closed:
            raise ClosedError("the DEK cache is closed")
        while True:
            entry = self.entries.get(key)
            if entry is not None:
                now = self.clock()
                if now >= entry.expires_at:
                    self._drop(key, entry, "ttl")
                else:
                    self.entries.move_to_end(key)
                if not entry.dead and self._reserve(key, entry, cost, uses):
                    self.hits += 1
                    if not entry.refreshing and self.limits.near_end(entry, now):
                        self._refresh(key, entry)
                    return entry.value
            successor = self.successors.pop(key, None)
            if successor is None:
                return None
            self._install(key, successor)  # fetched ahead: takes over without a KMS call

    async def get(self, key: Hashable, cost: int | None, uses: int = 1) -> V:
        """Like :meth:`take`, but a miss loads the value: once, however many callers ask."""
        for _ in range(_ROUNDS):
            value = self.take(key, cost, uses)
            if value is not None:
                return value
            task = self.inflight.get(key)
            if task is None:
                self.misses += 1
                task = self.inflight[key] = self._spawn(self._load(key, ahead=False))
            else:
                self.coalesced += 1
            try:
                loaded = await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.cancelled() and self.closed:
                    raise ClosedError("the DEK cache was closed while a key was loading") from None
                raise
            # A waiter takes its use from the entry it waited for, so a brand-new
            # entry is never missed because of the clock; if other waiters used it
            # up already, go round again.
            if self._reserve(key, loaded, cost, uses):
                return loaded.value
        # Still nothing: other callers keep using up or evicting each key before
        # this one gets a turn (more busy contexts than max_entries). A key of
        # its own, for this call alone, ends the race; wiped once the caller's
        # current step is done, as a retired key is.
        self.misses += 1
        value = await self.loader(key)
        asyncio.get_running_loop().call_soon(value.wipe)
        return value

    def _spawn(self, coro: Awaitable[_Entry[V]]) -> asyncio.Task[_Entry[V]]:
        task: asyncio.Task[_Entry[V]] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[_Entry[V]]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here: a failure nobody waited for is not an error

    async def _load(self, key: Hashable, *, ahead: bool) -> _Entry[V]:
        try:
            value = await self.loader(key)
        except Exception:
            if ahead:
                self.refresh_failures += 1
                logger.warning("DEK refresh-ahead failed; the current key stays until it ends")
            raise
        finally:
            del self.inflight[key]
        if self.closed:
            value.wipe()
            raise ClosedError("the DEK cache was closed while a key was loading")
        limits = self.limits
        if value.lifetime is None:
            entry = _Entry(value, self.clock(), limits.ttl, limits.refresh_ahead)
        else:
            # Kept briefly on purpose (a partial wrap): fetching its successor
            # ahead would only bring the same thing back.
            entry = _Entry(value, self.clock(), min(value.lifetime, limits.ttl), 0.0)
        current = self.entries.get(key)
        if ahead and current is not None and not current.dead:
            # Keep every remaining use of the current key: the new one waits its turn.
            self._retire_successor(key)
            self.successors[key] = entry
        else:
            self._install(key, entry)
        return entry

    def _install(self, key: Hashable, entry: _Entry[V]) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            _retire(old)
        self._sweep()
        self.entries[key] = entry
        while len(self.entries) > self.limits.max_entries:
            evicted_key, evicted = self.entries.popitem(last=False)
            self.evictions += 1
            _retire(evicted)
            self._retire_successor(evicted_key)

    def _sweep(self) -> None:
        """Retire every expired entry, so a key nobody asks for again is wiped too.

        Runs on each insertion (a KMS call has just happened, so the scan is
        cheap by comparison); a lookup retires the entry it finds expired.
        """
        now = self.clock()
        expired = [(k, e) for k, e in self.entries.items() if now >= e.expires_at]
        for key, entry in expired:
            self._drop(key, entry, "ttl")  # a waiting successor is promoted on the next lookup
        for key in [k for k, e in self.successors.items() if now >= e.expires_at]:
            self._retire_successor(key)

    def _retire_successor(self, key: Hashable) -> None:
        successor = self.successors.pop(key, None)
        if successor is not None:
            _retire(successor)

    def _refresh(self, key: Hashable, entry: _Entry[V]) -> None:
        entry.refreshing = True
        if key in self.inflight or key in self.successors:
            return
        self.refreshes += 1
        self.inflight[key] = self._spawn(self._load(key, ahead=True))

    def _reserve(self, key: Hashable, entry: _Entry[V], cost: int | None, uses: int = 1) -> bool:
        if entry.dead:
            return False
        limits = self.limits
        if cost is None:  # the decrypt side: counted, so that reuse can be told, never limited
            entry.messages += uses
            return True
        if limits.max_messages is None or limits.max_bytes is None:
            return True
        if uses > limits.max_messages:
            return False  # never fits: the caller goes without the cache
        if entry.messages + uses > limits.max_messages:
            self._drop(key, entry, "messages")
            return False
        if entry.bytes + cost > limits.max_bytes:
            self._drop(key, entry, "bytes")
            return False
        entry.messages += uses
        entry.bytes += cost
        if entry.messages >= limits.max_messages:
            self._drop(key, entry, "messages")
        elif entry.bytes >= limits.max_bytes:
            self._drop(key, entry, "bytes")
        return True

    def _drop(self, key: Hashable, entry: _Entry[V], reason: str) -> None:
        if self.entries.get(key) is entry:
            del self.entries[key]
            self.expirations[reason] += 1
        _retire(entry)

    def forget(self) -> None:
        """In a forked child: wipe every key now, and refuse further use.

        The loads in flight are tasks of the parent's event loop, which does not
        run here: they are dropped, not cancelled or awaited.
        """
        self.closed = True
        for entry in (*self.entries.values(), *self.successors.values()):
            entry.dead = True
            entry.value.wipe()
        self.entries.clear()
        self.successors.clear()
        self.inflight.clear()
        self.tasks.clear()

    async def aclose(self) -> None:
        self.closed = True
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in (*self.entries.values(), *self.successors.values()):
            entry.dead = True
            entry.value.wipe()
        self.entries.clear()
        self.successors.clear()


def _retire(entry: _Entry[V]) -> None:
    if entry.dead:
        return
    entry.dead = True
    # The caller that took this key last may still be about to use it in this
    # same step of the event loop (it seals without awaiting): wipe on the next.
    asyncio.get_running_loop().call_soon(entry.value.wipe)


class DEKCache:
    """A cache of data keys for one :class:`~encx_async.Crypto`.

    :param ttl: seconds a key is used for (both sides). Default 300.
    :param max_entries: entries per side, least recently used dropped first.
    :param max_messages_per_dek: messages one DEK encrypts, at most 2**32.
    :param max_bytes_per_dek: plaintext bytes one DEK encrypts.
    :param refresh_ahead: seconds before a key's end in which one background task
        fetches its successor while callers keep using the key. 0 disables.
    :param refresh_ahead_uses: the same on the encrypt side in terms of uses: with
        0.1, the successor is fetched when 10% of a key's messages or bytes remain.
        Off (0.0) by default: a successor fetched just before traffic stops is a
        KMS call that serves nothing.
    :param clock: a monotonic clock in seconds, injectable for tests.

    The trade-off: every message encrypted under one cached DEK is exposed if that
    DEK leaks (for instance from process memory), so ``max_messages_per_dek`` is
    the blast radius. See ``docs/caching.md``.

    In a child forked after it was created, the cache is empty: the keys it held
    are the parent's to count, and are wiped in the child.
    """

    def __init__(
        self,
        *,
        ttl: float = 300.0,
        max_entries: int = 1000,
        max_messages_per_dek: int = 10_000,
        max_bytes_per_dek: int = 2**32,
        refresh_ahead: float = 30.0,
        refresh_ahead_uses: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl > 0:
            raise ConfigurationError("ttl must be positive")
        if max_entries < 1:
            raise ConfigurationError("max_entries must be at least 1")
        if not 1 <= max_messages_per_dek <= NIST_GCM_RANDOM_NONCE_LIMIT:
            raise ConfigurationError(
                "max_messages_per_dek must be 1..2**32 (the NIST SP 800-38D limit), "
                f"got {max_messages_per_dek}"
            )
        if max_bytes_per_dek < 1:
            raise ConfigurationError("max_bytes_per_dek must be at least 1")
        if not 0 <= refresh_ahead < ttl:
            raise ConfigurationError("refresh_ahead must be at least 0 and less than ttl")
        if not 0.0 <= refresh_ahead_uses < 1.0:
            raise ConfigurationError("refresh_ahead_uses must be in [0, 1)")
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_messages_per_dek = max_messages_per_dek
        self.max_bytes_per_dek = max_bytes_per_dek
        self.refresh_ahead = refresh_ahead
        self.refresh_ahead_uses = refresh_ahead_uses
        limits = _Limits(
            ttl,
            max_entries,
            refresh_ahead,
            max_messages_per_dek,
            max_bytes_per_dek,
            refresh_ahead_uses,
        )
        self._encrypt: _Side[_Value] = _Side(limits, clock)
        self._decrypt: _Side[_Value] = _Side(_Limits(ttl, max_entries, refresh_ahead), clock)
        self._owner: object | None = None
        forget_in_child(self)

    def _after_fork_in_child(self) -> None:
        # The parent goes on counting the uses of these keys, so none may be used
        # here. The child gets an empty cache with fresh counters (its stats are
        # its own), free for a Crypto created in this process.
        for side in (self._encrypt, self._decrypt):
            side.forget()
        self._encrypt = _Side(self._encrypt.limits, self._encrypt.clock)
        self._decrypt = _Side(self._decrypt.limits, self._decrypt.clock)
        self._owner = None

    def _bind(
        self, owner: object, encrypt_loader: Loader[V], decrypt_loader: Loader[V]
    ) -> tuple[_Side[V], _Side[V]]:
        """Attach to the one Crypto this cache serves; returns its (encrypt, decrypt) sides."""
        if self._owner is not None and self._owner is not owner:
            raise ConfigurationError("a DEKCache serves one Crypto; create one per Crypto")
        self._owner = owner
        self._encrypt.loader = encrypt_loader
        self._decrypt.loader = decrypt_loader
        return self._encrypt, self._decrypt  # type: ignore[return-value]

    def _release(self, owner: object) -> None:
        """Free this cache for another Crypto, after ``owner`` failed to open
        (it has cached nothing yet)."""
        if self._owner is owner:
            self._owner = None
            self._encrypt.loader = self._decrypt.loader = _unbound

    @property
    def clock(self) -> Callable[[], float]:
        """The clock of the ttl and refresh-ahead (its Crypto's key ring follows it too)."""
        return self._encrypt.clock

    def accepts(self, size: int) -> bool:
        """Whether a message of ``size`` bytes may use a cached key at all."""
        return size <= self.max_bytes_per_dek

    def remember_for_decrypt(self, key: Hashable, value: _Value) -> None:
        """Seed the decrypt side with a key just made for encryption.

        ``value`` must be an object of its own, not the encrypt side's: each side
        wipes what it retires.
        """
        side = self._decrypt
        if not side.closed and key not in side.entries:
            limits = side.limits
            side._install(key, _Entry(value, side.clock(), limits.ttl, limits.refresh_ahead))

    def stats(self) -> DEKCacheStats:
        return DEKCacheStats(encrypt=self._encrypt.stats(), decrypt=self._decrypt.stats())

    async def aclose(self) -> None:
        """Drop and wipe every key, and stop background refreshes. Idempotent."""
        await self._encrypt.aclose()
        await self._decrypt.aclose()

    def __repr__(self) -> str:
        return (
            f"<DEKCache ttl={self.ttl}s max_messages_per_dek={self.max_messages_per_dek} "
            f"entries={len(self._encrypt.entries)}+{len(self._decrypt.entries)}>"
        )
