"""DEKCache: exact KMS call counts, single-flight, limits, expiry, refresh-ahead."""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from encx_async import (
    ClosedError,
    ConfigurationError,
    Crypto,
    DecryptionError,
    DEKCache,
    KeyManagementService,
    KMSUnavailableError,
)
from encx_async._envelope import parse
from encx_async.providers.local import LocalKMSService

from .support import FakeClock, GatedKMS

ALIAS = "alias/cache-test"
CTX = {"tenant": "acme"}


@pytest.fixture
async def local() -> AsyncIterator[LocalKMSService]:
    async with LocalKMSService() as kms:
        await kms.create_key("cache tests", alias=ALIAS)
        yield kms


@pytest.fixture
async def gated(local: LocalKMSService) -> GatedKMS:
    return GatedKMS(local)


_open: list[Crypto] = []


async def make(kms: KeyManagementService, cache: DEKCache | None = None) -> Crypto:
    crypto = await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=cache)
    _open.append(crypto)
    return crypto


@pytest.fixture(autouse=True)
async def _close_cryptos() -> AsyncIterator[None]:
    yield
    while _open:
        await _open.pop().aclose()


def wrapped_of(blob: bytes) -> bytes:
    return parse(blob).wrapped_dek


def calls(crypto: Crypto, kind: str) -> int:
    return crypto.stats().kms_calls.get(kind, 0)


@pytest.mark.slow
async def test_100k_encrypts_need_100_wraps_and_100_unwraps(local: LocalKMSService) -> None:
    writer = await make(local, DEKCache(max_messages_per_dek=1000))
    blobs: list[bytes] = []
    for start in range(0, 100_000, 1000):
        batch = [
            writer.encrypt(b"record %d" % i, context=CTX, aad=b"%d" % i)
            for i in range(start, start + 1000)
        ]
        blobs += await asyncio.gather(*batch)
    assert calls(writer, "encrypt_dek") == 100
    assert len({wrapped_of(b) for b in blobs}) == 100

    reader = await make(local, DEKCache())
    for start in range(0, 100_000, 1000):
        batch = [
            reader.decrypt(blobs[i], context=CTX, aad=b"%d" % i) for i in range(start, start + 1000)
        ]
        plain = await asyncio.gather(*batch)
        assert plain[-1] == b"record %d" % (start + 999)
    assert calls(reader, "decrypt_dek") == 100
    await writer.aclose()
    await reader.aclose()


async def test_1000_concurrent_encrypts_on_cold_cache_make_one_wrap(
    kms: KeyManagementService,
) -> None:
    await kms.create_key("cache tests", alias=ALIAS)
    crypto = await make(kms, DEKCache())
    blobs = await asyncio.gather(*(crypto.encrypt(b"x", context=CTX) for _ in range(1000)))
    assert calls(crypto, "encrypt_dek") == 1
    stats = crypto.stats().cache
    assert stats is not None
    assert (stats.encrypt.misses, stats.encrypt.coalesced, stats.encrypt.hits) == (1, 999, 0)
    # As documented: a coalesced wait sent no request of its own, so it counts as
    # saved, and 1 - hit_ratio is the share of lookups that called the KMS.
    assert stats.hit_ratio == 999 / 1000
    assert len({wrapped_of(b) for b in blobs}) == 1
    for _ in range(1000):
        await crypto.encrypt(b"x", context=CTX)
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.hits == 1000
    assert stats.hit_ratio == 1999 / 2000
    await crypto.aclose()


async def test_1000_concurrent_decrypts_on_cold_cache_make_one_unwrap(
    kms: KeyManagementService,
) -> None:
    await kms.create_key("cache tests", alias=ALIAS)
    writer = await make(kms, DEKCache())
    blobs = [await writer.encrypt(b"row %d" % i, context=CTX) for i in range(1000)]
    assert len({wrapped_of(b) for b in blobs}) == 1

    reader = await make(kms, DEKCache())
    plain = await asyncio.gather(*(reader.decrypt(b, context=CTX) for b in blobs))
    assert plain == [b"row %d" % i for i in range(1000)]
    assert calls(reader, "decrypt_dek") == 1
    stats = reader.stats().cache
    assert stats is not None
    assert (stats.decrypt.misses, stats.decrypt.coalesced, stats.decrypt.hits) == (1, 999, 0)
    assert stats.hit_ratio == 999 / 1000
    await writer.aclose()
    await reader.aclose()


