"""Authenticated encryption, through ``cryptography`` only. Nonces are made here.

Two layers live in this module:

* the raw layer (:func:`seal_raw` / :func:`open_raw`): AES-256-GCM straight
  under a DEK, ``nonce || ciphertext || tag``; what the low-level API uses;
* :class:`EnvelopeCipher`: the keys of the high-level envelope, derived once per
  DEK with HKDF-SHA-256 (one AES-256-GCM key for small payloads, one
  Cobblestone-256 key for large ones, and a 32-byte key commitment), so no key is
  ever used by two algorithms and the per-message cost is one AES-GCM call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._exceptions import DecryptionError
from ._keys import DataKey

__all__ = [
    "COMMITMENT_SIZE",
    "NONCE_SIZE",
    "RAW_OPEN_FAILED",
    "TAG_SIZE",
    "Bytes",
    "EnvelopeCipher",
    "open_raw",
    "seal_raw",
]

NONCE_SIZE = 12
TAG_SIZE = 16
COMMITMENT_SIZE = 32
# Cobblestone is fed in slices so a worker thread lets go of the GIL between
# them: one AES call over 64 MiB would hold it, and stall the event loop, ~30 ms.
_SLICE = 256 * 1024
_HKDF_INFO = b"encx-async v1 envelope keys"
RAW_OPEN_FAILED = "the raw AES-GCM ciphertext failed authentication"
Bytes = bytes | bytearray | memoryview


def seal_raw(dek: DataKey, plaintext: Bytes, aad: bytes | None) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + dek.aesgcm().encrypt(nonce, plaintext, aad)


def open_raw(dek: DataKey, ciphertext: Bytes, aad: bytes | None) -> bytes:
    if len(ciphertext) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError("ciphertext is too short")
    view = memoryview(ciphertext)
    try:
        return dek.aesgcm().decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionError(RAW_OPEN_FAILED) from None


class EnvelopeCipher:
    """The derived keys of one DEK. Building one costs an HKDF (~8 µs): once per DEK."""

    __slots__ = ("_stream_key", "commitment", "gcm")

    def __init__(self, dek: DataKey) -> None:
        okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=None, info=_HKDF_INFO).derive(
            bytes(dek)
        )
        self.gcm: AESGCM | None = AESGCM(okm[:32])
        self._stream_key = bytearray(okm[32:64])
        self.commitment = okm[64:]

    def wipe(self) -> None:
        self.gcm = None
        for i in range(len(self._stream_key)):
            self._stream_key[i] = 0

    def stream_job(
        self, data: Bytes, aad: bytes, *, seal: bool, prefix: bytes = b""
    ) -> Callable[[], bytes]:
        """A Cobblestone-256 job over ``data``, to run in a worker thread.

        The cipher object is built now, in the caller's thread, so wiping this
        cipher afterwards cannot change what the job does, and the job holds
        no key bytes: its frames, in a traceback, show an opaque object.
        ``prefix`` (a header) comes out in front of the result.
        """
        cipher = self.stream_encryptor(aad) if seal else self.stream_decryptor(aad)
        return partial(_stream, cipher, data, prefix)

    def stream_encryptor(self, aad: bytes) -> Cobblestone256Encryptor:
        """A Cobblestone-256 encryptor for one stream; it keeps its own copy of the key."""
        return Cobblestone256Encryptor(self._live_stream_key(), aad)

    def stream_decryptor(self, aad: bytes) -> Cobblestone256Decryptor:
        """A Cobblestone-256 decryptor for one stream; it keeps its own copy of the key."""
        return Cobblestone256Decryptor(self._live_stream_key(), aad)

    def _live_stream_key(self) -> bytes:
        if self.gcm is None:
            raise RuntimeError("this data key has been wiped")
        return bytes(self._stream_key)


def _stream(
    cipher: Cobblestone256Encryptor | Cobblestone256Decryptor, data: Bytes, prefix: bytes
) -> bytes:
    view = memoryview(data)
    try:
        parts = [prefix]
        parts += [cipher.update(view[i : i + _SLICE]) for i in range(0, len(view), _SLICE)]
        parts.append(cipher.finalize())
    except (InvalidTag, ValueError):
        raise DecryptionError("the Cobblestone-256 body failed authentication") from None
    # One join, not ``header + body``: join lets go of the GIL while it copies
    # a large result, an addition would hold it for the whole copy.
    return b"".join(parts)
