"""Every DecryptionError from a ciphertext says the same thing; only `reason` differs.

Someone holding an envelope and a service that passes error messages on must
not learn which check failed: if a wrong context read differently from a
tampered body, each guess of a context could be confirmed one request at a time.
"""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from encx_async import (
    Crypto,
    DecryptionError,
    DEKCache,
    KeyManagementService,
    KeyVersionError,
    SealedRecord,
)
from encx_async._aead import COMMITMENT_SIZE
from encx_async._envelope import parse

ALIAS = "alias/oracle-test"
CTX = {"tenant": "acme"}


@pytest_asyncio.fixture(loop_scope="function", params=["uncached", "cached"])
async def crypto(
    request: pytest.FixtureRequest, kms: KeyManagementService
) -> AsyncIterator[Crypto]:
    await kms.create_key("oracle test", alias=ALIAS)
    cache = DEKCache() if request.param == "cached" else None
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=cache) as c:
        yield c


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 1
    return bytes(out)


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


async def test_every_failed_check_reads_the_same(crypto: Crypto) -> None:
    small = await crypto.encrypt(b"078-05-1120", context=CTX, aad=b"row:1")
    large = await crypto.encrypt(bytes(300 * 1024), context=CTX, aad=b"row:1")
    record = await crypto.seal_record({"ssn": b"078-05-1120"}, context=CTX, aad=b"row:1")
    commitment_at = parse(small).body_at - COMMITMENT_SIZE
    wrapped_at = commitment_at - 1  # the wrapped DEK's last byte

    def decrypt(
        blob: bytes, context: dict[str, str] = CTX, aad: bytes = b"row:1"
    ) -> Awaitable[bytes]:
        return crypto.decrypt(blob, context=context, aad=aad)

    attempts: dict[str, Callable[[], Awaitable[object]]] = {
        "wrong context": lambda: decrypt(small, {"tenant": "other"}),
        "wrong aad": lambda: decrypt(small, aad=b"row:2"),
        "tampered body": lambda: decrypt(flip(small, -1)),
        "tampered large body": lambda: decrypt(flip(large, -1)),
        "forged commitment": lambda: decrypt(flip(small, commitment_at)),
        "tampered wrapped key": lambda: decrypt(flip(small, wrapped_at)),
        "truncated": lambda: decrypt(small[:-1]),
        "cut inside the header": lambda: decrypt(small[:10]),
        "bad magic": lambda: decrypt(flip(small, 0)),
        "unknown format version": lambda: decrypt(flip(small, 2)),
        "stream, wrong context": lambda: collect(
            crypto.decrypt_stream([large], context={"tenant": "other"}, aad=b"row:1")
        ),
        "stream, truncated": lambda: collect(
            crypto.decrypt_stream([large[:-5]], context=CTX, aad=b"row:1")
        ),
        "record, wrong aad": lambda: crypto.open_record(record, context=CTX, aad=b"row:2"),
        "record, field renamed": lambda: crypto.open_record(
            SealedRecord(record.header, {"name": record.fields["ssn"]}), context=CTX, aad=b"row:1"
        ),
    }
    reasons: dict[str, str] = {}
    for name, attempt in attempts.items():
        with pytest.raises(DecryptionError) as caught:
            await attempt()
        error = caught.value
        assert type(error) is DecryptionError, name
        assert str(error) == DecryptionError.MESSAGE, name
        assert error.args == (DecryptionError.MESSAGE,), name  # what a repr shows
        assert error.reason, name
        assert error.reason != DecryptionError.MESSAGE, name
        reasons[name] = error.reason
    # The reasons do tell the checks apart: they are for the server's logs.
    assert reasons["wrong context"] != reasons["tampered body"]
    assert reasons["forged commitment"] != reasons["tampered body"]
    assert reasons["bad magic"] != reasons["truncated"]


def test_the_reason_survives_pickling_and_stays_out_of_the_message() -> None:
    sent = pickle.dumps(DecryptionError("the AES-GCM body failed authentication"))
    error = pickle.loads(sent)  # noqa: S301 (our own bytes)
    assert type(error) is DecryptionError
    assert error.reason == "the AES-GCM body failed authentication"
    assert "AES-GCM" not in str(error)
    assert "AES-GCM" not in repr(error)


def test_key_version_errors_keep_a_precise_message() -> None:
    # They name a version, written in clear in every header, and the store's
    # state, which an operator must act on; nothing about keys or contexts.
    error = KeyVersionError("KEK version 3 of alias 'alias/a' is retired")
    assert str(error) == error.reason == "KEK version 3 of alias 'alias/a' is retired"
    assert isinstance(error, DecryptionError)
