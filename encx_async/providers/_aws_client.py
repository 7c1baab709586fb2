"""What the AWS providers share: :class:`Config`, one aiobotocore client, one error translator.

Private: the names here may change in any release. The public names are
re-exported by :mod:`encx_async.providers.aws`.

:class:`AwsClient` holds the client of one provider (KMS or Secrets
Manager): it resolves the session and region, opens the client once however
many tasks ask at the same time, counts botocore's attempts, enforces
``Config.call_timeout``, and turns every botocore failure into an encx-async
error through :func:`translate_error`. What differs between the services (the
error classes, the codes only one service sends, the permission to name)
comes in a :class:`ServiceErrors` and a per-request ``answer`` callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar, cast

import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from encx_async._exceptions import (
    ClosedError,
    ConfigurationError,
    EncxError,
    KMSAccessDeniedError,
    KMSCredentialsError,
    KMSError,
    KMSUnavailableError,
)
from encx_async.providers import _redact
from encx_async.providers._common import ProviderResource

if TYPE_CHECKING:
    from aiobotocore.client import AioBaseClient

__all__ = [
    "UNAVAILABLE_CODES",
    "Answer",
    "AwsClient",
    "AwsResource",
    "Config",
    "RetryMode",
    "ServiceErrors",
    "ToleratedError",
    "call_timeout",
    "is_region_name",
    "region_text",
]

_T = TypeVar("_T")
_C = TypeVar("_C", bound="AioBaseClient")

RetryMode = Literal["standard", "adaptive", "legacy"]
"""The botocore retry modes."""

_RETRY_MODES: Final = frozenset({"standard", "adaptive", "legacy"})

_DEFAULT_MAX_POOL_CONNECTIONS: Final = 10
_DEFAULT_MAX_ATTEMPTS: Final = 3
_DEFAULT_RETRY_MODE: Final[RetryMode] = "standard"
_DEFAULT_CONNECT_TIMEOUT: Final = 5.0
_DEFAULT_READ_TIMEOUT: Final = 10.0
# botocore's longest sleep before one retry in standard and adaptive mode.
_MAX_BACKOFF: Final = 20.0

# Some AWS-compatible endpoints (moto's IAM checks among them) answer a JSON
# request with an XML error document; botocore then reports the HTTP status
# as the code and the whole document as the message.
_XML_CODE_RE: Final = re.compile(r"<Code>([^<]{1,200})</Code>")
_XML_MESSAGE_RE: Final = re.compile(r"<Message>([^<]{0,2000})</Message>")

_ACCESS_DENIED_CODES: Final = frozenset({"AccessDeniedException", "AccessDenied"})
_BAD_CREDENTIAL_CODES: Final = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)
UNAVAILABLE_CODES: Final = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "KMSInternalException",
        "DependencyTimeoutException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
_CREDENTIAL_HINT: Final = (
    "check the credentials botocore found: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
    "(and AWS_SESSION_TOKEN), the shared credentials and config files, AWS_PROFILE "
    "or Config(profile=...), or the instance/task role"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """How :class:`~encx_async.providers.aws.KMSService` reaches AWS KMS (and
    :class:`~encx_async.providers.aws.SecretsManagerPepperSource` Secrets Manager).

    Every field is optional. The client options are resolved in this order:
    a field set here, then the same option set on ``client_config``, then these
    defaults:

    ========================  ==============================================
    ``max_pool_connections``  10 concurrent connections to KMS
    ``max_attempts``          3 attempts in total (the first try plus 2 retries)
    ``retry_mode``            ``"standard"`` (exponential backoff with jitter)
    ``connect_timeout``       5 seconds per attempt
    ``read_timeout``          10 seconds per attempt
    ``call_timeout``          all of one request, see below
    ========================  ==============================================

    ``call_timeout`` is the deadline of each request, in seconds: it covers
    the wait for a free pooled connection, resolving and connecting, every
    attempt, and the backoff between attempts. When it runs out the request is
    cancelled and raises :class:`~encx_async.KMSUnavailableError`. By default
    it is the longest botocore's own limits allow:
    ``max_attempts * (connect_timeout + read_timeout)`` plus the largest
    backoff botocore can sleep between the attempts (1 s before the second, 2 s
    before the third, doubling up to 20 s each; uncapped in legacy mode), 48 s
    with the defaults above.

    ``region`` falls back to ``client_config.region_name``, ``AWS_REGION``, then botocore's chain
    (``AWS_DEFAULT_REGION``, the profile in the shared config file).
    Credentials always come from botocore's chain (environment, shared files,
    SSO, container or instance role). ``profile`` picks a named profile;
    ``session`` reuses an existing :class:`~aiobotocore.session.AioSession`
    (it is not closed by the service), and excludes ``profile``.
    ``endpoint_url`` points at a VPC endpoint, LocalStack or moto.

    ``alias_cache_ttl`` is how many seconds
    :meth:`KMSService.get_key_id <encx_async.providers.aws.KMSService.get_key_id>`
    remembers what an alias resolved to; 0 disables the cache.
    """

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    session: AioSession | None = field(default=None, repr=False)
    client_config: AioConfig | None = field(default=None, repr=False)
    max_pool_connections: int | None = None
    max_attempts: int | None = None
    retry_mode: RetryMode | None = None
    connect_timeout: float | None = None
    read_timeout: float | None = None
    call_timeout: float | None = None
    alias_cache_ttl: float = 300.0

    def __post_init__(self) -> None:
        if self.region is not None and not is_region_name(self.region):
            raise ConfigurationError(f"Config(region={self.region!r}) is not an AWS region name")
        if self.session is not None and self.profile is not None:
            raise ConfigurationError(
                "give Config either session= or profile=, not both: "
                "a profile is chosen when the session is created"
            )
        _check_positive_int("max_pool_connections", self.max_pool_connections)
        _check_positive_int("max_attempts", self.max_attempts)
        if self.retry_mode is not None and self.retry_mode not in _RETRY_MODES:
            raise ConfigurationError(
                f"Config(retry_mode={self.retry_mode!r}) must be one of {sorted(_RETRY_MODES)}"
            )
        _check_positive_number("connect_timeout", self.connect_timeout)
        _check_positive_number("read_timeout", self.read_timeout)
        _check_positive_number("call_timeout", self.call_timeout)
        if isinstance(self.alias_cache_ttl, bool) or not (
            isinstance(self.alias_cache_ttl, int | float) and self.alias_cache_ttl >= 0
        ):
            raise ConfigurationError(
                f"Config(alias_cache_ttl={self.alias_cache_ttl!r}) must be a number >= 0"
            )

    def build_client_config(self) -> AioConfig:
        """Return the effective :class:`~aiobotocore.config.AioConfig` for the KMS client."""
        user = self.client_config
        base = AioConfig(
            max_pool_connections=_DEFAULT_MAX_POOL_CONNECTIONS,
            connect_timeout=_DEFAULT_CONNECT_TIMEOUT,
            read_timeout=_DEFAULT_READ_TIMEOUT,
        )
        merged = base if user is None else base.merge(user)
        overrides: dict[str, Any] = {"retries": self._effective_retries()}
        if self.max_pool_connections is not None:
            overrides["max_pool_connections"] = self.max_pool_connections
        if self.connect_timeout is not None:
            overrides["connect_timeout"] = self.connect_timeout
        if self.read_timeout is not None:
            overrides["read_timeout"] = self.read_timeout
        return merged.merge(AioConfig(**overrides))

    def _effective_retries(self) -> dict[str, Any]:
        retries: dict[str, Any] = {
            "total_max_attempts": _DEFAULT_MAX_ATTEMPTS,
            "mode": _DEFAULT_RETRY_MODE,
        }
        user_retries = _user_retries(self.client_config)
        if user_retries:
            if "max_attempts" in user_retries or "total_max_attempts" in user_retries:
                del retries["total_max_attempts"]
            retries.update(user_retries)
        if self.max_attempts is not None:
            retries.pop("max_attempts", None)
            retries["total_max_attempts"] = self.max_attempts
        if self.retry_mode is not None:
            retries["mode"] = self.retry_mode
        return retries


def _user_retries(client_config: AioConfig | None) -> dict[str, Any]:
    if client_config is None:
        return {}
    retries = getattr(client_config, "retries", None)
    return dict(cast("Mapping[str, Any]", retries)) if retries else {}


def _total_attempts(client_config: AioConfig) -> int:
    retries = cast("Mapping[str, Any]", getattr(client_config, "retries", None) or {})
    if "total_max_attempts" in retries:
        return int(retries["total_max_attempts"])
    if "max_attempts" in retries:
        return int(retries["max_attempts"]) + 1
    return _DEFAULT_MAX_ATTEMPTS


def call_timeout(config: Config, client_config: AioConfig) -> float:
    """``config.call_timeout``, or the longest the client's own limits let a request take."""
    if config.call_timeout is not None:
        return float(config.call_timeout)
    attempts = _total_attempts(client_config)
    per_attempt = float(getattr(client_config, "connect_timeout", 0) or 0) + float(
        getattr(client_config, "read_timeout", 0) or 0
    )
    retries = cast("Mapping[str, Any]", getattr(client_config, "retries", None) or {})
    cap = math.inf if retries.get("mode") == "legacy" else _MAX_BACKOFF
    # botocore sleeps up to 2**(n - 1) seconds (capped) before retry n.
    backoff = sum(min(2.0**n, cap) for n in range(attempts - 1))
    return attempts * per_attempt + backoff


