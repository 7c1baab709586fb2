"""The KEK version is bound in the KMS encryption context (kms-managed rotation)."""

from __future__ import annotations

import struct

import pytest

from encx_async import ConfigurationError, Crypto, DecryptionError, KeyManagementService

ALIAS = "alias/binding-test"
CTX = {"tenant": "acme"}


def relabel(blob: bytes, version: int) -> bytes:
    """What an attacker with write access to rows can do: edit the header's version."""
    return blob[:4] + struct.pack(">I", version) + blob[8:]


async def test_a_relabelled_retired_envelope_does_not_decrypt(
    kms: KeyManagementService,
) -> None:
    await kms.create_key("binding", alias=ALIAS)
    async with await Crypto.create(
        kms=kms, kek_alias=ALIAS, rotation="kms-managed", database="sqlite:///:memory:"
    ) as crypto:
        old = await crypto.encrypt(b"retired data", context=CTX)
        await crypto.rotate_kek()
        await crypto.retire_kek_version(1)
        assert len({v.key_id for v in crypto.kek_versions()}) == 1
        with pytest.raises(DecryptionError) as caught:
            await crypto.decrypt(relabel(old, 2), context=CTX)
        assert str(caught.value) == DecryptionError.MESSAGE


async def test_reserved_context_keys_are_refused(kms: KeyManagementService) -> None:
    await kms.create_key("binding", alias=ALIAS)
    async with await Crypto.create(
        kms=kms, kek_alias=ALIAS, database="sqlite:///:memory:"
    ) as crypto:
        with pytest.raises(ConfigurationError):
            await crypto.encrypt(b"x", context={"encx:kek-version": "1"})
