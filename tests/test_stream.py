"""Streaming encryption: round trips over any chunking, every kind of tampering, files."""

from __future__ import annotations

import asyncio
import os
import random
import stat
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest
import pytest_asyncio
from anyio.abc import ByteReceiveStream

from benchmarks.stream import reset_peak_rss, status_kib
from encx_async import (
    ClosedError,
    ConfigurationError,
    Crypto,
    DecryptionError,
    DEKCache,
    InvalidValueError,
)
from encx_async._envelope import BODY_GCM, BODY_STREAM, FIXED_SIZE, parse
from encx_async.providers.local import LocalKMSService

ALIAS = "alias/stream-test"
CTX = {"tenant": "acme", "object": "report.pdf"}
SEGMENT = 16 * 1024  # Cobblestone's plaintext segment
SEGMENT_OUT = SEGMENT + 16  # and its ciphertext, with the tag


@pytest_asyncio.fixture(loop_scope="function")
async def kms() -> AsyncIterator[LocalKMSService]:
    async with LocalKMSService() as service:
        await service.create_key("stream tests", alias=ALIAS)
        yield service


@pytest_asyncio.fixture(loop_scope="function", params=["uncached", "cached"])
async def crypto(request: pytest.FixtureRequest, kms: LocalKMSService) -> AsyncIterator[Crypto]:
    cache = DEKCache() if request.param == "cached" else None
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=cache) as c:
        yield c


