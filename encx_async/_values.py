"""Canonical, typed, versioned bytes of a field value. Pure: no I/O.

A field value is encoded before it is hashed or encrypted, so that equal values
give equal bytes (a blind index matches) and values of different types never
do (``True``, ``1``, ``1.0``, ``"1"`` and ``Decimal(1)`` are five encodings).

Version 1, all integers big-endian::

    offset  size  field
    0       1     format version (1)
    1       ...   one tagged value

    tagged value: tag(1) || u32 length || payload   (every tag but list)
                  tag(1) || u32 count  || count tagged values   (list)

    tag   type       payload
    0x00  None       empty
    0x01  bool       one byte, 0x00 or 0x01
    0x02  int        signed two's complement, shortest form (0 is b"\\x00")
    0x03  float      IEEE 754 binary64; finite; -0.0 is stored as 0.0
    0x04  str        UTF-8 (no lone surrogates)
    0x05  bytes      the bytes (bytearray and memoryview too; decoded as bytes)
    0x06  datetime   i64 microseconds since 1970-01-01T00:00:00Z (aware only)
    0x07  date       u32 proleptic Gregorian ordinal (date.toordinal())
    0x08  UUID       16 bytes
    0x09  Decimal    sign(1) || i64 exponent || ASCII digits, trailing zeros
                     moved into the exponent; zero is 0x00 || 0 || b"0"
    0x0A  list       (the count replaces the length) lists and tuples, nested
                     at most MAX_DEPTH deep; decoded as list

Every value has exactly one encoding, and :func:`decode_value` accepts only
that one (a non-shortest int, a -0.0, a Decimal with trailing zeros, trailing
bytes: all refused), so decoding and re-encoding gives the same bytes.

Subclasses encode as their base type and decode as it: an ``IntEnum`` member as
its int, a ``StrEnum`` member as its str, a namedtuple as a list, a datetime
subclass as a datetime. A plain :class:`enum.Enum` is refused. Errors name the
type of the offending value, never the value: field values are personal data.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import struct
import types
import typing
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Final

from ._exceptions import InvalidValueError

__all__ = [
    "FORMAT_VERSION",
    "MAX_DEPTH",
    "SUPPORTED_TYPES",
    "decode_value",
    "encode_value",
    "value_type_ok",
]

FORMAT_VERSION: Final = 1
#: lists nested deeper than this are refused, when encoding and decoding
MAX_DEPTH: Final = 32

# The scalar classes a subclass is classified by, checked in this order, so a
# datetime is never taken for a date (bool cannot be subclassed, and exact bools
# never get here).
_BASES: tuple[type, ...] = (
    int,
    float,
    str,
    bytes,
    bytearray,
    memoryview,
    dt.datetime,
    dt.date,
    uuid.UUID,
    Decimal,
)

#: The classes a field may hold (subclasses of these, bool aside, are accepted too).
SUPPORTED_TYPES: Final[frozenset[type]] = frozenset({type(None), bool, *_BASES, list, tuple})

TAG_NONE: Final = 0x00
TAG_BOOL: Final = 0x01
TAG_INT: Final = 0x02
TAG_FLOAT: Final = 0x03
TAG_STR: Final = 0x04
TAG_BYTES: Final = 0x05
TAG_DATETIME: Final = 0x06
TAG_DATE: Final = 0x07
TAG_UUID: Final = 0x08
TAG_DECIMAL: Final = 0x09
TAG_LIST: Final = 0x0A

_HEAD = struct.Struct(">BI")  # tag, length (or count)
_F64 = struct.Struct(">d")
_I64 = struct.Struct(">q")
_U32 = struct.Struct(">I")
_DECIMAL_HEAD = struct.Struct(">Bq")
_MAX_LEN = 0xFFFFFFFF
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_US = dt.timedelta(microseconds=1)
# The instants a UTC datetime can hold: an aware datetime whose offset pushes it
# past year 1 or 9999 in UTC could be encoded but never decoded, so it is refused.
_MIN_US = (dt.datetime.min.replace(tzinfo=dt.UTC) - _EPOCH) // _ONE_US
_MAX_US = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // _ONE_US
_MIN_ORDINAL = dt.date.min.toordinal()
_MAX_ORDINAL = dt.date.max.toordinal()
# Decimal((sign, digits, exponent)) refuses exponents outside these, whatever the context.
_MIN_EXPONENT = decimal.MIN_ETINY
_MAX_EXPONENT = decimal.MAX_EMAX
_DIGITS = b"0123456789"
_NO_DIGITS = bytes.maketrans(b"", b"")


def _fail(what: str) -> typing.NoReturn:
    raise InvalidValueError(what) from None


def _int_payload(value: int) -> bytes:
    length = ((value if value >= 0 else ~value).bit_length() + 8) // 8
    return int.to_bytes(value, length, "big", signed=True)


def _str_payload(value: str) -> bytes:
    try:
        return str.encode(value, "utf-8")
    except UnicodeEncodeError:
        _fail("a str holding a lone surrogate cannot be encoded as UTF-8")


def _float_payload(value: float) -> bytes:
    if not math.isfinite(value):
        _fail("a float must be finite: NaN and infinities cannot be encoded")
    return _F64.pack(value if value else 0.0)  # -0.0 == 0.0, so one encoding for both


def _datetime_payload(value: dt.datetime) -> bytes:
    if value.utcoffset() is None:
        _fail(
            "a naive datetime cannot be encoded: attach a tzinfo, "
            "e.g. datetime.now(timezone.utc) or value.replace(tzinfo=...)"
        )
    micros = (value - _EPOCH) // _ONE_US
    if not _MIN_US <= micros <= _MAX_US:
        _fail("an aware datetime outside the years 1 to 9999 in UTC cannot be encoded")
    return _I64.pack(micros)


def _decimal_payload(value: Decimal) -> bytes:
    if not value.is_finite():
        _fail("a Decimal must be finite: NaN and infinities cannot be encoded")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    # Normalised by hand: Decimal.normalize() rounds to the context's precision.
    text = bytes(48 + d for d in digits).lstrip(b"0")
    if not text:
        return _DECIMAL_HEAD.pack(0, 0) + b"0"  # 0 == -0 == 0E+5 == 0.00
    stripped = text.rstrip(b"0")
    exponent += len(text) - len(stripped)
    # The same bound decode applies: the adjusted exponent stays within Emax.
    if not _MIN_EXPONENT <= exponent <= _MAX_EXPONENT - len(stripped) + 1:
        _fail("a Decimal with an exponent this large cannot be encoded")
    return _DECIMAL_HEAD.pack(sign, exponent) + stripped


def _tagged(tag: int, payload: bytes) -> bytes:
    if len(payload) > _MAX_LEN:
        _fail(f"a value over {_MAX_LEN:,} bytes encoded cannot be encoded")
    return _HEAD.pack(tag, len(payload)) + payload


# Exact types first, by dictionary lookup; subclasses are found by _classify.
_SCALARS: dict[type, tuple[int, Callable[[typing.Any], bytes]]] = {
    bool: (TAG_BOOL, lambda v: b"\x01" if v else b"\x00"),
    int: (TAG_INT, _int_payload),
    float: (TAG_FLOAT, _float_payload),
    str: (TAG_STR, _str_payload),
    bytes: (TAG_BYTES, bytes),
    bytearray: (TAG_BYTES, bytes),
    memoryview: (TAG_BYTES, bytes),
    dt.datetime: (TAG_DATETIME, _datetime_payload),
    dt.date: (TAG_DATE, lambda v: _U32.pack(dt.date.toordinal(v))),
    uuid.UUID: (TAG_UUID, lambda v: int.to_bytes(v.int, 16, "big")),
    Decimal: (TAG_DECIMAL, _decimal_payload),
}


def _classify(value: object) -> tuple[int, Callable[[typing.Any], bytes]] | None:
    for base in _BASES:
        if isinstance(value, base):
            return _SCALARS[base]
    return None


def _encode(value: object, out: list[bytes], depth: int) -> None:
    kind = type(value)
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        tag, payload = scalar
        out.append(_tagged(tag, payload(value)))
    elif value is None:
        out.append(b"\x00\x00\x00\x00\x00")
    elif isinstance(value, list | tuple):
        if depth >= MAX_DEPTH:
            _fail(f"lists nested more than {MAX_DEPTH} deep cannot be encoded")
        out.append(_HEAD.pack(TAG_LIST, len(value)))
        for item in value:
            _encode(item, out, depth + 1)
    else:
        found = _classify(value)
        if found is None:
            _fail(
                f"a value of type {kind.__qualname__} cannot be encoded; supported are None, "
                "bool, int, float, str, bytes, datetime (aware), date, UUID, Decimal "
                "and lists of them"
            )
        tag, payload = found
        out.append(_tagged(tag, payload(value)))


def encode_value(value: object) -> bytes:
    """The canonical bytes of ``value``; raises InvalidValueError for what has none."""
    kind = type(value)
    if kind is str:  # the common case of a blind index, in one step
        try:
            data = str.encode(value, "utf-8")  # type: ignore[arg-type]
        except UnicodeEncodeError:
            _fail("a str holding a lone surrogate cannot be encoded as UTF-8")
        return b"\x01\x04" + _U32.pack(len(data)) + data
    out = [b"\x01"]
    _encode(value, out, 0)
    return b"".join(out)


# -- decoding ----------------------------------------------------------------------


def _bad(what: str) -> typing.NoReturn:
    raise InvalidValueError(f"not an encx-async encoded value: {what}") from None


def _decode_int(p: bytes) -> int:
    value = int.from_bytes(p, "big", signed=True)
    if len(p) != ((value if value >= 0 else ~value).bit_length() + 8) // 8:
        _bad("an int not in its shortest form")
    return value


def _decode_float(p: bytes) -> float:
    if len(p) != 8:
        _bad("a float of the wrong size")
    (value,) = _F64.unpack(p)
    if not math.isfinite(value) or (value == 0 and math.copysign(1.0, value) < 0):
        _bad("a float that is not finite, or a negative zero")
    return float(value)


def _decode_bool(p: bytes) -> bool:
    if p == b"\x01":
        return True
    if p == b"\x00":
        return False
    _bad("a bool that is not 0 or 1")


def _decode_none(p: bytes) -> None:
    if p:
        _bad("a None with a payload")


def _decode_str(p: bytes) -> str:
    try:
        return p.decode("utf-8")
    except UnicodeDecodeError:
        _bad("a str that is not valid UTF-8")


def _decode_datetime(p: bytes) -> dt.datetime:
    if len(p) != 8:
        _bad("a datetime of the wrong size")
    (micros,) = _I64.unpack(p)
    if not _MIN_US <= micros <= _MAX_US:
        _bad("a datetime out of range")
    return _EPOCH + dt.timedelta(microseconds=micros)


def _decode_date(p: bytes) -> dt.date:
    if len(p) != 4:
        _bad("a date of the wrong size")
    (ordinal,) = _U32.unpack(p)
    if not _MIN_ORDINAL <= ordinal <= _MAX_ORDINAL:
        _bad("a date out of range")
    return dt.date.fromordinal(ordinal)


def _decode_uuid(p: bytes) -> uuid.UUID:
    if len(p) != 16:
        _bad("a UUID of the wrong size")
    return uuid.UUID(bytes=p)


def _decode_decimal(p: bytes) -> Decimal:
    if len(p) < _DECIMAL_HEAD.size + 1:
        _bad("a Decimal too short")
    sign, exponent = _DECIMAL_HEAD.unpack_from(p)
    digits = p[_DECIMAL_HEAD.size :]
    if digits.translate(_NO_DIGITS, _DIGITS):
        _bad("a Decimal with a non-digit")
    if digits == b"0":
        if sign or exponent:
            _bad("a Decimal zero not in its one form")
        return Decimal(0)
    if sign > 1 or digits[0] == 48 or digits[-1] == 48:
        _bad("a Decimal not in its normalised form")
    if not _MIN_EXPONENT <= exponent <= _MAX_EXPONENT - len(digits) + 1:
        _bad("a Decimal exponent out of range")
    return Decimal((sign, tuple(d - 48 for d in digits), exponent))


_DECODERS: dict[int, Callable[[bytes], object]] = {
    TAG_NONE: _decode_none,
    TAG_BOOL: _decode_bool,
    TAG_INT: _decode_int,
    TAG_FLOAT: _decode_float,
    TAG_STR: _decode_str,
    TAG_BYTES: bytes,
    TAG_DATETIME: _decode_datetime,
    TAG_DATE: _decode_date,
    TAG_UUID: _decode_uuid,
    TAG_DECIMAL: _decode_decimal,
}


def _decode(data: bytes, at: int, depth: int) -> tuple[object, int]:
    if len(data) - at < _HEAD.size:
        _bad("truncated")
    tag, size = _HEAD.unpack_from(data, at)
    at += _HEAD.size
    if tag == TAG_LIST:
        if depth >= MAX_DEPTH:
            _bad(f"lists nested more than {MAX_DEPTH} deep")
        if size * _HEAD.size > len(data) - at:  # every item takes at least a head
            _bad("a list longer than the data")
        items: list[object] = []
        for _ in range(size):
            item, at = _decode(data, at, depth + 1)
            items.append(item)
        return items, at
    decoder = _DECODERS.get(tag)
    if decoder is None:
        _bad(f"unknown type tag {tag}")
    end = at + size
    if end > len(data):
        _bad("truncated")
    return decoder(data[at:end]), end


def decode_value(data: bytes) -> object:
    """The value whose canonical encoding is ``data`` (the inverse of encode_value).

    Raises InvalidValueError, and nothing else, for bytes that are not exactly one
    canonical encoding.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidValueError(f"encoded values are bytes, not {type(data).__name__}")
    data = bytes(data)
    if data[:1] != b"\x01":
        _bad("empty" if not data else f"unknown format version {data[0]}")
    value, end = _decode(data, 1, 0)
    if end != len(data):
        _bad("trailing bytes")
    return value


