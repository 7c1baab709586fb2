"""The data-key type: key material that never shows itself."""

from __future__ import annotations

import hmac
import os
from typing import NoReturn

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["DEK_SIZE", "DataKey"]

DEK_SIZE = 32  # AES-256


class DataKey:
    """A 256-bit data-encryption key (DEK).

    ``repr`` and ``str`` never show the key; ``bytes(dek)`` is the one explicit
    way to read it. :meth:`wipe` overwrites the key in place. The wipe is best
    effort: Python and OpenSSL may hold copies this object cannot reach (the
    ``bytes`` given to :meth:`from_bytes`, the cipher context built from it).
    """

    __slots__ = ("__weakref__", "_aesgcm", "_material")

    def __init__(self, material: bytes | bytearray | memoryview) -> None:
        if len(material) != DEK_SIZE:
            raise ValueError(f"a data key is {DEK_SIZE} bytes, got {len(material)}")
        self._material = bytearray(material)
        self._aesgcm: AESGCM | None = None

    @classmethod
    def generate(cls) -> DataKey:
        """A fresh random key from the operating system's CSPRNG."""
        return cls(os.urandom(DEK_SIZE))

    @property
    def wiped(self) -> bool:
        return self._aesgcm is None and not any(self._material)

    def wipe(self) -> None:
        """Overwrite the key material with zeros and drop the cipher built from it."""
        for i in range(len(self._material)):
            self._material[i] = 0
        self._aesgcm = None

    def aesgcm(self) -> AESGCM:
        """The AES-256-GCM cipher for this key, built once (building costs ~1.4 µs)."""
        cipher = self._aesgcm
        if cipher is None:
            if not any(self._material):
                raise ValueError("this data key has been wiped")
            cipher = self._aesgcm = AESGCM(bytes(self._material))
        return cipher

    def __bytes__(self) -> bytes:
        return bytes(self._material)

    def __len__(self) -> int:
        return len(self._material)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> NoReturn:
        raise TypeError("DataKey is not hashable")

    def __repr__(self) -> str:
        return "<DataKey 256-bit [redacted]>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("DataKey cannot be pickled: serialise it only through a KMS")

    def __copy__(self) -> NoReturn:
        raise TypeError("DataKey cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("DataKey cannot be copied")
