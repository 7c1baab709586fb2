"""The high-level ciphertext format (see ``docs/format.md``). Pure: no I/O.

Version 1, all integers big-endian::

    offset  size  field
    0       2     magic b"EX"
    2       1     format version (1)
    3       1     body kind: 0 = AES-256-GCM, 1 = Cobblestone-256
    4       4     KEK version
    8       2     L, length of the wrapped DEK (1..1024)
    10      L     wrapped DEK, as the KMS returned it
    10+L    32    key commitment of the DEK
    42+L    ...   body: kind 0 is nonce(12) || ciphertext || tag(16);
                  kind 1 is a Cobblestone-256 ciphertext

Everything before the body is the *header*. The AEAD's associated data is
``magic || version || kind || commitment || u32 len(context) || context || aad``,
where ``context`` is the canonical encoding of the encryption context
(``_context``) and ``aad`` the caller's optional per-record associated data.

The KEK version and the wrapped DEK are left out on purpose, so that a rewrap
(KMS ``ReEncrypt``) can replace them without touching the body. They need no
AEAD: the KMS authenticates the wrapped DEK (with the context), and the
commitment ties the body to the one DEK it unwraps to, so a swapped wrapped DEK
fails the commitment check before any decryption.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable, Mapping
from functools import partial
from typing import NamedTuple

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._aead import COMMITMENT_SIZE, NONCE_SIZE, TAG_SIZE, Bytes, EnvelopeCipher
from ._exceptions import DecryptionError

__all__ = [
    "BODY_GCM",
    "BODY_STREAM",
    "FIXED_SIZE",
    "MAX_WRAPPED_DEK",
    "OPEN_FAILED",
    "Envelope",
    "SealedRecord",
    "Sealer",
    "associated_data",
    "header_size",
    "pack_header",
    "parse",
    "parse_record_header",
    "parse_stream_header",
    "replace_wrapped_dek",
    "split_binding",
]

MAGIC = b"EX"
VERSION = 1
BODY_GCM = 0
BODY_STREAM = 1
#: not a body kind of any envelope: the associated data of a record's fields
#: carries it, so no field ciphertext opens as an envelope body or vice versa
RECORD_FIELD = 0x80
MAX_WRAPPED_DEK = 1024
_FIXED = struct.Struct(">2sBBIH")
_U32 = struct.Struct(">I")
MIN_BODY = {BODY_GCM: NONCE_SIZE + TAG_SIZE, BODY_STREAM: TAG_SIZE}
#: the bytes of a header before the wrapped DEK: enough to know the header's length
FIXED_SIZE = _FIXED.size


class SealedRecord(NamedTuple):
    """The fields of one record sealed under one DEK (see :meth:`Crypto.seal_record`).

    ``header`` names the DEK (KEK version, wrapped DEK, key commitment) and is
    the same for every field; ``fields`` maps each field name to its
    ``nonce || ciphertext || tag``. Store both; neither is secret.
    """

    header: bytes
    fields: dict[str, bytes]


class Envelope(NamedTuple):
    body_kind: int
    kek_version: int
    blob: bytes
    body_at: int

    @property
    def binding(self) -> bytes:
        """KEK version, wrapped DEK and commitment: what names the DEK of this envelope."""
        return self.blob[4 : self.body_at]

    @property
    def wrapped_dek(self) -> bytes:
        return self.blob[_FIXED.size : self.body_at - COMMITMENT_SIZE]

    @property
    def commitment(self) -> bytes:
        return self.blob[self.body_at - COMMITMENT_SIZE : self.body_at]

    @property
    def header(self) -> bytes:
        return self.blob[: self.body_at]

    @property
    def body(self) -> bytes:
        return self.blob[self.body_at :]


def split_binding(binding: bytes) -> tuple[int, bytes, bytes]:
    """(KEK version, wrapped DEK, commitment) of an :attr:`Envelope.binding`."""
    version = int.from_bytes(binding[:4], "big")
    return version, binding[6:-COMMITMENT_SIZE], binding[-COMMITMENT_SIZE:]


# What NamedTuple._make does, minus a Python-level call: parse runs per message.
_make_envelope = tuple.__new__


def pack_header(body_kind: int, kek_version: int, wrapped_dek: bytes, commitment: bytes) -> bytes:
    if not 0 < len(wrapped_dek) <= MAX_WRAPPED_DEK:
        raise ValueError(f"a wrapped DEK must be 1..{MAX_WRAPPED_DEK} bytes")
    if len(commitment) != COMMITMENT_SIZE:
        raise ValueError("a key commitment is 32 bytes")
    fixed = _FIXED.pack(MAGIC, VERSION, body_kind, kek_version, len(wrapped_dek))
    return fixed + wrapped_dek + commitment


def associated_data(body_kind: int, commitment: bytes, context: bytes, aad: bytes | None) -> bytes:
    bound = _FIXED.pack(MAGIC, VERSION, body_kind, 0, 0)[:4]
    return b"".join((bound, commitment, _U32.pack(len(context)), context, aad or b""))


def replace_wrapped_dek(envelope: Envelope, kek_version: int, wrapped_dek: bytes) -> bytes:
    """The same envelope under another wrapped DEK of the same DEK (after a rewrap)."""
    header = pack_header(envelope.body_kind, kek_version, wrapped_dek, envelope.commitment)
    return header + envelope.blob[envelope.body_at :]


def parse(blob: bytes | bytearray | memoryview) -> Envelope:
    """Split a blob into its fields, checking every length; DecryptionError if malformed."""
    if type(blob) is not bytes:
        if not isinstance(blob, bytearray | memoryview):
            raise TypeError(f"a ciphertext is bytes, not {type(blob).__name__}")
        blob = bytes(blob)
    kind, kek_version, body_at = _parse_header(blob)
    if len(blob) < body_at + MIN_BODY[kind]:
        raise DecryptionError("ciphertext is truncated")
    return _make_envelope(Envelope, (kind, kek_version, blob, body_at))


def parse_stream_header(header: bytes) -> Envelope:
    """A header read off the front of a stream, as an Envelope with no body yet."""
    kind, kek_version, body_at = _parse_header(header)
    if len(header) != body_at:
        raise ValueError("parse_stream_header takes exactly one header")
    return _make_envelope(Envelope, (kind, kek_version, header, body_at))


def parse_record_header(header: bytes) -> Envelope:
    """A record's header (see :meth:`Sealer.fields_job`): an AES-GCM header, no body."""
    kind, kek_version, body_at = _parse_header(header)
    if kind != BODY_GCM or len(header) != body_at:
        raise DecryptionError("malformed record header")
    return _make_envelope(Envelope, (kind, kek_version, header, body_at))


