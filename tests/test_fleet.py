"""A fleet: several Crypto instances, in separate processes or pools, sharing one
key-version database (PostgreSQL or a SQLite file) and one KMS (moto).

The process tests run ``tests/fleet_worker.py`` twice at once; see its docstring
for what a worker does and reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiobotocore.session import AioSession

from encx_async import Crypto, DatabaseUnavailableError, DEKCache
from encx_async._envelope import parse
from encx_async.providers.aws import Config, KMSService
from encx_async.providers.local import LocalKMSService

REPO_ROOT = Path(__file__).resolve().parent.parent
#: how far ahead the workers' shared start moment is: room for both to import and
#: open their KMS client before it, so that they do meet at the barrier
START_DELAY = 4.0
FLEET_TIMEOUT = 50.0
CONTEXT = {"tenant": "acme"}
REGION = "us-east-1"
SECRET = "s3cret"


# -- helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    name: str
    returncode: int
    summary: dict[str, Any]
    stderr: str

    def describe(self) -> str:
        return (
            f"{self.name} exited {self.returncode}\nsummary: {self.summary}\nstderr:\n{self.stderr}"
        )


def run_fleet(
    tmp_path: Path,
    *,
    endpoint: str,
    database: str,
    alias: str,
    rotations: int,
    records: int,
) -> list[Worker]:
    """Run two workers at once to the end; blocking, so call it in a thread."""
    names = ("a", "b")
    outs = {name: tmp_path / f"blobs-{name}.jsonl" for name in names}
    start_at = time.time() + START_DELAY
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, tuple[Path, Path]] = {}
    try:
        for name, peer in zip(names, reversed(names), strict=True):
            stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
            logs[name] = (stdout, stderr)
            command = [
                sys.executable,
                "-W",
                "error",
                "-m",
                "tests.fleet_worker",
                "--name",
                name,
                "--endpoint",
                endpoint,
                "--database",
                database,
                "--alias",
                alias,
                "--rotations",
                str(rotations),
                "--records",
                str(records),
                "--out",
                str(outs[name]),
                "--peer",
                str(outs[peer]),
                "--start-at",
                repr(start_at),
                "--create-key-if-missing",
                "--peer-timeout",
                str(FLEET_TIMEOUT - START_DELAY),
            ]
            with stdout.open("wb") as out, stderr.open("wb") as err:
                procs[name] = subprocess.Popen(  # noqa: S603 (our own interpreter and script)
                    command, cwd=REPO_ROOT, stdout=out, stderr=err, env=dict(os.environ)
                )
        # A worker that failed leaves its peer waiting for a file that never comes:
        # stop the peer soon after, rather than at the deadline.
        deadline = time.monotonic() + FLEET_TIMEOUT
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs.values()]
            if all(code is not None for code in codes):
                break
            if any(code not in (None, 0) for code in codes):
                deadline = min(deadline, time.monotonic() + 1.0)
            time.sleep(0.05)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    workers = []
    for name, proc in procs.items():
        stdout, stderr = logs[name]
        lines = stdout.read_text().strip().splitlines()
        summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        workers.append(Worker(name, proc.returncode, summary, stderr.read_text()))
    return workers


def check_workers(workers: list[Worker], *, rotations: int, records: int) -> None:
    """Both ran cleanly, really started together, and read each other's every blob."""
    a, b = workers
    if any(worker.returncode != 0 for worker in workers):
        # Both, since a worker stopped because its peer failed says little by itself.
        pytest.fail("\n\n".join(worker.describe() for worker in workers))
    for worker in workers:
        assert worker.summary["ok"] is True, worker.describe()
        # Warnings are errors in the workers (-W error); resources must be closed.
        assert "Warning" not in worker.stderr, worker.describe()
        assert "nclosed" not in worker.stderr, worker.describe()
        assert worker.summary["waited"] > 0, f"late for the start: {worker.describe()}"
        assert worker.summary["blobs_written"] == records * (rotations + 1)
        assert worker.summary["own_blobs_decrypted"] == worker.summary["blobs_written"]
        assert len(worker.summary["created_versions"]) == rotations
        assert worker.summary["stale_after_rotate"] == 0, worker.describe()
    assert abs(a.summary["started_at"] - b.summary["started_at"]) < 0.5
    assert (
        a.summary["peer_blobs"] == a.summary["peer_blobs_decrypted"] == b.summary["blobs_written"]
    )
    assert (
        b.summary["peer_blobs"] == b.summary["peer_blobs_decrypted"] == a.summary["blobs_written"]
    )
    # Every rotation made its own version: none lost, none numbered twice.
    created = a.summary["created_versions"] + b.summary["created_versions"]
    assert sorted(created) == list(range(2, 2 * rotations + 2))
    # Exactly one of the two created the KMS key of version 1.
    key_creations = sorted(w.summary["kms_calls"].get("create_key", 0) for w in workers)
    assert key_creations == [rotations, rotations + 1]