async def test_a_cancelled_waiter_does_not_cancel_the_others(gated: GatedKMS) -> None:
    crypto = await make(gated, DEKCache())
    gated.gate.clear()
    first = asyncio.ensure_future(crypto.encrypt(b"a", context=CTX))
    others = [asyncio.ensure_future(crypto.encrypt(b"b", context=CTX)) for _ in range(5)]
    await gated.entered.wait()
    first.cancel()  # the caller whose miss started the KMS call
    others[0].cancel()
    await asyncio.sleep(0)
    gated.gate.set()
    results = await asyncio.gather(*others[1:])
    assert first.cancelled()
    assert others[0].cancelled()
    assert len({wrapped_of(b) for b in results}) == 1
    assert calls(crypto, "encrypt_dek") == 1
    # The entry was installed despite the cancellations: the next call is a hit.
    assert wrapped_of(await crypto.encrypt(b"c", context=CTX)) == wrapped_of(results[0])
    assert calls(crypto, "encrypt_dek") == 1
    await crypto.aclose()


async def test_a_failed_kms_call_reaches_every_waiter_and_is_not_cached(gated: GatedKMS) -> None:
    crypto = await make(gated, DEKCache())
    gated.failures.append(KMSUnavailableError("KMS down"))
    results = await asyncio.gather(
        *(crypto.encrypt(b"x", context=CTX) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, KMSUnavailableError) for r in results)
    assert calls(crypto, "encrypt_dek") == 1
    # The next caller retries, and succeeds.
    blob = await crypto.encrypt(b"x", context=CTX)
    assert calls(crypto, "encrypt_dek") == 2
    assert await crypto.decrypt(blob, context=CTX) == b"x"
    await crypto.aclose()


async def test_decrypt_side_failure_is_shared_then_retried(gated: GatedKMS) -> None:
    writer = await make(gated)
    blob = await writer.encrypt(b"secret", context=CTX)
    reader = await make(gated, DEKCache())
    gated.failures.append(KMSUnavailableError("KMS down"))
    results = await asyncio.gather(
        *(reader.decrypt(blob, context=CTX) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, KMSUnavailableError) for r in results)
    assert calls(reader, "decrypt_dek") == 1
    assert await reader.decrypt(blob, context=CTX) == b"secret"
    assert calls(reader, "decrypt_dek") == 2


async def test_ttl_expires_both_sides(local: LocalKMSService) -> None:
    clock = FakeClock()
    crypto = await make(local, DEKCache(ttl=60, refresh_ahead=0, clock=clock))
    first = await crypto.encrypt(b"1", context=CTX)
    clock.advance(59)
    assert wrapped_of(await crypto.encrypt(b"2", context=CTX)) == wrapped_of(first)
    clock.advance(2)
    third = await crypto.encrypt(b"3", context=CTX)
    assert wrapped_of(third) != wrapped_of(first)
    assert calls(crypto, "encrypt_dek") == 2
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.expirations["ttl"] == 1

    reader = await make(local, DEKCache(ttl=60, refresh_ahead=0, clock=clock))
    await reader.decrypt(third, context=CTX)
    clock.advance(59)
    await reader.decrypt(third, context=CTX)
    assert calls(reader, "decrypt_dek") == 1
    clock.advance(2)
    await reader.decrypt(third, context=CTX)
    assert calls(reader, "decrypt_dek") == 2
    rstats = reader.stats().cache
    assert rstats is not None
    assert rstats.decrypt.expirations["ttl"] == 1


async def test_lru_bound_evicts_least_recently_used(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache(max_entries=2))
    a = await crypto.encrypt(b"", context={"tenant": "a"})
    b = await crypto.encrypt(b"", context={"tenant": "b"})
    await crypto.encrypt(b"", context={"tenant": "a"})  # a is now the most recent
    await crypto.encrypt(b"", context={"tenant": "c"})  # evicts b
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.evictions == 1
    assert stats.encrypt.entries == 2
    assert wrapped_of(await crypto.encrypt(b"", context={"tenant": "a"})) == wrapped_of(a)
    assert wrapped_of(await crypto.encrypt(b"", context={"tenant": "b"})) != wrapped_of(b)
    assert calls(crypto, "encrypt_dek") == 4


