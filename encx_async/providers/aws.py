"""AWS KMS as a :class:`~encx_async.kms.KeyManagementService`, on aiobotocore.

Data keys are generated locally and wrapped with the KMS ``Encrypt`` call, so
the IAM policy of the caller needs only ``kms:Encrypt``, ``kms:Decrypt`` and
``kms:DescribeKey`` (plus ``kms:CreateKey`` and ``kms:CreateAlias`` to use
:meth:`KMSService.create_key`). The rotation methods of
:class:`~encx_async.kms.KeyRotationService` need ``kms:UpdateAlias``,
``kms:RotateKeyOnDemand``, ``kms:EnableKeyRotation``, and ``kms:ReEncryptFrom``
with ``kms:ReEncryptTo``, each only for the method that uses it.

Typical use::

    from encx_async.providers.aws import Config, KMSService

    async with KMSService(Config(region="eu-west-1")) as kms:
        key_arn = await kms.get_key_id("alias/orders")
        wrapped = await kms.encrypt_dek(key_arn, dek, context={"table": "orders"})

One service holds one aiobotocore client (one connection pool) for its whole
life; share it between tasks rather than creating one per request.

At DEBUG level botocore logs whole request and response bodies, which for
``Encrypt`` and ``Decrypt`` contain the plaintext data key. Opening a service
therefore attaches the filter of :mod:`encx_async.providers._redact` to the
``botocore.endpoint`` and ``botocore.parsers`` loggers, which replaces those
payloads with a placeholder; nothing else about botocore's logging changes.

:class:`SecretsManagerPepperSource` keeps the pepper of the keyed hashes (see
:class:`~encx_async._pepper.Pepper`) in AWS Secrets Manager, creating it on a
fleet's first boot if asked to; the same filter blanks its ``SecretString``
payloads.
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
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, NamedTuple, Self, TypeVar, cast

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

from encx_async._context import normalize_context
from encx_async._exceptions import (
    ClosedError,
    ConfigurationError,
    DecryptionError,
    EncxError,
    KMSAccessDeniedError,
    KMSCredentialsError,
    KMSError,
    KMSKeyNotFoundError,
    KMSRegionMismatchError,
    KMSUnavailableError,
)
from encx_async._keystore._default import aws_database
from encx_async._pepper import Pepper
from encx_async.providers import _redact
from encx_async.providers._common import (
    DECRYPT_FAILED,
    ProviderResource,
    as_bytes,
    check_alias_name,
    check_description,
    check_key_ref,
    check_pending_days,
    check_plaintext,
    check_rotation_period,
    is_alias_ref,
    not_found_message,
)
from encx_async.providers._multi_region import (
    MultiRegionKMSService,
    MultiRegionStats,
    RegionStats,
    RegionsUnavailableError,
    is_multi_region_key,
)

if TYPE_CHECKING:
    from aiobotocore.client import AioBaseClient
    from types_aiobotocore_kms import KMSClient
    from types_aiobotocore_kms.type_defs import (
        DecryptRequestTypeDef,
        EnableKeyRotationRequestTypeDef,
        EncryptRequestTypeDef,
        KeyMetadataTypeDef,
        ReEncryptRequestTypeDef,
    )
    from types_aiobotocore_secretsmanager import SecretsManagerClient
    from types_aiobotocore_secretsmanager.type_defs import GetSecretValueResponseTypeDef

__all__ = [
    "Config",
    "KMSService",
    "MultiRegionKMSService",
    "MultiRegionStats",
    "RegionStats",
    "RegionsUnavailableError",
    "RetryMode",
    "SecretsManagerPepperSource",
    "is_multi_region_key",
]

_log = logging.getLogger("encx_async.kms")

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

# The KMS limit on the size of a ciphertext we send.
_MAX_CIPHERTEXT: Final = 6144
_KMS_ARN_RE: Final = re.compile(
    r"^arn:(?P<partition>[a-z0-9-]+):kms:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"(?P<type>key|alias)/(?P<name>.+)$"
)
# Some KMS-compatible endpoints (moto's IAM checks among them) answer a JSON
# request with an XML error document; botocore then reports the HTTP status
# as the code and the whole document as the message.
_XML_CODE_RE: Final = re.compile(r"<Code>([^<]{1,200})</Code>")
_XML_MESSAGE_RE: Final = re.compile(r"<Message>([^<]{0,2000})</Message>")

_NOT_FOUND_CODES: Final = frozenset({"NotFoundException"})
# Operations that unwrap a ciphertext, where these codes mean "does not match".
_UNWRAPPING_OPERATIONS: Final = frozenset({"Decrypt", "ReEncrypt"})
_DECRYPT_FAILURE_CODES: Final = frozenset(
    {"InvalidCiphertextException", "IncorrectKeyException", "InvalidKeyUsageException"}
)
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
_UNAVAILABLE_CODES: Final = frozenset(
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
    """How :class:`KMSService` reaches AWS KMS.

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

    ``alias_cache_ttl`` is how many seconds :meth:`KMSService.get_key_id`
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
        if self.region is not None and not _is_region_name(self.region):
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


def _call_timeout(config: Config, client_config: AioConfig) -> float:
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


