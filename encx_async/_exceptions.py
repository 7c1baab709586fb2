"""The errors encx-async raises.

Every error derives from :class:`EncxError`, which is never raised itself, so
``except EncxError`` catches everything this library raises on purpose::

    EncxError
    ├── ConfigurationError (also ValueError)
    │   └── ModelDefinitionError
    ├── InvalidValueError (also ValueError)
    ├── InvalidHashError (also ValueError)
    ├── ClosedError (also RuntimeError)
    │   └── ForkedError
    ├── KMSError
    │   ├── KMSUnavailableError
    │   │   └── RegionsUnavailableError
    │   ├── KMSAccessDeniedError
    │   │   └── KMSCredentialsError
    │   ├── KMSKeyNotFoundError
    │   ├── KMSRegionMismatchError (also ValueError)
    │   └── SecretsManagerError
    │       ├── SecretsManagerUnavailableError (also KMSUnavailableError)
    │       └── SecretsManagerAccessDeniedError (also KMSAccessDeniedError)
    │           └── SecretsManagerCredentialsError (also KMSCredentialsError)
    ├── KeyStoreError
    │   ├── DatabaseUnavailableError
    │   └── KeyStoreCorruptError
    ├── EncryptionError
    └── DecryptionError
        └── KeyVersionError
            └── KeyVersionNotFoundError

Loading the pepper from AWS Secrets Manager fails with a
:class:`SecretsManagerError`. The family sits under :class:`KMSError`, and each
of its classes also derives from the KMS class of the same meaning, because an
unreachable AWS endpoint or a missing permission calls for the same handling
whichever service it is: ``except KMSUnavailableError`` around the pepper
loading catches an unreachable Secrets Manager too, and
``except SecretsManagerError`` tells the pepper source apart from the KMS.

Messages name aliases, key ids, regions and sizes, never key material,
peppers or plaintext. When an error comes from botocore or the KMS, the
original exception is kept as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "ClosedError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "DecryptionError",
    "EncryptionError",
    "EncxError",
    "ForkedError",
    "InvalidHashError",
    "InvalidValueError",
    "KMSAccessDeniedError",
    "KMSCredentialsError",
    "KMSError",
    "KMSKeyNotFoundError",
    "KMSRegionMismatchError",
    "KMSUnavailableError",
    "KeyStoreCorruptError",
    "KeyStoreError",
    "KeyVersionError",
    "KeyVersionNotFoundError",
    "ModelDefinitionError",
    "RegionsUnavailableError",
    "SecretsManagerAccessDeniedError",
    "SecretsManagerCredentialsError",
    "SecretsManagerError",
    "SecretsManagerUnavailableError",
]


class EncxError(Exception):
    """Base class of every encx-async error; never raised directly."""

    #: KMS keys that the failed operation created and could not clean up
    #: (see :meth:`Crypto.rotate_kek <encx_async.Crypto.rotate_kek>`); they cost
    #: money until deleted. Empty for nearly every error.
    orphan_key_ids: tuple[str, ...] = ()


class ConfigurationError(EncxError, ValueError):
    """A setting or argument is invalid: a pepper of the wrong size, a bad context..."""


class ModelDefinitionError(ConfigurationError):
    """A model's field markers cannot work: an unsupported field type, or markers
    that do not combine. Raised when the model is first inspected, naming the field."""


class InvalidValueError(EncxError, ValueError):
    """A value cannot be hashed or encrypted as a field: an unsupported type, a
    naive datetime, a NaN. The message names the type, never the value."""


class InvalidHashError(EncxError, ValueError):
    """A stored hash string is malformed, names a pepper version this instance
    does not have, or asks for Argon2 parameters outside the configured bounds."""


class ClosedError(EncxError, RuntimeError):
    """The object was used after ``aclose()``."""


class ForkedError(ClosedError):
    """A Crypto was used in a process forked after it was created.

    Its KMS client, key store and background tasks belong to the parent's event
    loop, and its cached data keys to the parent's use counts, so in the child
    it is closed: create a Crypto in each process, after the fork.
    """


class KMSError(EncxError):
    """The KMS refused or failed a request that none of the subclasses describe.

    It is raised as itself for rare KMS answers (a disabled key, a key pending
    deletion); ``code`` holds the KMS error code when there is one.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class KMSUnavailableError(KMSError):
    """The KMS could not be reached in time: network failure, timeout, 5xx or
    throttling, after the configured retries. Retrying later may succeed."""