async def test_message_limit_retires_a_dek_for_good(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache(max_messages_per_dek=3))
    blobs = [await crypto.encrypt(b"m", context=CTX) for _ in range(7)]
    groups = [wrapped_of(b) for b in blobs]
    assert groups[0] == groups[1] == groups[2]
    assert groups[3] == groups[4] == groups[5] != groups[0]
    assert groups[6] not in (groups[0], groups[3])
    assert calls(crypto, "encrypt_dek") == 3
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.expirations["messages"] == 2


async def test_byte_limit_retires_a_dek(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache(max_bytes_per_dek=100))
    blobs = [await crypto.encrypt(b"x" * 40, context=CTX) for _ in range(4)]
    groups = [wrapped_of(b) for b in blobs]
    assert groups[0] == groups[1] != groups[2]
    assert groups[2] == groups[3]
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.expirations["bytes"] == 1
    # A message bigger than the whole budget gets a DEK of its own, never cached.
    big = await crypto.encrypt(b"y" * 150, context=CTX)
    assert wrapped_of(big) not in groups
    assert wrapped_of(await crypto.encrypt(b"z", context=CTX)) == groups[3]


async def test_contexts_never_share_a_dek(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache())
    a = await crypto.encrypt(b"", context={"tenant": "a"})
    b = await crypto.encrypt(b"", context={"tenant": "b"})
    none = await crypto.encrypt(b"")
    assert len({wrapped_of(a), wrapped_of(b), wrapped_of(none)}) == 3
    with pytest.raises(DecryptionError):
        await crypto.decrypt(a, context={"tenant": "b"})


async def test_refresh_ahead_fetches_the_successor_in_the_background(
    local: LocalKMSService,
) -> None:
    clock = FakeClock()
    crypto = await make(local, DEKCache(ttl=100, refresh_ahead=10, clock=clock))
    first = wrapped_of(await crypto.encrypt(b"", context=CTX))
    clock.advance(95)  # inside the window: served at once from the current key
    assert wrapped_of(await crypto.encrypt(b"", context=CTX)) == first
    for _ in range(5):
        await asyncio.sleep(0)  # let the refresh task run
    assert calls(crypto, "encrypt_dek") == 2
    clock.advance(2)  # the successor waits until the current key ends
    assert wrapped_of(await crypto.encrypt(b"", context=CTX)) == first
    clock.advance(5)  # t=102: current key expired; the successor takes over, no KMS call
    successor = wrapped_of(await crypto.encrypt(b"", context=CTX))
    assert successor != first
    assert calls(crypto, "encrypt_dek") == 2
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.refreshes == 1
    assert stats.encrypt.misses == 1


async def test_refresh_ahead_on_uses_when_asked(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache(max_messages_per_dek=10, refresh_ahead_uses=0.2))
    for _ in range(8):
        await crypto.encrypt(b"", context=CTX)
    await asyncio.sleep(0.01)
    assert calls(crypto, "encrypt_dek") == 2  # fetched while 2 uses remained
    groups = [wrapped_of(await crypto.encrypt(b"", context=CTX)) for _ in range(3)]
    assert groups[0] == groups[1] != groups[2]  # both remaining uses spent, then the successor
    assert calls(crypto, "encrypt_dek") == 2


async def test_failed_refresh_keeps_the_current_key(gated: GatedKMS) -> None:
    clock = FakeClock()
    crypto = await make(gated, DEKCache(ttl=100, refresh_ahead=10, clock=clock))
    first = wrapped_of(await crypto.encrypt(b"", context=CTX))
    gated.failures.append(KMSUnavailableError("down"))
    clock.advance(95)
    assert wrapped_of(await crypto.encrypt(b"", context=CTX)) == first
    await asyncio.sleep(0.01)
    assert wrapped_of(await crypto.encrypt(b"", context=CTX)) == first
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.refresh_failures == 1
    clock.advance(10)
    assert wrapped_of(await crypto.encrypt(b"", context=CTX)) != first


