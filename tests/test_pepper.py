"""Pepper: validation, loading (environment, file, secret string) and AWS Secrets Manager.

The Secrets Manager tests run against the in-process moto server of
``conftest.py``, over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hmac
import json
import logging
import os
import pickle
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from aiobotocore.session import AioSession
from botocore.exceptions import ClientError

from encx_async import _exceptions as errors
from encx_async._pepper import MAX_PEPPER_VERSION, PEPPER_SIZE, Pepper
from encx_async.providers import _secrets_manager
from encx_async.providers.aws import Config, KMSService, SecretsManagerPepperSource

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient

REGION = "us-east-1"
# Chosen so that its base64 has both '+' and '/' (and one '=' of padding), so
# the standard and URL-safe alphabets differ.
SECRET = b"\xfb\xef\xbe\xff\xff\xff" * 5 + b"\x01\x02"
B64 = base64.b64encode(SECRET).decode()
URLSAFE = base64.urlsafe_b64encode(SECRET).decode()
OTHER = bytes(range(1, 33))

MotoApi = Callable[[str, bytes], bytes]  # the moto_api fixture

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def secret_forms(secret: bytes) -> list[str]:
    """Every way a pepper's bytes could show up in text."""
    return [
        secret.hex(),
        base64.b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
        str(list(secret))[1:-1],
    ]


def assert_no_leak(exc: BaseException, secret: bytes = SECRET, *extra: str) -> None:
    """Neither ``exc`` nor anything chained to it shows ``secret`` (or ``extra``)."""
    forbidden = [*secret_forms(secret), *extra]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts = [str(current), repr(current), *(repr(arg) for arg in current.args)]
        for text in texts:
            for form in forbidden:
                assert form not in text, f"{type(current).__name__} shows the secret"
        for value in vars(current).values() if hasattr(current, "__dict__") else ():
            if isinstance(value, bytes):
                assert not any(form.encode() in value for form in forbidden)
            elif isinstance(value, str):
                assert not any(form in value for form in forbidden)
        current = current.__cause__ or current.__context__


# -- the Pepper value ----------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(kind: Callable[[bytes], Any]) -> None:
    pepper = Pepper(kind(SECRET))
    assert pepper.secret == SECRET
    assert type(pepper.secret) is bytes
    assert pepper.version == 1


def test_copies_a_bytearray() -> None:
    buffer = bytearray(SECRET)
    pepper = Pepper(buffer, version=4)
    buffer[:] = OTHER
    assert pepper.secret == SECRET
    assert pepper.version == 4


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 48, 64])
def test_rejects_wrong_size(size: int) -> None:
    secret = (SECRET * 3)[:size]
    with pytest.raises(errors.ConfigurationError) as caught:
        Pepper(secret)
    message = str(caught.value)
    assert f"exactly {PEPPER_SIZE} bytes" in message
    assert f"got {size} bytes" in message
    assert_no_leak(caught.value, secret) if size >= 16 else None


def test_rejects_all_zero() -> None:
    with pytest.raises(errors.ConfigurationError, match="all zero"):
        Pepper(bytes(32))


@pytest.mark.parametrize("secret", [B64, 32, None, [1] * 32, SECRET.hex()])
def test_rejects_wrong_type(secret: Any) -> None:
    with pytest.raises(errors.ConfigurationError, match="must be bytes") as caught:
        Pepper(secret)
    assert type(secret).__name__ in str(caught.value)
    assert_no_leak(caught.value)


def test_str_secret_hints_at_the_text_loaders() -> None:
    with pytest.raises(errors.ConfigurationError, match="from_env"):
        Pepper(B64)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, -1, MAX_PEPPER_VERSION + 1, 2**64])
def test_rejects_version_out_of_range(version: int) -> None:
    with pytest.raises(errors.ConfigurationError, match=f"1 to {MAX_PEPPER_VERSION}"):
        Pepper(SECRET, version=version)


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_rejects_version_of_wrong_type(version: Any) -> None:
    with pytest.raises(errors.ConfigurationError, match="must be an int"):
        Pepper(SECRET, version=version)


def test_largest_version() -> None:
    assert Pepper(SECRET, version=MAX_PEPPER_VERSION).version == MAX_PEPPER_VERSION


def test_repr_and_str_are_redacted() -> None:
    pepper = Pepper(SECRET, version=3)
    assert repr(pepper) == "<Pepper version=3 (32 bytes, redacted)>"
    for text in (repr(pepper), str(pepper), f"{pepper}", f"{pepper!r}", f"{[pepper]}"):
        for form in secret_forms(SECRET):
            assert form not in text


