"""The aiohttp integration and example service, served for real by aiohttp on 127.0.0.1.

The application runs in this test's event loop behind an ``AppRunner`` on an
ephemeral port, with ``handler_cancellation=True`` as the example's ``main``
sets it; requests go over TCP with aiohttp's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from encx_async import ClosedError, ConfigurationError, Crypto, KeyManagementService
from encx_async.integrations import aiohttp as encx
from encx_async.providers.local import LocalKMSService
from examples.aiohttp_service import create_app

from .test_integrations_common import (
    KMSRecorder,
    eventually,
    example_settings,
    holding_proxy,
    open_sqlite_connections,
)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[tuple[str, web.AppRunner]]:
    """``app`` on 127.0.0.1 and a free port; yields its URL and the runner."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", runner
    finally:
        await runner.cleanup()


async def _local_crypto(kms: KeyManagementService) -> Crypto:
    return await Crypto.create(
        kms=kms, kek_alias="alias/api", database="sqlite:///:memory:", create_key_if_missing=True
    )


async def test_setup_serves_one_crypto_to_the_app_and_its_subapps() -> None:
    made: list[LocalKMSService] = []

    def kms() -> LocalKMSService:
        made.append(LocalKMSService())
        return made[-1]

    seen: list[Crypto] = []

    async def roundtrip(request: web.Request) -> web.Response:
        crypto = encx.get_crypto(request)
        seen.append(crypto)
        blob = await crypto.encrypt(b"x", context={"tenant": "t"})
        return web.json_response(
            {"ok": await crypto.decrypt(blob, context={"tenant": "t"}) == b"x"}
        )

    app = web.Application()
    encx.setup(app, kms=kms, crypto=_local_crypto)
    app.router.add_get("/roundtrip", roundtrip)
    sub = web.Application()
    sub.router.add_get("/roundtrip", roundtrip)
    app.add_subapp("/sub", sub)

    async with serving(app) as (url, _), aiohttp.ClientSession(url) as client:
        for path in ("/roundtrip", "/sub/roundtrip", "/roundtrip"):
            async with client.get(path) as response:
                assert await response.json() == {"ok": True}
    assert len(made) == 1
    assert len(seen) == 3
    assert all(c is seen[0] for c in seen)
    with pytest.raises(ClosedError):
        await seen[0].encrypt(b"after cleanup")
    with pytest.raises(ClosedError):
        await made[0].get_key_id("alias/api")


async def test_get_crypto_without_setup_says_what_to_do() -> None:
    failures: list[BaseException] = []

    async def handler(request: web.Request) -> web.Response:
        try:
            encx.get_crypto(request)
        except ConfigurationError as exc:
            failures.append(exc)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_get("/", handler)
    async with (
        serving(app) as (url, _),
        aiohttp.ClientSession(url) as client,
        client.get("/") as response,
    ):
        assert response.status == 200
    (failure,) = failures
    assert "setup(app" in str(failure)


@pytest.mark.slow
async def test_the_example_service_stores_encrypted_users_and_finds_them(
    tmp_path: Path, moto_endpoint: str
) -> None:
    settings = example_settings(tmp_path, moto_endpoint)
    async with serving(create_app(settings)) as (url, _), aiohttp.ClientSession(url) as c:
        acme = {"X-Tenant": "acme"}
        body = {"name": "Ada", "email": "ada@example.com", "phone": "+44 1"}
        async with c.post("/users", json=body, headers=acme) as created:
            assert created.status == 201, await created.text()
            ada = await created.json()
        async with c.get(f"/users/{ada['id']}", headers=acme) as got:
            assert await got.json() == ada
        async with c.get("/users", params={"email": "ada@example.com"}, headers=acme) as found:
            assert await found.json() == [ada]
        async with c.get(f"/users/{ada['id']}", headers={"X-Tenant": "b"}) as hidden:
            assert hidden.status == 404
        async with c.post("/users", json={"name": "x"}, headers=acme) as invalid:
            assert invalid.status == 422
            assert "ada" not in await invalid.text()
        async with c.get("/healthz") as health:
            assert health.status == 200
            assert (await health.json())["ok"] is True
        async with c.get("/stats") as stats_response:
            stats = await stats_response.json()
        assert stats["kms_calls"]["encrypt_dek"] == 1
        assert stats["kms_calls"]["describe_key"] == 1
    with sqlite3.connect(settings.users_database) as db:
        (row,) = db.execute("SELECT * FROM users").fetchall()
    assert "ada@example.com" not in repr(row)


