"""The contract between :class:`~encx_async.Crypto` and a key management service."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

__all__ = ["KeyDeletion", "KeyManagementService", "KeyRotationService", "PartialWrapping"]


@runtime_checkable
class KeyManagementService(Protocol):
    """What a KMS provider implements: wrap and unwrap data keys under a KEK.

    ``context`` is the KMS encryption context: non-secret, authenticated, and
    required again, unchanged, to unwrap. With AWS it appears in CloudTrail.

    A provider is an async resource: ``aclose()`` (idempotent) or ``async with``.
    Whoever opens a provider closes it; :class:`~encx_async.Crypto` never closes
    a provider it was handed.
    """

    async def get_key_id(self, alias: str) -> str:
        """Resolve an alias (``alias/...``), key id or key ARN to a key id."""
        ...

    async def create_key(self, description: str, *, alias: str | None = None) -> str:
        """Create a symmetric encryption key, and an alias for it if given; return its id."""
        ...

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Wrap a data key under the KEK ``key_id``."""
        ...

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Unwrap a data key wrapped by :meth:`encrypt_dek` with the same ``context``."""
        ...

    async def aclose(self) -> None:
        """Release the provider's resources; calling it again does nothing."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class KeyRotationService(Protocol):
    """What a provider adds so :meth:`Crypto.rotate_kek <encx_async.Crypto.rotate_kek>`
    and :meth:`Crypto.rewrap <encx_async.Crypto.rewrap>` work. Both bundled
    providers implement it.

    IAM: ``kms:CreateKey``, ``kms:UpdateAlias`` (new-key rotation),
    ``kms:RotateKeyOnDemand`` / ``kms:EnableKeyRotation`` (KMS-managed rotation),
    ``kms:ReEncryptFrom`` and ``kms:ReEncryptTo`` (rewrap).
    """

    async def update_alias(self, alias: str, key_id: str) -> None:
        """Point an existing alias at another key."""
        ...

    async def rotate_key_material(self, key_id: str) -> None:
        """Give the key new key material now (KMS ``RotateKeyOnDemand``).

        The key id stays; ciphertexts wrapped under older material still unwrap.
        """
        ...

    async def enable_key_rotation(self, key_id: str, *, period_days: int | None = None) -> None:
        """Turn on the KMS's own scheduled rotation of the key's material."""
        ...

    async def re_encrypt_dek(
        self,
        ciphertext_dek: bytes,
        *,
        source_key_id: str,
        destination_key_id: str,
        context: Mapping[str, str] | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Move a wrapped DEK to another key (KMS ``ReEncrypt``).

        It is unwrapped with ``context`` and wrapped again with
        ``destination_context`` (``None``: ``context`` again). The two differ
        when a rewrap moves a DEK between KEK versions: each version's number
        is in the context its DEKs are wrapped with. The plaintext DEK never
        leaves the KMS.
        """
        ...


@runtime_checkable
class KeyDeletion(Protocol):
    """What a provider adds so a failed new-key rotation can clean up after itself.

    A separate protocol, so a provider need not implement it: without it,
    :meth:`Crypto.rotate_kek <encx_async.Crypto.rotate_kek>` can only report
    (log, and name in the error's ``orphan_key_ids``) a key it made but could
    not record. All bundled providers implement it.

    IAM: ``kms:ScheduleKeyDeletion``.
    """

    async def schedule_key_deletion(self, key_id: str, *, pending_days: int = 7) -> None:
        """Schedule ``key_id`` for deletion after ``pending_days`` (7 to 30 in AWS KMS).

        Until then the key is disabled and its deletion can be cancelled.
        """
        ...


@runtime_checkable
class PartialWrapping(Protocol):
    """What a provider adds when :meth:`~KeyManagementService.encrypt_dek` can
    succeed with part of its work undone: a wrapped key made while some of the
    places it is wrapped in were unavailable (the regions of
    :class:`~encx_async.providers.aws.MultiRegionKMSService` in
    ``"every-region"`` mode).

    :class:`~encx_async.Crypto` asks once per wrapped key, never per message:
    its DEK cache reuses a partly wrapped key only for the seconds this says,
    and :meth:`Crypto.rewrap <encx_async.Crypto.rewrap>` completes such a key
    (through ``re_encrypt_dek`` from the key to itself) even on the current
    KEK version.
    """

    def partial_wrap(self, key_id: str, wrapped_dek: bytes) -> float | None:
        """``None`` if ``wrapped_dek`` is all that :meth:`~KeyManagementService.encrypt_dek`
        makes under ``key_id``; else the seconds until a new wrap may have more of it
        (0: now).

        Synchronous and local: it looks at the wrapped key and asks nobody.
        """
        ...
