"""serve_crypto, which both framework integrations rest on; and helpers for their tests.

The helpers: example-service settings on the moto server (KMS and Secrets
Manager), a KMS factory that remembers what it built, and a TCP proxy in front
of moto that can hold the KMS's answers, so a handler can be caught awaiting a
real KMS call.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from encx_async import ClosedError, ConfigurationError, Crypto, DEKCache, KeyManagementService
from encx_async.integrations import serve_crypto
from encx_async.providers.local import LocalKMSService
from examples.users import Settings

from .conftest import TEST_REGION

EXAMPLE_ALIAS = "alias/users"


def example_settings(tmp_path: Path, endpoint: str, *, dek_cache: bool = True) -> Settings:
    """The example services' production set-up, pointed at moto."""
    return Settings(
        region=TEST_REGION,
        kms_endpoint_url=endpoint,
        secrets_endpoint_url=endpoint,
        kek_alias=EXAMPLE_ALIAS,
        key_database=f"sqlite:///{tmp_path / 'keys.db'}",
        pepper_secret_id="users/pepper",
        create_missing=True,  # first boot: the key and the pepper secret are created
        dek_cache=dek_cache,
        users_database=str(tmp_path / "users.db"),
    )


class KMSRecorder:
    """A KMS factory that keeps every service it made, to check them after shutdown."""

    def __init__(self, settings: Settings, endpoint: str | None = None) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.made: list[KeyManagementService] = []

    def __call__(self) -> KeyManagementService:
        from encx_async.providers import aws

        config = aws.Config(
            region=self.settings.region,
            endpoint_url=self.endpoint or self.settings.kms_endpoint_url,
            max_pool_connections=self.settings.max_pool_connections,
        )
        service = aws.KMSService(config)
        self.made.append(service)
        return service

    async def assert_all_closed(self) -> None:
        assert self.made
        for service in self.made:
            with pytest.raises(ClosedError):
                await service.get_key_id(EXAMPLE_ALIAS)


async def eventually(condition: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Wait until ``condition()`` holds, polling: what is awaited happens in a server."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true after {seconds:g} s")
        await asyncio.sleep(0.01)


def open_sqlite_connections() -> int:
    """The sqlite3 connections of this process still open: the key stores' and
    aiosqlite's (which wraps one), in memory or on disk."""
    gc.collect()  # a connection nobody holds any more is closed on the way out
    count = 0
    for candidate in gc.get_objects():
        if isinstance(candidate, sqlite3.Connection):
            try:
                candidate.total_changes  # noqa: B018 (raises once it is closed)
            except sqlite3.ProgrammingError:
                continue
            count += 1
    return count


