"""Shared fixtures: a moto KMS server on loopback, a fault proxy for it, and both KMS providers.

The moto server runs in a thread of this process and is reached over real
sockets, the way the SDK reaches AWS; ``moto.mock_aws`` is never used.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from moto.server import ThreadedMotoServer

from encx_async.kms import KeyManagementService
from encx_async.providers.aws import Config, KMSService
from encx_async.providers.local import LocalKMSService
from tests.faultproxy import FaultProxy

TEST_REGION = "us-east-1"
TEST_ALIAS = "alias/test-key"

MotoApi = Callable[[str, bytes], bytes]
"""POST ``body`` to ``/moto-api/<path>`` on the shared moto server; returns the reply."""

KeyFactory = Callable[[KeyManagementService, str], Awaitable[dict[str, str]]]
"""Create a key with an alias on a provider; returns {"key_id", "arn", "alias", "canonical"}."""

_AWS_ENV_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_KMS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def _moto_post(endpoint: str, path: str, body: bytes) -> bytes:
    url = f"{endpoint}/moto-api/{path}"
    if not url.startswith("http://127.0.0.1:"):
        raise AssertionError(f"refusing to call a non-loopback moto endpoint: {url}")
    # moto reads the raw body; the default form content type would make Flask eat it.
    request = urllib.request.Request(  # noqa: S310 (loopback http only, checked above)
        url, data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        data: bytes = response.read()
        return data


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fake credentials and empty shared files for the whole session, so no test
    reaches real AWS or a developer's profile, with or without the moto server."""
    empty = tmp_path_factory.mktemp("aws-config")
    with pytest.MonkeyPatch.context() as patch:
        for name in _AWS_ENV_TO_CLEAR:
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_SESSION_TOKEN", "testing")
        patch.setenv("AWS_DEFAULT_REGION", TEST_REGION)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        patch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto server on 127.0.0.1 and a free port for the whole session; yields its URL."""
    werkzeug_log = logging.getLogger("werkzeug")
    previous_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug_log.setLevel(previous_level)


@pytest.fixture
def moto_endpoint(moto_server: str) -> str:
    """The moto server URL, with all moto state wiped before the test."""
    _moto_post(moto_server, "reset", b"")
    return moto_server


@pytest.fixture
def moto_api(moto_endpoint: str) -> MotoApi:
    """A function that POSTs to moto's control API (``reset``, ``reset-auth``, ...)."""

    def post(path: str, body: bytes) -> bytes:
        return _moto_post(moto_endpoint, path, body)

    return post


@pytest_asyncio.fixture(loop_scope="function")
async def fault_proxy(moto_endpoint: str) -> AsyncIterator[FaultProxy]:
    """A :class:`~tests.faultproxy.FaultProxy` in front of the (reset) moto server.

    It passes requests through until the test sets a fault; use its ``url`` as
    the ``endpoint_url``. Closed, with every connection it holds, after the test.
    """
    async with FaultProxy(moto_endpoint) as proxy:
        yield proxy


@pytest_asyncio.fixture(loop_scope="function")
async def aws_kms(moto_endpoint: str) -> AsyncIterator[KMSService]:
    """An open :class:`KMSService` talking to the moto server, closed after the test."""
    async with KMSService(Config(region=TEST_REGION, endpoint_url=moto_endpoint)) as kms:
        yield kms


@pytest_asyncio.fixture(loop_scope="function")
async def local_kms() -> AsyncIterator[LocalKMSService]:
    """An open in-memory :class:`LocalKMSService`, closed after the test."""
    async with LocalKMSService() as kms:
        yield kms


# The same test on the moto server is slow only next to the in-memory local KMS
# (a few hundred ms of requests): the quick loop runs the local half.
@pytest.fixture(params=["local", pytest.param("aws", marks=pytest.mark.slow)])
def kms(request: pytest.FixtureRequest) -> KeyManagementService:
    """Each provider in turn, so behavioural tests run against both."""
    provider: KeyManagementService = request.getfixturevalue(f"{request.param}_kms")
    return provider


def key_arn(kms: KeyManagementService, key: str) -> str:
    """The ARN form of what ``create_key`` returned."""
    if isinstance(kms, LocalKMSService):
        return kms.key_arn(key)
    return key


