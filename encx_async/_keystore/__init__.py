"""Where KEK versions live: one small protocol, a SQLite and a PostgreSQL store.

A KEK version is a row ``(alias, version, key_id, state, created_at,
updated_at, version_bound)``. Versions of an alias count up from 1 with no gaps;
exactly one is ``active`` (the newest), older ones are ``deprecated`` (still
decrypt) or ``retired`` (refused). Writers serialise on a database lock (SQLite
``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so a fleet of instances that
start or rotate at once cannot create two version 1s or skip a number.

``version_bound`` says whether the version's DEKs are wrapped with the version
number in their KMS encryption context. Every version this code creates is;
rows from schema 1 predate the binding and are migrated as unbound.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, TypeGuard

from encx_async._exceptions import DatabaseUnavailableError

from ._default import DEFAULT_DATABASE_ENV, shared_database
from ._rows import (
    COLUMNS,
    DEFAULT_STORE_TIMEOUT,
    SCHEMA_VERSION,
    KEKVersion,
    KeyState,
    KeyStore,
    NewKey,
    UncommittedError,
    migrations,
    now,
    redact_url,
    row_to_version,
    schema,
)

if TYPE_CHECKING:
    import aiosqlite
    import asyncpg

__all__ = [
    "COLUMNS",
    "DEFAULT_DATABASE_ENV",
    "DEFAULT_STORE_TIMEOUT",
    "SCHEMA_VERSION",
    "KEKVersion",
    "KeyState",
    "KeyStore",
    "NewKey",
    "UncommittedError",
    "check_database",
    "default_database_url",
    "migrations",
    "now",
    "open_keystore",
    "redact_url",
    "row_to_version",
    "schema",
]


def default_database_url() -> str:
    """``$ENCX_DATABASE_URL``, or the shared SQLite file in the user's data directory
    (``$XDG_DATA_HOME/encx-async/keys.db``): the store of a provider that does not
    choose its own (see :mod:`encx_async._keystore._default`)."""
    return os.environ.get(DEFAULT_DATABASE_ENV) or shared_database()


def open_keystore(database: object, *, timeout: float = DEFAULT_STORE_TIMEOUT) -> KeyStore:
    """A store for a URL, an asyncpg pool or an aiosqlite connection (not yet
    opened), or the KeyStore given.

    ``timeout`` bounds each step of a PostgreSQL store's operations (see
    PostgresKeyStore), and how long a SQLite statement waits for another
    connection's lock.
    """
    if database is None:
        database = default_database_url()
    if isinstance(database, str):
        scheme = database.split(":", 1)[0].lower() if ":" in database else ""
        if scheme == "sqlite":
            from ._sqlite import SQLiteKeyStore

            return SQLiteKeyStore.from_url(database, timeout=timeout)
        if scheme in ("postgresql", "postgres"):
            try:
                from ._postgres import PostgresKeyStore
            except ImportError:
                raise DatabaseUnavailableError(
                    f"{redact_url(database)} needs asyncpg: pip install 'encx-async[postgres]'"
                ) from None
            return PostgresKeyStore(dsn=database, timeout=timeout)
        raise DatabaseUnavailableError(
            f"unsupported database URL {redact_url(database)!r}: use sqlite:///path/keys.db "
            "or postgresql://user@host/db"
        )
    if isinstance(database, KeyStore):
        return database
    if _is_asyncpg_pool(database):
        from ._postgres import PostgresKeyStore

        return PostgresKeyStore(pool=database, timeout=timeout)
    if _is_aiosqlite_connection(database):
        from ._sqlite import SQLiteKeyStore

        return SQLiteKeyStore(connection=database, timeout=timeout)
    raise _wrong_kind(database)


def check_database(database: object) -> None:
    """TypeError unless ``database`` is of a kind :func:`open_keystore` takes;
    what is wrong with a URL itself shows when the store opens."""
    if (
        database is None
        or isinstance(database, str | KeyStore)
        or _is_asyncpg_pool(database)
        or _is_aiosqlite_connection(database)
    ):
        return
    raise _wrong_kind(database)


# Imported only to recognise what was passed: neither driver is a core dependency.


def _is_asyncpg_pool(database: object) -> TypeGuard[asyncpg.Pool]:
    try:
        import asyncpg
    except ImportError:
        return False
    return isinstance(database, asyncpg.Pool)


def _is_aiosqlite_connection(database: object) -> TypeGuard[aiosqlite.Connection]:
    try:
        import aiosqlite
    except ImportError:
        return False
    return isinstance(database, aiosqlite.Connection)


def _wrong_kind(database: object) -> TypeError:
    return TypeError(
        "database must be a URL, a KeyStore, an asyncpg pool or an aiosqlite connection, "
        f"not {type(database).__name__}"
    )
