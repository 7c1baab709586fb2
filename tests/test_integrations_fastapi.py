"""The FastAPI integration and example service, served for real by uvicorn on 127.0.0.1.

uvicorn runs in this test's event loop, on a socket bound to an ephemeral
port; requests go over TCP with httpx. The example service talks to the moto
server (KMS and Secrets Manager) like a production service talks to AWS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.requests import HTTPConnection

from encx_async import ClosedError, ConfigurationError, Crypto, KeyManagementService
from encx_async.integrations.fastapi import STATE_KEY, CryptoDep, encx_lifespan, get_crypto
from encx_async.providers.local import LocalKMSService
from examples.fastapi_service import create_app

from .test_integrations_common import (
    KMSRecorder,
    eventually,
    example_settings,
    holding_proxy,
    open_sqlite_connections,
)


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """``app`` served by uvicorn on 127.0.0.1 and a free port; yields its URL and the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, log_level="warning", ws="none", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await task
        sock.close()


# -- the integration on its own ---------------------------------------------------


async def _local_crypto(kms: KeyManagementService) -> Crypto:
    return await Crypto.create(
        kms=kms, kek_alias="alias/api", database="sqlite:///:memory:", create_key_if_missing=True
    )


async def test_the_lifespan_serves_one_crypto_and_composes_with_yours() -> None:
    made: list[LocalKMSService] = []
    events: list[str] = []

    def kms() -> LocalKMSService:
        made.append(LocalKMSService())
        return made[-1]

    @contextlib.asynccontextmanager
    async def mine(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("mine up")
        yield {"greeting": "hello"}
        events.append("mine down")

    app = FastAPI(lifespan=encx_lifespan(kms=kms, crypto=_local_crypto, lifespan=mine))
    seen: list[Crypto] = []

    @app.get("/roundtrip")
    async def roundtrip(crypto: CryptoDep, connection: HTTPConnection) -> dict[str, Any]:
        seen.append(crypto)
        blob = await crypto.encrypt(b"x", context={"tenant": "t"})
        back = await crypto.decrypt(blob, context={"tenant": "t"})
        return {"ok": back == b"x", "greeting": connection.state.greeting}

    async with serving(app) as (url, _), httpx.AsyncClient(base_url=url) as client:
        for _ in range(3):
            response = await client.get("/roundtrip")
            assert response.json() == {"ok": True, "greeting": "hello"}
    assert events == ["mine up", "mine down"]
    assert len(made) == 1
    assert len(seen) == 3
    assert all(c is seen[0] for c in seen)  # one Crypto for the process
    with pytest.raises(ClosedError):
        await seen[0].encrypt(b"after shutdown")
    with pytest.raises(ClosedError):
        await made[0].get_key_id("alias/api")


def test_get_crypto_without_the_lifespan_says_what_to_do() -> None:
    connection = HTTPConnection({"type": "http", "state": {}})
    with pytest.raises(ConfigurationError, match="encx_lifespan"):
        get_crypto(connection)
    assert STATE_KEY == "encx_crypto"


# -- the example service -------------------------------------------------------------


@pytest.mark.slow
async def test_the_example_service_stores_encrypted_users_and_finds_them(
    tmp_path: Path, moto_endpoint: str
) -> None:
    settings = example_settings(tmp_path, moto_endpoint)
    async with serving(create_app(settings)) as (url, _), httpx.AsyncClient(base_url=url) as c:
        acme = {"X-Tenant": "acme"}
        created = await c.post(
            "/users",
            json={"name": "Ada", "email": "ada@example.com", "phone": "+44 1"},
            headers=acme,
        )
        assert created.status_code == 201, created.text
        ada = created.json()
        other = await c.post(
            "/users", json={"name": "Bob", "email": "bob@example.com"}, headers={"X-Tenant": "b"}
        )
        assert other.status_code == 201

        assert (await c.get(f"/users/{ada['id']}", headers=acme)).json() == ada
        found = await c.get("/users", params={"email": "ada@example.com"}, headers=acme)
        assert found.json() == [ada]
        # Another tenant sees nothing of acme's, by id or by address.
        assert (await c.get(f"/users/{ada['id']}", headers={"X-Tenant": "b"})).status_code == 404
        elsewhere = await c.get(
            "/users", params={"email": "ada@example.com"}, headers={"X-Tenant": "b"}
        )
        assert elsewhere.json() == []
        assert (await c.get("/users", params={"email": "x@y.z"}, headers=acme)).json() == []
        assert (await c.post("/users", json={"name": "x"}, headers=acme)).status_code == 422
        # A rejected body is not repeated back: it may hold an address or a phone number.
        invalid = await c.post(
            "/users", json={"name": "x", "email": "@@", "phone": "+44 " * 12}, headers=acme
        )
        assert invalid.status_code == 422
        assert [e["loc"] for e in invalid.json()["detail"]] == [
            ["body", "email"],
            ["body", "phone"],
        ]
        assert "@@" not in invalid.text
        assert "+44" not in invalid.text
        assert (await c.get("/users/1", headers={"X-Tenant": "no spaces"})).status_code == 400

        health = await c.get("/healthz")
        assert health.status_code == 200
        assert health.json()["ok"] is True
        assert health.json()["key_state"] == "Enabled"
        stats = (await c.get("/stats")).json()
        assert stats["kms_calls"]["encrypt_dek"] == 2  # one DEK per tenant
        assert stats["kms_calls"]["describe_key"] == 1
        assert stats["dek_cache"]["decrypt"]["hits"] >= 1
        assert stats["cancelled_requests"] == 0

    with sqlite3.connect(settings.users_database) as db:
        rows = db.execute("SELECT * FROM users").fetchall()
    dump = json.dumps(rows)
    assert len(rows) == 2
    assert "ada@example.com" not in dump
    assert "+44 1" not in dump


@pytest.mark.slow
async def test_shutdown_under_load_closes_the_kms_client_and_the_databases(
    tmp_path: Path, moto_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = example_settings(tmp_path, moto_endpoint)
    recorder = KMSRecorder(settings)
    threads_before = open_sqlite_connections()
    outcomes: list[int | str] = []
    async with serving(create_app(settings, kms=recorder)) as (url, server):
        assert open_sqlite_connections() == threads_before + 2  # the key store and the users
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:

            async def one(i: int) -> None:
                try:
                    response = await client.post(
                        "/users",
                        json={"name": f"u{i}", "email": f"u{i}@example.com"},
                        headers={"X-Tenant": f"t{i % 7}"},
                    )
                    outcomes.append(response.status_code)
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)

            load = [asyncio.create_task(one(i)) for i in range(300)]

            async def some_answered() -> bool:
                return len(outcomes) >= 50

            await eventually(some_answered, 30)
            server.should_exit = True  # SIGTERM's effect, in the middle of the load
            await asyncio.gather(*load)
    gc.collect()
    await recorder.assert_all_closed()
    assert open_sqlite_connections() == threads_before
    assert 201 in outcomes
    # Requests finish or are refused; none fails inside the service.
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
        app = create_app(settings, kms=recorder)
        async with serving(app) as (url, _), httpx.AsyncClient(base_url=url, timeout=10) as c:
            proxy.hold()
            async with httpx.AsyncClient(base_url=url) as leaving:
                request = asyncio.create_task(
                    leaving.post(
                        "/users",
                        json={"name": "L", "email": "l@example.com"},
                        headers={"X-Tenant": "leaver"},
                    )
                )
                await asyncio.wait_for(proxy.held.wait(), 10)  # the handler awaits KMS Encrypt
                request.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await request

            async def handler_cancelled() -> bool:
                return bool((await c.get("/stats")).json()["cancelled_requests"])

            async def kms_request_dropped() -> bool:
                return proxy.dropped_while_held >= 1

            await eventually(handler_cancelled)  # the middleware saw the disconnect
            assert (await c.get("/stats")).json()["cancelled_requests"] == 1
            if not dek_cache:
                # The KMS call itself was cancelled: its connection was dropped.
                await eventually(kms_request_dropped)
            proxy.release()

            # The same tenant (a cache entry whose loader was interrupted) and others work.
            for i in range(20):
                response = await c.post(
                    "/users",
                    json={"name": f"n{i}", "email": f"n{i}@example.com"},
                    headers={"X-Tenant": "leaver" if i % 2 else f"other{i}"},
                )
                assert response.status_code == 201, response.text
                user = response.json()
                tenant = "leaver" if i % 2 else f"other{i}"
                back = await c.get(f"/users/{user['id']}", headers={"X-Tenant": tenant})
                assert back.json() == user
            assert (await c.get("/healthz")).json()["ok"] is True
            after = (await c.get("/stats")).json()
            if dek_cache:
                assert after["dek_cache"]["encrypt"]["hits"] >= 9
    await recorder.assert_all_closed()
