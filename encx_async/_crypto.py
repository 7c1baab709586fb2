"""Crypto: the facade most users touch. It orchestrates; the pieces below it
(envelope, AEAD, cache, KMS provider) do not know about each other."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Literal, Self, TypeVar

import anyio.to_thread
from anyio.abc import AsyncResource
from cryptography.cobblestone import Cobblestone256Encryptor
from cryptography.exceptions import InvalidTag

from . import _models, _telemetry
from ._aead import (
    NONCE_SIZE,
    RAW_OPEN_FAILED,
    TAG_SIZE,
    Bytes,
    EnvelopeCipher,
    open_raw,
    seal_raw,
)
from ._cache import DEKCache, DEKCacheStats, _Side
from ._context import VERSION_KEY, Context, ContextMemo, decode_context, normalize_context
from ._envelope import (
    BODY_GCM,
    MAX_WRAPPED_DEK,
    Envelope,
    SealedRecord,
    Sealer,
    parse,
    parse_record_header,
    replace_wrapped_dek,
    split_binding,
)
from ._exceptions import (
    ClosedError,
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    EncxError,
    ForkedError,
    KeyStoreCorruptError,
    KMSError,
    KMSKeyNotFoundError,
)
from ._fastpath import FastPath
from ._fork import forget_in_child
from ._hashing import _LEGACY_WARNING, Argon2Params, BasicHasher, Domain, SecureHasher
from ._health import DEFAULT_CHECK_TIMEOUT, HealthReport, run_check
from ._keyring import KeyRing
from ._keys import DEK_SIZE, DataKey
from ._keystore import DEFAULT_STORE_TIMEOUT, KEKVersion, check_database, open_keystore
from ._keystore._default import resolve_database
from ._models import EncryptedRecord
from ._ordered import check_concurrency, ordered_map
from ._orphans import Unrecorded, create_and_learn_id, discard
from ._pepper import Pepper
from ._stream import (
    MAX_BUFFERED_GCM_BODY,
    GcmBody,
    Source,
    StreamTransform,
    check_paths,
    check_source,
    open_body,
    read_file_header,
    read_header,
    run_file_job,
    seal_body,
    transform_file,
)
from ._tasks import to_the_end
from .kms import KeyManagementService, KeyRotationService, PartialWrapping

__all__ = ["DEFAULT_THREAD_THRESHOLD", "Crypto", "CryptoStats"]

logger = logging.getLogger("encx_async")

#: Payloads of this many bytes or more are processed in a worker thread (a hop
#: costs ~75 µs; AES-GCM does 128 KiB in about as long), and the high-level
#: envelope uses Cobblestone-256 for them, fed in slices so the thread lets go of
#: the GIL and the event loop keeps running.
DEFAULT_THREAD_THRESHOLD = 128 * 1024
#: a raw ciphertext, like an envelope's AES-GCM body, is at least a nonce and a tag
_MIN_RAW = NONCE_SIZE + TAG_SIZE
Rotation = Literal["new-key", "kms-managed"]
ROTATIONS: tuple[Rotation, ...] = ("new-key", "kms-managed")
T = TypeVar("T")
EncryptKey = tuple[str, int, bytes]  # KEK id, KEK version, encoded context
DecryptKey = tuple[bytes, bytes]  # envelope binding, encoded context


@dataclass(frozen=True, slots=True)
class CryptoStats:
    """A snapshot of one Crypto's counters; cheap enough to take per request."""

    #: calls made to the KMS, by operation ("encrypt_dek", "decrypt_dek", "get_key_id")
    kms_calls: Mapping[str, int]
    #: the DEK cache's counters, or None without a cache
    cache: DEKCacheStats | None

    @property
    def total_kms_calls(self) -> int:
        return sum(self.kms_calls.values())


def _check_bytes(name: str, value: object) -> Bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be bytes-like, not {type(value).__name__}")
    return value


def _field_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError("field names must be non-empty str")
    return name


def _aad_bytes(aad: object) -> bytes:
    """``aad`` as bytes; the hot paths call this only when it is not bytes already."""
    return bytes(_check_bytes("aad", aad))


