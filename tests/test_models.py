"""Field-level encryption of dataclasses and pydantic models, on a real Crypto.

Everything runs against the local KMS (one round trip also against moto); no
mocks. Secrets in these tests are distinctive strings, so that a test can
assert they never reach a repr, a str or an exception message.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import gc
import json
import sqlite3
import subprocess
import sys
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional

import pydantic
import pytest

from encx_async import (
    ConfigurationError,
    Crypto,
    DecryptionError,
    DEKCache,
    EncxError,
    InvalidHashError,
    InvalidValueError,
    KeyManagementService,
    ModelDefinitionError,
    Pepper,
)
from encx_async._hashing import Argon2Params
from encx_async._models import (
    Encrypt,
    EncryptedRecord,
    HashBasic,
    HashSecure,
    _specs,
    decrypt_model,
    decrypt_models,
    encrypt_model,
    encrypt_models,
    inspect_model,
)
from encx_async.providers.local import LocalKMSService

from .conftest import KeyFactory

ALIAS = "alias/models-test"
PEPPER = bytes(range(7, 39))
FAST_ARGON2 = Argon2Params(memory_kib=64, iterations=1, allow_weak=True)
CTX = {"tenant": "acme"}
SECRET_EMAIL = "zelda.secret-7f3a@example.org"
SECRET_PHONE = "+1-555-0199-SECRETPHONE"
SECRET_PASSWORD = "hunter2-correct-horse-SECRETPW"


@pytest.fixture
async def local() -> AsyncIterator[LocalKMSService]:
    async with LocalKMSService() as service:
        await service.create_key("models tests", alias=ALIAS)
        yield service


async def make_crypto(
    kms: KeyManagementService, tmp_path: Path, cache: DEKCache | None = None
) -> Crypto:
    return await Crypto.create(
        kms=kms,
        kek_alias=ALIAS,
        pepper=PEPPER,
        argon2=FAST_ARGON2,
        dek_cache=cache,
        database=f"sqlite:///{tmp_path / 'keys.db'}",
    )


@pytest.fixture(params=["uncached", "cached"])
async def crypto(
    request: pytest.FixtureRequest, local: LocalKMSService, tmp_path: Path
) -> AsyncIterator[Crypto]:
    cache = DEKCache() if request.param == "cached" else None
    async with await make_crypto(local, tmp_path, cache) as c:
        yield c


# -- models used throughout ---------------------------------------------------------------


@dataclasses.dataclass
class Contact:
    id: int
    name: str
    email: Annotated[str, Encrypt(), HashBasic()]
    phone: Annotated[str | None, Encrypt()]
    password: Annotated[str | None, HashSecure()] = None


class PContact(pydantic.BaseModel):
    id: int
    name: str
    email: Annotated[str, Encrypt(), HashBasic()]
    phone: Annotated[str | None, Encrypt()]
    password: Annotated[str | None, HashSecure()] = None


def contact(**changes: Any) -> Contact:
    fields: dict[str, Any] = {
        "id": 1,
        "name": "Zelda",
        "email": SECRET_EMAIL,
        "phone": SECRET_PHONE,
        "password": None,
    }
    fields.update(changes)
    return Contact(**fields)


def secret_free(text: str) -> bool:
    secrets = (SECRET_EMAIL, SECRET_PHONE, SECRET_PASSWORD)
    return not any(s in text or s.encode().hex() in text for s in secrets)


def assert_error_is_clean(exc: BaseException) -> None:
    seen: BaseException | None = exc
    while seen is not None:
        for text in (str(seen), repr(seen), repr(seen.args)):
            assert secret_free(text), f"a secret value appears in {type(seen).__name__}"
        seen = seen.__cause__ or seen.__context__


def flip(text: object, index: int) -> str:
    assert isinstance(text, str)
    data = bytearray(base64.b64decode(text))
    data[index % len(data)] ^= 0x01
    return base64.b64encode(bytes(data)).decode()


# -- round trips -----------------------------------------------------------------------------

NY = dt.timezone(dt.timedelta(hours=-5), "EST")
TYPE_CASES: list[tuple[str, object, object]] = [
    ("str", str, SECRET_EMAIL),
    ("empty str", str, ""),
    ("unicode str", str, "Zoë 🚀 ß"),
    ("bytes", bytes, b"\x00\xffraw"),
    ("bool", bool, True),
    ("int", int, -(2**70) + 3),
    ("float", float, 3.25),
    ("Decimal", Decimal, Decimal("-12.345")),
    ("UUID", uuid.UUID, uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("datetime", dt.datetime, dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=NY)),
    ("date", dt.date, dt.date(1999, 12, 31)),
    ("list[str]", list[str], ["a", SECRET_PHONE, ""]),
    ("list[int]", list[int], [1, -2, 3]),
    ("empty list", list[Decimal], []),
    ("list[int | None]", list[int | None], [1, None, 3]),
    ("Optional None", Optional[str], None),  # noqa: UP045 (the spelling under test)
    ("Optional value", Optional[str], "x"),  # noqa: UP045
    ("X | None None", dt.date | None, None),
    ("X | None value", uuid.UUID | None, uuid.uuid4()),
    ("list | None", list[str] | None, ["q"]),
]


def box_dataclass(tp: Any) -> Any:
    """A dataclass ``Box(id: int, value: Annotated[tp, Encrypt()])``."""
    return dataclasses.make_dataclass("Box", [("id", int), ("value", Annotated[tp, Encrypt()])])


def box_pydantic(tp: Any) -> Any:
    """The same as a pydantic model."""
    value: Any = (Annotated[tp, Encrypt()], ...)
    return pydantic.create_model("PBox", id=(int, ...), value=value)


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
@pytest.mark.parametrize(("label", "tp", "value"), TYPE_CASES, ids=[c[0] for c in TYPE_CASES])
async def test_every_supported_type_round_trips(
    crypto: Crypto, kind: str, label: str, tp: object, value: Any
) -> None:
    box = box_dataclass(tp) if kind == "dataclass" else box_pydantic(tp)
    obj = box(id=7, value=value)
    record = await encrypt_model(crypto, obj, context=CTX, record_id=7)
    row = record.as_dict()
    assert set(row) == {"id", "value_encrypted", "encx"}
    assert isinstance(row["value_encrypted"], str)  # None is sealed too
    json.dumps(row)  # JSON-friendly
    back = await decrypt_model(crypto, row, box, context=CTX, record_id=7)
    restored = back.value
    assert restored == value
    assert type(restored) is type(value)
    if isinstance(value, list):
        assert [type(x) for x in restored] == [type(x) for x in value]


async def test_datetime_comes_back_as_the_same_instant_in_utc(crypto: Crypto) -> None:
    box = box_dataclass(dt.datetime)
    when = dt.datetime(2024, 1, 1, 9, 30, tzinfo=NY)
    back: Any = await decrypt_model(crypto, await encrypt_model(crypto, box(1, when)), box)
    assert back.value == when
    assert back.value.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize("model", [Contact, PContact])
async def test_the_record_layout(crypto: Crypto, model: type) -> None:
    obj = model(
        id=1, name="Zelda", email=SECRET_EMAIL, phone=SECRET_PHONE, password=SECRET_PASSWORD
    )
    record = await encrypt_model(crypto, obj)
    row = record.as_dict()
    assert list(row) == [
        "id",
        "name",
        "email_encrypted",
        "email_hash",
        "phone_encrypted",
        "password_hash_secure",
        "encx",
    ]
    assert row["id"] == 1
    assert row["name"] == "Zelda"
    assert row["email_hash"] == crypto.blind_index(model, "email", SECRET_EMAIL)
    assert row["email_hash"] == crypto.hash_basic(
        SECRET_EMAIL, domain=(model.__qualname__, "email")
    )
    assert isinstance(row["password_hash_secure"], str)
    assert row["password_hash_secure"].startswith("$argon2id$")
    assert await crypto.verify_secure(SECRET_PASSWORD, row["password_hash_secure"])
    meta = row["encx"]
    assert isinstance(meta, dict)
    assert set(meta) == {"v", "model", "header", "fields"}
    assert meta["v"] == 1
    assert meta["model"] == model.__qualname__
    assert meta["fields"] == ["email", "phone"]
    assert record.model_name == model.__qualname__
    assert record.kek_version == crypto.kek_version == 1
    assert record.encrypted_fields == ("email", "phone")
    assert set(record.ciphertexts) == {"email", "phone"}
    assert "encx" not in record.fields
    assert record.fields["email_encrypted"] == row["email_encrypted"]
    assert secret_free(json.dumps(row))
    back: object = await decrypt_model(crypto, row, model)
    # Hash-only fields are not restored: the model's default applies.
    assert back == model(id=1, name="Zelda", email=SECRET_EMAIL, phone=SECRET_PHONE)


async def test_one_seal_per_record_and_one_kms_call(local: LocalKMSService, tmp_path: Path) -> None:
    async with await make_crypto(local, tmp_path) as crypto:  # no cache: one DEK per record
        before = crypto.stats().kms_calls.get("encrypt_dek", 0)
        record = await encrypt_model(crypto, contact())
        assert crypto.stats().kms_calls["encrypt_dek"] - before == 1
        assert record.header is not None
        before = crypto.stats().kms_calls.get("decrypt_dek", 0)
        await decrypt_model(crypto, record, Contact)
        assert crypto.stats().kms_calls["decrypt_dek"] - before == 1


async def test_round_trip_on_both_providers(
    kms: KeyManagementService, make_key: KeyFactory, tmp_path: Path
) -> None:
    await make_key(kms, ALIAS)
    async with await make_crypto(kms, tmp_path, DEKCache()) as crypto:
        record = await encrypt_model(crypto, contact(), context=CTX, record_id=1)
        assert await decrypt_model(crypto, record, Contact, context=CTX, record_id=1) == contact()


# -- marker combinations ----------------------------------------------------------------------


def test_markers_are_small_frozen_values() -> None:
    assert repr(Encrypt()) == str(Encrypt()) == "Encrypt()"
    assert repr(HashBasic()) == "HashBasic()"
    assert repr(HashSecure()) == "HashSecure()"
    assert Encrypt() == Encrypt()
    assert Encrypt() != HashBasic()
    assert hash(Encrypt()) == hash(Encrypt())
    with pytest.raises(AttributeError):
        Encrypt().x = 1  # type: ignore[attr-defined]


@dataclasses.dataclass
class AllCombos:
    plain: str
    enc: Annotated[str, Encrypt()]
    enc_basic: Annotated[str, Encrypt(), HashBasic()]
    enc_secure: Annotated[str, HashSecure(), Encrypt()]
    basic: Annotated[str | None, HashBasic()] = None
    secure: Annotated[str | None, HashSecure()] = None


async def test_every_valid_marker_combination(crypto: Crypto) -> None:
    obj = AllCombos("p", "e", "eb", "es", basic="b", secure="s")
    row = (await encrypt_model(crypto, obj)).as_dict()
    assert set(row) == {
        "plain",
        "enc_encrypted",
        "enc_basic_encrypted",
        "enc_basic_hash",
        "enc_secure_encrypted",
        "enc_secure_hash_secure",
        "basic_hash",
        "secure_hash_secure",
        "encx",
    }
    assert row["basic_hash"] == crypto.blind_index(AllCombos, "basic", "b")
    assert row["enc_basic_hash"] == crypto.blind_index(AllCombos, "enc_basic", "eb")
    assert await crypto.verify_secure("s", row["secure_hash_secure"])  # type: ignore[arg-type]
    assert await crypto.verify_secure("es", row["enc_secure_hash_secure"])  # type: ignore[arg-type]
    back = await decrypt_model(crypto, row, AllCombos)
    assert back == AllCombos("p", "e", "eb", "es")  # basic and secure: their defaults


async def test_hash_of_none_is_none(crypto: Crypto) -> None:
    row = (await encrypt_model(crypto, AllCombos("p", "e", "eb", "es"))).as_dict()
    assert row["basic_hash"] is None
    assert row["secure_hash_secure"] is None


def _dc(name: str, annotation: object, **field_kwargs: Any) -> type:
    spec: Any = (
        (name, annotation, dataclasses.field(**field_kwargs))
        if field_kwargs
        else (
            name,
            annotation,
        )
    )
    return dataclasses.make_dataclass("Bad", [("id", int), spec])


@dataclasses.dataclass
class Inner:
    x: int


BAD_DEFINITIONS: list[tuple[str, Callable[[], type], str]] = [
    (
        "basic+secure",
        lambda: _dc("f", Annotated[str, HashBasic(), HashSecure()], default=None),
        "do not combine",
    ),
    (
        "encrypt+basic+secure",
        lambda: _dc("f", Annotated[str, Encrypt(), HashBasic(), HashSecure()]),
        "do not combine",
    ),
    ("duplicate encrypt", lambda: _dc("f", Annotated[str, Encrypt(), Encrypt()]), "more than once"),
    (
        "duplicate nested",
        lambda: _dc("f", Annotated[Annotated[str, HashBasic()], HashBasic()], default=None),
        "more than once",
    ),
    ("dict", lambda: _dc("f", Annotated[dict[str, str], Encrypt()]), "cannot be encrypted"),
    ("set", lambda: _dc("f", Annotated[set[str], Encrypt()]), "cannot be encrypted"),
    ("object", lambda: _dc("f", Annotated[object, Encrypt()]), "cannot be encrypted"),
    ("Any", lambda: _dc("f", Annotated[Any, Encrypt()]), "cannot be encrypted"),
    ("nested dataclass", lambda: _dc("f", Annotated[Inner, Encrypt()]), "cannot be encrypted"),
    ("union", lambda: _dc("f", Annotated[int | str, Encrypt()]), "union"),
    ("bare list", lambda: _dc("f", Annotated[list, Encrypt()]), "list"),
    ("list of dicts", lambda: _dc("f", Annotated[list[dict[str, int]], Encrypt()]), "list"),
    ("tuple", lambda: _dc("f", Annotated[tuple[int, int], Encrypt()]), "cannot be encrypted"),
    ("bytearray", lambda: _dc("f", Annotated[bytearray, Encrypt()]), "cannot be encrypted"),
    ("marker inside list", lambda: _dc("f", list[Annotated[str, Encrypt()]]), "not inside"),
    ("hash-only without default", lambda: _dc("f", Annotated[str, HashBasic()]), "default"),
    (
        "secure-only without default",
        lambda: _dc("f", Annotated[str | None, HashSecure()]),
        "default",
    ),
    (
        "init=False",
        lambda: _dc("f", Annotated[str, Encrypt()], init=False, default="x"),
        "init=False",
    ),
    ("reserved encx", lambda: _dc("encx", str), "reserved"),
    ("reserved suffix", lambda: _dc("f_encrypted", str), "reserved"),
]


@pytest.mark.parametrize(
    ("label", "define", "why"), BAD_DEFINITIONS, ids=[b[0] for b in BAD_DEFINITIONS]
)
async def test_bad_definitions_fail_at_first_inspection(
    crypto: Crypto, label: str, define: Callable[[], type], why: str
) -> None:
    cls = define()  # defining the class is fine: nothing is inspected yet
    with pytest.raises(ModelDefinitionError, match=why) as caught:
        inspect_model(cls)
    field = [f.name for f in dataclasses.fields(cls)][-1]
    assert f"Bad.{field}" in str(caught.value)
    # decrypt_model inspects before it reads the record at all.
    with pytest.raises(ModelDefinitionError):
        await decrypt_model(crypto, {"not": "a record"}, cls)
    with pytest.raises(ModelDefinitionError):
        await decrypt_models(crypto, [], cls)


def test_column_collisions_are_definition_errors() -> None:
    @dataclasses.dataclass
    class Clash:
        email: Annotated[str, Encrypt(), HashBasic()]
        email_hash: str

    with pytest.raises(ModelDefinitionError, match=r"Clash\.email_hash.*collides"):
        inspect_model(Clash)


def test_pydantic_bad_definitions() -> None:
    class PBad(pydantic.BaseModel):
        ok: Annotated[str, Encrypt()]
        nope: Annotated[dict[str, int], Encrypt()]

    with pytest.raises(ModelDefinitionError, match=r"PBad\.nope"):
        inspect_model(PBad)

    class PBoth(pydantic.BaseModel):
        pw: Annotated[str | None, HashBasic(), HashSecure()] = None

    with pytest.raises(ModelDefinitionError, match=r"PBoth\.pw.*do not combine"):
        inspect_model(PBoth)

    class PNoDefault(pydantic.BaseModel):
        pw: Annotated[str, HashSecure()]

    with pytest.raises(ModelDefinitionError, match=r"PNoDefault\.pw.*default"):
        inspect_model(PNoDefault)


def test_not_a_model() -> None:
    class Plain:
        x: Annotated[str, Encrypt()]

    with pytest.raises(ModelDefinitionError, match="neither a dataclass nor a pydantic"):
        inspect_model(Plain)


def test_inspection_is_cached_weakly() -> None:
    @dataclasses.dataclass
    class Temp:
        x: Annotated[int, Encrypt()]

    spec = inspect_model(Temp)
    assert inspect_model(Temp) is spec
    assert Temp in _specs
    gone = weakref.ref(Temp)
    del Temp, spec
    gc.collect()
    assert gone() is None  # the cache did not keep the class alive


def test_markers_on_an_optional_member_are_found() -> None:
    @dataclasses.dataclass
    class Member:
        x: Optional[Annotated[str, Encrypt()]]  # noqa: UP045 (the spelling under test)

    (field,) = inspect_model(Member).fields
    assert field.encrypt
    assert field.value_type is not None
    assert field.value_type.optional


async def test_pydantic_aliases_and_encx_name(crypto: Crypto) -> None:
    class Aliased(pydantic.BaseModel):
        __encx_name__: ClassVar[str] = "customer"
        user_id: int = pydantic.Field(alias="userId")
        secret: Annotated[str, Encrypt()] = pydantic.Field(alias="Secret")

    obj = Aliased(userId=3, Secret=SECRET_PHONE)
    record = await encrypt_model(crypto, obj)
    assert record.model_name == "customer"
    assert set(record.as_dict()) == {"user_id", "secret_encrypted", "encx"}
    assert await decrypt_model(crypto, record, Aliased) == obj


async def test_a_model_without_encrypted_fields(crypto: Crypto) -> None:
    @dataclasses.dataclass
    class Lookup:
        id: int
        code: Annotated[str | None, HashBasic()] = None

    record = await encrypt_model(crypto, Lookup(1, "abc"), record_id=1)
    assert record.header is None
    assert record.kek_version is None
    meta = {"v": 1, "model": Lookup.__qualname__, "header": None, "fields": []}
    assert record.as_dict()["encx"] == meta
    assert await decrypt_model(crypto, record.as_dict(), Lookup) == Lookup(1)


# -- values checked on the way in ----------------------------------------------------------


async def test_a_value_of_the_wrong_type_is_refused_without_showing_it(crypto: Crypto) -> None:
    with pytest.raises(InvalidValueError, match=r"Contact\.phone holds a bytes") as caught:
        await encrypt_model(crypto, contact(phone=SECRET_PHONE.encode()))
    assert_error_is_clean(caught.value)
    box = box_dataclass(dt.datetime)
    with pytest.raises(InvalidValueError, match="naive") as caught:
        await encrypt_model(crypto, box(1, dt.datetime(2024, 1, 1)))
    assert_error_is_clean(caught.value)
    with pytest.raises(InvalidValueError):
        await encrypt_model(crypto, box_dataclass(list[str])(1, ["ok", SECRET_EMAIL.encode()]))
    with pytest.raises(InvalidValueError, match="instance"):
        await encrypt_model(crypto, Contact)
    with pytest.raises(InvalidValueError, match="record_id"):
        await encrypt_model(crypto, contact(), record_id={"no": "dicts"})


# -- tampering ---------------------------------------------------------------------------------


@pytest.fixture
async def two_rows(crypto: Crypto) -> tuple[Crypto, dict[str, object], dict[str, object]]:
    first = await encrypt_model(crypto, contact(id=1), context=CTX, record_id=1)
    second = await encrypt_model(
        crypto, contact(id=2, email="other@example.com", phone="555"), context=CTX, record_id=2
    )
    return crypto, first.as_dict(), second.as_dict()


async def expect_tampered(crypto: Crypto, row: dict[str, object], *, record_id: object = 1) -> None:
    with pytest.raises(DecryptionError) as caught:
        await decrypt_model(crypto, row, Contact, context=CTX, record_id=record_id)
    assert_error_is_clean(caught.value)


async def test_the_untouched_rows_decrypt(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, first, second = two_rows
    assert await decrypt_model(crypto, first, Contact, context=CTX, record_id=1) == contact(id=1)
    back = await decrypt_model(crypto, second, Contact, context=CTX, record_id=2)
    assert back.email == "other@example.com"


async def test_swapped_fields_are_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, row, _ = two_rows
    row["email_encrypted"], row["phone_encrypted"] = row["phone_encrypted"], row["email_encrypted"]
    await expect_tampered(crypto, row)


async def test_a_field_moved_from_another_record_is_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, first, second = two_rows
    # With a cache both rows share a DEK and header: only the record id tells them apart.
    first["phone_encrypted"] = second["phone_encrypted"]
    await expect_tampered(crypto, first)


async def test_a_whole_record_moved_to_another_id_is_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, first, _ = two_rows
    await expect_tampered(crypto, first, record_id=2)
    await expect_tampered(crypto, first, record_id=None)
    await expect_tampered(crypto, first, record_id="1")  # the same id, another type


async def test_a_wrong_context_is_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, row, _ = two_rows
    with pytest.raises(DecryptionError):
        await decrypt_model(crypto, row, Contact, context={"tenant": "other"}, record_id=1)


async def test_without_record_id_a_column_moves_between_rows_that_share_a_key(
    local: LocalKMSService, tmp_path: Path
) -> None:
    """What record_id is for: rows sealed under one cached DEK share their header, so
    without an id an encrypted column copied from one to another decrypts there."""
    alice = contact(id=1, name="Alice", email="alice@example.com", phone="111")
    bob = contact(id=2, name="Bob", email="bob@example.com", phone="222")
    async with await make_crypto(local, tmp_path, DEKCache()) as crypto:
        unbound = [r.as_dict() for r in await crypto.encrypt_models([alice, bob], context=CTX)]
        assert unbound[0]["encx"] == unbound[1]["encx"]  # one DEK, one header
        moved = {**unbound[1], "phone_encrypted": unbound[0]["phone_encrypted"]}
        back = await crypto.decrypt_model(moved, Contact, context=CTX)
        assert (back.name, back.phone) == ("Bob", "111")  # Bob's row, Alice's phone

        bound = [
            r.as_dict()
            for r in await crypto.encrypt_models(
                [alice, bob], context=CTX, record_id=lambda c: c.id
            )
        ]
        assert bound[0]["encx"] == bound[1]["encx"]
        moved = {**bound[1], "phone_encrypted": bound[0]["phone_encrypted"]}
        with pytest.raises(DecryptionError) as caught:
            await crypto.decrypt_model(moved, Contact, context=CTX, record_id=2)
        assert_error_is_clean(caught.value)
        assert await crypto.decrypt_model(bound[1], Contact, context=CTX, record_id=2) == bob


async def test_flipped_bytes_are_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, row, _ = two_rows
    meta = row["encx"]
    assert isinstance(meta, dict)
    header_len = len(base64.b64decode(meta["header"]))
    for index in range(0, header_len, 7):
        tampered = {**row, "encx": {**meta, "header": flip(meta["header"], index)}}
        await expect_tampered(crypto, tampered)
    body_len = len(base64.b64decode(row["email_encrypted"]))  # type: ignore[arg-type]
    for index in range(body_len):
        await expect_tampered(
            crypto, {**row, "email_encrypted": flip(row["email_encrypted"], index)}
        )


async def test_a_changed_model_name_is_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, row, _ = two_rows
    meta = row["encx"]
    assert isinstance(meta, dict)
    await expect_tampered(crypto, {**row, "encx": {**meta, "model": "Admin"}})


async def test_a_record_of_another_model_is_refused(crypto: Crypto) -> None:
    @dataclasses.dataclass
    class Twin:  # the same fields as Contact, another model
        id: int
        name: str
        email: Annotated[str, Encrypt(), HashBasic()]
        phone: Annotated[str | None, Encrypt()]
        password: Annotated[str | None, HashSecure()] = None

    row = (await encrypt_model(crypto, Twin(1, "Z", SECRET_EMAIL, None), record_id=1)).as_dict()
    with pytest.raises(DecryptionError) as refused:
        await decrypt_model(crypto, row, Contact, record_id=1)
    assert "another model" in refused.value.reason
    # Relabelled to pass the name check, the ciphertexts still name Twin.
    meta = row["encx"]
    assert isinstance(meta, dict)
    relabelled = {**row, "encx": {**meta, "model": "Contact"}}
    with pytest.raises(DecryptionError):
        await decrypt_model(crypto, relabelled, Contact, record_id=1)


async def test_dropped_encrypted_fields_are_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, row, _ = two_rows
    meta = row["encx"]
    assert isinstance(meta, dict)
    without_column = {k: v for k, v in row.items() if k != "phone_encrypted"}
    await expect_tampered(crypto, without_column)
    unlisted = {**without_column, "encx": {**meta, "fields": ["email"]}}
    await expect_tampered(crypto, unlisted)
    set_to_null = {**row, "phone_encrypted": None}
    await expect_tampered(crypto, set_to_null)


async def test_added_encrypted_fields_are_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, row, second = two_rows
    meta = row["encx"]
    assert isinstance(meta, dict)
    await expect_tampered(crypto, {**row, "name_encrypted": second["email_encrypted"]})
    listed = {
        **row,
        "name_encrypted": second["email_encrypted"],
        "encx": {**meta, "fields": ["email", "phone", "name"]},
    }
    await expect_tampered(crypto, listed)


async def test_a_redirected_blind_index_is_detected(
    two_rows: tuple[Crypto, dict[str, object], dict[str, object]],
) -> None:
    crypto, first, second = two_rows
    # Row 1 made to answer lookups for row 2's e-mail address.
    await expect_tampered(crypto, {**first, "email_hash": second["email_hash"]})
    await expect_tampered(crypto, {**first, "email_hash": None})
    await expect_tampered(crypto, {**first, "email_hash": "not a hash"})


# -- records read back from rows ------------------------------------------------------------


async def test_from_dict_accepts_encx_as_json_text(crypto: Crypto) -> None:
    record = await encrypt_model(crypto, contact())
    row = record.as_dict()
    row["encx"] = json.dumps(row["encx"])
    parsed = EncryptedRecord.from_dict(row)
    assert parsed == record
    assert await decrypt_model(crypto, row, Contact) == contact()


async def test_from_dict_is_strict(crypto: Crypto) -> None:
    row = (await encrypt_model(crypto, contact())).as_dict()
    meta = row["encx"]
    assert isinstance(meta, dict)
    with pytest.raises(InvalidValueError, match="mapping"):
        EncryptedRecord.from_dict([("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match="keys must be str"):
        EncryptedRecord.from_dict({**row, 1: "x"})  # type: ignore[dict-item]
    malformed: list[dict[str, object]] = [
        {k: v for k, v in row.items() if k != "encx"},
        {**row, "encx": "{not json"},
        {**row, "encx": 42},
        {**row, "encx": {**meta, "extra": 1}},
        {**row, "encx": {k: v for k, v in meta.items() if k != "fields"}},
        {**row, "encx": {**meta, "v": 2}},
        {**row, "encx": {**meta, "v": True}},
        {**row, "encx": {**meta, "model": ""}},
        {**row, "encx": {**meta, "fields": "email"}},
        {**row, "encx": {**meta, "fields": ["email", "email"]}},
        {**row, "encx": {**meta, "header": None}},
        {**row, "encx": {**meta, "header": "!!!"}},
        {**row, "encx": {**meta, "header": base64.b64encode(b"EX\x01").decode()}},
        {**row, "encx": {**meta, "fields": []}},
        {**row, "email_encrypted": "not base64!"},
        {**row, "email_encrypted": base64.b64encode(b"short").decode()},
        {**row, "email_encrypted": 12345},
        {**row, "phone_encrypted": "ÿÿÿ"},
    ]
    for bad in malformed:
        with pytest.raises(DecryptionError) as caught:
            EncryptedRecord.from_dict(bad)
        assert_error_is_clean(caught.value)


async def test_deeply_nested_metadata_is_a_decryption_error(crypto: Crypto) -> None:
    row = (await encrypt_model(crypto, contact())).as_dict()
    meta = row["encx"]
    assert isinstance(meta, dict)
    depth = 100_000  # far past the JSON parser's recursion limit
    deep: list[object] = []
    for _ in range(depth):
        deep = [deep]
    malformed: list[dict[str, object]] = [
        {**row, "encx": "[" * depth + "]" * depth},
        {**row, "encx": ('{"v": ' * depth + "1" + "}" * depth).encode()},
        {**row, "encx": {**meta, "fields": deep}},
        {**row, "encx": {**meta, "header": deep}},
    ]
    for bad in malformed:
        with pytest.raises(DecryptionError) as caught:
            EncryptedRecord.from_dict(bad)
        assert_error_is_clean(caught.value)
        with pytest.raises(DecryptionError):
            await decrypt_model(crypto, bad, Contact)


async def test_a_missing_plain_column_is_reported(crypto: Crypto) -> None:
    row = (await encrypt_model(crypto, contact())).as_dict()
    del row["name"]
    with pytest.raises(InvalidValueError, match="no column 'name'"):
        await decrypt_model(crypto, row, Contact)


async def test_extra_database_columns_are_ignored(crypto: Crypto) -> None:
    row = (await encrypt_model(crypto, contact())).as_dict()
    row["created_at"] = "2024-01-01"
    assert await decrypt_model(crypto, row, Contact) == contact()


async def test_validation_errors_after_decrypt_do_not_show_values(crypto: Crypto) -> None:
    class Loose(pydantic.BaseModel):
        __encx_name__: ClassVar[str] = "shared"
        email: Annotated[str, Encrypt()]

    class Strict(pydantic.BaseModel):
        __encx_name__: ClassVar[str] = "shared"
        email: Annotated[str, Encrypt()] = pydantic.Field(max_length=5)

    record = await encrypt_model(crypto, Loose(email=SECRET_EMAIL))
    with pytest.raises(InvalidValueError, match="does not validate as") as caught:
        await decrypt_model(crypto, record, Strict)
    assert "string_too_long" in str(caught.value)
    assert_error_is_clean(caught.value)


async def test_a_changed_field_type_is_reported(crypto: Crypto) -> None:
    @dataclasses.dataclass
    class V1:
        __encx_name__: ClassVar[str] = "versioned"
        n: Annotated[int, Encrypt()]

    @dataclasses.dataclass
    class V2:
        __encx_name__: ClassVar[str] = "versioned"
        n: Annotated[str, Encrypt()]

    record = await encrypt_model(crypto, V1(31337))
    with pytest.raises(InvalidValueError, match=r"V2\.n decrypted to a int") as caught:
        await decrypt_model(crypto, record, V2)
    assert "31337" not in str(caught.value)


# -- lookups ----------------------------------------------------------------------------------


async def test_blind_index_lookups(crypto: Crypto) -> None:
    a = (await encrypt_model(crypto, contact(id=1))).as_dict()
    b = (await encrypt_model(crypto, contact(id=2))).as_dict()
    c = (await encrypt_model(crypto, contact(id=3, email="someone@else.org"))).as_dict()
    index = crypto.blind_index(Contact, "email", SECRET_EMAIL)
    assert a["email_hash"] == b["email_hash"] == index
    assert c["email_hash"] != a["email_hash"]
    assert a["email_encrypted"] != b["email_encrypted"]  # the ciphertexts differ all the same
    found = [r for r in (a, b, c) if r["email_hash"] == index]
    assert [r["id"] for r in found] == [1, 2]


@dataclasses.dataclass
class Profile:
    id: int
    nickname: Annotated[str | None, HashBasic()] = None  # anyone may choose one


@dataclasses.dataclass
class TaxRecord:
    id: int
    ssn: Annotated[str, Encrypt(), HashBasic()]
    previous_ssn: Annotated[str | None, Encrypt(), HashBasic()] = None


def legacy(crypto: Crypto, value: object) -> str:
    with pytest.warns(DeprecationWarning, match="share one key"):
        return crypto.legacy_hash_basic(value)


Pairs = Sequence[tuple[object, object]]


def joined(left: Pairs, right: Pairs) -> list[int]:
    """The ids of ``right`` whose hash column equals one in ``left``, by an SQL join."""
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE a (id INTEGER, h TEXT)")
        db.execute("CREATE TABLE b (id INTEGER, h TEXT)")
        db.executemany("INSERT INTO a VALUES (?, ?)", left)
        db.executemany("INSERT INTO b VALUES (?, ?)", right)
        rows = db.execute("SELECT b.id FROM a JOIN b ON a.h = b.h ORDER BY b.id").fetchall()
        return [row[0] for row in rows]
    finally:
        db.close()


async def test_equal_values_in_two_models_do_not_join(crypto: Crypto) -> None:
    ssn = "078-05-1120"
    tax = (await encrypt_model(crypto, TaxRecord(7, ssn, previous_ssn=ssn))).as_dict()
    guesses = [f"078-05-{n:04}" for n in range(1110, 1130)]  # nicknames an attacker picked
    profiles = [
        (await encrypt_model(crypto, Profile(i, nickname=g))).as_dict()
        for i, g in enumerate(guesses)
    ]
    nicknames = [(r["id"], r["nickname_hash"]) for r in profiles]
    assert joined(nicknames, [(tax["id"], tax["ssn_hash"])]) == []
    assert joined(nicknames, [(tax["id"], tax["previous_ssn_hash"])]) == []
    assert tax["ssn_hash"] != tax["previous_ssn_hash"]  # two fields of one model, too
    # What one key for every field (hb1) gave: the join confirms the guess.
    old = [(i, legacy(crypto, g)) for i, g in enumerate(guesses)]
    assert joined(old, [(7, legacy(crypto, ssn))]) == [7]


async def test_a_pinned_domain_is_shared_on_purpose(crypto: Crypto) -> None:
    @dataclasses.dataclass
    class Customer:
        email: Annotated[str, Encrypt(), HashBasic(domain="email")]

    @dataclasses.dataclass
    class Invite:
        email: Annotated[str | None, HashBasic(domain="email")] = None

    customer = (await encrypt_model(crypto, Customer(SECRET_EMAIL))).as_dict()
    invite = (await encrypt_model(crypto, Invite(SECRET_EMAIL))).as_dict()
    assert customer["email_hash"] == invite["email_hash"]
    assert customer["email_hash"] == crypto.hash_basic(SECRET_EMAIL, domain="email")
    assert customer["email_hash"] == crypto.blind_index(Invite, "email", SECRET_EMAIL)
    assert joined([(1, customer["email_hash"])], [(2, invite["email_hash"])]) == [2]
    assert await decrypt_model(crypto, customer, Customer) == Customer(SECRET_EMAIL)


async def test_the_default_domain_is_the_record_name_and_the_field(crypto: Crypto) -> None:
    @dataclasses.dataclass
    class Before:
        __encx_name__: ClassVar[str] = "person"
        email: Annotated[str, Encrypt(), HashBasic()]
        code: Annotated[str | None, HashBasic()] = None

    @dataclasses.dataclass
    class After:  # Before, renamed (its record name kept), and a hash-only field renamed
        __encx_name__: ClassVar[str] = "person"
        email: Annotated[str, Encrypt(), HashBasic()]
        token: Annotated[str | None, HashBasic(domain=("person", "code"))] = None

    @dataclasses.dataclass
    class Unpinned:  # the same fields, and no record name: its qualified name is used
        email: Annotated[str, Encrypt(), HashBasic()]
        code: Annotated[str | None, HashBasic()] = None

    old = (await encrypt_model(crypto, Before(SECRET_EMAIL, code="c0de"))).as_dict()
    new = (await encrypt_model(crypto, After(SECRET_EMAIL, token="c0de"))).as_dict()
    other = (await encrypt_model(crypto, Unpinned(SECRET_EMAIL, code="c0de"))).as_dict()
    assert new["email_hash"] == old["email_hash"]
    assert new["token_hash"] == old["code_hash"]
    assert old["email_hash"] == crypto.hash_basic(SECRET_EMAIL, domain=("person", "email"))
    assert other["email_hash"] == crypto.hash_basic(
        SECRET_EMAIL, domain=(Unpinned.__qualname__, "email")
    )
    assert other["email_hash"] != old["email_hash"]
    assert other["code_hash"] != old["code_hash"]
    assert await decrypt_model(crypto, old, After) == After(SECRET_EMAIL)


async def test_blind_index_refuses_what_no_hash_basic_field_holds(crypto: Crypto) -> None:
    for field in ("nope", "id", "phone", "password"):  # unknown, plain, Encrypt(), HashSecure()
        with pytest.raises(ConfigurationError, match=f"no HashBasic\\(\\) field '{field}'"):
            crypto.blind_index(Contact, field, SECRET_EMAIL)
    for value in (None, 42, [SECRET_EMAIL], SECRET_EMAIL.encode()):
        with pytest.raises(InvalidValueError, match=r"Contact\.email is declared str") as caught:
            crypto.blind_index(Contact, "email", value)
        assert_error_is_clean(caught.value)
    with pytest.raises(ModelDefinitionError):
        crypto.blind_index(dict, "email", SECRET_EMAIL)


def test_hash_basic_markers_with_a_domain() -> None:
    assert repr(HashBasic(domain="users.email")) == "HashBasic(domain='users.email')"
    assert repr(HashBasic(domain=("User", "email"))) == "HashBasic(domain=('User', 'email'))"
    assert HashBasic(domain="a") == HashBasic(domain="a") != HashBasic(domain="b")
    assert HashBasic() != HashBasic(domain="a")
    assert hash(HashBasic(domain="a")) == hash(HashBasic(domain="a"))
    assert HashBasic().domain is None
    assert HashBasic(domain="a").domain == "a"
    for bad in ("", ("",), ("a", 1), ["a"], "x" * 1025):
        with pytest.raises(ModelDefinitionError, match="domain"):
            HashBasic(domain=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        HashBasic("a")  # type: ignore[call-arg]


async def test_a_blind_index_copied_from_another_domain_is_detected(crypto: Crypto) -> None:
    row = (await encrypt_model(crypto, contact())).as_dict()
    elsewhere = (await encrypt_model(crypto, Profile(1, nickname=SECRET_EMAIL))).as_dict()
    assert elsewhere["nickname_hash"] != row["email_hash"]
    with pytest.raises(DecryptionError) as moved:
        await decrypt_model(crypto, {**row, "email_hash": elsewhere["nickname_hash"]}, Contact)
    assert "email_hash" in moved.value.reason


async def test_hb1_rows_decrypt_and_are_found_during_the_reindex(crypto: Crypto) -> None:
    old_index = legacy(crypto, SECRET_EMAIL)
    other_index = legacy(crypto, "someone@else.org")
    new_row = (await encrypt_model(crypto, contact(id=1), record_id=1)).as_dict()
    old_row = (await encrypt_model(crypto, contact(id=2), record_id=2)).as_dict()
    old_row["email_hash"] = old_index  # as written before blind indexes had domains
    assert await decrypt_model(crypto, old_row, Contact, record_id=2) == contact(id=2)
    with pytest.raises(DecryptionError):  # an hb1 index is checked like any other
        await decrypt_model(crypto, {**old_row, "email_hash": other_index}, Contact, record_id=2)

    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE contacts (id INTEGER, email_hash TEXT, row TEXT)")
        for r in (new_row, old_row):
            db.execute("INSERT INTO contacts VALUES (?, ?, ?)", (r["id"], r["email_hash"], "x"))
        # During the migration a lookup asks for both indexes.
        both = (crypto.blind_index(Contact, "email", SECRET_EMAIL), old_index)
        query = "SELECT id FROM contacts WHERE email_hash IN (?, ?) ORDER BY id"
        assert [i for (i,) in db.execute(query, both)] == [1, 2]
        # The re-index: recompute what needs it, from the decrypted value.
        stale = [
            (i, h)
            for i, h in db.execute("SELECT id, email_hash FROM contacts")
            if crypto.needs_reindex(h)
        ]
        assert [i for i, _ in stale] == [2]
        back = await decrypt_model(crypto, old_row, Contact, record_id=2)
        fresh = crypto.blind_index(Contact, "email", back.email)
        db.execute("UPDATE contacts SET email_hash = ? WHERE id = 2", (fresh,))
        hashes = [h for (h,) in db.execute("SELECT email_hash FROM contacts")]
        assert not any(crypto.needs_reindex(h) for h in hashes)
        query = "SELECT id FROM contacts WHERE email_hash = ? ORDER BY id"
        assert [i for (i,) in db.execute(query, both[:1])] == [1, 2]
    finally:
        db.close()


async def test_after_a_pepper_rotation_old_indexes_decrypt_and_need_a_reindex(
    local: LocalKMSService, tmp_path: Path
) -> None:
    keys = f"sqlite:///{tmp_path / 'keys.db'}"
    old = await Crypto.create(kms=local, kek_alias=ALIAS, pepper=Pepper(PEPPER), database=keys)
    new = await Crypto.create(
        kms=local, kek_alias=ALIAS, pepper=Pepper(bytes(range(50, 82)), version=2), database=keys
    )
    async with old, new:
        row = (await encrypt_model(old, contact())).as_dict()
        stored = str(row["email_hash"])
        assert new.needs_reindex(stored) is True
        assert old.needs_reindex(stored) is False
        assert await decrypt_model(new, row, Contact) == contact()  # not checkable: kept
        fresh = (await encrypt_model(new, contact())).as_dict()
        assert new.needs_reindex(str(fresh["email_hash"])) is False
        with pytest.raises(InvalidHashError, match="pepper version 2"):
            old.needs_reindex(str(fresh["email_hash"]))  # newer than old's: not old's to redo
        with pytest.raises(DecryptionError):
            await decrypt_model(old, fresh, Contact)


# -- batches ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    id: int
    email: Annotated[str, Encrypt(), HashBasic()]
    note: Annotated[str | None, Encrypt()]


async def test_batch_costs_one_kms_call_per_dek(local: LocalKMSService, tmp_path: Path) -> None:
    rows = [Row(i, f"user{i}@example.com", None if i % 3 else f"note {i}") for i in range(1000)]
    # Two encrypted fields a record, 500 messages a DEK: 2000 messages, 4 DEKs.
    cache = DEKCache(max_messages_per_dek=500)
    async with await make_crypto(local, tmp_path, cache) as writer:
        before = writer.stats().kms_calls
        records = await encrypt_models(writer, rows, record_id=lambda r: r.id, concurrency=32)
        after = writer.stats().kms_calls
        assert after.get("encrypt_dek", 0) - before.get("encrypt_dek", 0) == 4
        assert after.get("decrypt_dek", 0) == before.get("decrypt_dek", 0) == 0
        assert [r.fields["id"] for r in records] == list(range(1000))
        assert len({r.header for r in records}) == 4
        # The writer keeps what it wrapped: reading back costs nothing.
        back = await decrypt_models(writer, records, Row, record_id=lambda r: r.fields["id"])
        assert back == rows
        assert writer.stats().kms_calls.get("decrypt_dek", 0) == 0
    rows_as_dicts = [r.as_dict() for r in records]
    async with await make_crypto(local, tmp_path, DEKCache()) as reader:
        before = reader.stats().kms_calls
        back = await decrypt_models(
            reader, rows_as_dicts, Row, record_id=lambda r: r.fields["id"], concurrency=64
        )
        assert back == rows
        assert reader.stats().kms_calls["decrypt_dek"] - before.get("decrypt_dek", 0) == 4
        assert reader.stats().kms_calls.get("encrypt_dek", 0) == 0


async def test_batch_preserves_order_and_handles_empty(crypto: Crypto) -> None:
    assert await encrypt_models(crypto, []) == []
    assert await decrypt_models(crypto, [], Row) == []
    rows = (Row(i, f"{i}@x.org", None) for i in range(40))  # any iterable
    records = await encrypt_models(crypto, rows, concurrency=3)
    back = await decrypt_models(crypto, records, Row, concurrency=1)
    assert [r.id for r in back] == list(range(40))


async def test_batch_failure_cancels_the_rest_and_propagates(crypto: Crypto) -> None:
    rows: list[Any] = [Row(i, f"{i}@x.org", None) for i in range(100)]
    rows[37] = Row(37, SECRET_EMAIL.encode(), None)  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError, match=r"Row\.email holds a bytes") as caught:
        await encrypt_models(crypto, rows, concurrency=8)
    assert_error_is_clean(caught.value)
    records = await encrypt_models(crypto, rows[:10], record_id=lambda r: r.id)
    with pytest.raises(DecryptionError):
        await decrypt_models(crypto, records, Row)  # no record ids: every one fails
    with pytest.raises(ConfigurationError, match="concurrency"):
        await encrypt_models(crypto, rows[:1], concurrency=0)


# -- nothing secret in text ---------------------------------------------------------------------


async def test_no_plaintext_in_reprs_or_messages(crypto: Crypto) -> None:
    obj = contact(password=SECRET_PASSWORD)
    record = await encrypt_model(crypto, obj, record_id=1)
    for text in (repr(record), str(record), repr(Encrypt()), repr(inspect_model(Contact))):
        assert secret_free(text)
    assert "EncryptedRecord" in repr(record)
    assert "Contact" in repr(record)
    row = record.as_dict()
    assert secret_free(json.dumps(row))
    errors: list[EncxError] = []
    for bad_id in (2, None):
        try:
            await decrypt_model(crypto, row, Contact, record_id=bad_id)
        except DecryptionError as exc:
            errors.append(exc)
    assert len(errors) == 2
    for error in errors:
        assert_error_is_clean(error)


# -- without pydantic ---------------------------------------------------------------------------

_NO_PYDANTIC = """
import asyncio, dataclasses, sys
from typing import Annotated

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pydantic" or name.startswith("pydantic."):
            raise ImportError("pydantic is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
from encx_async._models import Encrypt, inspect_model

@dataclasses.dataclass
class Note:
    text: Annotated[str, Encrypt()]

assert inspect_model(Note).fields[0].encrypt
assert "pydantic" not in sys.modules
print("ok")
"""


def test_the_module_works_without_pydantic() -> None:
    result = subprocess.run(  # noqa: S603 (our own interpreter, our own code)
        [sys.executable, "-c", _NO_PYDANTIC],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- review findings, kept fixed ------------------------------------------------


async def test_reordering_fields_keeps_old_records_readable(crypto: Crypto) -> None:
    @dataclasses.dataclass
    class V1:
        __encx_name__ = "Reordered"
        a: Annotated[str, Encrypt()]
        b: Annotated[str, Encrypt()]

    @dataclasses.dataclass
    class V2:
        __encx_name__ = "Reordered"
        b: Annotated[str, Encrypt()]
        a: Annotated[str, Encrypt()]

    record = await crypto.encrypt_model(V1(a="first", b="second"))
    assert await crypto.decrypt_model(record, V2) == V2(b="second", a="first")


async def test_dataclass_values_take_the_declared_type(crypto: Crypto) -> None:
    @dataclasses.dataclass
    class Num:
        x: Annotated[float, Encrypt(), HashBasic()]
        n: Annotated[int, Encrypt()] = 0
        d: Annotated[dt.date | None, Encrypt()] = None

    record = await crypto.encrypt_model(Num(x=1))
    assert record.fields["x_hash"] == crypto.blind_index(Num, "x", 1.0)
    assert record.fields["x_hash"] == crypto.blind_index(Num, "x", 1)  # widened the same way
    assert record.fields["x_hash"] == crypto.hash_basic(1.0, domain=(Num.__qualname__, "x"))
    back = await crypto.decrypt_model(record, Num)
    assert type(back.x) is float
    for bad in (Num(x=1.0, n=True), Num(x=1.0, d=dt.datetime.now(dt.UTC))):
        with pytest.raises(InvalidValueError):
            await crypto.encrypt_model(bad)


async def test_a_blind_index_of_a_pepper_version_never_issued_is_refused(crypto: Crypto) -> None:
    @dataclasses.dataclass
    class Person:
        email: Annotated[str, Encrypt(), HashBasic()]

    row = (await crypto.encrypt_model(Person(email="alice@example.com"))).as_dict()
    forgeries = [f"{kind}:{version}:" + "A" * 43 for kind in ("hb1", "hb2") for version in (0, 2)]
    for forged in [*forgeries, "hb1:9999999999:" + "A" * 43, "hb2:1:" + "A" * 43]:
        with pytest.raises(DecryptionError):
            await crypto.decrypt_model({**row, "email_hash": forged}, Person)
