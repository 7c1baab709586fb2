"""Field-level encryption of dataclasses and pydantic v2 models (see ``docs/models.md``).

A field is marked through :data:`typing.Annotated`::

    email: Annotated[str, Encrypt(), HashBasic()]

and :func:`encrypt_model` turns an instance into an :class:`EncryptedRecord`, the
storable form: plain fields unchanged, ``<name>_encrypted`` (base64), ``<name>_hash``
(:meth:`Crypto.hash_basic`, in the field's domain), ``<name>_hash_secure``
(:meth:`Crypto.hash_secure`) and one metadata column ``encx``. All encrypted
fields of one record are sealed by one :meth:`Crypto.seal_record` call, so a
record stores one wrapped DEK, each field's ciphertext bound to its field name,
and all of them to the model's name, the list of encrypted fields and
(optionally) the record's id.

Decisions worth knowing (the docs say the same):

* ``None`` in an ``Encrypt`` field is sealed like any other value: the column is
  never NULL, so nobody with write access to the table can erase a value
  unnoticed. A hash of ``None`` is ``None`` (a NULL column): no lookup finds it.
* A field that is only hashed keeps no plaintext; it must declare a default (the
  restored model gets it), which is checked when the model is first inspected.
* ``Encrypt`` together with ``HashBasic`` is checked on decrypt: the stored hash
  must be the decrypted value's, so a row cannot be made to answer lookups for
  another value.
* A ``HashBasic`` field's blind-index domain is ``(model name, field name)``,
  the model name being the one records are bound to (``__encx_name__``, else
  the qualified name), so that pinning that name for a class rename keeps its
  indexes too; ``HashBasic(domain=...)`` pins a field's domain outright.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as _dt
import json
import struct
import sys
import types
import typing
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar, Union
from uuid import UUID

from ._envelope import SealedRecord, parse_record_header
from ._exceptions import (
    ConfigurationError,
    DecryptionError,
    InvalidHashError,
    InvalidValueError,
    ModelDefinitionError,
)
from ._hashing import Domain, domain_purpose
from ._ordered import ordered_list
from ._values import SUPPORTED_TYPES, decode_value, encode_value

if TYPE_CHECKING:
    from ._context import Context
    from ._crypto import Crypto

__all__ = [
    "RECORD_FORMAT_VERSION",
    "Encrypt",
    "EncryptedRecord",
    "HashBasic",
    "HashSecure",
    "blind_index",
    "decrypt_model",
    "decrypt_models",
    "encrypt_model",
    "encrypt_models",
]

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")

#: the version of the record layout, stored in ``encx["v"]``
RECORD_FORMAT_VERSION = 1
#: the metadata column of every record
META_COLUMN = "encx"
ENCRYPTED_SUFFIX = "_encrypted"
HASH_SUFFIX = "_hash"
HASH_SECURE_SUFFIX = "_hash_secure"
_META_KEYS = frozenset({"v", "model", "header", "fields"})
_MIN_FIELD_BODY = 12 + 16  # nonce + tag
_AAD_MAGIC = b"encx-async model record\x00"
_U32 = struct.Struct(">I")
NoneType = type(None)


# -- markers ---------------------------------------------------------------------------


class _Marker:
    """A field marker: immutable, equal to every marker of its kind (a HashBasic: of its domain)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Marker):
            return NotImplemented
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self).__name__)


class Encrypt(_Marker):
    """Store the field only as ciphertext, in the column ``<name>_encrypted``."""

    __slots__ = ()


class HashBasic(_Marker):
    """Store a keyed hash (a blind index) in ``<name>_hash``: equal values, equal hashes,
    so rows can be looked up by value. Without ``Encrypt()`` no plaintext is kept.

    The index is keyed for its *domain*, by default ``(model name, field name)``
    (the model name is ``__encx_name__`` if the class sets one, else its
    qualified name), so equal values in two fields give unrelated hashes.
    ``domain`` (a str, or a tuple of strs) pins it: to keep a renamed field's
    hashes, ``HashBasic(domain=("User", "old_name"))``, or to give two fields one
    domain on purpose (equal values then match across them).
    """

    __slots__ = ("_domain",)

    def __init__(self, *, domain: Domain | None = None) -> None:
        if domain is not None:
            try:
                domain_purpose(domain)
            except ConfigurationError as exc:
                raise ModelDefinitionError(f"HashBasic(domain=...): {exc}") from None
        self._domain = domain

    @property
    def domain(self) -> Domain | None:
        """The pinned domain, or None for the default ``(model name, field name)``."""
        return self._domain

    def __repr__(self) -> str:
        return "HashBasic()" if self._domain is None else f"HashBasic(domain={self._domain!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Marker):
            return NotImplemented
        return isinstance(other, HashBasic) and other._domain == self._domain

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._domain))


