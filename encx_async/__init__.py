"""encx-async: asyncio-native envelope encryption for Python services.

Start with :class:`Crypto`; pick a KMS from :mod:`encx_async.providers`.
"""

from __future__ import annotations

from ._cache import NIST_GCM_RANDOM_NONCE_LIMIT, CacheSideStats, DEKCache, DEKCacheStats
from ._crypto import DEFAULT_THREAD_THRESHOLD, Crypto, CryptoStats
from ._envelope import SealedRecord
from ._exceptions import (
    ClosedError,
    ConfigurationError,
    DatabaseUnavailableError,
    DecryptionError,
    EncryptionError,
    EncxError,
    ForkedError,
    InvalidHashError,
    InvalidValueError,
    KeyStoreCorruptError,
    KeyStoreError,
    KeyVersionError,
    KeyVersionNotFoundError,
    KMSAccessDeniedError,
    KMSCredentialsError,
    KMSError,
    KMSKeyNotFoundError,
    KMSRegionMismatchError,
    KMSUnavailableError,
    ModelDefinitionError,
    RegionsUnavailableError,
    SecretsManagerAccessDeniedError,
    SecretsManagerCredentialsError,
    SecretsManagerError,
    SecretsManagerUnavailableError,
)
from ._hashing import Argon2Params
from ._health import HealthReport
from ._keys import DataKey
from ._keystore import KEKVersion, KeyState, KeyStore, NewKey
from ._models import Encrypt, EncryptedRecord, HashBasic, HashSecure
from ._pepper import Pepper
from ._telemetry import CryptoMetrics
from .kms import KeyDeletion, KeyManagementService, KeyRotationService, PartialWrapping

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_THREAD_THRESHOLD",
    "NIST_GCM_RANDOM_NONCE_LIMIT",
    "Argon2Params",
    "CacheSideStats",
    "ClosedError",
    "ConfigurationError",
    "Crypto",
    "CryptoMetrics",
    "CryptoStats",
    "DEKCache",
    "DEKCacheStats",
    "DataKey",
    "DatabaseUnavailableError",
    "DecryptionError",
    "Encrypt",
    "EncryptedRecord",
    "EncryptionError",
    "EncxError",
    "ForkedError",
    "HashBasic",
    "HashSecure",
    "HealthReport",
    "InvalidHashError",
    "InvalidValueError",
    "KEKVersion",
    "KMSAccessDeniedError",
    "KMSCredentialsError",
    "KMSError",
    "KMSKeyNotFoundError",
    "KMSRegionMismatchError",
    "KMSUnavailableError",
    "KeyDeletion",
    "KeyManagementService",
    "KeyRotationService",
    "KeyState",
    "KeyStore",
    "KeyStoreCorruptError",
    "KeyStoreError",
    "KeyVersionError",
    "KeyVersionNotFoundError",
    "ModelDefinitionError",
    "NewKey",
    "PartialWrapping",
    "Pepper",
    "RegionsUnavailableError",
    "SealedRecord",
    "SecretsManagerAccessDeniedError",
    "SecretsManagerCredentialsError",
    "SecretsManagerError",
    "SecretsManagerUnavailableError",
    "__version__",
]
