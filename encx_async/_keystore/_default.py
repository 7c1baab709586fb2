"""Which key-version database a Crypto uses when it was not told.

Versions name KMS keys, so a database that nobody chose must belong to one
KMS: two providers writing the same file each record keys the other has never
heard of. The choice is the provider's, through an optional method::

    async def default_database(self, kek_alias: str) -> str | None

returning a database URL (None: no opinion). The bundled providers answer:

* an in-memory ``LocalKMSService``: ``sqlite:///:memory:``, gone with the
  Crypto, as its keys are gone with the process;
* a ``LocalKMSService`` with a key file: ``<key file>.versions.db`` beside it;
* ``KMSService``: a file per AWS account, region and custom endpoint under the
  user's data directory (see :func:`aws_database`);
* ``MultiRegionKMSService``: its primary's answer, in a file of its own per mode.

``database=`` and ``$ENCX_DATABASE_URL`` come first; a provider without the
method gets the shared ``$XDG_DATA_HOME/encx-async/keys.db``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_DATABASE_ENV",
    "MEMORY",
    "DefaultDatabase",
    "aws_database",
    "beside",
    "data_directory",
    "resolve_database",
    "shared_database",
    "variant",
]

MEMORY = "sqlite:///:memory:"
DEFAULT_DATABASE_ENV = "ENCX_DATABASE_URL"
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


@runtime_checkable
class DefaultDatabase(Protocol):
    """A provider that knows which key-version database belongs to it."""

    async def default_database(self, kek_alias: str) -> str | None: ...


def data_directory() -> Path:
    """``$XDG_DATA_HOME/encx-async``, by default ``~/.local/share/encx-async``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "encx-async"


def shared_database() -> str:
    """The file for providers that do not choose: one per user."""
    return _sqlite(data_directory() / "keys.db")


def beside(path: Path) -> str:
    """The database next to a key file: ``<path>.versions.db``."""
    path = Path(path).expanduser().absolute()
    return _sqlite(path.with_name(path.name + ".versions.db"))


def aws_database(account: str, region: str, endpoint_url: str | None) -> str:
    """``aws-<account>-<region>[-<host_port>]/keys.db`` in the data directory.

    The endpoint's host and port are part of the name only for a custom
    endpoint (moto, LocalStack, a VPC endpoint): the keys of a local emulator
    are not the account's keys, whatever account it claims.
    """
    scope = f"aws-{account}-{region}"
    if endpoint_url:
        netloc = urlsplit(endpoint_url).netloc or endpoint_url
        scope += "-" + _UNSAFE.sub("_", netloc.rsplit("@", 1)[-1]).strip("_")
    return _sqlite(data_directory() / scope / "keys.db")


def variant(url: str, tag: str) -> str:
    """Another file next to the SQLite file of ``url``, told apart by ``tag``."""
    if url == MEMORY or not url.startswith("sqlite:///"):
        return url
    path = Path(url[len("sqlite:///") :])
    return _sqlite(path.with_name(f"{path.stem}.{tag}{path.suffix}"))


async def resolve_database(database: object, kms: object, kek_alias: str) -> object:
    """``database``, else ``$ENCX_DATABASE_URL``, else the provider's, else the shared file."""
    if database is not None:
        return database
    configured = os.environ.get(DEFAULT_DATABASE_ENV)
    if configured:
        return configured
    if isinstance(kms, DefaultDatabase):
        chosen = await kms.default_database(kek_alias)
        if chosen:
            return chosen
    return shared_database()


def _sqlite(path: Path) -> str:
    return "sqlite:///" + str(path)