def test_logging_a_pepper_shows_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logging.getLogger("tests.pepper").info("loaded %s and %r", Pepper(SECRET), Pepper(SECRET))
    message = caplog.records[-1].getMessage()
    assert "redacted" in message
    assert not any(form in message for form in secret_forms(SECRET))


def test_equality_is_on_secret_and_version() -> None:
    assert Pepper(SECRET) == Pepper(bytearray(SECRET))
    assert Pepper(SECRET, version=2) == Pepper(SECRET, version=2)
    assert Pepper(SECRET, version=1) != Pepper(SECRET, version=2)
    assert Pepper(SECRET) != Pepper(OTHER)
    assert Pepper(SECRET) != SECRET
    assert Pepper(SECRET) != "Pepper"


def test_equality_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # _pepper looks it up per call
    assert Pepper(SECRET) == Pepper(SECRET)
    assert Pepper(SECRET) != Pepper(OTHER)
    assert calls == [(SECRET, SECRET), (SECRET, OTHER)]


def test_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(Pepper(SECRET))
    with pytest.raises(TypeError):
        {Pepper(SECRET)}


def test_immutable() -> None:
    pepper = Pepper(SECRET)
    with pytest.raises(AttributeError):
        pepper._secret = OTHER
    with pytest.raises(AttributeError):
        pepper.version = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del pepper._version
    with pytest.raises(AttributeError):
        pepper.extra = 1
    assert not hasattr(pepper, "__dict__")
    assert pepper.secret == SECRET
    assert pepper.version == 1


def test_no_bytes_conversion_and_no_pickling() -> None:
    pepper = Pepper(SECRET)
    with pytest.raises(TypeError):
        bytes(pepper)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(pepper)
    assert copy.copy(pepper) is pepper
    assert copy.deepcopy([pepper])[0] is pepper


def test_generate() -> None:
    first, second = Pepper.generate(), Pepper.generate(version=5)
    assert len(first.secret) == PEPPER_SIZE
    assert any(first.secret)
    assert first.version == 1
    assert second.version == 5
    assert first != Pepper(second.secret, version=1)
    with pytest.raises(errors.ConfigurationError):
        Pepper.generate(0)


# -- from_env ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [B64, B64.rstrip("="), URLSAFE, URLSAFE.rstrip("="), f"  {B64}\n", f"\t{URLSAFE}  "],
    ids=["standard", "standard-unpadded", "urlsafe", "urlsafe-unpadded", "spaces", "tabs"],
)
def test_from_env_base64_variants(value: str) -> None:
    pepper = Pepper.from_env(environ={"ENCX_PEPPER": value})
    assert pepper == Pepper(SECRET, version=1)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCX_PEPPER", B64)
    monkeypatch.setenv("MY_PEPPER", f"2:{URLSAFE}")
    assert Pepper.from_env() == Pepper(SECRET)
    assert Pepper.from_env("MY_PEPPER") == Pepper(SECRET, version=2)


def test_from_env_version_prefix_and_argument() -> None:
    env = {"A": f"7:{B64}", "B": B64, "C": f"07:{B64.rstrip('=')}"}
    assert Pepper.from_env("A", environ=env).version == 7
    assert Pepper.from_env("A", version=7, environ=env).version == 7
    assert Pepper.from_env("B", version=3, environ=env) == Pepper(SECRET, version=3)
    assert Pepper.from_env("C", environ=env).version == 7
    with pytest.raises(errors.ConfigurationError, match="version=8") as caught:
        Pepper.from_env("A", version=8, environ=env)
    assert_no_leak(caught.value)


@pytest.mark.parametrize("value", [f"0:{B64}", f"v1:{B64}", f"-1:{B64}", f":{B64}", f"1:2:{B64}"])
def test_from_env_rejects_bad_version_prefix(value: str) -> None:
    with pytest.raises(errors.ConfigurationError) as caught:
        Pepper.from_env(environ={"ENCX_PEPPER": value})
    assert "ENCX_PEPPER" in str(caught.value)
    assert_no_leak(caught.value)


def test_from_env_missing_names_the_variable() -> None:
    with pytest.raises(errors.ConfigurationError, match="ENCX_PEPPER is not set"):
        Pepper.from_env(environ={})
    with pytest.raises(errors.ConfigurationError, match="APP_PEPPER is not set"):
        Pepper.from_env("APP_PEPPER", environ={"ENCX_PEPPER": B64})


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_from_env_empty(value: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="ENCX_PEPPER is empty"):
        Pepper.from_env(environ={"ENCX_PEPPER": value})


