"""MultiRegionKMSService against two moto servers, one per region, stopped and
restarted mid-run; its breakers run on a fake clock, so no test sleeps for them.

Both servers run in this process and share moto's state (which is kept per
region anyway); stopping one makes its region unreachable, which is what an
outage looks like to the client: connections refused.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import pytest_asyncio
from aiobotocore.session import AioSession
from moto.server import ThreadedMotoServer

from encx_async import Crypto, DEKCache
from encx_async import _exceptions as errors
from encx_async._envelope import parse
from encx_async.providers._common import DECRYPT_FAILED
from encx_async.providers.aws import (
    Config,
    KMSService,
    MultiRegionKMSService,
    MultiRegionStats,
    RegionStats,
    RegionsUnavailableError,
)
from encx_async.providers.local import LocalKMSService
from tests.support import FakeClock

EAST = "us-east-1"
WEST = "eu-west-1"
DEK = bytes(range(200, 232))
CONTEXT = {"tenant": "acme"}
RESET = 10.0


class RegionServer:
    """A moto server for one region that can be stopped and started on the same port."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._server: ThreadedMotoServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="session")
def region_servers(moto_server: str) -> Iterator[dict[str, RegionServer]]:
    """Two more moto servers, standing for us-east-1 and eu-west-1, for the session.

    ``moto_server`` (conftest) comes first: it sets the fake AWS environment.
    """
    servers = {region: RegionServer(region) for region in (EAST, WEST)}
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def servers(region_servers: dict[str, RegionServer], moto_endpoint: str) -> dict[str, RegionServer]:
    """Both region servers running, and moto's state wiped (``moto_endpoint`` resets it)."""
    for server in region_servers.values():
        server.start()
    return region_servers


def fast_config() -> Config:
    # One attempt and short timeouts: a dead region costs milliseconds, not seconds.
    return Config(max_attempts=1, connect_timeout=1.0, read_timeout=2.0)


def multi(
    servers: dict[str, RegionServer], clock: FakeClock, **options: Any
) -> MultiRegionKMSService:
    options.setdefault("mode", "every-region")
    return MultiRegionKMSService.from_regions(
        [EAST, WEST],
        fast_config(),
        endpoint_urls={region: server.url for region, server in servers.items()},
        failure_threshold=2,
        reset_timeout=RESET,
        max_reset_timeout=4 * RESET,
        clock=clock,
        **options,
    )


@pytest_asyncio.fixture(loop_scope="function")
async def kms(
    servers: dict[str, RegionServer],
) -> AsyncIterator[tuple[MultiRegionKMSService, FakeClock]]:
    clock = FakeClock()
    async with multi(servers, clock) as service:
        yield service, clock


# -- set-up ---------------------------------------------------------------------


async def test_one_session_serves_every_region(servers: dict[str, RegionServer]) -> None:
    session = AioSession()
    config = Config(session=session, max_attempts=1)
    urls = {region: server.url for region, server in servers.items()}
    async with MultiRegionKMSService.from_regions([EAST, WEST], config, endpoint_urls=urls) as kms:
        east, west = kms.service(EAST), kms.service(WEST)
        assert isinstance(east, KMSService)
        assert isinstance(west, KMSService)
        assert east.config.session is session
        assert west.config.session is session
        assert (east.region, west.region) == (EAST, WEST)
        assert (east.endpoint_url, west.endpoint_url) == (urls[EAST], urls[WEST])
        for service in (east, west):
            key = await service.create_key("regional")
            assert f":kms:{service.region}:" in key
        assert kms.regions == (EAST, WEST)
        assert kms.primary == EAST
    # It owned them, so it closed them.
    assert "closed" in repr(east)
    assert "closed" in repr(west)
    with pytest.raises(errors.ClosedError):
        await kms.get_key_id("alias/x")


