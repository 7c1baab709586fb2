"""The canonical encoding of field values: round trips, canonical forms, refusals.

The byte vectors pin format version 1: if one fails, the format changed, which
breaks every stored blind index; that needs a new format version instead.
"""

from __future__ import annotations

import datetime as dt
import enum
import typing
import uuid
from collections import namedtuple
from decimal import Decimal
from typing import Annotated, Any, Literal, NewType, Optional, Union
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encx_async import InvalidValueError
from encx_async._values import (
    MAX_DEPTH,
    SUPPORTED_TYPES,
    decode_value,
    encode_value,
    value_type_ok,
)

fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UTC = dt.UTC
SECRET = "s3cret-jane.doe@example.com"

ROUND_TRIPS: list[object] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    127,
    128,
    -128,
    -129,
    2**64,
    -(2**200) + 7,
    0.0,
    1.5,
    -2.25e-300,
    1.7976931348623157e308,
    "",
    "héllo wörld",
    "\U0001f600",
    b"",
    b"\x00\xff",
    dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
    dt.datetime(1, 1, 1, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    dt.datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
    dt.date(1, 1, 1),
    dt.date(2024, 2, 29),
    dt.date(9999, 12, 31),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    Decimal("3.14159"),
    Decimal("-1E+20"),
    Decimal("1E-30"),
    Decimal("12345678901234567890123456789012345678901234567890"),
    [],
    [None, True, 1, "1", b"1", [[], [1.5]]],
]


@pytest.mark.parametrize("value", ROUND_TRIPS, ids=repr)
def test_round_trip(value: object) -> None:
    encoded = encode_value(value)
    decoded = decode_value(encoded)
    assert decoded == value
    assert type(decoded) is type(value)
    assert encode_value(decoded) == encoded


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        (bytearray(b"ab"), b"ab"),
        (memoryview(b"ab"), b"ab"),
        ((1, (2, "x")), [1, [2, "x"]]),
        (-0.0, 0.0),
        (Decimal("1.500"), Decimal("1.5")),
        (Decimal("-0.00"), Decimal("0")),
    ],
    ids=repr,
)
def test_values_decode_as_their_canonical_type(value: object, decoded: object) -> None:
    result = decode_value(encode_value(value))
    assert result == decoded
    assert type(result) is type(decoded)


def test_an_aware_datetime_decodes_in_utc() -> None:
    local = dt.datetime(2024, 6, 1, 12, 0, tzinfo=ZoneInfo("Europe/Paris"))
    decoded = decode_value(encode_value(local))
    assert isinstance(decoded, dt.datetime)
    assert decoded == local
    assert decoded.tzinfo is UTC
    assert decoded.hour == 10


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (-0.0, 0.0),
        (Decimal("1.0"), Decimal("1.00")),
        (Decimal("1"), Decimal("1.000")),
        (Decimal("100"), Decimal("1E+2")),
        (Decimal("0"), Decimal("-0E+5")),
        (
            dt.datetime(2024, 1, 1, 12, tzinfo=UTC),
            dt.datetime(2024, 1, 1, 7, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        ),
        (
            dt.datetime(2024, 7, 1, 0, 0, tzinfo=ZoneInfo("America/New_York")),
            dt.datetime(2024, 7, 1, 6, 0, tzinfo=ZoneInfo("Europe/Paris")),
        ),
        ([1, "a"], (1, "a")),
        (b"xy", bytearray(b"xy")),
    ],
    ids=repr,
)
def test_equal_values_encode_equally(a: object, b: object) -> None:
    assert encode_value(a) == encode_value(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (True, 1),
        (False, 0),
        (1, 1.0),
        (1, Decimal(1)),
        ("1", 1),
        (b"a", "a"),
        ([], None),
        ([], ""),
        ([[]], []),
        ([1, [2]], [[1], 2]),
        ([1, 2], [[1, 2]]),
        (dt.date(2024, 1, 1), dt.datetime(2024, 1, 1, tzinfo=UTC)),
        ("", None),
        (0, None),
    ],
    ids=repr,
)
def test_distinct_values_encode_differently(a: object, b: object) -> None:
    assert encode_value(a) != encode_value(b)


class Colour(enum.IntEnum):
    RED = 1


class Word(enum.StrEnum):
    HELLO = "hello"


class Plain(enum.Enum):
    A = 1


Point = namedtuple("Point", "x y")


class Moment(dt.datetime):
    pass


@pytest.mark.parametrize(
    ("value", "base"),
    [
        (Colour.RED, 1),
        (Word.HELLO, "hello"),
        (Point(1, 2), [1, 2]),
        (Moment(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 1, 1, tzinfo=UTC)),
    ],
    ids=repr,
)
def test_subclasses_encode_as_their_base_type(value: object, base: object) -> None:
    assert encode_value(value) == encode_value(base)
    decoded = decode_value(encode_value(value))
    assert type(decoded) is type(base)


