"""Canonical encoding of an encryption context.

The context is a flat ``str -> str`` mapping. It is never secret: the KMS logs
it (CloudTrail shows it in cleartext). Its canonical bytes are authenticated in
every envelope, so key order and Python's dict ordering do not matter.

Encoding, version 1: the pairs sorted by the UTF-8 bytes of their key, each as
``u16 len(key) || key || u16 len(value) || value`` (big-endian). The empty
context encodes to ``b""``.

Keys starting with ``encx:`` are encx-async's own: it adds them to what it sends
the KMS (the KEK version, ``encx:kek-version``), never to the envelope, and
refuses them in a caller's context so that a caller cannot collide with them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ._exceptions import ConfigurationError

__all__ = [
    "RESERVED_PREFIX",
    "VERSION_KEY",
    "Context",
    "decode_context",
    "encode_and_keep",
    "encode_context",
    "encode_kms_context",
    "normalize_context",
]

Context = Mapping[str, str]

#: Context keys encx-async sends to the KMS itself; a caller's context may not use them.
RESERVED_PREFIX = "encx:"
#: The entry that binds a wrapped DEK to its KEK version (see docs/format.md).
VERSION_KEY = RESERVED_PREFIX + "kek-version"

MAX_CONTEXT_BYTES = 8192
_U16 = struct.Struct(">H")
#: an encoding, the validated mapping, and whether it uses a reserved key
_Encoded = tuple[bytes, dict[str, str], bool]
_memo: dict[tuple[tuple[str, str], ...], _Encoded] = {}
_decoded: dict[bytes, dict[str, str]] = {}
_last: _Encoded = (b"", {}, False)
_EMPTY: _Encoded = (b"", {}, False)
_MEMO_LIMIT = 1024


def _encode(items: tuple[tuple[str, str], ...]) -> _Encoded:
    pairs: list[tuple[bytes, bytes]] = []
    reserved = False
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigurationError("encryption context keys and values must be str")
        if not key:
            raise ConfigurationError("encryption context keys must not be empty")
        try:
            pair = (key.encode(), value.encode())
        except UnicodeEncodeError:
            raise ConfigurationError("an encryption context entry is not valid UTF-8") from None
        if len(pair[0]) + len(pair[1]) > MAX_CONTEXT_BYTES:
            raise ConfigurationError(
                f"an encryption context entry is over the {MAX_CONTEXT_BYTES}-byte limit"
            )
        pairs.append(pair)
        reserved = reserved or key.startswith(RESERVED_PREFIX)
    pairs.sort()
    out = bytearray()
    for k, v in pairs:
        out += _U16.pack(len(k)) + k + _U16.pack(len(v)) + v
    if len(out) > MAX_CONTEXT_BYTES:
        raise ConfigurationError(
            f"encryption context is {len(out)} bytes encoded; the limit is {MAX_CONTEXT_BYTES}"
        )
    return bytes(out), dict(items), reserved


def _lookup(context: Context | None) -> _Encoded:
    if not context:
        if context is not None and not isinstance(context, Mapping):
            raise ConfigurationError("an encryption context must be a mapping of str to str")
        return _EMPTY
    global _last
    last = _last
    if context == last[1] and type(context) is dict:
        return last  # a service tends to send the same context many times in a row
    if not isinstance(context, Mapping):
        raise ConfigurationError("an encryption context must be a mapping of str to str")
    items = tuple(context.items())
    # A service sends the same few contexts over and over: remember their encoding.
    try:
        hit = _memo.get(items)
    except TypeError:  # an unhashable value: certainly not a str
        raise ConfigurationError("encryption context keys and values must be str") from None
    if hit is None:
        hit = _encode(items)
        if len(_memo) >= _MEMO_LIMIT:
            _memo.clear()
            _decoded.clear()
        _memo[items] = hit
        _decoded[hit[0]] = hit[1]
    _last = hit
    return hit


def _refuse_reserved() -> None:
    raise ConfigurationError(
        f"encryption context keys starting with {RESERVED_PREFIX!r} are reserved for encx-async"
    )


def encode_context(context: Context | None) -> bytes:
    """The canonical bytes of a caller's ``context``; raises ConfigurationError if it
    is malformed or uses a reserved key."""
    last = _last
    # Runs per message: a repeat is answered without another call.
    hit = last if type(context) is dict and context == last[1] else _lookup(context)
    if hit[2]:
        _refuse_reserved()
    return hit[0]


def encode_kms_context(context: Context | None) -> bytes:
    """The canonical bytes of a context as a KMS receives it: reserved keys allowed."""
    return _lookup(context)[0]


def encode_and_keep(context: Context | None) -> tuple[bytes, object]:
    """The canonical bytes of a caller's ``context``, and an object equal to it that
    no caller can change (None for None): a memo of the context, for free."""
    encoded, validated, reserved = _lookup(context)
    if reserved:
        _refuse_reserved()
    return encoded, None if context is None else validated


def normalize_context(context: Context | None) -> dict[str, str]:
    """A plain dict copy of a validated ``context``, as the KMS wants it."""
    return dict(_lookup(context)[1])


def decode_context(encoded: bytes) -> dict[str, str]:
    """The context whose canonical encoding is ``encoded`` (the inverse of encode_context)."""
    known = _decoded.get(encoded)
    if known is not None:
        return dict(known)
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