async def test_borrowed_services_stay_open(servers: dict[str, RegionServer]) -> None:
    east = KMSService(Config(region=EAST, endpoint_url=servers[EAST].url))
    async with east:
        async with MultiRegionKMSService([east]) as kms:
            await kms.create_key("k", alias="alias/borrowed")
        assert await east.get_key_id("alias/borrowed")  # still usable


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"regions": []}, "at least one"),
        ({"regions": [EAST, EAST]}, "two services"),
        ({"primary": "ap-south-1"}, "primary region"),
        ({"min_regions": 3}, "min_regions"),
        ({"mode": "sideways"}, "mode"),
        ({"attempt_timeout": 0}, "attempt_timeout"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"reset_timeout": 60, "max_reset_timeout": 30}, "max_reset_timeout"),
        ({"endpoint_urls": {"ap-south-1": "http://127.0.0.1:1"}}, "endpoint_urls"),
    ],
)
def test_invalid_settings(options: dict[str, Any], message: str) -> None:
    regions = options.pop("regions", [EAST, WEST])
    with pytest.raises(errors.ConfigurationError, match=message):
        MultiRegionKMSService.from_regions(regions, Config(), **options)


def test_every_service_must_know_its_region() -> None:
    with pytest.raises(errors.ConfigurationError, match="region"):
        MultiRegionKMSService([KMSService(Config())])
    with pytest.raises(TypeError):
        MultiRegionKMSService([object()])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        MultiRegionKMSService.from_regions(EAST)


# -- every-region wrapping --------------------------------------------------------


async def test_one_blob_opens_in_either_region(
    kms: tuple[MultiRegionKMSService, FakeClock], servers: dict[str, RegionServer]
) -> None:
    service, _ = kms
    key = await service.create_key("app", alias="alias/app")
    assert key.startswith("multi-region:us-east-1=arn:aws:kms:us-east-1:")
    assert ",eu-west-1=arn:aws:kms:eu-west-1:" in key
    assert await service.get_key_id("alias/app") == key
    assert await service.get_key_id(key) == key
    wrapped = await service.encrypt_dek(key, DEK, context=CONTEXT)
    assert len(wrapped) <= 1024
    for region in (WEST, EAST):
        # A service that knows one region opens the blob with that region's copy.
        async with (
            KMSService(Config(region=region, endpoint_url=servers[region].url)) as regional,
            MultiRegionKMSService([regional], mode="every-region") as alone,
        ):
            assert await alone.decrypt_dek(key, wrapped, context=CONTEXT) == DEK
    west_calls = service.stats().region(WEST).calls
    with pytest.raises(errors.DecryptionError):
        await service.decrypt_dek(key, wrapped, context={"tenant": "other"})
    assert service.stats().region(WEST).calls == west_calls  # an answer: no failover


@pytest.mark.parametrize(
    "damage",
    [
        lambda blob: blob[:-1],
        lambda blob: b"EXMS" + blob[4:],
        lambda blob: blob[:4] + b"\x02" + blob[5:],
        lambda blob: blob + b"\x00",
        lambda blob: blob[:6],
        lambda blob: b"",
    ],
    ids=["truncated", "magic", "version", "trailing", "header-only", "empty"],
)
async def test_damaged_blobs_are_decryption_errors(
    kms: tuple[MultiRegionKMSService, FakeClock], damage: Any
) -> None:
    service, _ = kms
    key = await service.create_key("app")
    wrapped = await service.encrypt_dek(key, DEK)
    before = service.stats().region(EAST).calls
    with pytest.raises(errors.DecryptionError):
        await service.decrypt_dek(key, damage(wrapped))
    # Caught before any request, except a truncated copy, which KMS rejects.
    assert service.stats().region(EAST).calls - before <= 1


