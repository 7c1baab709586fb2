"""The S3 streaming example, for real: aiohttp on 127.0.0.1, moto's S3 and KMS, HTTP clients."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import aiohttp
import pytest
import pytest_asyncio
from aiobotocore.session import get_session
from aiohttp import web

from encx_async import Crypto, DecryptionError
from encx_async.providers import aws
from examples.s3_stream import PART_SIZE, Settings, Storage, create_app

BUCKET = "encrypted-objects"
ALIAS = "alias/my-app"
MIB = 1024 * 1024


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point every botocore client made inside at the test's moto server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return moto_endpoint


@pytest_asyncio.fixture(loop_scope="function")
async def service(aws_env: str) -> AsyncIterator[str]:
    """The example app on an ephemeral port, with its bucket and KEK made; yields its URL."""
    async with aws.KMSService() as kms:
        await kms.create_key("s3 example", alias=ALIAS)
    async with get_session().create_client("s3") as s3:
        await s3.create_bucket(Bucket=BUCKET)
    runner = web.AppRunner(create_app(Settings(bucket=BUCKET, kek_alias=ALIAS)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def body(size: int, seed: bytes) -> AsyncIterator[bytes]:
    """``size`` bytes, derived from ``seed``, sent 64 KiB at a time (chunked upload)."""
    block = hashlib.sha256(seed).digest() * 2048
    for at in range(0, size, len(block)):
        yield block[: min(len(block), size - at)]


def expected(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


async def raw_object(name: str) -> dict[str, object]:
    async with get_session().create_client("s3") as s3:
        reply = await s3.get_object(Bucket=BUCKET, Key=name)
        async with reply["Body"] as stream:
            data = await stream.read()
        return {"data": data, "etag": reply["ETag"]}


@pytest.mark.slow
async def test_large_upload_is_encrypted_in_parts_and_streams_back(service: str) -> None:
    size = 2 * PART_SIZE + 3 * MIB + 17
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{service}/objects/big.bin", data=body(size, b"big")) as reply:
            assert reply.status == 201, await reply.text()
            stored = (await reply.json())["stored_bytes"]
        stored_object = await raw_object("big.bin")
        data = stored_object["data"]
        assert isinstance(data, bytes)
        assert len(data) == stored > size
        assert data.startswith(b"EX")  # an encx-async envelope...
        assert expected(size, b"big")[:4096] not in data  # ...with no plaintext in it
        assert str(stored_object["etag"]).endswith('-3"')  # three multipart parts
        digest = hashlib.sha256()
        received = 0
        async with http.get(f"{service}/objects/big.bin") as reply:
            assert reply.status == 200
            async for chunk in reply.content.iter_chunked(MIB):
                digest.update(chunk)
                received += len(chunk)
        assert received == size
        assert digest.digest() == hashlib.sha256(expected(size, b"big")).digest()


async def test_small_objects_use_one_put(service: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{service}/objects/note.txt", data=b"a short note") as reply:
            assert reply.status == 201
        assert not str((await raw_object("note.txt"))["etag"]).endswith('-1"')
        async with http.get(f"{service}/objects/note.txt") as reply:
            assert reply.status == 200
            assert await reply.read() == b"a short note"
        async with http.put(f"{service}/objects/empty", data=b"") as reply:
            assert reply.status == 201
        async with http.get(f"{service}/objects/empty") as reply:
            assert await reply.read() == b""
        async with http.get(f"{service}/objects/missing") as reply:
            assert reply.status == 404


@pytest.mark.slow
async def test_a_copied_object_does_not_decrypt_under_another_name(service: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{service}/objects/a", data=b"for a only" * 1000) as reply:
            assert reply.status == 201
        async with get_session().create_client("s3") as s3:
            await s3.copy_object(Bucket=BUCKET, Key="b", CopySource={"Bucket": BUCKET, "Key": "a"})
        async with http.get(f"{service}/objects/b") as reply:
            assert reply.status == 422
            assert "for a only" not in await reply.text()


@pytest.mark.slow
async def test_a_cut_object_breaks_the_transfer_instead_of_ending_it(service: str) -> None:
    size = 3 * MIB
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{service}/objects/cut", data=body(size, b"cut")) as reply:
            assert reply.status == 201
        data = (await raw_object("cut"))["data"]
        assert isinstance(data, bytes)
        async with get_session().create_client("s3") as s3:
            await s3.put_object(Bucket=BUCKET, Key="cut", Body=data[: len(data) // 2])
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):  # noqa: PT012 (the read must fail)
            async with http.get(f"{service}/objects/cut") as reply:
                assert reply.status == 200  # the first part was authentic...
                async for chunk in reply.content.iter_chunked(MIB):
                    received += chunk
        # ...and only authentic bytes arrived before the transfer broke.
        assert 0 < len(received) < size
        assert expected(size, b"cut").startswith(bytes(received))


async def test_a_failed_upload_leaves_nothing_in_the_bucket(service: str) -> None:
    async def failing() -> AsyncIterator[bytes]:
        async for chunk in body(2 * PART_SIZE + MIB, b"x"):
            yield chunk
        raise ConnectionResetError("the client went away")

    async with AsyncExitStack() as stack:
        kms = await stack.enter_async_context(aws.KMSService())
        s3 = await stack.enter_async_context(get_session().create_client("s3"))
        crypto = await stack.enter_async_context(await Crypto.create(kms=kms, kek_alias=ALIAS))
        storage = Storage(crypto, s3, BUCKET)
        with pytest.raises(ConnectionResetError):
            await storage.put("partial", failing())
        uploads = await s3.list_multipart_uploads(Bucket=BUCKET)
        assert uploads.get("Uploads", []) == []
        listing = await s3.list_objects_v2(Bucket=BUCKET)
        assert [item["Key"] for item in listing.get("Contents", [])] == []
        # And a download of what never arrived is an error, not an empty file.
        await storage.put("whole", body(MIB, b"w"))
        await s3.put_object(Bucket=BUCKET, Key="whole", Body=os.urandom(100))
        with pytest.raises(DecryptionError):
            async for _chunk in storage.get("whole"):
                pass
