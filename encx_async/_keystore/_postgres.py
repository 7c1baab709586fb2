"""KEK versions in PostgreSQL (asyncpg): one database for a fleet of instances.

Writers take a transaction-scoped advisory lock per alias, so concurrent
rotations from any number of processes queue up and number their versions
without gaps. Each new version is announced with ``NOTIFY encx_kek_versions``,
which instances that listen use to pick it up at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from encx_async._exceptions import DatabaseUnavailableError, KeyVersionNotFoundError

from . import (
    COLUMNS,
    DEFAULT_STORE_TIMEOUT,
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

__all__ = ["CHANNEL", "LISTENER_NAME", "PostgresKeyStore"]

logger = logging.getLogger("encx_async.keys")

CHANNEL = "encx_kek_versions"
_SCHEMA_LOCK = 0x656E6378  # "encx": serialises schema creation across instances
_SCHEMA = schema("TIMESTAMPTZ")
#: What the listener connection calls itself in pg_stat_activity.
LISTENER_NAME = "encx-async listener"
# What asyncpg raises when the server is away or the URL leads nowhere.
_UNAVAILABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# The listener's reconnection delays: doubling from the first to the last.
_RECONNECT_FIRST, _RECONNECT_MAX = 0.1, 10.0

_T = TypeVar("_T")


def _alias_lock(alias: str) -> int:
    digest = hashlib.sha256(b"encx-async kek " + alias.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _cause(exc: BaseException) -> str:
    # Some asyncpg errors (a connection lost mid-query) have no message at all.
    return str(exc) or type(exc).__name__


class PostgresKeyStore:
    """Every step (connect, acquire, lock wait, statement, release) has ``timeout``
    seconds; a step that runs out raises DatabaseUnavailableError. A connection
    that was in use when its task failed or was cancelled is terminated rather
    than released: a graceful release would send ROLLBACK and wait for a server
    that may not answer, and the server rolls the transaction back when the
    connection drops anyway."""

    def __init__(
        self,
        *,
        dsn: str | None = None,
        pool: asyncpg.Pool | None = None,
        timeout: float = DEFAULT_STORE_TIMEOUT,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self._owns_pool = pool is None
        self._timeout = timeout
        self._listener: Any = None  # a connection of its own, for LISTEN
        self._listen_callback: Callable[[str | None], None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False
        self.url = redact_url(dsn) if dsn is not None else "postgresql (given pool)"

    def _fail(self, action: str, exc: BaseException) -> DatabaseUnavailableError:
        # asyncpg's messages name hosts and roles, never passwords; keep them.
        return DatabaseUnavailableError(f"cannot {action} {self.url}: {_cause(exc)}")

    async def _bounded(self, what: str, step: Awaitable[_T]) -> _T:
        """``step`` within the store's timeout; running out is DatabaseUnavailableError."""
        try:
            async with asyncio.timeout(self._timeout):
                return await step
        except TimeoutError:
            raise DatabaseUnavailableError(
                f"timed out after {self._timeout:g} s waiting for {self.url} ({what})"
            ) from None

    @asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[Any]:
        pool = self._live_pool()
        conn = await self._bounded(f"{what}: a pool connection", pool.acquire())
        try:
            yield conn
        except BaseException:
            conn.terminate()
            await pool.release(conn)  # at once: the connection is closed
            raise
        try:
            # asyncpg terminates the connection itself if resetting it takes longer.
            await asyncio.wait_for(pool.release(conn, timeout=self._timeout), self._timeout)
        except (*_UNAVAILABLE, TimeoutError):
            conn.terminate()  # the work is done; only the connection is lost

    @asynccontextmanager
    async def _transaction(self, what: str, alias: str) -> AsyncIterator[Any]:
        """A connection in a transaction holding ``alias``'s advisory lock.

        Leaving it by an exception terminates the connection (see the class), so
        nothing here waits on a ROLLBACK; leaving it normally commits.
        """
        async with self._connection(what) as conn:
            transaction = conn.transaction()
            await self._bounded(what, transaction.start())
            await self._bounded(
                f"{what}: the lock of {alias!r}",
                conn.execute("SELECT pg_advisory_xact_lock($1)", _alias_lock(alias)),
            )
            yield conn
            await self._bounded(f"{what}: commit", transaction.commit())

    async def open(self) -> None:
        try:
            if self._pool is None:
                self._pool = await self._bounded(
                    "connect",
                    asyncpg.create_pool(self._dsn, min_size=1, max_size=4, timeout=self._timeout),
                )
            async with self._connection("open") as conn, conn.transaction():
                await self._bounded(
                    "open: the schema lock",
                    conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK),
                )
                # Create only what is missing: a role that may use the tables need
                # not be allowed to create any.
                missing = await self._bounded(
                    "open",
                    conn.fetchval(
                        "SELECT to_regclass('encx_schema') IS NULL "
                        "OR to_regclass('encx_kek_versions') IS NULL"
                    ),
                )
                if missing:
                    for statement in _SCHEMA:
                        await self._bounded("open", conn.execute(statement))
                found = await self._bounded(
                    "open", conn.fetchval("SELECT version FROM encx_schema WHERE id = 1")
                )
                if found is None:
                    await self._bounded(
                        "open",
                        conn.execute(
                            "INSERT INTO encx_schema (id, version) VALUES (1, $1)", SCHEMA_VERSION
                        ),
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
                        await self._bounded("open: migrate", conn.execute(statement))
                    await self._bounded(
                        "open: migrate",
                        conn.execute(
                            "UPDATE encx_schema SET version = $1 WHERE id = 1", SCHEMA_VERSION
                        ),
                    )
        except DatabaseUnavailableError:
            await self.aclose()
            raise
        except (*_UNAVAILABLE, ValueError) as exc:  # ValueError: a malformed DSN
            await self.aclose()
            raise self._fail("open", exc) from exc

    async def aclose(self) -> None:
        self._closed = True
        reconnecting, self._reconnecting = self._reconnecting, None
        if reconnecting is not None:
            reconnecting.cancel()
            await asyncio.gather(reconnecting, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            await _close(listener, self._timeout)
        pool, self._pool = self._pool, None
        if pool is not None and self._owns_pool:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except (*_UNAVAILABLE, TimeoutError):
                pool.terminate()

    def _live_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise DatabaseUnavailableError(f"{self.url} is not open")
        return self._pool

    async def _fetch(self, conn: Any, alias: str, what: str) -> list[KEKVersion]:
        rows = await self._bounded(
            what,
            conn.fetch(
                f"SELECT {COLUMNS} FROM encx_kek_versions WHERE alias = $1 ORDER BY version",
                alias,
            ),
        )
        return [row_to_version(self.url, row) for row in rows]

    async def versions(self, alias: str) -> list[KEKVersion]:
        try:
            async with self._connection("read") as conn:
                return await self._fetch(conn, alias, "read")
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
            async with self._transaction("write", alias) as conn:
                existing = await self._fetch(conn, alias, "write")
                if existing and only_if_empty:  # another instance got here first
                    return existing[-1]
                current = existing[-1] if existing else None
                key_id = await new_key(current)
                stamp = now()
                await self._bounded(
                    "write",
                    conn.execute(
                        "UPDATE encx_kek_versions SET state = 'deprecated', updated_at = $2 "
                        "WHERE alias = $1 AND state = 'active'",
                        alias,
                        stamp,
                    ),
                )
                version = current.version + 1 if current else 1
                row = (alias, version, key_id, "active", stamp, stamp, 1)
                await self._bounded(
                    "write",
                    conn.execute(
                        f"INSERT INTO encx_kek_versions ({COLUMNS}) "
                        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        *row,
                    ),
                )
                await self._bounded(
                    "write", conn.execute("SELECT pg_notify($1, $2)", CHANNEL, alias)
                )
            return row_to_version(self.url, row)
        except _UNAVAILABLE as exc:
            raise self._fail("write", exc) from exc

    async def set_state(self, alias: str, version: int, state: KeyState) -> KEKVersion:
        try:
            async with self._transaction("write", alias) as conn:
                # Never retire the active version: another instance may not know
                # it has rotated, but the database does.
                await self._bounded(
                    "write",
                    conn.execute(
                        "UPDATE encx_kek_versions SET state = $3, updated_at = $4 "
                        "WHERE alias = $1 AND version = $2 "
                        "AND NOT (state = 'active' AND $3 = 'retired')",
                        alias,
                        version,
                        state,
                        now(),
                    ),
                )
                await self._bounded(
                    "write", conn.execute("SELECT pg_notify($1, $2)", CHANNEL, alias)
                )
                changed = [
                    v for v in await self._fetch(conn, alias, "write") if v.version == version
                ]
        except _UNAVAILABLE as exc:
            raise self._fail("write", exc) from exc
        if not changed:
            raise KeyVersionNotFoundError(
                f"alias {alias!r} has no KEK version {version} in {self.url}"
            )
        return changed[0]

    async def listen(self, callback: Callable[[str | None], None]) -> None:
        """Call ``callback(alias)`` whenever any instance changes an alias's versions.

        Needs a connection of its own for as long as the store is open, so it is
        done only when the store made its own pool from a DSN; with a pool that
        was passed in, instances converge by polling alone. A lost listener
        connection (a server restart, a terminated backend) is made again in the
        background, with growing delays; once it is back, ``callback(None)``
        says that announcements may have been missed meanwhile, for any alias.
        """
        if self._listen_callback is not None or self._dsn is None:
            return
        self._listen_callback = callback
        if not await self._start_listening():
            self._reconnect_soon()  # listening is an optimisation: polling still converges

    def _on_notify(self, connection: object, pid: int, channel: str, payload: object) -> None:
        if self._listen_callback is not None:
            self._listen_callback(str(payload))

    async def _start_listening(self) -> bool:
        try:
            conn = await self._bounded(
                "listen",
                asyncpg.connect(
                    self._dsn,
                    timeout=self._timeout,
                    server_settings={"application_name": LISTENER_NAME},
                ),
            )
        except (DatabaseUnavailableError, *_UNAVAILABLE, ValueError):
            return False
        try:
            await self._bounded("listen", conn.add_listener(CHANNEL, self._on_notify))
        except (DatabaseUnavailableError, *_UNAVAILABLE):
            conn.terminate()
            return False
        if self._closed:  # closed while connecting
            conn.terminate()
            return False
        conn.add_termination_listener(self._on_listener_lost)
        self._listener = conn
        return True

    def _on_listener_lost(self, connection: object) -> None:
        if connection is self._listener and not self._closed:
            self._listener = None
            logger.warning("lost the LISTEN connection to %s; reconnecting", self.url)
            self._reconnect_soon()

    def _reconnect_soon(self) -> None:
        if not self._closed and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        delay = _RECONNECT_FIRST
        while not self._closed:
            await asyncio.sleep(delay)
            if await self._start_listening():
                logger.info("listening to %s again", self.url)
                if self._listen_callback is not None:
                    self._listen_callback(None)
                return
            delay = min(delay * 2, _RECONNECT_MAX)


async def _close(conn: Any, seconds: float) -> None:
    try:
        await asyncio.wait_for(conn.close(), seconds)
    except (*_UNAVAILABLE, TimeoutError):
        conn.terminate()