def header_size(prefix: bytes) -> int:
    """The length of the header that ``prefix`` starts, from its first :data:`FIXED_SIZE` bytes.

    For a reader that gets a ciphertext in pieces (a stream): DecryptionError if
    the fixed part is not that of an envelope this version can open.
    """
    return _parse_header(prefix, complete=False)[2]


def _parse_header(blob: bytes, *, complete: bool = True) -> tuple[int, int, int]:
    if len(blob) < _FIXED.size:
        raise DecryptionError("not an encx-async ciphertext: too short")
    magic, version, kind, kek_version, wrapped_len = _FIXED.unpack_from(blob)
    if magic != MAGIC:
        raise DecryptionError("not an encx-async ciphertext: bad magic bytes")
    if version != VERSION:
        raise DecryptionError(f"unsupported ciphertext format version {version}")
    if kind not in MIN_BODY:
        raise DecryptionError(f"unknown ciphertext body kind {kind}")
    if not 0 < wrapped_len <= MAX_WRAPPED_DEK:
        raise DecryptionError("malformed ciphertext: bad wrapped-key length")
    body_at = _FIXED.size + wrapped_len + COMMITMENT_SIZE
    if complete and len(blob) < body_at:
        raise DecryptionError("ciphertext is truncated")
    return kind, kek_version, body_at


