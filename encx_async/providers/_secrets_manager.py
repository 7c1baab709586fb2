"""The pepper of the keyed hashes in AWS Secrets Manager: :class:`SecretsManagerPepperSource`.

Private: import it from :mod:`encx_async.providers.aws`, which documents it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Self, TypeVar

from encx_async._exceptions import (
    ConfigurationError,
    EncxError,
    SecretsManagerAccessDeniedError,
    SecretsManagerCredentialsError,
    SecretsManagerError,
    SecretsManagerUnavailableError,
)
from encx_async._pepper import Pepper
from encx_async.providers._aws_client import (
    UNAVAILABLE_CODES,
    AwsClient,
    AwsResource,
    Config,
    ServiceErrors,
    ToleratedError,
    region_text,
)
from encx_async.providers._common import check_key_ref

if TYPE_CHECKING:
    from types_aiobotocore_secretsmanager import SecretsManagerClient
    from types_aiobotocore_secretsmanager.type_defs import GetSecretValueResponseTypeDef

__all__ = ["SecretsManagerPepperSource"]

_T = TypeVar("_T")

_log = logging.getLogger("encx_async.secretsmanager")

_SM_NOT_FOUND_CODES: Final = frozenset({"ResourceNotFoundException"})
_SM_EXISTS_CODE: Final = "ResourceExistsException"
_SM_UNAVAILABLE_CODES: Final = UNAVAILABLE_CODES | {"InternalServiceError"}
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


def _denied_hint(operation: str) -> str:
    permission = _SM_PERMISSIONS.get(operation, f"secretsmanager:{operation}")
    return (
        "the caller's IAM policy (and the secret's resource policy, if any) "
        f"must allow {permission}"
    )


_SM_ERRORS: Final = ServiceErrors(
    label="Secrets Manager",
    error=SecretsManagerError,
    unavailable=SecretsManagerUnavailableError,
    denied=SecretsManagerAccessDeniedError,
    no_credentials=SecretsManagerCredentialsError,
    denied_hint=_denied_hint,
    unavailable_codes=_SM_UNAVAILABLE_CODES,
    unquoted_operations=_SM_SECRET_BEARING_OPERATIONS,
)


def _answer(
    operation: str, secret_id: str, region: str | None, code: str, detail: str
) -> EncxError | None:
    """The Secrets Manager codes that say something about the secret itself.

    A missing or unusable secret is a :class:`ConfigurationError`: an operator
    must create, restore or fix it, and retrying cannot help.
    """
    where = region_text(region)
    subject = f"Secrets Manager {operation} on secret {secret_id!r}"
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
    if code in {"DecryptionFailure", "EncryptionFailure"}:
        return SecretsManagerError(
            f"{subject} in {where} failed: Secrets Manager could not use the secret's KMS key "
            f"({code}{detail}); the key must be enabled and the caller needs "
            f"{_SM_PERMISSIONS.get(operation, 'access to it')}",
            code=code,
        )
    return None


class SecretsManagerPepperSource(AwsResource["SecretsManagerClient"]):
    """Load the pepper from AWS Secrets Manager, over one shared aiobotocore client.

    The secret holds the JSON of :meth:`Pepper.to_secret_string
    <encx_async.Pepper.to_secret_string>`
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
    missing permission :class:`~encx_async.SecretsManagerAccessDeniedError`,
    naming it; an endpoint that cannot be reached
    :class:`~encx_async.SecretsManagerUnavailableError`. Every Secrets Manager
    failure is a :class:`~encx_async.SecretsManagerError` (and also the KMS
    class of the same meaning, so one handler covers both). No message or log
    line contains the secret value.
    """

    def __init__(self, config: Config | None = None, *, kms_key_id: str | None = None) -> None:
        config = config if config is not None else Config()
        if kms_key_id is not None:
            check_key_ref(kms_key_id)
        self._kms_key_id = kms_key_id
        super().__init__(AwsClient(config, "secretsmanager", _SM_ERRORS, _log))

    @classmethod
    async def create(cls, config: Config | None = None, *, kms_key_id: str | None = None) -> Self:
        """Create and open a source."""
        source = cls(config, kms_key_id=kms_key_id)
        await source._ensure_client()
        return source

    async def _call(
        self,
        operation: str,
        secret_id: str,
        request: Callable[[SecretsManagerClient], Awaitable[_T]],
        *,
        tolerate: frozenset[str] = frozenset(),
    ) -> _T:
        """Send one request; a ClientError code in ``tolerate`` raises :class:`ToleratedError`."""

        def answer(code: str, detail: str) -> EncxError | None:
            return _answer(operation, secret_id, self._aws.region, code, detail)

        return await self._aws.call(
            self,
            operation,
            request,
            what=f"Secrets Manager {operation} on secret {secret_id!r}",
            log_subject=f"secret={secret_id}",
            answer=answer,
            tolerate=tolerate,
        )

    # -- loading -----------------------------------------------------------

    async def load(self, secret_id: str, *, create_if_missing: bool = False) -> Pepper:
        """The pepper in the secret ``secret_id`` (a name or an ARN).

        With ``create_if_missing=True`` an absent secret is created holding a
        new :meth:`Pepper.generate <encx_async.Pepper.generate>`
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
        except ToleratedError:
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
        except ToleratedError:
            _log.info(
                "pepper secret %s already exists in region %s (created by another instance); "
                "reading it",
                secret_id,
                self._aws.region,
            )
        else:
            _log.info("created pepper secret %s in region %s", secret_id, self._aws.region)
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
        raise SecretsManagerUnavailableError(
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