def check_versions(rows: list[tuple[int, str, str]], *, expected: int) -> None:
    """Versions 1..expected, no gap or duplicate, exactly one active: the newest."""
    versions = [version for version, _, _ in rows]
    assert versions == list(range(1, expected + 1))
    states = {version: state for version, _, state in rows}
    assert [v for v, s in states.items() if s == "active"] == [expected]
    assert {s for v, s in states.items() if v != expected} == {"deprecated"}
    assert len({key_id for _, key_id, _ in rows}) == expected  # new-key: a key per version


async def moto_keys(endpoint: str, alias: str) -> tuple[set[str], list[str]]:
    """The ARNs of every key in moto, and the key ARNs the alias points at (one entry per alias)."""
    session = AioSession()
    async with session.create_client("kms", region_name=REGION, endpoint_url=endpoint) as kms:
        keys = await kms.list_keys(Limit=1000)
        assert not keys.get("Truncated")
        arns = {key["KeyArn"] for key in keys["Keys"]}
        aliases = await kms.list_aliases(Limit=100)
        assert not aliases.get("Truncated")
        targets = [
            entry.get("TargetKeyId", "")
            for entry in aliases["Aliases"]
            if entry.get("AliasName") == alias
        ]
    by_id = {arn.rsplit("/", 1)[1]: arn for arn in arns}
    return arns, [by_id.get(target, target) for target in targets]


async def check_moto(endpoint: str, alias: str, rows: list[tuple[int, str, str]]) -> None:
    """One KMS key per version, and the alias (once) on the newest."""
    arns, alias_targets = await moto_keys(endpoint, alias)
    assert len(arns) == len(rows)
    assert arns == {key_id for _, key_id, _ in rows}
    assert alias_targets == [rows[-1][1]]


async def postgres_rows(url: str, alias: str) -> list[tuple[int, str, str]]:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        if await connection.fetchval("SELECT to_regclass('encx_kek_versions')") is None:
            return []
        rows = await connection.fetch(
            "SELECT version, key_id, state FROM encx_kek_versions WHERE alias = $1 "
            "ORDER BY version",
            alias,
        )
    finally:
        await connection.close()
    return [(row["version"], row["key_id"], row["state"]) for row in rows]


def sqlite_rows(path: Path, alias: str) -> list[tuple[int, str, str]]:
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute(
            "SELECT version, key_id, state FROM encx_kek_versions WHERE alias = ? ORDER BY version",
            (alias,),
        ).fetchall()
    finally:
        connection.close()
    return [(int(v), str(k), str(s)) for v, k, s in rows]


def error_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


# -- two processes ---------------------------------------------------------------------


