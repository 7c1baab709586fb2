"""The key store under faults provoked for real: a PostgreSQL server that stops
answering (a TCP stall in front of it), a listener connection the server
terminates, a SQLite file deleted under a running instance, and rotations that
fail or are cancelled after their new KMS key was made (which must not leave
that key behind, billed and unused)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
from aiobotocore.session import AioSession

from encx_async import Crypto, DatabaseUnavailableError, KMSError
from encx_async._keystore import KEKVersion, NewKey
from encx_async.kms import KeyManagementService
from encx_async.providers.aws import KMSService
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


# -- a SQLite file deleted under a running instance -------------------------------------


async def test_a_deleted_sqlite_file_is_named_and_no_key_is_made(
    tmp_path: Path, local_kms: LocalKMSService
) -> None:
    path = tmp_path / "keys.db"
    crypto = await Crypto.create(
        kms=local_kms,
        kek_alias="alias/gone",
        database=f"sqlite:///{path}",
        create_key_if_missing=True,
    )
    try:
        keys_before = len(local_kms._keys)
        path.unlink()
        with pytest.raises(DatabaseUnavailableError, match="database file was deleted") as caught:
            await crypto.rotate_kek()
        assert "readonly" not in str(caught.value)
        assert len(local_kms._keys) == keys_before  # the file was checked before any KMS call
        assert crypto.kek_version == 1
    finally:
        await crypto.aclose()


_HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "exclusive":
    db.execute("BEGIN EXCLUSIVE")  # no other connection may read or write
else:
    db.execute("BEGIN")
    db.execute("SELECT count(*) FROM encx_kek_versions").fetchall()  # a reader: no commits
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@contextlib.asynccontextmanager
async def _locked_by_another_process(path: Path, how: str = "exclusive") -> AsyncIterator[None]:
    """The SQLite file at ``path`` locked by a child process until exit: ``"exclusive"``
    (nobody else reads or writes), or ``"read"`` (an open read transaction)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _HOLD_LOCK,
        str(path),
        how,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"locked\n"
        yield
    finally:
        child.stdin.close()
        await child.wait()


def _sqlite_crypto(kms: LocalKMSService, path: Path, store_timeout: float) -> Crypto:
    """A Crypto (open it with ``async with``) on the SQLite file at ``path``."""
    return Crypto(
        kms=kms,
        kek_alias="alias/locked",
        database=f"sqlite:///{path}",
        create_key_if_missing=True,
        store_timeout=store_timeout,
    )


async def test_a_sqlite_lock_held_elsewhere_fails_after_store_timeout(
    tmp_path: Path, local_kms: LocalKMSService
) -> None:
    path = tmp_path / "keys.db"
    async with _sqlite_crypto(local_kms, path, store_timeout=0.5) as crypto:
        keys_before = len(local_kms._keys)
        async with _locked_by_another_process(path):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailableError, match="store_timeout") as caught:
                await crypto.rotate_kek()
            waited = time.monotonic() - started
            assert 0.5 <= waited < 0.5 + SLACK
            assert "database is locked" in str(caught.value)
            assert len(local_kms._keys) == keys_before  # the lock came first, no KMS call
        await crypto.rotate_kek()  # once the other process lets go
        assert crypto.kek_version == 2


@pytest.mark.parametrize("operation", ["rotate", "read"])
async def test_a_wait_for_a_sqlite_lock_ends_at_the_callers_deadline(
    tmp_path: Path, local_kms: LocalKMSService, operation: str
) -> None:
    # SQLite waits for a lock inside a worker thread; the wait must still end
    # at once when the caller gives up, not when SQLite's own timeout would.
    path = tmp_path / "keys.db"
    async with _sqlite_crypto(local_kms, path, store_timeout=60) as crypto:
        async with _locked_by_another_process(path):
            # A read is what the background check for other instances' rotations does.
            waiting = crypto.rotate_kek() if operation == "rotate" else crypto._keyring.reload()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(waiting, 0.3)
            assert time.monotonic() - started < 0.3 + SLACK
        # The connection was left outside any transaction: it works at once.
        await crypto.rotate_kek()
        assert [v.version for v in crypto.kek_versions()] == [1, 2]


