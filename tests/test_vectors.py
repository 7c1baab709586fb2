"""Byte-exact test vectors for envelope format v1 (docs/format.md).

If one of these fails, the format changed: that needs a new format version,
and the old vectors must keep decrypting.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encx_async._aead import EnvelopeCipher, open_raw
from encx_async._context import encode_context
from encx_async._envelope import BODY_GCM, BODY_STREAM, Sealer, pack_header, parse
from encx_async._keys import DataKey

DEK = bytes(range(32))
WRAPPED = b"wrapped-dek-from-kms"
CONTEXT = {"tenant": "acme", "region": "eu"}
CONTEXT_HEX = "0006726567696f6e00026575000674656e616e74000461636d65"
COMMITMENT_HEX = "cdc81810f5d1924d9fd90e9dd036dcd12a6cde497f71863923f6e0e9da5e475f"
HEADER_HEX = "45580100000000010014777261707065642d64656b2d66726f6d2d6b6d73" + COMMITMENT_HEX
# AES-256-GCM body: b"hello, world", aad b"user:1"
GCM_BLOB_HEX = (
    "45580100000000010014777261707065642d64656b2d66726f6d2d6b6d73cdc81810f5d1924d9fd90e9dd036"
    "dcd12a6cde497f71863923f6e0e9da5e475ffb2d3e6ddace969103320ba12f516960ac9330582ac28fa204c8"
    "8f4018c8e23263818a6c884b1fa3"
)
# Cobblestone-256 body: b"streamed body " * 8, no aad
STREAM_BLOB_HEX = (
    "45580101000000010014777261707065642d64656b2d66726f6d2d6b6d73cdc81810f5d1924d9fd90e9dd036"
    "dcd12a6cde497f71863923f6e0e9da5e475f9c74d93be0185072257a9cc6d698072ddd964a35aeba0bfe1f82"
    "452a9cf5d1ea54fca03d420a7410ad1e559f71dd24e900f28074c4080815166bb4fd039dd0db94cb8fe15abe"
    "b42aa03b85acd009bb0abc56a6171039cbdd37cd60aa8c39d4d5aa0a0802ab8316a3210614a8c735f11ee2f3"
    "aee825f5c2ed6b6689499b53b97e5b41ffd681046de1454c39aa0b600f76c436a035fce5c8d5acd20965e406"
    "7d6e11a03601d8de1832a8c102de8ba23e933b907a742c55109d"
)


def sealer() -> Sealer:
    return Sealer(EnvelopeCipher(DataKey(DEK)), 1, WRAPPED, encode_context(CONTEXT))


def test_context_encoding() -> None:
    assert encode_context(CONTEXT).hex() == CONTEXT_HEX
    assert encode_context({}) == b""
    assert encode_context(None) == b""
    # sorted by key, each part u16-length-prefixed
    assert encode_context({"b": "", "a": "xy"}) == b"\x00\x01a\x00\x02xy\x00\x01b\x00\x00"


def test_key_derivation_and_commitment() -> None:
    okm = HKDF(hashes.SHA256(), 96, salt=None, info=b"encx-async v1 envelope keys").derive(DEK)
    assert okm[64:].hex() == COMMITMENT_HEX
    assert EnvelopeCipher(DataKey(DEK)).commitment.hex() == COMMITMENT_HEX


def test_header_layout() -> None:
    header = pack_header(BODY_GCM, 1, WRAPPED, bytes.fromhex(COMMITMENT_HEX))
    assert header.hex() == HEADER_HEX
    assert header[:2] == b"EX"
    assert header[2] == 1
    assert struct.unpack(">IH", header[4:10]) == (1, len(WRAPPED))


def test_gcm_vector_decrypts() -> None:
    envelope = parse(bytes.fromhex(GCM_BLOB_HEX))
    assert envelope.body_kind == BODY_GCM
    assert envelope.kek_version == 1
    assert envelope.wrapped_dek == WRAPPED
    assert bytes(envelope.header).hex() == HEADER_HEX
    assert sealer().open_small(envelope, b"user:1") == b"hello, world"


def test_gcm_vector_matches_an_independent_construction() -> None:
    """Rebuild the blob from the spec with plain cryptography calls."""
    blob = bytes.fromhex(GCM_BLOB_HEX)
    header = bytes.fromhex(HEADER_HEX)
    nonce = blob[len(header) : len(header) + 12]
    okm = HKDF(hashes.SHA256(), 96, salt=None, info=b"encx-async v1 envelope keys").derive(DEK)
    context = bytes.fromhex(CONTEXT_HEX)
    aad = header + struct.pack(">I", len(context)) + context + b"user:1"
    expected = header + nonce + AESGCM(okm[:32]).encrypt(nonce, b"hello, world", aad)
    assert blob == expected


def test_stream_vector_decrypts() -> None:
    envelope = parse(bytes.fromhex("".join(STREAM_BLOB_HEX)))
    assert envelope.body_kind == BODY_STREAM
    assert sealer().open_large_job(envelope, None)() == b"streamed body " * 8


def test_raw_layer_vector() -> None:
    nonce = bytes(12)
    raw = nonce + AESGCM(DEK).encrypt(nonce, b"raw", b"aad")
    assert open_raw(DataKey(DEK), raw, b"aad") == b"raw"
