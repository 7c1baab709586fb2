"""An in-process key management service for development, demos and tests.

.. warning::

   **Not for production.** :class:`LocalKMSService` keeps its key-encryption
   keys in process memory and, when given a ``path``, in a plain JSON file
   protected only by its file mode. Anyone who can read the process memory or
   the file can unwrap every data key. Use
   :class:`~encx_async.providers.aws.KMSService` for real data.

It behaves like AWS KMS where it matters to callers: keys have uuid4 ids and
``alias/...`` names, wrapped data keys carry the id of the key that wrapped
them, the encryption context is authenticated, keys can get new material
while older wrapped keys still unwrap, and failures raise the same exceptions
with the same kind of messages.

Multi-region keys follow AWS too. ``create_key(..., multi_region=True)``
makes a key with an ``mrk-`` id; :meth:`LocalKMSService.replicate_key` copies
it, id and materials, into the service of another region (the local stand-in
for ``ReplicateKey``), so a data key wrapped in one region unwraps through
the replica in the other; the primary's new materials reach the replicas it
is linked to (call ``replicate_key`` again after reopening services from
their key files). Other keys stay in the region that created them.

Each key holds a list of 256-bit materials, oldest first. Wrapping uses the
newest; :meth:`LocalKMSService.rotate_key_material` appends one.

Wrapped data key layout (all integers big-endian)::

    version (1 byte, 0x02) | key id length n (1 byte) | key id (n ASCII bytes)
    | material index (4 bytes) | nonce (12 bytes) | AES-256-GCM ciphertext and 16-byte tag

The AES-GCM associated data is a fixed label, everything before the nonce
(version, key id, material index), then the canonical encoding of the
encryption context (docs/format.md, "Canonical context encoding").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self, TypeVar, TypeVarTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encx_async._context import encode_kms_context
from encx_async._exceptions import (
    ConfigurationError,
    DecryptionError,
    KMSError,
    KMSKeyNotFoundError,
    KMSRegionMismatchError,
)
from encx_async._keystore._default import MEMORY, beside
from encx_async.providers._common import (
    DECRYPT_FAILED,
    ProviderResource,
    as_bytes,
    check_alias_name,
    check_description,
    check_key_ref,
    check_pending_days,
    check_plaintext,
    check_rotation_period,
    is_alias_name,
    not_found_message,
)
from encx_async.providers._replication import ReplicatesIntoServices

__all__ = ["LocalKMSService"]

_log = logging.getLogger("encx_async.kms")

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

_VERSION: Final = 2
_KEY_BYTES: Final = 32
_INDEX_BYTES: Final = 4
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_AAD_LABEL: Final = b"encx-async local-kms wrapped key\x00"
_ACCOUNT: Final = "000000000000"
_FILE_FORMAT: Final = "encx-async-local-kms"
_FILE_VERSION: Final = 2
_DEFAULT_ROTATION_DAYS: Final = 365  # what AWS KMS uses when no period is given
_SCOPE: Final = "this local KMS and region"

_KEY_ID_RE: Final = re.compile(
    r"^(?:[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}|mrk-[0-9a-f]{32})$"
)
_MRK_PREFIX: Final = "mrk-"
_ARN_RE: Final = re.compile(
    r"^arn:(?P<partition>[a-z0-9-]+):kms:(?P<region>[a-z0-9-]*):(?P<account>[0-9]*):"
    r"(?P<type>key|alias)/(?P<name>.+)$"
)


@dataclass(frozen=True, slots=True)
class _Key:
    """One key: its materials (oldest first) and what describes it. Never mutated."""

    materials: tuple[bytes, ...]
    aeads: tuple[AESGCM, ...]
    description: str
    created_at: float
    rotation_enabled: bool = False
    rotation_period_days: int | None = None
    #: for a multi-region key, the region of its primary; None for other keys
    primary_region: str | None = None
    #: when a scheduled deletion falls due (a Unix time); None if none is scheduled
    deletion_date: float | None = None

    @classmethod
    def build(
        cls,
        materials: tuple[bytes, ...],
        description: str,
        created_at: float,
        *,
        rotation_enabled: bool = False,
        rotation_period_days: int | None = None,
        primary_region: str | None = None,
        deletion_date: float | None = None,
    ) -> _Key:
        return cls(
            materials,
            tuple(AESGCM(material) for material in materials),
            description,
            created_at,
            rotation_enabled,
            rotation_period_days,
            primary_region,
            deletion_date,
        )

    def with_materials(self, materials: tuple[bytes, ...]) -> _Key:
        return dataclasses.replace(
            self, materials=materials, aeads=tuple(AESGCM(material) for material in materials)
        )

    def with_new_material(self) -> _Key:
        material = secrets.token_bytes(_KEY_BYTES)
        return dataclasses.replace(
            self,
            materials=(*self.materials, material),
            aeads=(*self.aeads, AESGCM(material)),
        )

    def __repr__(self) -> str:
        return f"_Key(description={self.description!r}, materials={len(self.materials)})"


def _seal(key_id: str, key: _Key, plaintext: bytes, context: bytes) -> bytes:
    """Wrap ``plaintext`` under the newest material of ``key``."""
    id_bytes = key_id.encode("ascii")
    index = len(key.materials) - 1
    header = bytes([_VERSION, len(id_bytes)]) + id_bytes + index.to_bytes(_INDEX_BYTES, "big")
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return (
        header + nonce + key.aeads[index].encrypt(nonce, plaintext, _AAD_LABEL + header + context)
    )


def _unseal(key_id: str, key: _Key, blob: bytes, context: bytes) -> bytes:
    """Unwrap what :func:`_seal` made under ``key_id``; DecryptionError on any mismatch."""
    if len(blob) < 2 or blob[0] != _VERSION:
        raise DecryptionError(DECRYPT_FAILED)
    id_end = 2 + blob[1]
    header_end = id_end + _INDEX_BYTES
    nonce_end = header_end + _NONCE_BYTES
    if len(blob) < nonce_end + _TAG_BYTES + 1:
        raise DecryptionError(DECRYPT_FAILED)
    # Compare bytes to bytes: the embedded id is untrusted and may not be ASCII.
    if not secrets.compare_digest(blob[2:id_end], key_id.encode("ascii")):
        raise DecryptionError(DECRYPT_FAILED)
    index = int.from_bytes(blob[id_end:header_end], "big")
    if index >= len(key.aeads):
        raise DecryptionError(DECRYPT_FAILED)
    header = blob[:header_end]
    try:
        return key.aeads[index].decrypt(
            blob[header_end:nonce_end], blob[nonce_end:], _AAD_LABEL + header + context
        )
    except InvalidTag:
        raise DecryptionError(DECRYPT_FAILED) from None


class LocalKMSService(ProviderResource, ReplicatesIntoServices):
    """A KMS that lives in this process: **for development, demos and tests only**.

    Keys are random 256-bit AES-GCM keys held in memory. With ``path`` they
    also persist, with every material they ever had, their rotation settings
    and their aliases, in a JSON file (mode 0600, replaced atomically on each
    change) that is loaded when the service opens; the keys in it are merely
    base64-encoded.

    Lifecycle matches :class:`~encx_async.providers.aws.KMSService`:
    ``await LocalKMSService.create(...)`` or ``async with``; :meth:`aclose` is
    idempotent and later calls raise :class:`~encx_async.ClosedError`.

    :meth:`get_key_id` and :meth:`create_key` return bare key ids. ARNs of the
    form ``arn:local:kms:<region>:000000000000:key/<id>`` (see :meth:`key_arn`)
    and ``...:alias/<name>`` are accepted wherever a key is expected. An ARN
    of another region is refused with :class:`~encx_async.KMSRegionMismatchError`,
    except the ARN of a multi-region key (``key/mrk-...``), which names its
    replica here.

    Multi-region keys: ``create_key(..., multi_region=True)`` and
    :meth:`replicate_key`, which copies a key into the service of another
    region (:meth:`replicates_into` says which). Giving the primary new material
    (:meth:`rotate_key_material`) gives it to the replicas it is linked to
    too, as AWS KMS synchronises them; a replica refuses to rotate. The link
    lives in process memory: after reopening the services from their key
    files, call :meth:`replicate_key` again to link an existing replica.

    It also implements :class:`~encx_async.kms.KeyRotationService`, except
    that it never rotates on its own: :meth:`enable_key_rotation` only records
    the setting, and only :meth:`rotate_key_material` gives a key new material.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, region: str = "local"
    ) -> None:
        if not isinstance(region, str):
            raise TypeError(f"region must be a str, not {type(region).__name__}")
        if not re.fullmatch(r"[a-z0-9-]+", region):
            raise ConfigurationError(f"region {region!r} must be lowercase letters, digits and '-'")
        self._path: Path | None = Path(path) if path is not None else None
        self._region = region
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._aliases: dict[str, str] = {}
        # The replicas of this service's multi-region primaries, by key id: the
        # services rotate_key_material() hands new material to. Process memory
        # only, like AWS's link between a primary and its replicas.
        self._replicas: dict[str, list[LocalKMSService]] = {}
        self._opened = False
        self._closed = False

    @classmethod
    async def create(
        cls, path: str | os.PathLike[str] | None = None, *, region: str = "local"
    ) -> Self:
        """Create and open a service (loading ``path`` if it exists)."""
        service = cls(path, region=region)
        await service._ensure_open()
        return service

    @property
    def region(self) -> str:
        return self._region

    @property
    def path(self) -> Path | None:
        return self._path

    async def default_database(self, kek_alias: str) -> str:
        """Where a Crypto given no database keeps this service's key versions:
        in memory when the keys are (they end together), else beside the key
        file, as ``<key file>.versions.db``."""
        return MEMORY if self._path is None else beside(self._path)

    def key_arn(self, key_id: str) -> str:
        """The ARN-like name of ``key_id`` in this service's region."""
        return f"arn:local:kms:{self._region}:{_ACCOUNT}:key/{key_id}"

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._opened:
            state = f"open, {len(self._keys)} key(s)"
        else:
            state = "not opened"
        return f"{type(self).__name__}(region={self._region!r}, path={self._path!r}, {state})"

    async def aclose(self) -> None:
        """Forget the keys held in memory; calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._keys.clear()
            self._aliases.clear()
            self._replicas.clear()

    # -- lifecycle ---------------------------------------------------------

    async def _ensure_open(self) -> None:
        self._raise_if_closed()
        if self._opened:
            return
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        with self._lock:
            self._raise_if_closed()
            if self._opened:
                return
            if self._path is not None:
                if self._path.exists():
                    self._keys, self._aliases = self._load(self._path)
                else:
                    self._write(self._path, {}, {})
            self._opened = True
        _log.debug("local KMS opened region=%s keys=%d", self._region, len(self._keys))

    async def _run(self, func: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        """Run ``func``: inline without a key file, in a worker thread with one (it writes)."""
        if self._path is None:
            return func(*args)
        return await asyncio.to_thread(func, *args)

    # -- persistence -------------------------------------------------------

    @staticmethod
    def _load(path: Path) -> tuple[dict[str, _Key], dict[str, str]]:
        def corrupt(reason: str) -> ConfigurationError:
            return ConfigurationError(f"the local KMS key file {str(path)!r} is unusable: {reason}")

        try:
            mode = path.stat().st_mode
            raw = path.read_bytes()
        except OSError as exc:
            raise corrupt(f"cannot read it ({exc.strerror or type(exc).__name__})") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            _log.warning("local KMS key file %s is accessible to other users", path)
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise corrupt("it is not valid JSON") from exc
        if (
            not isinstance(document, dict)
            or document.get("format") != _FILE_FORMAT
            or document.get("version") != _FILE_VERSION
        ):
            raise corrupt(f"it is not a version {_FILE_VERSION} {_FILE_FORMAT} file")
        raw_keys = document.get("keys")
        raw_aliases = document.get("aliases")
        if not isinstance(raw_keys, dict) or not isinstance(raw_aliases, dict):
            raise corrupt("'keys' and 'aliases' must be objects")
        keys: dict[str, _Key] = {}
        for key_id, entry in raw_keys.items():
            if not _KEY_ID_RE.fullmatch(key_id) or not isinstance(entry, dict):
                raise corrupt(f"bad key entry {key_id!r}")
            keys[key_id] = _load_key(key_id, entry, corrupt)
        aliases: dict[str, str] = {}
        for alias, target in raw_aliases.items():
            if not is_alias_name(alias) or not isinstance(target, str):
                raise corrupt(f"bad alias entry {alias!r}")
            if target not in keys:
                raise corrupt(f"alias {alias!r} points at a missing key")
            aliases[alias] = target
        return keys, aliases

    @staticmethod
    def _write(path: Path, keys: Mapping[str, _Key], aliases: Mapping[str, str]) -> None:
        document: dict[str, Any] = {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "warning": "development keys only; anyone who can read this file can decrypt",
            "keys": {
                key_id: {
                    "materials": [
                        base64.b64encode(material).decode("ascii") for material in key.materials
                    ],
                    "description": key.description,
                    "created_at": key.created_at,
                    "rotation": {
                        "enabled": key.rotation_enabled,
                        "period_days": key.rotation_period_days,
                    },
                    **(
                        {"primary_region": key.primary_region}
                        if key.primary_region is not None
                        else {}
                    ),
                    **(
                        {"deletion_date": key.deletion_date}
                        if key.deletion_date is not None
                        else {}
                    ),
                }
                for key_id, key in keys.items()
            },
            "aliases": dict(aliases),
        }
        data = json.dumps(document, indent=2, sort_keys=True).encode("utf-8")
        try:
            # mkstemp creates the file with mode 0600 in the same directory,
            # so os.replace is atomic and the keys are never world-readable.
            fd, temp_name = tempfile.mkstemp(
                prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot write the local KMS key file {str(path)!r}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            raise ConfigurationError(
                f"cannot write the local KMS key file {str(path)!r}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            raise

    def _commit_locked(self, keys: dict[str, _Key], aliases: dict[str, str]) -> None:
        """Persist a new state, then adopt it; the caller holds the lock.

        The dicts are replaced, never changed in place, so a failed write leaves
        the service as it was.
        """
        if self._path is not None:
            self._write(self._path, keys, aliases)
        self._keys, self._aliases = keys, aliases

    # -- key lookup --------------------------------------------------------

    def _key_exists(self, key_id: str) -> KMSError:
        return KMSError(
            f"key {key_id} already exists in region {self._region}", code="AlreadyExistsException"
        )

    def _alias_exists(self, alias: str) -> KMSError:
        return KMSError(
            f"alias {alias!r} already exists in region {self._region}",
            code="AlreadyExistsException",
        )

    def _not_found(self, key_refs: str | tuple[str, ...]) -> KMSKeyNotFoundError:
        return KMSKeyNotFoundError(
            not_found_message(key_refs, self._region, scope=_SCOPE), code="NotFoundException"
        )

    def _resolve_locked(self, key_ref: object) -> str:
        """The bare key id that ``key_ref`` names; the caller holds the lock."""
        key_ref = check_key_ref(key_ref)
        name = key_ref
        if key_ref.startswith("arn:"):
            match = _ARN_RE.fullmatch(key_ref)
            if match is None:
                raise ConfigurationError(f"{key_ref!r} is not a KMS key or alias ARN")
            # A multi-region key's ARN in another region names its replica here.
            multi_region = match["type"] == "key" and match["name"].startswith(_MRK_PREFIX)
            if match["region"] != self._region and not multi_region:
                raise KMSRegionMismatchError(
                    f"{key_ref!r} is in region {match['region'] or '(none)'}, but this "
                    f"LocalKMSService uses region {self._region}"
                )
            if match["partition"] != "local" or match["account"] != _ACCOUNT:
                raise self._not_found(key_ref)
            name = match["name"] if match["type"] == "key" else f"alias/{match['name']}"
        if name.startswith("alias/"):
            target = self._aliases.get(name)
            if target is not None:
                return target
        elif name in self._keys:
            return name
        raise self._not_found(key_ref)

    def _key_for(self, key_ref: str) -> tuple[str, _Key]:
        with self._lock:
            self._raise_if_closed()
            key_id = self._resolve_locked(key_ref)
            return key_id, self._keys[key_id]

    def _usable_key(self, key_ref: str) -> tuple[str, _Key]:
        """As :meth:`_key_for`, refusing a key pending deletion, as KMS does."""
        key_id, key = self._key_for(key_ref)
        self._check_usable(key_id, key)
        return key_id, key

    def _check_usable(self, key_id: str, key: _Key) -> None:
        if key.deletion_date is not None:
            raise KMSError(
                f"key {self.key_arn(key_id)} is pending deletion", code="KMSInvalidStateException"
            )

    # -- KeyManagementService ---------------------------------------------

    async def get_key_id(self, alias: str) -> str:
        """Resolve an alias, key id or ARN to the bare key id."""
        await self._ensure_open()
        return self._key_for(alias)[0]

    async def create_key(
        self, description: str, *, alias: str | None = None, multi_region: bool = False
    ) -> str:
        """Create a key (and ``alias`` for it); return its bare key id.

        With ``multi_region=True`` the key is the primary of a multi-region key:
        its id is ``mrk-`` and 32 hex digits, and :meth:`replicate_key` copies
        it to other regions.
        """
        check_description(description)
        if alias is not None:
            check_alias_name(alias)
        if not isinstance(multi_region, bool):
            raise TypeError(f"multi_region must be a bool, not {type(multi_region).__name__}")
        await self._ensure_open()
        key_id = _MRK_PREFIX + uuid.uuid4().hex if multi_region else str(uuid.uuid4())
        key = _Key.build(
            (secrets.token_bytes(_KEY_BYTES),),
            description,
            time.time(),
            primary_region=self._region if multi_region else None,
        )
        await self._run(self._add_key_sync, key_id, key, alias)
        _log.debug("local KMS CreateKey key=%s alias=%s region=%s", key_id, alias, self._region)
        return key_id

    def _add_key_sync(self, key_id: str, key: _Key, alias: str | None) -> None:
        with self._lock:
            self._raise_if_closed()
            if key_id in self._keys:
                raise self._key_exists(key_id)
            if alias is not None and alias in self._aliases:
                raise self._alias_exists(alias)
            aliases = dict(self._aliases)
            if alias is not None:
                aliases[alias] = key_id
            self._commit_locked({**self._keys, key_id: key}, aliases)

    async def create_alias(self, alias: str, key_id: str) -> None:
        """Create ``alias`` for ``key_id`` (KMS ``CreateAlias``).

        An alias that exists already raises :class:`~encx_async.KMSError` with
        code ``AlreadyExistsException``; :meth:`update_alias` moves one.
        """
        check_alias_name(alias)
        check_key_ref(key_id)
        await self._ensure_open()
        target = await self._run(self._create_alias_sync, alias, key_id)
        _log.debug("local KMS CreateAlias alias=%s key=%s region=%s", alias, target, self._region)

    def _create_alias_sync(self, alias: str, key_ref: str) -> str:
        with self._lock:
            self._raise_if_closed()
            if alias in self._aliases:
                raise self._alias_exists(alias)
            target = self._resolve_locked(key_ref)
            self._commit_locked(dict(self._keys), {**self._aliases, alias: target})
            return target

    def replicates_into(self, service: object) -> bool:
        """Whether :meth:`replicate_key` copies keys into ``service``: any other
        LocalKMSService (it refuses one of this region itself)."""
        return isinstance(service, LocalKMSService)

    async def replicate_key(
        self, key_id: str, replica: LocalKMSService, *, alias: str | None = None
    ) -> str:
        """Copy the multi-region key ``key_id`` into ``replica``, the service of another region.

        The local stand-in for KMS ``ReplicateKey``: the replica has the same
        ``mrk-`` id and the same materials, so what either wraps the other
        unwraps. ``alias`` also names the replica in its region (aliases are
        regional, as in AWS). Returns the replica's key id (the same id).

        The link that hands the primary's new materials to its replicas
        (:meth:`rotate_key_material`) lives in process memory. Services
        reopened from their key files get it back by calling this again: a
        replica that is there already is linked, not copied, and takes any
        material the primary got meanwhile.

        Only the primary replicates; a key that is not multi-region raises
        :class:`~encx_async.KMSError` (``UnsupportedOperationException``), and a
        region that has another key of that id, or ``alias`` for another key,
        ``AlreadyExistsException``.
        """
        check_key_ref(key_id)
        if not isinstance(replica, LocalKMSService):
            raise TypeError(
                f"replica must be the LocalKMSService of another region, not "
                f"{type(replica).__name__}"
            )
        if alias is not None:
            check_alias_name(alias)
        if replica.region == self._region:
            raise ConfigurationError(
                f"a multi-region key is replicated to another region, and the replica "
                f"service is in this one ({self._region})"
            )
        await self._ensure_open()
        await replica._ensure_open()
        resolved, key = self._key_for(key_id)
        if key.primary_region != self._region:
            what = "a replica" if key.primary_region is not None else "not a multi-region key"
            raise KMSError(
                f"key {resolved} in region {self._region} is {what}; only the primary of a "
                "multi-region key can be replicated",
                code="UnsupportedOperationException",
            )
        copy = _Key.build(key.materials, key.description, time.time(), primary_region=self._region)
        await replica._run(replica._add_replica_sync, resolved, copy, alias)
        with self._lock:
            linked = self._replicas.setdefault(resolved, [])
            if not any(known is replica for known in linked):
                linked.append(replica)
            materials = self._keys[resolved].materials
        # A rotation while the copy was being written, or before a relink: catch up.
        await replica._run(replica._adopt_materials_sync, resolved, materials)
        _log.debug(
            "local KMS ReplicateKey key=%s region=%s replica_region=%s",
            resolved,
            self._region,
            replica.region,
        )
        return resolved

    def _add_replica_sync(self, key_id: str, copy: _Key, alias: str | None) -> None:
        """Add the replica ``copy``, or accept the one held already (then only add ``alias``)."""
        with self._lock:
            self._raise_if_closed()
            held = self._keys.get(key_id)
            if held is not None:
                same_key = held.primary_region == copy.primary_region and _is_prefix(
                    held.materials, copy.materials
                )
                if not same_key:
                    raise self._key_exists(key_id)
                if alias is not None and self._aliases.get(alias) != key_id:
                    if alias in self._aliases:
                        raise self._alias_exists(alias)
                    self._commit_locked(dict(self._keys), {**self._aliases, alias: key_id})
                return
        # Not held: added as a new key (which checks again, under the lock).
        self._add_key_sync(key_id, copy, alias)

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Wrap ``plaintext_dek`` under the newest material of ``key_id``, with AES-256-GCM."""
        plaintext = check_plaintext(plaintext_dek)
        encoded_context = encode_kms_context(context)
        await self._ensure_open()
        resolved, key = self._usable_key(key_id)
        wrapped = _seal(resolved, key, plaintext, encoded_context)
        _log.debug("local KMS Encrypt key=%s region=%s", resolved, self._region)
        return wrapped

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Unwrap a data key wrapped by :meth:`encrypt_dek` under ``key_id``, any material."""
        blob = as_bytes(ciphertext_dek, "wrapped data key")
        encoded_context = encode_kms_context(context)
        await self._ensure_open()
        resolved, key = self._usable_key(key_id)
        plaintext = _unseal(resolved, key, blob, encoded_context)
        _log.debug("local KMS Decrypt key=%s region=%s", resolved, self._region)
        return plaintext

    # -- KeyRotationService ------------------------------------------------

    async def update_alias(self, alias: str, key_id: str) -> None:
        """Point the existing ``alias`` at ``key_id`` (a key id, ARN or another alias).

        Raises :class:`~encx_async.KMSKeyNotFoundError` if the alias or the key
        does not exist; it never creates an alias (see :meth:`create_key`).
        """
        check_alias_name(alias)
        check_key_ref(key_id)
        await self._ensure_open()
        target = await self._run(self._update_alias_sync, alias, key_id)
        _log.debug("local KMS UpdateAlias alias=%s key=%s region=%s", alias, target, self._region)

    def _update_alias_sync(self, alias: str, key_ref: str) -> str:
        with self._lock:
            self._raise_if_closed()
            if alias not in self._aliases:
                raise self._not_found(alias)
            target = self._resolve_locked(key_ref)
            if self._aliases[alias] != target:
                self._commit_locked(dict(self._keys), {**self._aliases, alias: target})
            return target

    async def rotate_key_material(self, key_id: str) -> None:
        """Give the key a new material now; wrapped keys under older ones still unwrap.

        The primary of a multi-region key hands the new material to its
        replicas (those this process made with :meth:`replicate_key`); a
        replica refuses, as in AWS (``UnsupportedOperationException``).
        """
        check_key_ref(key_id)
        await self._ensure_open()

        def rotate(key: _Key) -> _Key:
            if key.primary_region not in (None, self._region):
                raise KMSError(
                    f"a replica of a multi-region key cannot rotate in region {self._region}; "
                    f"rotate its primary in region {key.primary_region}",
                    code="UnsupportedOperationException",
                )
            return key.with_new_material()

        resolved = await self._run(self._replace_key_sync, key_id, rotate)
        with self._lock:
            replicas = list(self._replicas.get(resolved, ()))
            materials = self._keys[resolved].materials if replicas else ()
        for replica in replicas:
            if not replica._closed:
                await replica._run(replica._adopt_materials_sync, resolved, materials)
        _log.debug("local KMS RotateKeyOnDemand key=%s region=%s", resolved, self._region)

    def _adopt_materials_sync(self, key_id: str, materials: tuple[bytes, ...]) -> None:
        """Take the primary's materials for the replica ``key_id`` (never fewer than held)."""
        with self._lock:
            if self._closed:
                return
            key = self._keys.get(key_id)
            if key is None or len(materials) <= len(key.materials):
                return
            self._commit_locked(
                {**self._keys, key_id: key.with_materials(materials)}, dict(self._aliases)
            )

    async def enable_key_rotation(self, key_id: str, *, period_days: int | None = None) -> None:
        """Record that the key should rotate every ``period_days`` (default 365).

        The local KMS has no scheduler and **never rotates a key on its own**;
        the setting is only kept (and persisted) so code that turns it on runs
        unchanged. Call :meth:`rotate_key_material` to rotate.
        """
        check_key_ref(key_id)
        days = check_rotation_period(period_days)
        period = _DEFAULT_ROTATION_DAYS if days is None else days

        def enable(key: _Key) -> _Key:
            return dataclasses.replace(key, rotation_enabled=True, rotation_period_days=period)

        await self._ensure_open()
        resolved = await self._run(self._replace_key_sync, key_id, enable)
        _log.debug(
            "local KMS EnableKeyRotation key=%s period=%d region=%s",
            resolved,
            period,
            self._region,
        )

    def _replace_key_sync(self, key_ref: str, change: Callable[[_Key], _Key]) -> str:
        with self._lock:
            self._raise_if_closed()
            key_id = self._resolve_locked(key_ref)
            self._commit_locked(
                {**self._keys, key_id: change(self._keys[key_id])}, dict(self._aliases)
            )
            return key_id

    # -- KeyDeletion ---------------------------------------------------------

    async def schedule_key_deletion(self, key_id: str, *, pending_days: int = 7) -> None:
        """Mark the key pending deletion in ``pending_days`` (7 to 30).

        From then on it wraps and unwraps nothing (KMS's ``PendingDeletion``);
        the local KMS never deletes a key on its own, so the mark, kept in the
        key file, is all there is. A key marked already keeps its date.
        """
        check_key_ref(key_id)
        days = check_pending_days(pending_days)
        due = time.time() + days * 86400

        def mark(key: _Key) -> _Key:
            if key.deletion_date is not None:
                return key
            return dataclasses.replace(key, deletion_date=due)

        await self._ensure_open()
        resolved = await self._run(self._replace_key_sync, key_id, mark)
        _log.debug(
            "local KMS ScheduleKeyDeletion key=%s days=%d region=%s", resolved, days, self._region
        )

    async def re_encrypt_dek(
        self,
        ciphertext_dek: bytes,
        *,
        source_key_id: str,
        destination_key_id: str,
        context: Mapping[str, str] | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Unwrap under ``source_key_id`` with ``context``, and wrap under
        ``destination_key_id`` with ``destination_context`` (by default ``context``).

        Both happen inside the service; the plaintext data key is not returned.
        """
        blob = as_bytes(ciphertext_dek, "wrapped data key")
        encoded_context = encode_kms_context(context)
        target_context = (
            encoded_context
            if destination_context is None
            else encode_kms_context(destination_context)
        )
        check_key_ref(source_key_id)
        check_key_ref(destination_key_id)
        await self._ensure_open()
        with self._lock:
            self._raise_if_closed()
            source = self._resolve_locked(source_key_id)
            destination = self._resolve_locked(destination_key_id)
            source_key, destination_key = self._keys[source], self._keys[destination]
        self._check_usable(source, source_key)
        self._check_usable(destination, destination_key)
        wrapped = _seal(
            destination,
            destination_key,
            _unseal(source, source_key, blob, encoded_context),
            target_context,
        )
        _log.debug("local KMS ReEncrypt from=%s to=%s region=%s", source, destination, self._region)
        return wrapped

    # -- health ------------------------------------------------------------

    async def describe_key(self, key_ref: str) -> dict[str, object]:
        """What a health probe needs: ``key_id``, ``arn``, ``enabled``, ``key_state``.

        A local key is enabled until its deletion is scheduled.
        """
        await self._ensure_open()
        key_id, key = self._key_for(key_ref)
        pending = key.deletion_date is not None
        return {
            "key_id": key_id,
            "arn": self.key_arn(key_id),
            "enabled": not pending,
            "key_state": "PendingDeletion" if pending else "Enabled",
        }


def _is_prefix(older: tuple[bytes, ...], newer: tuple[bytes, ...]) -> bool:
    """Whether the materials ``older`` are the first ones of ``newer`` (the same key, behind)."""
    return len(older) <= len(newer) and all(
        secrets.compare_digest(a, b) for a, b in zip(older, newer, strict=False)
    )


def _load_key(
    key_id: str, entry: Mapping[str, Any], corrupt: Callable[[str], ConfigurationError]
) -> _Key:
    """One key entry of the key file, checked."""
    encoded = entry.get("materials")
    description = entry.get("description", "")
    created_at = entry.get("created_at", 0.0)
    rotation = entry.get("rotation", {})
    if (
        not isinstance(encoded, list)
        or not encoded
        or not all(isinstance(item, str) for item in encoded)
        or not isinstance(description, str)
        or isinstance(created_at, bool)
        or not isinstance(created_at, int | float)
        or not isinstance(rotation, dict)
    ):
        raise corrupt(f"bad key entry {key_id!r}")
    enabled = rotation.get("enabled", False)
    period = rotation.get("period_days")
    if not isinstance(enabled, bool) or not (
        period is None or (isinstance(period, int) and not isinstance(period, bool))
    ):
        raise corrupt(f"bad rotation settings for key {key_id!r}")
    primary_region = entry.get("primary_region")
    if key_id.startswith(_MRK_PREFIX) != isinstance(primary_region, str):
        raise corrupt(f"bad multi-region settings for key {key_id!r}")
    deletion_date = entry.get("deletion_date")
    if deletion_date is not None and (
        isinstance(deletion_date, bool) or not isinstance(deletion_date, int | float)
    ):
        raise corrupt(f"bad deletion date for key {key_id!r}")
    materials: list[bytes] = []
    for item in encoded:
        try:
            material = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise corrupt(f"a material of key {key_id!r} is not base64") from None
        if len(material) != _KEY_BYTES:
            raise corrupt(f"a material of key {key_id!r} is not {_KEY_BYTES} bytes long")
        materials.append(material)
    return _Key.build(
        tuple(materials),
        description,
        float(created_at),
        rotation_enabled=enabled,
        rotation_period_days=period,
        primary_region=primary_region,
        deletion_date=None if deletion_date is None else float(deletion_date),
    )
