"""The Crypto facade on a real (local) KMS: round trips, binding, tampering, lifecycle."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from encx_async import (
    ClosedError,
    ConfigurationError,
    Crypto,
    DataKey,
    DecryptionError,
    DEKCache,
    KMSKeyNotFoundError,
)
from encx_async._envelope import BODY_GCM, BODY_STREAM, parse
from encx_async.providers.local import LocalKMSService

ALIAS = "alias/crypto-test"
CTX = {"tenant": "acme", "table": "users"}
PEPPER = bytes(range(1, 33))


@pytest.fixture
async def kms() -> AsyncIterator[LocalKMSService]:
    async with LocalKMSService() as service:
        await service.create_key("crypto tests", alias=ALIAS)
        yield service


@pytest.fixture(params=["uncached", "cached"])
async def crypto(request: pytest.FixtureRequest, kms: LocalKMSService) -> AsyncIterator[Crypto]:
    cache = DEKCache() if request.param == "cached" else None
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=cache) as c:
        yield c


@pytest.mark.parametrize("size", [0, 1, 1024, 128 * 1024 - 1, 128 * 1024, 3 * 1024 * 1024 + 7])
async def test_round_trip_at_every_size(crypto: Crypto, size: int) -> None:
    data = os.urandom(size)
    blob = await crypto.encrypt(data, context=CTX, aad=b"user:42")
    assert await crypto.decrypt(blob, context=CTX, aad=b"user:42") == data
    expected_body = BODY_GCM if size < 128 * 1024 else BODY_STREAM
    assert parse(blob).body_kind == expected_body
    assert parse(blob).kek_version == 1


async def test_context_order_does_not_matter(crypto: Crypto) -> None:
    blob = await crypto.encrypt(b"x", context={"a": "1", "b": "2"})
    assert await crypto.decrypt(blob, context={"b": "2", "a": "1"}) == b"x"


@pytest.mark.parametrize("size", [10, 300_000])
async def test_wrong_context_or_aad_fails(crypto: Crypto, size: int) -> None:
    data = os.urandom(size)
    blob = await crypto.encrypt(data, context=CTX, aad=b"user:42")
    for kwargs in (
        {"context": CTX, "aad": b"user:43"},
        {"context": CTX},
        {"context": {**CTX, "tenant": "other"}, "aad": b"user:42"},
        {"aad": b"user:42"},
    ):
        with pytest.raises(DecryptionError):
            await crypto.decrypt(blob, **kwargs)


@pytest.mark.parametrize("size", [10, 300_000])
async def test_every_flipped_bit_region_is_detected(crypto: Crypto, size: int) -> None:
    blob = await crypto.encrypt(os.urandom(size), context=CTX)
    step = max(1, len(blob) // 97)
    for i in range(0, len(blob), step):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(DecryptionError):
            await crypto.decrypt(bytes(tampered), context=CTX)


async def test_truncation_and_garbage_give_decryption_error(crypto: Crypto) -> None:
    blob = await crypto.encrypt(b"some secret", context=CTX)
    for bad in (b"", b"EX", blob[:10], blob[:-1], blob + b"\x00", os.urandom(200)):
        with pytest.raises(DecryptionError):
            await crypto.decrypt(bad, context=CTX)
    large = await crypto.encrypt(os.urandom(200_000), context=CTX)
    for bad in (large[:-1], large[: len(large) // 2], large + b"junk"):
        with pytest.raises(DecryptionError):
            await crypto.decrypt(bad, context=CTX)


async def test_key_commitment_rejects_a_swapped_commitment(crypto: Crypto) -> None:
    a = parse(await crypto.encrypt(b"a", context=CTX))
    b = parse(await crypto.encrypt(b"b", context={"tenant": "other"}))
    assert bytes(a.commitment) != bytes(b.commitment)
    blob = bytes(a.header[: -len(a.commitment)]) + bytes(b.commitment) + bytes(a.body)
    with pytest.raises(DecryptionError):
        await crypto.decrypt(blob, context=CTX)


async def test_unknown_kek_version_is_a_decryption_error(crypto: Crypto) -> None:
    blob = bytearray(await crypto.encrypt(b"x"))
    blob[4:8] = (7).to_bytes(4, "big")
    with pytest.raises(DecryptionError, match="version 7"):
        await crypto.decrypt(bytes(blob))


async def test_low_level_api_round_trip(crypto: Crypto) -> None:
    dek = crypto.generate_dek()
    for size in (0, 1024, 512 * 1024):
        data = os.urandom(size)
        ct = await crypto.encrypt_data(data, dek, aad=b"row-1")
        assert len(ct) == size + 28
        assert await crypto.decrypt_data(ct, dek, aad=b"row-1") == data
        with pytest.raises(DecryptionError):
            await crypto.decrypt_data(ct, dek, aad=b"row-2")
        with pytest.raises(DecryptionError):
            await crypto.decrypt_data(ct, crypto.generate_dek(), aad=b"row-1")
    wrapped = await crypto.encrypt_dek(dek, context=CTX)
    assert await crypto.decrypt_dek(wrapped, context=CTX) == dek
    with pytest.raises(DecryptionError):
        await crypto.decrypt_dek(wrapped, context={"tenant": "x"})
    with pytest.raises(DecryptionError):
        await crypto.decrypt_data(b"short", dek)


async def test_bad_input_types_are_clear(crypto: Crypto) -> None:
    with pytest.raises(TypeError, match="plaintext must be bytes-like, not str"):
        await crypto.encrypt("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ciphertext is bytes"):
        await crypto.decrypt("text")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        await crypto.encrypt(b"x", context={"tenant": 1})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError):
        await crypto.encrypt(b"x", context={"": "v"})
    with pytest.raises(ConfigurationError):
        await crypto.encrypt(b"x", context={"k": "\ud800"})
    with pytest.raises(ConfigurationError):
        await crypto.encrypt(b"x", context={"k": "v" * 9000})
    with pytest.raises(TypeError, match="dek must be a DataKey"):
        await crypto.encrypt_data(b"x", b"k" * 32)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dek must be a DataKey"):
        await crypto.decrypt_data(b"x" * 40, b"k" * 32)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ciphertext must be bytes-like"):
        await crypto.decrypt_data("x" * 40, crypto.generate_dek())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pepper", [b"short", b"\x00" * 32, b"x" * 33, "a-string-of-exactly-32-characters"]
)
async def test_bad_pepper_is_refused_at_creation(kms: LocalKMSService, pepper: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        await Crypto.create(kms=kms, kek_alias=ALIAS, pepper=pepper)  # type: ignore[arg-type]
    assert not isinstance(pepper, bytes) or pepper.hex() not in str(info.value)


async def test_good_pepper_and_missing_alias(kms: LocalKMSService) -> None:
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, pepper=PEPPER) as crypto:
        assert crypto.kek_version == 1
        assert crypto.key_id == await kms.get_key_id(ALIAS)
    with pytest.raises(KMSKeyNotFoundError):
        await Crypto.create(kms=kms, kek_alias="alias/nope")
    with pytest.raises(ConfigurationError):
        await Crypto.create(kms=object(), kek_alias=ALIAS)  # type: ignore[arg-type]


async def test_closed_crypto_refuses_use_and_leaves_kms_open(kms: LocalKMSService) -> None:
    async with await Crypto.create(kms=kms, kek_alias=ALIAS) as crypto:
        blob = await crypto.encrypt(b"x")
    with pytest.raises(ClosedError):
        await crypto.decrypt(blob)
    with pytest.raises(ClosedError):
        await crypto.encrypt(b"x")
    await crypto.aclose()
    # The KMS belongs to whoever opened it: still usable.
    async with await Crypto.create(kms=kms, kek_alias=ALIAS) as other:
        assert await other.decrypt(blob) == b"x"


async def test_stats_count_kms_calls(kms: LocalKMSService) -> None:
    async with await Crypto.create(kms=kms, kek_alias=ALIAS) as crypto:
        blob = await crypto.encrypt(b"x")
        await crypto.decrypt(blob)
        await crypto.decrypt(blob)
        stats = crypto.stats()
    # one look-up of the alias for version 1, one check of its key at start-up
    assert dict(stats.kms_calls) == {"get_key_id": 2, "encrypt_dek": 1, "decrypt_dek": 2}
    assert stats.total_kms_calls == 5
    assert stats.cache is None


def test_data_key_hides_itself() -> None:
    dek = DataKey.generate()
    raw = bytes(dek)
    for text in (repr(dek), str(dek), f"{dek}"):
        assert raw.hex() not in text
        assert "redacted" in text
    with pytest.raises(TypeError):
        hash(dek)
    import copy
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(dek)
    with pytest.raises(TypeError):
        copy.copy(dek)
    dek.wipe()
    assert dek.wiped
    assert bytes(dek) == bytes(32)
    with pytest.raises(ValueError, match="wiped"):
        dek.aesgcm()


async def test_closed_crypto_refuses_hashing(kms: LocalKMSService) -> None:
    crypto = await Crypto.create(kms=kms, kek_alias=ALIAS, pepper=PEPPER)
    digest = crypto.hash_basic("alice@example.com", domain="users.email")
    await crypto.aclose()
    with pytest.raises(ClosedError):
        crypto.hash_basic("alice@example.com", domain="users.email")
    with pytest.raises(ClosedError):
        crypto.verify_basic("alice@example.com", digest, domain="users.email")
    with pytest.raises(ClosedError):
        crypto.needs_reindex(digest)
    with pytest.raises(ClosedError):
        crypto.legacy_hash_basic("alice@example.com")


async def test_blind_indexes_need_a_pepper(kms: LocalKMSService) -> None:
    async with await Crypto.create(kms=kms, kek_alias=ALIAS) as crypto:
        digest = "hb2:1:" + "A" * 43
        for attempt in (
            lambda: crypto.hash_basic("alice@example.com", domain="users.email"),
            lambda: crypto.verify_basic("alice@example.com", digest, domain="users.email"),
            lambda: crypto.needs_reindex(digest),
            lambda: crypto.legacy_hash_basic("alice@example.com"),
        ):
            with pytest.raises(ConfigurationError, match="need a pepper"):
                attempt()