def _check_positive_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"Config({name}={value!r}) must be an integer >= 1")


def _check_positive_number(name: str, value: float | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise ConfigurationError(f"Config({name}={value!r}) must be a number > 0")


def is_region_name(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[a-z]{2,}(?:-[a-z0-9]+)+", value) is not None


def region_text(region: str | None) -> str:
    """How messages name a region: "region eu-west-1", or "the configured region"."""
    return f"region {region}" if region else "the configured region"


def _client_error_details(exc: ClientError) -> tuple[str, str, int]:
    response = exc.response
    error = response.get("Error", {})
    code = str(error.get("Code") or "")
    message = str(error.get("Message") or "")
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if message.lstrip().startswith("<"):
        code_match = _XML_CODE_RE.search(message)
        if code_match is not None and (not code or code.isdigit()):
            code = html.unescape(code_match.group(1)).strip()
        message_match = _XML_MESSAGE_RE.search(message)
        message = html.unescape(message_match.group(1)).strip() if message_match else ""
    if len(message) > 500:
        message = message[:500] + "..."
    # moto pads some of its messages with runs of spaces
    return code, " ".join(message.split()), status


Answer = Callable[[str, str], EncxError | None]
"""A service's reading of the ClientError codes only it sends: ``(code, detail)``
to the error to raise, or ``None`` to leave the code to :func:`translate_error`.
``detail`` is ``": <AWS message>"``, or empty when the message is not quoted."""


def _no_answer(code: str, detail: str) -> None:
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceErrors:
    """How one AWS service's failures are classed and worded."""

    label: str
    """How messages and log lines name the service: ``"KMS"``, ``"Secrets Manager"``."""
    error: type[KMSError]
    """Any failure the other classes do not describe."""
    unavailable: type[KMSUnavailableError]
    denied: type[KMSAccessDeniedError]
    no_credentials: type[KMSCredentialsError]
    denied_hint: Callable[[str], str]
    """What a denied ``operation`` needs, after "; " in the message."""
    unavailable_codes: frozenset[str] = UNAVAILABLE_CODES
    unquoted_operations: frozenset[str] = frozenset()
    """Operations whose request carries a secret: AWS's message about one is
    never quoted, so nothing from the request can reach an exception message."""


def translate_error(
    exc: Exception,
    errors: ServiceErrors,
    *,
    operation: str,
    what: str,
    region: str | None,
    endpoint: str | None,
    attempts: int,
    answer: Answer = _no_answer,
) -> EncxError:
    """Turn a botocore exception into the encx-async error that describes it.

    The single place where botocore errors are mapped; the caller raises the
    result ``from exc``. ``what`` names the request ("KMS Encrypt on
    'alias/x'"). Messages never contain request payloads.
    """
    where = region_text(region)
    target = f"{endpoint or f'the {errors.label} endpoint'} ({where})"

    if isinstance(exc, _DeadlineExceeded):
        return errors.unavailable(f"{what} at {target} ran out of {exc.describe()}; retry later")
    if isinstance(exc, ClientError):
        code, message, status = _client_error_details(exc)
        quote = operation not in errors.unquoted_operations and message
        detail = f": {message}" if quote else ""
        specific = answer(code, detail)
        if specific is not None:
            return specific
        if code in _BAD_CREDENTIAL_CODES:
            return errors.denied(
                f"{what} in {where} was refused ({code}{detail}); {_CREDENTIAL_HINT}", code=code
            )
        if code in _ACCESS_DENIED_CODES or status == 403:
            return errors.denied(
                f"{what} in {where} was denied ({code or status}){detail}; "
                f"{errors.denied_hint(operation)}",
                code=code or None,
            )
        if code in errors.unavailable_codes or status >= 500:
            return errors.unavailable(
                f"{what} failed at {target} with {code or status}{detail}, "
                f"after {attempts} attempt(s); retry later",
                code=code or None,
            )
        return errors.error(
            f"{what} in {where} failed: {code or status}{detail}", code=code or None
        )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return errors.no_credentials(
            f"no usable AWS credentials to sign {what} ({type(exc).__name__}); {_CREDENTIAL_HINT}"
        )
    if isinstance(exc, ProfileNotFound):
        return ConfigurationError(f"the AWS profile for {what} does not exist: {exc}")
    if isinstance(exc, NoRegionError):
        return ConfigurationError(
            f"no AWS region is configured for {errors.label}: set AWS_REGION "
            "or pass Config(region=...)"
        )
    if isinstance(exc, ParamValidationError):
        # botocore's report can quote parameter values, so it stays in __cause__ only.
        return ConfigurationError(f"botocore rejected the parameters of {what}")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return errors.unavailable(
            f"{what}: {target} could not be reached ({type(exc).__name__}); "
            f"gave up after {attempts} attempt(s)"
        )
    return errors.error(f"{what} in {where} failed: {type(exc).__name__}")


class ToleratedError(Exception):
    """Internal: a ClientError code the caller asked to handle itself. Never escapes."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(slots=True)
class _Attempts:
    """What botocore did for one request, counted from the client's events."""

    sent: int = 0
    """``before-send`` events: attempts handed to the HTTP layer (a wait for a
    pooled connection included)."""
    ended: int = 0
    """The last ``needs-retry`` event's attempt number: attempts that ended in
    an answer or an error."""

    def made(self, exc: BaseException) -> int:
        """The attempts behind the error ``exc``."""
        if isinstance(exc, ClientError):
            # botocore's own count, in the error response it parsed.
            retries = exc.response.get("ResponseMetadata", {}).get("RetryAttempts")
            if isinstance(retries, int):
                return retries + 1
        return self.sent


# The attempts of the request in progress in this task; the client's event
# handlers, which run in the task that awaits the request, add to it.
_current_attempts: ContextVar[_Attempts | None] = ContextVar(
    "encx_async_aws_attempts", default=None
)


def _count_sent(**kwargs: Any) -> None:
    attempts = _current_attempts.get()
    if attempts is not None:
        attempts.sent += 1


def _count_ended(*, attempts: int, **kwargs: Any) -> None:
    current = _current_attempts.get()
    if current is not None:
        current.ended = max(current.ended, attempts)


class _DeadlineExceeded(Exception):
    """Internal: a request ran out of ``Config.call_timeout``. Translated, never raised."""

    def __init__(self, deadline: float, attempts: _Attempts) -> None:
        super().__init__(deadline)
        self.deadline = deadline
        self.sent = attempts.sent
        self.unanswered = attempts.sent > attempts.ended

    def describe(self) -> str:
        """What the error messages say after "ran out of"."""
        text = f"its {self.deadline:g} s deadline (Config.call_timeout)"
        if not self.sent:
            return f"{text} before any attempt was sent"
        last = ", the last still unanswered" if self.unanswered else ""
        return f"{text} after {self.sent} attempt(s){last}"


class AwsClient(Generic[_C]):
    """The one aiobotocore client of a provider, created on first use.

    Owns what the AWS providers share: the session and region resolution, the
    client's exit stack, the lock that makes concurrent first calls open one
    client, closing, and :meth:`call`, which every request goes through.
    ``service`` is the botocore service name; ``errors`` how its failures are
    classed and worded. The owner keeps its closed flag and passes itself in.
    """

    def __init__(
        self,
        config: Config,
        service: Literal["kms", "secretsmanager"],
        errors: ServiceErrors,
        log: logging.Logger,
    ) -> None:
        self.config = config
        self.service: Final = service
        self.errors: Final = errors
        self.label: Final = errors.label
        self._log = log
        self.client_config = config.build_client_config()
        self.call_timeout = call_timeout(config, self.client_config)
        self.region: str | None = config.region
        self.endpoint: str | None = config.endpoint_url
        self.client: _C | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._open_lock = asyncio.Lock()

    def describe(self, owner: str, *, closed: bool) -> str:
        """The owner's repr: region, endpoint and state."""
        if closed:
            state = "closed"
        elif self.client is not None:
            state = "open"
        else:
            state = "not opened"
        return f"{owner}(region={self.region!r}, endpoint_url={self.endpoint!r}, {state})"

    async def get(self, raise_if_closed: Callable[[], None]) -> _C:
        """The client, opened by the first caller; ``raise_if_closed`` is the owner's check."""
        raise_if_closed()
        client = self.client
        if client is not None:
            return client
        async with self._open_lock:
            raise_if_closed()
            if self.client is None:
                await self._open_locked()
            assert self.client is not None
            return self.client

    async def call(
        self,
        owner: ProviderResource,
        operation: str,
        request: Callable[[_C], Awaitable[_T]],
        *,
        what: str,
        log_subject: str,
        answer: Answer = _no_answer,
        tolerate: frozenset[str] = frozenset(),
    ) -> _T:
        """Send one request within ``call_timeout``; botocore errors become encx errors.

        A botocore error, or running out of ``call_timeout``, raises what
        :func:`translate_error` makes of it, with ``what`` naming the request in
        the message and ``answer`` reading the service's own codes. A
        ClientError whose code is in ``tolerate`` raises :class:`ToleratedError`
        instead, for the caller to handle. ``log_subject`` names the key or
        secret in the log line.
        """

        def translate(exc: Exception, attempts: int) -> EncxError:
            return translate_error(
                exc,
                self.errors,
                operation=operation,
                what=what,
                region=self.region,
                endpoint=self.endpoint,
                attempts=attempts,
                answer=answer,
            )

        client = await self.get(owner._raise_if_closed)
        attempts = _Attempts()
        token = _current_attempts.set(attempts)
        started = time.perf_counter()
        outcome = "failed"
        try:
            with anyio.move_on_after(self.call_timeout):
                try:
                    result = await request(client)
                except Exception as exc:
                    if owner._closed:
                        raise ClosedError(
                            f"{type(owner).__name__} was closed during {operation}"
                        ) from exc
                    if not isinstance(exc, ClientError | BotoCoreError):
                        raise
                    if isinstance(exc, ClientError):
                        code = _client_error_details(exc)[0]
                        if code in tolerate:
                            outcome = code
                            raise ToleratedError(code) from None
                    raise translate(exc, attempts.made(exc)) from exc
                outcome = "ok"
                return result
            outcome = "timed out"
            raise translate(_DeadlineExceeded(self.call_timeout, attempts), attempts.sent)
        finally:
            _current_attempts.reset(token)
            self._log.debug(
                "%s %s %s region=%s %s after %d attempt(s) in %.1f ms",
                self.label,
                operation,
                log_subject,
                self.region,
                outcome,
                attempts.sent,
                (time.perf_counter() - started) * 1000,
            )

    async def close(self) -> None:
        """Close the client, if it was opened; the owner marks itself closed first."""
        async with self._open_lock:  # let an open in progress finish, then undo it
            stack, self._stack, self.client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
            self._log.debug("%s client closed region=%s", self.label, self.region)

    async def _open_locked(self) -> None:
        config = self.config
        try:
            session = (
                config.session if config.session is not None else AioSession(profile=config.profile)
            )
            region = (
                config.region
                or cast("str | None", getattr(config.client_config, "region_name", None))
                or os.environ.get("AWS_REGION")
                or cast("str | None", session.get_config_variable("region"))
            )
        except ProfileNotFound as exc:
            raise ConfigurationError(
                f"the AWS profile {config.profile!r} is not in the shared config files"
            ) from exc
        if not region:
            raise ConfigurationError(
                f"no AWS region is configured for {self.label}: set AWS_REGION (or "
                "AWS_DEFAULT_REGION, or a region in the AWS profile) or pass Config(region=...)"
            )
        _redact.install()
        stack = contextlib.AsyncExitStack()
        try:
            client = cast(
                "_C",
                await stack.enter_async_context(
                    session.create_client(
                        self.service,
                        region_name=region,
                        endpoint_url=config.endpoint_url,
                        config=self.client_config,
                    )
                ),
            )
        except BotoCoreError as exc:
            await stack.aclose()
            raise ConfigurationError(
                f"could not create a {self.label} client for region {region}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except BaseException:
            await stack.aclose()
            raise
        # Counted per request (see call): botocore reports no attempts for an
        # error that has no response, and retries stop early once its retry
        # quota is spent.
        client.meta.events.register("before-send", _count_sent, unique_id="encx-async-sent")
        client.meta.events.register("needs-retry", _count_ended, unique_id="encx-async-ended")
        self._stack = stack
        self.client = client
        self.region = client.meta.region_name or region
        self.endpoint = client.meta.endpoint_url
        self._log.debug(
            "%s client opened region=%s endpoint=%s", self.label, self.region, self.endpoint
        )


class AwsResource(ProviderResource, Generic[_C]):
    """A provider over one :class:`AwsClient`: its properties, repr and lifecycle.

    The constructor does no I/O; the client is created by ``async with``,
    ``create()`` or the first call, and closed by :meth:`aclose` (idempotent;
    any call after it raises :class:`~encx_async.ClosedError`).
    """

    def __init__(self, aws: AwsClient[_C]) -> None:
        self._aws = aws
        self._closed = False

    @property
    def config(self) -> Config:
        return self._aws.config

    @property
    def region(self) -> str | None:
        """The resolved region; ``None`` before opening when it comes from the environment."""
        return self._aws.region

    @property
    def endpoint_url(self) -> str | None:
        """The endpoint in use; ``None`` until opened unless set in the config."""
        return self._aws.endpoint

    def __repr__(self) -> str:
        return self._aws.describe(type(self).__name__, closed=self._closed)

    async def aclose(self) -> None:
        """Close the client and its connections; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._forget()
        await self._aws.close()

    def _forget(self) -> None:
        """Drop what the provider remembers besides the client; called by :meth:`aclose`."""

    async def _ensure_open(self) -> None:
        await self._ensure_client()

    async def _ensure_client(self) -> _C:
        return await self._aws.get(self._raise_if_closed)
