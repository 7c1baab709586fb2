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
therefore attaches a logging filter to the
``botocore.endpoint`` and ``botocore.parsers`` loggers, which replaces those
payloads with a placeholder; nothing else about botocore's logging changes.

:class:`SecretsManagerPepperSource` keeps the pepper of the keyed hashes (see
:class:`~encx_async.Pepper`) in AWS Secrets Manager, creating it on a
fleet's first boot if asked to; the same filter blanks its ``SecretString``
payloads.

Import these names from this module; docs/architecture.md maps the code behind
them.
"""

from __future__ import annotations

from encx_async.providers._aws_client import Config, RetryMode
from encx_async.providers._kms import KMSService
from encx_async.providers._multi_region import (
    BreakerState,
    MultiRegionKMSService,
    MultiRegionMode,
    MultiRegionStats,
    RegionStats,
    RegionsUnavailableError,
    is_multi_region_key,
)
from encx_async.providers._secrets_manager import SecretsManagerPepperSource

__all__ = [
    "BreakerState",
    "Config",
    "KMSService",
    "MultiRegionKMSService",
    "MultiRegionMode",
    "MultiRegionStats",
    "RegionStats",
    "RegionsUnavailableError",
    "RetryMode",
    "SecretsManagerPepperSource",
    "is_multi_region_key",
]
