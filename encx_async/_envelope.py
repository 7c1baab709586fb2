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
``header || u32 len(context) || context || aad``, where ``context`` is the
canonical encoding of the encryption context (``_context``) and ``aad`` the
caller's optional per-record associated data. So the header, the context and
the aad are all authenticated, and the commitment makes the envelope openable
by exactly one DEK.
"""

from __future__ import annotations

import hmac
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._aead import COMMITMENT_SIZE, NONCE_SIZE, TAG_SIZE, Bytes, EnvelopeCipher
from ._exceptions import DecryptionError

__all__ = [
    "BODY_GCM",
    "BODY_STREAM",
    "MAX_WRAPPED_DEK",
    "Envelope",
    "Sealer",
    "associated_data",
    "pack_header",
    "parse",
]

MAGIC = b"EX"
VERSION = 1
BODY_GCM = 0
BODY_STREAM = 1
MAX_WRAPPED_DEK = 1024
_FIXED = struct.Struct(">2sBBIH")
_U32 = struct.Struct(">I")
MIN_BODY = {BODY_GCM: NONCE_SIZE + TAG_SIZE, BODY_STREAM: TAG_SIZE}


class Envelope(NamedTuple):
    body_kind: int
    kek_version: int
    wrapped_dek: bytes
    commitment: bytes
    blob: bytes
    body_at: int

    @property
    def header(self) -> bytes:
        return self.blob[: self.body_at]

    @property
    def body(self) -> bytes:
        return self.blob[self.body_at :]


# What NamedTuple._make does, minus a Python-level call: parse runs per message.
_make_envelope = tuple.__new__


def pack_header(body_kind: int, kek_version: int, wrapped_dek: bytes, commitment: bytes) -> bytes:
    if not 0 < len(wrapped_dek) <= MAX_WRAPPED_DEK:
        raise ValueError(f"a wrapped DEK must be 1..{MAX_WRAPPED_DEK} bytes")
    if len(commitment) != COMMITMENT_SIZE:
        raise ValueError("a key commitment is 32 bytes")
    fixed = _FIXED.pack(MAGIC, VERSION, body_kind, kek_version, len(wrapped_dek))
    return fixed + wrapped_dek + commitment


def associated_data(header: bytes | memoryview, context: bytes, aad: bytes | None) -> bytes:
    return b"".join((header, _U32.pack(len(context)), context, aad or b""))


def parse(blob: bytes | bytearray | memoryview) -> Envelope:
    """Split a blob into its fields, checking every length; DecryptionError if malformed."""
    if type(blob) is not bytes:
        if not isinstance(blob, bytearray | memoryview):
            raise TypeError(f"a ciphertext is bytes, not {type(blob).__name__}")
        blob = bytes(blob)
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
    wrapped_end = _FIXED.size + wrapped_len
    body_at = wrapped_end + COMMITMENT_SIZE
    if len(blob) < body_at + MIN_BODY[kind]:
        raise DecryptionError("ciphertext is truncated")
    fields = (kind, kek_version, blob[_FIXED.size : wrapped_end], blob[wrapped_end:body_at])
    return _make_envelope(Envelope, (*fields, blob, body_at))


class Sealer:
    """Everything needed to seal and open envelopes under one wrapped DEK and context.

    Built once per DEK (cached or not): the header and the fixed part of the
    associated data are computed here, so a message costs one AES-GCM call.
    """

    __slots__ = (
        "_aad_prefix",
        "_commitment",
        "_context",
        "_gcm",
        "_header",
        "cipher",
        "kek_version",
        "wrapped_dek",
    )

    def __init__(
        self, cipher: EnvelopeCipher, kek_version: int, wrapped_dek: bytes, context: bytes
    ) -> None:
        self.cipher = cipher
        self.kek_version = kek_version
        self.wrapped_dek = wrapped_dek
        self._context = context
        self._gcm: AESGCM | None = cipher.gcm
        self._commitment = cipher.commitment
        self._header = pack_header(BODY_GCM, kek_version, wrapped_dek, cipher.commitment)
        self._aad_prefix = associated_data(self._header, context, None)

    def wipe(self) -> None:
        self._gcm = None
        self.cipher.wipe()

    def _live_gcm(self) -> AESGCM:
        gcm = self._gcm
        if gcm is None:
            raise RuntimeError("this data key has been wiped")
        return gcm

    def seal_small(self, plaintext: Bytes, aad: bytes | None) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        full_aad = self._aad_prefix + aad if aad else self._aad_prefix
        return b"".join((self._header, nonce, self._live_gcm().encrypt(nonce, plaintext, full_aad)))

    def open_small(self, envelope: Envelope, aad: bytes | None) -> bytes:
        """Open a parsed AES-GCM envelope whose wrapped DEK and context are ours."""
        if not hmac.compare_digest(self._commitment, envelope.commitment):
            raise DecryptionError("decryption failed: the data key does not match this ciphertext")
        blob, at = envelope.blob, envelope.body_at
        # Our own header went into the associated data, not the blob's: a changed
        # header field fails the tag.
        full_aad = self._aad_prefix + aad if aad else self._aad_prefix
        try:
            return self._live_gcm().decrypt(
                blob[at : at + NONCE_SIZE], blob[at + NONCE_SIZE :], full_aad
            )
        except InvalidTag:
            raise DecryptionError(
                "decryption failed: wrong key, context or aad, or modified data"
            ) from None

    def seal_large_job(self, plaintext: Bytes, aad: bytes | None) -> Callable[[], bytes]:
        """A job sealing a large payload with Cobblestone-256, for a worker thread."""
        header = self._stream_header()
        full_aad = associated_data(header, self._context, aad)
        job = self.cipher.stream_job(plaintext, full_aad, seal=True)
        return lambda: header + job()

    def open_large_job(self, envelope: Envelope, aad: bytes | None) -> Callable[[], bytes]:
        """A job opening a Cobblestone envelope, for a worker thread."""
        if not hmac.compare_digest(self._commitment, envelope.commitment):
            raise DecryptionError("decryption failed: the data key does not match this ciphertext")
        full_aad = associated_data(self._stream_header(), self._context, aad)
        body = memoryview(envelope.blob)[envelope.body_at :]
        return self.cipher.stream_job(body, full_aad, seal=False)

    def _stream_header(self) -> bytes:
        return pack_header(BODY_STREAM, self.kek_version, self.wrapped_dek, self._commitment)