@pytest.mark.parametrize(
    "value",
    [
        B64[:-2] + "!=",  # not an alphabet character
        B64[:20] + " " + B64[20:],  # space inside
        B64.replace("+", "-", 1),  # both alphabets at once
        B64 + "==",  # too much padding
        B64[:-1] + "A",  # padding replaced: 44 characters without '=' is 33 bytes
        B64[:-1] + "B=",  # wrong padding length
        B64.rstrip("=")[:-1],  # an impossible length
        B64[:-2] + "P=",  # bits set past the end (canonical is 'I')
    ],
)
def test_from_env_rejects_bad_base64_without_quoting_it(value: str) -> None:
    with pytest.raises(errors.ConfigurationError) as caught:
        Pepper.from_env(environ={"ENCX_PEPPER": value})
    assert "ENCX_PEPPER" in str(caught.value)
    assert_no_leak(caught.value, SECRET, value.strip(), value.strip()[4:30])
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


@pytest.mark.parametrize("size", [16, 24, 31, 33, 64])
def test_from_env_rejects_wrong_decoded_length(size: int) -> None:
    value = base64.b64encode((SECRET * 2)[:size]).decode()
    with pytest.raises(errors.ConfigurationError, match=f"decodes to {size} bytes") as caught:
        Pepper.from_env(environ={"ENCX_PEPPER": value})
    assert_no_leak(caught.value, SECRET, value)


def test_from_env_rejects_all_zero() -> None:
    with pytest.raises(errors.ConfigurationError, match="all zero"):
        Pepper.from_env(environ={"ENCX_PEPPER": base64.b64encode(bytes(32)).decode()})


def test_from_env_rejects_bad_arguments() -> None:
    with pytest.raises(errors.ConfigurationError, match="name"):
        Pepper.from_env("", environ={"": B64})
    with pytest.raises(errors.ConfigurationError, match="version"):
        Pepper.from_env(version=0, environ={"ENCX_PEPPER": B64})


# -- from_file ---------------------------------------------------------------------


def write_secret_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_from_file_raw_bytes(tmp_path: Path) -> None:
    path = write_secret_file(tmp_path / "pepper.bin", SECRET)
    assert Pepper.from_file(path) == Pepper(SECRET)
    assert Pepper.from_file(str(path), version=9) == Pepper(SECRET, version=9)


@pytest.mark.parametrize(
    "content",
    [B64, B64 + "\n", f"\n  {B64}\r\n", URLSAFE, URLSAFE.rstrip("=") + "\n", B64.rstrip("=")],
)
def test_from_file_base64_text(tmp_path: Path, content: str) -> None:
    path = write_secret_file(tmp_path / "pepper.txt", content.encode())
    assert Pepper.from_file(path, version=2) == Pepper(SECRET, version=2)


def test_from_file_of_exactly_32_bytes_is_raw(tmp_path: Path) -> None:
    """Even when those 32 bytes happen to be text (the base64 of 24 bytes is 32 characters)."""
    text = base64.b64encode(SECRET[:24])
    assert len(text) == PEPPER_SIZE
    path = write_secret_file(tmp_path / "pepper", text)
    assert Pepper.from_file(path).secret == text


def test_from_file_follows_symlinks(tmp_path: Path) -> None:
    target = write_secret_file(tmp_path / "target", (B64 + "\n").encode())
    link = tmp_path / "link"
    link.symlink_to(target)
    assert Pepper.from_file(link) == Pepper(SECRET)


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o666, 0o700 | 0o004])
def test_from_file_refuses_group_or_world_access(tmp_path: Path, mode: int) -> None:
    path = write_secret_file(tmp_path / "pepper", (B64 + "\n").encode(), mode)
    with pytest.raises(errors.ConfigurationError, match="chmod 600") as caught:
        Pepper.from_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"{mode:04o}" in message
    assert_no_leak(caught.value)


@posix_only
@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_from_file_accepts_owner_only(tmp_path: Path, mode: int) -> None:
    path = write_secret_file(tmp_path / "pepper", SECRET, mode)
    assert Pepper.from_file(path) == Pepper(SECRET)