async def test_every_region_needs_a_key_for_every_region(
    kms: tuple[MultiRegionKMSService, FakeClock],
) -> None:
    service, _ = kms
    single = await service.service(EAST).create_key("single")
    with pytest.raises(errors.ConfigurationError, match="single key"):
        await service.encrypt_dek(single, DEK)
    with pytest.raises(errors.ConfigurationError, match="ap-south-1"):
        await service.encrypt_dek(f"multi-region:ap-south-1={single}", DEK)
    with pytest.raises(errors.ConfigurationError, match="multi-region key id"):
        await service.encrypt_dek("multi-region:us-east-1", DEK)
    # The alias exists in east only: resolving it needs every region.
    await service.service(EAST).create_key("k", alias="alias/east-only")
    with pytest.raises(errors.KMSKeyNotFoundError, match=WEST):
        await service.get_key_id("alias/east-only")


async def test_too_many_regions_do_not_fit_the_envelope() -> None:
    regions = [LocalKMSService(region=f"test-{index}") for index in range(10)]
    async with MultiRegionKMSService(regions, mode="every-region") as kms:
        key = await kms.create_key("wide")
        with pytest.raises(errors.EncryptionError, match="1024"):
            await kms.encrypt_dek(key, DEK)
    for region in regions:
        await region.aclose()


# -- failover ----------------------------------------------------------------------


@pytest.mark.slow
async def test_stop_a_region_mid_run_and_restart_it(
    servers: dict[str, RegionServer],
) -> None:
    clock = FakeClock()
    async with multi(servers, clock) as kms:
        crypto = await Crypto.create(kms=kms, kek_alias="alias/app", create_key_if_missing=True)
        async with crypto:
            records: list[tuple[bytes, bytes]] = []

            async def write_and_read(count: int) -> None:
                for _ in range(count):
                    plain = secrets.token_bytes(40)
                    blob = await crypto.encrypt(plain, context=CONTEXT)
                    records.append((plain, blob))
                    assert await crypto.decrypt(blob, context=CONTEXT) == plain

            await write_and_read(5)
            east_calls = kms.stats().region(EAST).calls

            servers[EAST].stop()
            with anyio.fail_after(10):
                await write_and_read(5)  # no error reaches the caller
            east = kms.stats().region(EAST)
            # Two failures open the breaker; after that east is not tried at all.
            assert east.failures == 2
            assert east.calls - east_calls == 2
            # Unwraps of the wraps made meanwhile use west: they hold no east copy.
            assert east.breaker == "open"
            assert east.skipped == 3
            assert kms.stats().partial_wraps == 5

            servers[EAST].start()
            clock.advance(RESET)  # the breaker lets one probe through, which succeeds
            await write_and_read(5)
            east = kms.stats().region(EAST)
            assert east.breaker == "closed"
            assert east.calls - east_calls == 2 + 10

            # Every record opens; those written during the outage through west.
            servers[WEST].stop()
            for plain, blob in records[:5] + records[10:]:
                assert await crypto.decrypt(blob, context=CONTEXT) == plain
            servers[WEST].start()
            clock.advance(4 * RESET)
            for plain, blob in records:
                assert await crypto.decrypt(blob, context=CONTEXT) == plain
    assert kms.stats().unavailable == 0


@pytest.mark.slow
async def test_breaker_under_a_flapping_region(
    kms: tuple[MultiRegionKMSService, FakeClock], servers: dict[str, RegionServer]
) -> None:
    service, clock = kms
    key = await service.create_key("app", alias="alias/app")
    wrapped = await service.encrypt_dek(key, DEK)

    def east() -> RegionStats:
        return service.stats().region(EAST)

    async def unwrap(times: int) -> None:
        for _ in range(times):
            assert await service.decrypt_dek(key, wrapped) == DEK

    open_times = []
    for _ in range(4):
        servers[EAST].stop()
        await unwrap(3)  # two failures open the breaker, the third call skips east
        assert east().breaker == "open"
        retry_in = east().retry_in
        assert retry_in is not None
        open_times.append(retry_in)
        servers[EAST].start()
        clock.advance(retry_in - 0.5)
        calls = east().calls
        await unwrap(3)
        assert east().calls == calls  # still open: east is left alone
        clock.advance(0.5)
        await unwrap(1)  # the probe, which succeeds
        assert east().breaker == "closed"
        assert east().calls == calls + 1
    # Each time it fails again soon after recovering, it is left alone for longer.
    assert open_times == [RESET, 2 * RESET, 4 * RESET, 4 * RESET]

    # Healthy for as long as it was last down: its past is forgiven.
    clock.advance(4 * RESET)
    await unwrap(1)
    servers[EAST].stop()
    await unwrap(2)
    assert east().retry_in == RESET


