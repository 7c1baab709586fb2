"""The key store under faults provoked for real: a PostgreSQL server that stops
answering (a TCP stall in front of it), a listener connection the server
terminates, a SQLite file deleted under a running instance, and rotations that
fail or are cancelled after their new KMS key was made (which must not leave
that key behind, billed and unused)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from encx_async import Crypto, DatabaseUnavailableError
from encx_async.providers.local import LocalKMSService
from tests.faultproxy import TCPFaultProxy

SLACK = 1.0  # seconds a deadline may be overrun by on a busy two-core machine


@pytest_asyncio.fixture(loop_scope="function")
async def stallable_postgres(postgres_url: str) -> AsyncIterator[tuple[str, TCPFaultProxy]]:
    """The PostgreSQL of ``postgres_url`` behind a TCP fault proxy: (its URL, the proxy)."""
    parts = urlsplit(postgres_url)
    assert parts.hostname is not None
    async with TCPFaultProxy(parts.hostname, parts.port or 5432) as proxy:
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{proxy.port}"
        proxied = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
        yield urlunsplit(parts._replace(netloc=proxied)), proxy


async def test_rotation_under_a_stalled_postgres_ends_at_the_callers_deadline(
    stallable_postgres: tuple[str, TCPFaultProxy],
    local_kms: LocalKMSService,
    postgres_alias: str,
) -> None:
    url, proxy = stallable_postgres
    store_timeout = 1.5
    crypto = await Crypto.create(
        kms=local_kms,
        kek_alias=postgres_alias,
        database=url,
        create_key_if_missing=True,
        store_timeout=store_timeout,
    )
    try:
        proxy.stall()
        # The caller's own deadline, shorter than the store's: cancellation must
        # get through at once, not wait for a ROLLBACK the server never answers.
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await crypto.rotate_kek()
        assert time.monotonic() - started < 0.5 + SLACK

        # No deadline of the caller's: the store's ends it, with a typed error
        # that says what happened.
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError) as caught:
            await crypto.rotate_kek()
        elapsed = time.monotonic() - started
        assert store_timeout * 0.9 <= elapsed < store_timeout + SLACK, elapsed
        message = str(caught.value)
        assert f"timed out after {store_timeout:g} s waiting for {url}" in message
        assert not message.endswith(": ")

        # Once the server answers again, the same Crypto works.
        proxy.pass_through()
        async with asyncio.timeout(10):
            rotated = await crypto.rotate_kek()
        assert rotated.version == 2
        assert crypto.kek_version == 2
        assert await crypto.decrypt(await crypto.encrypt(b"x")) == b"x"
    finally:
        proxy.pass_through()
        await crypto.aclose()


async def test_a_stalled_postgres_at_startup_is_a_timely_typed_error(
    stallable_postgres: tuple[str, TCPFaultProxy],
    local_kms: LocalKMSService,
    postgres_alias: str,
) -> None:
    url, proxy = stallable_postgres
    proxy.stall()
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match="timed out after 1 s waiting for"):
        await Crypto.create(
            kms=local_kms,
            kek_alias=postgres_alias,
            database=url,
            create_key_if_missing=True,
            store_timeout=1,
        )
    assert time.monotonic() - started < 1 + SLACK


async def test_the_listener_comes_back_after_its_backend_is_terminated(
    local_kms: LocalKMSService, postgres_url: str, postgres_alias: str
) -> None:
    hour = 3600.0  # polling would take an hour: only a notification explains a switch
    a = await Crypto.create(
        kms=local_kms,
        kek_alias=postgres_alias,
        database=postgres_url,
        create_key_if_missing=True,
        version_check_interval=hour,
    )
    b = await Crypto.create(
        kms=local_kms, kek_alias=postgres_alias, database=postgres_url, version_check_interval=hour
    )
    try:
        store = b._keyring.store
        old_pid = store._listener.get_server_pid()  # type: ignore[attr-defined]
        admin = await asyncpg.connect(postgres_url, timeout=5)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", old_pid)
        finally:
            await admin.close()
        async with asyncio.timeout(10):
            while True:
                listener = store._listener  # type: ignore[attr-defined]
                if listener is not None and listener.get_server_pid() != old_pid:
                    break
                await asyncio.sleep(0.05)

        rotated = await a.rotate_kek()
        async with asyncio.timeout(2):
            while b.kek_version != rotated.version:  # noqa: ASYNC110 (a property, not an event)
                await asyncio.sleep(0.01)
        assert b.key_id == rotated.key_id
    finally:
        await a.aclose()
        await b.aclose()
