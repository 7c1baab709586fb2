"""An example, kept as a test: a user store on SQLite with encrypted, searchable e-mail.

The pydantic ``User`` model is what a FastAPI app would receive and return. Its
e-mail address is stored encrypted (``email_encrypted``) together with a blind
index (``email_hash``) so users can still be found by address; the password is
stored only as an Argon2id hash. The table's columns are exactly the keys of
``EncryptedRecord.as_dict()``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import aiosqlite
import pydantic
import pytest

from encx_async import Argon2Params, Crypto, DEKCache, Encrypt, HashBasic, HashSecure
from encx_async.providers.local import LocalKMSService

ALIAS = "alias/user-store"


class User(pydantic.BaseModel):
    id: int
    name: str
    email: Annotated[str, Encrypt(), HashBasic()]
    # Hashed only: never stored in a readable form, never restored by decrypt_model.
    password: Annotated[str | None, HashSecure()] = None


SCHEMA = """
CREATE TABLE users (
    id                   INTEGER PRIMARY KEY,
    name                 TEXT NOT NULL,
    email_encrypted      TEXT NOT NULL,
    email_hash           TEXT NOT NULL,
    password_hash_secure TEXT,
    encx                 TEXT NOT NULL   -- the record's metadata, as JSON
);
CREATE INDEX users_email_hash ON users (email_hash);
"""


class UserStore:
    """Users in SQLite; e-mail addresses encrypted, and searchable through their hash."""

    def __init__(self, db: aiosqlite.Connection, crypto: Crypto) -> None:
        self.db = db
        self.crypto = crypto

    async def add(self, user: User) -> None:
        # record_id binds the ciphertexts to this row: copied to another id, they fail.
        record = await self.crypto.encrypt_model(user, record_id=user.id)
        row = record.as_dict()
        row["encx"] = json.dumps(row["encx"])
        columns = ", ".join(row)
        placeholders = ", ".join(f":{name}" for name in row)
        await self.db.execute(f"INSERT INTO users ({columns}) VALUES ({placeholders})", row)  # noqa: S608 (column names come from the model)
        await self.db.commit()

    async def _rows_by_email(self, email: str) -> list[dict[str, object]]:
        query = "SELECT * FROM users WHERE email_hash = ?"
        index = self.crypto.blind_index(User, "email", email)
        async with self.db.execute(query, (index,)) as cursor:
            return [dict(row) for row in await cursor.fetchall()]

    async def find_by_email(self, email: str) -> User | None:
        for row in await self._rows_by_email(email):
            return await self.crypto.decrypt_model(row, User, record_id=row["id"])
        return None

    async def login(self, email: str, password: str) -> User | None:
        for row in await self._rows_by_email(email):
            stored = row["password_hash_secure"]
            if isinstance(stored, str) and await self.crypto.verify_secure(password, stored):
                return await self.crypto.decrypt_model(row, User, record_id=row["id"])
        return None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[UserStore]:
    async with LocalKMSService() as kms:
        await kms.create_key("user store example", alias=ALIAS)
        crypto = await Crypto.create(
            kms=kms,
            kek_alias=ALIAS,
            pepper=bytes(range(100, 132)),  # in production: a Pepper from your secret store
            argon2=Argon2Params(memory_kib=64, iterations=1, allow_weak=True),  # tests only
            dek_cache=DEKCache(),
            database=f"sqlite:///{tmp_path / 'keys.db'}",
        )
        async with crypto, aiosqlite.connect(tmp_path / "app.db") as db:
            db.row_factory = aiosqlite.Row
            await db.executescript(SCHEMA)
            yield UserStore(db, crypto)


async def test_users_are_found_by_email_and_logged_in(store: UserStore) -> None:
    await store.add(User(id=1, name="Alice", email="alice@example.com", password="wonderland"))
    await store.add(User(id=2, name="Bob", email="bob@example.com", password="builder"))

    alice = await store.find_by_email("alice@example.com")
    assert alice == User(id=1, name="Alice", email="alice@example.com")  # no password back
    assert await store.find_by_email("carol@example.com") is None

    assert await store.login("alice@example.com", "wonderland") == alice
    assert await store.login("alice@example.com", "builder") is None
    assert await store.login("bob@example.com", "builder") is not None


async def test_what_the_database_holds(store: UserStore) -> None:
    await store.add(User(id=1, name="Alice", email="alice@example.com", password="wonderland"))
    async with store.db.execute("SELECT * FROM users") as cursor:
        (row,) = [dict(r) for r in await cursor.fetchall()]
    text = json.dumps(row)
    assert "alice@example.com" not in text
    assert "wonderland" not in text
    assert row["email_hash"] == store.crypto.blind_index(User, "email", "alice@example.com")
    # Keyed for this field alone: the same address in another domain gives another index.
    assert row["email_hash"] != store.crypto.hash_basic("alice@example.com", domain="other")
    assert not store.crypto.needs_reindex(row["email_hash"])
    assert json.loads(row["encx"])["fields"] == ["email"]

    # The lookup is an index search, not a scan that decrypts every row.
    plan_query = "EXPLAIN QUERY PLAN SELECT * FROM users WHERE email_hash = ?"
    async with store.db.execute(plan_query, ("x",)) as cursor:
        plan = " ".join(str(tuple(r)) for r in await cursor.fetchall())
    assert "users_email_hash" in plan
