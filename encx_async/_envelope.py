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

import struct
from collections.abc import Callable
from typing import NamedTuple

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
    commitment: memoryview
    header: memoryview
    body: memoryview


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
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"a ciphertext is bytes, not {type(blob).__name__}")
    view = memoryview(blob)
    if len(view) < _FIXED.size:
        raise DecryptionError("not an encx-async ciphertext: too short")
    magic, version, kind, kek_version, wrapped_len = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise DecryptionError("not an encx-async ciphertext: bad magic bytes")
    if version != VERSION:
        raise DecryptionError(f"unsupported ciphertext format version {version}")
    if kind not in MIN_BODY:
        raise DecryptionError(f"unknown ciphertext body kind {kind}")
    if not 0 < wrapped_len <= MAX_WRAPPED_DEK:
        raise DecryptionError("malformed ciphertext: bad wrapped-key length")
    body_at = _FIXED.size + wrapped_len + COMMITMENT_SIZE
    if len(view) < body_at + MIN_BODY[kind]:
        raise DecryptionError("ciphertext is truncated")
    wrapped_end = _FIXED.size + wrapped_len
    return Envelope(
        body_kind=kind,
        kek_version=kek_version,
        wrapped_dek=bytes(view[_FIXED.size : wrapped_end]),
        commitment=view[wrapped_end:body_at],
        header=view[:body_at],
        body=view[body_at:],
    )


class Sealer:
    """Everything needed to seal and open envelopes under one wrapped DEK and context.

    Built once per DEK (cached or not): the header and the fixed part of the
    associated data are computed here, so a message costs one AES-GCM call.
    """

    __slots__ = ("_aad_prefix", "_context", "_header", "cipher", "kek_version", "wrapped_dek")

    def __init__(
        self, cipher: EnvelopeCipher, kek_version: int, wrapped_dek: bytes, context: bytes
    ) -> None:
        self.cipher = cipher
        self.kek_version = kek_version
        self.wrapped_dek = wrapped_dek
        self._context = context
        self._header = pack_header(BODY_GCM, kek_version, wrapped_dek, cipher.commitment)
        self._aad_prefix = associated_data(self._header, context, None)

    def wipe(self) -> None:
        self.cipher.wipe()

    def seal_small(self, plaintext: bytes, aad: bytes | None) -> bytes:
        sealed = self.cipher.seal_small(
            plaintext, self._aad_prefix + aad if aad else self._aad_prefix
        )
        return self._header + sealed

    def seal_large_job(self, plaintext: Bytes, aad: bytes | None) -> Callable[[], bytes]:
        """A job sealing a large payload with Cobblestone-256, for a worker thread."""
        header = self._stream_header()
        job = self.cipher.stream_job(
            plaintext, associated_data(header, self._context, aad), seal=True
        )
        return lambda: header + job()

    def _stream_header(self) -> bytes:
        return pack_header(BODY_STREAM, self.kek_version, self.wrapped_dek, self.cipher.commitment)

    def open_small(self, envelope: Envelope, aad: bytes | None) -> bytes:
        """Open a parsed AES-GCM envelope whose wrapped DEK and context are ours."""
        self.cipher.check_commitment(envelope.commitment)
        prefix = self._aad_prefix
        return self.cipher.open_small(envelope.body, prefix + aad if aad else prefix)

    def open_large_job(self, envelope: Envelope, aad: bytes | None) -> Callable[[], bytes]:
        """A job opening a Cobblestone envelope, for a worker thread."""
        self.cipher.check_commitment(envelope.commitment)
        # Our own header, not the blob's: a tampered header field fails the tag.
        full_aad = associated_data(self._stream_header(), self._context, aad)
        return self.cipher.stream_job(envelope.body, full_aad, seal=False)