async def test_retired_keys_are_wiped(local: LocalKMSService) -> None:
    clock = FakeClock()
    cache = DEKCache(ttl=10, refresh_ahead=0, clock=clock)
    crypto = await make(local, cache)
    await crypto.encrypt(b"", context=CTX)
    (entry,) = cache._encrypt.entries.values()
    assert not entry.value.wiped  # type: ignore[attr-defined]
    clock.advance(11)
    await crypto.encrypt(b"", context=CTX)
    await asyncio.sleep(0)
    assert entry.dead
    assert entry.value.wiped  # type: ignore[attr-defined]
    assert not any(entry.value.cipher._stream_key)  # type: ignore[attr-defined]


async def test_close_wipes_everything_and_refuses_use(local: LocalKMSService) -> None:
    cache = DEKCache()
    crypto = await make(local, cache)
    blob = await crypto.encrypt(b"x", context=CTX)
    entries = [*cache._encrypt.entries.values(), *cache._decrypt.entries.values()]
    assert len(entries) == 2
    await crypto.aclose()
    await crypto.aclose()  # idempotent
    assert all(e.value.wiped for e in entries)  # type: ignore[attr-defined]
    with pytest.raises(ClosedError):
        await crypto.decrypt(blob, context=CTX)
    with pytest.raises(ClosedError):
        await crypto.encrypt(b"x", context=CTX)


async def test_close_while_a_key_is_loading(gated: GatedKMS) -> None:
    crypto = await make(gated, DEKCache())
    gated.gate.clear()
    pending = asyncio.ensure_future(crypto.encrypt(b"x", context=CTX))
    await gated.entered.wait()
    await crypto.aclose()
    with pytest.raises(ClosedError):
        await pending


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="2\\*\\*32"):
        DEKCache(max_messages_per_dek=2**32 + 1)
    DEKCache(max_messages_per_dek=2**32)
    for bad in ({"ttl": 0}, {"max_entries": 0}, {"max_bytes_per_dek": 0}, {"refresh_ahead": 400}):
        with pytest.raises(ConfigurationError):
            DEKCache(**bad)  # type: ignore[arg-type]


async def test_one_cache_serves_one_crypto(local: LocalKMSService) -> None:
    cache = DEKCache()
    await make(local, cache)
    with pytest.raises(ConfigurationError):
        await make(local, cache)


async def test_repr_shows_counts_not_keys(local: LocalKMSService) -> None:
    cache = DEKCache()
    crypto = await make(local, cache)
    await crypto.encrypt(b"x", context=CTX)
    text = repr(cache)
    assert "entries=1+1" in text
    (entry,) = cache._encrypt.entries.values()
    assert entry.value._commitment.hex() not in text  # type: ignore[attr-defined]


async def test_expired_keys_nobody_asks_for_are_wiped_on_the_next_insert(
    local: LocalKMSService,
) -> None:
    clock = FakeClock()
    cache = DEKCache(ttl=10, refresh_ahead=0, clock=clock)
    crypto = await make(local, cache)
    await crypto.encrypt(b"", context={"tenant": "gone"})
    stale = [*cache._encrypt.entries.values()]
    clock.advance(11)
    await crypto.encrypt(b"", context={"tenant": "other"})  # a miss: sweeps
    await asyncio.sleep(0)
    assert all(e.dead and e.value.wiped for e in stale)  # type: ignore[attr-defined]
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.expirations["ttl"] == 1
    assert stats.encrypt.entries == 1


async def test_decrypt_side_refreshes_only_reused_keys(local: LocalKMSService) -> None:
    clock = FakeClock()
    writer = await make(local)
    once, hot = await writer.encrypt(b"1"), await writer.encrypt(b"2")
    reader = await make(local, DEKCache(ttl=100, refresh_ahead=10, clock=clock))
    for _ in range(3):
        await reader.decrypt(hot)
    await reader.decrypt(once)
    clock.advance(95)
    await reader.decrypt(hot)  # in the window, and reused: refreshed in the background
    await reader.decrypt(once)  # in the window, read once before: not worth a KMS call
    await asyncio.sleep(0.01)
    stats = reader.stats().cache
    assert stats is not None
    assert stats.decrypt.refreshes == 1
    assert calls(reader, "decrypt_dek") == 3


