"""KEK versions in SQLite: the embedded default, shared by processes on one
machine through the file's locks (``BEGIN IMMEDIATE`` for every write).

A store opened from a URL drives the standard library's ``sqlite3`` through
anyio worker threads, one statement at a time. It keeps no thread of its own,
so a store (or a Crypto) that nobody closed cannot hold the interpreter open
at exit, and it runs under any anyio backend, trio included. An
``aiosqlite.Connection`` passed in is used as it is (asyncio only).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from encx_async._exceptions import DatabaseUnavailableError, KeyVersionNotFoundError
from encx_async._tasks import uninterrupted

from ._rows import (
    COLUMNS,
    DEFAULT_STORE_TIMEOUT,
    SCHEMA_VERSION,
    KEKVersion,
    KeyState,
    NewKey,
    UncommittedError,
    migrations,
    now,
    row_to_version,
    schema,
)

__all__ = ["SQLiteKeyStore"]

_T = TypeVar("_T")

if TYPE_CHECKING:
    import aiosqlite

_SCHEMA = schema("TEXT")
#: how long one statement waits inside SQLite for another connection's lock
#: before it gives control back to the event loop (see _Patient)
_LOCK_SLICE_MS = 100


class _Connection(Protocol):
    """What the store needs of a connection: the part of aiosqlite's API it uses."""

    @property
    def in_transaction(self) -> bool: ...

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> object: ...

    async def execute_fetchall(
        self, sql: str, parameters: Iterable[Any] = ()
    ) -> Iterable[sqlite3.Row]: ...

    async def close(self) -> None: ...


