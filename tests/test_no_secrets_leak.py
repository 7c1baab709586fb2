"""No key, pepper or plaintext reaches a repr, a str, a log record or an exception."""

from __future__ import annotations

import base64
import logging
import os
import warnings
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encx_async import (
    Crypto,
    DataKey,
    DecryptionError,
    DEKCache,
    EncxError,
    InvalidHashError,
    KeyManagementService,
)
from encx_async._aead import EnvelopeCipher
from encx_async._hashing import BLIND_INDEX_PURPOSE, derive_key, domain_purpose

PEPPER = os.urandom(32)
PLAINTEXT = b"SSN 078-05-1120 belongs to Jane Roe"
ALIAS = "alias/leak-test"


def forms(secret: bytes) -> list[str]:
    """The ways a secret could show up in text."""
    return [
        secret.hex(),
        secret.hex().upper(),
        repr(secret)[2:-1],
        base64.b64encode(secret).decode(),
        secret.decode("latin-1"),
    ]


def assert_clean(text: str, secrets: list[bytes]) -> None:
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, "a secret appeared in text"


def chain_text(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen), repr(getattr(seen, "args", ()))]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


async def test_nothing_secret_leaks(
    kms: KeyManagementService,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    generated: list[bytes] = []
    original = DataKey.generate.__func__  # type: ignore[attr-defined]

    def spy(cls: type[DataKey]) -> DataKey:
        dek: DataKey = original(cls)
        generated.append(bytes(dek))
        return dek

    monkeypatch.setattr(DataKey, "generate", classmethod(spy))
    await kms.create_key("leak test", alias=ALIAS)
    cache = DEKCache()
    crypto = await Crypto.create(kms=kms, kek_alias=ALIAS, pepper=PEPPER, dek_cache=cache)
    texts = [repr(crypto), str(crypto), repr(cache), repr(kms), str(kms)]
    errors: list[BaseException] = []

    blob = await crypto.encrypt(PLAINTEXT, context={"tenant": "t"}, aad=b"row")
    big = await crypto.encrypt(PLAINTEXT * 10_000, context={"tenant": "t"})
    dek = crypto.generate_dek()
    raw = await crypto.encrypt_data(PLAINTEXT, dek)
    texts += [repr(dek), str(dek)]
    for attempt in (
        crypto.decrypt(blob, context={"tenant": "other"}, aad=b"row"),
        crypto.decrypt(blob, context={"tenant": "t"}, aad=b"other"),
        crypto.decrypt(blob[:-3], context={"tenant": "t"}, aad=b"row"),
        crypto.decrypt(big[:-3], context={"tenant": "t"}),
        crypto.decrypt_data(raw, crypto.generate_dek()),
        crypto.decrypt_dek(b"\x01" * 60),
        crypto.encrypt(PLAINTEXT, context={"k": 5}),  # type: ignore[dict-item]
    ):
        with pytest.raises(EncxError) as info:
            await attempt
        errors.append(info.value)
    with pytest.raises(EncxError) as info:
        await Crypto.create(kms=kms, kek_alias=ALIAS, pepper=PEPPER[:31])
    errors.append(info.value)
    with pytest.raises(TypeError) as type_info:
        await crypto.encrypt(PLAINTEXT.decode())  # type: ignore[arg-type]
    errors.append(type_info.value)

    derived: list[bytes] = []
    for secret in generated:
        cipher = EnvelopeCipher(DataKey(secret))
        derived += [cipher.commitment]  # not secret, but derived keys must not show either
        derived += [bytes(cipher._stream_key)]
    assert generated, "the spy saw no generated key"
    texts += [chain_text(e) for e in errors]
    texts += [record.getMessage() for record in caplog.records]
    texts += [repr(record.args) for record in caplog.records]
    secrets = [PEPPER, PLAINTEXT, bytes(dek), *generated, *derived[1::2]]
    for text in texts:
        assert_clean(text, secrets)
    assert any(isinstance(e, DecryptionError) for e in errors)
    await crypto.aclose()


async def test_blind_index_and_argon2_bound_errors_show_no_secret(
    kms: KeyManagementService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await kms.create_key("leak test", alias=ALIAS)
    value = PLAINTEXT.decode()
    domain = "people.ssn"
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, pepper=PEPPER) as crypto:
        digest = crypto.hash_basic(value, domain=domain)
        mac = digest.split(":")[2]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            legacy = crypto.legacy_hash_basic(value)
        texts = [repr(crypto), str(crypto), *(str(w.message) for w in caught)]
        attempts: list[Callable[[], object]] = [
            lambda: crypto.verify_basic(value, digest[:-1], domain=domain),
            lambda: crypto.verify_basic(value, digest + "A", domain=domain),
            lambda: crypto.verify_basic(value, digest.replace("hb2:1:", "hb2:7:"), domain=domain),
            lambda: crypto.verify_basic(value, legacy.replace("hb1:1:", "hb1:3:"), domain=domain),
            lambda: crypto.verify_basic(value, digest, domain=("", value)),
            lambda: crypto.needs_reindex(digest.replace("hb2:1:", "hb2:9:")),
            lambda: crypto.needs_reindex(digest.replace("hb2", "hb9")),
            lambda: crypto.hash_basic(value, domain=[value]),  # type: ignore[arg-type]
            lambda: crypto.hash_basic({value}, domain=domain),
        ]
        errors: list[BaseException] = []
        for attempt in attempts:
            with pytest.raises(EncxError) as info:
                attempt()
            errors.append(info.value)
        stored = "$argon2id$v=19$m=262144,t=16,p=1,keyid=1$c2FsdHNhbHRzYWx0c2FsdA$" + mac
        with pytest.raises(InvalidHashError) as bound:
            await crypto.verify_secure(value, stored)
        errors.append(bound.value)
    texts += [chain_text(e) for e in errors]
    texts += [record.getMessage() for record in caplog.records]
    derived = [
        derive_key(PEPPER, BLIND_INDEX_PURPOSE),
        derive_key(PEPPER, domain_purpose(domain)),
        HKDF.extract(hashes.SHA256(), None, PEPPER),
    ]
    for text in texts:
        assert_clean(text, [PEPPER, PLAINTEXT, *derived])
        assert mac not in text, "a stored digest was echoed"
        assert legacy.split(":")[2] not in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:///var/lib/app/keys.db", "sqlite:///var/lib/app/keys.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        (
            "postgresql://app:hunter2@db.internal:5432/keys",
            "postgresql://app:***@db.internal:5432/keys",
        ),
        (
            "postgresql://db/keys?password=hunter2&sslmode=require",
            "postgresql://db/keys?password=***&sslmode=require",
        ),
        ("postgresql://db/keys?sslmode=require", "postgresql://db/keys?sslmode=require"),
    ],
)
def test_database_urls_lose_their_secrets_and_nothing_else(url: str, shown: str) -> None:
    from encx_async._keystore import redact_url

    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)