@posix_only
def test_from_file_checks_the_symlink_target_mode(tmp_path: Path) -> None:
    target = write_secret_file(tmp_path / "target", SECRET, 0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(errors.ConfigurationError, match="chmod 600"):
        Pepper.from_file(link)


def test_from_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(errors.ConfigurationError, match="does not exist") as caught:
        Pepper.from_file(path)
    assert str(path) in str(caught.value)
    assert caught.value.__context__ is None


def test_from_file_directory(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(errors.ConfigurationError, match=r"directory|not a regular file"):
        Pepper.from_file(directory)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (SECRET[:31], "not text|not base64"),
        (SECRET + b"\n", "not text"),  # raw bytes plus a newline: 33 bytes
        (b"\xff" * 40, "not text"),
        (b"x" * 2000, "larger than"),
        (base64.b64encode(SECRET[:24]) + b"\n", "decodes to 24 bytes"),
        (f"1:{B64}".encode(), "not base64"),
        (B64.encode() + b"!", "not base64"),
    ],
)
def test_from_file_rejects_bad_content(tmp_path: Path, content: bytes, match: str) -> None:
    path = write_secret_file(tmp_path / "pepper", content)
    with pytest.raises(errors.ConfigurationError, match=match) as caught:
        Pepper.from_file(path)
    assert_no_leak(caught.value)
    assert caught.value.__context__ is None


def test_from_file_rejects_bad_arguments(tmp_path: Path) -> None:
    path = write_secret_file(tmp_path / "pepper", SECRET)
    with pytest.raises(errors.ConfigurationError, match="version"):
        Pepper.from_file(path, version=0)
    with pytest.raises(errors.ConfigurationError, match="path"):
        Pepper.from_file(42)  # type: ignore[arg-type]


# -- the secret string ---------------------------------------------------------------


def test_secret_string_round_trip() -> None:
    pepper = Pepper(SECRET, version=12)
    text = pepper.to_secret_string()
    assert json.loads(text) == {"encx_pepper": 1, "version": 12, "secret": B64}
    assert list(json.loads(text)) == ["encx_pepper", "version", "secret"]
    assert Pepper.from_secret_string(text) == pepper
    generated = Pepper.generate(version=3)
    assert Pepper.from_secret_string(generated.to_secret_string()) == generated


def test_secret_string_accepts_any_member_order_and_whitespace() -> None:
    text = f'\n{{ "secret" : "{B64}",\n "version": 2, "encx_pepper": 1 }}\n'
    assert Pepper.from_secret_string(text) == Pepper(SECRET, version=2)


def _doc(**changes: Any) -> str:
    document: dict[str, Any] = {"encx_pepper": 1, "version": 1, "secret": B64}
    for key, value in changes.items():
        if value is _DROP:
            del document[key]
        else:
            document[key] = value
    return json.dumps(document)


_DROP = object()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(B64, id="bare-base64"),
        pytest.param("", id="empty"),
        pytest.param("{", id="truncated"),
        pytest.param(f'["{B64}"]', id="array"),
        pytest.param(f'"{B64}"', id="json-string"),
        pytest.param("null", id="null"),
        pytest.param(_doc(encx_pepper=_DROP), id="no-marker"),
        pytest.param(_doc(version=_DROP), id="no-version"),
        pytest.param(_doc(secret=_DROP), id="no-secret"),
        pytest.param(_doc(extra="x"), id="extra-member"),
        pytest.param(_doc(encx_pepper=2), id="format-2"),
        pytest.param(_doc(encx_pepper=True), id="format-true"),
        pytest.param(_doc(encx_pepper="1"), id="format-str"),
        pytest.param(_doc(encx_pepper=1.0), id="format-float"),
        pytest.param(_doc(version=0), id="version-0"),
        pytest.param(_doc(version=-3), id="version-negative"),
        pytest.param(_doc(version="1"), id="version-str"),
        pytest.param(_doc(version=True), id="version-true"),
        pytest.param(_doc(version=1.5), id="version-float"),
        pytest.param(_doc(version=2**40), id="version-huge"),
        pytest.param(_doc(secret=SECRET.hex()), id="secret-hex"),
        pytest.param(_doc(secret=B64.rstrip("=")), id="secret-unpadded"),
        pytest.param(_doc(secret=URLSAFE), id="secret-urlsafe"),
        pytest.param(_doc(secret=" " + B64), id="secret-space"),
        pytest.param(_doc(secret=list(SECRET)), id="secret-list"),
        pytest.param(_doc(secret=None), id="secret-null"),
        pytest.param(_doc(secret=base64.b64encode(SECRET[:24]).decode()), id="secret-short"),
        pytest.param(_doc(secret=base64.b64encode(bytes(32)).decode()), id="secret-zero"),
        pytest.param(
            '{"encx_pepper": 1, "encx_pepper": 1, "version": 1, "secret": "' + B64 + '"}',
            id="duplicate-member",
        ),
        pytest.param('{"encx_pepper": NaN, "version": 1, "secret": "' + B64 + '"}', id="nan"),
        pytest.param(_doc(extra="x" * 2000), id="too-long"),
        pytest.param("[" * 5000 + "]" * 5000, id="deep-nesting"),
    ],
)
def test_secret_string_rejects(text: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="pepper") as caught:
        Pepper.from_secret_string(text)
    assert_no_leak(caught.value, SECRET, *([text] if len(text) > 8 else []))
    assert caught.value.__context__ is None or isinstance(
        caught.value.__context__, errors.ConfigurationError
    )