async def fail_probes(
    service: MultiRegionKMSService, clock: FakeClock, key: str, wrapped: bytes, times: int
) -> None:
    """With east down, open its breaker, then let ``times`` half-open probes fail."""
    for _ in range(2):
        assert await service.decrypt_dek(key, wrapped) == DEK
    for _ in range(times):
        retry_in = service.stats().region(EAST).retry_in
        assert retry_in is not None
        clock.advance(retry_in)
        assert await service.decrypt_dek(key, wrapped) == DEK  # the probe fails; west answers


@pytest.mark.slow
async def test_failed_probe_reopens_at_once(
    kms: tuple[MultiRegionKMSService, FakeClock], servers: dict[str, RegionServer]
) -> None:
    service, clock = kms
    key = await service.create_key("app")
    wrapped = await service.encrypt_dek(key, DEK)
    servers[EAST].stop()
    await fail_probes(service, clock, key, wrapped, times=0)
    assert service.stats().region(EAST).retry_in == RESET
    clock.advance(RESET)
    assert service.stats().region(EAST).breaker == "half-open"
    failures = service.stats().region(EAST).failures
    assert await service.decrypt_dek(key, wrapped) == DEK  # the probe fails, west answers
    east = service.stats().region(EAST)
    assert east.failures == failures + 1
    assert east.breaker == "open"
    assert east.retry_in == 2 * RESET


async def test_every_region_down_is_a_typed_error(
    kms: tuple[MultiRegionKMSService, FakeClock], servers: dict[str, RegionServer]
) -> None:
    service, _ = kms
    key = await service.create_key("app")
    wrapped = await service.encrypt_dek(key, DEK)
    for server in servers.values():
        server.stop()
    with pytest.raises(RegionsUnavailableError) as caught:
        await service.decrypt_dek(key, wrapped)
    error = caught.value
    assert isinstance(error, errors.KMSUnavailableError)
    assert error.operation == "decrypt_dek"
    assert error.regions == (EAST, WEST)
    assert isinstance(error.__cause__, errors.KMSUnavailableError)
    message = str(error)
    assert EAST in message
    assert WEST in message
    assert "could not be reached" in message
    for secret in (DEK, wrapped):
        assert secret.hex() not in message
        assert repr(secret) not in message
    with pytest.raises(RegionsUnavailableError, match="every region"):
        await service.encrypt_dek(key, DEK)
    # Both breakers are open now: the next call fails fast, naming them.
    with pytest.raises(RegionsUnavailableError, match="circuit open"):
        await service.decrypt_dek(key, wrapped)
    stats = service.stats()
    assert isinstance(stats, MultiRegionStats)
    assert stats.unavailable == 3
    assert [region.breaker for region in stats.regions] == ["open", "open"]
    with pytest.raises(KeyError):
        stats.region("ap-south-1")


async def test_min_regions_refuses_a_partial_wrap(servers: dict[str, RegionServer]) -> None:
    async with multi(servers, FakeClock(), min_regions=2) as kms:
        key = await kms.create_key("app")
        servers[WEST].stop()
        with pytest.raises(RegionsUnavailableError, match="needs 2 region") as caught:
            await kms.encrypt_dek(key, DEK)
    assert caught.value.regions == (WEST,)
    assert f"succeeded: {EAST}" in str(caught.value)


