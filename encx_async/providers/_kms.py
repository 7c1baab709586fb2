"""AWS KMS as a :class:`~encx_async.kms.KeyManagementService`: :class:`KMSService`.

Private: import it from :mod:`encx_async.providers.aws`, which documents it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final, Literal, NamedTuple, Self, TypeVar

import anyio
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError

from encx_async._context import normalize_context
from encx_async._exceptions import (
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
from encx_async.providers._aws_client import (
    AwsClient,
    AwsResource,
    Config,
    ServiceErrors,
    is_region_name,
)
from encx_async.providers._common import (
    DECRYPT_FAILED,
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

if TYPE_CHECKING:
    from types_aiobotocore_kms import KMSClient
    from types_aiobotocore_kms.type_defs import (
        DecryptRequestTypeDef,
        EnableKeyRotationRequestTypeDef,
        EncryptRequestTypeDef,
        KeyMetadataTypeDef,
        ReEncryptRequestTypeDef,
    )

__all__ = ["KMSService"]

_log = logging.getLogger("encx_async.kms")

_T = TypeVar("_T")

# The KMS limit on the size of a ciphertext we send.
_MAX_CIPHERTEXT: Final = 6144
_KMS_ARN_RE: Final = re.compile(
    r"^arn:(?P<partition>[a-z0-9-]+):kms:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"(?P<type>key|alias)/(?P<name>.+)$"
)
_NOT_FOUND_CODES: Final = frozenset({"NotFoundException"})
# Operations that unwrap a ciphertext, where these codes mean "does not match".
_UNWRAPPING_OPERATIONS: Final = frozenset({"Decrypt", "ReEncrypt"})
_DECRYPT_FAILURE_CODES: Final = frozenset(
    {"InvalidCiphertextException", "IncorrectKeyException", "InvalidKeyUsageException"}
)

_KMS_ERRORS: Final = ServiceErrors(
    label="KMS",
    error=KMSError,
    unavailable=KMSUnavailableError,
    denied=KMSAccessDeniedError,
    no_credentials=KMSCredentialsError,
    denied_hint=lambda operation: "the caller's IAM policy or the key policy must allow it",
)


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


def _on(key_refs: KeyRefs) -> str:
    """What a request is about, for messages: " on 'alias/x'", or nothing."""
    if not key_refs:
        return ""
    if isinstance(key_refs, str):
        return f" on {key_refs!r}"
    return " on " + " -> ".join(repr(ref) for ref in key_refs)


def _refs_text(key_refs: KeyRefs) -> str:
    if key_refs is None:
        return "-"
    return key_refs if isinstance(key_refs, str) else " -> ".join(key_refs)


def _check_wrapped(value: object) -> bytes:
    """A wrapped data key to send back to KMS: bytes-like, or TypeError.

    A length KMS would refuse is a DecryptionError, like any other bad ciphertext.
    """
    ciphertext = as_bytes(value, "wrapped data key")
    if not 1 <= len(ciphertext) <= _MAX_CIPHERTEXT:
        raise DecryptionError(DECRYPT_FAILED)
    return ciphertext


class KMSService(AwsResource["KMSClient"]):
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
        super().__init__(
            AwsClient(config if config is not None else Config(), "kms", _KMS_ERRORS, _log)
        )
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

    def _forget(self) -> None:
        self._alias_cache.clear()

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
        def answer(code: str, detail: str) -> EncxError | None:
            if code in _NOT_FOUND_CODES:
                return KMSKeyNotFoundError(
                    not_found_message(
                        key_ref or "", self._aws.region, scope="this account and region"
                    ),
                    code=code,
                )
            if operation in _UNWRAPPING_OPERATIONS and code in _DECRYPT_FAILURE_CODES:
                return DecryptionError(DECRYPT_FAILED)
            return None

        return await self._aws.call(
            self,
            operation,
            request,
            what=f"KMS {operation}{_on(key_ref)}",
            log_subject=f"key={_refs_text(key_ref)}",
            answer=answer,
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
        if not is_region_name(replica_region):
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