@pytest.mark.parametrize("value", [_doc().encode(), None, {"encx_pepper": 1}])
def test_secret_string_must_be_str(value: Any) -> None:
    with pytest.raises(errors.ConfigurationError, match="must be a str"):
        Pepper.from_secret_string(value)


def test_secret_string_errors_keep_no_decoder_error() -> None:
    """A JSONDecodeError keeps the whole document in ``.doc``: none may be chained."""
    text = '{"encx_pepper": 1, "version": 1, "secret": "' + B64 + '",}'
    with pytest.raises(errors.ConfigurationError) as caught:
        Pepper.from_secret_string(text)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


# -- AWS Secrets Manager -----------------------------------------------------------


@pytest.fixture
def sm_config(moto_endpoint: str) -> Config:
    return Config(region=REGION, endpoint_url=moto_endpoint)


@pytest_asyncio.fixture(loop_scope="function")
async def source(sm_config: Config) -> AsyncIterator[SecretsManagerPepperSource]:
    async with SecretsManagerPepperSource(sm_config) as opened:
        yield opened


@pytest_asyncio.fixture(loop_scope="function")
async def admin(moto_endpoint: str) -> AsyncIterator[SecretsManagerClient]:
    """A plain Secrets Manager client on moto, to set up and inspect secrets."""
    async with AioSession().create_client(
        "secretsmanager", region_name=REGION, endpoint_url=moto_endpoint
    ) as client:
        yield client


async def secret_names(admin: SecretsManagerClient) -> list[str]:
    names: list[str] = []
    async for page in admin.get_paginator("list_secrets").paginate(IncludePlannedDeletion=True):
        names.extend(entry["Name"] for entry in page["SecretList"])
    return names


async def test_load_existing(
    source: SecretsManagerPepperSource, admin: SecretsManagerClient
) -> None:
    stored = Pepper(SECRET, version=3)
    await admin.create_secret(Name="app/pepper", SecretString=stored.to_secret_string())
    assert await source.load("app/pepper") == stored
    assert await source.load("app/pepper", create_if_missing=True) == stored
    arn = (await admin.describe_secret(SecretId="app/pepper"))["ARN"]
    assert await source.load(arn) == stored
    assert await secret_names(admin) == ["app/pepper"]


async def test_create_if_missing(
    source: SecretsManagerPepperSource, admin: SecretsManagerClient
) -> None:
    pepper = await source.load("app/new-pepper", create_if_missing=True)
    assert pepper.version == 1
    assert len(pepper.secret) == PEPPER_SIZE
    stored = await admin.get_secret_value(SecretId="app/new-pepper")
    assert Pepper.from_secret_string(stored["SecretString"]) == pepper
    described = await admin.describe_secret(SecretId="app/new-pepper")
    assert "encx-async pepper" in described.get("Description", "")
    # Later boots read the same pepper, with or without create_if_missing.
    assert await source.load("app/new-pepper") == pepper
    assert await source.load("app/new-pepper", create_if_missing=True) == pepper
    versions = await admin.list_secret_version_ids(SecretId="app/new-pepper")
    assert len(versions["Versions"]) == 1


async def test_absent_without_create(
    source: SecretsManagerPepperSource, admin: SecretsManagerClient
) -> None:
    with pytest.raises(errors.ConfigurationError) as caught:
        await source.load("app/absent")
    message = str(caught.value)
    assert "'app/absent'" in message
    assert REGION in message
    assert "create_if_missing=True" in message
    assert isinstance(caught.value.__cause__, ClientError)
    assert await secret_names(admin) == []


async def test_concurrent_first_boot_one_source(
    source: SecretsManagerPepperSource, admin: SecretsManagerClient
) -> None:
    peppers = await asyncio.gather(
        *(source.load("fleet/pepper", create_if_missing=True) for _ in range(12))
    )
    assert all(pepper == peppers[0] for pepper in peppers)
    assert await secret_names(admin) == ["fleet/pepper"]
    versions = await admin.list_secret_version_ids(SecretId="fleet/pepper")
    assert len(versions["Versions"]) == 1
    stored = await admin.get_secret_value(SecretId="fleet/pepper")
    assert Pepper.from_secret_string(stored["SecretString"]) == peppers[0]


