"""Encrypted object storage: an aiohttp service that streams uploads, encrypted, into S3.

``PUT /objects/{name}``
    The request body is encrypted as it arrives (``crypto.encrypt_stream``) and
    sent to S3 as a multipart upload, so memory stays at about one part
    (:data:`PART_SIZE`) whatever the size of the upload. The object only
    appears in S3 once the upload completes: a failure aborts the multipart
    upload and leaves nothing behind.
``GET /objects/{name}``
    The object is read from S3 in chunks, decrypted as it arrives
    (``crypto.decrypt_stream``) and streamed to the client.

The encryption context names the bucket and the object, so a ciphertext copied
to another name does not decrypt: the context is checked by the KMS when it
unwraps the DEK, and authenticated by the cipher.

Run it with ``python -m examples.s3_stream``. Settings come from the
environment: ``ENCX_S3_BUCKET`` (required), ``ENCX_KEK_ALIAS`` (default
``alias/my-app``), ``ENCX_DATABASE`` (KEK versions; the library's default
otherwise), ``PORT`` (8080); region, credentials and endpoints come from
botocore's usual chain (``AWS_REGION``, ``AWS_ENDPOINT_URL``...).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiobotocore.session import AioSession, get_session
from aiohttp import web
from botocore.exceptions import ClientError

from encx_async import Crypto, DecryptionError, DEKCache
from encx_async.providers import aws

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

__all__ = ["PART_SIZE", "Settings", "Storage", "create_app", "main"]

#: S3 wants every part but the last to be at least 5 MiB.
PART_SIZE = 8 * 1024 * 1024
#: how much of the request body aiohttp hands over at a time
READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    bucket: str
    kek_alias: str = "alias/my-app"
    database: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        bucket = os.environ.get("ENCX_S3_BUCKET")
        if not bucket:
            raise SystemExit("set ENCX_S3_BUCKET to the bucket that holds the objects")
        return cls(
            bucket=bucket,
            kek_alias=os.environ.get("ENCX_KEK_ALIAS", "alias/my-app"),
            database=os.environ.get("ENCX_DATABASE"),
        )


def context_for(bucket: str, name: str) -> dict[str, str]:
    return {"bucket": bucket, "object": name}


class Storage:
    """Encrypted objects in one bucket: what the handlers call."""

    def __init__(self, crypto: Crypto, s3: S3Client, bucket: str) -> None:
        self.crypto = crypto
        self.s3 = s3
        self.bucket = bucket

    async def put(self, name: str, body: AsyncIterator[bytes]) -> int:
        """Encrypt ``body`` into the object ``name``; returns the ciphertext's size."""
        sealed = self.crypto.encrypt_stream(body, context=context_for(self.bucket, name))
        async with aclosing(sealed) as chunks:
            parts = _parts(chunks)
            first = await anext(parts, b"")
            second = await anext(parts, None)
            if second is None:  # small enough for one request
                await self.s3.put_object(Bucket=self.bucket, Key=name, Body=first)
                return len(first)
            return await self._multipart(name, first, second, parts)

    async def _multipart(
        self, name: str, first: bytes, second: bytes, rest: AsyncIterator[bytes]
    ) -> int:
        upload = await self.s3.create_multipart_upload(Bucket=self.bucket, Key=name)
        upload_id = upload["UploadId"]
        done: list[CompletedPartTypeDef] = []
        size = 0
        try:
            number = 0
            for part in (first, second):
                number += 1
                done.append(await self._upload_part(name, upload_id, number, part))
                size += len(part)
            async for part in rest:
                number += 1
                done.append(await self._upload_part(name, upload_id, number, part))
                size += len(part)
            await self.s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": done},
            )
        except BaseException:
            # Nothing half-written stays in the bucket (and S3 stops billing the parts).
            with contextlib.suppress(Exception):
                await self.s3.abort_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id
                )
            raise
        return size

    async def _upload_part(
        self, name: str, upload_id: str, number: int, data: bytes
    ) -> CompletedPartTypeDef:
        reply = await self.s3.upload_part(
            Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": reply["ETag"]}

    async def get(self, name: str) -> AsyncGenerator[bytes, None]:
        """The plaintext of the object ``name``, as it is read and authenticated."""
        reply = await self.s3.get_object(Bucket=self.bucket, Key=name)
        async with reply["Body"] as body:
            opened = self.crypto.decrypt_stream(
                body.iter_chunks(READ_SIZE), context=context_for(self.bucket, name)
            )
            async with aclosing(opened) as chunks:
                async for chunk in chunks:
                    yield chunk


async def _parts(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Regroup ``chunks`` into pieces of PART_SIZE bytes (the last may be shorter)."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while len(buffer) >= PART_SIZE:
            yield bytes(buffer[:PART_SIZE])
            del buffer[:PART_SIZE]
    if buffer:
        yield bytes(buffer)


STORAGE = web.AppKey("storage", Storage)


async def put_object(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    name = request.match_info["name"]
    size = await storage.put(name, request.content.iter_chunked(READ_SIZE))
    return web.json_response({"object": name, "stored_bytes": size}, status=201)


async def get_object(request: web.Request) -> web.StreamResponse:
    storage = request.app[STORAGE]
    name = request.match_info["name"]
    async with aclosing(storage.get(name)) as chunks:
        # The first piece proves the header, the DEK and the context before any
        # byte is sent, so those failures get a proper error status.
        try:
            first = await anext(chunks, b"")
        except DecryptionError:
            raise web.HTTPUnprocessableEntity(text="the object does not decrypt\n") from None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                raise web.HTTPNotFound(text=f"no object {name!r}\n") from None
            raise
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(first)
        # From here on a DecryptionError (a cut or altered object) propagates:
        # aiohttp drops the connection without ending the chunked body, so the
        # client sees a broken transfer, never a complete-looking one.
        async for chunk in chunks:
            await response.write(chunk)
    await response.write_eof()
    return response


def create_app(
    settings: Settings, *, session: AioSession | None = None, dek_cache: DEKCache | None = None
) -> web.Application:
    """The application; the KMS, S3 and Crypto open at startup and close at cleanup."""

    async def resources(app: web.Application) -> AsyncIterator[None]:
        shared = session or get_session()  # one botocore session for KMS and S3
        async with contextlib.AsyncExitStack() as stack:
            kms = await stack.enter_async_context(aws.KMSService(aws.Config(session=shared)))
            s3 = await stack.enter_async_context(shared.create_client("s3"))
            crypto = await stack.enter_async_context(
                await Crypto.create(
                    kms=kms,
                    kek_alias=settings.kek_alias,
                    database=settings.database,
                    dek_cache=dek_cache or DEKCache(),
                )
            )
            app[STORAGE] = Storage(crypto, s3, settings.bucket)
            yield

    app = web.Application()
    app.cleanup_ctx.append(resources)
    app.router.add_put("/objects/{name}", put_object)
    app.router.add_get("/objects/{name}", get_object)
    return app


def main() -> None:
    web.run_app(create_app(Settings.from_env()), port=int(os.environ.get("PORT", "8080")))


if __name__ == "__main__":
    main()