VECTORS: list[tuple[object, str]] = [
    (None, "01 00 00000000"),
    (True, "01 01 00000001 01"),
    (False, "01 01 00000001 00"),
    (0, "01 02 00000001 00"),
    (-129, "01 02 00000002 ff7f"),
    (255, "01 02 00000002 00ff"),
    (1.5, "01 03 00000008 3ff8000000000000"),
    ("héllo", "01 04 00000006 68c3a96c6c6f"),
    (b"\x00\xff", "01 05 00000002 00ff"),
    (dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "01 06 00000008 00060dedc04dd346"),
    (dt.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), "01 06 00000008 fffffffffff0bdc0"),
    (dt.date(2024, 1, 2), "01 07 00000004 000b4647"),
    (uuid.UUID(int=0x0102), "01 08 00000010 00000000000000000000000000000102"),
    (Decimal("-1.200"), "01 09 0000000b 01 ffffffffffffffff 3132"),
    (Decimal("0.00"), "01 09 0000000a 00 0000000000000000 30"),
    ([1, ["a"]], "01 0a 00000002 02 00000001 01 0a 00000001 04 00000001 61"),
]


@pytest.mark.parametrize(("value", "expected"), VECTORS, ids=repr)
def test_byte_vectors(value: object, expected: str) -> None:
    assert encode_value(value).hex() == expected.replace(" ", "")
    assert encode_value(decode_value(bytes.fromhex(expected))) == bytes.fromhex(expected)


