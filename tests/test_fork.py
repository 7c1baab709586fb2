"""A Crypto inherited across ``os.fork()``: the child forgets the parent's data keys.

A service that creates its Crypto and then forks its workers (gunicorn with
``--preload``, a ``multiprocessing`` pool with the fork start method) hands
each child a copy of the parent's cached DEKs and of their use counts. These
tests fork for real: each child runs an event loop of its own, reports through
a pipe and leaves with ``os._exit``; the parent waits for it with ``os.waitpid``.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import os
import signal
import traceback
import warnings
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from encx_async import Crypto, DataKey, DEKCache, ForkedError, SealedRecord
from encx_async._envelope import Sealer, parse
from encx_async.providers.aws import Config, KMSService
from encx_async.providers.local import LocalKMSService

from .conftest import TEST_REGION

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX only")

ALIAS = "alias/fork-test"
CTX = {"tenant": "acme"}
OTHER = {"tenant": "globex"}  # whose first key is being fetched when the parent forks
LIMIT = 10  # max_messages_per_dek
BEFORE = 4  # messages the parent encrypts under its first key before it forks
WORKERS = 2
HANG_GUARD = 120.0  # seconds; a child that takes longer is stuck, not slow
CALL_GUARD = 10.0  # the same, for one call a child makes on what it inherited

Report = dict[str, Any]


def fork(child: Callable[[Report], Awaitable[None]]) -> tuple[int, int]:
    """Fork. The child runs ``child(report)`` in an event loop of its own, writes
    the report it filled in (with its traceback, if it failed) as JSON to a pipe,
    and exits; the parent gets the child's pid and the pipe's reading end."""
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads may deadlock the
        # child; this one runs the moto server and aiosqlite in threads. The child
        # takes no lock of theirs: it reaches moto over a socket, and opens a key
        # store connection, with its own thread, for itself.
        warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
        pid = os.fork()
    if pid:
        os.close(write)
        return pid, read

    async def run() -> None:
        report: Report = {}
        try:
            await child(report)
            code = 0
        except BaseException:
            report["error"], code = traceback.format_exc(), 1
        with os.fdopen(write, "wb") as pipe:
            pipe.write(json.dumps(report).encode())
        # From inside the loop: what is left of the parent's tasks and connections
        # is neither awaited nor closed on the way out.
        os._exit(code)

    try:  # never back into pytest from here
        os.close(read)
        asyncio.run(run())  # (a forked process has no running loop)
    finally:
        os._exit(1)


async def reap(children: list[tuple[int, int]]) -> list[Report]:
    """The reports of the forked ``children`` (pid, pipe) once all have exited, each
    with its exit code as "exit"; a child still running after the hang guard
    fails the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD
    statuses: dict[int, int] = {}
    try:
        while len(statuses) < len(children):
            for pid, _ in children:
                if pid not in statuses:
                    done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (never blocks)
                    if done:
                        statuses[pid] = status
            if loop.time() > deadline:
                pytest.fail(f"a forked child did not finish within {HANG_GUARD} s")
            await asyncio.sleep(0.02)  # reports are small: a pipe never fills up
    finally:
        for pid, _ in children:
            if pid not in statuses:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)  # noqa: ASYNC222 (a killed child: at once)
    reports: list[Report] = []
    for pid, read in children:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        report: Report = json.loads(data) if data else {}
        report["exit"] = os.waitstatus_to_exitcode(statuses[pid])
        reports.append(report)
    return reports


def cached_sealers(cache: DEKCache) -> list[Sealer]:
    """The keys ``cache`` holds, encrypt side first."""
    found: list[Sealer] = []
    for side in (cache._encrypt, cache._decrypt):
        for entry in side.entries.values():
            assert isinstance(entry.value, Sealer)
            found.append(entry.value)
    return found


def dek_of(blob: bytes) -> bytes:
    """The wrapped DEK of an envelope: which data key encrypted it."""
    return parse(blob).wrapped_dek


async def outcome(call: Callable[[], object]) -> str:
    """What ``call`` gives (awaited if need be): "envelope:" and an envelope in
    hex, "ok", "hung", or the name of the error it raises."""
    try:
        result = call()
        if inspect.isawaitable(result):
            # Bounded, and not cancelled: a call that reached the parent's
            # connections or threads may wait forever, even for its cancellation.
            task = asyncio.ensure_future(result)
            await asyncio.wait([task], timeout=CALL_GUARD)
            if not task.done():
                return "hung"
            result = task.result()
    except Exception as exc:
        return type(exc).__name__
    return f"envelope:{result.hex()}" if isinstance(result, bytes) else "ok"