class Sealer:
    """Everything needed to seal and open envelopes under one wrapped DEK and context.

    Built once per DEK (cached or not): the header and the fixed part of the
    associated data are computed here, so a message costs one AES-GCM call.

    ``header``, ``aad_prefix`` and ``gcm`` are what a small AES-GCM envelope
    needs: :meth:`seal_small` and :meth:`open_at` use them, and so does the
    cached fast path (``_fastpath``), which repeats those two methods' lines.
    Read them, never replace them: only :meth:`wipe` does.
    """

    __slots__ = (
        "_commitment",
        "_context",
        "_field_prefix",
        "aad_prefix",
        "cipher",
        "gcm",
        "header",
        "kek_version",
        "lifetime",
        "wrapped_dek",
    )

    def __init__(
        self, cipher: EnvelopeCipher, kek_version: int, wrapped_dek: bytes, context: bytes
    ) -> None:
        self.cipher = cipher
        self.kek_version = kek_version
        self.wrapped_dek = wrapped_dek
        self._context = context
        self.gcm: AESGCM | _Wiped = cipher.gcm or _WIPED
        self._commitment = cipher.commitment
        #: every byte of this sealer's AES-GCM envelopes before the body
        self.header = pack_header(BODY_GCM, kek_version, wrapped_dek, cipher.commitment)
        #: the associated data of those envelopes, before the caller's aad
        self.aad_prefix = associated_data(BODY_GCM, cipher.commitment, context, None)
        self._field_prefix = associated_data(RECORD_FIELD, cipher.commitment, context, None)
        #: seconds the DEK cache may reuse this key at most; None: its ttl
        #: (a wrapped key the KMS made only in part is reused only briefly)
        self.lifetime: float | None = None

    def wipe(self) -> None:
        self.gcm = _WIPED
        self.cipher.wipe()

    def seal_small(self, plaintext: Bytes, aad: bytes | None) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        full_aad = self.aad_prefix + aad if aad else self.aad_prefix
        return b"".join((self.header, nonce, self.gcm.encrypt(nonce, plaintext, full_aad)))

    @property
    def wiped(self) -> bool:
        return self.gcm is _WIPED

    @property
    def binding(self) -> bytes:
        return self.header[4:]

    def check_commitment(self, commitment: bytes) -> None:
        if not hmac.compare_digest(self._commitment, commitment):
            raise DecryptionError("the data key does not match the key commitment")

    def open_small(self, envelope: Envelope, aad: bytes | None) -> bytes:
        """Open a parsed AES-GCM envelope whose binding and context are ours.

        The caller looked this sealer up by the envelope's binding, whose
        commitment was checked against the DEK when the sealer was made.
        """
        return self.open_at(envelope.blob, envelope.body_at, aad)

    def open_at(self, blob: bytes, at: int, aad: bytes | None) -> bytes:
        """Open the AES-GCM body that starts at ``at`` of a blob with our header.

        The caller has checked the header (and so the commitment) and that the
        body is at least a nonce and a tag long.
        """
        full_aad = self.aad_prefix + aad if aad else self.aad_prefix
        try:
            return self.gcm.decrypt(blob[at : at + NONCE_SIZE], blob[at + NONCE_SIZE :], full_aad)
        except InvalidTag:
            raise DecryptionError(OPEN_FAILED) from None

    def fields_job(
        self, fields: Mapping[str, Bytes], aad: bytes | None, *, seal: bool
    ) -> Callable[[], dict[str, bytes]]:
        """A job sealing (or opening) the fields of one record under this DEK.

        Each field is ``nonce || ciphertext || tag`` and its associated data
        names the field, so two fields' ciphertexts cannot be swapped; the
        record keeps :attr:`header` once for all. The key is taken now, so the
        job may run in a worker thread while the cache retires this sealer.
        """
        return partial(
            _seal_fields if seal else _open_fields, self.gcm, self._field_prefix, fields, aad
        )

    def seal_large_job(self, plaintext: Bytes, aad: bytes | None) -> Callable[[], bytes]:
        """A job sealing a large payload with Cobblestone-256, for a worker thread."""
        return self.cipher.stream_job(
            plaintext, self._stream_aad(aad), seal=True, prefix=self.stream_header
        )

    @property
    def stream_header(self) -> bytes:
        """The header of this sealer's Cobblestone-256 envelopes."""
        return pack_header(BODY_STREAM, self.kek_version, self.wrapped_dek, self._commitment)

    def stream_encryptor(self, aad: bytes | None) -> Cobblestone256Encryptor:
        """A Cobblestone-256 encryptor for the body after :attr:`stream_header`.

        It holds its own copy of the key: wiping this sealer does not stop it.
        """
        return self.cipher.stream_encryptor(self._stream_aad(aad))

    def stream_decryptor(self, aad: bytes | None) -> Cobblestone256Decryptor:
        """The inverse of :meth:`stream_encryptor`, for a body whose header is ours."""
        return self.cipher.stream_decryptor(self._stream_aad(aad))

    def _stream_aad(self, aad: bytes | None) -> bytes:
        return associated_data(BODY_STREAM, self._commitment, self._context, aad)

    def gcm_opener(self, aad: bytes | None) -> Callable[[Envelope], bytes]:
        """Opens this DEK's AES-GCM envelopes later, even after a wipe: the key is taken now."""
        return partial(_open_gcm, self.gcm, self.aad_prefix + (aad or b""))

    def open_job(self, envelope: Envelope, aad: bytes | None) -> Callable[[], bytes]:
        """A job opening a large envelope of either kind, for a worker thread.

        The key is taken now, in the event loop: a wipe that happens while the
        job waits for its thread cannot pull it away.
        """
        if envelope.body_kind == BODY_GCM:
            return partial(self.gcm_opener(aad), envelope)
        body = memoryview(envelope.blob)[envelope.body_at :]
        return self.cipher.stream_job(body, self._stream_aad(aad), seal=False)