async def test_decrypt_side_counts_reuse_however_the_reads_interleave(
    local: LocalKMSService,
) -> None:
    # Read in turns, so no read repeats the one before (the fast path's case):
    # each key is still seen to be reused, and so refreshed ahead.
    clock = FakeClock()
    writer = await make(local)
    a = await writer.encrypt(b"a", context={"tenant": "a"})
    b = await writer.encrypt(b"b", context={"tenant": "b"})
    reader = await make(local, DEKCache(ttl=100, refresh_ahead=10, clock=clock))
    for _ in range(3):
        await reader.decrypt(a, context={"tenant": "a"})
        await reader.decrypt(b, context={"tenant": "b"})
    clock.advance(95)
    await reader.decrypt(a, context={"tenant": "a"})
    await reader.decrypt(b, context={"tenant": "b"})
    await asyncio.sleep(0.01)
    stats = reader.stats().cache
    assert stats is not None
    assert stats.decrypt.refreshes == 2
    assert stats.decrypt.hits == 6


# -- the repeat-key fast paths --------------------------------------------------
# A use of the same key as the previous message skips the lookup; these check
# that it keeps every rule of the slow path.


async def test_lru_order_holds_when_the_same_key_repeats(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache(max_entries=2))
    a = await crypto.encrypt(b"", context={"tenant": "a"})
    await crypto.encrypt(b"", context={"tenant": "b"})
    await crypto.encrypt(b"", context={"tenant": "a"})
    await crypto.encrypt(b"", context={"tenant": "a"})  # the repeat: no lookup
    await crypto.encrypt(b"", context={"tenant": "c"})  # must evict b, not a
    assert wrapped_of(await crypto.encrypt(b"", context={"tenant": "a"})) == wrapped_of(a)
    assert calls(crypto, "encrypt_dek") == 3


async def test_repeated_header_with_a_bad_body_is_refused(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache())
    good = await crypto.encrypt(b"payload", context=CTX)
    assert await crypto.decrypt(good, context=CTX) == b"payload"  # the header is now known
    body_at = parse(good).body_at
    flipped = bytearray(good)
    flipped[-1] ^= 1
    for bad in (bytes(flipped), good[: body_at + 27], good[: body_at + 5], good[:body_at]):
        with pytest.raises(DecryptionError):
            await crypto.decrypt(bad, context=CTX)
    with pytest.raises(DecryptionError):
        await crypto.decrypt(good, context={"tenant": "other"})
    with pytest.raises(DecryptionError):
        await crypto.decrypt(good, context=CTX, aad=b"not bound")
    assert await crypto.decrypt(good, context=CTX) == b"payload"


async def test_repeated_key_still_expires_and_counts(local: LocalKMSService) -> None:
    clock = FakeClock()
    crypto = await make(
        local, DEKCache(ttl=10, refresh_ahead=0, max_messages_per_dek=5, clock=clock)
    )
    blobs = [await crypto.encrypt(b"m", context=CTX) for _ in range(6)]
    assert len({wrapped_of(b) for b in blobs}) == 2  # the 6th message needed a new DEK
    for blob in blobs:
        await crypto.decrypt(blob, context=CTX)
    clock.advance(11)
    after = await crypto.encrypt(b"m", context=CTX)
    assert wrapped_of(after) not in {wrapped_of(b) for b in blobs}
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.expirations["messages"] == 1
    assert (stats.encrypt.hits, stats.encrypt.misses) == (4, 3)  # DEK 1 x5, DEK 2 x1, then ttl
    assert stats.decrypt.hits == 6


async def test_repeated_header_of_a_retired_version_is_refused(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache())
    old = await crypto.encrypt(b"old", context=CTX)
    assert await crypto.decrypt(old, context=CTX) == b"old"
    await crypto.rotate_kek(rotation="kms-managed")
    await crypto.retire_kek_version(1)
    with pytest.raises(DecryptionError, match="retired"):
        await crypto.decrypt(old, context=CTX)


# -- the fast path: the key used last, counted on its cache entry ------------------