def _is_region_name(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[a-z]{2,}(?:-[a-z0-9]+)+", value) is not None


class _KmsArn(NamedTuple):
    """The parts of a KMS key or alias ARN."""

    partition: str
    region: str
    account: str
    resource_type: Literal["key", "alias"]
    resource_id: str
    """The key id (``1234abcd-...`` or ``mrk-...``) or the alias name without ``alias/``."""

    @property
    def is_multi_region_key(self) -> bool:
        return self.resource_type == "key" and self.resource_id.startswith("mrk-")

    def with_region(self, region: str) -> str:
        """This ARN, as a string, with its region replaced by ``region``."""
        return (
            f"arn:{self.partition}:kms:{region}:{self.account}:"
            f"{self.resource_type}/{self.resource_id}"
        )


def _parse_kms_arn(value: str) -> _KmsArn | None:
    """Split a KMS key or alias ARN; ``None`` when ``value`` is not an ARN at all.

    Raises :class:`ConfigurationError` for a string that starts with ``arn:``
    but is not a KMS key or alias ARN.
    """
    if not value.startswith("arn:"):
        return None
    match = _KMS_ARN_RE.fullmatch(value)
    if match is None:
        raise ConfigurationError(
            f"{value!r} is not a KMS key or alias ARN "
            "(expected arn:<partition>:kms:<region>:<account>:key/<id> or .../alias/<name>)"
        )
    resource_type: Literal["key", "alias"] = "key" if match["type"] == "key" else "alias"
    return _KmsArn(
        match["partition"], match["region"], match["account"], resource_type, match["name"]
    )


KeyRefs = str | tuple[str, ...] | None
"""What a request is about: one key reference, several (UpdateAlias, ReEncrypt), or none."""


def _refs_text(key_refs: KeyRefs) -> str:
    if key_refs is None:
        return "-"
    return key_refs if isinstance(key_refs, str) else " -> ".join(key_refs)


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
    return code, message, status


def _translate_error(
    exc: Exception,
    *,
    operation: str,
    key_ref: KeyRefs,
    region: str | None,
    endpoint: str | None,
    attempts: int,
) -> EncxError:
    """Turn a botocore exception into the encx-async error that describes it.

    The single place where botocore errors are mapped; the caller raises the
    result ``from exc``. Messages never contain request payloads.
    """
    if not key_ref:
        subject = ""
    elif isinstance(key_ref, str):
        subject = f" on {key_ref!r}"
    else:
        subject = " on " + " -> ".join(repr(ref) for ref in key_ref)
    where = f"region {region}" if region else "the configured region"
    target = f"{endpoint or 'the KMS endpoint'} ({where})"

    if isinstance(exc, _DeadlineExceeded):
        return KMSUnavailableError(
            f"KMS {operation}{subject} at {target} ran out of {exc.describe()}; retry later"
        )
    if isinstance(exc, ClientError):
        code, message, status = _client_error_details(exc)
        detail = f": {message}" if message else ""
        if code in _NOT_FOUND_CODES:
            return KMSKeyNotFoundError(
                not_found_message(key_ref or "", region, scope="this account and region"),
                code=code,
            )
        if operation in _UNWRAPPING_OPERATIONS and code in _DECRYPT_FAILURE_CODES:
            return DecryptionError(DECRYPT_FAILED)
        if code in _BAD_CREDENTIAL_CODES:
            return KMSAccessDeniedError(
                f"KMS {operation}{subject} in {where} was refused ({code}{detail}); "
                f"{_CREDENTIAL_HINT}",
                code=code,
            )
        if code in _ACCESS_DENIED_CODES or status == 403:
            return KMSAccessDeniedError(
                f"KMS {operation}{subject} in {where} was denied ({code or status}){detail}; "
                "the caller's IAM policy or the key policy must allow it",
                code=code or None,
            )
        if code in _UNAVAILABLE_CODES or status >= 500:
            return KMSUnavailableError(
                f"KMS {operation}{subject} failed at {target} with {code or status}{detail}, "
                f"after {attempts} attempt(s); retry later",
                code=code or None,
            )
        return KMSError(
            f"KMS {operation}{subject} in {where} failed: {code or status}{detail}",
            code=code or None,
        )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return KMSCredentialsError(
            f"no usable AWS credentials to sign KMS {operation}{subject} "
            f"({type(exc).__name__}); {_CREDENTIAL_HINT}"
        )
    if isinstance(exc, ProfileNotFound):
        return ConfigurationError(f"the AWS profile for KMS {operation} does not exist: {exc}")
    if isinstance(exc, NoRegionError):
        return ConfigurationError(
            "no AWS region is configured for KMS: set AWS_REGION or pass Config(region=...)"
        )
    if isinstance(exc, ParamValidationError):
        # botocore's report can quote parameter values, so it stays in __cause__ only.
        return ConfigurationError(f"botocore rejected the parameters of KMS {operation}{subject}")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return KMSUnavailableError(
            f"KMS {operation}{subject}: {target} could not be reached "
            f"({type(exc).__name__}); gave up after {attempts} attempt(s)"
        )
    return KMSError(f"KMS {operation}{subject} in {where} failed: {type(exc).__name__}")


def _check_wrapped(value: object) -> bytes:
    """A wrapped data key to send back to KMS: bytes-like, or TypeError.

    A length KMS would refuse is a DecryptionError, like any other bad ciphertext.
    """
    ciphertext = as_bytes(value, "wrapped data key")
    if not 1 <= len(ciphertext) <= _MAX_CIPHERTEXT:
        raise DecryptionError(DECRYPT_FAILED)
    return ciphertext


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


class _AwsClient(Generic[_C]):
    """The one aiobotocore client of a provider, created on first use.

    Owns what :class:`KMSService` and :class:`SecretsManagerPepperSource`
    share: the session and region resolution, the client's exit stack, the
    lock that makes concurrent first calls open one client, closing, and
    :meth:`call`, which every request goes through. ``service`` is the
    botocore service name, ``label`` how messages and log lines name it. The
    owner keeps its closed flag and passes itself in.
    """

    def __init__(
        self,
        config: Config,
        service: Literal["kms", "secretsmanager"],
        label: str,
        log: logging.Logger,
    ) -> None:
        self.config = config
        self.service: Final = service
        self.label: Final = label
        self._log = log
        self.client_config = config.build_client_config()
        self.call_timeout = _call_timeout(config, self.client_config)
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
        subject: str,
        request: Callable[[_C], Awaitable[_T]],
        translate: Callable[[Exception, int], EncxError],
        *,
        tolerate: frozenset[str] = frozenset(),
    ) -> _T:
        """Send one request within ``call_timeout``; botocore errors become encx errors.

        ``translate(exc, attempts)`` maps a botocore error, or a
        :class:`_DeadlineExceeded`, to the error to raise. A ClientError whose
        code is in ``tolerate`` raises :class:`_ToleratedError` instead, for the
        caller to handle. ``subject`` names the key or secret in the log line.
        """
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
                            raise _ToleratedError(code) from None
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
                subject,
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


