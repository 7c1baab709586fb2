"""Keep data keys out of botocore's debug logs.

At DEBUG level botocore logs every request's parameters and every response
body. For KMS those hold plaintext data keys (``Encrypt``'s ``Plaintext``,
``Decrypt``'s answer). This filter, attached to those two botocore loggers by
the AWS provider, replaces such records' payloads with a placeholder. It
changes nothing else, and nothing at all unless DEBUG logging is on.
"""

from __future__ import annotations

import logging

__all__ = ["install"]

_PLACEHOLDER = "<redacted by encx-async: may contain a plaintext data key>"
_LOGGERS = ("botocore.endpoint", "botocore.parsers")


class _RedactPlaintext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(_carries_plaintext(a) for a in args):
            record.args = tuple(_PLACEHOLDER if _carries_plaintext(a) else a for a in args)
        return True


def _carries_plaintext(value: object) -> bool:
    if isinstance(value, bytes | bytearray):
        return b"Plaintext" in value
    if isinstance(value, dict):
        body = value.get("body")
        return (isinstance(body, dict) and "Plaintext" in body) or "Plaintext" in str(value)
    return False


_FILTER = _RedactPlaintext()


def install() -> None:
    """Attach the filter (once) to the botocore loggers that print payloads."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
