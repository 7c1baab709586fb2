"""What every key-version store shares: the version type, the protocol, the schema and rows."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from encx_async._exceptions import DatabaseUnavailableError, KeyStoreCorruptError

__all__ = [
    "COLUMNS",
    "DEFAULT_STORE_TIMEOUT",
    "SCHEMA_VERSION",
    "KEKVersion",
    "KeyState",
    "KeyStore",
    "NewKey",
    "UncommittedError",
    "migrations",
    "now",
    "redact_url",
    "row_to_version",
    "schema",
]

KeyState = Literal["active", "deprecated", "retired"]
STATES: tuple[KeyState, ...] = ("active", "deprecated", "retired")
SCHEMA_VERSION = 2
#: Seconds each step of a key-store operation may take (the store_timeout given to Crypto).
DEFAULT_STORE_TIMEOUT = 5.0
#: Given the current version (None before version 1), make the key of the next.
NewKey = Callable[["KEKVersion | None"], Awaitable[str]]
"""What a :class:`KeyStore` calls, under its write lock, for the key id of a new
version: given the current version (None before the first), it asks the KMS."""


class UncommittedError(DatabaseUnavailableError):
    """A write failed before anything of it could be committed.

    What a store raises when it knows, for a rotation to clean up after
    itself even though the store cannot be read; to callers it is a
    DatabaseUnavailableError like any other.
    """


@dataclass(frozen=True, slots=True)
class KEKVersion:
    """One version of a key-encryption key."""

    alias: str
    version: int
    key_id: str
    state: KeyState
    created_at: datetime
    updated_at: datetime
    #: whether this version's DEKs are wrapped with its number in the KMS
    #: encryption context (``encx:kek-version``); False only for versions
    #: recorded before encx-async did that (schema 1)
    version_bound: bool = True


@runtime_checkable
class KeyStore(Protocol):
    """Where the KEK versions of an alias are kept: what ``Crypto(database=...)``
    needs of a store. The SQLite and PostgreSQL stores are the bundled ones; an
    object with these methods may be passed as ``database=`` too. The Crypto
    opens it and closes it, as it does the stores it makes from a URL.

    Every writer must hold one lock across instances while it reads and writes
    (a database lock, a lease), so that instances starting or rotating together
    never number two versions alike. A store may also have
    ``async listen(callback)``, calling ``callback(alias)`` when another
    instance changes an alias (``callback(None)``: anything may have changed),
    so that instances need not wait for their next periodic check.
    """

    #: the database, with any password removed: safe to log
    url: str

    async def open(self) -> None:
        """Connect, and create or migrate the schema (idempotent, race-safe)."""
        ...

    async def aclose(self) -> None: ...

    async def versions(self, alias: str) -> list[KEKVersion]:
        """Every version of ``alias``, oldest first."""
        ...

    async def next_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        """Under the store's write lock: add the next version of ``alias`` as active.

        ``new_key`` is awaited inside the lock with the current version (None if
        there is none yet) and returns the new version's key id; the previous
        active version becomes deprecated. Everything commits together, or not at all.
        """
        ...

    async def initial_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        """The current version of ``alias``; under the write lock, version 1 if none exists."""
        ...

    async def set_state(self, alias: str, version: int, state: KeyState) -> KEKVersion:
        """Set the state of one version and return its row as it now is.

        The active version is never retired, even when asked (another instance
        may not have seen a rotation that made it current): the row comes back
        unchanged then, and the Crypto says so. An unknown version raises
        :class:`~encx_async.KeyVersionNotFoundError`.
        """
        ...


def schema(timestamp_type: str) -> list[str]:
    """The tables, for a database whose timestamp column type is ``timestamp_type``."""
    return [
        """CREATE TABLE IF NOT EXISTS encx_schema (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            version INTEGER NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS encx_kek_versions (
            alias TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version > 0),
            key_id TEXT NOT NULL CHECK (key_id <> ''),
            state TEXT NOT NULL CHECK (state IN ('active', 'deprecated', 'retired')),
            created_at {timestamp_type} NOT NULL,
            updated_at {timestamp_type} NOT NULL,
            {_BOUND_COLUMN},
            PRIMARY KEY (alias, version)
        )""",
    ]


# The default is for rows that an encx-async of schema 1 writes: it wraps without
# the version in the context. This code always writes the column itself.
_BOUND_COLUMN = "version_bound INTEGER NOT NULL DEFAULT 0 CHECK (version_bound IN (0, 1))"


def migrations(found: int) -> list[str]:
    """The statements that bring a database of schema version ``found`` up to date.

    Run under the store's schema lock, in the transaction that then records
    :data:`SCHEMA_VERSION`, so they run once however many instances start at once.
    """
    steps: list[str] = []
    if found < 2:
        steps.append(f"ALTER TABLE encx_kek_versions ADD COLUMN {_BOUND_COLUMN}")
    return steps


#: The columns of a version row, in the order row_to_version reads them.
COLUMNS = "alias, version, key_id, state, created_at, updated_at, version_bound"


def row_to_version(url: str, row: Any) -> KEKVersion:
    """Validate a database row; a corrupt one is a KeyStoreCorruptError, never a crash."""
    alias, version, key_id, state, created, updated, bound = tuple(row)
    where = f"KEK version row (alias {alias!r}, version {version!r}) in {url}"
    if not isinstance(version, int) or version < 1:
        raise KeyStoreCorruptError(f"{where} is corrupt: bad version number")
    if not isinstance(key_id, str) or not key_id.strip():
        raise KeyStoreCorruptError(f"{where} is corrupt: empty key id")
    if state not in STATES:
        raise KeyStoreCorruptError(f"{where} is corrupt: unknown state {state!r}")
    try:
        created_at, updated_at = _timestamp(created), _timestamp(updated)
    except (TypeError, ValueError):
        raise KeyStoreCorruptError(f"{where} is corrupt: bad timestamp") from None
    if bound not in (0, 1):  # (True and False among them)
        raise KeyStoreCorruptError(f"{where} is corrupt: bad version_bound")
    return KEKVersion(
        str(alias), version, key_id, state, created_at, updated_at, version_bound=bound == 1
    )


def _timestamp(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        return _timestamp(datetime.fromisoformat(value))
    raise TypeError("not a timestamp")


def now() -> datetime:
    return datetime.now(UTC)


def redact_url(url: str) -> str:
    """``url`` without its secrets (the password, and query options such as
    ``password=``), for messages and logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
        query = "&".join(
            f"{name}=***" if _SECRET_OPTION.search(name) else f"{name}={value}"
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        )
        if netloc == parts.netloc and query == parts.query:
            # Nothing to hide; and urlunsplit would turn sqlite:///x into sqlite:/x.
            return url
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparseable database URL>"


_SECRET_OPTION = re.compile("pass|secret|token|key", re.IGNORECASE)