async def test_forked_workers_forget_the_parents_keys_and_each_dek_keeps_its_limit(
    aws_kms: KMSService, moto_endpoint: str, tmp_path: Path
) -> None:
    """gunicorn --preload: the parent creates the Crypto and uses it, then forks
    workers; each worker's first use of what it inherited raises, and the
    Crypto it creates itself uses keys of its own. Across every process, no DEK
    encrypts more than ``max_messages_per_dek`` messages."""
    database = f"sqlite:///{tmp_path / 'keys.db'}"
    cache = DEKCache(max_messages_per_dek=LIMIT)
    crypto = await Crypto.create(
        kms=aws_kms,
        kek_alias=ALIAS,
        dek_cache=cache,
        database=database,
        create_key_if_missing=True,
    )
    try:
        before = [await crypto.encrypt(b"before %d" % i, context=CTX) for i in range(BEFORE)]
        assert await crypto.decrypt(before[0], context=CTX) == b"before 0"
        cached = cached_sealers(cache)
        fast = crypto._fast
        assert fast is not None
        hot = fast.sealers()
        assert len(cached) == 2
        assert hot == cached  # the hot keys are the cached ones

        async def worker(report: Report) -> None:
            stats = cache.stats()
            report["entries"] = [stats.encrypt.entries, stats.decrypt.entries]
            report["wiped"] = [sealer.wiped for sealer in cached]
            report["hot"] = fast.sealers() == []
            # What a worker that inherited the Crypto would do with it: the key it
            # still holds has LIMIT - BEFORE uses left, as far as this copy knows.
            report["inherited"] = [
                await outcome(lambda: crypto.encrypt(b"inherited", context=CTX))
                for _ in range(LIMIT - BEFORE)
            ]
            record = SealedRecord(b"", {})
            report["other_calls"] = {
                "decrypt": await outcome(lambda: crypto.decrypt(before[1], context=CTX)),
                "seal_record": await outcome(lambda: crypto.seal_record({"a": b"1"})),
                "open_record": await outcome(lambda: crypto.open_record(record)),
                "encrypt_data": await outcome(
                    lambda: crypto.encrypt_data(b"x", DataKey.generate())
                ),
                "encrypt_stream": await outcome(lambda: crypto.encrypt_stream([b"x"])),
                "hash_basic": await outcome(lambda: crypto.hash_basic("x", domain="t")),
                "async with": await outcome(crypto.__aenter__),
            }
            # The key store's thread lives in the parent only: a close that
            # waited for it would never return.
            report["aclose"] = await outcome(crypto.aclose)
            # The right way: a Crypto of the worker's own, here on the cache it
            # inherited (empty now), with a KMS client of its own.
            config = Config(region=TEST_REGION, endpoint_url=moto_endpoint)
            async with KMSService(config) as kms:
                own = await Crypto.create(
                    kms=kms, kek_alias=ALIAS, dek_cache=cache, database=database
                )
                async with own:
                    blobs = [
                        await own.encrypt(b"worker %d" % i, context=CTX)
                        for i in range(LIMIT - BEFORE)
                    ]
                    report["decrypted"] = (await own.decrypt(before[1], context=CTX)).decode()
                    # The parent's load for OTHER is a task of the parent's loop: not
                    # something to wait for here.
                    await own.encrypt(b"other", context=OTHER)
                    report["blobs"] = [blob.hex() for blob in blobs]
                    report["encrypt_dek"] = own.stats().kms_calls["encrypt_dek"]

        # (A record, which leaves the hot keys as they are.)
        pending = asyncio.ensure_future(crypto.seal_record({"a": b"pending"}, context=OTHER))
        await asyncio.sleep(0)  # its KMS call is under way
        assert cache._encrypt.inflight
        children = [fork(worker) for _ in range(WORKERS)]
        try:
            # The parent's keys are untouched by what the children did to their copies.
            assert not any(sealer.wiped for sealer in cached)
            assert fast.sealers() == hot
            after = [await crypto.encrypt(b"after %d" % i, context=CTX) for i in range(LIMIT)]
            assert await crypto.open_record(await pending, context=OTHER) == {"a": b"pending"}
        finally:
            reports = await reap(children)

        # The messages each DEK encrypted, in every process.
        uses = Counter(dek_of(blob) for blob in before + after)
        first = dek_of(before[0])
        assert uses[first] == LIMIT  # the parent's first key: exactly its limit, in the parent
        assert crypto.stats().kms_calls["encrypt_dek"] == 3  # two for CTX, one for OTHER
        for report in reports:
            for result in report.get("inherited", []):
                if result.startswith("envelope:"):
                    uses[dek_of(bytes.fromhex(result.removeprefix("envelope:")))] += 1
        assert uses[first] == LIMIT, f"the children used the parent's key: {uses[first]} uses"
        for report in reports:
            assert report["exit"] == 0, report.get("error", "no report")
            assert report["inherited"] == [ForkedError.__name__] * (LIMIT - BEFORE)
            assert report["entries"] == [0, 0]
            assert report["wiped"] == [True, True]
            assert report["hot"] is True
            assert set(report["other_calls"].values()) == {ForkedError.__name__}
            assert report["aclose"] == "ok"
            assert report["decrypted"] == "before 1"
            assert report["encrypt_dek"] == 2  # one for CTX, one for OTHER
            theirs = [bytes.fromhex(blob) for blob in report["blobs"]]
            assert {dek_of(blob) for blob in theirs}.isdisjoint(uses)
            uses.update(dek_of(blob) for blob in theirs)
            for i, blob in enumerate(theirs):
                assert await crypto.decrypt(blob, context=CTX) == b"worker %d" % i
        assert max(uses.values()) <= LIMIT
        assert len(uses) == 2 + WORKERS
        # The children's closing left the parent's key store and KMS client working.
        assert (await crypto.rotate_kek()).version == 2
    finally:
        await crypto.aclose()


async def test_the_fork_registry_keeps_nothing_alive(local_kms: LocalKMSService) -> None:
    await local_kms.create_key("fork test", alias=ALIAS)
    cache = DEKCache()
    crypto = await Crypto.create(
        kms=local_kms, kek_alias=ALIAS, dek_cache=cache, database="sqlite:///:memory:"
    )
    await crypto.decrypt(await crypto.encrypt(b"x"))
    await crypto.aclose()
    refs: list[weakref.ref[Any]] = [weakref.ref(crypto), weakref.ref(cache)]
    del crypto, cache
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
