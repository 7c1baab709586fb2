"""Keep data keys and secret values out of botocore's debug logs.

At DEBUG level botocore logs every request's parameters and every response
body. For KMS those hold plaintext data keys (``Encrypt``'s ``Plaintext``,
``Decrypt``'s answer); for Secrets Manager, the pepper (``SecretString``,
``SecretBinary``, the ``encx_pepper`` JSON). This filter, attached to those
two botocore loggers by the AWS providers, replaces such records' payloads
with a placeholder. It changes nothing else, and nothing at all unless DEBUG
logging is on.
"""

from __future__ import annotations

import logging
from typing import Final

__all__ = ["install"]

_DATA_KEY_PLACEHOLDER: Final = "<redacted by encx-async: may contain a plaintext data key>"
_VALUE_PLACEHOLDER: Final = "<redacted by encx-async: may contain a secret value>"
# What marks a payload to blank, and what it is replaced with (the first match wins).
_PATTERNS: Final = (
    ("Plaintext", _DATA_KEY_PLACEHOLDER),
    ("SecretString", _VALUE_PLACEHOLDER),
    ("SecretBinary", _VALUE_PLACEHOLDER),
    ("encx_pepper", _VALUE_PLACEHOLDER),
)
_LOGGERS: Final = ("botocore.endpoint", "botocore.parsers")


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_placeholder(a) for a in args):
            record.args = tuple(_placeholder(a) or a for a in args)
        return True


def _placeholder(value: object) -> str | None:
    """What replaces ``value`` in a log record; ``None`` to keep it."""
    if isinstance(value, bytes | bytearray):
        return next((text for marker, text in _PATTERNS if marker.encode() in value), None)
    if isinstance(value, str | dict):
        rendered = str(value)
        return next((text for marker, text in _PATTERNS if marker in rendered), None)
    return None


_FILTER: Final = _Redact()


def install() -> None:
    """Attach the filter (once) to the botocore loggers that print payloads."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