@pytest.fixture
def make_key() -> KeyFactory:
    """A coroutine function creating a key plus alias on a provider.

    Returns a dict with ``key_id`` (the bare id), ``arn``, ``alias`` and
    ``canonical`` (what ``create_key`` and ``get_key_id`` return: the ARN for
    AWS, the bare id for the local provider).
    """

    async def make(provider: KeyManagementService, alias: str = TEST_ALIAS) -> dict[str, str]:
        created = await provider.create_key("encx-async test key", alias=alias)
        arn = key_arn(provider, created)
        return {
            "canonical": created,
            "arn": arn,
            "key_id": arn.rsplit("/", 1)[1],
            "alias": alias,
        }

    return make


@pytest_asyncio.fixture(loop_scope="function")
async def aliased_key(kms: KeyManagementService, make_key: KeyFactory) -> dict[str, str]:
    """A key with the alias ``alias/test-key`` on the current ``kms`` provider."""
    return await make_key(kms, TEST_ALIAS)


@pytest.fixture(autouse=True)
def _isolated_key_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own default key-version database (never the user's)."""
    data_home = tmp_path / "xdg-data"
    monkeypatch.delenv("ENCX_DATABASE_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home))
    return data_home


Provider = LocalKMSService | KMSService
"""A bundled provider, typed as itself: what the protocols leave out (describe_key) is there."""


@pytest.fixture
def provider(kms: KeyManagementService) -> Provider:
    """The current ``kms`` provider (same object, same params), as its concrete type."""
    assert isinstance(kms, LocalKMSService | KMSService)
    return kms


#: Fixtures that reach a real server: a test that uses one, however indirectly,
#: is slow next to the in-memory ones, so the quick loop (-m "not slow") skips it.
_SERVER_FIXTURES = frozenset({"moto_server", "postgres_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# -- PostgreSQL, for the fleet tests ---------------------------------------------------

POSTGRES_URL_ENV = "ENCX_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "ENCX_REQUIRE_POSTGRES"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest_asyncio.fixture(loop_scope="function")
async def postgres_url() -> AsyncIterator[str]:
    """The URL of a PostgreSQL server for key-version tests; yields it.

    ``$ENCX_TEST_POSTGRES_URL``, else a local server with trust authentication.
    If it cannot be reached the test is skipped, or fails when
    ``ENCX_REQUIRE_POSTGRES=1`` (as CI sets it). The tables persist from run to
    run: use a fresh alias per test (see ``postgres_alias``), never drop them.

    They live in a schema named for the key-store schema version
    (``encx_test_v2``, through a ``search_path`` in the URL): a checkout of
    another version migrates, or refuses, tables of its own, never these.
    """
    import os

    from encx_async._keystore import SCHEMA_VERSION, redact_url

    base = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    schema = f"encx_test_v{SCHEMA_VERSION}"
    url = f"{base}{'&' if '?' in base else '?'}search_path={schema}"
    problem: str | None = None
    try:
        import asyncpg
    except ImportError:
        problem = "asyncpg is not installed (pip install -e '.[dev]')"
    else:
        try:
            connection = await asyncpg.connect(url, timeout=5)
        except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as exc:
            problem = f"cannot connect to {redact_url(url)}: {type(exc).__name__}: {exc}"
        else:
            try:
                await connection.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            except asyncpg.UniqueViolationError:
                pass  # another test process created it at the same moment
            finally:
                await connection.close()
    if problem is not None:
        reason = f"PostgreSQL is needed for this test: {problem} (set {POSTGRES_URL_ENV})"
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_POSTGRES_ENV}=1 makes this a failure")
        pytest.skip(reason)
    yield url


@pytest_asyncio.fixture(loop_scope="function")
async def postgres_alias(postgres_url: str) -> AsyncIterator[str]:
    """A KEK alias no run has used; its rows in ``encx_kek_versions`` are deleted after."""
    import uuid

    import asyncpg

    alias = f"alias/fleet-{uuid.uuid4().hex}"
    yield alias
    connection = await asyncpg.connect(postgres_url, timeout=5)
    try:
        await connection.execute("DELETE FROM encx_kek_versions WHERE alias = $1", alias)
    except asyncpg.UndefinedTableError:
        pass  # the test failed before any store created the table
    finally:
        await connection.close()