class Crypto(AsyncResource):
    """Envelope encryption under a key-encryption key (KEK) held in a KMS.

    Open one per process with ``async with Crypto(...)`` (or :meth:`create`
    where a context manager does not fit) and share it; it is safe to use
    from many tasks at once. ``aclose()`` (or ``async with``) wipes cached keys;
    it does not close the KMS service, which belongs to whoever opened it.

    A process that forks (a pre-forking server, a ``multiprocessing`` pool with
    the fork start method) must create its Crypto after the fork, in each child,
    as with any asyncio resource. In a child, an inherited Crypto has forgotten
    its cached keys and raises :class:`~encx_async.ForkedError` when used.
    """

    #: the KEK versions known, once open
    _keyring: KeyRing

    def __init__(
        self,
        *,
        kms: KeyManagementService,
        kek_alias: str,
        pepper: Pepper | Bytes | None = None,
        argon2: Argon2Params | None = None,
        dek_cache: DEKCache | None = None,
        database: object = None,
        create_key_if_missing: bool = False,
        rotation: Rotation = "new-key",
        version_check_interval: float = 30.0,
        thread_threshold: int = DEFAULT_THREAD_THRESHOLD,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
    ) -> None:
        """Check the settings; the key-version store opens with ``async with``.

        Nothing is connected or asked of the KMS until then. Code that cannot
        use ``async with`` calls :meth:`create` instead, and :meth:`aclose` later.

        :param kms: a :class:`~encx_async.KeyManagementService`, already open.
        :param kek_alias: ``alias/...`` (recommended), a key id or a key ARN.
        :param pepper: the secret key of the keyed hashes (:meth:`hash_basic`,
            :meth:`hash_secure`): a :class:`~encx_async.Pepper` (from the
            environment, a file or AWS Secrets Manager), or 32 random bytes, not
            all zero, taken as pepper version 1.
        :param argon2: the :class:`~encx_async.Argon2Params` of :meth:`hash_secure`
            and the bounds :meth:`verify_secure` accepts; OWASP's by default,
            with bounds of four times their cost.
        :param dek_cache: a :class:`~encx_async.DEKCache`; without one every encrypt
            wraps a new DEK and every decrypt unwraps through the KMS.
        :param database: where KEK versions live: ``sqlite:///path/keys.db``,
            ``postgresql://...``, an asyncpg pool, an aiosqlite connection, or a
            :class:`~encx_async.KeyStore` of your own (opened and closed by the
            Crypto, as the stores it makes from a URL are). By
            default ``$ENCX_DATABASE_URL``, else the provider's own: in memory
            for an in-memory LocalKMSService, ``<key file>.versions.db`` for one
            with a key file, a file per AWS account, region and endpoint under
            ``~/.local/share/encx-async/`` for KMSService (see
            :attr:`database_url`). A pool or connection you pass stays yours
            to close.
        :param create_key_if_missing: create the KMS key and alias when the alias
            does not exist yet (once, whatever the number of instances starting).
        :param rotation: how :meth:`rotate_kek` rotates: ``"new-key"`` (a new KMS
            key, the alias moved to it) or ``"kms-managed"`` (new key material
            inside the same KMS key, ``RotateKeyOnDemand``).
        :param version_check_interval: seconds between background re-reads of the
            versions: the bound on how long an instance keeps encrypting under a
            version another instance has rotated away from. Measured by the DEK
            cache's clock when there is a cache (a fake one in tests drives both).
        :param thread_threshold: payloads of at least this many bytes go to a
            worker thread (and get a Cobblestone-256 body); at most 16 MiB.
        :param store_timeout: seconds each step of a PostgreSQL key-store
            operation may take (connecting, waiting for a pooled connection or
            the rotation lock, a statement, giving the connection back), and
            seconds a SQLite statement may wait for another process's lock on
            the file; one that runs out raises
            :class:`~encx_async.DatabaseUnavailableError`.
        """
        # Not open until _start() succeeds: closed, as far as every call and
        # __del__ can tell, so one that is never opened does not warn.
        self._closed = True
        self._opened = False
        if not isinstance(kms, KeyManagementService):
            raise ConfigurationError("kms must implement encx_async.KeyManagementService")
        if not isinstance(kek_alias, str) or not kek_alias:
            raise ConfigurationError("kek_alias must be a non-empty str such as 'alias/my-key'")
        if pepper is not None and not isinstance(pepper, Pepper):
            pepper = Pepper(pepper)  # checks size, type and zeros; version 1
        if argon2 is not None and not isinstance(argon2, Argon2Params):
            raise ConfigurationError("argon2 must be an encx_async.Argon2Params")
        if dek_cache is not None and not isinstance(dek_cache, DEKCache):
            raise ConfigurationError("dek_cache must be an encx_async.DEKCache")
        if rotation not in ROTATIONS:
            raise ConfigurationError(f"rotation must be one of {', '.join(ROTATIONS)}")
        if not version_check_interval > 0:
            raise ConfigurationError("version_check_interval must be positive")
        if not store_timeout > 0:
            raise ConfigurationError("store_timeout must be positive")
        if not 1 <= thread_threshold <= MAX_BUFFERED_GCM_BODY:
            # Below the threshold, encrypt makes AES-GCM bodies, which can only be
            # checked whole: the bound keeps every envelope openable as a stream.
            raise ConfigurationError(
                f"thread_threshold must be 1 to {MAX_BUFFERED_GCM_BODY} bytes (16 MiB)"
            )
        self._kms = kms
        # Asked once per wrapped key (never per message) when the provider can
        # wrap a key only in part (a region was down).
        self._partial_wrap = kms.partial_wrap if isinstance(kms, PartialWrapping) else None
        self._kek_alias = kek_alias
        check_database(database)
        self._database = database
        self._create_key_if_missing = create_key_if_missing
        self._version_check_interval = version_check_interval
        self._store_timeout = store_timeout
        self._key_ids: dict[int, str] = {}
        self._basic: BasicHasher | None = None
        self._secure: SecureHasher | None = None
        if pepper is not None:
            self._basic = BasicHasher(pepper.secret, pepper.version)
            self._secure = SecureHasher(pepper.secret, pepper.version, argon2 or Argon2Params())
        self._cache = dek_cache
        self._thread_threshold = thread_threshold
        self._rotation: Rotation = rotation
        self._kms_calls: Counter[str] = Counter()
        # Keys of failed rotations that could not be cleaned up yet.
        self._unrecorded: list[Unrecorded] = []
        self._forked = False  # closed by a fork: this process is the child
        self._failed_to_open = False
        self._encrypt_side: _Side[Sealer] | None = None
        self._decrypt_side: _Side[Sealer] | None = None
        self._max_cached_bytes = self._max_cached_uses = 0
        #: messages below this size are sealed inline with a cached key
        self._small_cached = 0
        self._contexts = ContextMemo()
        #: the cached key used last, reused at once (see _fastpath); with a cache only
        self._fast: FastPath | None = None
        if dek_cache is not None:
            self._encrypt_side, self._decrypt_side = dek_cache._bind(
                self,
                self._load_for_encrypt,  # type: ignore[arg-type]
                self._open_sealer,  # type: ignore[arg-type]
            )
            self._max_cached_bytes = dek_cache.max_bytes_per_dek
            self._max_cached_uses = dek_cache.max_messages_per_dek
            self._small_cached = min(thread_threshold, dek_cache.max_bytes_per_dek + 1)
        forget_in_child(self)

    @classmethod
    async def create(
        cls,
        *,
        kms: KeyManagementService,
        kek_alias: str,
        pepper: Pepper | Bytes | None = None,
        argon2: Argon2Params | None = None,
        dek_cache: DEKCache | None = None,
        database: object = None,
        create_key_if_missing: bool = False,
        rotation: Rotation = "new-key",
        version_check_interval: float = 30.0,
        thread_threshold: int = DEFAULT_THREAD_THRESHOLD,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
    ) -> Crypto:
        """An open Crypto, for code that cannot use ``async with Crypto(...)``.

        Takes the same arguments as :class:`Crypto`; close it with :meth:`aclose`.
        """
        crypto = cls(
            kms=kms,
            kek_alias=kek_alias,
            pepper=pepper,
            argon2=argon2,
            dek_cache=dek_cache,
            database=database,
            create_key_if_missing=create_key_if_missing,
            rotation=rotation,
            version_check_interval=version_check_interval,
            thread_threshold=thread_threshold,
            store_timeout=store_timeout,
        )
        await crypto._start()
        return crypto

    async def _start(self) -> None:
        """Open the key-version store and read (or make) the versions of the alias."""
        if self._opened:
            raise ConfigurationError("this Crypto was opened already: open it once")
        self._opened = True
        try:
            await self._connect()
        except BaseException:
            self._failed_to_open = True
            if self._cache is not None:
                self._cache._release(self)  # for the Crypto made to try again
            raise

    async def _connect(self) -> None:
        kms, kek_alias = self._kms, self._kek_alias
        database = await resolve_database(self._database, kms, kek_alias)
        store = open_keystore(database, timeout=self._store_timeout)
        await store.open()
        # One clock per Crypto, so the fast path reads it once per message.
        clock = self._cache.clock if self._cache is not None else time.monotonic
        keyring = KeyRing(
            store, kek_alias, check_interval=self._version_check_interval, clock=clock
        )
        self._keyring = keyring
        self._key_ids = keyring.key_ids
        if self._encrypt_side is not None and self._decrypt_side is not None:
            self._fast = FastPath(
                self._encrypt_side,
                self._decrypt_side,
                keyring,
                small=self._thread_threshold,
                shortest_body=_MIN_RAW,
            )
            keyring.on_change = self._fast.forget  # it names KEK versions
        try:
            first_key = partial(self._first_key, self._create_key_if_missing)
            current = await keyring.start(first_key)
            # Fail now, not at the first encrypt, if the database names a key the
            # KMS does not have (another account or region, a deleted key).
            try:
                await self._call_kms("get_key_id", kms.get_key_id(current.key_id))
            except KMSKeyNotFoundError as exc:
                raise KMSKeyNotFoundError(
                    f"the key-version database {store.url} says KEK version {current.version} "
                    f"of {kek_alias!r} is key {current.key_id}, which this KMS does not have: "
                    "the database was written with another KMS (account, region or local key "
                    "file), or the key was deleted. Pass the database= that belongs to this "
                    "KMS, or leave database= and ENCX_DATABASE_URL unset to get this "
                    "provider's own",
                    code=exc.code,
                    database=store.url,
                ) from exc
            listen = getattr(store, "listen", None)
            if listen is not None:
                # None: the listener was away, and may have missed this alias's news.
                await listen(
                    lambda alias: keyring.check_soon() if alias in (None, kek_alias) else None
                )
        except BaseException:
            await keyring.aclose()
            raise
        self._closed = False
        logger.info(
            "Crypto ready: KEK %s version %d is %s (versions in %s)",
            kek_alias,
            current.version,
            current.key_id,
            store.url,
        )

    async def _first_key(self, create_if_missing: bool, current: KEKVersion | None) -> str:
        """The key of version 1: the alias's key, or a new one if asked."""
        try:
            return await self._call_kms("get_key_id", self._kms.get_key_id(self._kek_alias))
        except KMSKeyNotFoundError:
            if not create_if_missing:
                raise
        description = f"encx-async KEK {self._kek_alias}"
        try:
            return await self._call_kms(
                "create_key", self._kms.create_key(description, alias=self._kek_alias)
            )
        except KMSError as exc:
            if exc.code != "AlreadyExistsException":
                raise
            # Another instance, with another database, created it a moment ago.
            return await self._call_kms("get_key_id", self._kms.get_key_id(self._kek_alias))

    # -- lifecycle ---------------------------------------------------------------

    async def aclose(self) -> None:
        """Wipe cached keys, close the key store, refuse further use.

        Idempotent. It leaves the KMS service open, and a database pool or
        connection that was passed in, since those belong to whoever opened them.
        In a child process forked after the Crypto was created it does nothing:
        the key store's connections and threads are the parent's.
        """
        if self._closed:
            return
        self._closed = True
        self._basic = self._secure = None  # the keys derived from the pepper go too
        if self._fast is not None:
            self._fast.forget()
        if self._cache is not None:
            await self._cache.aclose()
        await self._keyring.aclose()

    async def __aenter__(self) -> Self:
        if not self._opened:
            await self._start()  # async with Crypto(...)
        self._check_open()  # async with await Crypto.create(...)
        return self

    def __del__(self) -> None:
        # As an unclosed file does: say so, and name the object. Nothing else is
        # needed to let the process exit, since the key store keeps no thread.
        if not getattr(self, "_closed", True):
            warnings.warn(
                f"unclosed {self!r}: use 'async with' or await aclose()",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    def _after_fork_in_child(self) -> None:
        # The hot sealers are the parent's keys (their cache forgets them too; a
        # retired one may be waiting for a wipe the parent's loop will never run
        # here). The KMS client, the key store and the tasks belong to the
        # parent's event loop: closed as far as this process goes, so aclose()
        # leaves the parent's connections and threads alone, and the first use
        # raises ForkedError, from the checks every call makes anyway.
        if self._fast is not None:
            for hot in self._fast.sealers():
                hot.wipe()
            self._fast.forget()
        self._forked = not self._closed  # one closed before the fork stays merely closed
        self._closed = True
        self._basic = self._secure = None
        self._kms_calls = Counter()

    def _closed_error(self) -> ClosedError:
        if self._forked:
            return ForkedError(
                "this Crypto was created before os.fork() and cannot be used in the child "
                "process: create a Crypto in each process, after the fork"
            )
        if not self._opened:
            return ClosedError(
                "this Crypto is not open: use 'async with Crypto(...) as crypto', "
                "or 'crypto = await Crypto.create(...)'"
            )
        if self._failed_to_open:
            return ClosedError(
                "this Crypto failed to open (its opening raised why): make a new Crypto "
                "to try again; the same DEKCache may be given to it"
            )
        return ClosedError("this Crypto is closed")

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def __repr__(self) -> str:
        state = "open" if not self._closed else "closed" if self._opened else "not open"
        cache = "on" if self._cache is not None else "off"
        keyring = getattr(self, "_keyring", None)
        version = keyring.current if keyring is not None else None
        return (
            f"<Crypto kek_alias={self._kek_alias!r} kek_version={version} "
            f"dek_cache={cache} {state}>"
        )

    # -- introspection -----------------------------------------------------------

    @property
    def kek_alias(self) -> str:
        return self._kek_alias

    @property
    def database_url(self) -> str:
        """The key-version database in use, any password removed: safe to log."""
        return self._opened_keyring().store.url

    @property
    def kek_version(self) -> int:
        """The KEK version new data is encrypted under."""
        return self._opened_keyring().current

    @property
    def key_id(self) -> str:
        """The KMS key id of the current KEK version."""
        return self._key_ids[self._opened_keyring().current]

    def _opened_keyring(self) -> KeyRing:
        """The key ring, which an unopened Crypto does not have yet (ClosedError)."""
        keyring: KeyRing | None = getattr(self, "_keyring", None)
        if keyring is None or self._failed_to_open:
            raise self._closed_error()
        return keyring

    def stats(self) -> CryptoStats:
        cache = self._cache.stats() if self._cache is not None else None
        return CryptoStats(kms_calls=MappingProxyType(dict(self._kms_calls)), cache=cache)

    async def check(self, *, timeout: float = DEFAULT_CHECK_TIMEOUT) -> HealthReport:  # noqa: ASYNC109 (a probe bounds itself)
        """Ask the KMS about the current KEK, for a readiness probe; decrypts nothing.

        Uses the provider's ``describe_key`` (both bundled providers have it),
        else wraps a throwaway random key. KMS trouble (unreachable, slower than
        ``timeout`` seconds, access denied, a disabled or deleted key) is
        reported as ``ok=False`` with the reason, not raised; the call is
        counted in :meth:`stats` like any other. Raises
        :class:`~encx_async.ClosedError` after :meth:`aclose`.
        """
        self._check_open()
        return await run_check(
            self._kms,
            self._call_kms,
            kek_alias=self._kek_alias,
            kek_version=self.kek_version,
            key_id=self.key_id,
            timeout=timeout,
        )

    def kek_versions(self) -> list[KEKVersion]:
        """Every KEK version of the alias this Crypto knows, oldest first."""
        return self._opened_keyring().versions()

    # -- high-level API ----------------------------------------------------------

    async def encrypt(
        self, plaintext: Bytes, *, context: Context | None = None, aad: Bytes | None = None
    ) -> bytes:
        """Encrypt ``plaintext`` into a self-describing envelope.

        :param context: the KMS encryption context (for example a tenant): not
            secret, logged by the KMS, needed again to decrypt. Messages under
            different contexts never share a DEK.
        :param aad: per-record associated data (for example the record's id):
            authenticated, not stored, not sent to the KMS, needed again to
            decrypt. It does not split the cache, so it is the place for ids.
        """
        # The cached path runs without a single suspension: keep it lean.
        if self._closed:
            raise self._closed_error()
        if type(plaintext) is not bytes:
            plaintext = bytes(_check_bytes("plaintext", plaintext))
        if aad is not None and type(aad) is not bytes:
            aad = _aad_bytes(aad)
        fast = self._fast
        if fast is not None:
            blob = fast.seal(plaintext, context, aad)
            if blob is not None:
                return blob
        keyring = self._keyring
        keyring.check_if_due()  # another instance may have rotated: look, in the background
        version = keyring.current
        ctx, kept = self._contexts.encode(context)
        key = (self._key_ids[version], version, ctx)
        size = len(plaintext)
        side = self._encrypt_side
        if fast is not None and side is not None and size < self._small_cached:
            sealer = side.take(key, size) or await side.get(key, size)
            fast.remember_seal(kept, key)
            return sealer.seal_small(plaintext, aad)
        async with self._encrypt_lease(key, size) as sealer:
            if size < self._thread_threshold:
                return sealer.seal_small(plaintext, aad)
            return await anyio.to_thread.run_sync(sealer.seal_large_job(plaintext, aad))

    async def decrypt(
        self, blob: Bytes, *, context: Context | None = None, aad: Bytes | None = None
    ) -> bytes:
        """Decrypt an envelope made by :meth:`encrypt` with the same context and aad.

        Any tampering, truncation, wrong key, context or aad raises
        :class:`~encx_async.DecryptionError`.
        """
        if self._closed:
            raise self._closed_error()
        if aad is not None and type(aad) is not bytes:
            aad = _aad_bytes(aad)
        fast = self._fast
        if fast is not None:
            plaintext = fast.open(blob, context, aad)
            if plaintext is not None:
                return plaintext
        self._keyring.check_if_due()  # retirements reach instances that only decrypt, too
        ctx, kept = self._contexts.encode(context)
        envelope = parse(blob)
        if envelope.kek_version not in self._key_ids:
            # Unknown here (a newer version, or a forged number) or retired: ask the store.
            await self._keyring.key_id_for(envelope.kek_version)
        # Keyed by the envelope's binding (KEK version, wrapped DEK, commitment):
        # a sealer is only ever made for a binding whose commitment matched its DEK.
        key = (envelope.binding, ctx)
        side = self._decrypt_side
        if (
            fast is not None
            and side is not None
            and envelope.body_kind == BODY_GCM
            and len(envelope.blob) < self._thread_threshold
        ):
            sealer = side.take(key, None) or await side.get(key, None)
            plaintext = sealer.open_small(envelope, aad)
            fast.remember_open(kept, key, envelope.kek_version)
            return plaintext
        async with self._decrypt_lease(key) as sealer:
            return await self._open(sealer, envelope, aad)

    async def _open(self, sealer: Sealer, envelope: Envelope, aad: bytes | None) -> bytes:
        if envelope.body_kind == BODY_GCM and len(envelope.blob) < self._thread_threshold:
            return sealer.open_small(envelope, aad)
        return await anyio.to_thread.run_sync(sealer.open_job(envelope, aad))

    def _encrypt_lease(self, key: EncryptKey, size: int, uses: int = 1) -> _Lease:
        """The sealer for ``uses`` messages of ``size`` bytes in all under ``key``:
        the cache's when it may serve them, else a new DEK, wiped after use."""
        side = self._encrypt_side
        if side is not None and size <= self._max_cached_bytes and uses <= self._max_cached_uses:
            return _Lease(partial(side.get, key, size, uses), owned=False)
        return _Lease(partial(self._load_for_encrypt, key), owned=True)

    def _decrypt_lease(self, key: DecryptKey) -> _Lease:
        """The sealer for an envelope's binding and context, as :meth:`_encrypt_lease`."""
        side = self._decrypt_side
        if side is not None:
            return _Lease(partial(side.get, key, None), owned=False)
        return _Lease(partial(self._open_sealer, key), owned=True)

    async def _load_for_encrypt(self, key: EncryptKey) -> Sealer:
        key_id, version, ctx = key
        return await self._new_sealer(version, key_id, ctx)

    async def _new_sealer(self, version: int, key_id: str, ctx: bytes) -> Sealer:
        dek = DataKey.generate()
        try:
            wrapped = await self._wrap(version, key_id, dek, decode_context(ctx))
            if not 0 < len(wrapped) <= MAX_WRAPPED_DEK:
                raise EncryptionError(
                    f"the KMS returned a wrapped key of {len(wrapped)} bytes; "
                    f"the envelope holds at most {MAX_WRAPPED_DEK}"
                )
            sealer = Sealer(EnvelopeCipher(dek), version, wrapped, ctx)
            if self._partial_wrap is not None:
                # A partial wrap serves the DEK cache only until a whole one may be
                # made: records written meanwhile lack the missing copies.
                sealer.lifetime = self._partial_wrap(key_id, wrapped)
            if self._cache is not None:
                # What we just wrapped we can read back without asking the KMS.
                twin = Sealer(EnvelopeCipher(dek), version, wrapped, ctx)
                self._cache.remember_for_decrypt((twin.binding, ctx), twin)
            return sealer
        finally:
            dek.wipe()

    async def _open_sealer(self, key: DecryptKey) -> Sealer:
        binding, ctx = key
        version, wrapped, commitment = split_binding(binding)
        key_id = await self._keyring.key_id_for(version)
        dek = await self._unwrap(version, key_id, wrapped, decode_context(ctx))
        try:
            sealer = Sealer(EnvelopeCipher(dek), version, wrapped, ctx)
        finally:
            dek.wipe()
        try:
            sealer.check_commitment(commitment)
        except DecryptionError:
            sealer.wipe()
            raise
        return sealer

    # -- streams --------------------------------------------------------------

    def encrypt_stream(
        self, source: Source, *, context: Context | None = None, aad: Bytes | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Encrypt a stream of byte chunks; returns an async iterator of ciphertext chunks.

        ``source`` is an async iterable of bytes (an aiohttp request body's
        ``iter_chunked``, an anyio byte stream, an async generator) or a plain
        iterable of bytes. The output is one envelope, the one :meth:`encrypt`
        would make for the whole payload, whatever the chunking: a header
        naming a fresh DEK (one KMS call per stream), then a Cobblestone-256
        body. Memory stays at about one chunk. Wrap the iterator in
        :func:`contextlib.aclosing` if you may stop before its end.
        """
        ctx, extra = self._stream_inputs(context, aad)
        return self._seal_stream(check_source(source), ctx, extra)

    def _stream_inputs(
        self, context: Context | None, aad: Bytes | None
    ) -> tuple[bytes, bytes | None]:
        """The encoded context and aad of a streaming call, checked before anything runs."""
        self._check_open()
        return self._contexts.encode(context)[0], None if aad is None else _aad_bytes(aad)

    async def _seal_stream(
        self, chunks: AsyncGenerator[Bytes, None], ctx: bytes, aad: bytes | None
    ) -> AsyncGenerator[bytes, None]:
        async with aclosing(chunks):
            header, encryptor = await self._stream_encryptor(ctx, aad)
            async for out in seal_body(header, encryptor, chunks):
                self._check_open()  # aclose() ends streams in flight too
                yield out

    async def _stream_encryptor(
        self, ctx: bytes, aad: bytes | None
    ) -> tuple[bytes, Cobblestone256Encryptor]:
        # A fresh DEK per stream, outside the cache: a stream's size is not known
        # when it starts, so it cannot be charged against a cached DEK's byte
        # limit, and one KMS call is nothing next to a large payload.
        self._check_open()
        self._keyring.check_if_due()  # another instance may have rotated
        version = self._keyring.current
        sealer = await self._new_sealer(version, self._key_ids[version], ctx)
        try:
            return sealer.stream_header, sealer.stream_encryptor(aad)
        finally:
            sealer.wipe()

    def decrypt_stream(
        self, source: Source, *, context: Context | None = None, aad: Bytes | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Decrypt a stream made by :meth:`encrypt_stream` (or a blob of :meth:`encrypt`).

        Yields plaintext as it is authenticated. Every byte yielded is genuine
        and in its place, but only the end of the iteration proves that nothing
        is missing: a truncated, reordered, modified or extended stream, or a
        wrong context or aad, raises :class:`~encx_async.DecryptionError` instead
        of ending. So treat the output as provisional until the loop finishes
        (:meth:`decrypt_file` does that for you).
        """
        ctx, extra = self._stream_inputs(context, aad)
        return self._open_stream(check_source(source), ctx, extra)

    async def _open_stream(
        self, chunks: AsyncGenerator[Bytes, None], ctx: bytes, aad: bytes | None
    ) -> AsyncGenerator[bytes, None]:
        async with aclosing(chunks):
            envelope, first = await read_header(chunks)
            async with await self._stream_lease(envelope, ctx) as sealer:
                decryptor = self._body_opener(sealer, envelope, aad)
                async for out in open_body(decryptor, first, chunks):
                    self._check_open()  # aclose() ends streams in flight too
                    yield out

    async def _stream_lease(self, envelope: Envelope, ctx: bytes) -> _Lease:
        """The lease of ``envelope``'s DEK, once its version is known usable."""
        self._check_open()
        self._keyring.check_if_due()  # another instance may have retired a version
        if envelope.kek_version not in self._key_ids:
            await self._keyring.key_id_for(envelope.kek_version)
        return self._decrypt_lease((envelope.binding, ctx))

    @staticmethod
    def _body_opener(sealer: Sealer, envelope: Envelope, aad: bytes | None) -> StreamTransform:
        if envelope.body_kind == BODY_GCM:
            return GcmBody(envelope.header, sealer.gcm_opener(aad))
        return sealer.stream_decryptor(aad)

    async def encrypt_file(
        self,
        src: str | os.PathLike[str],
        dst: str | os.PathLike[str],
        *,
        context: Context | None = None,
        aad: Bytes | None = None,
    ) -> int:
        """Encrypt the file ``src`` into ``dst``, as :meth:`encrypt_stream` would.

        The reading, the encryption and the writing run in a worker thread.
        ``dst`` appears only once complete (written to a temporary file beside
        it, mode 0600, then renamed). Returns the number of plaintext bytes.
        """
        ctx, extra = self._stream_inputs(context, aad)
        source, target = await anyio.to_thread.run_sync(check_paths, src, dst)
        header, encryptor = await self._stream_encryptor(ctx, extra)
        job = partial(transform_file, source, target, skip=0, prefix=header, transform=encryptor)
        return await run_file_job(job)

    async def decrypt_file(
        self,
        src: str | os.PathLike[str],
        dst: str | os.PathLike[str],
        *,
        context: Context | None = None,
        aad: Bytes | None = None,
    ) -> int:
        """Decrypt the file ``src`` (from :meth:`encrypt_file` or :meth:`encrypt`) into ``dst``.

        ``dst`` appears only if the whole file decrypted and authenticated; on
        :class:`~encx_async.DecryptionError` nothing is written and an existing
        ``dst`` is left untouched. Returns the number of ciphertext bytes read.
        """
        ctx, extra = self._stream_inputs(context, aad)
        source, target = await anyio.to_thread.run_sync(check_paths, src, dst)
        envelope = await anyio.to_thread.run_sync(read_file_header, source)
        async with await self._stream_lease(envelope, ctx) as sealer:
            opener = self._body_opener(sealer, envelope, extra)
            job = partial(
                transform_file, source, target, skip=envelope.body_at, prefix=b"", transform=opener
            )
            return envelope.body_at + await run_file_job(job)

    async def rewrap_file(
        self,
        src: str | os.PathLike[str],
        dst: str | os.PathLike[str],
        *,
        context: Context | None = None,
    ) -> bool:
        """:meth:`rewrap` the envelope in the file ``src`` into ``dst``, without decrypting it.

        Only the header changes; the body is copied byte for byte in a worker
        thread, and ``dst`` appears only once complete. Returns whether the
        header changed (False: the file was on the current version already,
        and ``dst`` is a copy).
        """
        self._check_open()
        source, target = await anyio.to_thread.run_sync(check_paths, src, dst)
        envelope = await anyio.to_thread.run_sync(read_file_header, source)
        header = await self._rewrap(envelope, context, {})
        job = partial(
            transform_file, source, target, skip=envelope.body_at, prefix=header, transform=None
        )
        await run_file_job(job)
        return header != envelope.header

    # -- keyed hashes ---------------------------------------------------------

    def hash_basic(self, value: object, *, domain: Domain) -> str:
        """A deterministic, keyed blind index of ``value`` in ``domain``, to look records up by.

        HMAC-SHA-256, under a key derived from the pepper for ``domain`` alone,
        over the canonical encoding of ``value`` (str, bytes, int, float, bool,
        datetime, date, UUID, Decimal, None, or a list of them). Equal values
        in one domain give equal strings; in two domains, unrelated ones, so
        one column cannot be matched against another. ``domain`` names the
        column: a str (``"users.email"``) or a tuple of strs. Without the
        pepper nobody can confirm a guess. For a model's ``HashBasic()`` field
        use :meth:`blind_index`, which knows the field's domain.
        """
        return self._basic_hasher().hash(value, domain=domain)

    def verify_basic(self, value: object, digest: str, *, domain: Domain) -> bool:
        """Whether ``digest`` is :meth:`hash_basic` of ``value`` in ``domain``, in constant time.

        A legacy hb1 ``digest`` is checked against :meth:`legacy_hash_basic`,
        whatever the domain.
        """
        return self._basic_hasher().verify(value, digest, domain=domain)

    def legacy_hash_basic(self, value: object) -> str:
        """The legacy hb1 blind index of ``value``: one key for every field and model.

        Only for finding rows not yet re-indexed (:meth:`needs_reindex`), next
        to the current index (``WHERE email_hash IN ($1, $2)``). Warns
        DeprecationWarning on every call.
        """
        hasher = self._basic_hasher()
        warnings.warn(_LEGACY_WARNING, DeprecationWarning, stacklevel=2)
        return hasher._legacy_hash(value)

    def needs_reindex(self, digest: str) -> bool:
        """Whether a stored blind index should be recomputed: it is hb1, or of an older pepper.

        False for an hb2 index of this Crypto's pepper version. Raises
        :class:`~encx_async.InvalidHashError` for a string that is no blind
        index, or that names a pepper version newer than this Crypto's.
        """
        return self._basic_hasher().needs_reindex(digest)

    def blind_index(self, model: type, field: str, value: object) -> str:
        """The blind index ``model``'s ``HashBasic()`` field ``field`` stores for ``value``.

        What to search its ``<field>_hash`` column with: :meth:`hash_basic`
        in the field's domain, of ``value`` checked and converted as
        :meth:`encrypt_model` does it (an int for a float field is hashed as
        a float).
        """
        return _models.blind_index(self, model, field, value)

    async def hash_secure(self, value: object) -> str:
        """A salted Argon2id hash of ``value`` (a PHC string), for passwords and the like.

        The pepper is Argon2's secret input; the work runs in a worker thread.
        """
        return await self._secure_hasher().hash(value)

    async def verify_secure(self, value: object, phc: str) -> bool:
        """Whether ``phc`` is a :meth:`hash_secure` of ``value``.

        Stored parameters outside the configured bounds raise
        :class:`~encx_async.InvalidHashError` before any work is done.
        """
        return await self._secure_hasher().verify(value, phc)

    def needs_rehash(self, phc: str) -> bool:
        """Whether an Argon2id ``phc`` was made with other parameters or another pepper version.

        Blind indexes have :meth:`needs_reindex` instead.
        """
        return self._secure_hasher().needs_rehash(phc)

    def _basic_hasher(self) -> BasicHasher:
        self._check_open()
        if self._basic is None:
            raise ConfigurationError("keyed hashes need a pepper: Crypto(pepper=...)")
        return self._basic

    def _secure_hasher(self) -> SecureHasher:
        self._check_open()
        if self._secure is None:
            raise ConfigurationError("keyed hashes need a pepper: Crypto(pepper=...)")
        return self._secure

    # -- models: dataclasses and pydantic models with marked fields ----------

    async def encrypt_model(
        self, obj: object, *, context: Context | None = None, record_id: object = None
    ) -> EncryptedRecord:
        """The storable form of ``obj``, whose fields are marked ``Encrypt()``,
        ``HashBasic()`` or ``HashSecure()`` (see ``docs/models.md``).

        :param record_id: the record's primary key, when it has one: its
            ciphertexts are then bound to it and cannot be moved to another row.
            Without it, nothing ties them to their row: with a DEK cache, the
            records sealed under one key share a header, and an encrypted column
            copied from one to another decrypts there. Pass it for every table
            that has a key.
        """
        return await _models.encrypt_model(self, obj, context=context, record_id=record_id)

    async def decrypt_model(
        self,
        record: EncryptedRecord | Mapping[str, object],
        model: type[T],
        *,
        context: Context | None = None,
        record_id: object = None,
    ) -> T:
        """Rebuild a ``model`` instance from :meth:`encrypt_model`'s record (or its dict).

        Hash-only fields are not restored: they take their default. ``record_id``
        must be the one the record was encrypted with; without one, a column
        moved in from another record sealed under the same key goes unnoticed.
        """
        return await _models.decrypt_model(
            self, record, model, context=context, record_id=record_id
        )

    async def encrypt_models(
        self,
        objs: Iterable[object],
        *,
        context: Context | None = None,
        record_id: Callable[[Any], object] | None = None,
        concurrency: int = 16,
    ) -> list[EncryptedRecord]:
        """:meth:`encrypt_model` for many objects, in order, ``concurrency`` at a time.

        ``record_id`` maps an object to its id (for example ``lambda u: u.id``).
        Without it, records sealed under one cached key can trade encrypted
        columns unnoticed; see :meth:`encrypt_model`.
        """
        return await _models.encrypt_models(
            self, objs, context=context, record_id=record_id, concurrency=concurrency
        )

    async def decrypt_models(
        self,
        records: Iterable[EncryptedRecord | Mapping[str, object]],
        model: type[T],
        *,
        context: Context | None = None,
        record_id: Callable[[EncryptedRecord], object] | None = None,
        concurrency: int = 16,
    ) -> list[T]:
        """:meth:`decrypt_model` for many records, in order, ``concurrency`` at a time."""
        return await _models.decrypt_models(
            self, records, model, context=context, record_id=record_id, concurrency=concurrency
        )

    # -- records: several fields under one DEK --------------------------------

    async def seal_record(
        self,
        fields: Mapping[str, Bytes],
        *,
        context: Context | None = None,
        aad: Bytes | None = None,
    ) -> SealedRecord:
        """Encrypt the fields of one record under one DEK, each bound to its name.

        The result keeps the header (KEK version, wrapped DEK, key commitment)
        once for the record, and per field only ``nonce || ciphertext || tag``:
        a record of ten fields stores one wrapped DEK, not ten. Swapping two
        fields' ciphertexts, or moving one to another record with another
        ``aad`` (say, the record's id), fails to decrypt. ``context`` is the KMS
        encryption context, as for :meth:`encrypt`.
        """
        self._check_open()
        plaintexts = {
            _field_name(name): _check_bytes("a field value", v) for name, v in fields.items()
        }
        if aad is not None and type(aad) is not bytes:
            aad = _aad_bytes(aad)
        ctx = self._contexts.encode(context)[0]
        self._keyring.check_if_due()
        version = self._keyring.current
        key = (self._key_ids[version], version, ctx)
        size, uses = sum(len(v) for v in plaintexts.values()), max(1, len(plaintexts))
        async with self._encrypt_lease(key, size, uses) as sealer:
            job = sealer.fields_job(plaintexts, aad, seal=True)  # the key taken before any hop
            return SealedRecord(sealer.header, await self._run_fields(job, size))

    async def open_record(
        self,
        record: SealedRecord,
        *,
        context: Context | None = None,
        aad: Bytes | None = None,
    ) -> dict[str, bytes]:
        """Decrypt the fields of a :meth:`seal_record` result (all, or any subset).

        Any tampering, a field under another name, or a wrong context or aad
        raises :class:`~encx_async.DecryptionError`.
        """
        self._check_open()
        header, fields = record
        if type(header) is not bytes:
            header = bytes(_check_bytes("a record header", header))
        bodies = {
            _field_name(name): bytes(_check_bytes("a field", v)) for name, v in fields.items()
        }
        if aad is not None and type(aad) is not bytes:
            aad = _aad_bytes(aad)
        ctx = self._contexts.encode(context)[0]
        envelope = parse_record_header(header)
        self._keyring.check_if_due()
        if envelope.kek_version not in self._key_ids:
            await self._keyring.key_id_for(envelope.kek_version)
        size = sum(len(v) for v in bodies.values())
        async with self._decrypt_lease((envelope.binding, ctx)) as sealer:
            job = sealer.fields_job(bodies, aad, seal=False)
            return await self._run_fields(job, size)

    async def _run_fields(self, job: Callable[[], dict[str, bytes]], size: int) -> dict[str, bytes]:
        """Run a fields job inline when small, in a worker thread when large."""
        if size < self._thread_threshold:
            return job()
        return await anyio.to_thread.run_sync(job)

    # -- rotation --------------------------------------------------------------

    async def rotate_kek(
        self, *, rotation: Rotation | None = None, strategy: Rotation | None = None
    ) -> KEKVersion:
        """Rotate the KEK and record the new version; new data is encrypted under it.

        ``rotation`` (by default the one given to the Crypto):
        ``"new-key"`` creates a KMS key and moves the alias to it;
        ``"kms-managed"`` has the KMS give the same key new material
        (``RotateKeyOnDemand``). Either way older data still decrypts, and the
        version is recorded under the database's write lock, so concurrent
        rotations from many instances number their versions without gaps.
        Other instances switch within ``version_check_interval``.

        ``strategy`` is the former name of ``rotation``, deprecated.
        """
        self._check_open()
        if strategy is not None:
            warnings.warn(
                "rotate_kek(strategy=...) is deprecated: use rotate_kek(rotation=...)",
                DeprecationWarning,
                stacklevel=2,
            )
            if rotation is not None and rotation != strategy:
                raise ConfigurationError(
                    "rotate_kek got both rotation= and strategy= (its former name): "
                    "pass rotation= only"
                )
            rotation = strategy
        kms = self._rotation_service()
        chosen = rotation or self._rotation
        if chosen not in ROTATIONS:
            raise ConfigurationError(f"rotation must be one of {', '.join(ROTATIONS)}")
        alias = self._kek_alias
        if chosen == "new-key" and not alias.startswith("alias/"):
            raise ConfigurationError(
                "new-key rotation moves an alias, so kek_alias must be 'alias/...'; "
                "use rotation='kms-managed' to rotate a key named by id or ARN"
            )

        await self._discard_unrecorded_keys(None)
        made: list[Unrecorded] = []

        async def new_key(current: KEKVersion | None) -> str:
            if current is None:  # pragma: no cover - the key ring always starts with a version
                raise KeyStoreCorruptError(f"alias {alias!r} has no KEK version to rotate from")
            if chosen == "kms-managed":
                await self._call_kms("rotate_key_material", kms.rotate_key_material(current.key_id))
                return current.key_id
            description = f"encx-async KEK {alias} version {current.version + 1}"
            try:
                key_id = await create_and_learn_id(
                    self._call_kms("create_key", self._kms.create_key(description))
                )
            except asyncio.CancelledError as exc:
                created = getattr(exc, "created_key_id", None)
                if created is not None:
                    made.append(Unrecorded(created, current.key_id))
                raise
            made.append(Unrecorded(key_id, current.key_id, alias_moved=True))
            await self._call_kms("update_alias", kms.update_alias(alias, key_id))
            return key_id

        try:
            created = await self._keyring.rotate(new_key)
        except BaseException as exc:
            if made:
                self._unrecorded.extend(made)
                await to_the_end(self._discard_unrecorded_keys(exc))
            raise
        logger.info(
            "KEK %s rotated (%s): version %d is %s",
            alias,
            chosen,
            created.version,
            created.key_id,
        )
        return created

    async def _discard_unrecorded_keys(self, failure: BaseException | None) -> None:
        """Clean up after the keys of failed rotations (see ``_orphans``); name
        those that are left in ``failure``."""
        if not self._unrecorded:
            return
        pending, self._unrecorded = self._unrecorded, []
        for key in pending:
            outcome = await discard(self._kms, self._keyring.store, self._kek_alias, key, failure)
            if outcome == "kept":
                self._unrecorded.append(key)
        kept = tuple(key.key_id for key in self._unrecorded)
        if kept and isinstance(failure, EncxError):
            failure.orphan_key_ids = kept
            failure.add_note(
                f"KMS key(s) made but not recorded, and not scheduled for deletion: "
                f"{', '.join(kept)}"
            )

    async def retire_kek_version(self, version: int) -> KEKVersion:
        """Refuse, from now on, to decrypt data under ``version`` (rewrap it first).

        The current version cannot be retired: rotate first. Retiring a version
        retired already returns it as it is.
        """
        self._check_open()
        if version == self.kek_version:
            raise ConfigurationError(f"version {version} is current: rotate before retiring it")
        known = {v.version: v for v in self._keyring.versions()}.get(version)
        if known is not None and known.state == "retired":
            return known
        await self._keyring.key_id_for(version)  # KeyVersionNotFoundError if unknown
        return await self._keyring.set_state(version, "retired")

    async def rewrap(self, blob: Bytes, *, context: Context | None = None) -> bytes:
        """Move an envelope to the current KEK version without decrypting it.

        KMS ``ReEncrypt`` re-wraps its DEK under the current KEK (the plaintext DEK
        never leaves the KMS); the body is kept byte for byte. An envelope
        already on the current version comes back unchanged, unless its DEK was
        wrapped only in part (a :class:`~encx_async.PartialWrapping` provider,
        such as a multi-region one that had a region down): then the provider
        adds the missing copies. ``context`` is the one it was encrypted with.
        """
        self._check_open()
        return await self._rewrap(parse(blob), context, {})

    def rewrap_many(
        self,
        items: Iterable[Bytes | tuple[Bytes, Context | None]]
        | AsyncIterable[Bytes | tuple[Bytes, Context | None]],
        *,
        context: Context | None = None,
        concurrency: int = 16,
        progress: Callable[[int], object] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """:meth:`rewrap` a stream of envelopes; yields the results in input order.

        An item is a blob (under ``context``) or a ``(blob, context)`` pair.
        Envelopes that share a wrapped DEK (a cached DEK's messages) cost one
        ``ReEncrypt`` between them. At most ``concurrency`` KMS calls run at
        once; ``progress(n)`` hears how many results have been yielded.
        A closed Crypto or a bad ``concurrency`` raises here, at the call.
        """
        self._check_open()
        check_concurrency(concurrency)
        return self._rewrap_all(items, context, concurrency, progress)

    async def _rewrap_all(
        self,
        items: Iterable[Bytes | tuple[Bytes, Context | None]]
        | AsyncIterable[Bytes | tuple[Bytes, Context | None]],
        context: Context | None,
        concurrency: int,
        progress: Callable[[int], object] | None,
    ) -> AsyncGenerator[bytes, None]:
        shared: dict[tuple[int, bytes, bytes], asyncio.Future[bytes]] = {}

        async def one(item: Bytes | tuple[Bytes, Context | None]) -> bytes:
            blob, item_context = item if isinstance(item, tuple) else (item, context)
            return await self._rewrap(parse(blob), item_context, shared)

        try:
            async for result in ordered_map(items, one, concurrency=concurrency, progress=progress):
                yield result
        finally:
            # After a failure (or an early close) no ReEncrypt is left running.
            for moved in shared.values():
                moved.cancel()

    async def _rewrap(
        self,
        envelope: Envelope,
        context: Context | None,
        shared: dict[tuple[int, bytes, bytes], asyncio.Future[bytes]],
    ) -> bytes:
        target = self.kek_version
        destination = self._key_ids[target]
        if envelope.kek_version == target and (
            self._partial_wrap is None
            or self._partial_wrap(destination, envelope.wrapped_dek) is None
        ):
            return envelope.blob
        kms = self._rotation_service()
        # (From the key to itself for a partial wrap: the provider adds what is missing.)
        source = await self._keyring.key_id_for(envelope.kek_version)
        key = (envelope.kek_version, envelope.wrapped_dek, self._contexts.encode(context)[0])
        moved = shared.get(key)
        if moved is None:
            call = kms.re_encrypt_dek(
                envelope.wrapped_dek,
                source_key_id=source,
                destination_key_id=destination,
                context=self._kms_context(envelope.kek_version, context),
                destination_context=self._kms_context(target, context),
            )
            moved = shared[key] = asyncio.ensure_future(self._call_kms("re_encrypt_dek", call))
            # Its waiters may all be cancelled (another item failed first):
            # its error is then theirs to ignore, not the event loop's to log.
            moved.add_done_callback(_retrieve_exception)
        wrapped = await asyncio.shield(moved)
        return replace_wrapped_dek(envelope, target, wrapped)

    def _rotation_service(self) -> KeyRotationService:
        if not isinstance(self._kms, KeyRotationService):
            raise ConfigurationError(
                "this KMS service does not implement KeyRotationService "
                "(rotation and rewrap need update_alias, rotate_key_material, re_encrypt_dek)"
            )
        return self._kms

    # -- low-level API -----------------------------------------------------------

    def generate_dek(self) -> DataKey:
        """A fresh random DEK. Wrap it with :meth:`encrypt_dek` before storing it."""
        return DataKey.generate()

    async def encrypt_data(
        self, plaintext: Bytes, dek: DataKey, *, aad: Bytes | None = None
    ) -> bytes:
        """AES-256-GCM of ``plaintext`` under ``dek``: ``nonce || ciphertext || tag``.

        The raw layer: no header, no commitment, no KEK version. You keep the
        wrapped DEK and its KEK version next to the ciphertext yourself. A payload
        at or above the thread threshold is encrypted in a worker thread, in one
        AES-GCM call that holds the GIL throughout; prefer :meth:`encrypt` for
        multi-megabyte payloads.
        """
        # As lean as the high-level path: checks inline, no helper calls.
        if self._closed:
            raise self._closed_error()
        if type(dek) is not DataKey:
            _check_dek(dek)
        if type(plaintext) is not bytes:
            plaintext = _check_bytes("plaintext", plaintext)
        if aad is not None and type(aad) is not bytes:
            aad = _aad_bytes(aad)
        if len(plaintext) < self._thread_threshold:
            gcm = dek._aesgcm or dek.aesgcm()  # the attribute first: this runs per call
            nonce = os.urandom(NONCE_SIZE)
            return nonce + gcm.encrypt(nonce, plaintext, aad)
        dek.aesgcm()  # built here, in the loop, before the hop
        return await anyio.to_thread.run_sync(seal_raw, dek, plaintext, aad)

    async def decrypt_data(
        self, ciphertext: Bytes, dek: DataKey, *, aad: Bytes | None = None
    ) -> bytes:
        """Reverse :meth:`encrypt_data`; DecryptionError if anything was changed."""
        if self._closed:
            raise self._closed_error()
        if aad is not None and type(aad) is not bytes:
            aad = _aad_bytes(aad)
        # The common case first, with the fewest checks that keep it exact.
        # (28 = nonce + tag and 12 = nonce, written out: a global lookup shows here.)
        if type(ciphertext) is bytes and 28 <= len(ciphertext) < self._thread_threshold:
            try:
                gcm = dek._aesgcm or dek.aesgcm()  # the attribute first: this runs per call
            except AttributeError:
                _check_dek(dek)
                raise
            try:
                return gcm.decrypt(ciphertext[:12], ciphertext[12:], aad)
            except InvalidTag:
                raise DecryptionError(RAW_OPEN_FAILED) from None
        _check_dek(dek)
        data = bytes(_check_bytes("ciphertext", ciphertext))
        if len(data) < self._thread_threshold:
            return open_raw(dek, data, aad)
        dek.aesgcm()
        return await anyio.to_thread.run_sync(open_raw, dek, data, aad)

    async def encrypt_dek(self, dek: DataKey, *, context: Context | None = None) -> bytes:
        """Wrap ``dek`` under the current KEK version (see :attr:`kek_version`)."""
        self._check_open()
        _check_dek(dek)
        self._contexts.encode(context)
        self._keyring.check_if_due()
        version = self.kek_version
        return await self._wrap(version, self._key_ids[version], dek, context)

    async def decrypt_dek(
        self,
        encrypted_dek: Bytes,
        *,
        context: Context | None = None,
        kek_version: int | None = None,
    ) -> DataKey:
        """Unwrap a DEK wrapped by :meth:`encrypt_dek` under ``kek_version`` (default current)."""
        self._check_open()
        wrapped = bytes(_check_bytes("encrypted_dek", encrypted_dek))
        self._contexts.encode(context)
        version = self.kek_version if kek_version is None else kek_version
        key_id = await self._keyring.key_id_for(version)
        return await self._unwrap(version, key_id, wrapped, context)

    # -- the KMS, counted --------------------------------------------------------

    def _kms_context(self, version: int, context: Context | None) -> dict[str, str]:
        """What the KMS gets: the caller's context and, for a bound version, its number.

        The number makes the KMS refuse a wrapped DEK presented under another
        version, which matters where versions share a key (kms-managed rotation).
        """
        kms_context = normalize_context(context)
        if self._keyring.binds(version):
            kms_context[VERSION_KEY] = str(version)
        return kms_context

    async def _wrap(
        self, version: int, key_id: str, dek: DataKey, context: Context | None
    ) -> bytes:
        call = self._kms.encrypt_dek(
            key_id, bytes(dek), context=self._kms_context(version, context)
        )
        return await self._call_kms("encrypt_dek", call)

    async def _unwrap(
        self, version: int, key_id: str, wrapped: bytes, context: Context | None
    ) -> DataKey:
        call = self._kms.decrypt_dek(key_id, wrapped, context=self._kms_context(version, context))
        plaintext = await self._call_kms("decrypt_dek", call)
        if len(plaintext) != DEK_SIZE:
            raise DecryptionError("the KMS returned a data key of the wrong size")
        return DataKey(plaintext)

    async def _call_kms(self, operation: str, call: Awaitable[T]) -> T:
        self._kms_calls[operation] += 1
        # A span and a latency sample per call when OpenTelemetry is installed.
        return await _telemetry.kms_call(operation, self._kek_alias, call)


def _retrieve_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _check_dek(dek: object) -> None:
    if not isinstance(dek, DataKey):
        raise TypeError(f"dek must be a DataKey (from generate_dek), not {type(dek).__name__}")


class _Lease:
    """``async with`` a sealer for one call: the DEK cache's, which stays cached,
    or one made for the call alone, wiped when the call ends."""

    __slots__ = ("_get", "_owned", "_sealer")

    def __init__(self, get: Callable[[], Awaitable[Sealer]], *, owned: bool) -> None:
        self._get, self._owned = get, owned
        self._sealer: Sealer | None = None

    async def __aenter__(self) -> Sealer:
        self._sealer = await self._get()
        return self._sealer

    async def __aexit__(self, *exc_info: object) -> None:
        if self._owned and self._sealer is not None:
            self._sealer.wipe()
