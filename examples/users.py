"""What both example services share: settings, the user model, the SQLite store.

Users are stored with their e-mail address and phone number encrypted, bound
to the user's id and encrypted under the tenant's KMS encryption context, and
with a blind index of the e-mail address (``crypto.blind_index(User, "email",
...)``, keyed for that one field) so that a tenant can look users up by address
without the database ever holding one.

Every setting comes from the environment (:meth:`Settings.from_env`):

===========================  ==================================================
``AWS_REGION``               the KMS (and Secrets Manager) region; botocore's
                             usual chain when unset
``AWS_ENDPOINT_URL``         botocore's own override (moto, LocalStack, a VPC
                             endpoint); nothing to set on AWS
``ENCX_KEK_ALIAS``           the KEK alias (``alias/my-app``)
``ENCX_DATABASE_URL``        where KEK versions are kept (``postgresql://...``
                             for a fleet; a SQLite file by default)
``ENCX_PEPPER_SECRET_ID``    the Secrets Manager secret holding the pepper
``ENCX_PEPPER``              or the pepper itself, ``[<version>:]<base64>``
``ENCX_CREATE_MISSING``      ``1``: create the KMS key and the pepper secret on
                             first start (development; production has them)
``ENCX_DEK_CACHE``           ``0`` turns the DEK cache off (for comparisons)
``USERS_DATABASE``           the SQLite file of the users (``users.db``)
``HOST`` / ``PORT``          where to listen (``127.0.0.1:8000``)
===========================  ==================================================
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Self

import aiosqlite
import pydantic
from anyio.abc import AsyncResource

from encx_async import (
    ConfigurationError,
    Crypto,
    CryptoStats,
    DEKCache,
    Encrypt,
    HashBasic,
    KeyManagementService,
    Pepper,
)
from encx_async.providers import aws

__all__ = [
    "NewUser",
    "Settings",
    "User",
    "UserStore",
    "check_tenant",
    "stats_document",
]

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """How an example service reaches AWS and where it keeps its data."""

    region: str | None = None
    #: a KMS endpoint; None lets botocore decide (``AWS_ENDPOINT_URL`` included)
    kms_endpoint_url: str | None = None
    #: a Secrets Manager endpoint; None lets botocore decide
    secrets_endpoint_url: str | None = None
    kek_alias: str = "alias/my-app"
    #: the KEK version store; None: ``$ENCX_DATABASE_URL`` or the default SQLite file
    key_database: str | None = None
    pepper_secret_id: str | None = None
    pepper: Pepper | None = None
    create_missing: bool = False
    dek_cache: bool = True
    users_database: str = "users.db"
    max_pool_connections: int = 50
    host: str = "127.0.0.1"
    port: int = 8000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        env = os.environ if environ is None else environ
        pepper = Pepper.from_env(environ=env) if env.get("ENCX_PEPPER") else None
        return cls(
            region=env.get("AWS_REGION") or None,
            kek_alias=env.get("ENCX_KEK_ALIAS") or "alias/my-app",
            key_database=env.get("ENCX_DATABASE_URL") or None,
            pepper_secret_id=env.get("ENCX_PEPPER_SECRET_ID") or None,
            pepper=pepper,
            create_missing=env.get("ENCX_CREATE_MISSING", "").lower() in _TRUE,
            dek_cache=env.get("ENCX_DEK_CACHE", "1").lower() in _TRUE,
            users_database=env.get("USERS_DATABASE") or "users.db",
            host=env.get("HOST") or "127.0.0.1",
            port=int(env.get("PORT") or "8000"),
        )

    def kms_service(self) -> KeyManagementService:
        """The KMS service (not opened yet): what the integrations call ``kms``."""
        return aws.KMSService(
            aws.Config(
                region=self.region,
                endpoint_url=self.kms_endpoint_url,
                max_pool_connections=self.max_pool_connections,
            )
        )

    async def load_pepper(self) -> Pepper:
        if self.pepper is not None:
            return self.pepper
        if self.pepper_secret_id is None:
            raise ConfigurationError("set ENCX_PEPPER_SECRET_ID (or ENCX_PEPPER in development)")
        config = aws.Config(region=self.region, endpoint_url=self.secrets_endpoint_url)
        # Read once at start-up; the source (and its connections) is closed right after.
        async with aws.SecretsManagerPepperSource(config) as source:
            return await source.load(self.pepper_secret_id, create_if_missing=self.create_missing)

    async def open_crypto(self, kms: KeyManagementService) -> Crypto:
        """The Crypto on an opened KMS service: what the integrations call ``crypto``."""
        return await Crypto.create(
            kms=kms,
            kek_alias=self.kek_alias,
            pepper=await self.load_pepper(),
            dek_cache=DEKCache() if self.dek_cache else None,
            database=self.key_database,
            create_key_if_missing=self.create_missing,
        )


class NewUser(pydantic.BaseModel):
    """What a client sends to create a user."""

    name: str = pydantic.Field(min_length=1, max_length=200)
    email: str = pydantic.Field(min_length=3, max_length=320)
    phone: str | None = pydantic.Field(default=None, max_length=40)


class User(pydantic.BaseModel):
    """A stored user: e-mail and phone encrypted, the e-mail also blind-indexed."""

    id: str
    name: str
    email: Annotated[str, Encrypt(), HashBasic()]
    phone: Annotated[str | None, Encrypt()] = None


def check_tenant(value: str | None) -> str:
    """The tenant of a request (the ``X-Tenant`` header): it becomes the KMS context."""
    tenant = value or "public"
    if len(tenant) > 64 or not tenant.replace("-", "").replace("_", "").isalnum():
        raise ValueError("X-Tenant must be 1 to 64 letters, digits, '-' or '_'")
    return tenant


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id              TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    name            TEXT NOT NULL,
    email_encrypted TEXT NOT NULL,
    email_hash      TEXT NOT NULL,
    phone_encrypted TEXT,
    encx            TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS users_tenant_email ON users (tenant, email_hash);
"""
_COLUMNS = ("id", "tenant", "name", "email_encrypted", "email_hash", "phone_encrypted", "encx")
_INSERT = f"INSERT INTO users ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"  # noqa: S608 (constant column names)


