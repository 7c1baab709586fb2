"""The KEK version is bound in the KMS encryption context (kms-managed rotation)."""

from __future__ import annotations

import asyncio
import sqlite3
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import pytest_asyncio

from encx_async import ConfigurationError, Crypto, DecryptionError, KeyManagementService
from encx_async._context import VERSION_KEY
from encx_async._envelope import parse
from encx_async._keystore import KEKVersion, NewKey, open_keystore
from encx_async.providers.local import LocalKMSService

ALIAS = "alias/binding-test"
CTX = {"tenant": "acme"}


def relabel(blob: bytes, version: int) -> bytes:
    """What an attacker with write access to rows can do: edit the header's version."""
    return blob[:4] + struct.pack(">I", version) + blob[8:]


async def kms_managed(kms: KeyManagementService) -> Crypto:
    await kms.create_key("binding", alias=ALIAS)
    return await Crypto.create(
        kms=kms, kek_alias=ALIAS, rotation="kms-managed", database="sqlite:///:memory:"
    )


async def retire_under(crypto: Crypto, rotations: int) -> bytes:
    """An envelope of version 1, which is then retired after ``rotations`` rotations
    of the one KMS key."""
    old = await crypto.encrypt(b"retired data", context=CTX)
    for _ in range(rotations):
        await crypto.rotate_kek()
    await crypto.retire_kek_version(1)
    assert len({v.key_id for v in crypto.kek_versions()}) == 1
    return old


async def test_a_relabelled_retired_envelope_does_not_decrypt(
    kms: KeyManagementService,
) -> None:
    async with await kms_managed(kms) as crypto:
        old = await retire_under(crypto, 1)
        with pytest.raises(DecryptionError) as caught:
            await crypto.decrypt(relabel(old, 2), context=CTX)
        assert str(caught.value) == DecryptionError.MESSAGE


async def test_reserved_context_keys_are_refused(kms: KeyManagementService) -> None:
    await kms.create_key("binding", alias=ALIAS)
    async with await Crypto.create(
        kms=kms, kek_alias=ALIAS, database="sqlite:///:memory:"
    ) as crypto:
        with pytest.raises(ConfigurationError):
            await crypto.encrypt(b"x", context={"encx:kek-version": "1"})


# -- stores from before the binding (schema 1) -----------------------------------

# The tables as encx-async wrote them at schema version 1, before version_bound.
SCHEMA_1 = [
    """CREATE TABLE encx_schema (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL
    )""",
    """CREATE TABLE encx_kek_versions (
        alias TEXT NOT NULL,
        version INTEGER NOT NULL CHECK (version > 0),
        key_id TEXT NOT NULL CHECK (key_id <> ''),
        state TEXT NOT NULL CHECK (state IN ('active', 'deprecated', 'retired')),
        created_at {timestamp} NOT NULL,
        updated_at {timestamp} NOT NULL,
        PRIMARY KEY (alias, version)
    )""",
    "INSERT INTO encx_schema (id, version) VALUES (1, 1)",
]


def schema_1_sqlite(path: Path, key_id: str) -> str:
    """A key store file as a schema-1 encx-async left it: version 1 of ALIAS, active."""
    stamp = datetime.now(UTC).isoformat()
    with closing(sqlite3.connect(path)) as db, db:
        for statement in SCHEMA_1:
            db.execute(statement.format(timestamp="TEXT"))
        db.execute(
            "INSERT INTO encx_kek_versions VALUES (?, 1, ?, 'active', ?, ?)",
            (ALIAS, key_id, stamp, stamp),
        )
    return f"sqlite:///{path}"