class HoldingProxy:
    """A TCP proxy to ``upstream`` (127.0.0.1) that can hold the answers coming back.

    While :meth:`hold` is on, requests still reach the server, but its replies
    wait here, so the client is left awaiting them. :attr:`held` is set when a
    reply is being held; :attr:`dropped_while_held` counts client connections
    that went away meanwhile (a cancelled request closes its connection).
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._released = asyncio.Event()
        self._released.set()
        self.held = asyncio.Event()
        self.dropped_while_held = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    def hold(self) -> None:
        self.held.clear()
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def aclose(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        except BaseException:
            self._tasks.discard(task)
            client_w.close()
            raise
        try:
            await asyncio.gather(
                self._pipe(client_r, upstream_w, back=False),
                self._pipe(upstream_r, client_w, back=True),
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            client_w.close()
            upstream_w.close()
            # Shielded: a proxy closed mid-connection must still let both transports finish.
            with contextlib.suppress(ConnectionError):
                await asyncio.shield(
                    asyncio.gather(client_w.wait_closed(), upstream_w.wait_closed())
                )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, back: bool
    ) -> None:
        while data := await reader.read(65536):
            if back and not self._released.is_set():
                self.held.set()
                await self._released.wait()
            if writer.is_closing():
                if back:
                    self.dropped_while_held += 1
                return
            writer.write(data)
            await writer.drain()
        if not back:
            # The client closed its side: if a reply was being held, it was cancelled.
            if not self._released.is_set():
                self.dropped_while_held += 1
            writer.close()


@contextlib.asynccontextmanager
async def holding_proxy(endpoint: str) -> AsyncIterator[HoldingProxy]:
    proxy = HoldingProxy(int(endpoint.rsplit(":", 1)[1]))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.aclose()


# -- serve_crypto ----------------------------------------------------------------


async def _local_crypto(kms: KeyManagementService) -> Crypto:
    return await Crypto.create(
        kms=kms,
        kek_alias="alias/serve",
        dek_cache=DEKCache(),
        database="sqlite:///:memory:",
        create_key_if_missing=True,
    )


async def test_serve_crypto_opens_then_closes_crypto_before_kms() -> None:
    made: list[LocalKMSService] = []

    def kms() -> LocalKMSService:
        made.append(LocalKMSService())
        return made[-1]

    async with serve_crypto(kms, _local_crypto) as crypto:
        blob = await crypto.encrypt(b"hello", context={"tenant": "t"})
        assert await crypto.decrypt(blob, context={"tenant": "t"}) == b"hello"
    with pytest.raises(ClosedError):
        await crypto.encrypt(b"after")
    (service,) = made
    with pytest.raises(ClosedError):
        await service.get_key_id("alias/serve")


@pytest.mark.parametrize("factory", ["plain", "async"])
async def test_serve_crypto_opens_a_crypto_the_factory_has_not(factory: str) -> None:
    def build(kms: KeyManagementService) -> Crypto:
        return Crypto(
            kms=kms,
            kek_alias="alias/serve",
            database="sqlite:///:memory:",
            create_key_if_missing=True,
        )

    async def build_later(kms: KeyManagementService) -> Crypto:
        return build(kms)

    async with serve_crypto(LocalKMSService, build if factory == "plain" else build_later) as c:
        assert c.kek_version == 1
        assert await c.decrypt(await c.encrypt(b"x")) == b"x"
    with pytest.raises(ClosedError, match="closed"):
        await c.encrypt(b"after")


async def test_serve_crypto_refuses_a_crypto_closed_already() -> None:
    async def closed(kms: KeyManagementService) -> Crypto:
        crypto = await _local_crypto(kms)
        await crypto.aclose()
        return crypto

    with pytest.raises(ClosedError, match="closed"):
        async with serve_crypto(LocalKMSService, closed):
            pytest.fail("must not be reached")


async def test_serve_crypto_closes_the_kms_when_the_crypto_cannot_be_made() -> None:
    made: list[LocalKMSService] = []

    def kms() -> LocalKMSService:
        made.append(LocalKMSService())
        return made[-1]

    async def no_key(kms: KeyManagementService) -> Crypto:
        return await Crypto.create(
            kms=kms, kek_alias="alias/missing", database="sqlite:///:memory:"
        )

    with pytest.raises(Exception, match="alias/missing"):
        async with serve_crypto(kms, no_key):
            pytest.fail("must not be reached")
    with pytest.raises(ClosedError):
        await made[0].get_key_id("alias/missing")


async def test_serve_crypto_refuses_what_is_not_a_factory() -> None:
    with pytest.raises(ConfigurationError, match="callables"):
        async with serve_crypto(LocalKMSService(), _local_crypto):  # type: ignore[arg-type]
            pass

    async def not_a_crypto(kms: KeyManagementService) -> Crypto:
        return "crypto"  # type: ignore[return-value]

    with pytest.raises(ConfigurationError, match=r"must return an encx_async\.Crypto"):
        async with serve_crypto(LocalKMSService, not_a_crypto):
            pass


async def test_a_cancelled_shutdown_still_closes_everything() -> None:
    made: list[LocalKMSService] = []

    def kms() -> LocalKMSService:
        made.append(LocalKMSService())
        return made[-1]

    entered = asyncio.Event()
    crypto_seen: list[Crypto] = []

    async def run() -> None:
        async with serve_crypto(kms, _local_crypto) as crypto:
            crypto_seen.append(crypto)
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(run())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ClosedError):
        await crypto_seen[0].encrypt(b"x")
    with pytest.raises(ClosedError):
        await made[0].get_key_id("alias/serve")


class _SlowToClose(Crypto):
    """A Crypto whose aclose waits at a gate first, to be caught closing."""

    closing: asyncio.Event
    gate: asyncio.Event

    async def aclose(self) -> None:
        self.closing.set()
        await self.gate.wait()
        await super().aclose()


async def test_a_shutdown_cancelled_while_closing_still_finishes_closing() -> None:
    # asyncio.wait_for(runner.cleanup(), ...) and the like cancel natively
    # (task.cancel()), which anyio's shield alone does not stop.
    made: list[LocalKMSService] = []
    slow: list[_SlowToClose] = []
    closing, gate = asyncio.Event(), asyncio.Event()

    def kms() -> LocalKMSService:
        made.append(LocalKMSService())
        return made[-1]

    async def crypto(kms: KeyManagementService) -> Crypto:
        made_crypto = await _SlowToClose.create(
            kms=kms,
            kek_alias="alias/serve",
            database="sqlite:///:memory:",
            create_key_if_missing=True,
        )
        assert isinstance(made_crypto, _SlowToClose)
        made_crypto.closing, made_crypto.gate = closing, gate
        slow.append(made_crypto)
        return made_crypto

    threads_before = open_sqlite_connections()

    async def run() -> None:
        async with serve_crypto(kms, crypto):
            pass

    task = asyncio.create_task(run())
    await closing.wait()
    try:
        task.cancel()
        await asyncio.sleep(0)
        assert not task.done()  # the close goes on, cancelled or not
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(ClosedError):
            await slow[0].encrypt(b"x")
        with pytest.raises(ClosedError):
            await made[0].get_key_id("alias/serve")
        assert open_sqlite_connections() == threads_before  # the key store's connection is closed
    finally:
        gate.set()
        await slow[0].aclose()  # a failed run must not leave its database thread behind


@pytest.mark.parametrize("framework", ["fastapi", "aiohttp"])
def test_an_integration_without_its_framework_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, framework: str
) -> None:
    monkeypatch.setitem(sys.modules, framework, None)  # as if not installed
    monkeypatch.delitem(sys.modules, f"encx_async.integrations.{framework}", raising=False)
    with pytest.raises(ModuleNotFoundError) as missing:
        importlib.import_module(f"encx_async.integrations.{framework}")
    assert missing.value.name == framework
    assert f'pip install "encx-async[{framework}]"' in str(missing.value)