class KMSService(ProviderResource):
    """AWS KMS over one shared aiobotocore client.

    ``KMSService(config)`` does no I/O. Open it with ``await KMSService.create(config)``
    or ``async with KMSService(config) as kms``; a method called on a service
    that was never opened opens it first. :meth:`aclose` is idempotent, and
    any call after it raises :class:`~encx_async.ClosedError`.

    Key references may be alias names (``alias/orders``), key ids, key ARNs or
    alias ARNs. An ARN naming another region is refused with
    :class:`~encx_async.KMSRegionMismatchError` before any request, except for
    multi-region keys (``key/mrk-...``), whose replica in this service's region
    is used instead.

    It also implements :class:`~encx_async.kms.KeyRotationService`
    (:meth:`update_alias`, :meth:`rotate_key_material`,
    :meth:`enable_key_rotation`, :meth:`re_encrypt_dek`).
    """

    def __init__(self, config: Config | None = None) -> None:
        self._aws: _AwsClient[KMSClient] = _AwsClient(
            config if config is not None else Config(), "kms", "KMS", _log
        )
        self._closed = False
        self._alias_cache: dict[str, tuple[str, float]] = {}
        # Bumped by every invalidation, so a lookup that was in flight across
        # one does not put back what was just forgotten.
        self._alias_generation = 0
        # Monotonic clock for the alias cache; tests replace it.
        self._clock: Callable[[], float] = time.monotonic

    @classmethod
    async def create(cls, config: Config | None = None) -> Self:
        """Create and open a service."""
        service = cls(config)
        await service._ensure_client()
        return service

    @property
    def config(self) -> Config:
        return self._aws.config

    @property
    def region(self) -> str | None:
        """The resolved region; ``None`` before opening when it comes from the environment."""
        return self._aws.region

    @property
    def endpoint_url(self) -> str | None:
        """The KMS endpoint in use; ``None`` until opened unless set in the config."""
        return self._aws.endpoint

    def __repr__(self) -> str:
        return self._aws.describe(type(self).__name__, closed=self._closed)

    async def aclose(self) -> None:
        """Close the client and its connections; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._alias_cache.clear()
        await self._aws.close()

    # -- lifecycle ---------------------------------------------------------

    async def _ensure_open(self) -> None:
        await self._ensure_client()

    async def _ensure_client(self) -> KMSClient:
        return await self._aws.get(self._raise_if_closed)

    # -- helpers -----------------------------------------------------------

    def _route(self, key_ref: str) -> str:
        """Check an ARN's region against ours; return the reference to send to KMS."""
        arn = _parse_kms_arn(key_ref)
        if arn is None or self._aws.region is None or arn.region == self._aws.region:
            return key_ref
        if arn.is_multi_region_key:
            return arn.with_region(self._aws.region)
        raise KMSRegionMismatchError(
            f"{key_ref!r} is in region {arn.region}, but this KMSService uses region "
            f"{self._aws.region}; use a KMSService for {arn.region}, or a key in {self._aws.region}"
        )

    async def _call(
        self,
        operation: str,
        key_ref: KeyRefs,
        request: Callable[[KMSClient], Awaitable[_T]],
    ) -> _T:
        def translate(exc: Exception, attempts: int) -> EncxError:
            return _translate_error(
                exc,
                operation=operation,
                key_ref=key_ref,
                region=self._aws.region,
                endpoint=self._aws.endpoint,
                attempts=attempts,
            )

        return await self._aws.call(
            self, operation, f"key={_refs_text(key_ref)}", request, translate
        )

    async def _describe(self, target: str) -> KeyMetadataTypeDef:
        """DescribeKey on an already routed reference; never the cache."""
        response = await self._call(
            "DescribeKey", target, lambda client: client.describe_key(KeyId=target)
        )
        return response["KeyMetadata"]

    async def _key_arn(self, target: str) -> str:
        """The key behind an already routed reference, for requests that refuse aliases.

        An alias is resolved by KMS, not the alias cache: these requests change
        keys, and must change the key the alias names now.
        """
        if not is_alias_ref(target):
            return target
        metadata = await self._describe(target)
        return metadata.get("Arn") or metadata["KeyId"]

    # -- KeyManagementService ---------------------------------------------

    async def get_key_id(self, alias: str) -> str:
        """Resolve an alias, key id, key ARN or alias ARN to the key's ARN.

        Results are cached for ``Config.alias_cache_ttl`` seconds; see
        :meth:`invalidate_alias`.
        """
        key_ref = check_key_ref(alias)
        await self._ensure_client()
        target = self._route(key_ref)
        cached = self._alias_cache.get(target)
        if cached is not None:
            if cached[1] > self._clock():
                return cached[0]
            self._alias_cache.pop(target, None)
        generation = self._alias_generation
        metadata = await self._describe(target)
        arn = metadata.get("Arn") or metadata["KeyId"]
        ttl = self._aws.config.alias_cache_ttl
        if ttl > 0 and not self._closed and generation == self._alias_generation:
            self._alias_cache[target] = (arn, self._clock() + ttl)
        return arn

    async def default_database(self, kek_alias: str) -> str:
        """Where a Crypto given no database keeps this service's key versions:
        ``aws-<account>-<region>[-<host_port>]/keys.db`` in the user's data
        directory, the endpoint's host and port added for a custom
        ``endpoint_url`` (moto, LocalStack, a VPC endpoint).

        The account is the one in the key's ARN (``kek_alias`` itself, or what
        it resolves to, which the alias cache keeps for the Crypto's own
        lookup), so it costs no extra request; only an alias that does not
        exist yet asks STS ``GetCallerIdentity``, which needs no permission.
        """
        arn = _parse_kms_arn(kek_alias)
        if arn is None:
            try:
                arn = _parse_kms_arn(await self.get_key_id(kek_alias))
            except KMSKeyNotFoundError:
                arn = None
        account = arn.account if arn is not None else await self._caller_account()
        await self._ensure_client()
        assert self._aws.region is not None
        return aws_database(account, self._aws.region, self._aws.config.endpoint_url)

    async def _caller_account(self) -> str:
        await self._ensure_client()
        config = self._aws.config
        session = (
            config.session if config.session is not None else AioSession(profile=config.profile)
        )
        try:
            with anyio.fail_after(self._aws.call_timeout):
                async with session.create_client(
                    "sts",
                    region_name=self._aws.region,
                    endpoint_url=config.endpoint_url,
                    config=self._aws.client_config,
                ) as sts:
                    identity = await sts.get_caller_identity()
            return str(identity["Account"])
        except (ClientError, BotoCoreError, TimeoutError, KeyError) as exc:
            raise ConfigurationError(
                "cannot tell which AWS account this KMSService uses, to pick its default "
                f"key-version database (STS GetCallerIdentity failed: {type(exc).__name__}); "
                "pass database= or set ENCX_DATABASE_URL"
            ) from exc

    def invalidate_alias(self, alias: str | None = None) -> None:
        """Forget what ``alias`` resolved to (every alias when ``None``).

        Call it after pointing an alias at a new key some other way, so the
        next :meth:`get_key_id` asks KMS again instead of waiting for the cache
        TTL (:meth:`update_alias` does it itself). An alias name also forgets
        its alias ARNs, and an alias ARN its name.
        """
        self._alias_generation += 1
        if alias is None:
            self._alias_cache.clear()
            return
        self._alias_cache.pop(alias, None)
        with contextlib.suppress(EncxError):
            self._alias_cache.pop(self._route(alias), None)
        if is_alias_ref(alias):
            name = "alias/" + alias.split(":alias/", 1)[1] if alias.startswith("arn:") else alias
            for ref in [r for r in self._alias_cache if r == name or r.endswith(f":{name}")]:
                del self._alias_cache[ref]

    async def create_key(
        self, description: str, *, alias: str | None = None, multi_region: bool = False
    ) -> str:
        """Create a symmetric ``ENCRYPT_DECRYPT`` key, and ``alias`` for it; return its ARN.

        With ``multi_region=True`` the key is the primary of a multi-region key
        (``mrk-...``) in this service's region; :meth:`replicate_key` copies it
        to other regions.
        """
        check_description(description)
        if alias is not None:
            check_alias_name(alias)
        if not isinstance(multi_region, bool):
            raise TypeError(f"multi_region must be a bool, not {type(multi_region).__name__}")
        response = await self._call(
            "CreateKey",
            None,
            lambda client: client.create_key(
                Description=description,
                KeySpec="SYMMETRIC_DEFAULT",
                KeyUsage="ENCRYPT_DECRYPT",
                MultiRegion=multi_region,
            ),
        )
        metadata = response["KeyMetadata"]
        key_id = metadata["KeyId"]
        arn = metadata.get("Arn") or key_id
        if alias is not None:
            try:
                await self._call(
                    "CreateAlias",
                    alias,
                    lambda client: client.create_alias(AliasName=alias, TargetKeyId=key_id),
                )
            except KMSError as err:
                raise type(err)(
                    f"{err} (the key {arn} was created without the alias)", code=err.code
                ) from err.__cause__
            ttl = self._aws.config.alias_cache_ttl
            if ttl > 0:
                self._alias_cache[alias] = (arn, self._clock() + ttl)
        return arn

    async def create_alias(self, alias: str, key_id: str) -> None:
        """Create ``alias`` for ``key_id`` in this region (KMS ``CreateAlias``).

        Aliases are regional: the replica of a multi-region key gets its own.
        An existing alias raises :class:`~encx_async.KMSError` with code
        ``AlreadyExistsException``; :meth:`update_alias` moves one.
        IAM: ``kms:CreateAlias`` on the alias and the key.
        """
        await self._point_alias("CreateAlias", alias, key_id)

    async def replicate_key(self, key_id: str, replica_region: str) -> str:
        """Replicate the multi-region key ``key_id`` into ``replica_region`` (KMS ``ReplicateKey``).

        The request goes to this service's region, which must hold the
        primary key; the replica has the same ``mrk-`` id and key material, so
        a data key wrapped in either region unwraps in the other. Returns the
        replica's ARN. Aliases are not replicated: create one with the
        :meth:`create_alias` of a service in ``replica_region``.
        IAM: ``kms:ReplicateKey`` on the primary, ``kms:CreateKey`` in the replica region.
        """
        key_ref = check_key_ref(key_id)
        if not _is_region_name(replica_region):
            raise ConfigurationError(f"replica_region {replica_region!r} is not an AWS region name")
        await self._ensure_client()
        target = await self._key_arn(self._route(key_ref))
        if replica_region == self._aws.region:
            raise ConfigurationError(
                f"a multi-region key is replicated to another region, not to its own "
                f"({replica_region})"
            )
        # The bare id: the request goes to the key's region anyway, and moto
        # only looks keys up by id here.
        arn = _parse_kms_arn(target)
        bare = arn.resource_id if arn is not None else target
        response = await self._call(
            "ReplicateKey",
            target,
            lambda client: client.replicate_key(KeyId=bare, ReplicaRegion=replica_region),
        )
        metadata = response["ReplicaKeyMetadata"]
        return metadata.get("Arn") or metadata["KeyId"]

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Wrap ``plaintext_dek`` with KMS ``Encrypt`` under ``key_id``."""
        key_ref = check_key_ref(key_id)
        plaintext = check_plaintext(plaintext_dek)
        encryption_context = normalize_context(context)
        await self._ensure_client()
        target = self._route(key_ref)
        params: EncryptRequestTypeDef = {"KeyId": target, "Plaintext": plaintext}
        if encryption_context:
            params["EncryptionContext"] = encryption_context
        response = await self._call("Encrypt", target, lambda client: client.encrypt(**params))
        return response["CiphertextBlob"]

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Unwrap a data key with KMS ``Decrypt``, insisting on the key ``key_id``."""
        key_ref = check_key_ref(key_id)
        ciphertext = _check_wrapped(ciphertext_dek)
        encryption_context = normalize_context(context)
        await self._ensure_client()
        target = self._route(key_ref)
        params: DecryptRequestTypeDef = {"KeyId": target, "CiphertextBlob": ciphertext}
        if encryption_context:
            params["EncryptionContext"] = encryption_context
        response = await self._call("Decrypt", target, lambda client: client.decrypt(**params))
        plaintext = response.get("Plaintext")
        if plaintext is None:
            raise KMSError("KMS Decrypt returned no plaintext")
        return plaintext

    # -- KeyRotationService ------------------------------------------------

    async def update_alias(self, alias: str, key_id: str) -> None:
        """Point the existing ``alias`` at ``key_id`` (KMS ``UpdateAlias``).

        ``key_id`` may be a key id, a key ARN or another alias (resolved first,
        since KMS wants a key). The alias's entries in the alias cache are
        forgotten, so :meth:`get_key_id` answers with the new key at once; other
        processes keep theirs until their cache TTL runs out. A missing alias
        or key raises :class:`~encx_async.KMSKeyNotFoundError`: UpdateAlias
        never creates an alias (see :meth:`create_key`).
        """
        await self._point_alias("UpdateAlias", alias, key_id)

    async def _point_alias(
        self, operation: Literal["CreateAlias", "UpdateAlias"], alias: str, key_id: str
    ) -> None:
        check_alias_name(alias)
        key_ref = check_key_ref(key_id)
        await self._ensure_client()
        target = await self._key_arn(self._route(key_ref))
        try:
            await self._call(
                operation,
                (alias, key_ref),
                lambda client: (
                    client.create_alias(AliasName=alias, TargetKeyId=target)
                    if operation == "CreateAlias"
                    else client.update_alias(AliasName=alias, TargetKeyId=target)
                ),
            )
        finally:
            # Even after a failure: the request may have reached KMS.
            self.invalidate_alias(alias)

    async def rotate_key_material(self, key_id: str) -> None:
        """Give the key new material now (KMS ``RotateKeyOnDemand``).

        The key id stays, and KMS keeps the older material, so data keys
        wrapped before still unwrap; new wraps use the new material. AWS
        limits how many on-demand rotations a key may have (the
        ``LimitExceededException`` is raised as :class:`~encx_async.KMSError`).
        """
        key_ref = check_key_ref(key_id)
        await self._ensure_client()
        target = await self._key_arn(self._route(key_ref))
        await self._call(
            "RotateKeyOnDemand", target, lambda client: client.rotate_key_on_demand(KeyId=target)
        )

    async def enable_key_rotation(self, key_id: str, *, period_days: int | None = None) -> None:
        """Turn on KMS's scheduled rotation (``EnableKeyRotation``).

        ``period_days`` is 90 to 2560; without it KMS uses its default (365).
        """
        key_ref = check_key_ref(key_id)
        days = check_rotation_period(period_days)
        await self._ensure_client()
        target = await self._key_arn(self._route(key_ref))
        params: EnableKeyRotationRequestTypeDef = {"KeyId": target}
        if days is not None:
            params["RotationPeriodInDays"] = days
        await self._call(
            "EnableKeyRotation", target, lambda client: client.enable_key_rotation(**params)
        )

    # -- KeyDeletion ---------------------------------------------------------

    async def schedule_key_deletion(self, key_id: str, *, pending_days: int = 7) -> None:
        """Schedule the key's deletion after ``pending_days`` (KMS ``ScheduleKeyDeletion``).

        7 to 30 days; meanwhile the key is disabled (``PendingDeletion``) and
        ``CancelKeyDeletion`` can still save it. A key already pending
        deletion is left as it is.
        """
        key_ref = check_key_ref(key_id)
        days = check_pending_days(pending_days)
        await self._ensure_client()
        target = await self._key_arn(self._route(key_ref))
        # The bare id (the ARN is of this region): moto resolves no ARN here.
        bare = target.rsplit("/", 1)[-1]
        try:
            await self._call(
                "ScheduleKeyDeletion",
                target,
                lambda client: client.schedule_key_deletion(KeyId=bare, PendingWindowInDays=days),
            )
        except KMSError as exc:
            if exc.code != "KMSInvalidStateException" or not await self._pending_deletion(target):
                raise

    async def _pending_deletion(self, key_arn: str) -> bool:
        response = await self._call(
            "DescribeKey", key_arn, lambda client: client.describe_key(KeyId=key_arn)
        )
        return response["KeyMetadata"].get("KeyState") in (
            "PendingDeletion",
            "PendingReplicaDeletion",
        )

    async def re_encrypt_dek(
        self,
        ciphertext_dek: bytes,
        *,
        source_key_id: str,
        destination_key_id: str,
        context: Mapping[str, str] | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Move a wrapped data key to ``destination_key_id`` with KMS ``ReEncrypt``.

        KMS unwraps it under ``source_key_id`` with ``context`` and wraps it
        again with ``destination_context`` (by default ``context``); the
        plaintext never leaves KMS. A ciphertext that does not unwrap raises
        :class:`~encx_async.DecryptionError`, as in :meth:`decrypt_dek`.
        """
        ciphertext = _check_wrapped(ciphertext_dek)
        source_ref = check_key_ref(source_key_id)
        destination_ref = check_key_ref(destination_key_id)
        encryption_context = normalize_context(context)
        target_context = (
            encryption_context
            if destination_context is None
            else normalize_context(destination_context)
        )
        await self._ensure_client()
        source = self._route(source_ref)
        destination = self._route(destination_ref)
        params: ReEncryptRequestTypeDef = {
            "CiphertextBlob": ciphertext,
            "SourceKeyId": source,
            "DestinationKeyId": destination,
        }
        if encryption_context:
            params["SourceEncryptionContext"] = encryption_context
        if target_context:
            params["DestinationEncryptionContext"] = target_context
        response = await self._call(
            "ReEncrypt", (source, destination), lambda client: client.re_encrypt(**params)
        )
        return response["CiphertextBlob"]

    # -- health ------------------------------------------------------------

    async def describe_key(self, key_ref: str) -> dict[str, object]:
        """What a health probe needs, from KMS ``DescribeKey`` (never the alias cache).

        Returns ``key_id`` (the bare id), ``arn``, ``enabled`` (bool) and
        ``key_state`` (``"Enabled"``, ``"Disabled"``, ``"PendingDeletion"``...).
        """
        ref = check_key_ref(key_ref)
        await self._ensure_client()
        metadata = await self._describe(self._route(ref))
        return {
            "key_id": metadata["KeyId"],
            "arn": metadata.get("Arn") or metadata["KeyId"],
            "enabled": bool(metadata.get("Enabled", False)),
            "key_state": str(metadata.get("KeyState", "Unknown")),
        }


# -- the pepper in AWS Secrets Manager ------------------------------------------------

_sm_log = logging.getLogger("encx_async.secretsmanager")

_SM_NOT_FOUND_CODES: Final = frozenset({"ResourceNotFoundException"})
_SM_EXISTS_CODE: Final = "ResourceExistsException"
_SM_UNAVAILABLE_CODES: Final = _UNAVAILABLE_CODES | {"InternalServiceError"}
_SM_INVALID_PARAMETER_CODES: Final = frozenset({"InvalidParameterException", "ValidationException"})
_SM_PERMISSIONS: Final = {
    "GetSecretValue": "secretsmanager:GetSecretValue (and kms:Decrypt on the secret's KMS key "
    "when it is a customer managed key)",
    "CreateSecret": "secretsmanager:CreateSecret (and kms:GenerateDataKey on the KMS key "
    "when it is a customer managed key)",
}
# Operations whose request carries a secret: their AWS error messages are never
# quoted, so nothing from the request can reach an exception message.
_SM_SECRET_BEARING_OPERATIONS: Final = frozenset({"CreateSecret"})
_MAX_SECRET_ID: Final = 2048
# The names CreateSecret accepts; GetSecretValue also takes ARNs.
_SECRET_NAME_RE: Final = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")
# A secret that CreateSecret just made (or said exists) may not be readable at
# once: Secrets Manager is eventually consistent. Seconds to wait between tries.
_READ_BACK_DELAYS: Final = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
_CREATED_DESCRIPTION: Final = (
    "encx-async pepper: the key of keyed hashes (blind indexes, Argon2id). "
    "Do not change or delete it: every stored hash depends on it."
)


class _ToleratedError(Exception):
    """Internal: a ClientError code the caller asked to handle itself. Never escapes."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _check_secret_id(secret_id: object) -> str:
    if not isinstance(secret_id, str):
        raise TypeError(
            f"a Secrets Manager secret name or ARN must be a str, not {type(secret_id).__name__}"
        )
    if not secret_id.strip():
        raise ConfigurationError("a Secrets Manager secret name or ARN must not be empty")
    if len(secret_id) > _MAX_SECRET_ID:
        raise ConfigurationError(
            f"a Secrets Manager secret name or ARN is at most {_MAX_SECRET_ID} characters"
        )
    return secret_id


def _translate_secrets_error(
    exc: Exception,
    *,
    operation: str,
    secret_id: str,
    region: str | None,
    endpoint: str | None,
    attempts: int,
) -> EncxError:
    """Turn a botocore exception from Secrets Manager into an encx-async error.

    The hierarchy has no Secrets Manager branch, so the KMS classes that say the
    same thing are reused: :class:`KMSAccessDeniedError` for a missing
    permission or bad credentials, :class:`KMSUnavailableError` for an endpoint
    that cannot be reached (the message always says "Secrets Manager"). A
    missing or unusable secret is a :class:`ConfigurationError`. Messages name
    the secret and region, never a secret value; for operations that send one
    (CreateSecret) the AWS message is not quoted at all.
    """
    where = f"region {region}" if region else "the configured region"
    target = f"{endpoint or 'the Secrets Manager endpoint'} ({where})"
    subject = f"Secrets Manager {operation} on secret {secret_id!r}"

    if isinstance(exc, _DeadlineExceeded):
        return KMSUnavailableError(
            f"{subject} at {target} ran out of {exc.describe()}; retry later"
        )
    if isinstance(exc, ClientError):
        code, message, status = _client_error_details(exc)
        message = " ".join(message.split())  # moto pads its messages with runs of spaces
        quote = operation not in _SM_SECRET_BEARING_OPERATIONS and message
        detail = f": {message}" if quote else ""
        if code in _SM_NOT_FOUND_CODES:
            return ConfigurationError(
                f"Secrets Manager secret {secret_id!r} was not found in {where} (or has no "
                "current value); create it holding Pepper.generate().to_secret_string(), "
                "or pass create_if_missing=True"
            )
        if code == "InvalidRequestException":
            return ConfigurationError(
                f"{subject} in {where} was refused ({code}{detail}); a secret that is scheduled "
                "for deletion can be neither read nor created again: restore it "
                "(aws secretsmanager restore-secret) or use another name"
            )
        if code in _SM_INVALID_PARAMETER_CODES:
            return ConfigurationError(
                f"Secrets Manager rejected {operation} on {secret_id!r} ({code}{detail})"
            )
        if code in _BAD_CREDENTIAL_CODES:
            return KMSAccessDeniedError(
                f"{subject} in {where} was refused ({code}{detail}); {_CREDENTIAL_HINT}",
                code=code,
            )
        if code in _ACCESS_DENIED_CODES or status == 403:
            permission = _SM_PERMISSIONS.get(operation, f"secretsmanager:{operation}")
            return KMSAccessDeniedError(
                f"{subject} in {where} was denied ({code or status}{detail}); the caller's IAM "
                f"policy (and the secret's resource policy, if any) must allow {permission}",
                code=code or None,
            )
        if code in {"DecryptionFailure", "EncryptionFailure"}:
            return KMSError(
                f"{subject} in {where} failed: Secrets Manager could not use the secret's KMS key "
                f"({code}{detail}); the key must be enabled and the caller needs "
                f"{_SM_PERMISSIONS.get(operation, 'access to it')}",
                code=code,
            )
        if code in _SM_UNAVAILABLE_CODES or status >= 500:
            return KMSUnavailableError(
                f"{subject} failed at {target} with {code or status}{detail}, "
                f"after {attempts} attempt(s); retry later",
                code=code or None,
            )
        return KMSError(f"{subject} in {where} failed: {code or status}{detail}", code=code or None)

    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return KMSCredentialsError(
            f"no usable AWS credentials to sign {subject} ({type(exc).__name__}); "
            f"{_CREDENTIAL_HINT}"
        )
    if isinstance(exc, ProfileNotFound):
        return ConfigurationError(f"the AWS profile for {subject} does not exist: {exc}")
    if isinstance(exc, NoRegionError):
        return ConfigurationError(
            "no AWS region is configured for Secrets Manager: set AWS_REGION "
            "or pass Config(region=...)"
        )
    if isinstance(exc, ParamValidationError):
        # botocore's report can quote parameter values (a SecretString), so it
        # stays in __cause__ only.
        return ConfigurationError(f"botocore rejected the parameters of {subject}")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return KMSUnavailableError(
            f"{subject}: {target} could not be reached ({type(exc).__name__}); "
            f"gave up after {attempts} attempt(s)"
        )
    return KMSError(f"{subject} in {where} failed: {type(exc).__name__}")


class SecretsManagerPepperSource(ProviderResource):
    """Load the pepper from AWS Secrets Manager, over one shared aiobotocore client.

    The secret holds the JSON of :meth:`Pepper.to_secret_string
    <encx_async._pepper.Pepper.to_secret_string>`
    (``{"encx_pepper": 1, "version": 1, "secret": "<base64>"}``) as its
    ``SecretString``. Typical use at start-up::

        async with SecretsManagerPepperSource(Config(region="eu-west-1")) as source:
            pepper = await source.load("prod/orders/pepper", create_if_missing=True)

    It takes the :class:`Config` that :class:`KMSService` takes (region,
    profile or session, retries, timeouts, pool size); ``endpoint_url`` is the
    Secrets Manager endpoint here, and ``alias_cache_ttl`` is unused.
    ``kms_key_id`` is the KMS key a created secret is encrypted under
    (Secrets Manager's default, ``aws/secretsmanager``, when ``None``).

    The lifecycle is :class:`KMSService`'s: the constructor does no I/O; the
    client is created by ``async with``, :meth:`create` or the first
    :meth:`load`, and closed by :meth:`aclose` (idempotent; any call after it
    raises :class:`~encx_async.ClosedError`).

    Errors: a missing secret, one scheduled for deletion, or one that does not
    hold an encx pepper raise :class:`~encx_async.ConfigurationError`; a
    missing permission :class:`~encx_async.KMSAccessDeniedError`, naming it;
    an endpoint that cannot be reached :class:`~encx_async.KMSUnavailableError`
    (there is no Secrets Manager branch in the error tree, so the KMS classes
    that mean the same are used, with messages that say "Secrets Manager").
    No message or log line contains the secret value.
    """

    def __init__(self, config: Config | None = None, *, kms_key_id: str | None = None) -> None:
        config = config if config is not None else Config()
        if kms_key_id is not None:
            check_key_ref(kms_key_id)
        self._kms_key_id = kms_key_id
        self._aws: _AwsClient[SecretsManagerClient] = _AwsClient(
            config, "secretsmanager", "Secrets Manager", _sm_log
        )
        self._closed = False

    @classmethod
    async def create(cls, config: Config | None = None, *, kms_key_id: str | None = None) -> Self:
        """Create and open a source."""
        source = cls(config, kms_key_id=kms_key_id)
        await source._ensure_client()
        return source

    @property
    def config(self) -> Config:
        return self._aws.config

    @property
    def region(self) -> str | None:
        """The resolved region; ``None`` before opening when it comes from the environment."""
        return self._aws.region

    @property
    def endpoint_url(self) -> str | None:
        """The Secrets Manager endpoint in use; ``None`` until opened unless set in the config."""
        return self._aws.endpoint

    def __repr__(self) -> str:
        return self._aws.describe(type(self).__name__, closed=self._closed)

    async def aclose(self) -> None:
        """Close the client and its connections; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        await self._aws.close()

    # -- lifecycle ---------------------------------------------------------

    async def _ensure_open(self) -> None:
        await self._ensure_client()

    async def _ensure_client(self) -> SecretsManagerClient:
        return await self._aws.get(self._raise_if_closed)

    async def _call(
        self,
        operation: str,
        secret_id: str,
        request: Callable[[SecretsManagerClient], Awaitable[_T]],
        *,
        tolerate: frozenset[str] = frozenset(),
    ) -> _T:
        """Send one request; a ClientError code in ``tolerate`` raises :class:`_ToleratedError`."""

        def translate(exc: Exception, attempts: int) -> EncxError:
            return _translate_secrets_error(
                exc,
                operation=operation,
                secret_id=secret_id,
                region=self._aws.region,
                endpoint=self._aws.endpoint,
                attempts=attempts,
            )

        return await self._aws.call(
            self, operation, f"secret={secret_id}", request, translate, tolerate=tolerate
        )

    # -- loading -----------------------------------------------------------

    async def load(self, secret_id: str, *, create_if_missing: bool = False) -> Pepper:
        """The pepper in the secret ``secret_id`` (a name or an ARN).

        With ``create_if_missing=True`` an absent secret is created holding a
        new :meth:`Pepper.generate <encx_async._pepper.Pepper.generate>`
        (version 1), and what Secrets Manager then returns is read back and
        used. When several instances boot at once, one CreateSecret wins; the
        others get ``ResourceExistsException`` and read the winner's secret,
        so every instance ends up with the same pepper.

        The secret is read first, so once it exists the caller needs only
        ``secretsmanager:GetSecretValue``; ``secretsmanager:CreateSecret`` is
        needed on the first boot only. Creating needs a secret *name*, not an
        ARN.
        """
        secret_id = _check_secret_id(secret_id)
        if not isinstance(create_if_missing, bool):
            raise TypeError(
                f"create_if_missing must be a bool, not {type(create_if_missing).__name__}"
            )
        if create_if_missing and _SECRET_NAME_RE.fullmatch(secret_id) is None:
            raise ConfigurationError(
                f"cannot create the Secrets Manager secret {secret_id!r}: a secret name is 1 to "
                "512 letters, digits and /_+=.@- (an ARN names a secret that already exists)"
            )
        await self._ensure_client()
        if not create_if_missing:
            response = await self._get(secret_id, tolerate_missing=False)
            assert response is not None
            return self._parse(secret_id, response)
        response = await self._get(secret_id, tolerate_missing=True)
        if response is None:
            await self._create(secret_id)
            response = await self._read_back(secret_id)
        return self._parse(secret_id, response)

    async def _get(
        self, secret_id: str, *, tolerate_missing: bool
    ) -> GetSecretValueResponseTypeDef | None:
        try:
            return await self._call(
                "GetSecretValue",
                secret_id,
                lambda client: client.get_secret_value(SecretId=secret_id),
                tolerate=_SM_NOT_FOUND_CODES if tolerate_missing else frozenset(),
            )
        except _ToleratedError:
            return None

    async def _create(self, secret_id: str) -> None:
        """CreateSecret with a new pepper; an existing secret (a race lost) is fine."""
        # botocore's retries resend the token: a retried create is idempotent.
        request: dict[str, str] = {
            "Name": secret_id,
            "SecretString": Pepper.generate().to_secret_string(),
            "ClientRequestToken": str(uuid.uuid4()),
            "Description": _CREATED_DESCRIPTION,
        }
        if self._kms_key_id is not None:
            request["KmsKeyId"] = self._kms_key_id
        try:
            await self._call(
                "CreateSecret",
                secret_id,
                lambda client: client.create_secret(**request),  # type: ignore[arg-type]
                tolerate=frozenset({_SM_EXISTS_CODE}),
            )
        except _ToleratedError:
            _sm_log.info(
                "pepper secret %s already exists in region %s (created by another instance); "
                "reading it",
                secret_id,
                self._aws.region,
            )
        else:
            _sm_log.info("created pepper secret %s in region %s", secret_id, self._aws.region)
        finally:
            # Error reporters that record frame locals must not find the new pepper.
            request.clear()

    async def _read_back(self, secret_id: str) -> GetSecretValueResponseTypeDef:
        """GetSecretValue after a create, waiting out Secrets Manager's eventual consistency."""
        for delay in (*_READ_BACK_DELAYS, None):
            response = await self._get(secret_id, tolerate_missing=True)
            if response is not None:
                return response
            if delay is not None:
                await asyncio.sleep(delay)
        waited = sum(_READ_BACK_DELAYS)
        raise KMSUnavailableError(
            f"Secrets Manager secret {secret_id!r} in region {self._aws.region} was created (or "
            f"reported to exist) but GetSecretValue still could not find a current value after "
            f"{waited:.1f} s; retry later",
            code="ResourceNotFoundException",
        )

    def _parse(self, secret_id: str, response: GetSecretValueResponseTypeDef) -> Pepper:
        where = f"region {self._aws.region}" if self._aws.region else "the configured region"
        text = response.get("SecretString")
        if text is None:
            raise ConfigurationError(
                f"Secrets Manager secret {secret_id!r} in {where} is not an encx pepper: it holds "
                "binary data (SecretBinary), not the JSON of Pepper.to_secret_string()"
            )
        try:
            return Pepper.from_secret_string(text)
        except ConfigurationError as exc:
            # Pepper's messages never quote the value, so chaining is safe.
            raise ConfigurationError(
                f"Secrets Manager secret {secret_id!r} in {where} is not an encx pepper ({exc}); "
                "it must hold the JSON of Pepper.to_secret_string()"
            ) from exc