def sqlite_schema(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """The schema version of a SQLite store, and its (version, version_bound) rows."""
    with closing(sqlite3.connect(path)) as db:
        (found,) = db.execute("SELECT version FROM encx_schema").fetchone()
        rows = db.execute(
            "SELECT version, version_bound FROM encx_kek_versions ORDER BY version"
        ).fetchall()
    return found, rows


def with_version(context: dict[str, str], version: int) -> dict[str, str]:
    return {**context, VERSION_KEY: str(version)}


async def test_a_schema_1_store_keeps_its_envelopes_and_rewraps_them_bound(
    local_kms: LocalKMSService, tmp_path: Path
) -> None:
    key_id = await local_kms.create_key("legacy", alias=ALIAS)
    database = schema_1_sqlite(tmp_path / "keys.db", key_id)
    async with await Crypto.create(
        kms=local_kms, kek_alias=ALIAS, rotation="kms-managed", database=database
    ) as crypto:
        assert sqlite_schema(tmp_path / "keys.db") == (2, [(1, 0)])
        assert [v.version_bound for v in crypto.kek_versions()] == [False]
        # Version 1 wraps as a schema-1 encx-async did: the caller's context only.
        legacy = await crypto.encrypt(b"legacy data", context=CTX)
    wrapped = parse(legacy).wrapped_dek
    await local_kms.decrypt_dek(key_id, wrapped, context=CTX)
    with pytest.raises(DecryptionError):
        await local_kms.decrypt_dek(key_id, wrapped, context=with_version(CTX, 1))

    async with await Crypto.create(
        kms=local_kms, kek_alias=ALIAS, rotation="kms-managed", database=database
    ) as crypto:
        assert await crypto.decrypt(legacy, context=CTX) == b"legacy data"
        created = await crypto.rotate_kek()
        assert (created.version, created.key_id, created.version_bound) == (2, key_id, True)
        moved = await crypto.rewrap(legacy, context=CTX)
        assert parse(moved).kek_version == 2
        assert await crypto.decrypt(moved, context=CTX) == b"legacy data"
        # The moved DEK is bound to version 2: it unwraps only with the entry.
        await local_kms.decrypt_dek(key_id, parse(moved).wrapped_dek, context=with_version(CTX, 2))
        with pytest.raises(DecryptionError):
            await local_kms.decrypt_dek(key_id, parse(moved).wrapped_dek, context=CTX)
        # Relabelled to the unbound version 1, or the legacy one up to 2: refused.
        for forged in (relabel(moved, 1), relabel(legacy, 2)):
            with pytest.raises(DecryptionError):
                await crypto.decrypt(forged, context=CTX)
    assert sqlite_schema(tmp_path / "keys.db") == (2, [(1, 0), (2, 1)])


async def test_two_stores_migrate_one_schema_1_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    database = schema_1_sqlite(path, "key-of-version-1")
    stores = [open_keystore(database), open_keystore(database)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        for store in stores:
            [version] = await store.versions(ALIAS)
            assert (version.version, version.key_id, version.version_bound) == (
                1,
                "key-of-version-1",
                False,
            )
    finally:
        for store in stores:
            await store.aclose()
    assert sqlite_schema(path) == (2, [(1, 0)])


@pytest_asyncio.fixture(loop_scope="function")
async def private_postgres(postgres_url: str) -> AsyncIterator[str]:
    """A URL whose tables live in a schema of their own, dropped afterwards."""
    import asyncpg

    name = f"encx_migration_{uuid.uuid4().hex}"
    parts = urlsplit(postgres_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    url = urlunsplit(parts._replace(query=urlencode([*query, ("search_path", name)])))
    admin = await asyncpg.connect(postgres_url, timeout=5)
    try:
        await admin.execute(f"CREATE SCHEMA {name}")
        yield url
    finally:
        await admin.execute(f"DROP SCHEMA {name} CASCADE")
        await admin.close()


async def test_postgres_stores_migrate_schema_1_tables_at_once(private_postgres: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(private_postgres, timeout=5)
    try:
        for statement in SCHEMA_1:
            await connection.execute(statement.format(timestamp="TIMESTAMPTZ"))
        await connection.execute(
            "INSERT INTO encx_kek_versions "
            "VALUES ($1, 1, 'key-of-version-1', 'active', now(), now())",
            ALIAS,
        )
        stores = [open_keystore(private_postgres) for _ in range(3)]
        try:
            await asyncio.gather(*(store.open() for store in stores))
            for store in stores:
                [version] = await store.versions(ALIAS)
                assert (version.version, version.version_bound) == (1, False)
            created = await stores[0].next_version(ALIAS, _key("key-of-version-2"))
            assert (created.version, created.version_bound) == (2, True)
            assert [v.version_bound for v in await stores[1].versions(ALIAS)] == [False, True]
        finally:
            for store in stores:
                await store.aclose()
        assert await connection.fetchval("SELECT version FROM encx_schema") == 2
        # The tables of this test only: the shared ones are untouched.
        assert (
            await connection.fetchval("SELECT current_schema()")
            == private_postgres.rsplit("=", 1)[1]
        )
    finally:
        await connection.close()


def _key(key_id: str) -> NewKey:
    async def new_key(current: KEKVersion | None) -> str:
        return key_id

    return new_key


# -- rewrap -------------------------------------------------------------------------


async def test_rewrap_does_not_launder_a_relabelled_retired_envelope(
    kms: KeyManagementService,
) -> None:
    async with await kms_managed(kms) as crypto:
        retired = await retire_under(crypto, 2)
        calls = crypto.stats().kms_calls.get("re_encrypt_dek", 0)
        # Posing as the deprecated version 2, the DEK would move to version 3.
        with pytest.raises(DecryptionError):
            await crypto.rewrap(relabel(retired, 2), context=CTX)
        assert crypto.stats().kms_calls["re_encrypt_dek"] == calls + 1  # the KMS said no
        # Posing as the current version it is not moved, and still does not open.
        untouched = await crypto.rewrap(relabel(retired, 3), context=CTX)
        assert untouched == relabel(retired, 3)
        with pytest.raises(DecryptionError):
            await crypto.decrypt(untouched, context=CTX)
