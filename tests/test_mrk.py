"""Multi-region keys: the local provider's MRK semantics, the AWS provider's MRK calls
against moto, and MultiRegionKMSService in "replicas" mode over local regions.

Moto 5.2.5 creates and replicates multi-region keys but will not decrypt through
a replica, so what a replica can unwrap is tested against LocalKMSService,
which follows AWS: an ``mrk-`` key and its replicas share id and material,
any other key stays in its region.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

from encx_async import Crypto
from encx_async import _exceptions as errors
from encx_async._envelope import parse
from encx_async.providers.aws import (
    Config,
    KMSService,
    MultiRegionKMSService,
    RegionsUnavailableError,
    is_multi_region_key,
)
from encx_async.providers.local import LocalKMSService
from tests.support import FakeClock

EAST = "us-east-1"
WEST = "eu-west-1"
ACCOUNT = "123456789012"
DEK = bytes(range(32))
CONTEXT = {"tenant": "acme"}
MRK_ID_RE = re.compile(r"^mrk-[0-9a-f]{32}$")


class FlakyLocal(LocalKMSService):
    """A LocalKMSService whose region can go down (KMSUnavailableError) or hang."""

    down = False
    hang = False
    gate: anyio.Event | None = None  # calls wait for it, then go on (or fail, if down)
    calls = 0

    async def _outage(self) -> None:
        self.calls += 1
        if self.hang:
            await anyio.sleep_forever()
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise errors.KMSUnavailableError(f"region {self.region} is down (test)")

    async def _ensure_open(self) -> None:
        # Every other call (create_key, create_alias, a replica's side of
        # replicate_key) opens first: a region that is down refuses those too.
        if self.down:
            raise errors.KMSUnavailableError(f"region {self.region} is down (test)")
        await super()._ensure_open()

    async def get_key_id(self, alias: str) -> str:
        await self._outage()
        return await super().get_key_id(alias)

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        await self._outage()
        return await super().encrypt_dek(key_id, plaintext_dek, context=context)

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        await self._outage()
        return await super().decrypt_dek(key_id, ciphertext_dek, context=context)


@pytest_asyncio.fixture(loop_scope="function")
async def east() -> AsyncIterator[FlakyLocal]:
    async with FlakyLocal(region=EAST) as kms:
        yield kms


@pytest_asyncio.fixture(loop_scope="function")
async def west() -> AsyncIterator[FlakyLocal]:
    async with FlakyLocal(region=WEST) as kms:
        yield kms


async def replicated_key(primary: LocalKMSService, replica: LocalKMSService, alias: str) -> str:
    key_id = await primary.create_key("mrk", alias=alias, multi_region=True)
    assert await primary.replicate_key(key_id, replica, alias=alias) == key_id
    return key_id


# -- recognising multi-region keys -------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("mrk-1234abcd12ab34cd56ef1234567890ab", True),
        (f"arn:aws:kms:{WEST}:{ACCOUNT}:key/mrk-1234abcd12ab34cd56ef1234567890ab", True),
        ("arn:local:kms:dev:000000000000:key/mrk-1234abcd12ab34cd56ef1234567890ab", True),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", False),
        (f"arn:aws:kms:{WEST}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab", False),
        ("alias/mrk-looking-alias", False),
        (f"arn:aws:kms:{WEST}:{ACCOUNT}:alias/mrk-looking-alias", False),
        ("mrk-", False),
        ("arn:aws:s3:::mrk-bucket", False),
    ],
)
def test_is_multi_region_key(ref: str, expected: bool) -> None:
    assert is_multi_region_key(ref) is expected


# -- LocalKMSService with MRK semantics ---------------------------------------------


async def test_local_mrk_unwraps_through_its_replica(east: FlakyLocal, west: FlakyLocal) -> None:
    key_id = await replicated_key(east, west, "alias/orders")
    assert MRK_ID_RE.fullmatch(key_id)
    wrapped_east = await east.encrypt_dek(key_id, DEK, context=CONTEXT)
    wrapped_west = await west.encrypt_dek("alias/orders", DEK, context=CONTEXT)
    assert await west.decrypt_dek(key_id, wrapped_east, context=CONTEXT) == DEK
    assert await east.decrypt_dek("alias/orders", wrapped_west, context=CONTEXT) == DEK
    # The primary's ARN names the replica in the other region: no region mismatch.
    assert await west.get_key_id(east.key_arn(key_id)) == key_id
    assert await west.decrypt_dek(east.key_arn(key_id), wrapped_east, context=CONTEXT) == DEK
    with pytest.raises(errors.DecryptionError):
        await west.decrypt_dek(key_id, wrapped_east, context={"tenant": "other"})


async def test_local_single_region_keys_stay_in_their_region(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    key_id = await east.create_key("single", alias="alias/single")
    assert not key_id.startswith("mrk-")
    wrapped = await east.encrypt_dek(key_id, DEK)
    with pytest.raises(errors.KMSKeyNotFoundError):
        await west.decrypt_dek(key_id, wrapped)
    with pytest.raises(errors.KMSRegionMismatchError, match=EAST):
        await west.decrypt_dek(east.key_arn(key_id), wrapped)
    # An MRK that was never replicated here is missing, not a region mismatch.
    lonely = await east.create_key("lonely", multi_region=True)
    with pytest.raises(errors.KMSKeyNotFoundError):
        await west.get_key_id(east.key_arn(lonely))
    # The same material under another id does not open it either.
    other = await replicated_key(east, west, "alias/other")
    with pytest.raises(errors.DecryptionError):
        await west.decrypt_dek(other, wrapped)


async def test_local_replicate_refusals(east: FlakyLocal, west: FlakyLocal) -> None:
    single = await east.create_key("single")
    with pytest.raises(errors.KMSError) as caught:
        await east.replicate_key(single, west)
    assert caught.value.code == "UnsupportedOperationException"
    key_id = await replicated_key(east, west, "alias/k")
    with pytest.raises(errors.KMSError) as caught:
        await west.replicate_key(key_id, east)  # a replica does not replicate
    assert caught.value.code == "UnsupportedOperationException"
    # Replicating again only links the primary to the replica it has already.
    assert await east.replicate_key(key_id, west) == key_id
    async with LocalKMSService(region=WEST) as other_west:
        await other_west.create_key("squatter", alias="alias/k")
        with pytest.raises(errors.KMSError) as caught:
            await east.replicate_key(key_id, other_west, alias="alias/k")
        assert caught.value.code == "AlreadyExistsException"
        with pytest.raises(errors.KMSKeyNotFoundError):
            await other_west.get_key_id(key_id)  # nothing half-made
    async with LocalKMSService(region=EAST) as same_region:
        with pytest.raises(errors.ConfigurationError, match="another region"):
            await east.replicate_key(key_id, same_region)
    with pytest.raises(TypeError):
        await east.replicate_key(key_id, "eu-west-1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await east.create_key("k", multi_region="yes")  # type: ignore[arg-type]


async def test_local_primary_rotation_reaches_the_replica(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    key_id = await replicated_key(east, west, "alias/k")
    before = await west.encrypt_dek(key_id, DEK)
    await east.rotate_key_material(key_id)
    after_east = await east.encrypt_dek(key_id, DEK)
    after_west = await west.encrypt_dek(key_id, DEK)
    # The newest material is used on both sides, and each opens the other's.
    assert after_east[2 + after_east[1] : 6 + after_east[1]] == (1).to_bytes(4, "big")
    assert after_west[2 + after_west[1] : 6 + after_west[1]] == (1).to_bytes(4, "big")
    assert await west.decrypt_dek(key_id, after_east) == DEK
    assert await east.decrypt_dek(key_id, after_west) == DEK
    assert await east.decrypt_dek(key_id, before) == DEK
    with pytest.raises(errors.KMSError) as caught:
        await west.rotate_key_material(key_id)
    assert caught.value.code == "UnsupportedOperationException"
    assert EAST in str(caught.value)


async def test_local_create_alias(east: FlakyLocal) -> None:
    key_id = await east.create_key("k")
    await east.create_alias("alias/second-name", key_id)
    assert await east.get_key_id("alias/second-name") == key_id
    with pytest.raises(errors.KMSError) as caught:
        await east.create_alias("alias/second-name", key_id)
    assert caught.value.code == "AlreadyExistsException"
    with pytest.raises(errors.KMSKeyNotFoundError):
        await east.create_alias("alias/third", "alias/missing")


async def test_local_mrk_survives_the_key_file(tmp_path: Path) -> None:
    east_file, west_file = tmp_path / "east.json", tmp_path / "west.json"
    async with (
        LocalKMSService(east_file, region=EAST) as east,
        LocalKMSService(west_file, region=WEST) as west,
    ):
        key_id = await replicated_key(east, west, "alias/k")
        wrapped = await east.encrypt_dek(key_id, DEK)
    async with (
        LocalKMSService(east_file, region=EAST) as east,
        LocalKMSService(west_file, region=WEST) as west,
    ):
        assert await west.decrypt_dek("alias/k", wrapped) == DEK
        with pytest.raises(errors.KMSError, match="replica"):
            await west.rotate_key_material(key_id)
        await east.rotate_key_material(key_id)  # still the primary after reloading


# -- KMSService: creating and replicating MRKs (moto) ---------------------------------


async def test_aws_create_replicate_and_alias(moto_endpoint: str) -> None:
    async with (
        KMSService(Config(region=EAST, endpoint_url=moto_endpoint)) as east,
        KMSService(Config(region=WEST, endpoint_url=moto_endpoint)) as west,
    ):
        # No alias in east: moto's replica shares the primary's aliases (AWS's does not).
        primary = await east.create_key("mrk", multi_region=True)
        assert primary.startswith(f"arn:aws:kms:{EAST}:")
        assert ":key/mrk-" in primary
        replica = await east.replicate_key(primary, WEST)
        assert replica == primary.replace(f":{EAST}:", f":{WEST}:")
        await west.create_alias("alias/mrk", primary)  # the primary's ARN names the replica
        assert await west.get_key_id("alias/mrk") == replica
        # The west service sends the replica's ARN when given the primary's.
        assert await west.get_key_id(primary) == replica
        # moto encrypts under a replica (but will not decrypt through one).
        assert await west.encrypt_dek(primary, DEK)
        single = await east.create_key("single")
        assert ":key/mrk-" not in single
        with pytest.raises(errors.KMSRegionMismatchError):
            await west.encrypt_dek(single, DEK)
        with pytest.raises(errors.ConfigurationError, match="another region"):
            await east.replicate_key(primary, EAST)
        with pytest.raises(errors.ConfigurationError, match="region name"):
            await east.replicate_key(primary, "Mars")
        with pytest.raises(errors.KMSError) as caught:
            await west.create_alias("alias/mrk", replica)
        assert caught.value.code == "AlreadyExistsException"


# -- MultiRegionKMSService, "replicas" mode, over local regions -----------------------


def replicas(
    *services: LocalKMSService, clock: FakeClock | None = None, **options: Any
) -> MultiRegionKMSService:
    return MultiRegionKMSService(
        services,
        mode="replicas",
        failure_threshold=2,
        reset_timeout=10.0,
        max_reset_timeout=40.0,
        clock=clock or FakeClock(),
        **options,
    )


async def test_replicas_fail_over_with_crypto(east: FlakyLocal, west: FlakyLocal) -> None:
    clock = FakeClock()
    # This process runs in west: west is nearest, east holds the primary.
    async with replicas(west, east, primary=EAST, clock=clock) as kms:
        crypto = await Crypto.create(kms=kms, kek_alias="alias/app", create_key_if_missing=True)
        async with crypto:
            key_id = crypto.key_id
            assert MRK_ID_RE.fullmatch(key_id)
            assert await west.get_key_id("alias/app") == key_id  # replicated, with its alias
            records: list[tuple[bytes, bytes]] = []

            async def write_and_read(count: int) -> None:
                for _ in range(count):
                    plain = secrets.token_bytes(24)
                    blob = await crypto.encrypt(plain, context=CONTEXT)
                    records.append((plain, blob))
                    assert await crypto.decrypt(blob, context=CONTEXT) == plain

            east.calls = west.calls = 0
            await write_and_read(3)
            assert (east.calls, west.calls) == (3, 3)  # wraps in east, unwraps in west

            east.down = True
            before = kms.stats().region(EAST).calls
            await write_and_read(3)  # wraps move to west; no error reaches the caller
            stats = kms.stats().region(EAST)
            assert (stats.calls - before, stats.failures, stats.skipped) == (2, 2, 1)
            assert stats.breaker == "open"
            assert stats.retry_in == 10.0
            assert stats.failovers == 3

            west.down, east.down = True, False
            clock.advance(10)  # east's breaker lets a probe through: the next wrap
            await write_and_read(3)  # and now the unwraps move to east
            assert kms.stats().region(EAST).breaker == "closed"
            stats = kms.stats().region(WEST)
            assert (stats.failures, stats.skipped, stats.breaker) == (2, 1, "open")

            west.down = False
            for plain, blob in records:
                assert await crypto.decrypt(blob, context=CONTEXT) == plain
    assert kms.stats().unavailable == 0


async def test_replicas_single_region_key_is_pinned(east: FlakyLocal, west: FlakyLocal) -> None:
    key_id = await east.create_key("single")
    async with replicas(west, east, primary=EAST) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK)
        assert west.calls == 0
        assert await kms.decrypt_dek(key_id, wrapped) == DEK
        assert west.calls == 0  # west is nearer, but the key is not there
        east.down = True
        with pytest.raises(RegionsUnavailableError) as caught:
            await kms.decrypt_dek(key_id, wrapped)
        assert caught.value.regions == (EAST,)
        assert isinstance(caught.value, errors.KMSUnavailableError)
        assert isinstance(caught.value.__cause__, errors.KMSUnavailableError)
        arn = f"arn:local:kms:ap-south-1:000000000000:key/{key_id}"
        with pytest.raises(errors.KMSRegionMismatchError, match="ap-south-1"):
            await kms.encrypt_dek(arn, DEK)


async def test_replicas_answers_do_not_fail_over(east: FlakyLocal, west: FlakyLocal) -> None:
    key_id = await replicated_key(east, west, "alias/k")
    async with replicas(east, west) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK, context=CONTEXT)
        with pytest.raises(errors.DecryptionError):
            await kms.decrypt_dek(key_id, wrapped, context={"tenant": "other"})
        lonely = await east.create_key("lonely", multi_region=True)  # never replicated
        east.down = True
        with pytest.raises(errors.KMSKeyNotFoundError):
            await kms.encrypt_dek(lonely, DEK)
        assert west.calls == 1  # west answered "not found": that is an answer
    stats = kms.stats()
    assert stats.region(EAST).failures == 1
    assert stats.region(WEST).failures == 0
    assert stats.region(EAST).breaker == "closed"


async def test_replicas_hanging_region_times_out(east: FlakyLocal, west: FlakyLocal) -> None:
    key_id = await replicated_key(east, west, "alias/k")
    async with replicas(east, west, attempt_timeout=0.05) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK)
        east.hang = True
        with anyio.fail_after(2):
            assert await kms.decrypt_dek(key_id, wrapped) == DEK
        west.hang = True
        with pytest.raises(RegionsUnavailableError) as caught:
            await kms.decrypt_dek(key_id, wrapped)
    message = str(caught.value)
    assert "no answer within 0.05 s" in message
    assert EAST in message
    assert WEST in message
    assert DEK.hex() not in message


async def test_replicas_rotation_paths(east: LocalKMSService, west: LocalKMSService) -> None:
    async with replicas(east, west) as kms:
        crypto = await Crypto.create(
            kms=kms, kek_alias="alias/app", create_key_if_missing=True, rotation="kms-managed"
        )
        async with crypto:
            old = await crypto.encrypt(b"before", context=CONTEXT)
            await crypto.rotate_kek()  # material rotates in the primary and reaches west
            assert crypto.kek_version == 2
            await crypto.rotate_kek(rotation="new-key")  # a new MRK, replicated, alias moved
            assert crypto.kek_version == 3
            new_key = crypto.key_id
            assert MRK_ID_RE.fullmatch(new_key)
            assert await west.get_key_id("alias/app") == new_key
            moved = await crypto.rewrap(old, context=CONTEXT)
            for blob in (old, moved):
                assert await crypto.decrypt(blob, context=CONTEXT) == b"before"
            await kms.enable_key_rotation(new_key, period_days=90)


async def test_replicas_create_key_reports_a_failed_replication(
    east: LocalKMSService, west: FlakyLocal
) -> None:
    await west.create_key("squatter", alias="alias/taken")
    async with replicas(east, west) as kms:
        with pytest.raises(errors.KMSError, match=f"not replicated to {WEST}") as caught:
            await kms.create_key("k", alias="alias/taken")
    assert caught.value.code == "AlreadyExistsException"
    assert "mrk-" in str(caught.value)


async def trip(kms: MultiRegionKMSService, region: FlakyLocal, key_id: str, wrapped: bytes) -> None:
    """Take ``region`` down and fail enough unwraps there to open its breaker (threshold 2)."""
    region.down = True
    for _ in range(2):
        await kms.decrypt_dek(key_id, wrapped)
    assert kms.stats().region(region.region).breaker == "open"


async def test_cancelled_probe_leaves_the_breaker_half_open(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    clock = FakeClock()
    key_id = await replicated_key(east, west, "alias/k")
    async with replicas(east, west, clock=clock) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK)
        await trip(kms, east, key_id, wrapped)
        clock.advance(10)
        east.down, east.hang = False, True
        calls = east.calls
        with anyio.move_on_after(0.1):
            await kms.decrypt_dek(key_id, wrapped)  # the probe hangs; the caller gives up
        assert east.calls == calls + 1
        assert kms.stats().region(EAST).breaker == "half-open"
        east.hang = False
        assert await kms.decrypt_dek(key_id, wrapped) == DEK  # a new probe, which succeeds
        assert east.calls == calls + 2
        assert kms.stats().region(EAST).breaker == "closed"


# -- review fixes -------------------------------------------------------------------


async def test_every_region_create_key_with_a_region_down(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    west.down = True
    async with MultiRegionKMSService([east, west], mode="every-region") as kms:
        with pytest.raises(RegionsUnavailableError, match="keys made: us-east-1: ") as caught:
            await kms.create_key("k", alias="alias/app")
    assert caught.value.regions == (WEST,)
    assert caught.value.operation == "create_key"
    made = str(caught.value).rsplit(": ", 1)[1].rstrip(")")
    assert await east.get_key_id("alias/app") == made


async def test_replicas_create_key_with_a_replica_region_down(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    west.down = True
    async with replicas(east, west) as kms:
        with pytest.raises(RegionsUnavailableError, match=f"not replicated to {WEST}") as caught:
            await kms.create_key("k", alias="alias/app")
    assert caught.value.regions == (WEST,)
    made = await east.get_key_id("alias/app")
    assert made in str(caught.value)


async def test_breaker_forgets_old_trips_without_calls_in_between(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    # A region nobody calls while healthy still gets its past forgiven.
    clock = FakeClock()
    key_id = await replicated_key(east, west, "alias/k")
    async with replicas(east, west, clock=clock) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK)
        await trip(kms, east, key_id, wrapped)
        assert kms.stats().region(EAST).retry_in == 10.0
        east.down = False
        clock.advance(10)
        await kms.decrypt_dek(key_id, wrapped)  # the probe closes the breaker
        assert kms.stats().region(EAST).breaker == "closed"
        clock.advance(1000)  # healthy, and idle, for far longer than it was down
        await trip(kms, east, key_id, wrapped)
        assert kms.stats().region(EAST).retry_in == 10.0


async def test_bad_input_does_not_use_the_probe(east: FlakyLocal, west: FlakyLocal) -> None:
    clock = FakeClock()
    key_id = await replicated_key(east, west, "alias/k")
    async with replicas(east, west, clock=clock) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK)
        await trip(kms, east, key_id, wrapped)
        clock.advance(10)
        calls = (east.calls, west.calls)
        with pytest.raises(errors.ConfigurationError):
            await kms.encrypt_dek(key_id, b"")
        with pytest.raises(errors.ConfigurationError):
            await kms.decrypt_dek(key_id, wrapped, context={"tenant": 1})  # type: ignore[dict-item]
        assert (east.calls, west.calls) == calls  # refused before any region
        east_stats = kms.stats().region(EAST)
        assert (east_stats.breaker, east_stats.failures) == ("half-open", 2)


async def test_a_closed_borrowed_service_does_not_close_the_breaker(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    clock = FakeClock()
    key_id = await replicated_key(east, west, "alias/k")
    async with replicas(east, west, clock=clock) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK)
        await trip(kms, east, key_id, wrapped)
        clock.advance(10)
        east.down = False
        await east.aclose()  # its owner closed it: the region said nothing
        with pytest.raises(errors.ClosedError):
            await kms.decrypt_dek(key_id, wrapped)
        assert kms.stats().region(EAST).breaker == "half-open"


async def test_local_replica_relinks_after_reloading(tmp_path: Path) -> None:
    east_file, west_file = tmp_path / "east.json", tmp_path / "west.json"
    async with (
        LocalKMSService(east_file, region=EAST) as east,
        LocalKMSService(west_file, region=WEST) as west,
    ):
        key_id = await replicated_key(east, west, "alias/k")
    async with (
        LocalKMSService(east_file, region=EAST) as east,
        LocalKMSService(west_file, region=WEST) as west,
    ):
        await east.rotate_key_material(key_id)  # before the link is made again
        # Replicating again links the primary to its existing replica, which catches up.
        assert await east.replicate_key(key_id, west, alias="alias/k") == key_id
        wrapped = await east.encrypt_dek(key_id, DEK)
        assert await west.decrypt_dek(key_id, wrapped) == DEK
        await east.rotate_key_material(key_id)  # and later rotations reach it
        wrapped = await east.encrypt_dek(key_id, DEK)
        assert await west.decrypt_dek(key_id, wrapped) == DEK
    async with LocalKMSService(west_file, region=WEST) as west:
        assert await west.decrypt_dek(key_id, wrapped) == DEK  # persisted in the replica's file


async def test_local_relink_refuses_an_alias_of_another_key(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    key_id = await replicated_key(east, west, "alias/k")
    await west.create_key("squatter", alias="alias/taken")
    with pytest.raises(errors.KMSError) as caught:
        await east.replicate_key(key_id, west, alias="alias/taken")
    assert caught.value.code == "AlreadyExistsException"
    assert await east.replicate_key(key_id, west, alias="alias/second") == key_id
    assert await west.get_key_id("alias/second") == key_id


async def test_half_open_lets_one_probe_through_and_a_timed_out_probe_reopens(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    clock = FakeClock()
    key_id = await replicated_key(east, west, "alias/k")
    async with replicas(east, west, clock=clock, attempt_timeout=0.05) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK)
        await trip(kms, east, key_id, wrapped)
        clock.advance(10)
        east.down, east.hang = False, True
        calls = east.calls
        results: list[bytes] = []

        async def unwrap() -> None:
            results.append(await kms.decrypt_dek(key_id, wrapped))

        with anyio.fail_after(2):
            async with anyio.create_task_group() as group:
                for _ in range(5):
                    group.start_soon(unwrap)
        assert results == [DEK] * 5  # the probe timed out and moved on; the others skipped
        assert east.calls == calls + 1
        stats = kms.stats().region(EAST)
        assert (stats.breaker, stats.retry_in, stats.skipped) == ("open", 20.0, 4)
        east.hang = False
        clock.advance(20)
        assert await kms.decrypt_dek(key_id, wrapped) == DEK  # the slot was freed: a new probe
        assert kms.stats().region(EAST).breaker == "closed"


async def test_one_probe_at_a_time_when_no_region_is_left(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    clock = FakeClock()
    key_id = await replicated_key(east, west, "alias/k")
    async with replicas(east, west, clock=clock) as kms:
        wrapped = await kms.encrypt_dek(key_id, DEK)

        async def both_open() -> None:
            await trip(kms, east, key_id, wrapped)
            west.down = True
            for _ in range(2):
                with pytest.raises(RegionsUnavailableError):
                    await kms.decrypt_dek(key_id, wrapped)
            assert [r.breaker for r in kms.stats().regions] == ["open", "open"]
            clock.advance(5)  # attempt_timeout after the last failures: early probes allowed

        async def storm(outcomes: list[object]) -> None:
            async def unwrap() -> None:
                try:
                    outcomes.append(await kms.decrypt_dek(key_id, wrapped))
                except RegionsUnavailableError as exc:
                    outcomes.append(exc)

            with anyio.fail_after(2):
                async with anyio.create_task_group() as group:
                    for _ in range(5):
                        group.start_soon(unwrap)
                    await anyio.wait_all_tasks_blocked()
                    # One caller probes east; the four others wait for its outcome.
                    assert (east.calls, west.calls) == (calls[0] + 1, calls[1])
                    assert kms.stats().region(EAST).breaker == "half-open"
                    assert east.gate is not None
                    east.gate.set()

        await both_open()
        east.down, east.gate = False, anyio.Event()
        calls = (east.calls, west.calls)
        outcomes: list[object] = []
        await storm(outcomes)
        assert outcomes == [DEK] * 5  # the probe closed the breaker; the others used east
        assert (east.calls, west.calls) == (calls[0] + 5, calls[1])
        assert kms.stats().region(EAST).breaker == "closed"

        # The probe fails this time: its waiters do not probe east again, and
        # west, probed once for all of them, fails too.
        west.down = False
        assert await kms.decrypt_dek(key_id, wrapped) == DEK
        clock.advance(100)  # long enough that east's past is forgiven
        await both_open()
        east.gate = anyio.Event()
        calls = (east.calls, west.calls)
        outcomes = []
        await storm(outcomes)
        assert len(outcomes) == 5
        assert all(isinstance(outcome, RegionsUnavailableError) for outcome in outcomes)
        assert (east.calls, west.calls) == (calls[0] + 1, calls[1] + 1)


async def test_every_region_rewrap_adds_the_missing_copies(
    east: FlakyLocal, west: FlakyLocal
) -> None:
    clock = FakeClock()
    async with MultiRegionKMSService(
        [east, west], mode="every-region", failure_threshold=2, reset_timeout=10.0, clock=clock
    ) as kms:
        crypto = await Crypto.create(
            kms=kms,
            kek_alias="alias/app",
            create_key_if_missing=True,
            database="sqlite:///:memory:",
        )
        async with crypto:
            west.down = True
            blob = await crypto.encrypt(b"partial", context=CONTEXT)
            assert kms.stats().partial_wraps == 1
            with pytest.raises(RegionsUnavailableError) as caught:
                await crypto.rewrap(blob, context=CONTEXT)  # west cannot take its copy yet
            assert caught.value.regions == (WEST,)
            west.down = False
            clock.advance(10)
            calls = (east.calls, west.calls)
            completed = await crypto.rewrap(blob, context=CONTEXT)  # same KEK version
            assert completed != blob
            # Unwrapped in east and wrapped in west (east's copy re-encrypted in east).
            assert (east.calls, west.calls) == (calls[0] + 1, calls[1] + 1)
            assert parse(completed).wrapped_dek[:6] == b"EXMR\x01\x02"
            assert kms.partial_wrap(crypto.key_id, parse(completed).wrapped_dek) is None
            await crypto.rotate_kek()
            moved = await crypto.rewrap(blob, context=CONTEXT)  # to the new key, both copies
            assert kms.partial_wrap(crypto.key_id, parse(moved).wrapped_dek) is None
            east.down = True
            for done in (completed, moved):
                assert await crypto.decrypt(done, context=CONTEXT) == b"partial"
            assert kms.stats().region(EAST).breaker == "open"
