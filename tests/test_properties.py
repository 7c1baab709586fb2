"""Property tests: round trips for any input, and a parser that never misbehaves."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encx_async import Crypto, DecryptionError, DEKCache
from encx_async._envelope import parse
from encx_async.providers.local import LocalKMSService

ALIAS = "alias/property-test"
contexts = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=30), max_size=4)
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


async def _crypto() -> Crypto:
    kms = LocalKMSService()
    await kms.create_key("properties", alias=ALIAS)
    return await Crypto.create(
        kms=kms, kek_alias=ALIAS, dek_cache=DEKCache(), database="sqlite:///:memory:"
    )


@pytest.mark.slow
@fast
@given(data=st.binary(max_size=4096), context=contexts, aad=st.none() | st.binary(max_size=64))
def test_round_trip(data: bytes, context: dict[str, str], aad: bytes | None) -> None:
    async def run() -> None:
        crypto = await _crypto()
        blob = await crypto.encrypt(data, context=context, aad=aad)
        assert await crypto.decrypt(blob, context=context, aad=aad) == data
        await crypto.aclose()

    asyncio.run(run())


@fast
@given(blob=st.binary(max_size=2048))
def test_parser_fed_arbitrary_bytes_raises_only_decryption_error(blob: bytes) -> None:
    try:
        envelope = parse(blob)
    except DecryptionError:
        return
    assert 0 < len(envelope.wrapped_dek) <= 1024
    assert len(envelope.commitment) == 32
    assert len(envelope.header) + len(envelope.body) == len(blob)


@pytest.mark.slow
@fast
@given(prefix=st.binary(max_size=64), suffix=st.binary(max_size=64), flip=st.integers(0, 10**6))
def test_decrypt_of_mangled_blobs_raises_only_decryption_error(
    prefix: bytes, suffix: bytes, flip: int
) -> None:
    async def run() -> None:
        crypto = await _crypto()
        blob = bytearray(await crypto.encrypt(b"payload", context={"k": "v"}))
        blob[flip % len(blob)] ^= 1 + flip % 255
        for candidate in (bytes(blob), prefix + bytes(blob), bytes(blob) + suffix, prefix):
            try:
                await crypto.decrypt(candidate, context={"k": "v"})
            except DecryptionError:
                continue
            raise AssertionError("a mangled blob decrypted")
        await crypto.aclose()

    asyncio.run(run())