@pytest.mark.slow
async def test_shutdown_under_load_closes_the_kms_client_and_the_databases(
    tmp_path: Path, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = example_settings(tmp_path, moto_endpoint)
    recorder = KMSRecorder(settings)
    threads_before = open_sqlite_connections()
    outcomes: list[int | str] = []
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as client,
        serving(create_app(settings, kms=recorder)) as (url, runner),
    ):
        assert open_sqlite_connections() == threads_before + 2

        async def one(i: int) -> None:
            body = {"name": f"u{i}", "email": f"u{i}@example.com"}
            try:
                async with client.post(
                    f"{url}/users", json=body, headers={"X-Tenant": f"t{i % 7}"}
                ) as response:
                    await response.read()
                    outcomes.append(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes.append(type(exc).__name__)

        load = [asyncio.create_task(one(i)) for i in range(300)]

        async def some_answered() -> bool:
            return len(outcomes) >= 50

        await eventually(some_answered, 30)
        await runner.cleanup()  # what run_app does on SIGTERM, in the middle of the load
        await asyncio.gather(*load)
    gc.collect()
    await recorder.assert_all_closed()
    assert open_sqlite_connections() == threads_before
    assert 201 in outcomes
    assert 500 not in outcomes
    assert not [r for r in caplog.records if "Unclosed" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.slow
@pytest.mark.parametrize("dek_cache", [False, True], ids=["uncached", "cached"])
async def test_a_client_leaving_mid_kms_call_cancels_the_handler_and_nothing_breaks(
    tmp_path: Path, moto_endpoint: str, dek_cache: bool
) -> None:
    settings = example_settings(tmp_path, moto_endpoint, dek_cache=dek_cache)
    async with holding_proxy(moto_endpoint) as proxy:
        recorder = KMSRecorder(settings, endpoint=proxy.url)
        async with (
            serving(create_app(settings, kms=recorder)) as (url, _),
            aiohttp.ClientSession(url) as c,
        ):
            proxy.hold()
            async with aiohttp.ClientSession(url) as leaving:
                body = {"name": "L", "email": "l@example.com"}

                async def post() -> None:
                    async with leaving.post(
                        "/users", json=body, headers={"X-Tenant": "leaver"}
                    ) as response:
                        await response.read()

                request = asyncio.create_task(post())
                await asyncio.wait_for(proxy.held.wait(), 10)
                request.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await request
            if not dek_cache:
                # aiohttp cancelled the handler, and with it the KMS request.

                async def kms_request_dropped() -> bool:
                    return proxy.dropped_while_held >= 1

                await eventually(kms_request_dropped)
            proxy.release()

            for i in range(20):
                tenant = "leaver" if i % 2 else f"other{i}"
                body = {"name": f"n{i}", "email": f"n{i}@example.com"}
                async with c.post("/users", json=body, headers={"X-Tenant": tenant}) as r:
                    assert r.status == 201, await r.text()
                    user = await r.json()
                async with c.get(f"/users/{user['id']}", headers={"X-Tenant": tenant}) as r:
                    assert await r.json() == user
            async with c.get("/healthz") as health:
                assert (await health.json())["ok"] is True
            async with c.get("/stats") as response:
                stats = await response.json()
            if dek_cache:
                assert stats["dek_cache"]["encrypt"]["hits"] >= 9
    await recorder.assert_all_closed()
