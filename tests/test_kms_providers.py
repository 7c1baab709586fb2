"""Behaviour every KMS provider shares, run against LocalKMSService and KMSService on moto."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from encx_async import _exceptions as errors
from encx_async.kms import KeyManagementService, KeyRotationService
from encx_async.providers.aws import KMSService
from encx_async.providers.local import LocalKMSService

Provider = LocalKMSService | KMSService  # the provider fixture
KeyFactory = Callable[[KeyManagementService, str], Awaitable[dict[str, str]]]  # make_key

DEK = bytes(range(32))
CONTEXT = {"tenant": "acme", "table": "orders"}
MISSING_KEY = "0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"


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


async def test_bad_values_are_configuration_errors(
    kms: KeyManagementService, aliased_key: dict[str, str]
) -> None:
    alias = aliased_key["alias"]
    with pytest.raises(errors.ConfigurationError, match="1 to 4096 bytes"):
        await kms.encrypt_dek(alias, b"")
    with pytest.raises(errors.ConfigurationError, match="1 to 4096 bytes"):
        await kms.encrypt_dek(alias, bytes(4097))
    # The encryption context is checked by encx_async._context, which calls any
    # malformed context (a non-str value included) a ConfigurationError.
    with pytest.raises(errors.ConfigurationError):
        await kms.encrypt_dek(alias, DEK, context={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(errors.ConfigurationError):
        await kms.encrypt_dek(alias, DEK, context={"": "empty name"})
    with pytest.raises(errors.ConfigurationError):
        await kms.get_key_id("")
    with pytest.raises(errors.ConfigurationError):
        await kms.get_key_id("alias/" + "x" * 2048)
    with pytest.raises(errors.ConfigurationError, match="alias/"):
        await kms.create_key("k", alias="alias/aws/reserved")


async def test_bad_types_are_type_errors(provider: Provider, aliased_key: dict[str, str]) -> None:
    alias = aliased_key["alias"]
    wrapped = await provider.encrypt_dek(alias, DEK)
    bad: list[Any] = [
        provider.encrypt_dek(alias, "not bytes"),  # type: ignore[arg-type]
        provider.encrypt_dek(alias, 32),  # type: ignore[arg-type]
        provider.decrypt_dek(alias, wrapped.hex()),  # type: ignore[arg-type]
        provider.encrypt_dek(b"alias/test-key", DEK),  # type: ignore[arg-type]
        provider.get_key_id(None),  # type: ignore[arg-type]
        provider.create_key(b"description"),  # type: ignore[arg-type]
        provider.create_key("k", alias=b"alias/k"),  # type: ignore[arg-type]
        provider.update_alias(alias, 1),  # type: ignore[arg-type]
        provider.rotate_key_material(None),  # type: ignore[arg-type]
        provider.enable_key_rotation(alias, period_days="365"),  # type: ignore[arg-type]
        provider.enable_key_rotation(alias, period_days=True),
        provider.re_encrypt_dek(
            list(wrapped),  # type: ignore[arg-type]
            source_key_id=alias,
            destination_key_id=alias,
        ),
        provider.describe_key(42),  # type: ignore[arg-type]
    ]
    for call in bad:
        with pytest.raises(TypeError):
            await call
    # Any bytes-like object is accepted at run time, though the signatures say bytes.
    view: Any = memoryview(wrapped)
    mutable: Any = bytearray(DEK)
    assert await provider.decrypt_dek(alias, view) == DEK
    assert await provider.encrypt_dek(alias, mutable) != wrapped


# -- KeyRotationService and describe_key --------------------------------------


async def test_satisfies_the_rotation_protocol(provider: Provider) -> None:
    assert isinstance(provider, KeyRotationService)


async def test_update_alias_moves_the_alias(
    provider: Provider, aliased_key: dict[str, str], make_key: KeyFactory
) -> None:
    alias = aliased_key["alias"]
    first = aliased_key["canonical"]
    second = await make_key(provider, "alias/second")
    before = await provider.encrypt_dek(alias, DEK, context=CONTEXT)
    assert await provider.get_key_id(alias) == first  # now in the alias cache of KMSService

    await provider.update_alias(alias, second["canonical"])
    assert await provider.get_key_id(alias) == second["canonical"]
    after = await provider.encrypt_dek(alias, DEK, context=CONTEXT)
    assert await provider.decrypt_dek(second["key_id"], after, context=CONTEXT) == DEK
    # What the alias wrapped before still unwraps under the key it was wrapped with.
    assert await provider.decrypt_dek(first, before, context=CONTEXT) == DEK

    # The target may be named by ARN or by another alias; aliases are resolved.
    await provider.update_alias(alias, aliased_key["arn"])
    assert await provider.get_key_id(alias) == first
    await provider.update_alias(alias, "alias/second")
    assert await provider.get_key_id(alias) == second["canonical"]
    await provider.update_alias(alias, "alias/second")  # already there: nothing changes
    assert await provider.get_key_id("alias/second") == second["canonical"]


async def test_update_alias_needs_an_existing_alias_and_key(
    provider: Provider, aliased_key: dict[str, str]
) -> None:
    with pytest.raises(errors.KMSKeyNotFoundError, match="alias/never-created"):
        await provider.update_alias("alias/never-created", aliased_key["canonical"])
    with pytest.raises(errors.KMSKeyNotFoundError, match=MISSING_KEY):
        await provider.update_alias(aliased_key["alias"], MISSING_KEY)
    with pytest.raises(errors.KMSKeyNotFoundError, match="alias/nowhere"):
        await provider.update_alias(aliased_key["alias"], "alias/nowhere")
    with pytest.raises(errors.ConfigurationError, match="alias/"):
        await provider.update_alias("test-key", aliased_key["canonical"])
    assert await provider.get_key_id(aliased_key["alias"]) == aliased_key["canonical"]
    with pytest.raises(errors.KMSKeyNotFoundError):
        await provider.get_key_id("alias/never-created")  # and no alias was created


@pytest.mark.parametrize("ref", ["alias", "key_id", "arn"])
async def test_rotate_key_material_keeps_old_wraps(
    provider: Provider, aliased_key: dict[str, str], ref: str
) -> None:
    alias = aliased_key["alias"]
    before = await provider.encrypt_dek(alias, DEK, context=CONTEXT)
    await provider.rotate_key_material(aliased_key[ref])
    assert await provider.get_key_id(alias) == aliased_key["canonical"]  # same key
    assert await provider.decrypt_dek(alias, before, context=CONTEXT) == DEK
    after = await provider.encrypt_dek(alias, DEK, context=CONTEXT)
    assert after != before
    assert await provider.decrypt_dek(aliased_key["key_id"], after, context=CONTEXT) == DEK
    await provider.rotate_key_material(aliased_key["key_id"])  # again
    assert await provider.decrypt_dek(alias, before, context=CONTEXT) == DEK
    assert await provider.decrypt_dek(alias, after, context=CONTEXT) == DEK
    with pytest.raises(errors.DecryptionError):
        await provider.decrypt_dek(alias, after, context={"tenant": "other"})


async def test_rotation_of_a_missing_key(provider: Provider) -> None:
    for call in (
        provider.rotate_key_material(MISSING_KEY),
        provider.rotate_key_material("alias/nowhere"),
        provider.enable_key_rotation(MISSING_KEY),
        provider.enable_key_rotation("alias/nowhere", period_days=90),
    ):
        with pytest.raises(errors.KMSKeyNotFoundError):
            await call


async def test_enable_key_rotation(provider: Provider, aliased_key: dict[str, str]) -> None:
    await provider.enable_key_rotation(aliased_key["alias"])
    await provider.enable_key_rotation(aliased_key["key_id"], period_days=90)
    await provider.enable_key_rotation(aliased_key["arn"], period_days=2560)
    for days in (0, 89, 2561, -365):
        with pytest.raises(errors.ConfigurationError, match="90 to 2560"):
            await provider.enable_key_rotation(aliased_key["alias"], period_days=days)
    # Turning it on changes nothing about wrapping.
    wrapped = await provider.encrypt_dek(aliased_key["alias"], DEK)
    assert await provider.decrypt_dek(aliased_key["alias"], wrapped) == DEK


@pytest.mark.parametrize("context", [None, CONTEXT], ids=["no-context", "context"])
async def test_re_encrypt_dek_moves_a_wrapped_key(
    provider: Provider,
    aliased_key: dict[str, str],
    make_key: KeyFactory,
    context: dict[str, str] | None,
) -> None:
    source = aliased_key
    destination = await make_key(provider, "alias/destination")
    wrapped = await provider.encrypt_dek(source["alias"], DEK, context=context)
    moved = await provider.re_encrypt_dek(
        wrapped,
        source_key_id=source["alias"],
        destination_key_id=destination["alias"],
        context=context,
    )
    assert isinstance(moved, bytes)
    assert DEK not in moved
    for ref in ("alias", "key_id", "arn"):
        assert await provider.decrypt_dek(destination[ref], moved, context=context) == DEK
    with pytest.raises(errors.DecryptionError):
        await provider.decrypt_dek(destination["alias"], moved, context={"tenant": "other"})
    # It is no longer under the source key. (moto answers a Decrypt naming
    # another key with AccessDeniedException; AWS and the local KMS refuse the
    # ciphertext itself.)
    with pytest.raises((errors.DecryptionError, errors.KMSAccessDeniedError)):
        await provider.decrypt_dek(source["alias"], moved, context=context)
    # The original is untouched, and keys can be named by ARN too.
    assert await provider.decrypt_dek(source["alias"], wrapped, context=context) == DEK
    back = await provider.re_encrypt_dek(
        moved, source_key_id=destination["arn"], destination_key_id=source["arn"], context=context
    )
    assert await provider.decrypt_dek(source["key_id"], back, context=context) == DEK


async def test_re_encrypt_dek_refusals(
    provider: Provider, aliased_key: dict[str, str], make_key: KeyFactory
) -> None:
    destination = await make_key(provider, "alias/destination")
    wrapped = await provider.encrypt_dek(aliased_key["alias"], DEK, context=CONTEXT)
    tampered = bytearray(wrapped)
    tampered[-1] ^= 0x01

    def move(blob: bytes, context: dict[str, str] | None = CONTEXT, to: str = "") -> Any:
        return provider.re_encrypt_dek(
            blob,
            source_key_id=aliased_key["alias"],
            destination_key_id=to or destination["alias"],
            context=context,
        )

    for blob, context in (
        (wrapped, {"tenant": "other"}),
        (wrapped, None),
        (bytes(tampered), CONTEXT),
        (b"definitely not a wrapped key", CONTEXT),
        (b"", CONTEXT),
    ):
        with pytest.raises(errors.DecryptionError) as caught:
            await move(blob, context)
        assert DEK.hex() not in str(caught.value)
    with pytest.raises(errors.KMSKeyNotFoundError, match="alias/nowhere"):
        await move(wrapped, to="alias/nowhere")
    with pytest.raises(errors.KMSKeyNotFoundError, match=MISSING_KEY):
        await move(wrapped, to=MISSING_KEY)


@pytest.mark.parametrize("ref", ["alias", "key_id", "arn"])
async def test_describe_key(provider: Provider, aliased_key: dict[str, str], ref: str) -> None:
    described = await provider.describe_key(aliased_key[ref])
    assert described == {
        "key_id": aliased_key["key_id"],
        "arn": aliased_key["arn"],
        "enabled": True,
        "key_state": "Enabled",
    }


async def test_describe_a_missing_key(provider: Provider) -> None:
    with pytest.raises(errors.KMSKeyNotFoundError, match=MISSING_KEY):
        await provider.describe_key(MISSING_KEY)
    with pytest.raises(errors.KMSKeyNotFoundError, match="did you mean 'alias/orders'"):
        await provider.describe_key("orders")


async def test_rotation_after_close(provider: Provider, aliased_key: dict[str, str]) -> None:
    wrapped = await provider.encrypt_dek(aliased_key["alias"], DEK)
    await provider.aclose()
    for call in (
        provider.update_alias(aliased_key["alias"], aliased_key["key_id"]),
        provider.rotate_key_material(aliased_key["key_id"]),
        provider.enable_key_rotation(aliased_key["key_id"]),
        provider.re_encrypt_dek(
            wrapped, source_key_id=aliased_key["alias"], destination_key_id=aliased_key["alias"]
        ),
        provider.describe_key(aliased_key["key_id"]),
    ):
        with pytest.raises(errors.ClosedError):
            await call


async def test_async_with_returns_the_provider_and_closes_it(provider: Provider) -> None:
    async with provider as entered:
        assert entered is provider
    assert "closed" in repr(provider)
    await provider.aclose()
    with pytest.raises(errors.ClosedError):
        async with provider:
            pass


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
        await kms.rotate_key_material(key_id)
        key = kms._keys[key_id]
        assert len(key.materials) == 2
        for material in key.materials:
            assert material.hex() not in text
            assert repr(material) not in repr(key)
            assert material.hex() not in repr(key)
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


_HEAD = b'{"format": "encx-async-local-kms", "version": 2, '
_KEY32 = base64.b64encode(bytes(32))


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"format": "encx-async-local-kms", "version": 1, "keys": {}, "aliases": {}}',
        _HEAD + b'"keys": {}, "aliases": []}',
        _HEAD + b'"aliases": {}, "keys": {"' + MISSING_KEY.encode() + b'": {"materials": []}}}',
        _HEAD
        + b'"aliases": {}, "keys": {"'
        + MISSING_KEY.encode()
        + b'": {"materials": ["'
        + _KEY32
        + b'", "c2hvcnQ="]}}}',
        _HEAD
        + b'"aliases": {}, "keys": {"'
        + MISSING_KEY.encode()
        + b'": {"materials": ["'
        + _KEY32
        + b'"], "rotation": {"enabled": "yes"}}}}',
        _HEAD + b'"keys": {}, "aliases": {"alias/x": "' + MISSING_KEY.encode() + b'"}}',
        b"[" * 100_000 + b"]" * 100_000,  # past the JSON parser's recursion limit
    ],
    ids=[
        "not-json",
        "not-object",
        "old-version",
        "bad-aliases",
        "no-material",
        "short-material",
        "bad-rotation",
        "dangling-alias",
        "nested-too-deep",
    ],
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


async def test_local_file_entry_is_readable(tmp_path: Path) -> None:
    """A hand-written key file in the documented shape opens and unwraps."""
    path = tmp_path / "keys.json"
    path.write_bytes(
        _HEAD
        + b'"aliases": {"alias/x": "'
        + MISSING_KEY.encode()
        + b'"}, "keys": {"'
        + MISSING_KEY.encode()
        + b'": {"materials": ["'
        + _KEY32
        + b'"]}}}'
    )
    os.chmod(path, 0o600)
    async with LocalKMSService(path) as kms:
        assert await kms.get_key_id("alias/x") == MISSING_KEY
        wrapped = await kms.encrypt_dek("alias/x", DEK)
        assert await kms.decrypt_dek("alias/x", wrapped) == DEK


async def test_local_rotation_state_persists(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    async with LocalKMSService(path) as kms:
        first = await kms.create_key("first", alias="alias/app")
        second = await kms.create_key("second")
        old = await kms.encrypt_dek("alias/app", DEK, context=CONTEXT)
        await kms.rotate_key_material("alias/app")
        new = await kms.encrypt_dek("alias/app", DEK, context=CONTEXT)
        await kms.enable_key_rotation(first, period_days=180)
        await kms.enable_key_rotation(second)
    mode, names, document = _file_state(path)
    assert mode == 0o600
    assert names == ["keys.json"]
    entry = document["keys"][first]
    assert len(entry["materials"]) == 2
    assert len(set(entry["materials"])) == 2
    assert entry["rotation"] == {"enabled": True, "period_days": 180}
    assert document["keys"][second]["rotation"] == {"enabled": True, "period_days": 365}
    assert len(document["keys"][second]["materials"]) == 1

    async with LocalKMSService(path) as reopened:
        assert await reopened.decrypt_dek(first, old, context=CONTEXT) == DEK
        assert await reopened.decrypt_dek(first, new, context=CONTEXT) == DEK
        assert reopened._keys[first].rotation_period_days == 180
        # Wrapping goes on with the newest material; rotating again appends.
        await reopened.rotate_key_material(first)
        newest = await reopened.encrypt_dek(first, DEK, context=CONTEXT)
        await reopened.update_alias("alias/app", second)
    async with LocalKMSService(path) as third:
        assert len(third._keys[first].materials) == 3
        assert await third.get_key_id("alias/app") == second
        for blob in (old, new, newest):
            assert await third.decrypt_dek(first, blob, context=CONTEXT) == DEK


async def test_local_wrapped_key_names_its_material(local_kms: LocalKMSService) -> None:
    key_id = await local_kms.create_key("k")
    id_bytes = key_id.encode()
    index_at = 2 + len(id_bytes)
    first = await local_kms.encrypt_dek(key_id, DEK)
    await local_kms.rotate_key_material(key_id)
    second = await local_kms.encrypt_dek(key_id, DEK)
    for blob, index in ((first, 0), (second, 1)):
        assert blob[0] == 2  # format version
        assert blob[1] == len(id_bytes)
        assert blob[2:index_at] == id_bytes
        assert int.from_bytes(blob[index_at : index_at + 4], "big") == index
        assert len(blob) == index_at + 4 + 12 + len(DEK) + 16

    def with_index(blob: bytes, index: int) -> bytes:
        return blob[:index_at] + index.to_bytes(4, "big") + blob[index_at + 4 :]

    # The index is authenticated, and one past the newest material is refused.
    for forged in (with_index(second, 0), with_index(first, 1), with_index(first, 2)):
        with pytest.raises(errors.DecryptionError):
            await local_kms.decrypt_dek(key_id, forged)
    with pytest.raises(errors.DecryptionError):
        await local_kms.decrypt_dek(key_id, b"\x01" + first[1:])  # another format version


async def test_local_re_encrypt_checks_the_source_key(local_kms: LocalKMSService) -> None:
    first = await local_kms.create_key("first")
    second = await local_kms.create_key("second")
    wrapped = await local_kms.encrypt_dek(first, DEK, context=CONTEXT)
    with pytest.raises(errors.DecryptionError):
        await local_kms.re_encrypt_dek(
            wrapped, source_key_id=second, destination_key_id=second, context=CONTEXT
        )
    with pytest.raises(errors.KMSKeyNotFoundError, match=MISSING_KEY):
        await local_kms.re_encrypt_dek(
            wrapped, source_key_id=MISSING_KEY, destination_key_id=second, context=CONTEXT
        )
    # Onto the same key is allowed: it is rewrapped under the newest material.
    await local_kms.rotate_key_material(first)
    moved = await local_kms.re_encrypt_dek(
        wrapped, source_key_id=first, destination_key_id=first, context=CONTEXT
    )
    index_at = 2 + len(first)
    assert int.from_bytes(moved[index_at : index_at + 4], "big") == 1
    assert await local_kms.decrypt_dek(first, moved, context=CONTEXT) == DEK


async def test_local_rotation_never_happens_by_itself(local_kms: LocalKMSService) -> None:
    key_id = await local_kms.create_key("k")
    await local_kms.enable_key_rotation(key_id, period_days=90)
    key = local_kms._keys[key_id]
    assert (key.rotation_enabled, key.rotation_period_days) == (True, 90)
    assert len(key.materials) == 1


async def test_local_failed_write_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    async with LocalKMSService(path) as kms:
        key_id = await kms.create_key("k", alias="alias/k")
        other = await kms.create_key("other")

        def refuse(*args: object) -> None:
            raise errors.ConfigurationError("cannot write the local KMS key file")

        monkeypatch.setattr(LocalKMSService, "_write", staticmethod(refuse))
        for call in (
            kms.rotate_key_material(key_id),
            kms.enable_key_rotation(key_id),
            kms.update_alias("alias/k", other),
        ):
            with pytest.raises(errors.ConfigurationError):
                await call
        key = kms._keys[key_id]
        assert len(key.materials) == 1
        assert not key.rotation_enabled
        assert await kms.get_key_id("alias/k") == key_id