class RegionsUnavailableError(KMSUnavailableError):
    """A call failed for want of a region: every region it may use was unavailable.

    ``operation`` is the call (``"decrypt_dek"``...), ``failures`` says, for
    each region tried in order, why it was not used: ``"circuit open"``, a
    timeout, or the unavailable error it raised. ``__cause__`` is the last of
    those errors, if any. Retrying later may succeed.
    """

    def __init__(
        self,
        operation: str,
        failures: Sequence[tuple[str, str]],
        *,
        succeeded: Sequence[str] = (),
        needed: int | None = None,
    ) -> None:
        tried = "; ".join(f"{region}: {reason}" for region, reason in failures) or "no region"
        if needed is None:
            message = f"KMS {operation} failed in every region it may use ({tried})"
        else:
            ok = ", ".join(succeeded) or "none"
            message = (
                f"KMS {operation} needs {needed} region(s) and only {len(succeeded)} answered "
                f"(succeeded: {ok}; failed: {tried})"
            )
        super().__init__(message, code="RegionsUnavailable")
        self.operation = operation
        self.failures: tuple[tuple[str, str], ...] = tuple(failures)
        self.regions: tuple[str, ...] = tuple(region for region, _ in failures)


class KMSAccessDeniedError(KMSError):
    """The caller's credentials lack a permission (or there are no credentials)."""


class KMSCredentialsError(KMSAccessDeniedError):
    """No usable AWS credentials were found to sign a request: none configured, a
    profile without keys, half a key pair, or a credential provider that failed.
    A KMSAccessDeniedError, since the call was refused all the same."""


class KMSKeyNotFoundError(KMSError):
    """The key or alias does not exist in this account and region.

    ``database`` is set (a URL without its password) when the key is one a
    key-version database names: that database belongs to another KMS, or the
    key is gone. It is None when the alias itself was not found.
    """

    def __init__(
        self, message: str, *, code: str | None = None, database: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.database = database


class KMSRegionMismatchError(KMSError, ValueError):
    """A key ARN names a region other than the one the KMS client talks to."""


class SecretsManagerError(KMSError):
    """AWS Secrets Manager refused or failed a request of the pepper source
    (:class:`~encx_async.providers.aws.SecretsManagerPepperSource`) that none of
    the subclasses describe, for instance a secret whose KMS key cannot be used;
    ``code`` holds the Secrets Manager error code when there is one.

    A missing secret, or one that holds no pepper, is a :class:`ConfigurationError`.
    """


class SecretsManagerUnavailableError(SecretsManagerError, KMSUnavailableError):
    """Secrets Manager could not be reached in time: network failure, timeout, 5xx
    or throttling, after the configured retries. Retrying later may succeed."""


class SecretsManagerAccessDeniedError(SecretsManagerError, KMSAccessDeniedError):
    """The caller's credentials lack a ``secretsmanager:`` permission (the message
    names it), or were refused as invalid or expired."""


class SecretsManagerCredentialsError(SecretsManagerAccessDeniedError, KMSCredentialsError):
    """No usable AWS credentials were found to sign a Secrets Manager request."""


class KeyStoreError(EncxError):
    """The key-version store failed; never raised directly.

    Messages name the database by its URL with any password removed.
    """


class DatabaseUnavailableError(KeyStoreError):
    """The key-version database cannot be used: a malformed or unsupported URL,
    a server that cannot be reached, or a schema this version does not know."""


class KeyStoreCorruptError(KeyStoreError):
    """The key-version database holds rows no encx-async writes (a bad version
    number, an unknown state, an alias with no active version): repair them by
    hand. Nothing is changed or lost meanwhile."""


class EncryptionError(EncxError):
    """Encryption failed for a reason other than the KMS."""


class DecryptionError(EncxError):
    """A ciphertext could not be decrypted: it was tampered with, truncated,
    is not an encx-async ciphertext, or the key, context or aad is wrong.

    The message is the same whatever the cause (:attr:`MESSAGE`), so
    code that passes it on to whoever sent the ciphertext cannot be used to
    test guesses (of a context, say) one check at a time. Which check failed is
    in :attr:`reason`, a short text that never holds key material, plaintext or
    the context's values: log it on the server, do not send it back.
    """

    MESSAGE: ClassVar[str] = (
        "decryption failed: the ciphertext is not genuine, or the key, context or aad is wrong"
    )
    #: Which check failed, for logs: "bad magic bytes", "the KMS refused the
    #: data key", "the body failed authentication"...
    reason: str

    def __init__(self, reason: str = "no reason given") -> None:
        super().__init__(self.MESSAGE)
        self.reason = reason

    def __reduce__(self) -> tuple[type[DecryptionError], tuple[str]]:
        return type(self), (self.reason,)


class KeyVersionError(DecryptionError):
    """A ciphertext's KEK version cannot be used: it is retired. A decryption
    failure like any other, with a precise cause.

    Unlike its parent, its message is precise: it names only the KEK version
    (written in clear in every header) and the database's own state, which an
    operator needs to act on and which tells nothing about keys or contexts.
    """

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.reason = message


class KeyVersionNotFoundError(KeyVersionError):
    """The ciphertext names a KEK version the database does not have for this alias."""
