"""The warm path of one Crypto: the cached key it used last, reused at once.

With a DEK cache, a service typically sends message after message under the
same context, so the key for the next message is the one the last message
used. ``FastPath`` remembers, for each direction:

* encrypt: the last context (the Crypto's private copy) and the cache entry
  that served it;
* decrypt: the header of the last small AES-GCM envelope opened, its context
  and the cache entry.

A message is served from memory, with no context encoding, no header parsing
and no cache lookup, when its context equals the remembered one (a plain dict
or None: a dict subclass may answer ``==`` as it likes), its entry is still in
the cache, the clock (the Crypto has one, shared by its cache and key ring) is
before both the entry's refresh point and the key ring's next look for other
instances' rotations, and, when encrypting, the use leaves the entry's counts
below the cache's quiet limits.
The context's keys and values are compared with ``==`` and not type-checked
again (that would cost about 5% of a warm round trip): a value whose own
``==`` calls it equal to the remembered string (``mock.ANY``, say) is taken
for that string, and the message is sealed under the remembered context,
exactly as if the string itself had been passed.
Such a use is counted on the cache entry itself, exactly as a cache hit is. The
use that reaches a limit, starts a refresh-ahead or is due for a version
check never comes this way: it goes through the cache, which decides.

A message served here is sealed or opened here too: the lines of
``Sealer.seal_small`` and ``Sealer.open_at`` are repeated, not called. That is
the one speed trick of this module, and it pays: a Python call costs about
30 ns, and one each way is 2-3% of a cached round trip (``python -m
benchmarks.cache`` compares the round trip with the leanest async envelope
one could write). The sealer is read through its entry at every message, never
kept apart from it, so nothing here keeps a wiped key alive.

Everything here is forgotten when the usable KEK versions or the current one
change (a rotation, a retirement, another instance's change read from the
store), and when the Crypto closes or finds itself in a forked child.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag

from ._aead import NONCE_SIZE
from ._context import Context
from ._envelope import OPEN_FAILED
from ._exceptions import DecryptionError

if TYPE_CHECKING:
    from ._cache import _Entry, _Side
    from ._envelope import Sealer
    from ._keyring import KeyRing

__all__ = ["FastPath"]

_NOTHING = object()  # equal to no context a caller can pass
_NO_HEADER = b"no envelope starts like this"


class FastPath:
    __slots__ = (
        "_clock",
        "_decrypt",
        "_encrypt",
        "_keyring",
        "_open_context",
        "_open_entry",
        "_open_header",
        "_open_shortest",
        "_open_until",
        "_quiet_bytes",
        "_quiet_messages",
        "_seal_context",
        "_seal_entry",
        "_seal_until",
        "_small",
    )

    def __init__(
        self,
        encrypt_side: _Side[Sealer],
        decrypt_side: _Side[Sealer],
        keyring: KeyRing,
        *,
        small: int,
        shortest_body: int,
    ) -> None:
        self._encrypt, self._decrypt, self._keyring = encrypt_side, decrypt_side, keyring
        if encrypt_side.clock is not keyring.clock:
            raise ValueError("the DEK cache and the key ring must share one clock")
        self._clock: Callable[[], float] = keyring.clock
        self._quiet_messages = encrypt_side.quiet_messages
        self._quiet_bytes = encrypt_side.quiet_bytes
        #: messages (and envelopes) of this size or more run in a worker thread
        self._small = small
        self._open_shortest = shortest_body  # added to the header's length
        self.forget()

    def forget(self) -> None:
        self._seal_context: object = _NOTHING
        self._seal_entry: _Entry[Sealer] | None = None
        self._seal_until = -math.inf
        self._open_header = _NO_HEADER
        self._open_context: object = _NOTHING
        self._open_entry: _Entry[Sealer] | None = None
        self._open_until = -math.inf

    def sealers(self) -> list[Sealer]:
        """The sealers remembered (a forked child wipes them)."""
        return [e.value for e in (self._seal_entry, self._open_entry) if e is not None]

    # -- encrypt ---------------------------------------------------------------

    def seal(self, plaintext: bytes, context: Context | None, aad: bytes | None) -> bytes | None:
        """The envelope of ``plaintext`` under the remembered key, or None, having
        counted nothing, when this message must go through the cache."""
        entry = self._seal_entry
        if (
            entry is None
            or entry.dead
            or (type(context) is not dict and context is not None)
            or context != self._seal_context
        ):
            return None
        size = len(plaintext)
        messages, nbytes = entry.messages + 1, entry.bytes + size
        if (
            messages < self._quiet_messages
            and nbytes < self._quiet_bytes
            and size < self._small
            and self._clock() < self._seal_until
        ):
            entry.messages, entry.bytes = messages, nbytes
            self._encrypt.hits += 1
            sealer = entry.value  # Sealer.seal_small, inline (see the module docstring)
            nonce = os.urandom(NONCE_SIZE)
            full_aad = sealer.aad_prefix + aad if aad else sealer.aad_prefix
            return b"".join((sealer.header, nonce, sealer.gcm.encrypt(nonce, plaintext, full_aad)))
        return None

    def remember_seal(self, context: Context | None, key: tuple[str, int, bytes]) -> None:
        """After a cache hit or load for ``key``: serve ``context`` from it next time."""
        if key[1] != self._keyring.current or self._encrypt.closed:
            return  # rotated (or closed) while the KMS was asked: the next message looks again
        entry = self._encrypt.entries.get(key)
        if entry is not None:
            self._seal_context, self._seal_entry = context, entry
            # (The next check only moves later, so this bound never overshoots it.)
            self._seal_until = min(entry.refresh_at, self._keyring.next_check)

    # -- decrypt ---------------------------------------------------------------

    def open(self, blob: object, context: Context | None, aad: bytes | None) -> bytes | None:
        """The plaintext of ``blob`` if it is a small AES-GCM envelope under the
        remembered header and context, or None, having counted nothing."""
        entry = self._open_entry
        header = self._open_header
        if (
            entry is None
            or entry.dead
            or type(blob) is not bytes
            or not self._open_shortest + len(header) <= len(blob) < self._small
            or not blob.startswith(header)
            or (type(context) is not dict and context is not None)
            or context != self._open_context
            or self._clock() >= self._open_until
        ):
            return None
        entry.messages += 1
        self._decrypt.hits += 1
        sealer = entry.value  # Sealer.open_at, inline (see the module docstring)
        at = len(header)
        full_aad = sealer.aad_prefix + aad if aad else sealer.aad_prefix
        try:
            return sealer.gcm.decrypt(blob[at : at + NONCE_SIZE], blob[at + NONCE_SIZE :], full_aad)
        except InvalidTag:
            raise DecryptionError(OPEN_FAILED) from None

    def remember_open(
        self, context: Context | None, key: tuple[bytes, bytes], kek_version: int
    ) -> None:
        """After opening a small AES-GCM envelope through the cache entry of ``key``."""
        if kek_version not in self._keyring.key_ids or self._decrypt.closed:
            return  # retired (or closed) while the KMS was asked
        entry = self._decrypt.entries.get(key)
        if entry is not None:
            self._open_header = entry.value.header
            self._open_context, self._open_entry = context, entry
            self._open_until = min(entry.refresh_at, self._keyring.next_check)
