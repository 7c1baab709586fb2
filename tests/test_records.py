"""Crypto.seal_record / open_record: several fields under one DEK, each bound to its name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from encx_async import Crypto, DecryptionError, DEKCache, SealedRecord
from encx_async._envelope import parse_record_header
from encx_async.providers.local import LocalKMSService

ALIAS = "alias/records-test"
CTX = {"table": "users"}
FIELDS = {"email": b"alice@example.com", "phone": b"+44 20 7946 0000", "note": b""}


@pytest.fixture
async def kms() -> AsyncIterator[LocalKMSService]:
    async with LocalKMSService() as service:
        await service.create_key("record tests", alias=ALIAS)
        yield service


@pytest.fixture(params=["uncached", "cached"])
async def crypto(request: pytest.FixtureRequest, kms: LocalKMSService) -> AsyncIterator[Crypto]:
    cache = DEKCache() if request.param == "cached" else None
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=cache) as c:
        yield c


async def test_round_trip_with_one_header(crypto: Crypto) -> None:
    record = await crypto.seal_record(FIELDS, context=CTX, aad=b"user:1")
    assert set(record.fields) == set(FIELDS)
    assert parse_record_header(record.header).kek_version == crypto.kek_version
    # per field only nonce, ciphertext and tag: the wrapped DEK is stored once
    assert all(len(record.fields[k]) == len(v) + 28 for k, v in FIELDS.items())
    assert await crypto.open_record(record, context=CTX, aad=b"user:1") == FIELDS
    subset = SealedRecord(record.header, {"phone": record.fields["phone"]})
    assert await crypto.open_record(subset, context=CTX, aad=b"user:1") == {
        "phone": FIELDS["phone"]
    }


async def test_fields_cannot_be_swapped_moved_or_altered(crypto: Crypto) -> None:
    record = await crypto.seal_record(FIELDS, context=CTX, aad=b"user:1")
    other = await crypto.seal_record(FIELDS, context=CTX, aad=b"user:2")
    swapped = {"email": record.fields["phone"], "phone": record.fields["email"]}
    flipped = bytearray(record.fields["email"])
    flipped[-1] ^= 1
    header = bytearray(record.header)
    header[-1] ^= 1
    bad = [
        (SealedRecord(record.header, swapped), CTX, b"user:1"),
        (SealedRecord(record.header, {"email": bytes(flipped)}), CTX, b"user:1"),
        (SealedRecord(record.header, {"email": record.fields["email"][:20]}), CTX, b"user:1"),
        (SealedRecord(record.header, {"email": other.fields["email"]}), CTX, b"user:1"),
        (SealedRecord(bytes(header), record.fields), CTX, b"user:1"),
        (SealedRecord(record.header[:-1], record.fields), CTX, b"user:1"),
        (record, CTX, b"user:2"),
        (record, {"table": "orders"}, b"user:1"),
    ]
    for sealed, context, aad in bad:
        with pytest.raises(DecryptionError):
            await crypto.open_record(sealed, context=context, aad=aad)


async def test_a_field_body_is_not_an_envelope_body(crypto: Crypto) -> None:
    record = await crypto.seal_record({"email": b"alice@example.com"}, context=CTX)
    with pytest.raises(DecryptionError):
        await crypto.decrypt(record.header + record.fields["email"], context=CTX)
    blob = await crypto.encrypt(b"alice@example.com", context=CTX)
    header_len = len(record.header)
    with pytest.raises(DecryptionError):
        await crypto.open_record(
            SealedRecord(blob[:header_len], {"email": blob[header_len:]}), context=CTX
        )


async def test_a_record_counts_one_use_per_field(kms: LocalKMSService) -> None:
    cache = DEKCache(max_messages_per_dek=5)
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=cache) as crypto:
        first = await crypto.seal_record(FIELDS, context=CTX)  # 3 of 5 uses
        second = await crypto.seal_record(FIELDS, context=CTX)  # would be 6: a new DEK
        third = await crypto.seal_record({"email": b"x", "phone": b"y"}, context=CTX)
        assert first.header != second.header == third.header
        assert crypto.stats().kms_calls["encrypt_dek"] == 2
        # more fields than a DEK may serve: sealed without the cache, still one DEK
        many = {f"f{i}": b"v" for i in range(7)}
        record = await crypto.seal_record(many, context=CTX)
        assert await crypto.open_record(record, context=CTX) == many


async def test_large_fields_go_to_a_thread_and_round_trip(kms: LocalKMSService) -> None:
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, thread_threshold=1024) as crypto:
        fields = {"blob": bytes(range(256)) * 64, "small": b"s"}
        record = await crypto.seal_record(fields, context=CTX)
        assert await crypto.open_record(record, context=CTX) == fields


async def test_bad_field_input_is_a_type_error(crypto: Crypto) -> None:
    for fields in ({"": b"x"}, {1: b"x"}, {"a": "text"}):
        with pytest.raises(TypeError):
            await crypto.seal_record(fields, context=CTX)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cache",
    [
        pytest.param(lambda: DEKCache(max_messages_per_dek=2), id="last-allowed-use"),
        pytest.param(lambda: DEKCache(max_entries=1), id="evicted-meanwhile"),
    ],
)
async def test_large_records_survive_their_key_being_retired(
    kms: LocalKMSService, cache: Callable[[], DEKCache]
) -> None:
    # A large record runs in a worker thread; meanwhile the cache may retire its
    # DEK (the record took the last allowed use, or another context evicted it)
    # and wipe it. The job took its key before the hop, so it still succeeds.
    big = {"scan": bytes(256 * 1024), "note": b"x"}
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=cache()) as crypto:

        async def one(i: int) -> None:
            ctx = {"tenant": str(i % 3)}
            record = await crypto.seal_record(big, context=ctx, aad=b"%d" % i)
            assert await crypto.open_record(record, context=ctx, aad=b"%d" % i) == big

        # With one entry and three contexts each new key evicts the one others
        # were waiting for: every caller must still get a key, and soon.
        with anyio.fail_after(60):
            for _ in range(5):
                async with anyio.create_task_group() as tg:
                    for i in range(30):
                        tg.start_soon(one, i)
