"""Crypto.check(): the readiness probe asks the KMS about the current KEK, decrypts nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

import pytest
from aiobotocore.session import AioSession
from moto.server import ThreadedMotoServer

from benchmarks._delegating import DelegatingKMS
from encx_async import ClosedError, ConfigurationError, Crypto, DEKCache, KeyManagementService
from encx_async.providers.aws import Config, KMSService
from encx_async.providers.local import LocalKMSService

from .conftest import TEST_ALIAS, TEST_REGION, KeyFactory
from .support import GatedKMS

MEMORY_DB = "sqlite:///:memory:"


async def open_crypto(kms: KeyManagementService) -> Crypto:
    return await Crypto.create(
        kms=kms, kek_alias=TEST_ALIAS, dek_cache=DEKCache(), database=MEMORY_DB
    )


async def test_a_healthy_key_is_ok_on_both_providers(
    kms: KeyManagementService, make_key: KeyFactory
) -> None:
    key = await make_key(kms, TEST_ALIAS)
    async with await open_crypto(kms) as crypto:
        before = crypto.stats().kms_calls
        report = await crypto.check()
        assert report.ok
        assert report.reachable
        assert report.key_state == "Enabled"
        assert report.method == "describe_key"
        assert report.kek_alias == TEST_ALIAS
        assert report.kek_version == 1
        assert report.key_id == key["canonical"] == crypto.key_id
        assert report.error is None
        assert report.latency_ms > 0
        after = crypto.stats().kms_calls
        # One DescribeKey, counted; no data key unwrapped or wrapped.
        assert after["describe_key"] == before.get("describe_key", 0) + 1
        assert after.get("decrypt_dek", 0) == before.get("decrypt_dek", 0)
        assert after.get("encrypt_dek", 0) == before.get("encrypt_dek", 0)
        assert report.as_dict()["key_state"] == "Enabled"


async def _disable(endpoint: str, key_id: str) -> None:
    session = AioSession()
    async with session.create_client(
        "kms", region_name=TEST_REGION, endpoint_url=endpoint
    ) as client:
        await client.disable_key(KeyId=key_id)


async def test_a_disabled_key_is_not_ok_and_logged_without_secrets(
    aws_kms: KMSService,
    make_key: KeyFactory,
    moto_endpoint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = await make_key(aws_kms, TEST_ALIAS)
    async with await open_crypto(aws_kms) as crypto:
        await crypto.encrypt(b"top secret", context={"tenant": "t"})
        await _disable(moto_endpoint, key["key_id"])
        with caplog.at_level(logging.WARNING, logger="encx_async.health"):
            report = await crypto.check()
    assert not report.ok
    assert report.reachable
    assert report.key_state == "Disabled"
    assert report.error is not None
    assert "Disabled" in report.error
    (record,) = [r for r in caplog.records if r.name == "encx_async.health"]
    message = record.getMessage()
    assert key["canonical"] in message
    assert "version 1" in message
    assert "top secret" not in message


@pytest.mark.slow
async def test_an_unreachable_kms_is_reported_not_raised(
    make_key: KeyFactory, moto_endpoint: str
) -> None:
    # A server of its own, to stop; moto's state is per process, and moto_endpoint reset it.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    config = Config(
        region=TEST_REGION,
        endpoint_url=f"http://{host}:{port}",
        max_attempts=1,
        connect_timeout=1.0,
    )
    stopped = False
    try:
        async with KMSService(config) as kms:
            await make_key(kms, TEST_ALIAS)
            async with await open_crypto(kms) as crypto:
                server.stop()
                stopped = True
                report = await crypto.check(timeout=5.0)
    finally:
        if not stopped:
            server.stop()
    assert not report.ok
    assert not report.reachable
    assert report.key_state is None
    assert report.error is not None
    assert report.error.startswith("KMSUnavailableError")


class _SlowDescribe(GatedKMS):
    """A provider whose describe_key waits at the gate."""

    async def describe_key(self, key_ref: str) -> Mapping[str, object]:
        await self._enter()
        assert isinstance(self.inner, LocalKMSService)
        return await self.inner.describe_key(key_ref)


async def test_a_kms_slower_than_the_timeout_is_not_ok() -> None:
    async with LocalKMSService() as local:
        await local.create_key("health", alias=TEST_ALIAS)
        gated = _SlowDescribe(local)
        async with await open_crypto(gated) as crypto:
            gated.gate.clear()
            report = await crypto.check(timeout=0.05)
            assert not report.ok
            assert not report.reachable
            assert report.error is not None
            assert "within 0.05 s" in report.error
            gated.gate.set()
            assert (await crypto.check()).ok  # the next probe is unaffected


class _NoDescribe(DelegatingKMS):
    """A provider with only the KeyManagementService methods (no describe_key)."""

    def __init__(self, inner: LocalKMSService) -> None:
        super().__init__(inner)
        self.wrapped: list[bytes] = []
        self.unwrapped = 0

    async def before(self, operation: str, data: bytes) -> None:
        if operation == "encrypt_dek":
            self.wrapped.append(data)
        else:
            self.unwrapped += 1


async def test_a_provider_without_describe_key_is_checked_by_a_throwaway_wrap() -> None:
    async with LocalKMSService() as local:
        await local.create_key("health", alias=TEST_ALIAS)
        provider = _NoDescribe(local)
        async with await open_crypto(provider) as crypto:
            report = await crypto.check()
            assert report.ok
            assert report.reachable
            assert report.method == "encrypt_dek"
            assert report.key_state is None
            assert len(provider.wrapped) == 1
            assert len(provider.wrapped[0]) == 32
            assert provider.unwrapped == 0
            assert crypto.stats().kms_calls["encrypt_dek"] == 1


@pytest.fixture
async def local_crypto() -> AsyncIterator[Crypto]:
    async with LocalKMSService() as local:
        await local.create_key("health", alias=TEST_ALIAS)
        async with await open_crypto(local) as crypto:
            yield crypto


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan"), True, "1"])
async def test_the_timeout_must_be_positive(local_crypto: Crypto, seconds: object) -> None:
    with pytest.raises(ConfigurationError, match="timeout"):
        await local_crypto.check(timeout=seconds)  # type: ignore[arg-type]


async def test_check_after_aclose_raises_closed() -> None:
    async with LocalKMSService() as local:
        await local.create_key("health", alias=TEST_ALIAS)
        crypto = await open_crypto(local)
        await crypto.aclose()
        with pytest.raises(ClosedError):
            await crypto.check()


async def test_a_cancelled_check_leaves_the_crypto_usable() -> None:
    async with LocalKMSService() as local:
        await local.create_key("health", alias=TEST_ALIAS)
        gated = _SlowDescribe(local)
        async with await open_crypto(gated) as crypto:
            gated.gate.clear()
            task = asyncio.create_task(crypto.check())
            await gated.entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gated.gate.set()
            blob = await crypto.encrypt(b"x")
            assert await crypto.decrypt(blob) == b"x"
            assert (await crypto.check()).ok


class _BrokenDescribe(GatedKMS):
    """A provider of someone else's whose describe_key lets a foreign error through."""

    async def describe_key(self, key_ref: str) -> Mapping[str, object]:
        raise OSError(f"socket trouble while asking about {key_ref} with token s3cr3t")


async def test_a_foreign_error_from_the_provider_is_reported_without_its_message() -> None:
    async with LocalKMSService() as local:
        await local.create_key("health", alias=TEST_ALIAS)
        async with await open_crypto(_BrokenDescribe(local)) as crypto:
            report = await crypto.check()
    assert not report.ok
    assert not report.reachable
    assert report.error == "OSError from _BrokenDescribe.describe_key"
    assert "s3cr3t" not in repr(report)


async def test_a_key_pending_deletion_is_not_ok(
    aws_kms: KMSService, make_key: KeyFactory, moto_endpoint: str
) -> None:
    # moto reports the state through DescribeKey though it still lets the key encrypt.
    key = await make_key(aws_kms, TEST_ALIAS)
    async with await open_crypto(aws_kms) as crypto:
        session = AioSession()
        async with session.create_client(
            "kms", region_name=TEST_REGION, endpoint_url=moto_endpoint
        ) as client:
            await client.schedule_key_deletion(KeyId=key["key_id"], PendingWindowInDays=7)
        report = await crypto.check()
    assert not report.ok
    assert report.reachable
    assert report.key_state == "PendingDeletion"
    assert report.error == f"KMS key {key['canonical']} is PendingDeletion, not Enabled"