@pytest.mark.slow
async def test_concurrent_first_boot_many_instances(
    sm_config: Config, admin: SecretsManagerClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="encx_async.secretsmanager")
    instances = [SecretsManagerPepperSource(sm_config) for _ in range(10)]
    try:
        peppers = await asyncio.gather(
            *(instance.load("fleet/pepper", create_if_missing=True) for instance in instances)
        )
    finally:
        await asyncio.gather(*(instance.aclose() for instance in instances))
    assert all(pepper == peppers[0] for pepper in peppers)
    assert await secret_names(admin) == ["fleet/pepper"]
    versions = await admin.list_secret_version_ids(SecretId="fleet/pepper")
    assert len(versions["Versions"]) == 1
    stored = await admin.get_secret_value(SecretId="fleet/pepper")
    assert Pepper.from_secret_string(stored["SecretString"]) == peppers[0]
    messages = [r.getMessage() for r in caplog.records if r.name == "encx_async.secretsmanager"]
    assert sum(m.startswith("created pepper secret fleet/pepper") for m in messages) == 1


async def test_two_instances_one_after_the_other(sm_config: Config) -> None:
    async with SecretsManagerPepperSource(sm_config) as first:
        created = await first.load("fleet/pepper", create_if_missing=True)
    async with SecretsManagerPepperSource(sm_config) as second:
        assert await second.load("fleet/pepper", create_if_missing=True) == created
        assert await second.load("fleet/pepper") == created


