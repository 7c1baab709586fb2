"""KMSService and the Secrets Manager pepper source against a faulty KMS.

The moto server sits behind :class:`~tests.faultproxy.FaultProxy`, which
stalls, resets or answers in its place. Each request gets one deadline
(``Config.call_timeout``) covering the wait for a pooled connection, the
attempts and the backoff; messages report the attempts botocore really made.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import anyio
import pytest
import pytest_asyncio
from botocore.exceptions import ClientError, EndpointConnectionError

from encx_async import _exceptions as errors
from encx_async.providers import _aws_client
from encx_async.providers.aws import Config, KMSService, SecretsManagerPepperSource
from tests.faultproxy import FaultProxy

REGION = "us-east-1"
DEK = bytes(range(7, 39))
ALIAS = "alias/faults"
# What a call may overrun its deadline by on a loaded machine: the event loop
# getting back to the task, and aiohttp closing the connection.
SLACK = 1.5

# Slow: these wait out deadlines, timeouts and botocore's backoff.
pytestmark = pytest.mark.slow


@pytest_asyncio.fixture(loop_scope="function")
async def key(moto_endpoint: str) -> str:
    """The ARN of a key with the alias ``ALIAS``, made on moto directly (no deadline to race)."""
    async with KMSService(Config(region=REGION, endpoint_url=moto_endpoint)) as admin:
        return await admin.create_key("faults", alias=ALIAS)


def config(proxy: FaultProxy, **overrides: Any) -> Config:
    options: dict[str, Any] = {"region": REGION, "endpoint_url": proxy.url}
    options.update(overrides)
    return Config(**options)


async def timed(call: Any) -> tuple[float, BaseException | None]:
    """Seconds ``call()`` took, and what it raised."""
    started = time.monotonic()
    try:
        await call()
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def attempts_in(message: str) -> int:
    match = re.search(r"after (\d+) attempt\(s\)", message)
    assert match is not None, message
    return int(match.group(1))


# -- the deadline ----------------------------------------------------------------------


async def test_stalled_kms_fails_every_call_at_the_deadline(
    fault_proxy: FaultProxy, key: str
) -> None:
    """More calls than pooled connections: the queued ones end at the deadline too."""
    deadline, pool, calls = 2.0, 2, 8
    # Per-attempt timeouts longer than the deadline: only the deadline can end a call.
    settings = config(
        fault_proxy,
        max_pool_connections=pool,
        max_attempts=2,
        connect_timeout=3,
        read_timeout=3,
        call_timeout=deadline,
    )
    async with KMSService(settings) as kms:
        fault_proxy.stall()
        before = fault_proxy.requests
        pending = asyncio.gather(*(timed(lambda: kms.encrypt_dek(key, DEK)) for _ in range(calls)))
        await fault_proxy.wait_requests(before + pool)
        await asyncio.sleep(0.3)
        # The other calls wait for a pooled connection, not on the wire.
        assert fault_proxy.requests == before + pool
        results = await pending
        for elapsed, exc in results:
            assert isinstance(exc, errors.KMSUnavailableError)
            assert deadline * 0.9 <= elapsed < deadline + SLACK, elapsed
            message = str(exc)
            assert "KMS Encrypt on " in message
            assert "ran out of its 2 s deadline (Config.call_timeout)" in message
            assert "after 1 attempt(s), the last still unanswered" in message
            assert fault_proxy.url in message
            assert DEK.hex() not in message
        # The timed-out calls gave their connections back.
        fault_proxy.pass_through()
        with anyio.fail_after(5):
            assert await kms.get_key_id(ALIAS) == key


async def test_default_deadline_bounds_a_queue_for_the_pool(
    fault_proxy: FaultProxy, key: str
) -> None:
    """Without call_timeout the deadline is max_attempts * (connect + read) + backoff."""
    settings = config(
        fault_proxy, max_pool_connections=1, max_attempts=2, connect_timeout=0.2, read_timeout=0.3
    )
    deadline = 2 * (0.2 + 0.3) + 1.0  # at most 1 s of backoff before the second attempt
    async with KMSService(settings) as kms:
        fault_proxy.stall()
        # Ten calls need 20 read timeouts (6 s) on the one connection: most
        # of them can only end at the deadline.
        results = await asyncio.gather(
            *(timed(lambda: kms.encrypt_dek(key, DEK)) for _ in range(10))
        )
    for elapsed, exc in results:
        assert isinstance(exc, errors.KMSUnavailableError)
        assert elapsed < deadline + SLACK, elapsed
    assert any("deadline (Config.call_timeout)" in str(exc) for _, exc in results)


def test_default_deadline_is_derived_from_the_client_limits() -> None:
    def derived(**options: Any) -> float:
        settings = Config(**options)
        return _aws_client.call_timeout(settings, settings.build_client_config())

    assert derived() == 3 * (5 + 10) + 1 + 2
    assert derived(max_attempts=1, connect_timeout=1, read_timeout=2) == 3
    assert (
        derived(max_attempts=7, connect_timeout=1, read_timeout=1) == 14 + 1 + 2 + 4 + 8 + 16 + 20
    )
    # Legacy mode's backoff has no 20 s cap.
    legacy = derived(max_attempts=7, connect_timeout=1, read_timeout=1, retry_mode="legacy")
    assert legacy == 14 + 1 + 2 + 4 + 8 + 16 + 32
    assert derived(call_timeout=2.5, max_attempts=9) == 2.5


@pytest.mark.parametrize("value", [0, -1, "1", True])
def test_call_timeout_must_be_positive(value: Any) -> None:
    with pytest.raises(errors.ConfigurationError, match="call_timeout"):
        Config(call_timeout=value)


async def test_cancelled_caller_releases_its_pool_slot(fault_proxy: FaultProxy, key: str) -> None:
    async with KMSService(config(fault_proxy, max_pool_connections=1, call_timeout=60)) as kms:
        fault_proxy.stall()
        sent = fault_proxy.requests
        stuck = asyncio.create_task(kms.encrypt_dek(key, DEK))
        with anyio.fail_after(5):
            await fault_proxy.wait_requests(sent + 1)  # it holds the one connection
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        fault_proxy.pass_through()
        with anyio.fail_after(5):
            wrapped = await kms.encrypt_dek(key, DEK)
            assert await kms.decrypt_dek(key, wrapped) == DEK


async def test_slow_answers_end_at_the_deadline(fault_proxy: FaultProxy, key: str) -> None:
    fault_proxy.latency = 0.25
    async with KMSService(config(fault_proxy)) as patient:
        elapsed, exc = await timed(lambda: patient.get_key_id(ALIAS))
    assert exc is None
    assert elapsed >= 0.25
    fault_proxy.latency = 3.0
    async with KMSService(config(fault_proxy, read_timeout=10, call_timeout=0.5)) as kms:
        elapsed, exc = await timed(lambda: kms.encrypt_dek(key, DEK))
    assert isinstance(exc, errors.KMSUnavailableError)
    assert not isinstance(exc, errors.SecretsManagerError)
    assert 0.45 <= elapsed < 0.5 + SLACK
    assert "after 1 attempt(s), the last still unanswered" in str(exc)


async def test_deadline_covers_the_secrets_manager_source(fault_proxy: FaultProxy) -> None:
    settings = config(fault_proxy, max_attempts=2, read_timeout=5, call_timeout=0.5)
    async with SecretsManagerPepperSource(settings) as source:
        fault_proxy.stall()
        elapsed, exc = await timed(lambda: source.load("app/pepper"))
    assert isinstance(exc, errors.SecretsManagerUnavailableError)
    assert isinstance(exc, errors.KMSUnavailableError)  # as before the Secrets Manager family
    assert 0.45 <= elapsed < 0.5 + SLACK
    message = str(exc)
    assert "Secrets Manager GetSecretValue on secret 'app/pepper'" in message
    assert "ran out of its 0.5 s deadline (Config.call_timeout) after 1 attempt(s)" in message


# -- attempts reported -----------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 3])
async def test_server_errors_report_every_attempt(
    fault_proxy: FaultProxy, max_attempts: int
) -> None:
    fault_proxy.error(500, "KMSInternalException")
    async with KMSService(config(fault_proxy, max_attempts=max_attempts)) as kms:
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await kms.encrypt_dek(ALIAS, DEK)
    assert fault_proxy.requests == max_attempts
    assert attempts_in(str(caught.value)) == max_attempts
    cause = caught.value.__cause__
    assert isinstance(cause, ClientError)
    assert cause.response["ResponseMetadata"]["RetryAttempts"] == max_attempts - 1


async def test_error_botocore_does_not_retry_reports_one_attempt(
    fault_proxy: FaultProxy,
) -> None:
    # Unavailable to us, but a 400 is not a transient error to botocore.
    fault_proxy.error(400, "DependencyTimeoutException")
    async with KMSService(config(fault_proxy, max_attempts=3)) as kms:
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await kms.encrypt_dek(ALIAS, DEK)
    assert fault_proxy.requests == 1
    assert attempts_in(str(caught.value)) == 1


async def test_rejected_request_is_sent_once(
    fault_proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="encx_async.kms")
    fault_proxy.error(400, "ValidationException", "1 validation error detected")
    async with KMSService(config(fault_proxy, max_attempts=3)) as kms:
        with pytest.raises(errors.KMSError) as caught:
            await kms.encrypt_dek(ALIAS, DEK)
    assert type(caught.value) is errors.KMSError
    assert caught.value.code == "ValidationException"
    assert fault_proxy.requests == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "encx_async.kms"]
    assert any(
        line.startswith("KMS Encrypt ") and "failed after 1 attempt(s)" in line for line in lines
    )


async def test_throttling_is_retried_and_reported(
    fault_proxy: FaultProxy, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="encx_async.kms")
    async with KMSService(config(fault_proxy, max_attempts=3)) as kms:
        before = fault_proxy.requests
        fault_proxy.throttle()
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await kms.encrypt_dek(key, DEK)
        assert fault_proxy.requests - before == 3
        assert attempts_in(str(caught.value)) == 3
        assert caught.value.code == "ThrottlingException"

        # Throttled twice, then answered: the third attempt succeeds.
        fault_proxy.throttle(times=2)
        before = fault_proxy.requests
        wrapped = await kms.encrypt_dek(key, DEK)
        assert fault_proxy.requests - before == 3
        assert await kms.decrypt_dek(key, wrapped) == DEK
    lines = [r.getMessage() for r in caplog.records if r.name == "encx_async.kms"]
    assert any(
        line.startswith("KMS Encrypt ") and "ok after 3 attempt(s)" in line for line in lines
    )


async def test_spent_retry_quota_leaves_one_attempt(fault_proxy: FaultProxy) -> None:
    """Standard mode's retry quota (500 units, 5 per retry of a 5xx) runs dry in an outage."""
    fault_proxy.error(503, "ServiceUnavailableException")
    async with KMSService(config(fault_proxy, max_attempts=3, max_pool_connections=20)) as kms:
        # 60 failing calls want 120 retries; the quota pays for 100 of them.
        outage = await asyncio.gather(
            *(kms.encrypt_dek(ALIAS, DEK) for _ in range(60)), return_exceptions=True
        )
        assert all(isinstance(exc, errors.KMSUnavailableError) for exc in outage)
        reported = [attempts_in(str(exc)) for exc in outage]
        assert fault_proxy.requests == 60 + 100
        assert sum(reported) == fault_proxy.requests
        assert min(reported) < 3 == max(reported)

        # With the quota spent, a failing call makes its first attempt only.
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await kms.encrypt_dek(ALIAS, DEK)
        assert attempts_in(str(caught.value)) == 1
        assert fault_proxy.requests == 161

        # Errors without a response are counted from the client's events.
        fault_proxy.reset()
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await kms.encrypt_dek(ALIAS, DEK)
        assert isinstance(caught.value.__cause__, EndpointConnectionError)
        assert "gave up after 1 attempt(s)" in str(caught.value)
        assert fault_proxy.requests == 162