def _field_aad(name: str, aad: bytes | None) -> bytes:
    encoded = name.encode()
    return b"".join((_U32.pack(len(encoded)), encoded, aad or b""))


def _seal_fields(
    gcm: AESGCM | _Wiped, prefix: bytes, fields: Mapping[str, Bytes], aad: bytes | None
) -> dict[str, bytes]:
    out = {}
    for name, plaintext in fields.items():
        nonce = os.urandom(NONCE_SIZE)
        out[name] = nonce + gcm.encrypt(nonce, plaintext, prefix + _field_aad(name, aad))
    return out


def _open_fields(
    gcm: AESGCM | _Wiped, prefix: bytes, fields: Mapping[str, Bytes], aad: bytes | None
) -> dict[str, bytes]:
    out = {}
    try:
        for name, body in fields.items():
            if len(body) < NONCE_SIZE + TAG_SIZE:
                raise InvalidTag
            full_aad = prefix + _field_aad(name, aad)
            out[name] = gcm.decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], full_aad)
    except InvalidTag:
        raise DecryptionError(OPEN_FAILED) from None
    return out


class _Wiped:
    """Stands in for the AES-GCM key of a wiped sealer: any use fails loudly.

    An object rather than None, so the per-message path needs no check.
    """

    __slots__ = ()

    def encrypt(self, nonce: Bytes, data: Bytes, aad: Bytes | None) -> bytes:
        raise RuntimeError("this data key has been wiped")

    decrypt = encrypt


_WIPED = _Wiped()
OPEN_FAILED = "the AES-GCM body failed authentication"


def _open_gcm(gcm: AESGCM | _Wiped, full_aad: bytes, envelope: Envelope) -> bytes:
    body = memoryview(envelope.blob)[envelope.body_at :]
    try:
        return gcm.decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], full_aad)
    except InvalidTag:
        raise DecryptionError(OPEN_FAILED) from None