async def test_the_fast_path_counts_every_use_on_the_cache_entry(local: LocalKMSService) -> None:
    clock = FakeClock()
    cache = DEKCache(max_messages_per_dek=10, refresh_ahead=30, ttl=300, clock=clock)
    crypto = await make(local, cache)
    side = crypto._encrypt_side
    assert side is not None
    for n in range(1, 10):
        await crypto.encrypt(b"12345", context=CTX)
        (entry,) = side.entries.values()
        assert (entry.messages, entry.bytes) == (n, 5 * n)  # no use goes uncounted
    await crypto.encrypt(b"12345", context=CTX)  # the 10th use retires the key, through the cache
    assert not side.entries
    assert cache.stats().encrypt.expirations["messages"] == 1
    await crypto.encrypt(b"x", context=CTX)
    await crypto.encrypt(b"x", context=CTX)
    clock.advance(270)  # the refresh point: this use goes through the cache, which refreshes
    await crypto.encrypt(b"x", context=CTX)
    assert cache.stats().encrypt.refreshes == 1


async def test_the_fast_path_never_passes_a_byte_limit(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache(max_bytes_per_dek=1000, max_messages_per_dek=10**6))
    sizes = [(i * 37) % 300 for i in range(400)]
    blobs = [await crypto.encrypt(bytes(size), context=CTX) for size in sizes]
    per_dek: dict[bytes, int] = {}
    for size, blob in zip(sizes, blobs, strict=True):
        per_dek[wrapped_of(blob)] = per_dek.get(wrapped_of(blob), 0) + size
    assert max(per_dek.values()) <= 1000
    # Each DEK but the last was used until the next message would not fit.
    assert min(list(per_dek.values())[:-1]) > 1000 - 300
    stats = crypto.stats().cache
    assert stats is not None
    assert stats.encrypt.hits + stats.encrypt.misses == len(sizes)
    assert stats.encrypt.misses == len(per_dek) == calls(crypto, "encrypt_dek")
    for size, blob in zip(sizes, blobs, strict=True):
        assert await crypto.decrypt(blob, context=CTX) == bytes(size)


async def test_stats_count_the_uses_the_fast_path_served(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache())
    blobs = []
    for n in range(1, 51):
        blobs.append(await crypto.encrypt(b"m", context=CTX))
        stats = crypto.stats().cache
        assert stats is not None
        assert (stats.encrypt.hits, stats.encrypt.misses) == (n - 1, 1)
    reader = await make(local, DEKCache())
    for n, blob in enumerate(blobs, start=1):
        await reader.decrypt(blob, context=CTX)
        stats = reader.stats().cache
        assert stats is not None
        assert (stats.decrypt.hits, stats.decrypt.misses) == (n - 1, 1)
    assert calls(reader, "decrypt_dek") == 1


async def test_alternating_contexts_keep_exact_limits(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache(max_messages_per_dek=5))
    seen: dict[str, list[bytes]] = {"a": [], "b": []}
    for _ in range(10):
        for tenant in seen:  # the fast path moves from one key to the other each time
            seen[tenant].append(wrapped_of(await crypto.encrypt(b"m", context={"tenant": tenant})))
    for wrapped in seen.values():
        assert [wrapped.count(w) for w in dict.fromkeys(wrapped)] == [5, 5]
    assert set(seen["a"]).isdisjoint(seen["b"])
    assert calls(crypto, "encrypt_dek") == 4


async def test_a_rotation_while_a_key_is_being_wrapped_is_followed_at_once(
    local: LocalKMSService, gated: GatedKMS, tmp_path: Path
) -> None:
    database = f"sqlite:///{tmp_path / 'keys.db'}"
    writer = await Crypto.create(
        kms=gated, kek_alias=ALIAS, database=database, dek_cache=DEKCache()
    )
    admin = await Crypto.create(kms=local, kek_alias=ALIAS, database=database)
    _open.extend((writer, admin))
    gated.gate.clear()
    pending = asyncio.ensure_future(writer.encrypt(b"a", context=CTX))
    await gated.entered.wait()
    await admin.rotate_kek(rotation="kms-managed")
    await writer._keyring.reload()  # what the background check does, here while the KMS waits
    gated.gate.set()
    assert parse(await pending).kek_version == 1  # begun before the rotation
    # The DEK wrapped under version 1 must not become the fast path's key.
    assert parse(await writer.encrypt(b"b", context=CTX)).kek_version == 2