@pytest.mark.parametrize("deadline", ["store_timeout", "caller"])
async def test_a_commit_kept_waiting_by_a_reader_leaves_no_version_behind(
    tmp_path: Path, local_kms: LocalKMSService, deadline: str
) -> None:
    # The rotation's writes are done when its COMMIT waits for a reader elsewhere
    # to finish; when the wait ends, the transaction must be rolled back, not
    # left open on the connection (where this instance alone would see it).
    path = tmp_path / "keys.db"
    async with _sqlite_crypto(
        local_kms, path, store_timeout=0.5 if deadline == "store_timeout" else 60
    ) as crypto:
        first = crypto.key_id
        async with _locked_by_another_process(path, "read"):
            if deadline == "store_timeout":
                with pytest.raises(DatabaseUnavailableError, match="store_timeout"):
                    await crypto.rotate_kek()
            else:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(crypto.rotate_kek(), 0.5)
            assert crypto.kek_version == 1
        await crypto._keyring.reload()
        assert [v.version for v in crypto.kek_versions()] == [1]
        made = [key_id for key_id in local_kms._keys if key_id != first]
        assert len(made) == 1
        assert (await local_kms.describe_key(made[0]))["key_state"] == "PendingDeletion"
        assert await local_kms.get_key_id("alias/locked") == first  # the alias is back
        rotated = await crypto.rotate_kek()  # the connection is free: the next one works
        assert rotated.version == 2
    async with Crypto(
        kms=local_kms, kek_alias="alias/locked", database=f"sqlite:///{path}"
    ) as again:
        assert [v.version for v in again.kek_versions()] == [1, 2]  # committed for everyone


async def test_statements_abandoned_by_cancelled_tasks_never_overlap(
    tmp_path: Path, local_kms: LocalKMSService
) -> None:
    # Cancelled natively, a task stops waiting for its worker thread, which
    # runs on; the next read must not run on the same connection meanwhile
    # (two threads in one sqlite3 connection can crash the interpreter).
    path = tmp_path / "keys.db"
    async with _sqlite_crypto(local_kms, path, store_timeout=60) as crypto:
        threaded = crypto._keyring.store._connection._connection  # type: ignore[attr-defined]
        watched = _OverlapWatch(threaded._connection)
        threaded._connection = watched
        async with _locked_by_another_process(path):
            for _ in range(20):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.01):
                        await crypto._keyring.reload()
        await crypto.rotate_kek()
        assert [v.version for v in crypto.kek_versions()] == [1, 2]
        assert watched.calls > 20
        assert watched.most_at_once == 1


class _OverlapWatch:
    """A sqlite3 connection's stand-in that counts the statements running at once."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._guard = threading.Lock()
        self._running = 0
        self.calls = 0
        self.most_at_once = 0

    @property
    def in_transaction(self) -> bool:
        return self._connection.in_transaction

    def _enter(self) -> None:
        with self._guard:
            self.calls += 1
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)

    def _leave(self) -> None:
        with self._guard:
            self._running -= 1

    def execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        self._enter()
        try:
            return self._connection.execute(sql, parameters)
        finally:
            self._leave()

    def close(self) -> None:
        self._enter()
        try:
            self._connection.close()
        finally:
            self._leave()


class _DeletesFileOnCreate(LocalKMSService):
    """A local KMS whose CreateKey also deletes a file: the SQLite file vanishing
    while a rotation is under way."""

    victim: Path | None = None

    async def create_key(
        self, description: str, *, alias: str | None = None, multi_region: bool = False
    ) -> str:
        key_id = await super().create_key(description, alias=alias, multi_region=multi_region)
        if self.victim is not None:
            self.victim.unlink()
        return key_id


async def test_a_sqlite_file_deleted_mid_rotation_leaves_its_key_scheduled_for_deletion(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.db"
    async with _DeletesFileOnCreate() as kms:
        crypto = await Crypto.create(
            kms=kms,
            kek_alias="alias/gone",
            database=f"sqlite:///{path}",
            create_key_if_missing=True,
        )
        try:
            first = crypto.key_id
            kms.victim = path
            with pytest.raises(
                DatabaseUnavailableError, match="database file was deleted"
            ) as caught:
                await crypto.rotate_kek()
            assert caught.value.orphan_key_ids == ()
            made = [key_id for key_id in kms._keys if key_id != first]
            assert len(made) == 1
            assert (await kms.describe_key(made[0]))["key_state"] == "PendingDeletion"
            assert await kms.get_key_id("alias/gone") == first  # the alias is back
        finally:
            await crypto.aclose()


# -- keys of rotations that were not recorded ----------------------------------------------


class _FailingWrites:
    """Wraps a store so that next_version makes its key, then fails to record it."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def next_version(self, alias: str, new_key: NewKey) -> KEKVersion:
        current = (await self._store.versions(alias))[-1]
        await new_key(current)
        raise DatabaseUnavailableError("cannot write the test store: injected")


