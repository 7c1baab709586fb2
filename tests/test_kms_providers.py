"""Behaviour every KMS provider shares, run against LocalKMSService and KMSService on moto."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest

from encx_async import _exceptions as errors
from encx_async.kms import KeyManagementService
from encx_async.providers.local import LocalKMSService

DEK = bytes(range(32))
CONTEXT = {"tenant": "acme", "table": "orders"}


async def test_satisfies_the_protocol(kms: KeyManagementService) -> None:
    assert isinstance(kms, KeyManagementService)


async def test_create_key_with_alias(kms: KeyManagementService) -> None:
    created = await kms.create_key("orders key", alias="alias/orders")
    assert await kms.get_key_id("alias/orders") == created
    other = await kms.create_key("second key")
    assert other != created
    assert await kms.get_key_id(other) == other


async def test_create_key_rejects_alias_without_prefix(kms: KeyManagementService) -> None:
    with pytest.raises(errors.ConfigurationError, match="alias/"):
        await kms.create_key("bad alias", alias="orders")


async def test_get_key_id_by_alias_id_and_arn(
    kms: KeyManagementService, aliased_key: dict[str, str]
) -> None:
    canonical = aliased_key["canonical"]
    assert await kms.get_key_id("alias/test-key") == canonical
    assert await kms.get_key_id(aliased_key["key_id"]) == canonical
    assert await kms.get_key_id(aliased_key["arn"]) == canonical
    alias_arn = aliased_key["arn"].rsplit(":", 1)[0] + ":alias/test-key"
    assert await kms.get_key_id(alias_arn) == canonical


@pytest.mark.parametrize(
    "context",
    [None, {}, CONTEXT, {"naïve": "ünïcode ✓", "empty-value": ""}],
    ids=["none", "empty", "plain", "unicode"],
)
async def test_round_trip(
    kms: KeyManagementService, aliased_key: dict[str, str], context: dict[str, str] | None
) -> None:
    wrapped = await kms.encrypt_dek(aliased_key["alias"], DEK, context=context)
    assert isinstance(wrapped, bytes)
    assert DEK not in wrapped
    for ref in (aliased_key["alias"], aliased_key["key_id"], aliased_key["arn"]):
        assert await kms.decrypt_dek(ref, wrapped, context=context) == DEK


async def test_wrapping_is_randomised(
    kms: KeyManagementService, aliased_key: dict[str, str]
) -> None:
    first = await kms.encrypt_dek(aliased_key["alias"], DEK)
    second = await kms.encrypt_dek(aliased_key["alias"], DEK)
    assert first != second


@pytest.mark.parametrize(
    "wrong",
    [
        None,
        {"tenant": "acme"},
        {"tenant": "acme", "table": "invoices"},
        {**CONTEXT, "extra": "1"},
    ],
    ids=["missing", "subset", "changed", "superset"],
)
async def test_wrong_context_is_refused(
    kms: KeyManagementService, aliased_key: dict[str, str], wrong: dict[str, str] | None
) -> None:
    wrapped = await kms.encrypt_dek(aliased_key["alias"], DEK, context=CONTEXT)
    with pytest.raises(errors.DecryptionError) as caught:
        await kms.decrypt_dek(aliased_key["alias"], wrapped, context=wrong)
    assert DEK.hex() not in str(caught.value)


async def test_context_is_required_when_it_was_not_given(
    kms: KeyManagementService, aliased_key: dict[str, str]
) -> None:
    wrapped = await kms.encrypt_dek(aliased_key["alias"], DEK)
    with pytest.raises(errors.DecryptionError):
        await kms.decrypt_dek(aliased_key["alias"], wrapped, context=CONTEXT)


@pytest.mark.parametrize("where", ["last", "middle", "truncated", "garbage"])
async def test_tampered_ciphertext_is_refused(
    kms: KeyManagementService, aliased_key: dict[str, str], where: str
) -> None:
    wrapped = bytearray(await kms.encrypt_dek(aliased_key["alias"], DEK, context=CONTEXT))
    if where == "last":
        wrapped[-1] ^= 0x01
    elif where == "middle":
        wrapped[len(wrapped) - 24] ^= 0x80
    elif where == "truncated":
        del wrapped[-5:]
    else:
        wrapped = bytearray(b"definitely not a wrapped key")
    with pytest.raises(errors.DecryptionError) as caught:
        await kms.decrypt_dek(aliased_key["alias"], bytes(wrapped), context=CONTEXT)
    assert bytes(wrapped).hex() not in str(caught.value)


async def test_unknown_alias(kms: KeyManagementService) -> None:
    with pytest.raises(errors.KMSKeyNotFoundError) as caught:
        await kms.get_key_id("alias/does-not-exist")
    message = str(caught.value)
    assert "alias/does-not-exist" in message
    assert "alias/" in message
    assert "region" in message
    with pytest.raises(errors.KMSKeyNotFoundError, match="alias/does-not-exist"):
        await kms.encrypt_dek("alias/does-not-exist", DEK)


async def test_bare_name_without_alias_prefix(
    kms: KeyManagementService, aliased_key: dict[str, str]
) -> None:
    with pytest.raises(errors.KMSKeyNotFoundError) as caught:
        await kms.get_key_id("test-key")
    message = str(caught.value)
    assert "'test-key'" in message
    assert "did you mean 'alias/test-key'?" in message


async def test_unknown_key_id(kms: KeyManagementService) -> None:
    missing = "0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"
    with pytest.raises(errors.KMSKeyNotFoundError, match=missing):
        await kms.get_key_id(missing)


async def test_use_after_close(kms: KeyManagementService, aliased_key: dict[str, str]) -> None:
    wrapped = await kms.encrypt_dek(aliased_key["alias"], DEK)
    await kms.aclose()
    await kms.aclose()  # idempotent
    with pytest.raises(errors.ClosedError):
        await kms.get_key_id(aliased_key["alias"])
    with pytest.raises(errors.ClosedError):
        await kms.encrypt_dek(aliased_key["alias"], DEK)
    with pytest.raises(errors.ClosedError):
        await kms.decrypt_dek(aliased_key["alias"], wrapped)
    with pytest.raises(errors.ClosedError):
        await kms.create_key("after close")
    with pytest.raises(errors.ClosedError):
        await kms.__aenter__()
    assert "closed" in repr(kms)


async def test_concurrent_calls(kms: KeyManagementService, aliased_key: dict[str, str]) -> None:
    deks = [secrets.token_bytes(32) for _ in range(50)]
    contexts = [{"n": str(i)} for i in range(50)]
    wrapped = await asyncio.gather(
        *(
            kms.encrypt_dek(aliased_key["alias"], dek, context=ctx)
            for dek, ctx in zip(deks, contexts, strict=True)
        )
    )
    assert len(set(wrapped)) == 50
    unwrapped = await asyncio.gather(
        *(
            kms.decrypt_dek(aliased_key["key_id"], blob, context=ctx)
            for blob, ctx in zip(wrapped, contexts, strict=True)
        )
    )
    assert unwrapped == deks


async def test_bad_inputs_are_configuration_errors(
    kms: KeyManagementService, aliased_key: dict[str, str]
) -> None:
    with pytest.raises(errors.ConfigurationError):
        await kms.encrypt_dek(aliased_key["alias"], b"")
    with pytest.raises(errors.ConfigurationError):
        await kms.encrypt_dek(aliased_key["alias"], "not bytes")  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigurationError):
        await kms.encrypt_dek(aliased_key["alias"], DEK, context={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(errors.ConfigurationError):
        await kms.get_key_id("")


# -- LocalKMSService only ----------------------------------------------------


async def test_local_create_and_repr_hide_keys() -> None:
    kms = await LocalKMSService.create(region="dev")
    try:
        key_id = await kms.create_key("k", alias="alias/k")
        assert kms.key_arn(key_id) == f"arn:local:kms:dev:000000000000:key/{key_id}"
        assert await kms.get_key_id(kms.key_arn(key_id)) == key_id
        text = repr(kms)
        assert "dev" in text
        assert "1 key" in text
        material = kms._keys[key_id].material
        assert material.hex() not in text
        assert repr(material) not in repr(kms._keys[key_id])
    finally:
        await kms.aclose()


async def test_local_refuses_another_key(local_kms: LocalKMSService) -> None:
    first = await local_kms.create_key("first", alias="alias/first")
    second = await local_kms.create_key("second", alias="alias/second")
    wrapped = await local_kms.encrypt_dek(first, DEK)
    with pytest.raises(errors.DecryptionError):
        await local_kms.decrypt_dek(second, wrapped)
    with pytest.raises(errors.DecryptionError):
        await local_kms.decrypt_dek("alias/second", wrapped)
    assert await local_kms.decrypt_dek("alias/first", wrapped) == DEK


async def test_local_region_mismatch(local_kms: LocalKMSService) -> None:
    key_id = await local_kms.create_key("k")
    with pytest.raises(errors.KMSRegionMismatchError, match="elsewhere"):
        await local_kms.get_key_id(f"arn:local:kms:elsewhere:000000000000:key/{key_id}")


async def test_local_duplicate_alias(local_kms: LocalKMSService) -> None:
    await local_kms.create_key("k", alias="alias/dup")
    with pytest.raises(errors.KMSError) as caught:
        await local_kms.create_key("k2", alias="alias/dup")
    assert caught.value.code == "AlreadyExistsException"
    assert "1 key" in repr(local_kms)  # the second key was not kept


def _file_state(path: Path) -> tuple[int, list[str], dict[str, Any]]:
    document: dict[str, Any] = json.loads(path.read_text())
    names = sorted(p.name for p in path.parent.iterdir())
    return stat.S_IMODE(path.stat().st_mode), names, document


async def test_local_persistence(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    async with LocalKMSService(path) as kms:
        assert path.exists()  # created on open
        key_id = await kms.create_key("persisted", alias="alias/persisted")
        wrapped = await kms.encrypt_dek("alias/persisted", DEK, context=CONTEXT)
    mode, names, document = _file_state(path)
    assert mode == 0o600
    assert names == ["keys.json"]  # no temp files left behind
    assert document["aliases"] == {"alias/persisted": key_id}
    assert DEK.hex() not in json.dumps(document)

    async with LocalKMSService(path) as reopened:
        assert await reopened.get_key_id("alias/persisted") == key_id
        assert await reopened.decrypt_dek(key_id, wrapped, context=CONTEXT) == DEK


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"format": "encx-async-local-kms", "version": 1, "keys": {}, "aliases": []}',
        b'{"format": "encx-async-local-kms", "version": 1, "aliases": {},'
        b' "keys": {"0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b": {"material": "c2hvcnQ="}}}',
        b'{"format": "encx-async-local-kms", "version": 1, "keys": {},'
        b' "aliases": {"alias/x": "0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"}}',
    ],
    ids=["not-json", "not-object", "bad-aliases", "short-key", "dangling-alias"],
)
async def test_local_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(errors.ConfigurationError) as caught:
        await LocalKMSService.create(path)
    assert str(path) in str(caught.value)


async def test_local_concurrent_key_creation(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    async with LocalKMSService(path) as kms:
        created = await asyncio.gather(
            *(kms.create_key(f"k{i}", alias=f"alias/k{i}") for i in range(20))
        )
    async with LocalKMSService(path) as reopened:
        for i, key_id in enumerate(created):
            assert await reopened.get_key_id(f"alias/k{i}") == key_id
