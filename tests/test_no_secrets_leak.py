"""No key, pepper or plaintext reaches a repr, a str, a log record or an exception."""

from __future__ import annotations

import base64
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from functools import partial

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
    SealedRecord,
)
from encx_async._aead import _HKDF_INFO, EnvelopeCipher
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


@pytest.fixture
def generated(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The key material of every DEK generated during the test, in order."""
    made: list[bytes] = []
    original = DataKey.generate.__func__  # type: ignore[attr-defined]

    def spy(cls: type[DataKey]) -> DataKey:
        dek: DataKey = original(cls)
        made.append(bytes(dek))
        return dek

    monkeypatch.setattr(DataKey, "generate", classmethod(spy))
    return made


async def test_nothing_secret_leaks(
    kms: KeyManagementService,
    caplog: pytest.LogCaptureFixture,
    generated: list[bytes],
) -> None:
    caplog.set_level(logging.DEBUG)
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


def _reachable(value: object, depth: int = 0) -> Iterator[object]:
    """``value`` and what a frame-local serializer would show of it: the items of
    containers and the arguments of a functools.partial (a thread job)."""
    yield value
    if depth >= 4:
        return
    children: list[object] = []
    if isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple | set | frozenset):
        children = list(value)
    elif isinstance(value, partial):
        children = [value.func, *value.args, *value.keywords.values()]
    for child in children:
        yield from _reachable(child, depth + 1)


def secrets_in_frames(exc: BaseException, secrets: list[bytes]) -> list[str]:
    """The frame locals, anywhere in the traceback of ``exc`` and of its
    ``__cause__``/``__context__`` chain, that hold or show a secret."""
    found, seen, todo = [], set(), [exc]
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        todo += [e for e in (err.__cause__, err.__context__) if e is not None]
        tb = err.__traceback__
        while tb is not None:
            frame, tb = tb.tb_frame, tb.tb_next
            if frame.f_code.co_filename == __file__:
                continue  # this test's own frames hold the secrets it looks for
            for name, local in frame.f_locals.items():
                for value in _reachable(local):
                    if isinstance(value, bytes | bytearray | memoryview):
                        held = bytes(value)
                        leaked = any(secret in held for secret in secrets)
                    else:
                        text = repr(value)
                        leaked = any(form in text for s in secrets for form in forms(s))
                    if leaked:
                        found.append(f"{frame.f_code.co_name}: {name}")
    return found


def derived_keys(dek: bytes) -> list[bytes]:
    """The DEK and the keys EnvelopeCipher derives from it (the commitment is public)."""
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=None, info=_HKDF_INFO).derive(dek)
    return [dek, okm[:32], okm[32:64]]


@pytest.mark.parametrize("cached", [False, True])
async def test_no_key_in_the_frames_of_a_failed_large_decrypt(
    kms: KeyManagementService, generated: list[bytes], cached: bool
) -> None:
    # An error reporter (Sentry, Rollbar...) records every frame's locals: a
    # traceback must not carry a DEK or a key derived from one, even from the
    # worker thread that opened a large body.
    await kms.create_key("frame test", alias=ALIAS)
    cache = DEKCache() if cached else None
    async with await Crypto.create(kms=kms, kek_alias=ALIAS, dek_cache=cache) as crypto:
        big = os.urandom(512 * 1024)
        blob = bytearray(await crypto.encrypt(big, context={"t": "1"}))
        blob[-100] ^= 1
        record = await crypto.seal_record({"scan": big}, context={"t": "1"})
        body = bytearray(record.fields["scan"])
        body[-1] ^= 1
        secrets = [k for dek in generated for k in derived_keys(dek)]

        failures: list[BaseException] = []
        with pytest.raises(DecryptionError) as info:
            await crypto.decrypt(bytes(blob), context={"t": "1"})
        failures.append(info.value)
        with pytest.raises(DecryptionError) as info:
            async for _ in crypto.decrypt_stream([bytes(blob)], context={"t": "1"}):
                pass
        failures.append(info.value)
        with pytest.raises(DecryptionError) as info:
            await crypto.open_record(
                SealedRecord(record.header, {"scan": bytes(body)}), context={"t": "1"}
            )
        failures.append(info.value)
        for exc in failures:
            assert secrets_in_frames(exc, secrets) == []