async def test_a_store_failure_schedules_the_new_key_for_deletion_on_aws(
    aws_kms: KMSService, tmp_path: Path
) -> None:
    crypto = await sqlite_crypto(aws_kms, tmp_path, "alias/orphans")
    try:
        first = crypto.key_id
        crypto._keyring.store = _FailingWrites(crypto._keyring.store)
        with pytest.raises(DatabaseUnavailableError, match="injected") as caught:
            await crypto.rotate_kek()
        assert caught.value.orphan_key_ids == ()
        states = await moto_key_states(aws_kms)
        assert states.pop(first) == "Enabled"
        assert list(states.values()) == ["PendingDeletion"]
        assert await aws_kms.get_key_id("alias/orphans") == first
    finally:
        await crypto.aclose()


class _CannotDelete(LocalKMSService):
    refuse = True

    async def schedule_key_deletion(self, key_id: str, *, pending_days: int = 7) -> None:
        if self.refuse:
            raise KMSError("ScheduleKeyDeletion refused (test)", code="AccessDeniedException")
        await super().schedule_key_deletion(key_id, pending_days=pending_days)


async def test_a_key_that_cannot_be_scheduled_is_reported_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _CannotDelete() as kms:
        crypto = await sqlite_crypto(kms, tmp_path, "alias/orphans")
        real_store = crypto._keyring.store
        try:
            first = crypto.key_id
            crypto._keyring.store = _FailingWrites(real_store)
            with pytest.raises(DatabaseUnavailableError) as caught:
                await crypto.rotate_kek()
            (orphan,) = caught.value.orphan_key_ids
            assert orphan != first
            assert orphan in caplog.text
            assert "could not be scheduled for deletion" in caplog.text
            assert (await kms.describe_key(orphan))["key_state"] == "Enabled"

            # The next rotation cleans up first.
            kms.refuse = False
            crypto._keyring.store = real_store
            rotated = await crypto.rotate_kek()
            assert rotated.version == 2
            assert (await kms.describe_key(orphan))["key_state"] == "PendingDeletion"
        finally:
            crypto._keyring.store = real_store
            await crypto.aclose()


async def test_a_storm_of_cancelled_rotations_leaves_no_unused_key(
    aws_kms: KMSService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crypto = await sqlite_crypto(aws_kms, tmp_path, "alias/storm")
    made = 0
    create_key = aws_kms.create_key
    rotating: contextvars.ContextVar[asyncio.Task[Any]] = contextvars.ContextVar("rotating")

    async def rotate() -> KEKVersion:
        task = asyncio.current_task()
        assert task is not None
        rotating.set(task)
        return await crypto.rotate_kek()

    async def create_key_then_some_are_cancelled(*args: Any, **kwargs: Any) -> str:
        # Besides the cancellations at random times below, every fifth rotation is
        # cancelled as its CreateKey answers, so the storm surely has some that
        # made a key in vain, however fast this machine runs the others.
        nonlocal made
        key_id = await create_key(*args, **kwargs)
        made += 1
        if made % 5 == 0:
            rotating.get().cancel()  # the caller's task (this call may run in another)
        return key_id

    try:
        monkeypatch.setattr(aws_kms, "create_key", create_key_then_some_are_cancelled)
        rng = random.Random(15)
        tasks = [asyncio.ensure_future(rotate()) for _ in range(50)]
        for task in tasks:
            loop = asyncio.get_running_loop()
            loop.call_later(rng.uniform(0, 4.0), task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
        assert 0 < cancelled < len(tasks)  # both outcomes happened

        recorded = {v.key_id for v in await crypto._keyring.store.versions("alias/storm")}
        states = await moto_key_states(aws_kms)
        assert len(states) > len(recorded)  # some rotations did make a key in vain
        for key_id, state in states.items():
            assert key_id in recorded or state == "PendingDeletion", (key_id, state)
        active = [
            v for v in await crypto._keyring.store.versions("alias/storm") if v.state == "active"
        ]
        assert await aws_kms.get_key_id("alias/storm") == active[-1].key_id
    finally:
        await crypto.aclose()


async def moto_key_states(kms: KMSService) -> dict[str, str]:
    """Every key in the (moto) account, by ARN: its KeyState (ListKeys, DescribeKey)."""
    config = kms._aws.config
    session = AioSession()
    async with session.create_client(
        "kms", region_name=config.region, endpoint_url=config.endpoint_url
    ) as client:
        listed = await client.list_keys()
        states: dict[str, str] = {}
        for entry in listed["Keys"]:
            described = await client.describe_key(KeyId=entry["KeyId"])
            states[entry["KeyArn"]] = described["KeyMetadata"]["KeyState"]
        return states


async def sqlite_crypto(kms: KeyManagementService, tmp_path: Path, alias: str) -> Crypto:
    """A Crypto on a fresh SQLite file in ``tmp_path``, its key made if missing."""
    return await Crypto.create(
        kms=kms,
        kek_alias=alias,
        database=f"sqlite:///{tmp_path / 'keys.db'}",
        create_key_if_missing=True,
    )