async def test_reset_connections_report_every_attempt(fault_proxy: FaultProxy) -> None:
    fault_proxy.reset()
    async with KMSService(config(fault_proxy, max_attempts=3)) as kms:
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await kms.get_key_id(ALIAS)
    assert isinstance(caught.value.__cause__, EndpointConnectionError)
    assert "gave up after 3 attempt(s)" in str(caught.value)
    assert fault_proxy.requests == 3


async def test_secrets_manager_reports_the_attempts_made(fault_proxy: FaultProxy) -> None:
    fault_proxy.error(400, "InternalServiceError")  # not retried by botocore at 400
    async with SecretsManagerPepperSource(config(fault_proxy, max_attempts=3)) as source:
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await source.load("app/pepper")
        assert attempts_in(str(caught.value)) == 1
        fault_proxy.error(500, "InternalServiceError")
        with pytest.raises(errors.SecretsManagerUnavailableError) as caught:
            await source.load("app/pepper")
        assert attempts_in(str(caught.value)) == 3
    assert fault_proxy.requests == 4


# -- the proxy itself ------------------------------------------------------------------


async def raw_request(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    return reader, writer


async def test_proxy_faults_for_a_number_of_requests(moto_endpoint: str) -> None:
    async with FaultProxy(moto_endpoint) as proxy:
        proxy.respond(418, b"teapot", content_type="text/plain", times=2)
        reader, writer = await raw_request(proxy.url)
        for _ in range(2):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 418 ")
            assert await reader.readexactly(6) == b"teapot"
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        # The third request goes to moto, which closes the connection after answering.
        head = await reader.readuntil(b"\r\n\r\n")
        assert not head.startswith(b"HTTP/1.1 418 ")
        writer.close()
        await writer.wait_closed()
        assert proxy.requests == 3


async def test_proxy_reset_sends_a_tcp_reset(moto_endpoint: str) -> None:
    async with FaultProxy(moto_endpoint) as proxy:
        proxy.reset()
        reader, writer = await raw_request(proxy.url)
        with pytest.raises(ConnectionResetError):
            await reader.read(100)
        writer.close()
        with pytest.raises(ConnectionResetError):
            await writer.wait_closed()


async def test_proxy_closes_the_connections_it_holds(moto_endpoint: str) -> None:
    proxy = FaultProxy(moto_endpoint)
    await proxy.start()
    proxy.stall()
    reader, writer = await raw_request(proxy.url)
    await proxy.wait_requests(1)
    await proxy.aclose()
    with anyio.fail_after(5):
        assert await reader.read(100) == b""
    writer.close()
    await writer.wait_closed()


def test_proxy_refuses_a_remote_upstream() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://192.0.2.1:80")