class HashSecure(_Marker):
    """Store an Argon2id hash in ``<name>_hash_secure``, for values that are only ever
    verified (passwords). Without ``Encrypt()`` no plaintext is kept."""

    __slots__ = ()


# -- inspection ------------------------------------------------------------------------

_SCALAR_NAMES = {
    str: "str",
    bytes: "bytes",
    bool: "bool",
    int: "int",
    float: "float",
    Decimal: "Decimal",
    UUID: "UUID",
    _dt.datetime: "datetime",
    _dt.date: "date",
}
#: what a value of a declared scalar type may be at run time
_RUNTIME_TYPES: dict[type, tuple[type, ...]] = {
    str: (str,),
    bytes: (bytes,),
    bool: (bool,),
    int: (int,),
    float: (float, int),
    Decimal: (Decimal,),
    UUID: (UUID,),
    _dt.datetime: (_dt.datetime,),
    _dt.date: (_dt.date,),
}


@dataclasses.dataclass(frozen=True, slots=True)
class _ValueType:
    """A supported field type: a scalar, or a list of one, either possibly optional."""

    scalar: type
    is_list: bool
    optional: bool
    item_optional: bool

    @property
    def label(self) -> str:
        name = _SCALAR_NAMES.get(self.scalar, self.scalar.__name__)
        if self.item_optional:
            name += " | None"
        if self.is_list:
            name = f"list[{name}]"
        return f"{name} | None" if self.optional else name

    def accepts(self, value: object) -> bool:
        if value is None:
            return self.optional
        if not self.is_list:
            return self._scalar_ok(value)
        if type(value) is not list:
            return False
        return all((item is None and self.item_optional) or self._scalar_ok(item) for item in value)

    def _scalar_ok(self, value: object) -> bool:
        if self.scalar in (int, float) and isinstance(value, bool):
            return False  # True is an int to Python, but not the int a field declares
        if self.scalar is _dt.date and isinstance(value, _dt.datetime):
            return False  # a date field holding an instant would hash unlike its date
        return isinstance(value, _RUNTIME_TYPES.get(self.scalar, (self.scalar,)))

    def coerce(self, value: object) -> object:
        """An accepted value as the declared type, so it encodes and hashes as one.

        The one widening allowed is int to float (``x: float = 1``): 1 and 1.0
        must give the same ciphertext type and the same blind index.
        """
        if self.scalar is not float:
            return value
        if self.is_list and type(value) is list:
            return [float(v) if type(v) is int else v for v in value]
        return float(value) if isinstance(value, int) else value


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str
    #: the key the model's constructor (or pydantic validation) takes it by
    init_key: str
    encrypt: bool
    hash_kind: type[HashBasic] | type[HashSecure] | None
    value_type: _ValueType | None  # None for plain fields: they pass through unchecked
    domain: Domain | None = None  # a HashBasic field's blind-index domain

    @property
    def plain(self) -> bool:
        return not self.encrypt and self.hash_kind is None

    @property
    def hash_column(self) -> str | None:
        if self.hash_kind is HashBasic:
            return self.name + HASH_SUFFIX
        if self.hash_kind is HashSecure:
            return self.name + HASH_SECURE_SUFFIX
        return None

    def columns(self) -> list[str]:
        if self.plain:
            return [self.name]
        out = [self.name + ENCRYPTED_SUFFIX] if self.encrypt else []
        hash_column = self.hash_column
        if hash_column is not None:
            out.append(hash_column)
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class _ModelSpec:
    qualname: str  # the class's, for messages (the class itself is not kept: weak cache)
    name: str  # what records are bound to: ``__encx_name__`` or the qualified name
    is_pydantic: bool
    fields: tuple[_Field, ...]
    encrypted: tuple[str, ...]  # the Encrypt fields, in declaration order
    columns: frozenset[str]  # every column of a record, ``encx`` included

    def label(self, field: str) -> str:
        return f"{self.qualname}.{field}"


_specs: weakref.WeakKeyDictionary[type, _ModelSpec] = weakref.WeakKeyDictionary()


