"""KEK versions and rotation on real stores (SQLite) and KMSs (local, moto)."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from encx_async import (
    ClosedError,
    ConfigurationError,
    Crypto,
    DatabaseUnavailableError,
    DecryptionError,
    DEKCache,
    KEKVersion,
    KeyManagementService,
    KeyState,
    KeyStore,
    KeyStoreCorruptError,
    KeyVersionError,
    KeyVersionNotFoundError,
    KMSKeyNotFoundError,
)
from encx_async._envelope import parse
from encx_async._keystore import NewKey
from encx_async.providers.local import LocalKMSService
from tests.conftest import KeyFactory
from tests.support import FakeClock

ALIAS = "alias/rotation-test"
CTX = {"tenant": "acme"}


@pytest.fixture
async def local() -> AsyncIterator[LocalKMSService]:
    async with LocalKMSService() as kms:
        await kms.create_key("rotation tests", alias=ALIAS)
        yield kms


def version_of(blob: bytes) -> int:
    return parse(blob).kek_version


async def test_default_database_of_an_in_memory_kms_is_in_memory(
    local: LocalKMSService, tmp_path: Path
) -> None:
    async with await Crypto.create(kms=local, kek_alias=ALIAS) as crypto:
        assert crypto.database_url == "sqlite:///:memory:"
        assert [v.version for v in crypto.kek_versions()] == [1]
        assert crypto.kek_versions()[0].key_id == await local.get_key_id(ALIAS)
    # conftest points XDG_DATA_HOME at tmp_path / "xdg-data" for every test
    assert not (tmp_path / "xdg-data").exists()


async def test_versions_survive_a_restart(tmp_path: Path) -> None:
    key_file, db = tmp_path / "kms.json", f"sqlite:///{tmp_path / 'keys.db'}"
    async with LocalKMSService(key_file) as kms:
        await kms.create_key("restart", alias=ALIAS)
        async with await Crypto.create(kms=kms, kek_alias=ALIAS, database=db) as crypto:
            old = await crypto.encrypt(b"before", context=CTX)
            await crypto.rotate_kek()
            new = await crypto.encrypt(b"after", context=CTX)
    async with (
        LocalKMSService(key_file) as kms,
        await Crypto.create(kms=kms, kek_alias=ALIAS, database=db) as crypto,
    ):
        assert crypto.kek_version == 2
        assert [(v.version, v.state) for v in crypto.kek_versions()] == [
            (1, "deprecated"),
            (2, "active"),
        ]
        assert await crypto.decrypt(old, context=CTX) == b"before"
        assert await crypto.decrypt(new, context=CTX) == b"after"
        assert (version_of(old), version_of(new)) == (1, 2)


@pytest.mark.parametrize("strategy", ["new-key", "kms-managed"])
async def test_old_data_decrypts_after_rotation_on_moto(
    aws_kms: KeyManagementService, strategy: str
) -> None:
    await aws_kms.create_key("rotation", alias=ALIAS)
    crypto = await Crypto.create(
        kms=aws_kms,
        kek_alias=ALIAS,
        rotation=strategy,  # type: ignore[arg-type]
        dek_cache=DEKCache(),
    )
    blobs = [await crypto.encrypt(b"v1", context=CTX)]
    first_key = crypto.key_id
    for _ in range(2):
        await crypto.rotate_kek()
        blobs.append(await crypto.encrypt(b"v%d" % crypto.kek_version, context=CTX))
    assert [version_of(b) for b in blobs] == [1, 2, 3]
    if strategy == "new-key":
        assert crypto.key_id != first_key
        assert await aws_kms.get_key_id(ALIAS) == crypto.key_id  # the alias moved
        assert len({v.key_id for v in crypto.kek_versions()}) == 3
    else:
        assert {v.key_id for v in crypto.kek_versions()} == {first_key}
    await crypto.aclose()
    # A fresh instance, cold cache: every version still opens.
    async with await Crypto.create(kms=aws_kms, kek_alias=ALIAS) as reader:
        assert [await reader.decrypt(b, context=CTX) for b in blobs] == [b"v1", b"v2", b"v3"]
        calls = dict(reader.stats().kms_calls)
    assert calls["decrypt_dek"] == 3


async def test_rotation_under_load_loses_nothing_and_rewrap_moves_everything(
    local: LocalKMSService,
) -> None:
    crypto = await Crypto.create(
        kms=local, kek_alias=ALIAS, dek_cache=DEKCache(max_messages_per_dek=500)
    )
    rows: list[tuple[int, bytes]] = []
    rotated = [asyncio.Event() for _ in range(6)]
    rotated[0].set()

    async def writer(start: int) -> None:
        for i in range(start, start + 2000):
            rows.append((i, await crypto.encrypt(b"row %d" % i, context=CTX, aad=b"%d" % i)))
            if i % 20 == 0:
                await asyncio.sleep(0)  # let the rotations in
            # Writes run ahead of a rotation by at most 400 rows, so every
            # version gets rows, however slow the database is today.
            await rotated[min(max((len(rows) - 400) // 1600, 0), 5)].wait()

    async def rotator() -> None:
        for k in range(1, 6):
            while len(rows) < k * 1600:  # noqa: ASYNC110 (polling the writers is the point)
                await asyncio.sleep(0)
            await crypto.rotate_kek()
            rotated[k].set()

    await asyncio.gather(*(writer(n * 2000) for n in range(5)), rotator())
    assert len(rows) == 10_000
    assert crypto.kek_version == 6
    seen = {version_of(blob) for _, blob in rows}
    assert len(seen) >= 5, f"rotations did not interleave with the writes: {seen}"
    for i, blob in rows:  # zero undecryptable blobs
        assert await crypto.decrypt(blob, context=CTX, aad=b"%d" % i) == b"row %d" % i

    blobs = [blob for _, blob in rows]
    distinct = {(version_of(b), parse(b).wrapped_dek) for b in blobs if version_of(b) != 6}
    before = crypto.stats().kms_calls.get("re_encrypt_dek", 0)
    progress: list[int] = []
    moved = [m async for m in crypto.rewrap_many(blobs, context=CTX, progress=progress.append)]
    assert {version_of(m) for m in moved} == {6}
    assert progress[-1] == 10_000
    # Blobs sharing a wrapped DEK cost one ReEncrypt between them.
    assert crypto.stats().kms_calls["re_encrypt_dek"] - before == len(distinct)
    for (i, old), new in zip(rows, moved, strict=True):
        assert parse(new).body == parse(old).body  # the payload is not touched
        assert await crypto.decrypt(new, context=CTX, aad=b"%d" % i) == b"row %d" % i
    await crypto.aclose()


async def test_rewrap_keeps_current_blobs_and_needs_the_right_context(
    local: LocalKMSService,
) -> None:
    async with await Crypto.create(kms=local, kek_alias=ALIAS) as crypto:
        blob = await crypto.encrypt(b"x", context=CTX)
        assert await crypto.rewrap(blob, context=CTX) == blob
        await crypto.rotate_kek()
        with pytest.raises(DecryptionError):
            await crypto.rewrap(blob, context={"tenant": "other"})
        moved = await crypto.rewrap(blob, context=CTX)
        assert version_of(moved) == 2
        assert await crypto.decrypt(moved, context=CTX) == b"x"


async def test_retired_versions_are_refused(local: LocalKMSService) -> None:
    async with await Crypto.create(kms=local, kek_alias=ALIAS) as crypto:
        old = await crypto.encrypt(b"old", context=CTX)
        with pytest.raises(ConfigurationError, match="current"):
            await crypto.retire_kek_version(1)
        await crypto.rotate_kek()
        moved = await crypto.rewrap(old, context=CTX)
        retired = await crypto.retire_kek_version(1)
        assert retired.state == "retired"
        assert await crypto.retire_kek_version(1) == retired  # again: nothing to do
        with pytest.raises(KeyVersionError, match="retired"):
            await crypto.decrypt(old, context=CTX)
        assert await crypto.decrypt(moved, context=CTX) == b"old"
        with pytest.raises(KeyVersionNotFoundError):
            await crypto.retire_kek_version(9)


async def test_unknown_version_is_a_key_version_not_found_error(local: LocalKMSService) -> None:
    async with await Crypto.create(kms=local, kek_alias=ALIAS) as crypto:
        blob = bytearray(await crypto.encrypt(b"x"))
        blob[4:8] = (99).to_bytes(4, "big")
        with pytest.raises(KeyVersionNotFoundError, match="version 99") as info:
            await crypto.decrypt(bytes(blob))
        assert isinstance(info.value, DecryptionError)


async def test_an_instance_sees_another_instances_rotation_within_the_interval(
    local: LocalKMSService, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    clock = FakeClock()  # the DEK cache's clock times the version re-reads too
    a = await Crypto.create(kms=local, kek_alias=ALIAS, database=db)
    b = await Crypto.create(
        kms=local, kek_alias=ALIAS, database=db, dek_cache=DEKCache(clock=clock)
    )
    await a.rotate_kek()
    for _ in range(3):
        await b.encrypt(b"tick", context=CTX)
    await asyncio.sleep(0.1)  # a re-read, had one started, would be done by now
    assert b.kek_version == 1  # within the interval, nothing is read
    clock.advance(30.0)  # the default version_check_interval
    await b.encrypt(b"tick", context=CTX)  # the first message after it starts a re-read
    for _ in range(200):
        if b.kek_version == 2:
            break
        await asyncio.sleep(0.005)
    assert b.kek_version == 2
    assert version_of(await b.encrypt(b"now", context=CTX)) == 2
    # And b reads what a writes under a version b has never seen before.
    await a.rotate_kek()
    assert await b.decrypt(await a.encrypt(b"v3")) == b"v3"
    await a.aclose()
    await b.aclose()


def test_the_version_check_survives_its_event_loop(tmp_path: Path) -> None:
    # asyncio.run per call, as a synchronous program does: the check scheduled
    # under one loop must not be lost when that loop ends. (The local KMS and
    # SQLite are not tied to a loop; aiobotocore and asyncpg are.)
    db = f"sqlite:///{tmp_path / 'shared.db'}"

    async def start() -> tuple[LocalKMSService, Crypto, Crypto]:
        kms = LocalKMSService()
        await kms.create_key("rotation tests", alias=ALIAS)
        worker = await Crypto.create(
            kms=kms, kek_alias=ALIAS, database=db, dek_cache=DEKCache(), version_check_interval=0.05
        )
        admin = await Crypto.create(kms=kms, kek_alias=ALIAS, database=db)
        assert version_of(await worker.encrypt(b"m", context=CTX)) == 1
        assert version_of(await worker.encrypt(b"m", context=CTX)) == 1  # the fast path now
        return kms, worker, admin

    kms, worker, admin = asyncio.run(start())
    asyncio.run(admin.rotate_kek(rotation="kms-managed"))

    async def later() -> list[int]:
        versions = []
        for _ in range(20):
            versions.append(version_of(await worker.encrypt(b"m", context=CTX)))
            if versions[-1] == 2:
                break
            await asyncio.sleep(0.05)
        await worker.aclose()
        await admin.aclose()
        await kms.aclose()
        return versions

    assert asyncio.run(later())[-1] == 2


async def test_missing_alias_is_an_error_unless_asked_to_create_it(tmp_path: Path) -> None:
    async with LocalKMSService() as kms:
        with pytest.raises(KMSKeyNotFoundError):
            await Crypto.create(kms=kms, kek_alias="alias/new-app")
        async with await Crypto.create(
            kms=kms, kek_alias="alias/new-app", create_key_if_missing=True
        ) as crypto:
            assert await kms.get_key_id("alias/new-app") == crypto.key_id
            assert crypto.stats().kms_calls["create_key"] == 1


async def test_concurrent_starts_make_one_version_1(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'race.db'}"
    async with LocalKMSService() as kms:
        cryptos = await asyncio.gather(
            *(
                Crypto.create(
                    kms=kms, kek_alias="alias/raced", create_key_if_missing=True, database=db
                )
                for _ in range(5)
            )
        )
        assert len({c.key_id for c in cryptos}) == 1
        assert [v.version for v in cryptos[0].kek_versions()] == [1]
        assert sum(c.stats().kms_calls.get("create_key", 0) for c in cryptos) == 1
        for c in cryptos:
            await c.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user@host/db",
        "sqlite:/relative-without-slashes.db",
        "sqlite:///",
        "postgresql://encx:s3cret@127.0.0.1:1/test",
    ],
)
async def test_bad_database_urls_are_typed_errors(local: LocalKMSService, url: str) -> None:
    with pytest.raises(DatabaseUnavailableError) as info:
        await Crypto.create(kms=local, kek_alias=ALIAS, database=url)
    assert "s3cret" not in str(info.value)


async def test_an_unusable_sqlite_file_is_a_typed_error(
    local: LocalKMSService, tmp_path: Path
) -> None:
    garbage = tmp_path / "not-a-db.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseUnavailableError, match="not-a-db"):
        await Crypto.create(kms=local, kek_alias=ALIAS, database=f"sqlite:///{garbage}")
    assert garbage.read_bytes() == b"this is not a database" * 100  # left as it was
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(DatabaseUnavailableError):
        await Crypto.create(kms=local, kek_alias=ALIAS, database=f"sqlite:///{blocked}/keys.db")


async def test_a_corrupt_version_row_is_a_typed_error_and_loses_nothing(
    local: LocalKMSService, tmp_path: Path
) -> None:
    path = tmp_path / "keys.db"
    db = f"sqlite:///{path}"
    async with await Crypto.create(kms=local, kek_alias=ALIAS, database=db) as crypto:
        blob = await crypto.encrypt(b"keep me", context=CTX)
        await crypto.rotate_kek()
        newer = await crypto.encrypt(b"and me", context=CTX)

    def corrupt(state: str) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA ignore_check_constraints = ON")
            conn.execute(
                "UPDATE encx_kek_versions SET state = ? WHERE alias = ? AND version = 1",
                (state, ALIAS),
            )

    corrupt("bogus")
    with pytest.raises(KeyStoreCorruptError, match="corrupt") as info:
        await Crypto.create(kms=local, kek_alias=ALIAS, database=db)
    assert not isinstance(info.value, DecryptionError)  # a store problem, not a ciphertext's
    assert "version 1" in str(info.value)
    corrupt("deprecated")  # repaired: everything is still there
    async with await Crypto.create(kms=local, kek_alias=ALIAS, database=db) as crypto:
        assert await crypto.decrypt(blob, context=CTX) == b"keep me"
        assert await crypto.decrypt(newer, context=CTX) == b"and me"


async def test_a_database_for_another_kms_says_so(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'keys.db'}"
    async with LocalKMSService() as first:
        await first.create_key("x", alias=ALIAS)
        await (await Crypto.create(kms=first, kek_alias=ALIAS, database=db)).aclose()
    async with LocalKMSService() as second:
        await second.create_key("x", alias=ALIAS)
        with pytest.raises(KMSKeyNotFoundError, match="does not have"):
            await Crypto.create(kms=second, kek_alias=ALIAS, database=db)


async def test_a_passed_connection_stays_open(local: LocalKMSService, tmp_path: Path) -> None:
    import aiosqlite

    async with aiosqlite.connect(tmp_path / "mine.db", isolation_level=None) as conn:
        async with await Crypto.create(kms=local, kek_alias=ALIAS, database=conn) as crypto:
            await crypto.rotate_kek()
        rows = await conn.execute_fetchall("SELECT version FROM encx_kek_versions")
        assert sorted(r[0] for r in rows) == [1, 2]


@pytest.mark.slow
async def test_a_failed_rewrap_many_leaves_no_error_unread(
    aws_kms: KeyManagementService, make_key: KeyFactory
) -> None:
    """ReEncrypt calls still in flight when another item fails end in errors nobody awaits.

    They must not reach the event loop's "Task exception was never retrieved"
    log (the CLI's tests treat that as a leak).
    """
    await make_key(aws_kms, ALIAS)
    unread: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, details: unread.append(details))
    try:
        async with await Crypto.create(kms=aws_kms, kek_alias=ALIAS) as crypto:
            blobs = []
            for i in range(12):  # distinct DEKs: one ReEncrypt each
                async with await Crypto.create(kms=aws_kms, kek_alias=ALIAS) as writer:
                    blobs.append(await writer.encrypt(b"%d" % i, context=CTX))
            await crypto.rotate_kek()
            wrong = crypto.rewrap_many(blobs, context={"tenant": "other"}, concurrency=6)
            with pytest.raises(DecryptionError):
                await anext(wrong)
            await asyncio.sleep(0.2)  # let every call that was in flight end
        gc.collect()
        assert unread == []
    finally:
        loop.set_exception_handler(None)


async def test_rewrap_many_refuses_bad_arguments_at_the_call(local: LocalKMSService) -> None:
    crypto = Crypto(kms=local, kek_alias=ALIAS, database="sqlite:///:memory:")
    with pytest.raises(ClosedError, match="not open"):
        crypto.rewrap_many([])  # not iterated: the check does not wait for the first item
    async with crypto:
        with pytest.raises(ConfigurationError, match="concurrency"):
            crypto.rewrap_many([], concurrency=0)
        blob = await crypto.encrypt(b"m")
        assert [m async for m in crypto.rewrap_many([blob])] == [blob]  # current already


async def test_strategy_is_the_deprecated_name_of_rotation(local: LocalKMSService) -> None:
    async with await Crypto.create(
        kms=local, kek_alias=ALIAS, database="sqlite:///:memory:"
    ) as crypto:
        with pytest.warns(DeprecationWarning, match=r"strategy=\.\.\.\) is deprecated"):
            rotated = await crypto.rotate_kek(strategy="kms-managed")
        with (
            pytest.warns(DeprecationWarning, match="strategy="),
            pytest.raises(ConfigurationError, match="both rotation= and strategy="),
        ):
            await crypto.rotate_kek(rotation="new-key", strategy="kms-managed")
        assert rotated.key_id == (await crypto.rotate_kek(rotation="kms-managed")).key_id
        with pytest.raises(ConfigurationError, match="rotation must be one of"):
            await crypto.rotate_kek(rotation="sideways")  # type: ignore[arg-type]


class DictKeyStore:
    """A KeyStore of one's own: versions in a dict, one lock for writers."""

    url = "memory (a test's dict)"

    def __init__(self) -> None:
        self.rows: dict[str, list[KEKVersion]] = {}
        self.lock = asyncio.Lock()
        self.opened = self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def aclose(self) -> None:
        self.closed += 1

    async def versions(self, alias: str) -> list[KEKVersion]:
        return list(self.rows.get(alias, []))

    async def _add(self, alias: str, key_id: str) -> KEKVersion:
        now = datetime.now(UTC)
        rows = self.rows.setdefault(alias, [])
        rows[:] = [replace(v, state="deprecated") if v.state == "active" else v for v in rows]
        version = KEKVersion(alias, len(rows) + 1, key_id, "active", now, now)
        rows.append(version)
        return version

    async def initial_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        async with self.lock:
            if self.rows.get(alias):
                return self.rows[alias][-1]
            return await self._add(alias, await new_key(None))

    async def next_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        async with self.lock:
            return await self._add(alias, await new_key(self.rows[alias][-1]))

    async def set_state(self, alias: str, version: int, state: KeyState) -> KEKVersion:
        async with self.lock:
            rows = self.rows[alias]
            found = rows[version - 1]
            if not (found.state == "active" and state == "retired"):
                rows[version - 1] = found = replace(found, state=state)
            return found


async def test_a_key_store_of_ones_own_is_a_database(local: LocalKMSService) -> None:
    store = DictKeyStore()
    assert isinstance(store, KeyStore)
    async with Crypto(kms=local, kek_alias=ALIAS, database=store) as crypto:
        assert crypto.database_url == store.url
        old = await crypto.encrypt(b"old", context=CTX)
        await crypto.rotate_kek()
        new = await crypto.encrypt(b"new", context=CTX)
        assert [version_of(old), version_of(new)] == [1, 2]
        assert await crypto.decrypt(old, context=CTX) == b"old"
        await crypto.retire_kek_version(1)
        with pytest.raises(KeyVersionError, match="retired"):
            await crypto.decrypt(old, context=CTX)
    assert [v.state for v in store.rows[ALIAS]] == ["retired", "active"]
    assert (store.opened, store.closed) == (1, 1)