async def test_lost_race_reads_the_winners_pepper(
    moto_endpoint: str, admin: SecretsManagerClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Another instance creates the secret between our miss and our CreateSecret."""
    winner = Pepper(SECRET, version=1)
    session = AioSession()
    raced: list[str] = []

    async def create_first(**kwargs: Any) -> None:
        if not raced:
            raced.append("won")
            await admin.create_secret(Name="fleet/pepper", SecretString=winner.to_secret_string())

    session.register("before-call.secrets-manager.CreateSecret", create_first)
    caplog.set_level(logging.INFO, logger="encx_async.secretsmanager")
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session)
    async with SecretsManagerPepperSource(config) as loser:
        assert await loser.load("fleet/pepper", create_if_missing=True) == winner
    assert raced == ["won"]
    assert any("already exists" in r.getMessage() for r in caplog.records)
    versions = await admin.list_secret_version_ids(SecretId="fleet/pepper")
    assert len(versions["Versions"]) == 1


class _FakeHttp:
    status_code = 400


def not_yet_visible(after_create: int) -> tuple[AioSession, list[str]]:
    """A session whose first ``after_create`` GetSecretValue calls after a CreateSecret
    answer ResourceNotFoundException, as an eventually consistent Secrets Manager may."""
    session = AioSession()
    calls: list[str] = []

    def on_create(**kwargs: Any) -> None:
        calls.append("CreateSecret")

    def on_get(**kwargs: Any) -> tuple[_FakeHttp, dict[str, Any]] | None:
        calls.append("GetSecretValue")
        if "CreateSecret" in calls and calls.count("GetSecretValue") - 1 <= after_create:
            error = {"Code": "ResourceNotFoundException", "Message": "not yet"}
            return _FakeHttp(), {"Error": error, "ResponseMetadata": {"HTTPStatusCode": 400}}
        return None

    session.register("before-call.secrets-manager.CreateSecret", on_create)
    session.register("before-call.secrets-manager.GetSecretValue", on_get)
    return session, calls


async def test_read_back_waits_for_the_created_secret(
    moto_endpoint: str, admin: SecretsManagerClient
) -> None:
    session, calls = not_yet_visible(after_create=2)
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session)
    async with SecretsManagerPepperSource(config) as source:
        pepper = await source.load("app/pepper", create_if_missing=True)
    assert calls == ["GetSecretValue", "CreateSecret", *["GetSecretValue"] * 3]
    stored = await admin.get_secret_value(SecretId="app/pepper")
    assert Pepper.from_secret_string(stored["SecretString"]) == pepper


async def test_read_back_gives_up(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_secrets_manager, "_READ_BACK_DELAYS", (0.0, 0.01))
    session, calls = not_yet_visible(after_create=100)
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session)
    async with SecretsManagerPepperSource(config) as source:
        with pytest.raises(errors.KMSUnavailableError, match="retry later") as caught:
            await source.load("app/pepper", create_if_missing=True)
    assert "'app/pepper'" in str(caught.value)
    assert calls == ["GetSecretValue", "CreateSecret", *["GetSecretValue"] * 3]


@pytest.mark.parametrize(
    "value",
    [
        "hunter2-is-not-a-pepper",
        json.dumps({"password": "hunter2-is-not-a-pepper"}),
        json.dumps({"encx_pepper": 1, "version": 1, "secret": "hunter2-is-not-a-pepper"}),
        json.dumps(
            {"encx_pepper": 1, "version": 1, "secret": base64.b64encode(b"h" * 31).decode()}
        ),
    ],
)
async def test_non_encx_secret(
    source: SecretsManagerPepperSource, admin: SecretsManagerClient, value: str
) -> None:
    await admin.create_secret(Name="app/other", SecretString=value)
    for create in (False, True):
        with pytest.raises(errors.ConfigurationError, match="is not an encx pepper") as caught:
            await source.load("app/other", create_if_missing=create)
        assert "'app/other'" in str(caught.value)
        assert_no_leak(caught.value, b"h" * 31, "hunter2", value)
    # Never overwritten.
    assert (await admin.get_secret_value(SecretId="app/other"))["SecretString"] == value


async def test_binary_secret(
    source: SecretsManagerPepperSource, admin: SecretsManagerClient
) -> None:
    await admin.create_secret(Name="app/binary", SecretBinary=SECRET)
    with pytest.raises(errors.ConfigurationError, match="binary") as caught:
        await source.load("app/binary")
    assert_no_leak(caught.value)


async def test_secret_scheduled_for_deletion(
    source: SecretsManagerPepperSource, admin: SecretsManagerClient
) -> None:
    await admin.create_secret(Name="app/doomed", SecretString=Pepper(SECRET).to_secret_string())
    await admin.delete_secret(SecretId="app/doomed", RecoveryWindowInDays=7)
    for create in (False, True):
        with pytest.raises(errors.ConfigurationError, match="scheduled for deletion") as caught:
            await source.load("app/doomed", create_if_missing=create)
        assert "restore" in str(caught.value)
        assert "  " not in str(caught.value)
        assert isinstance(caught.value.__cause__, ClientError)
        assert_no_leak(caught.value)
    await admin.restore_secret(SecretId="app/doomed")
    assert await source.load("app/doomed") == Pepper(SECRET)


async def test_created_secret_uses_the_kms_key(
    sm_config: Config, admin: SecretsManagerClient, aws_kms: KMSService
) -> None:
    key_arn = await aws_kms.create_key("pepper key")
    async with SecretsManagerPepperSource(sm_config, kms_key_id=key_arn) as source:
        pepper = await source.load("app/cmk-pepper", create_if_missing=True)
        assert await source.load("app/cmk-pepper") == pepper
    described = await admin.describe_secret(SecretId="app/cmk-pepper")
    assert described.get("KmsKeyId") == key_arn


async def test_argument_checks(source: SecretsManagerPepperSource) -> None:
    with pytest.raises(errors.ConfigurationError, match="must not be empty"):
        await source.load("")
    with pytest.raises(errors.ConfigurationError, match="at most"):
        await source.load("x" * 3000)
    with pytest.raises(TypeError):
        await source.load(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await source.load("app/pepper", create_if_missing="yes")  # type: ignore[arg-type]
    arn = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:app/pepper-AbCdEf"
    with pytest.raises(errors.ConfigurationError, match="secret name"):
        await source.load(arn, create_if_missing=True)
    with pytest.raises(errors.ConfigurationError, match="secret name"):
        await source.load("has spaces", create_if_missing=True)


async def test_lifecycle(sm_config: Config, admin: SecretsManagerClient) -> None:
    await admin.create_secret(Name="app/pepper", SecretString=Pepper(SECRET).to_secret_string())
    lazy = SecretsManagerPepperSource(sm_config)
    assert "not opened" in repr(lazy)
    try:
        assert await lazy.load("app/pepper") == Pepper(SECRET)  # opens on first use
        assert "open" in repr(lazy)
        assert lazy.region == REGION
        assert lazy.endpoint_url == sm_config.endpoint_url
    finally:
        await lazy.aclose()
    await lazy.aclose()  # idempotent
    assert "closed" in repr(lazy)
    with pytest.raises(errors.ClosedError):
        await lazy.load("app/pepper")
    with pytest.raises(errors.ClosedError):
        async with lazy:
            pass

    opened = await SecretsManagerPepperSource.create(sm_config)
    try:
        assert await opened.load("app/pepper") == Pepper(SECRET)
    finally:
        await opened.aclose()
    never_opened = SecretsManagerPepperSource(sm_config)
    await never_opened.aclose()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_unreachable_endpoint() -> None:
    config = Config(
        region=REGION,
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        max_attempts=1,
        connect_timeout=1,
        read_timeout=1,
    )
    async with SecretsManagerPepperSource(config) as source:
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await source.load("app/pepper", create_if_missing=True)
    assert isinstance(caught.value, errors.SecretsManagerUnavailableError)
    message = str(caught.value)
    assert "Secrets Manager GetSecretValue" in message
    assert "could not be reached" in message


async def test_no_credentials_is_a_secrets_manager_error(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    async with SecretsManagerPepperSource(Config(region=REGION, endpoint_url=moto_endpoint)) as src:
        with pytest.raises(errors.SecretsManagerCredentialsError) as caught:
            await src.load("app/pepper")
    # Code written before the Secrets Manager family catches it as it did.
    assert isinstance(caught.value, errors.KMSCredentialsError)
    assert isinstance(caught.value, errors.SecretsManagerAccessDeniedError)
    assert str(caught.value).startswith(
        "no usable AWS credentials to sign Secrets Manager GetSecretValue on secret 'app/pepper'"
    )


@pytest.fixture
def iam_user(moto_endpoint: str, moto_api: MotoApi) -> Iterator[Callable[..., Any]]:
    """Make moto IAM users with given actions; moto enforces IAM while the test runs."""

    async def make(name: str, actions: list[str]) -> AioSession:
        async with AioSession().create_client(
            "iam", region_name=REGION, endpoint_url=moto_endpoint
        ) as iam:
            await iam.create_user(UserName=name)
            if actions:
                policy = {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
                }
                await iam.put_user_policy(
                    UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy)
                )
            key = (await iam.create_access_key(UserName=name))["AccessKey"]
        session = AioSession()
        session.set_credentials(key["AccessKeyId"], key["SecretAccessKey"])
        return session

    yield make
    moto_api("reset-auth", b"inf")


@pytest.mark.slow
async def test_access_denied_names_the_permission(
    moto_endpoint: str,
    moto_api: MotoApi,
    admin: SecretsManagerClient,
    iam_user: Callable[..., Any],
) -> None:
    await admin.create_secret(Name="app/pepper", SecretString=Pepper(SECRET).to_secret_string())
    reader: AioSession = await iam_user("reader", ["secretsmanager:GetSecretValue"])
    nobody: AioSession = await iam_user("nobody", [])
    moto_api("reset-auth", b"0")  # from now on moto checks signatures and IAM policies

    def config(session: AioSession) -> Config:
        return Config(region=REGION, endpoint_url=moto_endpoint, session=session)

    async with SecretsManagerPepperSource(config(reader)) as source:
        assert await source.load("app/pepper") == Pepper(SECRET)
        with pytest.raises(errors.KMSAccessDeniedError) as denied_create:
            await source.load("app/new", create_if_missing=True)
    assert isinstance(denied_create.value, errors.SecretsManagerAccessDeniedError)
    assert "secretsmanager:CreateSecret" in str(denied_create.value)
    assert "Secrets Manager CreateSecret" in str(denied_create.value)
    assert isinstance(denied_create.value.__cause__, ClientError)

    async with SecretsManagerPepperSource(config(nobody)) as source:
        with pytest.raises(errors.KMSAccessDeniedError) as denied_read:
            await source.load("app/pepper")
    assert "secretsmanager:GetSecretValue" in str(denied_read.value)
    assert_no_leak(denied_read.value)

    async with SecretsManagerPepperSource(Config(region=REGION, endpoint_url=moto_endpoint)) as src:
        with pytest.raises(errors.SecretsManagerAccessDeniedError, match="credentials"):
            await src.load("app/pepper")


async def test_debug_logs_never_show_the_pepper(
    source: SecretsManagerPepperSource,
    admin: SecretsManagerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, botocore's included
    created = await source.load("app/pepper", create_if_missing=True)
    assert await source.load("app/pepper") == created
    messages = [record.getMessage() for record in caplog.records]
    assert any(record.name.startswith("botocore") for record in caplog.records)
    assert any("redacted by encx-async" in m for m in messages)
    assert any(m.startswith("Secrets Manager GetSecretValue secret=app/pepper") for m in messages)
    for form in secret_forms(created.secret):
        assert not any(form in m for m in messages)
    assert not any("SecretString" in m for m in messages)