def inspect_model(cls: type) -> _ModelSpec:
    """The model's field plan, computed once per class (weakly cached).

    Raises :class:`ModelDefinitionError` for an unsupported field type or a bad
    marker combination, naming the class and the field.
    """
    spec = _specs.get(cls)
    if spec is None:
        spec = _specs[cls] = _inspect(cls)
    return spec


def _pydantic_base() -> type | None:
    """``pydantic.BaseModel`` if pydantic has been imported; a model cannot exist otherwise."""
    module = sys.modules.get("pydantic")
    if module is None:
        return None
    base: type | None = getattr(module, "BaseModel", None)
    return base


def _is_pydantic_model(cls: type) -> bool:
    base = _pydantic_base()
    return base is not None and isinstance(cls, type) and issubclass(cls, base)


def _inspect(cls: object) -> _ModelSpec:
    if not isinstance(cls, type):
        raise ModelDefinitionError(f"a model must be a class, not {type(cls).__name__}")
    where = cls.__qualname__
    name = getattr(cls, "__encx_name__", None)
    if name is None:
        name = cls.__qualname__
    elif not isinstance(name, str) or not name:
        raise ModelDefinitionError(f"{where}.__encx_name__ must be a non-empty str")
    raw: list[tuple[str, str, object, list[object], bool, bool]]
    # (name, init key, annotation, Annotated metadata, has a default, in __init__)
    if _is_pydantic_model(cls):
        is_pydantic = True
        raw = [_pydantic_field(cls, n, info) for n, info in cls.model_fields.items()]  # type: ignore[attr-defined]
    elif dataclasses.is_dataclass(cls):
        is_pydantic = False
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception as exc:  # NameError for a forward reference, mostly
            raise ModelDefinitionError(
                f"cannot resolve the field types of {where}: {type(exc).__name__}: {exc}"
            ) from exc
        raw = []
        for f in dataclasses.fields(cls):
            has_default = (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            annotation, metadata = _split_annotated(hints.get(f.name, Any))
            raw.append((f.name, f.name, annotation, metadata, has_default, f.init))
    else:
        raise ModelDefinitionError(f"{where} is neither a dataclass nor a pydantic BaseModel")

    fields: list[_Field] = []
    for field_name, init_key, annotation, metadata, has_default, init in raw:
        label = f"{where}.{field_name}"
        markers = [m for m in metadata if isinstance(m, _Marker)]
        # Markers may also sit on an Optional's member: Optional[Annotated[str, Encrypt()]].
        annotation, inner = _unwrap_optional_markers(annotation, label)
        markers += inner
        _check_no_nested_markers(annotation, label)
        encrypt, hash_kind, pinned = _combine(markers, label)
        value_type = None
        if encrypt or hash_kind is not None:
            value_type = _value_type(annotation, label)
            if not init:
                raise ModelDefinitionError(f"{label}: a field with init=False cannot be marked")
            if not encrypt and not has_default:
                raise ModelDefinitionError(
                    f"{label}: a {hash_kind.__name__ if hash_kind else ''}-only field keeps no "
                    "plaintext, so it must have a default for the decrypted model "
                    "(for example `= None` with a `| None` type)"
                )
        elif not init:
            continue  # derived in __post_init__: not part of the record
        domain = None
        if hash_kind is HashBasic:
            domain = (name, field_name) if pinned is None else pinned
        fields.append(_Field(field_name, init_key, encrypt, hash_kind, value_type, domain))

    columns: dict[str, str] = {}
    for field in fields:
        if field.plain and field.name.endswith(ENCRYPTED_SUFFIX):
            raise ModelDefinitionError(
                f"{where}.{field.name}: names ending in {ENCRYPTED_SUFFIX!r} are reserved for "
                "the columns of Encrypt() fields"
            )
        for column in field.columns():
            if column == META_COLUMN:
                raise ModelDefinitionError(
                    f"{where}.{field.name}: the column {META_COLUMN!r} is reserved for the "
                    "record's metadata"
                )
            if column in columns:
                raise ModelDefinitionError(
                    f"{where}.{field.name}: its column {column!r} collides with {columns[column]}"
                )
            columns[column] = f"{where}.{field.name}"
    encrypted = tuple(f.name for f in fields if f.encrypt)
    return _ModelSpec(
        qualname=where,
        name=name,
        is_pydantic=is_pydantic,
        fields=tuple(fields),
        encrypted=encrypted,
        columns=frozenset([*columns, META_COLUMN]),
    )


def _pydantic_field(
    cls: type, name: str, info: Any
) -> tuple[str, str, object, list[object], bool, bool]:
    alias = info.validation_alias
    if alias is None:
        alias = info.alias
    if alias is not None and not isinstance(alias, str):
        choices = getattr(alias, "choices", None)  # AliasChoices: take the first plain name
        first = choices[0] if choices else None
        if not isinstance(first, str):
            raise ModelDefinitionError(
                f"{cls.__qualname__}.{name}: only a plain str alias is supported, not "
                f"{type(alias).__name__}"
            )
        alias = first
    annotation, metadata = _split_annotated(info.annotation)
    return (
        name,
        alias or name,
        annotation,
        [*info.metadata, *metadata],
        not info.is_required(),
        True,
    )


def _split_annotated(annotation: object) -> tuple[object, list[object]]:
    if typing.get_origin(annotation) is Annotated:
        return annotation.__origin__, list(annotation.__metadata__)  # type: ignore[attr-defined]
    return annotation, []


def _is_union(annotation: object) -> bool:
    origin = typing.get_origin(annotation)
    return origin is Union or origin is types.UnionType


def _unwrap_optional_markers(annotation: object, label: str) -> tuple[object, list[_Marker]]:
    """Pull markers off the members of a top-level union; returns the bare union too."""
    if not _is_union(annotation):
        return annotation, []
    markers: list[_Marker] = []
    members: list[object] = []
    for member in typing.get_args(annotation):
        bare, metadata = _split_annotated(member)
        markers += [m for m in metadata if isinstance(m, _Marker)]
        members.append(bare)
    if not markers:
        return annotation, []
    rebuilt: object = members[0]
    for member in members[1:]:
        rebuilt = Union[rebuilt, member]  # noqa: UP007 (members are runtime objects)
    return rebuilt, markers


def _check_no_nested_markers(annotation: object, label: str) -> None:
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Annotated and any(
            isinstance(m, _Marker) for m in arg.__metadata__
        ):
            raise ModelDefinitionError(
                f"{label}: markers belong on the field's own type "
                "(Annotated[list[str], Encrypt()]), not inside it"
            )
        _check_no_nested_markers(arg, label)


def _combine(
    markers: Sequence[object], label: str
) -> tuple[bool, type[HashBasic] | type[HashSecure] | None, Domain | None]:
    """Whether the field is encrypted, its hash, and the domain its HashBasic pins."""
    kinds = [type(m) for m in markers]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            raise ModelDefinitionError(f"{label}: {kind.__name__}() is given more than once")
    if HashBasic in kinds and HashSecure in kinds:
        raise ModelDefinitionError(
            f"{label}: HashBasic() and HashSecure() do not combine; pick one "
            "(HashBasic for lookups, HashSecure for passwords)"
        )
    hash_kind: type[HashBasic] | type[HashSecure] | None = None
    if HashBasic in kinds:
        hash_kind = HashBasic
    elif HashSecure in kinds:
        hash_kind = HashSecure
    pinned = next((m.domain for m in markers if isinstance(m, HashBasic)), None)
    return Encrypt in kinds, hash_kind, pinned


def _supported_scalars() -> frozenset[type]:
    """The scalar field types: those that decode as themselves (bytearray decodes as bytes)."""
    return frozenset(t for t in SUPPORTED_TYPES if t in _SCALAR_NAMES)


def _value_type(annotation: object, label: str) -> _ValueType:
    optional = False
    if _is_union(annotation):
        members = [m for m in typing.get_args(annotation) if m is not NoneType]
        if len(members) != 1:
            raise _unsupported(annotation, label, "a union of several types")
        optional = True
        annotation = members[0]
    scalars = _supported_scalars()
    if isinstance(annotation, type) and annotation in scalars:
        return _ValueType(annotation, False, optional, False)
    if typing.get_origin(annotation) is list:
        args = typing.get_args(annotation)
        item, item_optional = (args[0] if args else Any), False
        if _is_union(item):
            members = [m for m in typing.get_args(item) if m is not NoneType]
            if len(members) == 1:
                item, item_optional = members[0], True
        if isinstance(item, type) and item in scalars:
            return _ValueType(item, True, optional, item_optional)
        raise _unsupported(annotation, label, "a list of an unsupported type")
    raise _unsupported(annotation, label, None)


def _unsupported(annotation: object, label: str, why: str | None) -> ModelDefinitionError:
    shown = annotation.__qualname__ if isinstance(annotation, type) else repr(annotation)
    names = ", ".join(sorted(_SCALAR_NAMES[t] for t in _supported_scalars() if t in _SCALAR_NAMES))
    reason = f" ({why})" if why else ""
    return ModelDefinitionError(
        f"{label}: type {shown} cannot be encrypted or hashed{reason}; supported are "
        f"{names}, list[...] of them, and Optional of those"
    )


# -- records -----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise DecryptionError(f"malformed record: {what} must be a base64 str")
    if text.isascii():
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error:
            pass
    raise DecryptionError(f"malformed record: {what} is not valid base64")


class EncryptedRecord:
    """The storable form of one model instance (see :func:`encrypt_model`).

    :meth:`as_dict` gives the row: plain fields as they are on the model,
    ``<name>_encrypted`` base64 strings, ``<name>_hash`` / ``<name>_hash_secure``
    strings (or None), and the ``encx`` metadata dict. :meth:`from_dict` reads a
    row back, strictly. Neither repr nor str shows any value.
    """

    __slots__ = ("_ciphertexts", "_columns", "_encrypted", "_header", "_model_name")
    __hash__: ClassVar[None]  # type: ignore[assignment]

    def __init__(
        self,
        *,
        model_name: str,
        header: bytes | None,
        encrypted: Sequence[str],
        ciphertexts: Mapping[str, bytes],
        columns: Mapping[str, object],
    ) -> None:
        # Built by encrypt_model and from_dict, which check what they pass.
        self._model_name = model_name
        self._header = header
        self._encrypted = tuple(encrypted)
        self._ciphertexts: Mapping[str, bytes] = MappingProxyType(dict(ciphertexts))
        self._columns: Mapping[str, object] = MappingProxyType(dict(columns))

    # -- the typed view

    @property
    def format_version(self) -> int:
        return RECORD_FORMAT_VERSION

    @property
    def model_name(self) -> str:
        """The name the record is bound to: the model's ``__encx_name__`` or qualified name."""
        return self._model_name

    @property
    def header(self) -> bytes | None:
        """The sealed record's header (KEK version, wrapped DEK, commitment); None when
        the model has no ``Encrypt()`` field."""
        return self._header

    @property
    def kek_version(self) -> int | None:
        """The KEK version the record's DEK is wrapped under (None: nothing encrypted)."""
        if self._header is None:
            return None
        return parse_record_header(self._header).kek_version

    @property
    def encrypted_fields(self) -> tuple[str, ...]:
        """The names of the encrypted fields, as listed in the metadata."""
        return self._encrypted

    @property
    def ciphertexts(self) -> Mapping[str, bytes]:
        """Field name -> ``nonce || ciphertext || tag`` of each encrypted field."""
        return self._ciphertexts

    @property
    def fields(self) -> Mapping[str, object]:
        """Every column but ``encx``: plain values, base64 ciphertexts, hash strings."""
        return self._columns

    # -- the row

    def metadata(self) -> dict[str, object]:
        """The ``encx`` column: ``{"v", "model", "header", "fields"}``."""
        return {
            "v": RECORD_FORMAT_VERSION,
            "model": self._model_name,
            "header": None if self._header is None else _b64(self._header),
            "fields": list(self._encrypted),
        }

    def as_dict(self) -> dict[str, object]:
        """The record as a row: a fresh dict each call, ``encx`` last."""
        row = dict(self._columns)
        row[META_COLUMN] = self.metadata()
        return row

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> EncryptedRecord:
        """Read a row back (``encx`` as a dict or as its JSON text), strictly.

        A row that is not a mapping of str keys raises InvalidValueError; one whose
        metadata or ciphertext columns are malformed, or that has an encrypted
        column its metadata does not list, raises DecryptionError. Messages name
        columns, never values.
        """
        if not isinstance(data, Mapping):
            raise InvalidValueError(
                f"an encrypted record must be a mapping, not {type(data).__name__}"
            )
        for key in data:
            if not isinstance(key, str):
                raise InvalidValueError("an encrypted record's keys must be str")
        if META_COLUMN not in data:
            raise DecryptionError(f"not an encx-async record: it has no {META_COLUMN!r} column")
        meta = data[META_COLUMN]
        if isinstance(meta, str | bytes):
            try:
                meta = json.loads(meta)
            except (ValueError, RecursionError):  # nested past the parser's depth
                raise DecryptionError(
                    f"malformed record: the {META_COLUMN!r} column is not JSON"
                ) from None
        if not isinstance(meta, Mapping):
            raise DecryptionError(f"malformed record: {META_COLUMN!r} must be an object")
        if set(meta) != _META_KEYS:
            raise DecryptionError(
                f"malformed record: {META_COLUMN!r} must have exactly the keys "
                f"{', '.join(sorted(_META_KEYS))}"
            )
        version = meta["v"]
        if type(version) is not int:
            raise DecryptionError("malformed record: the format version must be an int")
        if version != RECORD_FORMAT_VERSION:
            raise DecryptionError(f"unsupported record format version {version}")
        model_name = meta["model"]
        if not isinstance(model_name, str) or not model_name:
            raise DecryptionError("malformed record: the model name must be a non-empty str")
        names = meta["fields"]
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
            raise DecryptionError("malformed record: 'fields' must be a list of field names")
        if len(set(names)) != len(names):
            raise DecryptionError("malformed record: 'fields' lists a field twice")
        raw_header = meta["header"]
        header: bytes | None = None
        if names:
            header = _unb64(raw_header, "the header")
            parse_record_header(header)  # DecryptionError if malformed
        elif raw_header is not None:
            raise DecryptionError("malformed record: a header without encrypted fields")
        listed = {n + ENCRYPTED_SUFFIX for n in names}
        for key in data:
            if key.endswith(ENCRYPTED_SUFFIX) and key not in listed:
                raise DecryptionError(
                    f"malformed record: column {key!r} is not among its encrypted fields"
                )
        ciphertexts: dict[str, bytes] = {}
        for name in names:
            column = name + ENCRYPTED_SUFFIX
            if column not in data:
                raise DecryptionError(f"malformed record: column {column!r} is missing")
            body = _unb64(data[column], f"column {column!r}")
            if len(body) < _MIN_FIELD_BODY:
                raise DecryptionError(f"malformed record: column {column!r} is truncated")
            ciphertexts[name] = body
        columns = {k: v for k, v in data.items() if k != META_COLUMN}
        return cls(
            model_name=model_name,
            header=header,
            encrypted=names,
            ciphertexts=ciphertexts,
            columns=columns,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncryptedRecord):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return (
            f"<EncryptedRecord model={self._model_name!r} kek_version={self.kek_version} "
            f"encrypted={list(self._encrypted)!r} columns={sorted(self._columns)!r}>"
        )


# -- binding -------------------------------------------------------------------------------


def _lp(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _record_aad(model_name: str, record_id: object, fields: Sequence[str]) -> bytes:
    """What a record's ciphertexts are bound to: the model, its encrypted fields, the id."""
    if record_id is None:
        rid = b"\x00"
    else:
        try:
            rid = b"\x01" + encode_value(record_id)
        except InvalidValueError as exc:
            raise InvalidValueError(f"record_id cannot be bound: {exc}") from None
    parts = [_AAD_MAGIC, _lp(model_name.encode()), _lp(rid), _U32.pack(len(fields))]
    # Sorted: reordering a model's field declarations must not orphan its records.
    parts += [_lp(name.encode()) for name in sorted(fields)]
    return b"".join(parts)


# -- encrypt / decrypt ---------------------------------------------------------------------


async def encrypt_model(
    crypto: Crypto,
    obj: object,
    *,
    context: Context | None = None,
    record_id: object = None,
) -> EncryptedRecord:
    """Encrypt and hash the marked fields of a dataclass or pydantic model instance.

    :param context: the KMS encryption context (a tenant, say); needed again to decrypt.
    :param record_id: the record's primary key, when it has one: its ciphertexts
        are then bound to it, and cannot be moved to another row. Any value an
        ``Encrypt()`` field may hold (str, int, UUID...); pass the same value, of
        the same type, to :func:`decrypt_model`. Without it, nothing ties the
        ciphertexts to their row: records sealed under one cached DEK share a
        header, so an encrypted column copied from one into another decrypts.
    """
    if isinstance(obj, type):
        raise InvalidValueError("encrypt_model takes a model instance, not a class")
    spec = inspect_model(type(obj))
    columns: dict[str, object] = {}
    plaintexts: dict[str, bytes] = {}
    secure: list[tuple[str, object]] = []
    for field in spec.fields:
        value = getattr(obj, field.name)
        if field.plain:
            columns[field.name] = value
            continue
        value_type = field.value_type
        assert value_type is not None
        if not value_type.accepts(value):
            raise InvalidValueError(
                f"{spec.label(field.name)} holds a {type(value).__name__}, "
                f"but is declared {value_type.label}"
            )
        value = value_type.coerce(value)
        if field.encrypt:
            try:
                plaintexts[field.name] = encode_value(value)
            except InvalidValueError as exc:
                raise InvalidValueError(f"{spec.label(field.name)}: {exc}") from None
            columns[field.name + ENCRYPTED_SUFFIX] = None  # filled below, in field order
        if field.hash_kind is HashBasic:
            assert field.domain is not None
            columns[field.name + HASH_SUFFIX] = (
                None if value is None else crypto.hash_basic(value, domain=field.domain)
            )
        elif field.hash_kind is HashSecure:
            columns[field.name + HASH_SECURE_SUFFIX] = None
            if value is not None:
                secure.append((field.name + HASH_SECURE_SUFFIX, value))
    for column, value in secure:
        columns[column] = await crypto.hash_secure(value)
    header: bytes | None = None
    bodies: dict[str, bytes] = {}
    if plaintexts:
        aad = _record_aad(spec.name, record_id, spec.encrypted)
        sealed = await crypto.seal_record(plaintexts, context=context, aad=aad)
        header, bodies = sealed.header, sealed.fields
        for name, body in bodies.items():
            columns[name + ENCRYPTED_SUFFIX] = _b64(body)
    elif record_id is not None:
        _record_aad(spec.name, record_id, ())  # the same checks as when it is used
    return EncryptedRecord(
        model_name=spec.name,
        header=header,
        encrypted=spec.encrypted,
        ciphertexts=bodies,
        columns=columns,
    )


async def decrypt_model(
    crypto: Crypto,
    record: EncryptedRecord | Mapping[str, object],
    model: type[T],
    *,
    context: Context | None = None,
    record_id: object = None,
) -> T:
    """Restore a ``model`` instance from :func:`encrypt_model`'s record (or its row dict).

    ``context`` and ``record_id`` must be the ones it was encrypted with. Fields
    that were only hashed are not restored: they get their default. A record of
    another model, a tampered, swapped, dropped or added ciphertext, a stored
    ``<name>_hash`` that is not the decrypted value's, or a wrong context or
    ``record_id`` raise :class:`~encx_async.DecryptionError`.
    """
    spec = inspect_model(model)
    if not isinstance(record, EncryptedRecord):
        record = EncryptedRecord.from_dict(record)
    if record.model_name != spec.name:
        raise DecryptionError(f"the record belongs to another model than {spec.name!r}")
    if set(record.encrypted_fields) != set(spec.encrypted) or len(record.encrypted_fields) != len(
        spec.encrypted
    ):
        missing = [n for n in spec.encrypted if n not in record.encrypted_fields]
        detail = f" (missing: {', '.join(missing)})" if missing else ""
        raise DecryptionError(
            f"the record's encrypted fields are not those of {spec.name!r}{detail}"
        )
    row = record.fields
    opened: dict[str, bytes] = {}
    if spec.encrypted:
        if record.header is None:  # a hand-built record; from_dict refuses this already
            raise DecryptionError("the record has encrypted fields but no header")
        aad = _record_aad(spec.name, record_id, spec.encrypted)
        sealed = SealedRecord(record.header, dict(record.ciphertexts))
        opened = await crypto.open_record(sealed, context=context, aad=aad)
    values: dict[str, object] = {}
    for field in spec.fields:
        if field.plain:
            if field.name not in row:
                raise InvalidValueError(
                    f"the record has no column {field.name!r} for {spec.label(field.name)}"
                )
            values[field.init_key] = row[field.name]
            continue
        if not field.encrypt:
            continue  # hash-only: no plaintext to restore; the model's default applies
        value = _decode(spec, field, opened[field.name])
        if field.hash_kind is HashBasic:
            _check_basic_hash(crypto, spec, field, value, row)
        values[field.init_key] = value
    return _build(spec, model, values)


def _decode(spec: _ModelSpec, field: _Field, plaintext: bytes) -> object:
    try:
        value = decode_value(plaintext)
    except InvalidValueError as exc:
        raise DecryptionError(f"{spec.label(field.name)} decrypted to no valid value") from exc
    assert field.value_type is not None
    if not field.value_type.accepts(value):
        raise InvalidValueError(
            f"{spec.label(field.name)} decrypted to a {type(value).__name__}, but is declared "
            f"{field.value_type.label}: was the model's field type changed?"
        )
    return value


def _check_basic_hash(
    crypto: Crypto, spec: _ModelSpec, field: _Field, value: object, row: Mapping[str, object]
) -> None:
    """The stored blind index must be the decrypted value's, so that a row cannot be
    made to answer lookups for a value it does not hold.

    An hb1 hash (one key for every field, from before domains) is checked like
    an hb2 one. One made under an older pepper version cannot be checked here
    and is left for the re-index to replace; one naming a version newer than
    ours, or 0, was never issued and is refused.
    """
    column = field.name + HASH_SUFFIX
    if column not in row:
        raise DecryptionError(f"the record has no column {column!r}")
    digest = row[column]
    if value is None:
        ok = digest is None
    elif not isinstance(digest, str):
        ok = False
    else:
        assert field.domain is not None
        try:
            ok = crypto.verify_basic(value, digest, domain=field.domain)
        except InvalidHashError:  # malformed, or of another pepper version
            try:
                # An older pepper's hash cannot be checked here (a re-index
                # replaces it); a version that never existed yet is a forgery.
                ok = crypto.needs_reindex(digest)
            except InvalidHashError:
                ok = False
    if not ok:
        raise DecryptionError(
            f"column {column!r} is not the hash of the decrypted {spec.label(field.name)}: "
            "the record was tampered with"
        )


def blind_index(crypto: Crypto, model: type, field: str, value: object) -> str:
    """The blind index ``model``'s ``HashBasic()`` field ``field`` stores for ``value``.

    ``value`` is checked against the field's type and converted as
    :func:`encrypt_model` does (an int for a float field), so the result
    matches the stored column. ``None`` has none: its column is NULL.
    """
    spec = inspect_model(model)
    found = next((f for f in spec.fields if f.name == field), None)
    if found is None or found.hash_kind is not HashBasic:
        raise ConfigurationError(f"{spec.qualname} has no HashBasic() field {field!r}")
    value_type = found.value_type
    assert value_type is not None
    assert found.domain is not None
    if value is None or not value_type.accepts(value):
        raise InvalidValueError(
            f"{spec.label(found.name)} is declared {value_type.label}; a "
            f"{type(value).__name__} has no blind index there"
            + (" (the column of None is NULL)" if value is None else "")
        )
    return crypto.hash_basic(value_type.coerce(value), domain=found.domain)


def _build(spec: _ModelSpec, model: type[T], values: dict[str, object]) -> T:
    if not spec.is_pydantic:
        return model(**values)
    from pydantic import ValidationError

    try:
        built: T = model.model_validate(values)  # type: ignore[attr-defined]
        return built
    except ValidationError as exc:
        # pydantic's own message shows the input values: name locations and kinds only.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(model)'}: {error['type']}"
            for error in exc.errors()
        )
    # Raised out here, so that the ValidationError is not even its __context__.
    raise InvalidValueError(
        f"the decrypted record does not validate as {spec.qualname}: {problems}"
    )


# -- batches -------------------------------------------------------------------------------


async def encrypt_models(
    crypto: Crypto,
    objs: Iterable[object],
    *,
    context: Context | None = None,
    record_id: Callable[[Any], object] | None = None,
    concurrency: int = 16,
) -> list[EncryptedRecord]:
    """:func:`encrypt_model` for many objects, in order, at most ``concurrency`` at once.

    ``record_id``, if given, is called with each object for its id (say
    ``lambda user: user.id``). With a DEK cache the batch shares DEKs within the
    cache's limits: a thousand records can cost one KMS call. The first failure
    cancels the rest and is raised.
    """
    items = list(objs)

    async def one(obj: object) -> EncryptedRecord:
        rid = None if record_id is None else record_id(obj)
        return await encrypt_model(crypto, obj, context=context, record_id=rid)

    return await ordered_list(items, one, concurrency=concurrency)


async def decrypt_models(
    crypto: Crypto,
    records: Iterable[EncryptedRecord | Mapping[str, object]],
    model: type[T],
    *,
    context: Context | None = None,
    record_id: Callable[[EncryptedRecord], object] | None = None,
    concurrency: int = 16,
) -> list[T]:
    """:func:`decrypt_model` for many records, in order, at most ``concurrency`` at once.

    ``record_id``, if given, is called with each :class:`EncryptedRecord` for the
    id it was bound to (say ``lambda r: r.fields["id"]``). Records that share a
    DEK cost one KMS call between them with a DEK cache. The first failure
    cancels the rest and is raised.
    """
    inspect_model(model)  # a bad model fails before any work starts
    items = [r if isinstance(r, EncryptedRecord) else EncryptedRecord.from_dict(r) for r in records]

    async def one(record: EncryptedRecord) -> T:
        rid = None if record_id is None else record_id(record)
        return await decrypt_model(crypto, record, model, context=context, record_id=rid)

    return await ordered_list(items, one, concurrency=concurrency)
