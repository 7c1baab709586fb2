"""KEK versions in PostgreSQL (asyncpg): one database for a fleet of instances.

Writers take a transaction-scoped advisory lock per alias, so concurrent
rotations from any number of processes queue up and number their versions
without gaps. Each new version is announced with ``NOTIFY encx_kek_versions``,
which instances that listen use to pick it up at once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import asyncpg

from encx_async._exceptions import DatabaseUnavailableError, KeyVersionNotFoundError

from . import (
    COLUMNS,
    SCHEMA_VERSION,
    KEKVersion,
    KeyState,
    NewKey,
    migrations,
    now,
    redact_url,
    row_to_version,
    schema,
)

__all__ = ["CHANNEL", "PostgresKeyStore"]

CHANNEL = "encx_kek_versions"
_SCHEMA_LOCK = 0x656E6378  # "encx": serialises schema creation across instances
_SCHEMA = schema("TIMESTAMPTZ")
_CONNECT_TIMEOUT = 10.0
# What asyncpg raises when the server is away or the URL leads nowhere.
_UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _alias_lock(alias: str) -> int:
    digest = hashlib.sha256(b"encx-async kek " + alias.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresKeyStore:
    def __init__(self, *, dsn: str | None = None, pool: asyncpg.Pool | None = None) -> None:
        self._dsn = dsn
        self._pool = pool
        self._owns_pool = pool is None
        self._listener: Any = None  # a connection of its own, for LISTEN
        self.url = redact_url(dsn) if dsn is not None else "postgresql (given pool)"

    def _fail(self, action: str, exc: BaseException) -> DatabaseUnavailableError:
        # asyncpg's messages name hosts and roles, never passwords; keep them.
        return DatabaseUnavailableError(f"cannot {action} {self.url}: {exc}")

    async def open(self) -> None:
        try:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=1, max_size=4, timeout=_CONNECT_TIMEOUT
                )
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                # Create only what is missing: a role that may use the tables need
                # not be allowed to create any.
                missing = await conn.fetchval(
                    "SELECT to_regclass('encx_schema') IS NULL "
                    "OR to_regclass('encx_kek_versions') IS NULL"
                )
                if missing:
                    for statement in _SCHEMA:
                        await conn.execute(statement)
                found = await conn.fetchval("SELECT version FROM encx_schema WHERE id = 1")
                if found is None:
                    await conn.execute(
                        "INSERT INTO encx_schema (id, version) VALUES (1, $1)", SCHEMA_VERSION
                    )
                elif found > SCHEMA_VERSION:
                    raise DatabaseUnavailableError(
                        f"{self.url} has schema version {found}; this encx-async knows up "
                        f"to {SCHEMA_VERSION}: upgrade encx-async"
                    )
                elif found < SCHEMA_VERSION:
                    # Under the schema lock, in the transaction that read the old
                    # number: of many instances opening at once, one migrates.
                    for statement in migrations(found):
                        await conn.execute(statement)
                    await conn.execute(
                        "UPDATE encx_schema SET version = $1 WHERE id = 1", SCHEMA_VERSION
                    )
        except DatabaseUnavailableError:
            await self.aclose()
            raise
        except (*_UNAVAILABLE, ValueError) as exc:  # ValueError: a malformed DSN
            await self.aclose()
            raise self._fail("open", exc) from exc

    async def aclose(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        pool, self._pool = self._pool, None
        if pool is not None and self._owns_pool:
            await pool.close()

    def _live_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise DatabaseUnavailableError(f"{self.url} is not open")
        return self._pool

    async def _fetch(self, conn: Any, alias: str) -> list[KEKVersion]:
        rows = await conn.fetch(
            f"SELECT {COLUMNS} FROM encx_kek_versions WHERE alias = $1 ORDER BY version", alias
        )
        return [row_to_version(self.url, row) for row in rows]

    async def versions(self, alias: str) -> list[KEKVersion]:
        try:
            async with self._live_pool().acquire() as conn:
                return await self._fetch(conn, alias)
        except _UNAVAILABLE as exc:
            raise self._fail("read", exc) from exc

    async def initial_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        existing = await self.versions(alias)
        if existing:
            return existing[-1]
        return await self._locked_insert(alias, new_key, only_if_empty=True)

    async def next_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        return await self._locked_insert(alias, new_key, only_if_empty=False)

    async def _locked_insert(
        self, alias: str, new_key: NewKey, *, only_if_empty: bool
    ) -> KEKVersion:
        try:
            async with self._live_pool().acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _alias_lock(alias))
                existing = await self._fetch(conn, alias)
                if existing and only_if_empty:  # another instance got here first
                    return existing[-1]
                current = existing[-1] if existing else None
                key_id = await new_key(current)
                stamp = now()
                await conn.execute(
                    "UPDATE encx_kek_versions SET state = 'deprecated', updated_at = $2 "
                    "WHERE alias = $1 AND state = 'active'",
                    alias,
                    stamp,
                )
                version = current.version + 1 if current else 1
                row = (alias, version, key_id, "active", stamp, stamp, 1)
                await conn.execute(
                    f"INSERT INTO encx_kek_versions ({COLUMNS}) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    *row,
                )
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, alias)
                return row_to_version(self.url, row)
        except _UNAVAILABLE as exc:
            raise self._fail("write", exc) from exc

    async def set_state(self, alias: str, version: int, state: KeyState) -> KEKVersion:
        try:
            async with self._live_pool().acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _alias_lock(alias))
                # Never retire the active version: another instance may not know
                # it has rotated, but the database does.
                await conn.execute(
                    "UPDATE encx_kek_versions SET state = $3, updated_at = $4 "
                    "WHERE alias = $1 AND version = $2 "
                    "AND NOT (state = 'active' AND $3 = 'retired')",
                    alias,
                    version,
                    state,
                    now(),
                )
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, alias)
                for found in await self._fetch(conn, alias):
                    if found.version == version:
                        return found
        except _UNAVAILABLE as exc:
            raise self._fail("write", exc) from exc
        raise KeyVersionNotFoundError(f"alias {alias!r} has no KEK version {version} in {self.url}")

    async def listen(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(alias)`` whenever any instance changes an alias's versions.

        Needs a connection of its own for as long as the store is open, so it is
        done only when the store made its own pool from a DSN; with a pool that
        was passed in, instances converge by polling alone.
        """
        if self._listener is not None or self._dsn is None:
            return

        def on_notify(connection: object, pid: int, channel: str, payload: str) -> None:
            callback(payload)

        try:
            self._listener = await asyncpg.connect(self._dsn, timeout=_CONNECT_TIMEOUT)
            await self._listener.add_listener(CHANNEL, on_notify)
        except _UNAVAILABLE:
            return  # listening is an optimisation: polling still converges