async def test_a_call_in_flight_at_close_leaves_the_fast_path_empty(
    local: LocalKMSService, gated: GatedKMS
) -> None:
    crypto = await make(gated, DEKCache())
    gated.gate.clear()
    waiting = [asyncio.ensure_future(crypto.encrypt(b"a", context=CTX)) for _ in range(2)]
    await gated.entered.wait()
    gated.gate.set()
    closing = asyncio.ensure_future(crypto.aclose())  # in the step the waiters resume
    await asyncio.gather(*waiting, return_exceptions=True)
    await closing
    assert crypto._fast is not None
    assert crypto._fast.sealers() == []


async def test_closing_forgets_the_fast_path(local: LocalKMSService) -> None:
    crypto = await make(local, DEKCache())
    blob = await crypto.encrypt(b"m", context=CTX)
    await crypto.decrypt(blob, context=CTX)
    fast = crypto._fast
    assert fast is not None
    remembered = fast.sealers()
    assert len(remembered) == 2
    await crypto.aclose()
    assert fast.sealers() == []
    assert all(sealer.wiped for sealer in remembered)


async def test_stats_read_from_another_thread_never_go_back(local: LocalKMSService) -> None:
    # An OpenTelemetry reader calls stats() from its own thread while the loop
    # serves messages from the fast path and through the cache in turn.
    crypto = await make(local, DEKCache(max_messages_per_dek=100_000))
    contexts = [{"tenant": "a"}, {"tenant": "b"}]
    done = threading.Event()
    encrypted = 0
    seen: list[tuple[int, int]] = []  # (hits read, encrypts finished once it was read)

    def read() -> None:
        while not done.is_set():
            stats = crypto.stats().cache
            assert stats is not None
            seen.append((stats.encrypt.hits, encrypted))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a half-done update would be seen
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20_000):
            await crypto.encrypt(b"m", context=contexts[(i // 3) % 2])
            encrypted += 1
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(switch)
    hits = [h for h, _ in seen]
    assert len(hits) > 100
    assert all(a <= b for a, b in itertools.pairwise(hits))
    # Never more than the encrypts finished, and the one under way.
    assert all(hits <= finished + 1 for hits, finished in seen)


class PartlyWrapping(LocalKMSService):
    """A LocalKMSService that says its wraps are partial, with a better one ``retry`` s away."""

    retry: float | None = 5.0
    asked = 0

    def partial_wrap(self, key_id: str, wrapped_dek: bytes) -> float | None:
        self.asked += 1
        return self.retry


async def test_a_partial_wrap_is_reused_only_as_long_as_the_provider_says() -> None:
    clock = FakeClock()
    async with PartlyWrapping() as kms:
        await kms.create_key("partial", alias=ALIAS)
        crypto = await make(kms, DEKCache(clock=clock, refresh_ahead=30))

        def wraps() -> int:
            return crypto.stats().kms_calls["encrypt_dek"]

        for _ in range(3):  # the fast path, too, lets the entry end
            await crypto.encrypt(b"x", context=CTX)
        clock.advance(4.9)
        await crypto.encrypt(b"x", context=CTX)
        assert (wraps(), kms.asked) == (1, 1)  # asked once per wrapped key, not per message
        clock.advance(0.1)
        await crypto.encrypt(b"x", context=CTX)
        assert wraps() == 2
        side = crypto.stats().cache
        assert side is not None
        assert side.encrypt.refreshes == 0  # a brief entry is not fetched ahead
        kms.retry = None  # the next wrap is complete: kept for the ttl
        clock.advance(5)
        await crypto.encrypt(b"x", context=CTX)
        clock.advance(250)
        await crypto.encrypt(b"x", context=CTX)
        assert wraps() == 3
        kms.retry = 0.0  # may do better at once: serves only the call that made it
        clock.advance(50)
        for _ in range(3):
            await crypto.encrypt(b"x", context=CTX)
        assert wraps() == 6