@pytest.mark.slow
async def test_two_processes_on_postgres_race_rotate_and_read_each_other(
    tmp_path: Path, moto_endpoint: str, postgres_url: str, postgres_alias: str
) -> None:
    rotations, records = 10, 3
    assert await postgres_rows(postgres_url, postgres_alias) == []  # an empty start
    assert await moto_keys(moto_endpoint, postgres_alias) == (set(), [])  # no key, no alias

    workers = await asyncio.to_thread(
        run_fleet,
        tmp_path,
        endpoint=moto_endpoint,
        database=postgres_url,
        alias=postgres_alias,
        rotations=rotations,
        records=records,
    )

    check_workers(workers, rotations=rotations, records=records)
    rows = await postgres_rows(postgres_url, postgres_alias)
    check_versions(rows, expected=2 * rotations + 1)
    await check_moto(moto_endpoint, postgres_alias, rows)


@pytest.mark.slow
async def test_two_processes_on_one_sqlite_file_race_rotate_and_read_each_other(
    tmp_path: Path, moto_endpoint: str
) -> None:
    rotations, records = 5, 3
    alias = f"alias/fleet-{uuid.uuid4().hex}"
    db_file = tmp_path / "shared" / "keys.db"
    assert not db_file.exists()  # an empty start: the workers create the file

    workers = await asyncio.to_thread(
        run_fleet,
        tmp_path,
        endpoint=moto_endpoint,
        database=f"sqlite:///{db_file}",
        alias=alias,
        rotations=rotations,
        records=records,
    )

    check_workers(workers, rotations=rotations, records=records)
    rows = await asyncio.to_thread(sqlite_rows, db_file, alias)
    check_versions(rows, expected=2 * rotations + 1)
    await check_moto(moto_endpoint, alias, rows)


# -- LISTEN/NOTIFY ---------------------------------------------------------------------


@pytest.mark.slow
async def test_postgres_notify_moves_another_instance_at_once(
    moto_endpoint: str, postgres_url: str, postgres_alias: str
) -> None:
    hour = 3600.0  # polling would take an hour: only the notification can explain a switch
    async with AsyncExitStack() as stack:
        kms = await stack.enter_async_context(
            KMSService(Config(region=REGION, endpoint_url=moto_endpoint))
        )
        a = await Crypto.create(
            kms=kms,
            kek_alias=postgres_alias,
            database=postgres_url,
            create_key_if_missing=True,
            version_check_interval=hour,
            dek_cache=DEKCache(),
        )
        stack.push_async_callback(a.aclose)
        b = await Crypto.create(
            kms=kms,
            kek_alias=postgres_alias,
            database=postgres_url,
            version_check_interval=hour,
            dek_cache=DEKCache(),
        )
        stack.push_async_callback(b.aclose)
        assert a.kek_version == b.kek_version == 1
        before = await b.encrypt(b"before", context=CONTEXT)
        assert parse(before).kek_version == 1

        rotated = await a.rotate_kek()
        assert rotated.version == 2
        started = time.monotonic()
        for _ in range(200):  # 2 s at most
            if b.kek_version == 2:
                break
            await asyncio.sleep(0.01)
        waited = time.monotonic() - started

        assert b.kek_version == 2, f"B still on version {b.kek_version} after {waited:.2f} s"
        assert b.key_id == rotated.key_id
        after = await b.encrypt(b"after", context=CONTEXT)
        assert parse(after).kek_version == 2
        assert await a.decrypt(after, context=CONTEXT) == b"after"
        assert await a.decrypt(before, context=CONTEXT) == b"before"


# -- PostgreSQL errors and a pool of one's own ----------------------------------------