def split(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    out, at = [], 0
    for size in sizes:
        if at >= len(data):
            break
        out.append(data[at : at + size])
        at += size
    if at < len(data):
        out.append(data[at:])
    return out


def random_split(data: bytes, seed: int, largest: int = 70_000) -> list[bytes]:
    rng = random.Random(seed)
    return split(data, iter(lambda: rng.randint(0, largest), -1))


async def agen(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


class BytesStream(ByteReceiveStream):
    """An anyio byte stream over fixed chunks: what a socket or a process pipe looks like."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        for chunk in self._chunks:
            if chunk:  # a byte stream never yields b""
                return chunk
        raise anyio.EndOfStream

    async def aclose(self) -> None:
        pass


SIZES = [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 5 * SEGMENT, 1024 * 1024 + 3, 3 * 1024 * 1024]


@pytest.mark.parametrize("size", SIZES)
async def test_round_trip_whatever_the_chunking(crypto: Crypto, size: int) -> None:
    data = os.urandom(size)
    sealed = await collect(crypto.encrypt_stream(agen(random_split(data, size)), context=CTX))
    # One envelope, whatever the chunking, of the kind encrypt() uses for large payloads.
    envelope = parse(sealed)
    assert envelope.body_kind == BODY_STREAM
    for seed in (1, 2):
        pieces = random_split(sealed, seed + size, largest=40_000)
        assert await collect(crypto.decrypt_stream(agen(pieces), context=CTX)) == data
    assert await collect(crypto.decrypt_stream([sealed], context=CTX)) == data
    # encrypt/decrypt and the streaming calls read each other's output.
    assert await crypto.decrypt(sealed, context=CTX) == data
    blob = await crypto.encrypt(data, context=CTX)
    assert await collect(crypto.decrypt_stream(agen(random_split(blob, 7)), context=CTX)) == data


async def test_sources_can_be_plain_iterables_and_anyio_byte_streams(crypto: Crypto) -> None:
    data = os.urandom(200_000)
    chunks = random_split(data, 3)
    from_list = await collect(crypto.encrypt_stream(chunks, aad=b"id:7"))
    from_stream = await collect(crypto.encrypt_stream(BytesStream(chunks), aad=b"id:7"))
    mixed: list[bytes | bytearray | memoryview] = [
        bytearray(chunks[0]),
        memoryview(b"".join(chunks[1:])),
    ]
    from_buffers = await collect(crypto.encrypt_stream(mixed, aad=b"id:7"))
    for sealed in (from_list, from_stream, from_buffers):
        back = BytesStream(random_split(sealed, 4))
        assert await collect(crypto.decrypt_stream(back, aad=b"id:7")) == data


async def test_chunks_come_out_as_the_input_goes_in(crypto: Crypto) -> None:
    """Memory stays at about one chunk: output flows before the input has ended."""
    produced = 0
    seen_before_end: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(40):
            produced += 1
            yield os.urandom(64 * 1024)

    async for _chunk in crypto.encrypt_stream(source()):
        seen_before_end.append(produced)
    assert seen_before_end[0] < 3
    assert len(seen_before_end) > 30


async def test_a_small_gcm_envelope_streams_too(crypto: Crypto) -> None:
    blob = await crypto.encrypt(b"a short secret", context=CTX)
    assert parse(blob).body_kind == BODY_GCM
    pieces = [blob[i : i + 5] for i in range(0, len(blob), 5)]
    assert await collect(crypto.decrypt_stream(pieces, context=CTX)) == b"a short secret"
    with pytest.raises(DecryptionError):
        await collect(crypto.decrypt_stream([blob[:-1]], context=CTX))
    with pytest.raises(DecryptionError):
        await collect(crypto.decrypt_stream([blob, b"\0"], context=CTX))


async def sealed_and_data(crypto: Crypto, size: int = 10 * SEGMENT + 100) -> tuple[bytes, bytes]:
    data = os.urandom(size)
    return await collect(crypto.encrypt_stream([data], context=CTX)), data


async def opened_until_failure(crypto: Crypto, sealed: bytes) -> bytes:
    """What a reader got before the DecryptionError that must come."""
    got = bytearray()
    try:
        async for chunk in crypto.decrypt_stream(agen(random_split(sealed, 9)), context=CTX):
            got += chunk
    except DecryptionError:
        return bytes(got)
    raise AssertionError("a damaged stream decrypted to its end without an error")


async def test_truncation_anywhere_fails_and_only_authentic_bytes_come_out(
    crypto: Crypto,
) -> None:
    sealed, data = await sealed_and_data(crypto)
    body_at = parse(sealed).body_at
    cuts = [1, FIXED_SIZE, body_at - 1, body_at, body_at + 30, body_at + 56 + SEGMENT_OUT]
    cuts += [len(sealed) - SEGMENT_OUT, len(sealed) - 117, len(sealed) - 1]
    for cut in cuts:
        got = await opened_until_failure(crypto, sealed[:cut])
        # Released bytes are a prefix of the plaintext, never the whole of it.
        assert data.startswith(got)
        assert len(got) < len(data)


async def test_dropped_duplicated_and_reordered_segments_fail(crypto: Crypto) -> None:
    sealed, data = await sealed_and_data(crypto)
    envelope = parse(sealed)
    start = envelope.body_at + 56  # Cobblestone's own prefix comes first
    head, body = sealed[:start], sealed[start:]
    segments = [body[i : i + SEGMENT_OUT] for i in range(0, len(body), SEGMENT_OUT)]
    assert len(segments) == 11
    forgeries = {
        "dropped": segments[:3] + segments[4:],
        "duplicated": [*segments[:4], *segments[3:]],
        "swapped": [*segments[:3], segments[4], segments[3], *segments[5:]],
        "last dropped": segments[:-1],
        "last repeated": [*segments, segments[-1]],
    }
    for name, forged in forgeries.items():
        got = await opened_until_failure(crypto, head + b"".join(forged))
        assert data.startswith(got), name


async def test_bit_flips_wrong_context_and_trailing_garbage_fail(crypto: Crypto) -> None:
    sealed, _data = await sealed_and_data(crypto)
    body_at = parse(sealed).body_at
    for at in (0, 3, 9, body_at - 1, body_at, body_at + 60, len(sealed) // 2, len(sealed) - 1):
        flipped = bytearray(sealed)
        flipped[at] ^= 0x01
        with pytest.raises(DecryptionError):
            await collect(crypto.decrypt_stream([bytes(flipped)], context=CTX))
    for extra in (b"\0", os.urandom(SEGMENT_OUT)):
        with pytest.raises(DecryptionError):
            await collect(crypto.decrypt_stream([sealed, extra], context=CTX))
    with pytest.raises(DecryptionError):
        await collect(crypto.decrypt_stream([sealed], context={"tenant": "other"}))
    with pytest.raises(DecryptionError):
        await collect(crypto.decrypt_stream([sealed], context=CTX, aad=b"not-bound"))
    for junk in ([], [b""], [b"EX"], [os.urandom(4096)]):
        with pytest.raises(DecryptionError):
            await collect(crypto.decrypt_stream(junk, context=CTX))


async def test_aad_binds_a_stream_to_its_record(crypto: Crypto) -> None:
    sealed = await collect(crypto.encrypt_stream([b"x" * 100_000], aad=b"object:1"))
    assert await collect(crypto.decrypt_stream([sealed], aad=b"object:1")) == b"x" * 100_000
    with pytest.raises(DecryptionError):
        await collect(crypto.decrypt_stream([sealed], aad=b"object:2"))


async def test_one_kms_wrap_per_stream_and_cached_unwraps(kms: LocalKMSService) -> None:
    async with await Crypto.create(kms=kms, kek_alias=ALIAS) as plain:
        sealed = [await collect(plain.encrypt_stream([os.urandom(50_000)])) for _ in range(3)]
        assert plain.stats().kms_calls["encrypt_dek"] == 3
        await collect(plain.decrypt_stream([sealed[0]]))
        await collect(plain.decrypt_stream([sealed[0]]))
        assert plain.stats().kms_calls["decrypt_dek"] == 2  # no cache: one unwrap per stream
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=DEKCache()) as cached:
        for _ in range(5):
            for blob in sealed:
                await collect(cached.decrypt_stream([blob]))
        # One unwrap per distinct DEK, and a stream's DEK never joins the encrypt cache.
        assert cached.stats().kms_calls["decrypt_dek"] == 3
        await collect(cached.encrypt_stream([b"a"]))
        await collect(cached.encrypt_stream([b"b"]))
        assert cached.stats().kms_calls["encrypt_dek"] == 2


async def test_bad_sources_are_type_errors_and_closed_crypto_refuses(kms: LocalKMSService) -> None:
    crypto = await Crypto.create(kms=kms, kek_alias=ALIAS)
    for bad in (b"raw bytes", "text", 42, None):
        with pytest.raises(TypeError, match="source"):
            crypto.encrypt_stream(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="source"):
            crypto.decrypt_stream(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="chunk must be bytes-like, not str"):
        await collect(crypto.encrypt_stream([b"ok", "not bytes"]))  # type: ignore[list-item]
    with pytest.raises(TypeError, match="aad"):
        crypto.encrypt_stream([b""], aad="text")  # type: ignore[arg-type]
    await crypto.aclose()
    with pytest.raises(ClosedError):
        crypto.encrypt_stream([b"x"])
    with pytest.raises(ClosedError):
        crypto.decrypt_stream([b"x"])
    with pytest.raises(ClosedError):
        await crypto.encrypt_file("a", "b")


async def test_stopping_early_closes_cleanly(crypto: Crypto) -> None:
    sealed, data = await sealed_and_data(crypto, 2 * 1024 * 1024)
    async with aclosing(
        crypto.decrypt_stream(agen(random_split(sealed, 5)), context=CTX)
    ) as chunks:
        async for chunk in chunks:
            assert data.startswith(chunk)
            break
    # The Crypto carries on as if nothing happened.
    assert await collect(crypto.decrypt_stream([sealed], context=CTX)) == data


# -- files -----------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    path = tmp_path / "files"
    path.mkdir()
    return path


async def test_file_round_trip_is_atomic_and_private(crypto: Crypto, files: Path) -> None:
    tmp_path = files
    data = os.urandom(3 * 1024 * 1024 + 5)
    (tmp_path / "plain").write_bytes(data)
    read = await crypto.encrypt_file(tmp_path / "plain", tmp_path / "sealed", context=CTX)
    assert read == len(data)
    sealed = (tmp_path / "sealed").read_bytes()
    assert data[:64] not in sealed
    assert await crypto.decrypt(sealed, context=CTX) == data
    assert await crypto.decrypt_file(str(tmp_path / "sealed"), tmp_path / "out", context=CTX) == (
        len(sealed)
    )
    assert (tmp_path / "out").read_bytes() == data
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o600
    # A stream made in memory opens as a file, and the other way round.
    (tmp_path / "streamed").write_bytes(await collect(crypto.encrypt_stream([data])))
    await crypto.decrypt_file(tmp_path / "streamed", tmp_path / "out2")
    assert (tmp_path / "out2").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "out",
        "out2",
        "plain",
        "sealed",
        "streamed",
    ]


async def test_a_bad_file_leaves_no_output_and_keeps_the_old_one(
    crypto: Crypto, files: Path
) -> None:
    tmp_path = files
    (tmp_path / "plain").write_bytes(os.urandom(500_000))
    await crypto.encrypt_file(tmp_path / "plain", tmp_path / "sealed", context=CTX)
    sealed = (tmp_path / "sealed").read_bytes()
    (tmp_path / "previous").write_bytes(b"the old content")
    bad = {
        "cut": sealed[:-1000],
        "flipped": sealed[:300_000] + bytes([sealed[300_000] ^ 4]) + sealed[300_001:],
        "header only": sealed[: parse(sealed).body_at],
        "half header": sealed[:20],
        "empty": b"",
    }
    for name, content in bad.items():
        (tmp_path / "bad").write_bytes(content)
        with pytest.raises(DecryptionError):
            await crypto.decrypt_file(tmp_path / "bad", tmp_path / "new", context=CTX)
        with pytest.raises(DecryptionError):
            await crypto.decrypt_file(tmp_path / "bad", tmp_path / "previous", context=CTX)
        assert not (tmp_path / "new").exists(), name
        assert (tmp_path / "previous").read_bytes() == b"the old content"
    with pytest.raises(DecryptionError):
        await crypto.decrypt_file(tmp_path / "sealed", tmp_path / "new", context={"t": "x"})
    leftovers = {p.name for p in tmp_path.iterdir()} - {"plain", "sealed", "previous", "bad"}
    assert leftovers == set()
    with pytest.raises(InvalidValueError, match="same file"):
        await crypto.decrypt_file(tmp_path / "sealed", tmp_path / "sealed", context=CTX)
    with pytest.raises(FileNotFoundError):
        await crypto.encrypt_file(tmp_path / "missing", tmp_path / "x")


async def test_rewrap_file_moves_only_the_header(kms: LocalKMSService, tmp_path: Path) -> None:
    async with await Crypto.create(kms=kms, kek_alias=ALIAS) as crypto:
        data = os.urandom(400_000)
        (tmp_path / "plain").write_bytes(data)
        await crypto.encrypt_file(tmp_path / "plain", tmp_path / "v1", context=CTX)
        assert not await crypto.rewrap_file(tmp_path / "v1", tmp_path / "same", context=CTX)
        assert (tmp_path / "same").read_bytes() == (tmp_path / "v1").read_bytes()
        await crypto.rotate_kek()
        assert await crypto.rewrap_file(tmp_path / "v1", tmp_path / "v2", context=CTX)
        old, new = (tmp_path / "v1").read_bytes(), (tmp_path / "v2").read_bytes()
        assert (parse(old).kek_version, parse(new).kek_version) == (1, 2)
        assert old[parse(old).body_at :] == new[parse(new).body_at :]
        await crypto.decrypt_file(tmp_path / "v2", tmp_path / "out", context=CTX)
        assert (tmp_path / "out").read_bytes() == data


# -- review fixes: cancellation, rotations seen by streams, paths ----------------------


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        file.truncate(size)
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def wait_for_part_file(folder: Path) -> None:
    with anyio.fail_after(10):
        # A file made by a worker thread: there is no event to wait on.
        while not any(name.endswith(".part") for name in names(folder)):  # noqa: ASYNC110
            await anyio.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["encrypt_file", "decrypt_file"])
async def test_a_cancelled_file_job_stops_and_leaves_nothing(
    crypto: Crypto, files: Path, operation: str
) -> None:
    big = sparse_file(files / "big", 4 * 1024**3)
    if operation == "decrypt_file":
        # A real ciphertext, so that decryption runs until it is cancelled.
        plain = sparse_file(files.parent / "plain", 1024**3)
        await crypto.encrypt_file(plain, files.parent / "sealed")
        (files.parent / "sealed").replace(big)
    run = getattr(crypto, operation)
    # asyncio's own cancellation.
    job = asyncio.ensure_future(run(big, files / "out"))
    await wait_for_part_file(files)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    # The worker thread deleted its temporary file before the cancellation
    # reached us, and nothing is renamed into place afterwards.
    assert names(files) == ["big"]
    # anyio's cancel scopes (a timeout).
    with anyio.move_on_after(0.2) as scope:
        await run(big, files / "out")
    assert scope.cancelled_caught
    assert names(files) == ["big"]


async def test_thread_threshold_keeps_every_envelope_streamable(kms: LocalKMSService) -> None:
    with pytest.raises(ConfigurationError, match="16 MiB"):
        await Crypto.create(kms=kms, kek_alias=ALIAS, thread_threshold=17 * 1024 * 1024)
    async with await Crypto.create(
        kms=kms, kek_alias=ALIAS, thread_threshold=16 * 1024 * 1024
    ) as crypto:
        data = os.urandom(16 * 1024 * 1024 - 1)
        blob = await crypto.encrypt(data)
        assert parse(blob).body_kind == BODY_GCM
        assert await collect(crypto.decrypt_stream(random_split(blob, 3, 4_000_000))) == data


async def test_streams_notice_a_rotation_made_elsewhere(
    kms: LocalKMSService, tmp_path: Path
) -> None:
    shared = f"sqlite:///{tmp_path / 'keys.db'}"  # two instances, one store
    async with (
        Crypto(kms=kms, kek_alias=ALIAS, database=shared, version_check_interval=0.01) as reader,
        Crypto(kms=kms, kek_alias=ALIAS, database=shared) as rotator,
    ):
        await rotator.rotate_kek()
        await anyio.sleep(0.02)
        await collect(reader.encrypt_stream([b"x"]))  # only streams: no encrypt() call
        with anyio.fail_after(5):
            while reader.kek_version != 2:  # noqa: ASYNC110 (a background re-read)
                await anyio.sleep(0.005)


async def test_aclose_ends_streams_in_flight(kms: LocalKMSService) -> None:
    crypto = await Crypto.create(kms=kms, kek_alias=ALIAS)
    chunks = crypto.encrypt_stream(os.urandom(64 * 1024) for _ in range(100))
    await anext(chunks)
    await crypto.aclose()
    with pytest.raises(ClosedError):
        async for _ in chunks:
            pass


async def test_stopping_early_closes_an_async_generator_source(crypto: Crypto) -> None:
    events: list[str] = []

    async def source() -> AsyncIterator[bytes]:
        try:
            for _ in range(100):
                yield os.urandom(64 * 1024)
        finally:
            events.append("source closed")

    async with aclosing(crypto.encrypt_stream(source())) as chunks:
        async for _ in chunks:
            break
    events.append("stream closed")
    assert events == ["source closed", "stream closed"]


async def test_paths_are_checked_before_any_kms_call(crypto: Crypto, files: Path) -> None:
    (files / "plain").write_bytes(b"data")
    with pytest.raises(FileNotFoundError) as missing:
        await crypto.encrypt_file(files / "missing", files / "out")
    assert missing.value.filename == str(files / "missing")
    with pytest.raises(FileNotFoundError) as no_folder:
        await crypto.encrypt_file(files / "plain", files / "nowhere" / "out")
    assert no_folder.value.filename == str(files / "nowhere" / "out")
    with pytest.raises(IsADirectoryError):
        await crypto.encrypt_file(files / "plain", files)
    assert crypto.stats().kms_calls.get("encrypt_dek", 0) == 0
    assert names(files) == ["plain"]


async def test_a_symlink_at_dst_is_followed(crypto: Crypto, files: Path) -> None:
    (files / "plain").write_bytes(b"data" * 1000)
    (files / "real.encx").write_bytes(b"old")
    (files / "link.encx").symlink_to(files / "real.encx")
    await crypto.encrypt_file(files / "plain", files / "link.encx")
    assert (files / "link.encx").is_symlink()
    await crypto.decrypt_file(files / "real.encx", files / "back")
    assert (files / "back").read_bytes() == b"data" * 1000


async def test_one_huge_chunk_costs_no_more_than_a_slice(crypto: Crypto) -> None:
    """Memory beyond the caller's own chunk stays at about one 1 MiB slice."""
    big = os.urandom(128 * 1024 * 1024)
    before = status_kib("VmRSS")
    if before is None or not reset_peak_rss():
        pytest.skip("peak RSS cannot be reset on this system")
    seen = 0
    async for out in crypto.decrypt_stream(crypto.encrypt_stream([big])):
        seen += len(out)
    peak = status_kib("VmHWM")
    assert peak is not None
    growth_mib = (peak - before) / 1024
    assert seen == len(big)
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.0f} MiB for a 128 MiB chunk"