async def test_answers_are_not_failed_over(
    kms: tuple[MultiRegionKMSService, FakeClock],
) -> None:
    service, _ = kms
    key = await service.create_key("app")
    wrapped = await service.encrypt_dek(key, DEK, context=CONTEXT)
    west_calls = service.stats().region(WEST).calls
    with pytest.raises(errors.DecryptionError):
        await service.decrypt_dek(key, wrapped, context={"tenant": "intruder"})
    # A key east does not have: "not found" is an answer, so west is not asked.
    parts = dict(part.split("=", 1) for part in key.removeprefix("multi-region:").split(","))
    missing = parts[EAST].rsplit("/", 1)[0] + "/0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"
    with pytest.raises(errors.KMSKeyNotFoundError):
        await service.decrypt_dek(f"multi-region:{EAST}={missing},{WEST}={parts[WEST]}", wrapped)
    stats = service.stats()
    assert stats.region(WEST).calls == west_calls
    assert stats.region(EAST).failures == 0
    assert stats.region(EAST).failovers == 0


class BlackHole:
    """A loopback port that accepts connections and never answers."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            self._accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()
        for conn in self._accepted:
            conn.close()


async def test_a_silent_region_is_bounded_by_attempt_timeout(
    servers: dict[str, RegionServer], caplog: pytest.LogCaptureFixture
) -> None:
    hole = BlackHole()
    try:
        # A region whose read timeout is far longer than the attempt timeout.
        slow = KMSService(Config(region=EAST, endpoint_url=hole.url, read_timeout=30))
        west = KMSService(Config(region=WEST, endpoint_url=servers[WEST].url))
        async with slow, west:
            key = await west.create_key("west", alias="alias/app", multi_region=True)
            kms = MultiRegionKMSService(
                [slow, west], mode="replicas", attempt_timeout=0.2, clock=FakeClock()
            )
            async with kms:
                with anyio.fail_after(5), caplog.at_level(logging.DEBUG, "encx_async.kms"):
                    # (Named in the primary region, as every multi-region key is.)
                    assert await kms.get_key_id("alias/app") == key.replace(WEST, EAST)
        reasons = [r.getMessage() for r in caplog.records if "moves on" in r.getMessage()]
        assert reasons
        assert "no answer within 0.2 s" in reasons[0]
        assert kms.stats().region(EAST).failures == 1
    finally:
        hole.close()


# -- replicas mode on moto ----------------------------------------------------------


@pytest.mark.slow
async def test_replicas_wrap_moves_to_the_replica(servers: dict[str, RegionServer]) -> None:
    clock = FakeClock()
    async with multi(servers, clock, mode="replicas") as kms:
        primary_arn = await kms.create_key("app", alias="alias/app")
        assert f":kms:{EAST}:" in primary_arn
        assert ":key/mrk-" in primary_arn
        west = kms.service(WEST)
        assert await west.get_key_id("alias/app") == primary_arn.replace(EAST, WEST)
        servers[EAST].stop()
        # Resolved through west, but named by the primary's ARN all the same.
        assert await kms.get_key_id(primary_arn.replace(EAST, WEST)) == primary_arn
        assert await kms.encrypt_dek(primary_arn, DEK)
        east = kms.stats().region(EAST)
        assert (east.failures, east.failovers, east.breaker) == (2, 2, "open")


async def test_replicas_refuse_a_single_region_key_at_create(
    servers: dict[str, RegionServer],
) -> None:
    async with multi(servers, FakeClock(), mode="replicas") as kms:

        async def refused(kek_alias: str, **options: Any) -> str:
            try:
                crypto = await Crypto.create(kms=kms, kek_alias=kek_alias, **options)
            except errors.ConfigurationError as exc:
                return str(exc)
            await crypto.aclose()  # (an open one would keep the test process alive)
            pytest.fail(f"Crypto.create took {kek_alias!r} in replicas mode")

        single = await kms.service(EAST).create_key("single", alias="alias/single")
        for ref in ("alias/single", single):
            message = await refused(ref)
            assert "not a multi-region key" in message
            assert "mode='every-region'" in message
            assert "mrk-" in message
        # Nor does create_key_if_missing take the single-region key the alias names.
        assert "multi-region" in await refused("alias/single", create_key_if_missing=True)
        # A multi-region key is what this mode is for (moto wraps under it but
        # refuses to unwrap; test_mrk.py tests that part on local regions).
        crypto = await Crypto.create(kms=kms, kek_alias="alias/app", create_key_if_missing=True)
        async with crypto:
            assert ":key/mrk-" in crypto.key_id
            assert await crypto.encrypt(b"fine", context=CONTEXT)


# -- rotation across regions -------------------------------------------------------


async def test_every_region_rotation_and_rewrap(
    kms: tuple[MultiRegionKMSService, FakeClock],
) -> None:
    service, _ = kms
    crypto = await Crypto.create(kms=service, kek_alias="alias/app", create_key_if_missing=True)
    async with crypto:
        first_key = crypto.key_id
        old = await crypto.encrypt(b"written before", context=CONTEXT)
        await crypto.rotate_kek()
        assert crypto.kek_version == 2
        assert crypto.key_id != first_key
        assert await service.get_key_id("alias/app") == crypto.key_id  # moved in both regions
        moved = await crypto.rewrap(old, context=CONTEXT)
        for blob in (old, moved):
            assert await crypto.decrypt(blob, context=CONTEXT) == b"written before"
        await crypto.rotate_kek(rotation="kms-managed")
        await service.enable_key_rotation(crypto.key_id, period_days=180)
        assert await crypto.decrypt(moved, context=CONTEXT) == b"written before"


async def test_every_region_create_key_names_what_it_made() -> None:
    async with (
        LocalKMSService(region=EAST) as east,
        LocalKMSService(region=WEST) as west,
        MultiRegionKMSService([east, west], mode="every-region") as kms,
    ):
        await west.create_key("squatter", alias="alias/taken")
        with pytest.raises(errors.KMSError, match="keys made: us-east-1: ") as caught:
            await kms.create_key("k", alias="alias/taken")
        assert caught.value.code == "AlreadyExistsException"
        made = str(caught.value).rsplit(": ", 1)[1].rstrip(")")
        assert await east.get_key_id("alias/taken") == made


async def test_forged_every_region_blobs_are_decryption_errors() -> None:
    async with (
        LocalKMSService(region=EAST) as east,
        LocalKMSService(region=WEST) as west,
        MultiRegionKMSService([east, west], mode="every-region") as kms,
    ):
        key = await kms.create_key("app")
        wrapped = await kms.encrypt_dek(key, DEK, context=CONTEXT)
        assert wrapped[:6] == b"EXMR\x01\x02"
        at, copies = 6, []
        for _ in range(2):
            name_end = at + 1 + wrapped[at]
            end = name_end + 2 + int.from_bytes(wrapped[name_end : name_end + 2], "big")
            copies.append((wrapped[at + 1 : name_end], wrapped[name_end + 2 : end]))
            at = end
        assert [name for name, _ in copies] == [EAST.encode(), WEST.encode()]

        def pack(entries: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
            body = b"".join(bytes([len(n)]) + n + len(c).to_bytes(2, "big") + c for n, c in entries)
            return b"EXMR\x01" + bytes([len(entries) if count is None else count]) + body

        assert pack(copies) == wrapped
        (east_name, east_copy), (west_name, west_copy) = copies
        forged = {
            # Each region's copy under the other's name: each region's KMS refuses it.
            "swapped": pack([(east_name, west_copy), (west_name, east_copy)]),
            "no copies": pack([]),
            "count too high": pack(copies, count=3),
            "count too low": pack(copies, count=1),
            "same region twice": pack([(east_name, east_copy), (east_name, east_copy)]),
            "empty copy": pack([(east_name, b""), (west_name, west_copy)]),
            "bad region name": pack([(b"US-EAST-1", east_copy)]),
            "no region known": pack([(b"ap-south-1", east_copy)]),
            "non-ascii name": pack([(b"\xff", east_copy)]),
        }
        for what, blob in forged.items():
            with pytest.raises(errors.DecryptionError) as caught:
                await kms.decrypt_dek(key, blob, context=CONTEXT)
            assert str(caught.value) == str(errors.DecryptionError(DECRYPT_FAILED)), what
        # The copy of one region alone, correctly labelled, still opens.
        assert await kms.decrypt_dek(key, pack([copies[1]]), context=CONTEXT) == DEK


def test_region_names_are_bounded() -> None:
    with pytest.raises(errors.ConfigurationError, match="region"):
        MultiRegionKMSService([LocalKMSService(region="r" * 65)])
    assert MultiRegionKMSService([LocalKMSService(region="r" * 64)]).regions == ("r" * 64,)


# -- a region whose breaker is open still serves when nothing else can ------------


@pytest.mark.slow
async def test_a_recovered_region_serves_while_its_breaker_is_open(
    kms: tuple[MultiRegionKMSService, FakeClock], servers: dict[str, RegionServer]
) -> None:
    service, clock = kms
    key = await service.create_key("app")
    wrapped = await service.encrypt_dek(key, DEK)
    servers[EAST].stop()
    await fail_probes(service, clock, key, wrapped, times=2)
    east = service.stats().region(EAST)
    assert (east.breaker, east.retry_in) == ("open", 4 * RESET)  # doubled twice
    servers[EAST].start()  # east is back, but its breaker says so only in 40 s
    clock.advance(RESET)
    calls = east.calls
    servers[WEST].stop()
    results: list[bytes] = []

    async def unwrap() -> None:
        results.append(await service.decrypt_dek(key, wrapped))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(unwrap)
        for _ in range(4):
            await unwrap()
    assert results == [DEK] * 12  # no RegionsUnavailableError while east is healthy
    east = service.stats().region(EAST)
    # The first call with nowhere else to go probed east early; that closed the breaker.
    assert (east.breaker, east.retry_in, east.consecutive_failures) == ("closed", None, 0)
    assert east.calls - calls == 12
    assert service.stats().unavailable == 0
    # A wrap finds east too, and west is left out only after its own breaker opened.
    assert await service.decrypt_dek(key, await service.encrypt_dek(key, DEK)) == DEK
    assert service.stats().region(WEST).breaker == "open"


@pytest.mark.slow
async def test_early_probes_when_every_region_is_down(servers: dict[str, RegionServer]) -> None:
    clock = FakeClock()
    async with multi(servers, clock, attempt_timeout=2) as service:
        await early_probes(service, clock, servers)


async def early_probes(
    service: MultiRegionKMSService, clock: FakeClock, servers: dict[str, RegionServer]
) -> None:
    key = await service.create_key("app")
    wrapped = await service.encrypt_dek(key, DEK)
    for server in servers.values():
        server.stop()
    for _ in range(2):
        with pytest.raises(RegionsUnavailableError):
            await service.decrypt_dek(key, wrapped)
    stats = service.stats()
    assert [region.breaker for region in stats.regions] == ["open", "open"]
    calls = [region.calls for region in stats.regions]
    # Just failed: no early probe yet, the call fails at once.
    with pytest.raises(RegionsUnavailableError, match="circuit open"):
        await service.decrypt_dek(key, wrapped)
    assert [region.calls for region in service.stats().regions] == calls
    # attempt_timeout (2 s) after their last failure, a call probes them, oldest failure first.
    clock.advance(2)
    with pytest.raises(RegionsUnavailableError, match="could not be reached") as caught:
        await service.decrypt_dek(key, wrapped)
    assert "circuit open" not in str(caught.value)
    stats = service.stats()
    assert [r.calls - c for r, c in zip(stats.regions, calls, strict=True)] == [1, 1]
    # A failed early probe leaves the open period as it was.
    assert [region.retry_in for region in stats.regions] == [RESET - 2, RESET - 2]
    with pytest.raises(RegionsUnavailableError, match="circuit open"):
        await service.encrypt_dek(key, DEK)
    # East comes back: the next early probe closes its breaker, and wraps resume.
    servers[EAST].start()
    clock.advance(2)
    assert service.stats().region(EAST).retry_in == RESET - 4  # still well before its probe
    assert await service.decrypt_dek(key, await service.encrypt_dek(key, DEK)) == DEK
    stats = service.stats()
    assert (stats.region(EAST).breaker, stats.region(WEST).breaker) == ("closed", "open")
    assert stats.partial_wraps == 1


# -- partial wraps: not reused once the region is back, completed by a rewrap ------


@pytest.mark.slow
async def test_partial_wraps_are_cached_only_until_the_region_may_answer(
    servers: dict[str, RegionServer],
) -> None:
    clock = FakeClock()
    async with multi(servers, clock) as kms:
        writer = await Crypto.create(
            kms=kms,
            kek_alias="alias/app",
            create_key_if_missing=True,
            dek_cache=DEKCache(clock=clock),
        )
        reader = await Crypto.create(kms=kms, kek_alias="alias/app")  # no cache: asks KMS
        async with writer, reader:
            key = writer.key_id

            async def write(count: int) -> list[tuple[bytes, bytes]]:
                records = []
                for _ in range(count):
                    plain = secrets.token_bytes(16)
                    records.append((plain, await writer.encrypt(plain, context=CONTEXT)))
                return records

            def wraps() -> int:
                return writer.stats().kms_calls["encrypt_dek"]

            servers[WEST].stop()
            during = await write(5)
            # West failed the first wrap with its breaker still closed: that key
            # was not kept; the second wrap opened the breaker and serves the rest.
            assert (wraps(), kms.stats().partial_wraps) == (2, 2)
            assert kms.partial_wrap(key, parse(during[-1][1]).wrapped_dek) == RESET
            clock.advance(RESET - 1)
            during += await write(2)  # west may not be asked yet: the partial key serves on
            assert wraps() == 2

            servers[WEST].start()
            clock.advance(1)  # west's breaker lets a probe through: the next wrap
            after = await write(5)
            assert (wraps(), kms.stats().partial_wraps) == (3, 2)
            assert kms.stats().region(WEST).breaker == "closed"
            assert {parse(blob).wrapped_dek for _, blob in after} & {
                parse(blob).wrapped_dek for _, blob in during
            } == set()
            for _, blob in after:
                assert kms.partial_wrap(key, parse(blob).wrapped_dek) is None

            # East goes down: every record written since west came back opens through west.
            servers[EAST].stop()
            for plain, blob in after:
                assert await reader.decrypt(blob, context=CONTEXT) == plain
            with pytest.raises(RegionsUnavailableError):
                await reader.decrypt(during[0][1], context=CONTEXT)  # east's copy only

            # A rewrap gives the partial records west's copy, and leaves the others be.
            servers[EAST].start()
            clock.advance(RESET)
            blobs = [blob for _, blob in during + after]
            rewrapped = [b async for b in writer.rewrap_many(blobs, context=CONTEXT)]
            assert writer.stats().kms_calls["re_encrypt_dek"] == 2  # one per partial key
            assert rewrapped[len(during) :] == blobs[len(during) :]
            for old, new in zip(blobs[: len(during)], rewrapped, strict=False):
                assert new != old
                assert kms.partial_wrap(key, parse(new).wrapped_dek) is None
            assert await writer.rewrap(rewrapped[0], context=CONTEXT) == rewrapped[0]
            records = [
                (plain, new) for (plain, _), new in zip(during + after, rewrapped, strict=True)
            ]
            for down, up in ((EAST, WEST), (WEST, EAST)):
                servers[down].stop()
                clock.advance(4 * RESET)  # whatever the breakers say, each may be probed
                for plain, blob in records:
                    assert await reader.decrypt(blob, context=CONTEXT) == plain
                servers[down].start()
                assert kms.stats().region(up).breaker == "closed"