# -- annotations -------------------------------------------------------------------

_ANY_ITEMS = (list, tuple)


def value_type_ok(tp: object) -> bool:
    """Whether a field annotated ``tp`` can only hold values :func:`encode_value` takes.

    Understands classes (subclasses of :data:`SUPPORTED_TYPES`; a plain Enum is
    not one), ``None``, ``X | Y``, ``Optional[X]``, ``Union[...]``,
    ``Annotated[X, ...]``, ``Literal[...]``, ``NewType``, ``list[X]`` and
    ``tuple[X, ...]`` / ``tuple[X, Y]``. ``Any`` and ``object`` are not: they
    promise nothing. A bare ``list`` or ``tuple`` is accepted; its items are
    checked when encoded.
    """
    return _type_ok(tp, 0)


def _type_ok(tp: object, depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    if tp is None or tp is type(None):
        return True
    supertype = getattr(tp, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return _type_ok(supertype, depth + 1)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_ok(args[0], depth + 1)
    if origin is typing.Union or origin is types.UnionType:
        return all(_type_ok(arg, depth + 1) for arg in args)
    if origin is typing.Literal:
        try:
            for arg in args:
                encode_value(arg)
        except InvalidValueError:
            return False
        return True
    if origin is list or origin is tuple:
        return all(_type_ok(arg, depth + 1) for arg in args if arg is not Ellipsis)
    if origin is not None or not isinstance(tp, type):
        return False
    return tp is bool or (
        issubclass(tp, _ANY_ITEMS) or any(issubclass(tp, base) for base in _BASES)
    )