class _ThreadedConnection:
    """A ``sqlite3`` connection whose statements run in anyio worker threads.

    The store runs one statement at a time, and waits for each to end even when
    its task is cancelled (see _Patient), so the connection is never used by
    two threads at once (hence ``check_same_thread=False``).
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    @property
    def in_transaction(self) -> bool:
        return self._connection.in_transaction

    @classmethod
    async def connect(cls, target: str) -> _ThreadedConnection:
        connect = partial(
            sqlite3.connect,
            target,
            isolation_level=None,
            timeout=_LOCK_SLICE_MS / 1000,
            check_same_thread=False,
        )
        return cls(await anyio.to_thread.run_sync(connect))

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> object:
        return await anyio.to_thread.run_sync(self._connection.execute, sql, tuple(parameters))

    async def execute_fetchall(
        self, sql: str, parameters: Iterable[Any] = ()
    ) -> Iterable[sqlite3.Row]:
        def fetch() -> list[sqlite3.Row]:
            return self._connection.execute(sql, tuple(parameters)).fetchall()

        return await anyio.to_thread.run_sync(fetch)

    async def close(self) -> None:
        # Shielded: a cancelled aclose() must not leave the file open.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._connection.close)


class _Patient:
    """A connection whose statements wait out other connections' locks, for up to
    ``timeout`` seconds each, and stay cancellable while they wait.

    SQLite waits for a lock inside the statement (its busy timeout), in a worker
    thread that nothing can interrupt. So that wait is one short slice (the
    busy timeout of a connection the store opens; a connection passed in keeps
    its own), and a statement that runs out of it is tried again from the event
    loop, where a cancellation or the deadline ends the wait. Some conflicts
    SQLite reports at once rather than risk a deadlock (switching a new file's
    journal while another process opens it, for one): those are retried the
    same way. Only what SQLite allows is retried: a busy statement outside a
    transaction has changed nothing, and a transaction whose COMMIT was busy is
    still open, waiting for that COMMIT. Any other busy statement inside a
    transaction fails, and the transaction is rolled back.

    A cancelled statement is still waited for, up to the end of its slice,
    before the cancellation goes on: under asyncio its worker thread would
    otherwise run on, unseen, beside the statements that follow on the same
    connection (which can crash the interpreter), or after them (a ROLLBACK
    after the next transaction's BEGIN, say).
    """

    def __init__(self, connection: _Connection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout

    @property
    def in_transaction(self) -> bool:
        return self._connection.in_transaction

    async def execute(self, sql: str, parameters: Iterable[Any] = ()) -> object:
        return await self._patiently(sql, partial(self._connection.execute, sql, parameters))

    async def execute_fetchall(
        self, sql: str, parameters: Iterable[Any] = ()
    ) -> Iterable[sqlite3.Row]:
        call = partial(self._connection.execute_fetchall, sql, parameters)
        return await self._patiently(sql, call)

    async def close(self) -> None:
        await _whole(self._connection.close())

    async def _patiently(self, sql: str, statement: Callable[[], Awaitable[_T]]) -> _T:
        deadline = time.monotonic() + self._timeout
        delay = 0.005
        while True:
            try:
                return await _whole(statement())
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                if self._connection.in_transaction and sql != "COMMIT":
                    raise
                if time.monotonic() >= deadline:
                    raise sqlite3.OperationalError(
                        f"{exc}: another connection held its lock for over "
                        f"{self._timeout:g} s (store_timeout)"
                    ) from exc
            await anyio.sleep(delay)
            delay = min(delay * 2, _LOCK_SLICE_MS / 1000)


async def _whole(statement: Awaitable[_T]) -> _T:
    """``await statement``, waited for to its end even if the task is cancelled."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio): a cancelled scope waits anyway
        return await statement
    return await uninterrupted(statement)


class SQLiteKeyStore:
    """A connection passed in should be in autocommit mode (``isolation_level=None``)
    and is left open; transactions here are explicit (``BEGIN IMMEDIATE``).

    ``timeout`` is how long a statement may wait for another connection's lock
    (another process writing, say) before it fails.
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        connection: aiosqlite.Connection | None = None,
        timeout: float = DEFAULT_STORE_TIMEOUT,
    ) -> None:
        self._path = path
        self._timeout = timeout
        self._connection: _Connection | None = (
            None if connection is None else _Patient(connection, timeout)
        )
        self._owns_connection = connection is None
        # Opened, but the file does not exist yet: made by the first write.
        self._deferred = False
        # The file opened (device, inode): one deleted or replaced under a
        # running instance is noticed, not written to in vain.
        self._file: str | None = None
        self._identity: tuple[int, int] | None = None
        # One connection serves every task: transactions must not interleave on it.
        self._lock = anyio.Lock()
        self.url = f"sqlite:///{path}" if path is not None else "sqlite (given connection)"

    @classmethod
    def from_url(cls, url: str, *, timeout: float = DEFAULT_STORE_TIMEOUT) -> SQLiteKeyStore:
        rest = url[len("sqlite:") :]
        if not rest.startswith("///") or len(rest) == 3:
            raise DatabaseUnavailableError(
                f"malformed SQLite URL {url!r}: use sqlite:///relative/keys.db, "
                "sqlite:////absolute/keys.db or sqlite:///:memory:"
            )
        return cls(path=rest[3:], timeout=timeout)

    async def open(self) -> None:
        if self._connection is None:
            assert self._path is not None
            if self._path != ":memory:" and not await anyio.to_thread.run_sync(
                _file_exists, self._path
            ):
                # Nothing to read yet: the file is made by the first write, so a
                # start that fails (an unknown alias, say) leaves nothing behind.
                self._deferred = True
                return
        async with self._lock:
            await self._connect_locked()

    async def _connect_locked(self) -> None:
        """Connect (creating the file), and create or check the schema; under the lock."""
        try:
            if self._connection is None:
                assert self._path is not None
                target = self._path
                if target != ":memory:":
                    target = await anyio.to_thread.run_sync(_prepare_file, self._path)
                self._connection = _Patient(
                    await _ThreadedConnection.connect(target), self._timeout
                )
                if target != ":memory:":
                    self._file = target
            self._deferred = False
            db = self._connection
            # The default rollback journal, not WAL: a few small writes a day need
            # no concurrent readers, and switching a new file to WAL while another
            # process opens it can deadlock the two until the busy timeout.
            async with self._transaction(db):
                for statement in _SCHEMA:
                    await db.execute(statement)
                rows = await db.execute_fetchall("SELECT version FROM encx_schema WHERE id = 1")
                found = next(iter(rows), None)
                if found is None:
                    await db.execute(
                        "INSERT INTO encx_schema (id, version) VALUES (1, ?)", (SCHEMA_VERSION,)
                    )
                elif found[0] > SCHEMA_VERSION:
                    raise DatabaseUnavailableError(
                        f"{self.url} has schema version {found[0]}; this encx-async "
                        f"knows up to {SCHEMA_VERSION}: upgrade encx-async"
                    )
                elif found[0] < SCHEMA_VERSION:
                    # Inside the write transaction that read the old number: of many
                    # instances opening at once, one migrates and the rest see it done.
                    for statement in migrations(found[0]):
                        await db.execute(statement)
                    await db.execute(
                        "UPDATE encx_schema SET version = ? WHERE id = 1", (SCHEMA_VERSION,)
                    )
            if self._file is not None:
                self._identity = await anyio.to_thread.run_sync(_identity, self._file)
        except (sqlite3.Error, OSError) as exc:
            await self._close_connection()
            raise DatabaseUnavailableError(f"cannot use {self.url}: {exc}") from exc
        except BaseException:
            await self._close_connection()
            raise

    async def aclose(self) -> None:
        self._deferred = False
        await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._owns_connection:
            await connection.close()

    async def _db(self, *, create: bool) -> _Connection | None:
        """The connection, under the lock; None while the file does not exist
        (a store opened before it did), unless ``create``."""
        if self._connection is None and self._deferred:
            assert self._path is not None
            if create or await anyio.to_thread.run_sync(_file_exists, self._path):
                await self._connect_locked()
        if self._connection is None:
            if self._deferred:
                return None
            raise DatabaseUnavailableError(f"{self.url} is not open")
        return self._connection

    async def _check_file(self) -> None:
        """UncommittedError if the database file is not the one opened any more.

        SQLite keeps using a deleted file (its writes then fail as "readonly"),
        and would never see a file put in its place: either way what it
        writes, no other process reads.
        """
        if self._file is None or self._identity is None:
            return
        try:
            found: tuple[int, int] | None = await anyio.to_thread.run_sync(_identity, self._file)
        except FileNotFoundError:
            found = None
        if found == self._identity:
            return
        what = "deleted" if found is None else "replaced by another file"
        raise UncommittedError(
            f"cannot use {self.url}: the database file was {what} (or moved) while this "
            "instance had it open; restore it, or restart with the right database"
        )

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[_Connection]:
        """A transaction holding SQLite's write lock from its first statement."""
        async with self._lock:
            db = await self._db(create=True)
            assert db is not None
            async with self._transaction(db):
                await self._check_file()
                yield db
                await self._check_file()  # the work may have taken a while

    @asynccontextmanager
    async def _transaction(self, db: _Connection) -> AsyncIterator[None]:
        try:
            # BEGIN and COMMIT inside the try: a BEGIN whose caller was cancelled
            # may have opened the transaction all the same, and a COMMIT that
            # failed (busy past the timeout) or was cancelled leaves it open.
            await db.execute("BEGIN IMMEDIATE")
            yield
            await db.execute("COMMIT")
        except BaseException:
            # Shielded: under a cancelled scope the rollback must still run,
            # or the connection stays inside the failed transaction.
            with anyio.CancelScope(shield=True):
                await _rollback(db)
            raise

    async def _failed(self, action: str, exc: sqlite3.Error) -> DatabaseUnavailableError:
        """The error for a failed statement: the file's fate, if that is the reason."""
        try:
            await self._check_file()
        except UncommittedError as gone:
            return gone
        return DatabaseUnavailableError(f"cannot {action} {self.url}: {exc}")

    async def _fetch(self, db: _Connection, alias: str) -> list[KEKVersion]:
        rows = await db.execute_fetchall(
            f"SELECT {COLUMNS} FROM encx_kek_versions WHERE alias = ? ORDER BY version",
            (alias,),
        )
        return [row_to_version(self.url, row) for row in rows]

    async def versions(self, alias: str) -> list[KEKVersion]:
        try:
            async with self._lock:
                db = await self._db(create=False)
                if db is None:
                    return []
                await self._check_file()
                return await self._fetch(db, alias)
        except sqlite3.Error as exc:
            raise await self._failed("read", exc) from exc

    async def initial_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        existing = await self.versions(alias)
        if existing:
            return existing[-1]
        # The key of version 1 is asked for under the write lock, so that of
        # instances starting together exactly one makes it (create_key_if_missing).
        made_file = self._connection is None and self._deferred
        try:
            async with self._write() as db:
                existing = await self._fetch(db, alias)
                if existing:  # another instance got here first
                    return existing[-1]
                return await self._insert(db, alias, 1, await new_key(None))
        except sqlite3.Error as exc:
            raise await self._failed("write", exc) from exc
        except BaseException:
            if made_file:
                # A first start that failed (an unknown alias, say) leaves no
                # empty database behind to confuse the next one.
                with anyio.CancelScope(shield=True):
                    await self._remove_if_empty()
            raise

    async def _remove_if_empty(self) -> None:
        async with self._lock:
            db, path = self._connection, self._file
            if db is None or path is None or not self._owns_connection:
                return
            try:
                rows = await db.execute_fetchall("SELECT count(*) FROM encx_kek_versions")
                if next(iter(rows))[0]:
                    return
                await self._close_connection()
                await anyio.to_thread.run_sync(_unlink, path)
            except (sqlite3.Error, OSError):
                return  # best effort: an empty file is only untidy
            self._deferred, self._file, self._identity = True, None, None

    async def next_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        try:
            async with self._write() as db:
                existing = await self._fetch(db, alias)
                current = existing[-1] if existing else None
                key_id = await new_key(current)
                stamp = now().isoformat()
                await db.execute(
                    "UPDATE encx_kek_versions SET state = 'deprecated', updated_at = ? "
                    "WHERE alias = ? AND state = 'active'",
                    (stamp, alias),
                )
                return await self._insert(db, alias, current.version + 1 if current else 1, key_id)
        except sqlite3.Error as exc:
            raise await self._failed("write", exc) from exc

    async def _insert(self, db: _Connection, alias: str, version: int, key_id: str) -> KEKVersion:
        stamp = now().isoformat()
        row = (alias, version, key_id, "active", stamp, stamp, 1)
        await db.execute(
            f"INSERT INTO encx_kek_versions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row
        )
        return row_to_version(self.url, row)

    async def set_state(self, alias: str, version: int, state: KeyState) -> KEKVersion:
        try:
            async with self._write() as db:
                # Never retire the active version: another instance may not know
                # it has rotated, but the database does.
                await db.execute(
                    "UPDATE encx_kek_versions SET state = ?, updated_at = ? "
                    "WHERE alias = ? AND version = ? AND NOT (state = 'active' AND ? = 'retired')",
                    (state, now().isoformat(), alias, version, state),
                )
                for found in await self._fetch(db, alias):
                    if found.version == version:
                        return found
        except sqlite3.Error as exc:
            raise await self._failed("write", exc) from exc
        raise KeyVersionNotFoundError(f"alias {alias!r} has no KEK version {version} in {self.url}")


def _identity(path: str) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _unlink(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def _file_exists(path: str) -> bool:
    return Path(path).expanduser().exists()


def _prepare_file(path: str) -> str:
    """The absolute path of the database file, its directory created (owner only)."""
    target = Path(path).expanduser().absolute()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return str(target)


async def _rollback(db: _Connection) -> None:
    try:
        await db.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "no transaction is active" not in str(exc):
            raise
