"""Canonical encoding of an encryption context.

The context is a flat ``str -> str`` mapping. It is never secret: the KMS logs
it (CloudTrail shows it in cleartext). Its canonical bytes are authenticated in
every envelope, so key order and Python's dict ordering do not matter.

Encoding, version 1: the pairs sorted by the UTF-8 bytes of their key, each as
``u16 len(key) || key || u16 len(value) || value`` (big-endian). The empty
context encodes to ``b""``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ._exceptions import ConfigurationError

__all__ = [
    "RESERVED_PREFIX",
    "VERSION_KEY",
    "Context",
    "ContextMemo",
    "decode_context",
    "encode_context",
    "encode_kms_context",
    "normalize_context",
]

Context = Mapping[str, str]

#: Context keys that only encx-async itself may send to the KMS.
RESERVED_PREFIX = "encx:"
#: The entry that binds a wrapped DEK to its KEK version (see docs/format.md).
VERSION_KEY = RESERVED_PREFIX + "kek-version"

MAX_CONTEXT_BYTES = 8192
_U16 = struct.Struct(">H")


def _encode(items: tuple[tuple[str, str], ...]) -> tuple[bytes, dict[str, str], bool]:
    """The canonical bytes, the validated mapping, and whether a key is reserved."""
    pairs: list[tuple[bytes, bytes]] = []
    reserved = False
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigurationError("encryption context keys and values must be str")
        if not key:
            raise ConfigurationError("encryption context keys must not be empty")
        reserved = reserved or key.startswith(RESERVED_PREFIX)
        try:
            pair = (key.encode(), value.encode())
        except UnicodeEncodeError:
            raise ConfigurationError("an encryption context entry is not valid UTF-8") from None
        if len(pair[0]) + len(pair[1]) > MAX_CONTEXT_BYTES:
            raise ConfigurationError(
                f"an encryption context entry is over the {MAX_CONTEXT_BYTES}-byte limit"
            )
        pairs.append(pair)
    pairs.sort()
    out = bytearray()
    for k, v in pairs:
        out += _U16.pack(len(k)) + k + _U16.pack(len(v)) + v
    if len(out) > MAX_CONTEXT_BYTES:
        raise ConfigurationError(
            f"encryption context is {len(out)} bytes encoded; the limit is {MAX_CONTEXT_BYTES}"
        )
    return bytes(out), dict(items), reserved


def _refuse_reserved() -> None:
    raise ConfigurationError(
        f"encryption context keys starting with {RESERVED_PREFIX!r} are reserved for encx-async"
    )


def _items(context: Context | None) -> tuple[tuple[str, str], ...]:
    if context is None:
        return ()
    if not isinstance(context, Mapping):
        raise ConfigurationError("an encryption context must be a mapping of str to str")
    return tuple(context.items())


def encode_context(context: Context | None) -> bytes:
    """The canonical bytes of a caller's ``context``; raises ConfigurationError if it
    is malformed or uses a reserved key."""
    encoded, _, reserved = _encode(_items(context))
    if reserved:
        _refuse_reserved()
    return encoded


def encode_kms_context(context: Context | None) -> bytes:
    """The canonical bytes of a context as a KMS receives it: reserved keys allowed."""
    return _encode(_items(context))[0]


def normalize_context(context: Context | None) -> dict[str, str]:
    """A plain dict copy of a validated context, as the KMS wants it (reserved keys allowed)."""
    return _encode(_items(context))[1]


def decode_context(encoded: bytes) -> dict[str, str]:
    """The context whose canonical encoding is ``encoded`` (the inverse of encode_context)."""
    out: dict[str, str] = {}
    view, at = memoryview(encoded), 0
    while at < len(view):
        (klen,) = _U16.unpack_from(view, at)
        key = bytes(view[at + 2 : at + 2 + klen]).decode()
        at += 2 + klen
        (vlen,) = _U16.unpack_from(view, at)
        out[key] = bytes(view[at + 2 : at + 2 + vlen]).decode()
        at += 2 + vlen
    return out


class ContextMemo:
    """The encodings of the contexts one Crypto has seen, up to ``limit`` of them.

    A service sends the same few contexts (its tenants, say) over and over;
    encoding one costs more than the AES-GCM of a small message, so each is
    encoded once. The memo is cleared, not trimmed, when full: a service with
    more distinct contexts than that gains little from it anyway.
    """

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int = 1024) -> None:
        self._limit = limit
        self._seen: dict[tuple[tuple[str, str], ...], tuple[bytes, dict[str, str]]] = {}

    def encode(self, context: Context | None) -> tuple[bytes, Context | None]:
        """The canonical bytes of ``context``, and an equal mapping no caller can
        change (None for None), for the fast path to compare later contexts with.
        A caller's context: reserved keys are refused."""
        if not context:
            if context is not None and not isinstance(context, Mapping):
                raise ConfigurationError("an encryption context must be a mapping of str to str")
            return b"", None if context is None else {}
        items = _items(context)
        try:
            known = self._seen.get(items)
        except TypeError:  # an unhashable value: certainly not a str
            raise ConfigurationError("encryption context keys and values must be str") from None
        if known is None:
            encoded, validated, reserved = _encode(items)
            if reserved:
                _refuse_reserved()
            known = encoded, validated
            if len(self._seen) >= self._limit:
                self._seen.clear()
            self._seen[items] = known
        return known
