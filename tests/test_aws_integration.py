"""Round trips against real AWS KMS.

Skipped unless ``TEST_KMS_KEY_ID`` names a symmetric key (alias, id or ARN)
and AWS credentials are available. ``TEST_KMS_REGION`` optionally picks the
region; otherwise the key ARN's region or the default chain is used. Run with
``pytest -m integration tests/test_aws_integration.py``.

The caller needs kms:DescribeKey, kms:Encrypt and kms:Decrypt on the key.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiobotocore.session import AioSession

from encx_async import _exceptions as errors
from encx_async.providers.aws import Config, KMSService, MultiRegionKMSService

pytestmark = pytest.mark.integration

# The moto fixtures replace the AWS environment with fake credentials for the
# rest of the session, so remember the real one as it was at import time.
_AWS_ENV_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
)
_ENV_AT_IMPORT = {name: os.environ.get(name) for name in _AWS_ENV_NAMES}
KEY = os.environ.get("TEST_KMS_KEY_ID")
REGION = os.environ.get("TEST_KMS_REGION")


def _region_for(key: str) -> str | None:
    if REGION:
        return REGION
    parts = key.split(":")
    if key.startswith("arn:") and len(parts) > 3 and parts[3]:
        return parts[3]
    return None


@pytest_asyncio.fixture(loop_scope="function")
async def real_kms(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[KMSService, str]]:
    if not KEY:
        pytest.skip("TEST_KMS_KEY_ID is not set")
    for name, value in _ENV_AT_IMPORT.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    session = AioSession()
    if await session.get_credentials() is None:
        pytest.skip("no AWS credentials found")
    async with KMSService(Config(region=_region_for(KEY), session=session)) as kms:
        yield kms, KEY


async def test_round_trip_against_real_kms(real_kms: tuple[KMSService, str]) -> None:
    kms, key = real_kms
    arn = await kms.get_key_id(key)
    assert arn.startswith("arn:")
    dek = secrets.token_bytes(32)
    context = {"purpose": "encx-async integration test"}
    wrapped = await kms.encrypt_dek(arn, dek, context=context)
    assert await kms.decrypt_dek(arn, wrapped, context=context) == dek
    with pytest.raises(errors.DecryptionError):
        await kms.decrypt_dek(arn, wrapped, context={"purpose": "something else"})


async def test_unknown_alias_against_real_kms(real_kms: tuple[KMSService, str]) -> None:
    kms, _ = real_kms
    missing = f"alias/encx-async-missing-{secrets.token_hex(4)}"
    with pytest.raises(errors.KMSKeyNotFoundError, match=missing):
        await kms.get_key_id(missing)


# -- multi-region keys --------------------------------------------------------------
# TEST_KMS_MRK_ARN names the primary of a multi-region key (its ARN, which says the
# primary's region) and TEST_KMS_MRK_REPLICA_REGION a region holding a replica of it.
# The caller needs kms:Encrypt in the primary's region and kms:Decrypt in the replica's.

MRK = os.environ.get("TEST_KMS_MRK_ARN")
MRK_REPLICA_REGION = os.environ.get("TEST_KMS_MRK_REPLICA_REGION")


async def test_multi_region_key_unwraps_through_its_replica(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not MRK or not MRK_REPLICA_REGION:
        pytest.skip("TEST_KMS_MRK_ARN and TEST_KMS_MRK_REPLICA_REGION are not set")
    for name, value in _ENV_AT_IMPORT.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    session = AioSession()
    if await session.get_credentials() is None:
        pytest.skip("no AWS credentials found")
    primary_region = MRK.split(":")[3]
    dek = secrets.token_bytes(32)
    context = {"purpose": "encx-async multi-region integration test"}
    # The replica's region is nearest: unwraps go there, wraps to the primary.
    async with MultiRegionKMSService.from_regions(
        [MRK_REPLICA_REGION, primary_region],
        Config(session=session),
        mode="replicas",
        primary=primary_region,
    ) as kms:
        wrapped = await kms.encrypt_dek(MRK, dek, context=context)
        assert await kms.decrypt_dek(MRK, wrapped, context=context) == dek
        stats = kms.stats()
        assert stats.region(primary_region).calls == 1
        assert stats.region(MRK_REPLICA_REGION).calls == 1
        # The replica's own service, given the primary's ARN, unwraps it too.
        replica = kms.service(MRK_REPLICA_REGION)
        assert await replica.decrypt_dek(MRK, wrapped, context=context) == dek
        with pytest.raises(errors.DecryptionError):
            await replica.decrypt_dek(MRK, wrapped, context={"purpose": "something else"})