async def test_unreachable_postgres_is_a_typed_error_without_the_password(
    local_kms: LocalKMSService,
) -> None:
    url = f"postgresql://encx:{SECRET}@127.0.0.1:1/test"
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as caught:
        await asyncio.wait_for(
            Crypto.create(
                kms=local_kms,
                kek_alias="alias/unreachable",
                database=url,
                create_key_if_missing=True,
            ),
            timeout=20,
        )
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "***" in message
    assert "127.0.0.1:1" in message
    for exc in error_chain(caught.value):
        assert SECRET not in str(exc)
        assert SECRET not in repr(exc)


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://encx:{SECRET}@127.0.0.1:notaport/test",
        f"postgresql://encx:{SECRET}@[::1/test",
        f"postgresql://encx:{SECRET}@127.0.0.1:5432/test?sslmode=sometimes",
    ],
    ids=["bad-port", "bad-host", "bad-option"],
)
async def test_malformed_postgres_url_is_a_typed_error_without_the_password(
    local_kms: LocalKMSService, url: str
) -> None:
    with pytest.raises(DatabaseUnavailableError) as caught:
        await asyncio.wait_for(
            Crypto.create(kms=local_kms, kek_alias="alias/malformed", database=url), timeout=20
        )
    for exc in error_chain(caught.value):
        assert SECRET not in str(exc)


async def test_password_in_the_query_string_is_not_shown(local_kms: LocalKMSService) -> None:
    # libpq and asyncpg also take the password as a query parameter.
    url = f"postgresql://encx@127.0.0.1:1/test?password={SECRET}"
    with pytest.raises(DatabaseUnavailableError) as caught:
        await asyncio.wait_for(
            Crypto.create(kms=local_kms, kek_alias="alias/query-password", database=url),
            timeout=20,
        )
    for exc in error_chain(caught.value):
        assert SECRET not in str(exc)


async def test_a_passed_pool_is_used_and_left_open(
    local_kms: LocalKMSService, postgres_url: str, postgres_alias: str
) -> None:
    pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=4)
    try:
        crypto = await Crypto.create(
            kms=local_kms, kek_alias=postgres_alias, database=pool, create_key_if_missing=True
        )
        try:
            blob = await crypto.encrypt(b"pooled", context=CONTEXT)
            rotated = await crypto.rotate_kek()
            assert await crypto.decrypt(blob, context=CONTEXT) == b"pooled"
        finally:
            await asyncio.wait_for(crypto.aclose(), timeout=10)

        assert not pool.is_closing()
        assert await pool.fetchval("SELECT 1") == 1
        # The versions went through this pool into the database.
        stored = await pool.fetch(
            "SELECT version, key_id FROM encx_kek_versions WHERE alias = $1 ORDER BY version",
            postgres_alias,
        )
        assert [(r["version"], r["key_id"]) for r in stored][-1] == (2, rotated.key_id)
        # Every connection it borrowed (the listener's too) is back in the pool.
        assert pool.get_idle_size() == pool.get_size()
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except TimeoutError:
            pool.terminate()  # a connection was never given back: close() waits for it
            closed_cleanly = False
        else:
            closed_cleanly = True
    assert closed_cleanly, "pool.close() hung: a connection borrowed by the Crypto is still out"


async def test_a_stale_instance_cannot_retire_the_active_version(
    moto_endpoint: str, postgres_url: str, postgres_alias: str
) -> None:
    import asyncpg

    from encx_async import ConfigurationError, Crypto
    from encx_async.providers.aws import Config, KMSService

    async with (
        KMSService(Config(region="us-east-1", endpoint_url=moto_endpoint)) as kms,
        asyncpg.create_pool(postgres_url, min_size=1, max_size=2) as pool,
    ):
        a = await Crypto.create(
            kms=kms, kek_alias=postgres_alias, database=postgres_url, create_key_if_missing=True
        )
        # A passed pool means no LISTEN: b hears of rotations only by polling, hourly.
        b = await Crypto.create(
            kms=kms, kek_alias=postgres_alias, database=pool, version_check_interval=3600
        )
        try:
            await a.rotate_kek()
            await a.rotate_kek()
            assert b.kek_version == 1  # stale, and about to act on it
            with pytest.raises(ConfigurationError, match="active version"):
                await b.retire_kek_version(3)
            assert [v.state for v in a.kek_versions()][-1] == "active"
        finally:
            await b.aclose()
            await a.aclose()