# -- refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (dt.datetime(2024, 1, 1), "tzinfo"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (float("-inf"), "finite"),
        (Decimal("NaN"), "finite"),
        (Decimal("sNaN"), "finite"),
        (Decimal("-Infinity"), "finite"),
        ({SECRET}, "set"),
        ({"k": SECRET}, "dict"),
        (object(), "object"),
        (frozenset(), "frozenset"),
        (1j, "complex"),
        ([SECRET, {SECRET: 1}], "dict"),
        ([SECRET, [SECRET, dt.datetime(2024, 1, 1)]], "tzinfo"),
        (Plain.A, "Plain"),
        (SECRET + "\ud800", "surrogate"),
        ([SECRET + "\udfff"], "surrogate"),
        (dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=1))), "UTC"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_unsupported_values_are_refused_without_showing_them(value: object, words: str) -> None:
    with pytest.raises(InvalidValueError) as caught:
        encode_value(value)
    message = str(caught.value)
    assert words in message
    assert SECRET not in message
    assert "s3cret" not in repr(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_lists_nested_too_deep_are_refused_both_ways() -> None:
    deep: list[object] = []
    for _ in range(MAX_DEPTH - 1):
        deep = [deep]
    assert decode_value(encode_value(deep)) == deep  # MAX_DEPTH lists: fine
    too_deep = [deep]
    with pytest.raises(InvalidValueError, match="deep"):
        encode_value(too_deep)
    encoded = b"\x01" + b"\x0a\x00\x00\x00\x01" * (MAX_DEPTH + 1) + b"\x00\x00\x00\x00\x00"
    with pytest.raises(InvalidValueError, match="deep"):
        decode_value(encoded)


def test_a_list_containing_itself_is_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(InvalidValueError, match="deep"):
        encode_value(loop)


@pytest.mark.parametrize(
    "hex_data",
    [
        "",  # empty
        "02 00 00000000",  # unknown version
        "00 00 00000000",  # version zero
        "01",  # no value
        "01 00 000000",  # truncated head
        "01 0b 00000000",  # unknown tag
        "01 ff 00000000",  # unknown tag
        "01 00 00000000 00",  # trailing byte
        "01 00 00000001 00",  # None with a payload
        "01 01 00000001 02",  # bool 2
        "01 01 00000000",  # bool empty
        "01 02 00000000",  # int empty
        "01 02 00000002 0001",  # int not shortest
        "01 02 00000002 ffff",  # negative int not shortest
        "01 03 00000008 8000000000000000",  # -0.0
        "01 03 00000008 7ff8000000000000",  # NaN
        "01 03 00000008 7ff0000000000000",  # inf
        "01 03 00000004 3fc00000",  # float of 4 bytes
        "01 04 00000002 c328",  # invalid UTF-8
        "01 04 00000003 eda080",  # an encoded surrogate
        "01 04 00000002 c0af",  # overlong
        "01 04 00000010 61",  # length beyond the data
        "01 06 00000008 7fffffffffffffff",  # datetime out of range
        "01 06 00000004 00000000",  # datetime of 4 bytes
        "01 07 00000004 00000000",  # date ordinal 0
        "01 07 00000004 ffffffff",  # date ordinal too large
        "01 08 0000000f 000000000000000000000000000000",  # UUID of 15 bytes
        "01 09 0000000a 00 0000000000000000 3130",  # Decimal "10", not normalised
        "01 09 0000000b 00 0000000000000000 3031",  # Decimal leading zero
        "01 09 0000000a 01 0000000000000000 30",  # Decimal -0
        "01 09 0000000a 00 0000000000000001 30",  # Decimal 0E+1
        "01 09 0000000a 02 0000000000000000 31",  # Decimal sign 2
        "01 09 0000000a 00 0000000000000000 41",  # Decimal non-digit
        "01 09 00000009 00 0000000000000000",  # Decimal no digits
        "01 09 0000000a 00 7fffffffffffffff 31",  # Decimal exponent out of range
        "01 0a 00000001",  # list missing its item
        "01 0a ffffffff 00 00000000",  # list count far beyond the data
        "01 0a 00000000 00",  # empty list then a trailing byte
    ],
)
def test_malformed_encodings_are_refused(hex_data: str) -> None:
    with pytest.raises(InvalidValueError, match="not an encx-async encoded value"):
        decode_value(bytes.fromhex(hex_data))


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(InvalidValueError, match="str"):
        decode_value("01 00 00000000")  # type: ignore[arg-type]


@fast
@given(data=st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_invalid_value_error(data: bytes) -> None:
    for candidate in (data, b"\x01" + data):
        try:
            value = decode_value(candidate)
        except InvalidValueError:
            continue
        assert encode_value(value) == candidate  # whatever decodes is canonical


@fast
@given(
    head=st.sampled_from([b"\x01" + bytes([tag]) for tag in range(11)]),
    size=st.integers(0, 40),
    body=st.binary(max_size=48),
)
def test_tagged_garbage_raises_only_invalid_value_error(
    head: bytes, size: int, body: bytes
) -> None:
    candidate = head + size.to_bytes(4, "big") + body
    try:
        value = decode_value(candidate)
    except InvalidValueError:
        return
    assert encode_value(value) == candidate


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.binary()
    | st.datetimes(timezones=st.just(UTC))
    | st.dates()
    | st.uuids()
    | st.decimals(allow_nan=False, allow_infinity=False)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@fast
@given(value=values)
@pytest.mark.slow
def test_any_supported_value_round_trips(value: object) -> None:
    encoded = encode_value(value)
    decoded = decode_value(encoded)
    assert encode_value(decoded) == encoded
    assert decoded == value or (isinstance(value, float) and value == 0.0)


# -- annotations ----------------------------------------------------------------------

UserId = NewType("UserId", int)


@pytest.mark.parametrize(
    "annotation",
    [
        int,
        bool,
        str,
        bytes,
        type(None),
        None,
        dt.datetime,
        dt.date,
        uuid.UUID,
        Decimal,
        Colour,
        Word,
        Moment,
        str | None,
        Optional[int],  # noqa: UP045 (the old spelling is still written)
        Union[int, str],  # noqa: UP007
        Annotated[str, "marker"],
        list[int],
        list[list[str | None]],
        tuple[int, ...],
        tuple[int, str],
        list,
        Literal["a", 1, None],
        UserId,
    ],
    ids=repr,
)
def test_supported_annotations(annotation: object) -> None:
    assert value_type_ok(annotation)


@pytest.mark.parametrize(
    "annotation",
    [
        dict,
        dict[str, int],
        set[int],
        object,
        Any,
        complex,
        enum.Enum,
        list[dict[str, int]],
        int | dict[str, int],
        Literal[1.5j],
        typing.Sequence[int],
        "str",
    ],
    ids=repr,
)
def test_unsupported_annotations(annotation: object) -> None:
    assert not value_type_ok(annotation)


def test_supported_types_all_encode() -> None:
    samples: dict[type, object] = {
        type(None): None,
        bool: True,
        int: 1,
        float: 1.0,
        str: "",
        bytes: b"",
        bytearray: bytearray(),
        memoryview: memoryview(b""),
        dt.datetime: dt.datetime(2024, 1, 1, tzinfo=UTC),
        dt.date: dt.date(2024, 1, 1),
        uuid.UUID: uuid.UUID(int=1),
        Decimal: Decimal(1),
        list: [],
        tuple: (),
    }
    assert set(samples) == SUPPORTED_TYPES
    for tp, sample in samples.items():
        assert type(sample) is tp
        encode_value(sample)
        assert value_type_ok(tp)


def test_a_decimal_beyond_emax_is_refused_on_decode() -> None:
    import decimal as _decimal
    import struct

    # tag 09: sign (1 byte) + i64 exponent + digits; "123" at Emax has an adjusted
    # exponent beyond Emax, which Decimal itself refuses to work with
    payload = struct.pack(">Bq", 0, _decimal.MAX_EMAX) + b"123"
    forged = b"\x01\x09" + len(payload).to_bytes(4, "big") + payload
    with pytest.raises(InvalidValueError):
        decode_value(forged)
