"""An in-process key management service for development, demos and tests.

.. warning::

   **Not for production.** :class:`LocalKMSService` keeps its key-encryption
   keys in process memory and, when given a ``path``, in a plain JSON file
   protected only by its file mode. Anyone who can read the process memory or
   the file can unwrap every data key. Use
   :class:`~encx_async.providers.aws.KMSService` for real data.

It behaves like AWS KMS where it matters to callers: keys have uuid4 ids and
``alias/...`` names, wrapped data keys carry the id of the key that wrapped
them, the encryption context is authenticated, and failures raise the same
exceptions with the same kind of messages.

Wrapped data key layout (all integers big-endian)::

    version (1 byte, 0x01) | key id length n (1 byte) | key id (n ASCII bytes)
    | nonce (12 bytes) | AES-256-GCM ciphertext and 16-byte tag

The AES-GCM associated data binds the version, the key id and a canonical
encoding of the encryption context.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encx_async._exceptions import (
    ClosedError,
    ConfigurationError,
    DecryptionError,
    KMSError,
    KMSKeyNotFoundError,
    KMSRegionMismatchError,
)

__all__ = ["LocalKMSService"]

_log = logging.getLogger("encx_async.kms")

_VERSION: Final = 1
_KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_MAX_PLAINTEXT: Final = 4096
_AAD_LABEL: Final = b"encx-async local-kms wrapped key\x00"
_ACCOUNT: Final = "000000000000"
_FILE_FORMAT: Final = "encx-async-local-kms"
_FILE_VERSION: Final = 1

_KEY_ID_RE: Final = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
_ALIAS_NAME_RE: Final = re.compile(r"^alias/[A-Za-z0-9/_-]{1,250}$")
_ARN_RE: Final = re.compile(
    r"^arn:(?P<partition>[a-z0-9-]+):kms:(?P<region>[a-z0-9-]*):(?P<account>[0-9]*):"
    r"(?P<type>key|alias)/(?P<name>.+)$"
)

_DECRYPT_FAILED: Final = (
    "the data key could not be decrypted: the ciphertext, key or encryption context does not match"
)


def _encode_context(context: Mapping[str, str]) -> bytes:
    """Canonical bytes for an encryption context.

    Pairs are sorted by the UTF-8 bytes of their names; the encoding is the
    pair count, then for each pair the name and the value, each as a 4-byte
    length followed by its UTF-8 bytes. Distinct contexts never encode alike.
    """
    pairs = sorted((name.encode("utf-8"), value.encode("utf-8")) for name, value in context.items())
    out = bytearray(len(pairs).to_bytes(4, "big"))
    for name, value in pairs:
        out += len(name).to_bytes(4, "big")
        out += name
        out += len(value).to_bytes(4, "big")
        out += value
    return bytes(out)


def _associated_data(key_id: bytes, context: Mapping[str, str]) -> bytes:
    return _AAD_LABEL + bytes([_VERSION, len(key_id)]) + key_id + _encode_context(context)


def _check_context(context: Mapping[str, str] | None) -> dict[str, str]:
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise ConfigurationError("the encryption context must be a mapping of str to str")
    checked: dict[str, str] = {}
    for name, value in context.items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise ConfigurationError(
                "the encryption context must map non-empty str names to str values"
            )
        try:
            name.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError("the encryption context must be valid UTF-8 text") from None
        checked[name] = value
    return checked


def _not_found_message(key_ref: str, region: str) -> str:
    if key_ref.startswith(("alias/", "arn:")) or _KEY_ID_RE.fullmatch(key_ref):
        return (
            f"KMS key {key_ref!r} was not found in region {region}; check that the key or "
            "alias exists in this local KMS and region (alias names start with 'alias/')"
        )
    return (
        f"KMS key {key_ref!r} was not found in region {region}: it is not a key id, key ARN "
        f"or alias name; alias names start with 'alias/' (did you mean 'alias/{key_ref}'?)"
    )


@dataclass(frozen=True, slots=True)
class _Key:
    aead: AESGCM
    material: bytes
    description: str
    created_at: float

    def __repr__(self) -> str:
        return f"_Key(description={self.description!r})"


class LocalKMSService:
    """A KMS that lives in this process: **for development, demos and tests only**.

    Keys are random 256-bit AES-GCM keys held in memory. With ``path`` they
    also persist, with their aliases, in a JSON file (mode 0600, replaced
    atomically on each change) that is loaded when the service opens; the
    keys in it are merely base64-encoded.

    Lifecycle matches :class:`~encx_async.providers.aws.KMSService`:
    ``await LocalKMSService.create(...)`` or ``async with``; :meth:`aclose` is
    idempotent and later calls raise :class:`~encx_async.ClosedError`.

    :meth:`get_key_id` and :meth:`create_key` return bare key ids. ARNs of the
    form ``arn:local:kms:<region>:000000000000:key/<id>`` (see :meth:`key_arn`)
    and ``...:alias/<name>`` are accepted wherever a key is expected.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, region: str = "local"
    ) -> None:
        if not isinstance(region, str) or not re.fullmatch(r"[a-z0-9-]+", region):
            raise ConfigurationError(f"region {region!r} must be lowercase letters, digits and '-'")
        self._path: Path | None = Path(path) if path is not None else None
        self._region = region
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._aliases: dict[str, str] = {}
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

    async def __aenter__(self) -> Self:
        await self._ensure_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Forget the keys held in memory; calling it again does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._keys.clear()
            self._aliases.clear()

    # -- lifecycle ---------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")

    async def _ensure_open(self) -> None:
        self._raise_if_closed()
        if self._opened:
            return
        if self._path is None:
            self._open_sync()
        else:
            await asyncio.to_thread(self._open_sync)

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
        except (ValueError, UnicodeDecodeError) as exc:
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
            encoded = entry.get("material")
            description = entry.get("description", "")
            created_at = entry.get("created_at", 0.0)
            if (
                not isinstance(encoded, str)
                or not isinstance(description, str)
                or not isinstance(created_at, int | float)
            ):
                raise corrupt(f"bad key entry {key_id!r}")
            try:
                material = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise corrupt(f"the material of key {key_id!r} is not base64") from None
            if len(material) != _KEY_BYTES:
                raise corrupt(f"key {key_id!r} is not {_KEY_BYTES} bytes long")
            keys[key_id] = _Key(AESGCM(material), material, description, float(created_at))
        aliases: dict[str, str] = {}
        for alias, target in raw_aliases.items():
            if not _ALIAS_NAME_RE.fullmatch(alias) or not isinstance(target, str):
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
                    "material": base64.b64encode(key.material).decode("ascii"),
                    "description": key.description,
                    "created_at": key.created_at,
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

    # -- key lookup --------------------------------------------------------

    def _resolve_locked(self, key_ref: object) -> str:
        """The bare key id that ``key_ref`` names; the caller holds the lock."""
        if not isinstance(key_ref, str) or not key_ref:
            raise ConfigurationError("a KMS key id, key ARN or alias must be a non-empty str")
        name = key_ref
        if key_ref.startswith("arn:"):
            match = _ARN_RE.fullmatch(key_ref)
            if match is None:
                raise ConfigurationError(f"{key_ref!r} is not a KMS key or alias ARN")
            if match["region"] != self._region:
                raise KMSRegionMismatchError(
                    f"{key_ref!r} is in region {match['region'] or '(none)'}, but this "
                    f"LocalKMSService uses region {self._region}"
                )
            if match["partition"] != "local" or match["account"] != _ACCOUNT:
                raise KMSKeyNotFoundError(
                    _not_found_message(key_ref, self._region), code="NotFoundException"
                )
            name = match["name"] if match["type"] == "key" else f"alias/{match['name']}"
        if name.startswith("alias/"):
            target = self._aliases.get(name)
            if target is not None:
                return target
        elif name in self._keys:
            return name
        raise KMSKeyNotFoundError(
            _not_found_message(key_ref, self._region), code="NotFoundException"
        )

    def _key_for(self, key_ref: str) -> tuple[str, _Key]:
        with self._lock:
            self._raise_if_closed()
            key_id = self._resolve_locked(key_ref)
            return key_id, self._keys[key_id]

    # -- KeyManagementService ---------------------------------------------

    async def get_key_id(self, alias: str) -> str:
        """Resolve an alias, key id or ARN to the bare key id."""
        await self._ensure_open()
        return self._key_for(alias)[0]

    async def create_key(self, description: str, *, alias: str | None = None) -> str:
        """Create a key (and ``alias`` for it); return its bare key id."""
        if not isinstance(description, str):
            raise ConfigurationError("the key description must be a str")
        if alias is not None and (
            not isinstance(alias, str)
            or _ALIAS_NAME_RE.fullmatch(alias) is None
            or alias.startswith("alias/aws/")
        ):
            raise ConfigurationError(
                f"alias {alias!r} is not a valid alias name: it must start with 'alias/', "
                "contain only letters, digits, '/', '_' and '-', and not start with 'alias/aws/'"
            )
        await self._ensure_open()
        if self._path is None:
            key_id = self._create_key_sync(description, alias)
        else:
            key_id = await asyncio.to_thread(self._create_key_sync, description, alias)
        _log.debug("local KMS CreateKey key=%s alias=%s region=%s", key_id, alias, self._region)
        return key_id

    def _create_key_sync(self, description: str, alias: str | None) -> str:
        material = secrets.token_bytes(_KEY_BYTES)
        key_id = str(uuid.uuid4())
        key = _Key(AESGCM(material), material, description, time.time())
        with self._lock:
            self._raise_if_closed()
            if alias is not None and alias in self._aliases:
                raise KMSError(
                    f"alias {alias!r} already exists in region {self._region}",
                    code="AlreadyExistsException",
                )
            keys = {**self._keys, key_id: key}
            aliases = dict(self._aliases)
            if alias is not None:
                aliases[alias] = key_id
            if self._path is not None:
                self._write(self._path, keys, aliases)
            self._keys, self._aliases = keys, aliases
        return key_id

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Wrap ``plaintext_dek`` under ``key_id`` with AES-256-GCM."""
        if not isinstance(plaintext_dek, bytes | bytearray | memoryview):
            raise ConfigurationError(
                f"the data key must be bytes, not {type(plaintext_dek).__name__}"
            )
        plaintext = bytes(plaintext_dek)
        if not 1 <= len(plaintext) <= _MAX_PLAINTEXT:
            raise ConfigurationError(
                f"the data key must be 1 to {_MAX_PLAINTEXT} bytes long, got {len(plaintext)}"
            )
        encryption_context = _check_context(context)
        await self._ensure_open()
        resolved, key = self._key_for(key_id)
        key_id_bytes = resolved.encode("ascii")
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = key.aead.encrypt(
            nonce, plaintext, _associated_data(key_id_bytes, encryption_context)
        )
        _log.debug("local KMS Encrypt key=%s region=%s", resolved, self._region)
        return bytes([_VERSION, len(key_id_bytes)]) + key_id_bytes + nonce + sealed

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Unwrap a data key wrapped by :meth:`encrypt_dek` under ``key_id``."""
        if not isinstance(ciphertext_dek, bytes | bytearray | memoryview):
            raise ConfigurationError(
                f"the wrapped data key must be bytes, not {type(ciphertext_dek).__name__}"
            )
        blob = bytes(ciphertext_dek)
        encryption_context = _check_context(context)
        await self._ensure_open()
        resolved, key = self._key_for(key_id)

        if len(blob) < 2 or blob[0] != _VERSION:
            raise DecryptionError(_DECRYPT_FAILED)
        id_length = blob[1]
        body_start = 2 + id_length
        nonce_end = body_start + _NONCE_BYTES
        if len(blob) < nonce_end + _TAG_BYTES + 1:
            raise DecryptionError(_DECRYPT_FAILED)
        embedded_id = blob[2:body_start]
        # Compare bytes to bytes: the embedded id is untrusted and may not be ASCII.
        if not secrets.compare_digest(embedded_id, resolved.encode("ascii")):
            raise DecryptionError(_DECRYPT_FAILED)
        nonce = blob[body_start:nonce_end]
        try:
            plaintext = key.aead.decrypt(
                nonce, blob[nonce_end:], _associated_data(embedded_id, encryption_context)
            )
        except InvalidTag:
            raise DecryptionError(_DECRYPT_FAILED) from None
        _log.debug("local KMS Decrypt key=%s region=%s", resolved, self._region)
        return plaintext