class UserStore(AsyncResource):
    """Users in one SQLite database. The Crypto and the tenant come with each call:
    the store holds no keys, and nothing about a request lives beyond it."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: str) -> UserStore:
        db = await aiosqlite.connect(path)
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.executescript(_SCHEMA)
            await db.commit()
        except BaseException:
            await db.close()
            raise
        return cls(db)

    async def aclose(self) -> None:
        await self._db.close()

    async def add(self, crypto: Crypto, tenant: str, new: NewUser) -> User:
        user = User(id=uuid.uuid4().hex, **new.model_dump())
        # The tenant is the KMS encryption context (tenants never share a DEK);
        # the id binds the ciphertexts to this row.
        record = await crypto.encrypt_model(user, context={"tenant": tenant}, record_id=user.id)
        row = record.as_dict()
        values = {**row, "tenant": tenant, "encx": json.dumps(row["encx"])}
        await self._db.execute(_INSERT, [values[c] for c in _COLUMNS])
        await self._db.commit()
        return user

    async def get(self, crypto: Crypto, tenant: str, user_id: str) -> User | None:
        query = "SELECT * FROM users WHERE tenant = ? AND id = ?"
        async with self._db.execute(query, (tenant, user_id)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else await self._open(crypto, tenant, dict(row))

    async def find_by_email(self, crypto: Crypto, tenant: str, email: str) -> list[User]:
        query = "SELECT * FROM users WHERE tenant = ? AND email_hash = ?"
        index = crypto.blind_index(User, "email", email)
        async with self._db.execute(query, (tenant, index)) as cursor:
            rows = [dict(row) for row in await cursor.fetchall()]
        return [await self._open(crypto, tenant, row) for row in rows]

    async def _open(self, crypto: Crypto, tenant: str, row: dict[str, Any]) -> User:
        return await crypto.decrypt_model(
            row, User, context={"tenant": tenant}, record_id=row["id"]
        )


def stats_document(stats: CryptoStats, **extra: object) -> dict[str, Any]:
    """``crypto.stats()`` as JSON: KMS calls by operation and the DEK cache counters."""
    cache: dict[str, Any] | None = None
    if stats.cache is not None:
        cache = {"hit_ratio": stats.cache.hit_ratio}
        for side in ("encrypt", "decrypt"):
            s = getattr(stats.cache, side)
            cache[side] = {
                "hits": s.hits,
                "misses": s.misses,
                "coalesced": s.coalesced,
                "entries": s.entries,
                "evictions": s.evictions,
            }
    return {
        "kms_calls": dict(stats.kms_calls),
        "total_kms_calls": stats.total_kms_calls,
        "dek_cache": cache,
        **extra,
    }
