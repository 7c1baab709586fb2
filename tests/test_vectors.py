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
from encx_async._envelope import (
    BODY_GCM,
    BODY_STREAM,
    Sealer,
    pack_header,
    parse,
    replace_wrapped_dek,
)
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
    "dcd12a6cde497f71863923f6e0e9da5e475f464380e88d3805357f9eb345d335e64c56b1362d7d526ffb3c03"
    "c9441e739042aa79f424f56a5c46"
)
# Cobblestone-256 body: b"streamed body " * 8, no aad
STREAM_BLOB_HEX = (
    "45580101000000010014777261707065642d64656b2d66726f6d2d6b6d73cdc81810f5d1924d9fd90e9dd036"
    "dcd12a6cde497f71863923f6e0e9da5e475f85a99b2b333c7d45b9bdfbcf6195f7dc67023a241899f368f0a4"
    "3c411fff66a3e0e6cffd12581151a55656a0cf5d2f72881049547899f2e1f14dde98f718eda49f5b9ffc8af6"
    "a1d6bd743807f6ef4817b5859402adc48aa8b33979d4e6217f803cf88f6d32b6528c6ede3f0977666cee441e"
    "94e4d9d1a97bd1c12d8014c37605d8a06802d62d596e1b0ee4136336e26603ad0e6b662630bf376bb5460314"
    "b514d808eec5faafe29930f6c0a57eea30ad339438066e01d17c"
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
    envelope = parse(bytes.fromhex("".join(GCM_BLOB_HEX)))
    assert envelope.body_kind == BODY_GCM
    assert envelope.kek_version == 1
    assert envelope.wrapped_dek == WRAPPED
    assert bytes(envelope.header).hex() == HEADER_HEX
    assert sealer().open_small(envelope, b"user:1") == b"hello, world"


def test_gcm_vector_matches_an_independent_construction() -> None:
    """Rebuild the blob from the spec with plain cryptography calls."""
    blob = bytes.fromhex("".join(GCM_BLOB_HEX))
    header = bytes.fromhex(HEADER_HEX)
    nonce = blob[len(header) : len(header) + 12]
    okm = HKDF(hashes.SHA256(), 96, salt=None, info=b"encx-async v1 envelope keys").derive(DEK)
    context = bytes.fromhex(CONTEXT_HEX)
    # magic, version, kind and commitment; not the KEK version or the wrapped DEK
    bound = header[:4] + header[-32:]
    aad = bound + struct.pack(">I", len(context)) + context + b"user:1"
    expected = header + nonce + AESGCM(okm[:32]).encrypt(nonce, b"hello, world", aad)
    assert blob == expected


def test_stream_vector_decrypts() -> None:
    envelope = parse(bytes.fromhex("".join(STREAM_BLOB_HEX)))
    assert envelope.body_kind == BODY_STREAM
    assert sealer().open_job(envelope, None)() == b"streamed body " * 8


def test_rewrap_keeps_the_body() -> None:
    envelope = parse(bytes.fromhex("".join(GCM_BLOB_HEX)))
    moved = parse(replace_wrapped_dek(envelope, 2, b"another-wrapping"))
    assert moved.kek_version == 2
    assert moved.wrapped_dek == b"another-wrapping"
    assert moved.body == envelope.body
    rewrapped = Sealer(
        EnvelopeCipher(DataKey(DEK)), 2, b"another-wrapping", encode_context(CONTEXT)
    )
    assert rewrapped.open_small(moved, b"user:1") == b"hello, world"


def test_raw_layer_vector() -> None:
    nonce = bytes(12)
    raw = nonce + AESGCM(DEK).encrypt(nonce, b"raw", b"aad")
    assert open_raw(DataKey(DEK), raw, b"aad") == b"raw"
