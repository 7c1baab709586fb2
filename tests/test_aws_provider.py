"""KMSService specifics, against moto and fake endpoints over real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from moto.server import ThreadedMotoServer

from encx_async import _exceptions as errors
from encx_async.kms import KeyManagementService
from encx_async.providers.aws import Config, KMSService

if TYPE_CHECKING:
    from types_aiobotocore_kms import KMSClient

REGION = "us-east-1"
OTHER_REGION = "eu-west-1"
ACCOUNT = "123456789012"
DEK = bytes(range(100, 132))
SOME_UUID = "0f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a0b"

MotoApi = Callable[[str, bytes], bytes]  # the moto_api fixture


# -- helpers -----------------------------------------------------------------


class Counter:
    """A botocore event handler that counts the events it sees."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, **kwargs: Any) -> None:
        self.count += 1


def counting_session(*events: str) -> tuple[AioSession, dict[str, Counter]]:
    session = AioSession()
    counters = {event: Counter() for event in events}
    for event, counter in counters.items():
        session.register(event, counter)
    return session, counters


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class FakeEndpoint:
    """A loopback HTTP server that answers every request the same way, or never.

    ``requests`` counts the requests it received (so retries can be counted).
    """

    def __init__(self, *, status: int = 500, body: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = json.dumps(body or {"__type": "KMSInternalException", "message": "boom"})
        self.hang = False
        self.requests = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                with endpoint._lock:
                    endpoint.requests += 1
                if endpoint.hang:
                    endpoint._release.wait(timeout=30)
                    return
                payload = endpoint.body.encode()
                self.send_response(endpoint.status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def option(config: AioConfig, name: str) -> Any:
    """An option of a botocore config (the stubs do not declare the attributes)."""
    return getattr(config, name)


def fast_config(endpoint_url: str, **overrides: Any) -> Config:
    options: dict[str, Any] = {
        "region": REGION,
        "endpoint_url": endpoint_url,
        "max_attempts": 1,
        "connect_timeout": 0.5,
        "read_timeout": 0.5,
    }
    options.update(overrides)
    return Config(**options)


@pytest_asyncio.fixture(loop_scope="function")
async def admin(moto_endpoint: str) -> AsyncIterator[KMSClient]:
    """A plain aiobotocore KMS client on moto, to set up state behind the service's back."""
    async with AioSession().create_client(
        "kms", region_name=REGION, endpoint_url=moto_endpoint
    ) as client:
        yield client


async def admin_key(admin: KMSClient, alias: str | None = None, **kwargs: Any) -> str:
    metadata = (await admin.create_key(Description="admin key", **kwargs))["KeyMetadata"]
    if alias is not None:
        await admin.create_alias(AliasName=alias, TargetKeyId=metadata["KeyId"])
    return metadata["Arn"]


@pytest.fixture
def no_aws_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the shared AWS files at paths that do not exist; returns the directory."""
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


# -- configuration -------------------------------------------------------------


def test_effective_client_config_defaults() -> None:
    built = Config().build_client_config()
    assert isinstance(built, AioConfig)
    assert option(built, "max_pool_connections") == 10
    assert option(built, "connect_timeout") == 5.0
    assert option(built, "read_timeout") == 10.0
    assert option(built, "retries") == {"total_max_attempts": 3, "mode": "standard"}


def test_client_config_overrides_defaults_and_fields_override_both() -> None:
    client_config = AioConfig(
        read_timeout=30,
        max_pool_connections=50,
        retries={"mode": "adaptive"},
        connector_args={"keepalive_timeout": 3},
        user_agent_extra="my-app",
    )
    built = Config(client_config=client_config).build_client_config()
    assert option(built, "read_timeout") == 30
    assert option(built, "max_pool_connections") == 50
    assert option(built, "connect_timeout") == 5.0  # our default, not botocore's 60
    assert option(built, "retries") == {"total_max_attempts": 3, "mode": "adaptive"}
    assert option(built, "connector_args")["keepalive_timeout"] == 3
    assert option(built, "user_agent_extra") == "my-app"

    explicit = Config(
        client_config=client_config,
        read_timeout=1.5,
        max_pool_connections=4,
        max_attempts=7,
        retry_mode="legacy",
        connect_timeout=2,
    ).build_client_config()
    assert option(explicit, "read_timeout") == 1.5
    assert option(explicit, "max_pool_connections") == 4
    assert option(explicit, "connect_timeout") == 2
    assert option(explicit, "retries") == {"total_max_attempts": 7, "mode": "legacy"}


def test_client_config_max_attempts_is_respected() -> None:
    legacy_style = AioConfig(retries={"max_attempts": 4})
    assert option(Config(client_config=legacy_style).build_client_config(), "retries") == {
        "max_attempts": 4,
        "mode": "standard",
    }
    assert option(
        Config(client_config=legacy_style, max_attempts=2).build_client_config(), "retries"
    ) == {
        "total_max_attempts": 2,
        "mode": "standard",
    }


@pytest.mark.parametrize(
    "options",
    [
        {"region": "not a region"},
        {"max_attempts": 0},
        {"max_pool_connections": -1},
        {"connect_timeout": 0},
        {"read_timeout": -1.0},
        {"retry_mode": "eager"},
        {"alias_cache_ttl": -5},
        {"session": AioSession(), "profile": "dev"},
    ],
)
def test_invalid_config(options: dict[str, Any]) -> None:
    with pytest.raises(errors.ConfigurationError):
        Config(**options)


async def test_constructor_does_no_io() -> None:
    kms = KMSService(fast_config(f"http://127.0.0.1:{closed_port()}"))
    assert "not opened" in repr(kms)
    assert kms.region == REGION
    await kms.aclose()
    await kms.aclose()
    with pytest.raises(errors.ClosedError):
        await kms.get_key_id("alias/anything")
    with pytest.raises(errors.ClosedError):
        await KMSService.__aenter__(kms)


async def test_create_classmethod_and_properties(moto_endpoint: str) -> None:
    config = Config(region=REGION, endpoint_url=moto_endpoint)
    kms = await KMSService.create(config)
    try:
        assert isinstance(kms, KeyManagementService)
        assert kms.config is config
        assert kms.region == REGION
        assert kms.endpoint_url == moto_endpoint
        assert repr(kms) == (
            f"KMSService(region='us-east-1', endpoint_url='{moto_endpoint}', open)"
        )
        key = await kms.create_key("created", alias="alias/created")
        assert key.startswith(f"arn:aws:kms:{REGION}:")
    finally:
        await kms.aclose()


async def test_repr_never_shows_credentials(moto_endpoint: str) -> None:
    session = AioSession()
    session.set_credentials("TESTKEYIDNOTREAL0001", "very-secret-value", "session-token-xyz")
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session)
    async with KMSService(config) as kms:
        for text in (repr(kms), repr(config), str(kms)):
            assert "TESTKEYIDNOTREAL0001" not in text
            assert "very-secret-value" not in text
            assert "session-token-xyz" not in text
        assert REGION in repr(kms)
        assert moto_endpoint in repr(kms)


async def test_missing_region(monkeypatch: pytest.MonkeyPatch, no_aws_files: Path) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    with pytest.raises(errors.ConfigurationError) as caught:
        await KMSService.create(Config(endpoint_url=f"http://127.0.0.1:{closed_port()}"))
    assert "AWS_REGION" in str(caught.value)
    assert "Config(region=...)" in str(caught.value)
    with pytest.raises(errors.ConfigurationError):
        async with KMSService(Config()):
            pass


async def test_region_from_environment_and_profile(
    monkeypatch: pytest.MonkeyPatch, no_aws_files: Path
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    async with KMSService() as kms:
        assert kms.region == "eu-central-1"
        assert kms.endpoint_url == "https://kms.eu-central-1.amazonaws.com"

    monkeypatch.setenv("AWS_REGION", "eu-west-2")
    async with KMSService() as kms:
        assert kms.region == "eu-west-2"

    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    config_file = no_aws_files / "config"
    config_file.write_text("[profile dev]\nregion = ap-south-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    async with KMSService(Config(profile="dev")) as kms:
        assert kms.region == "ap-south-1"
    with pytest.raises(errors.ConfigurationError, match="'nope'"):
        await KMSService.create(Config(profile="nope"))


# -- client reuse and the alias cache -------------------------------------------


async def test_one_client_serves_every_call(moto_endpoint: str, admin: KMSClient) -> None:
    arn = await admin_key(admin, "alias/test-key")
    session, counters = counting_session("creating-client-class.kms", "before-call.kms")
    kms = KMSService(Config(region=REGION, endpoint_url=moto_endpoint, session=session))
    try:
        # Concurrent first uses of a service that was never opened explicitly.
        wrapped, resolved = await asyncio.gather(
            asyncio.gather(*(kms.encrypt_dek("alias/test-key", DEK) for _ in range(20))),
            asyncio.gather(*(kms.get_key_id("alias/test-key") for _ in range(5))),
        )
        assert resolved == [arn] * 5
        assert await kms.decrypt_dek(arn, wrapped[0]) == DEK
        assert counters["creating-client-class.kms"].count == 1
        assert counters["before-call.kms"].count >= 22
    finally:
        await kms.aclose()


async def test_alias_resolution_is_cached(moto_endpoint: str, admin: KMSClient) -> None:
    first = await admin_key(admin, "alias/test-key")
    second = await admin_key(admin)
    session, counters = counting_session("before-call.kms.DescribeKey")
    describes = counters["before-call.kms.DescribeKey"]
    now = [1000.0]
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session, alias_cache_ttl=60)
    async with KMSService(config) as kms:
        kms._clock = lambda: now[0]
        for _ in range(5):
            assert await kms.get_key_id("alias/test-key") == first
        assert describes.count == 1

        # Repoint the alias behind the service's back: the cache still answers...
        await admin.update_alias(AliasName="alias/test-key", TargetKeyId=second)
        now[0] += 59
        assert await kms.get_key_id("alias/test-key") == first
        assert describes.count == 1
        # ...until the TTL runs out.
        now[0] += 2
        assert await kms.get_key_id("alias/test-key") == second
        assert describes.count == 2

        # invalidate_alias forces the next lookup through.
        await admin.update_alias(AliasName="alias/test-key", TargetKeyId=first)
        assert await kms.get_key_id("alias/test-key") == second
        kms.invalidate_alias("alias/test-key")
        assert await kms.get_key_id("alias/test-key") == first
        assert describes.count == 3

        # A deleted alias is noticed once its entry expires.
        await admin.delete_alias(AliasName="alias/test-key")
        assert await kms.get_key_id("alias/test-key") == first
        now[0] += 61
        with pytest.raises(errors.KMSKeyNotFoundError):
            await kms.get_key_id("alias/test-key")
        kms.invalidate_alias()  # clearing everything is allowed too


async def test_alias_cache_can_be_disabled(moto_endpoint: str, admin: KMSClient) -> None:
    await admin_key(admin, "alias/test-key")
    session, counters = counting_session("before-call.kms.DescribeKey")
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session, alias_cache_ttl=0)
    async with KMSService(config) as kms:
        for _ in range(3):
            await kms.get_key_id("alias/test-key")
    assert counters["before-call.kms.DescribeKey"].count == 3


# -- regions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        f"arn:aws:kms:{OTHER_REGION}:{ACCOUNT}:key/{SOME_UUID}",
        f"arn:aws:kms:{OTHER_REGION}:{ACCOUNT}:alias/test-key",
        f"arn:aws:kms:{OTHER_REGION}:{ACCOUNT}:alias/mrk-not-a-key",
    ],
    ids=["key-arn", "alias-arn", "alias-named-like-mrk"],
)
async def test_region_mismatch_is_refused_before_any_request(ref: str) -> None:
    # Nothing listens on this endpoint, so a request would end in KMSUnavailableError.
    session, counters = counting_session("before-call.kms")
    config = fast_config(f"http://127.0.0.1:{closed_port()}", session=session)
    async with KMSService(config) as kms:
        for call in (
            kms.get_key_id(ref),
            kms.encrypt_dek(ref, DEK),
            kms.decrypt_dek(ref, b"x" * 64),
        ):
            with pytest.raises(errors.KMSRegionMismatchError) as caught:
                await call
            assert OTHER_REGION in str(caught.value)
            assert REGION in str(caught.value)
            assert isinstance(caught.value, ValueError)
        assert counters["before-call.kms"].count == 0

        same_region = ref.replace(OTHER_REGION, REGION)
        with pytest.raises(errors.KMSUnavailableError):
            await kms.get_key_id(same_region)
        assert counters["before-call.kms"].count == 1


async def test_malformed_arn_is_a_configuration_error(aws_kms: KMSService) -> None:
    with pytest.raises(errors.ConfigurationError, match="ARN"):
        await aws_kms.get_key_id("arn:aws:s3:::my-bucket")


async def test_multi_region_key_arn_from_another_region(
    moto_endpoint: str, admin: KMSClient
) -> None:
    home_arn = await admin_key(admin, MultiRegion=True)
    assert ":key/mrk-" in home_arn
    replica_style = home_arn.replace(f":{REGION}:", ":us-west-2:")
    sent: list[str] = []
    session = AioSession()
    session.register(
        "provide-client-params.kms",
        lambda params, **kwargs: sent.append(params["KeyId"]),
    )
    async with KMSService(
        Config(region=REGION, endpoint_url=moto_endpoint, session=session)
    ) as kms:
        assert await kms.get_key_id(replica_style) == home_arn
        wrapped = await kms.encrypt_dek(replica_style, DEK, context={"a": "b"})
        assert wrapped
        # moto writes MRK ids as "mrk-" plus a 36-character uuid and truncates
        # the id it embeds in ciphertexts to 36 characters, so it cannot
        # decrypt under any MRK; what matters here is where the request went.
        with contextlib.suppress(errors.KMSAccessDeniedError):
            await kms.decrypt_dek(replica_style, wrapped, context={"a": "b"})
    assert sent == [home_arn, home_arn, home_arn]


# -- failures of the endpoint ----------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 3])
@pytest.mark.slow
async def test_server_errors_are_retried_then_unavailable(attempts: int) -> None:
    with FakeEndpoint(status=500) as endpoint:
        config = fast_config(endpoint.url, max_attempts=attempts)
        async with KMSService(config) as kms:
            with pytest.raises(errors.KMSUnavailableError) as caught:
                await kms.encrypt_dek("alias/test-key", DEK)
    assert endpoint.requests == attempts
    message = str(caught.value)
    assert endpoint.url in message
    assert f"after {attempts} attempt(s)" in message
    assert isinstance(caught.value.__cause__, ClientError)
    assert DEK.hex() not in message


@pytest.mark.parametrize(
    ("operation", "status", "code", "expected", "snippet"),
    [
        ("encrypt", 400, "ThrottlingException", errors.KMSUnavailableError, "Throttling"),
        ("encrypt", 500, "KMSInternalException", errors.KMSUnavailableError, "KMSInternal"),
        ("encrypt", 503, "Weird", errors.KMSUnavailableError, "Weird"),
        ("encrypt", 400, "DependencyTimeoutException", errors.KMSUnavailableError, "Dependency"),
        ("encrypt", 400, "DisabledException", errors.KMSError, "DisabledException"),
        ("encrypt", 400, "KMSInvalidStateException", errors.KMSError, "KMSInvalidState"),
        ("encrypt", 400, "InvalidKeyUsageException", errors.KMSError, "InvalidKeyUsage"),
        ("encrypt", 400, "NotFoundException", errors.KMSKeyNotFoundError, "alias/test-key"),
        ("encrypt", 400, "AccessDeniedException", errors.KMSAccessDeniedError, "kms:Encrypt"),
        ("encrypt", 400, "UnrecognizedClientException", errors.KMSAccessDeniedError, "credential"),
        ("decrypt", 400, "InvalidCiphertextException", errors.DecryptionError, "unwrap"),
        ("decrypt", 400, "IncorrectKeyException", errors.DecryptionError, "unwrap"),
        ("decrypt", 400, "InvalidKeyUsageException", errors.DecryptionError, "unwrap"),
        ("reencrypt", 400, "InvalidCiphertextException", errors.DecryptionError, "unwrap"),
        ("reencrypt", 400, "IncorrectKeyException", errors.DecryptionError, "unwrap"),
        ("reencrypt", 400, "InvalidKeyUsageException", errors.DecryptionError, "unwrap"),
        ("reencrypt", 400, "NotFoundException", errors.KMSKeyNotFoundError, "'alias/other'"),
        ("reencrypt", 400, "DisabledException", errors.KMSError, "KMS ReEncrypt"),
        ("reencrypt", 400, "AccessDeniedException", errors.KMSAccessDeniedError, "ReEncrypt"),
        ("reencrypt", 500, "KMSInternalException", errors.KMSUnavailableError, "ReEncrypt"),
        ("rotate", 400, "LimitExceededException", errors.KMSError, "RotateKeyOnDemand"),
        ("rotate", 400, "InvalidCiphertextException", errors.KMSError, "InvalidCiphertext"),
        ("rotate", 400, "NotFoundException", errors.KMSKeyNotFoundError, SOME_UUID),
        ("alias", 400, "NotFoundException", errors.KMSKeyNotFoundError, "'alias/test-key' or"),
    ],
)
async def test_error_codes_are_mapped(
    operation: str, status: int, code: str, expected: type[Exception], snippet: str
) -> None:
    message = f"User: arn:aws:iam::{ACCOUNT}:user/app is not authorized to perform: kms:Encrypt"
    body = {"__type": code, "message": message}
    with FakeEndpoint(status=status, body=body) as endpoint:
        async with KMSService(fast_config(endpoint.url)) as kms:
            calls: dict[str, Callable[[], Awaitable[object]]] = {
                "encrypt": lambda: kms.encrypt_dek("alias/test-key", DEK),
                "decrypt": lambda: kms.decrypt_dek("alias/test-key", DEK + DEK),
                "reencrypt": lambda: kms.re_encrypt_dek(
                    DEK + DEK, source_key_id="alias/test-key", destination_key_id="alias/other"
                ),
                "rotate": lambda: kms.rotate_key_material(SOME_UUID),
                "alias": lambda: kms.update_alias("alias/test-key", SOME_UUID),
            }
            with pytest.raises(errors.EncxError) as caught:
                await calls[operation]()
    assert type(caught.value) is expected
    assert snippet in f"{caught.value} {getattr(caught.value, 'reason', '')}"
    assert isinstance(caught.value.__cause__, ClientError)
    assert DEK.hex() not in str(caught.value)
    if expected in (errors.KMSError, errors.KMSKeyNotFoundError):
        assert isinstance(caught.value, errors.KMSError)
        assert caught.value.code == code
    if expected is errors.KMSAccessDeniedError:
        assert "Encrypt" in str(caught.value)


async def test_hanging_server_times_out() -> None:
    read_timeout, attempts = 0.2, 2
    with FakeEndpoint() as endpoint:
        endpoint.hang = True
        config = fast_config(endpoint.url, read_timeout=read_timeout, max_attempts=attempts)
        async with KMSService(config) as kms:
            started = time.monotonic()
            with pytest.raises(errors.KMSUnavailableError) as caught:
                await kms.encrypt_dek("alias/test-key", DEK)
            elapsed = time.monotonic() - started
    assert endpoint.requests == attempts
    # Each attempt waits one read timeout; standard-mode backoff adds at most 1 s here.
    assert attempts * read_timeout * 0.9 <= elapsed < attempts * read_timeout + 1.0 + 2.0
    assert isinstance(caught.value.__cause__, ReadTimeoutError)
    assert endpoint.url in str(caught.value)


async def test_refused_connection_is_unavailable() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with KMSService(fast_config(url, max_attempts=2)) as kms:
        with pytest.raises(errors.KMSUnavailableError) as caught:
            await kms.get_key_id("alias/test-key")
    message = str(caught.value)
    assert url in message
    assert REGION in message
    assert "gave up after 2 attempt(s)" in message
    assert isinstance(caught.value.__cause__, EndpointConnectionError)


@pytest.mark.slow
async def test_moto_stopping_mid_run_is_unavailable() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    stopped = False
    try:
        host, port = server.get_host_and_port()
        config = fast_config(f"http://{host}:{port}", max_attempts=2)
        async with KMSService(config) as kms:
            key = await kms.create_key("short-lived", alias="alias/short-lived")
            wrapped = await kms.encrypt_dek(key, DEK)
            assert await kms.decrypt_dek(key, wrapped) == DEK
            server.stop()
            stopped = True
            started = time.monotonic()
            with pytest.raises(errors.KMSUnavailableError):
                await kms.decrypt_dek(key, wrapped)
            # two attempts of at most connect/read timeout each, plus backoff of at most 1 s
            assert time.monotonic() - started < 2 * 0.5 + 1.0 + 2.0
    finally:
        if not stopped:
            server.stop()


# -- credentials and permissions -------------------------------------------------


async def test_not_found_keeps_the_client_error(aws_kms: KMSService) -> None:
    with pytest.raises(errors.KMSKeyNotFoundError) as caught:
        await aws_kms.encrypt_dek("alias/missing", DEK)
    assert isinstance(caught.value.__cause__, ClientError)
    assert caught.value.code == "NotFoundException"
    assert REGION in str(caught.value)


@pytest.mark.slow
async def test_iam_denial_names_the_action(
    moto_endpoint: str, moto_api: MotoApi, admin: KMSClient
) -> None:
    arn = await admin_key(admin, "alias/test-key")
    async with AioSession().create_client(
        "iam", region_name=REGION, endpoint_url=moto_endpoint
    ) as iam:
        await iam.create_user(UserName="describe-only")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["kms:DescribeKey"], "Resource": "*"}],
        }
        await iam.put_user_policy(
            UserName="describe-only", PolicyName="describe", PolicyDocument=json.dumps(policy)
        )
        access_key = (await iam.create_access_key(UserName="describe-only"))["AccessKey"]
    limited = AioSession()
    limited.set_credentials(access_key["AccessKeyId"], access_key["SecretAccessKey"])

    # From now on moto checks the signature and IAM policy of every request.
    moto_api("reset-auth", b"0")
    try:
        async with KMSService(
            Config(region=REGION, endpoint_url=moto_endpoint, session=limited)
        ) as kms:
            assert await kms.get_key_id("alias/test-key") == arn
            with pytest.raises(errors.KMSAccessDeniedError) as denied:
                await kms.encrypt_dek(arn, DEK)
        message = str(denied.value)
        assert "kms:Encrypt" in message
        assert "KMS Encrypt" in message
        assert isinstance(denied.value.__cause__, ClientError)

        # The session-wide fake credentials are unknown to moto's IAM.
        async with KMSService(Config(region=REGION, endpoint_url=moto_endpoint)) as unknown:
            with pytest.raises(errors.KMSAccessDeniedError) as refused:
                await unknown.get_key_id("alias/test-key")
        assert "InvalidClientTokenId" in str(refused.value)
        assert "credentials" in str(refused.value)
    finally:
        moto_api("reset-auth", b"inf")


async def test_no_credentials(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, no_aws_files: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    async with KMSService(Config(region=REGION, endpoint_url=moto_endpoint)) as kms:
        with pytest.raises(errors.KMSCredentialsError) as caught:
            await kms.encrypt_dek("alias/test-key", DEK)
    assert isinstance(caught.value, errors.KMSAccessDeniedError)  # still caught as a denial
    assert isinstance(caught.value.__cause__, NoCredentialsError)
    assert str(caught.value).startswith("no usable AWS credentials to sign KMS Encrypt")
    assert "AWS_ACCESS_KEY_ID" in str(caught.value)


# -- misc ----------------------------------------------------------------------------


async def test_alias_creation_failure_names_the_orphan_key(aws_kms: KMSService) -> None:
    await aws_kms.create_key("first", alias="alias/taken")
    with pytest.raises(errors.KMSError) as caught:
        await aws_kms.create_key("second", alias="alias/taken")
    assert caught.value.code == "AlreadyExistsException"
    assert "created without the alias" in str(caught.value)
    assert f"arn:aws:kms:{REGION}:" in str(caught.value)


async def test_debug_log_names_operation_key_and_region(
    aws_kms: KMSService, admin: KMSClient, caplog: pytest.LogCaptureFixture
) -> None:
    arn = await admin_key(admin, "alias/test-key")
    caplog.set_level(logging.DEBUG, logger="encx_async.kms")
    wrapped = await aws_kms.encrypt_dek(arn, DEK, context={"table": "t"})
    await aws_kms.decrypt_dek(arn, wrapped, context={"table": "t"})
    lines = [r.getMessage() for r in caplog.records if r.name == "encx_async.kms"]
    encrypt_line = next(line for line in lines if line.startswith("KMS Encrypt"))
    assert arn in encrypt_line
    assert REGION in encrypt_line
    assert " ms" in encrypt_line
    assert any(line.startswith("KMS Decrypt") for line in lines)


async def test_botocore_debug_logs_do_not_show_the_data_key(
    aws_kms: KMSService, admin: KMSClient, caplog: pytest.LogCaptureFixture
) -> None:
    arn = await admin_key(admin, "alias/test-key")
    caplog.set_level(logging.DEBUG)  # every logger, botocore's included
    wrapped = await aws_kms.encrypt_dek(arn, DEK)
    assert await aws_kms.decrypt_dek(arn, wrapped) == DEK
    messages = [record.getMessage() for record in caplog.records]
    assert any(name.startswith("botocore") for name in (r.name for r in caplog.records))
    # At least the Encrypt request and the Decrypt response were blanked.
    assert sum("redacted by encx-async" in m for m in messages) >= 2
    for form in (DEK.hex(), base64.b64encode(DEK).decode(), repr(DEK)[2:-1]):
        assert not any(form in m for m in messages)


# -- rotation ------------------------------------------------------------------------


def recording_session() -> tuple[AioSession, list[tuple[str, dict[str, Any]]]]:
    """A session that records (operation, parameters) of every KMS request it sends."""
    sent: list[tuple[str, dict[str, Any]]] = []
    session = AioSession()

    def record(params: dict[str, Any], model: Any, **kwargs: Any) -> None:
        sent.append((model.name, dict(params)))

    session.register("provide-client-params.kms", record)
    return session, sent


async def test_rotation_requests_on_the_wire(moto_endpoint: str, admin: KMSClient) -> None:
    """What each rotation method sends; moto ignores part of it, so it is checked here."""
    source = await admin_key(admin, "alias/source")
    destination = await admin_key(admin, "alias/destination")
    session, sent = recording_session()
    context = {"table": "orders"}
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session)
    async with KMSService(config) as kms:
        wrapped = await kms.encrypt_dek("alias/source", DEK, context=context)
        sent.clear()

        await kms.re_encrypt_dek(
            wrapped,
            source_key_id="alias/source",
            destination_key_id="alias/destination",
            context=context,
        )
        assert sent.pop() == (
            "ReEncrypt",
            {
                "CiphertextBlob": wrapped,
                "SourceKeyId": "alias/source",
                "DestinationKeyId": "alias/destination",
                "SourceEncryptionContext": context,
                "DestinationEncryptionContext": context,
            },
        )
        bare = await kms.encrypt_dek(source, DEK)
        await kms.re_encrypt_dek(bare, source_key_id=source, destination_key_id=destination)
        assert sent.pop()[1].keys() == {"CiphertextBlob", "SourceKeyId", "DestinationKeyId"}
        sent.clear()

        # RotateKeyOnDemand, EnableKeyRotation and UpdateAlias's target take a
        # key, not an alias: an alias is resolved with DescribeKey first.
        await kms.rotate_key_material("alias/source")
        assert sent == [
            ("DescribeKey", {"KeyId": "alias/source"}),
            ("RotateKeyOnDemand", {"KeyId": source}),
        ]
        sent.clear()
        await kms.enable_key_rotation(source, period_days=180)
        await kms.enable_key_rotation("alias/destination")
        assert sent == [
            ("EnableKeyRotation", {"KeyId": source, "RotationPeriodInDays": 180}),
            ("DescribeKey", {"KeyId": "alias/destination"}),
            ("EnableKeyRotation", {"KeyId": destination}),
        ]
        sent.clear()
        await kms.update_alias("alias/source", "alias/destination")
        assert sent == [
            ("DescribeKey", {"KeyId": "alias/destination"}),
            ("UpdateAlias", {"AliasName": "alias/source", "TargetKeyId": destination}),
        ]

    rotations = (await admin.list_key_rotations(KeyId=source))["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["ON_DEMAND"]
    for arn in (source, destination):
        assert (await admin.get_key_rotation_status(KeyId=arn))["KeyRotationEnabled"]
    aliases = (await admin.list_aliases(KeyId=destination))["Aliases"]
    assert {a["AliasName"] for a in aliases} == {"alias/source", "alias/destination"}


async def test_update_alias_forgets_every_cached_form(moto_endpoint: str, admin: KMSClient) -> None:
    first = await admin_key(admin, "alias/test-key")
    second = await admin_key(admin)
    alias_arn = first.rsplit(":", 1)[0] + ":alias/test-key"
    session, counters = counting_session("before-call.kms.DescribeKey")
    describes = counters["before-call.kms.DescribeKey"]
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session, alias_cache_ttl=600)
    async with KMSService(config) as kms:
        other = await kms.create_key("unrelated", alias="alias/unrelated")
        for ref in ("alias/test-key", alias_arn, "alias/unrelated"):
            await kms.get_key_id(ref)
        assert describes.count == 2  # create_key primed alias/unrelated

        await kms.update_alias("alias/test-key", second)
        assert await kms.get_key_id("alias/test-key") == second
        assert await kms.get_key_id(alias_arn) == second
        assert await kms.get_key_id("alias/unrelated") == other  # still cached
        assert describes.count == 4

        # invalidate_alias by ARN forgets the name too.
        await admin.update_alias(AliasName="alias/test-key", TargetKeyId=first)
        kms.invalidate_alias(alias_arn)
        assert await kms.get_key_id("alias/test-key") == first
        assert describes.count == 5


async def test_lookup_in_flight_during_invalidation_is_not_cached(
    moto_endpoint: str, admin: KMSClient
) -> None:
    first = await admin_key(admin, "alias/test-key")
    second = await admin_key(admin)
    session = AioSession()
    gate = asyncio.Event()
    entered = asyncio.Event()
    config = Config(region=REGION, endpoint_url=moto_endpoint, session=session, alias_cache_ttl=600)
    async with KMSService(config) as kms:
        describe = kms._describe

        async def slow_describe(target: str) -> Any:
            metadata = await describe(target)
            entered.set()
            await gate.wait()
            return metadata

        kms._describe = slow_describe  # type: ignore[method-assign]
        lookup = asyncio.create_task(kms.get_key_id("alias/test-key"))
        await entered.wait()  # it has its answer (the first key) and waits to cache it
        kms._describe = describe  # type: ignore[method-assign]
        await kms.update_alias("alias/test-key", second)
        gate.set()
        assert await lookup == first
        assert await kms.get_key_id("alias/test-key") == second
