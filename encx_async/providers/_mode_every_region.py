"""The ``"every-region"`` mode of a multi-region KMS service: a copy of the data key per region.

Private: the names here may change in any release; the mode is documented in
:mod:`encx_async.providers._multi_region`.

The key "id" is a composite naming one key per region
(``multi-region:us-east-1=arn:...,eu-west-1=arn:...``), and the wrapped key
holds each region's copy: magic, format version, count, then per region
(region length, region, key length, key). No KMS ciphertext starts with
``EXMR``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Final

from encx_async._envelope import MAX_WRAPPED_DEK
from encx_async._exceptions import (
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    KMSError,
)
from encx_async.providers._common import DECRYPT_FAILED
from encx_async.providers._regions import (
    Mode,
    MultiRegionMode,
    Region,
    is_region,
    restated,
    rotation,
)

__all__ = ["COMPOSITE_PREFIX", "EveryRegion"]

_log = logging.getLogger("encx_async.kms")

COMPOSITE_PREFIX: Final = "multi-region:"
_BLOB_MAGIC: Final = b"EXMR"
_BLOB_VERSION: Final = 1


class EveryRegion(Mode):
    """The data key wrapped under a separate key in every region, the copies stored together."""

    name: ClassVar[MultiRegionMode] = "every-region"

    def _parts(self, key_ref: str) -> dict[str, str]:
        """The key of each region that ``key_ref`` names."""
        if key_ref.startswith(COMPOSITE_PREFIX):
            return _parse_composite(key_ref)
        if key_ref.startswith("alias/"):
            return {region.name: key_ref for region in self.regions.all}
        raise ConfigurationError(
            f"in every-region mode a key is an alias name that exists in every region, or a "
            f"'{COMPOSITE_PREFIX}...' id from get_key_id or create_key; {key_ref!r} names "
            "a single key"
        )

    def _composite(self, parts: Mapping[str, str]) -> str:
        by_name = self.regions.by_name
        ordered = [r.name for r in self.regions.all if r.name in parts]
        ordered += sorted(name for name in parts if name not in by_name)
        return COMPOSITE_PREFIX + ",".join(f"{name}={parts[name]}" for name in ordered)

    def _served(self, parts: Mapping[str, str], operation: str) -> list[Region]:
        """The regions of ``parts``, nearest first; every one of them must be served here."""
        missing = [name for name in parts if name not in self.regions.by_name]
        if missing:
            raise ConfigurationError(
                f"KMS {operation}: the key has a part in region(s) {', '.join(missing)}, which "
                f"this MultiRegionKMSService ({', '.join(self.regions.by_name)}) does not serve"
            )
        return [region for region in self.regions.all if region.name in parts]

    async def get_key_id(self, key_ref: str) -> str:
        """An alias name in every region (all must answer), or a composite id checked
        in the regions that answer (at least one); the composite id."""
        parts = self._parts(key_ref)
        resolved = await self.regions.each(
            "get_key_id",
            self._served(parts, "get_key_id"),
            lambda region: region.service.get_key_id(parts[region.name]),
            needed=1 if key_ref.startswith(COMPOSITE_PREFIX) else None,
        )
        return self._composite({**parts, **resolved})

    async def create_key(self, description: str, alias: str | None) -> str:
        """One key per region, at once; if a region fails, the error names the keys made."""
        every = self.regions.all
        gathered = await self.regions.gather(
            every,
            lambda region: region.service.create_key(description, alias=alias),
            len(every),
        )
        try:
            return self._composite(gathered.require(self.regions, "create_key", len(every)))
        except KMSError as exc:
            if not gathered.results:
                raise
            made = ", ".join(f"{n}: {k}" for n, k in gathered.results.items())
            raise restated(exc, f"{exc} (keys made: {made})") from exc

    async def encrypt_dek(
        self, key_ref: str, plaintext: bytes, context: Mapping[str, str]
    ) -> bytes:
        parts = self._parts(key_ref)
        regions = self._served(parts, "encrypt_dek")
        wrapped = await self.regions.each(
            "encrypt_dek",
            regions,
            lambda region: region.service.encrypt_dek(
                parts[region.name], plaintext, context=context
            ),
            needed=min(self.min_regions, len(regions)),
        )
        if len(wrapped) < len(regions):
            self.regions.partial_wraps += 1
            _log.warning(
                "KMS encrypt_dek wrapped a data key in %s only (%s unavailable)",
                ", ".join(wrapped),
                ", ".join(r.name for r in regions if r.name not in wrapped),
            )
        return _pack([(r.name, wrapped[r.name]) for r in regions if r.name in wrapped])

    async def decrypt_dek(self, key_ref: str, blob: bytes, context: Mapping[str, str]) -> bytes:
        parts = self._parts(key_ref)
        copies = dict(_unpack(blob))
        order = [r for r in self.regions.all if r.name in parts and r.name in copies]
        if not order:
            raise DecryptionError(DECRYPT_FAILED)
        return await self.regions.failover(
            "decrypt_dek",
            order,
            lambda region: region.service.decrypt_dek(
                parts[region.name], copies[region.name], context=context
            ),
        )

    async def update_alias(self, alias: str, key_ref: str) -> None:
        parts = self._parts(key_ref)
        regions = self._served(parts, "update_alias")
        await self.regions.each(
            "update_alias",
            regions,
            lambda region: rotation(region).update_alias(alias, parts[region.name]),
        )

    def homes(self, key_ref: str, operation: str) -> tuple[list[Region], Callable[[Region], str]]:
        """Every region's part."""
        parts = self._parts(key_ref)
        return self._served(parts, operation), lambda region: parts[region.name]

    async def re_encrypt_dek(
        self,
        blob: bytes,
        source: str,
        destination: str,
        context: Mapping[str, str],
        destination_context: Mapping[str, str],
    ) -> bytes:
        """Each region's copy moves to that region's part of the destination; see
        :meth:`~encx_async.providers._multi_region.MultiRegionKMSService.re_encrypt_dek`."""
        sources, destinations = self._parts(source), self._parts(destination)
        copies = _unpack(blob)
        held = dict(copies)
        every = self.regions.all
        readable = [r for r in every if r.name in held and r.name in sources]
        if not readable:
            raise DecryptionError(DECRYPT_FAILED)
        # Even under the same key: after a KMS-managed rotation that moves the
        # copy to the newest key material.
        moving = [r for r in readable if r.name in destinations]
        out: dict[str, bytes] = {}
        if moving:
            out |= await self.regions.each(
                "re_encrypt_dek",
                moving,
                lambda region: rotation(region).re_encrypt_dek(
                    held[region.name],
                    source_key_id=sources[region.name],
                    destination_key_id=destinations[region.name],
                    context=context,
                    destination_context=destination_context,
                ),
            )
        missing = [r for r in every if r.name in destinations and r not in moving]
        if missing:
            plaintext = await self.regions.failover(
                "re_encrypt_dek",
                readable,
                lambda region: region.service.decrypt_dek(
                    sources[region.name], held[region.name], context=context
                ),
            )
            out |= await self.regions.each(
                "re_encrypt_dek",
                missing,
                lambda region: region.service.encrypt_dek(
                    destinations[region.name], plaintext, context=destination_context
                ),
            )
        names = [name for name, _ in copies if name in out]
        names += [region.name for region in missing if region.name not in names]
        return _pack([(name, out[name]) for name in names])

    def partial_wrap(self, key_id: str, wrapped_dek: bytes) -> float | None:
        try:
            parts = self._parts(key_id)
            copies = {name for name, _ in _unpack(bytes(wrapped_dek))}
        except (ConfigurationError, DecryptionError):
            return None
        missing = [r for r in self.regions.all if r.name in parts and r.name not in copies]
        if not missing:
            return None
        now = self.regions.clock()
        return min(region.breaker.retry_in(now) for region in missing)


def _parse_composite(key_ref: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    body = key_ref[len(COMPOSITE_PREFIX) :]
    for item in body.split(","):
        region, sep, ref = item.partition("=")
        if not sep or not is_region(region) or not ref or region in parts:
            raise ConfigurationError(
                f"{key_ref!r} is not a multi-region key id "
                f"('{COMPOSITE_PREFIX}<region>=<key>,<region>=<key>...')"
            )
        parts[region] = ref
    return parts


def _pack(copies: Sequence[tuple[str, bytes]]) -> bytes:
    """The every-region wrapped key: each region's copy, named by region."""
    # Sized first: within the envelope's limit every count and length fits its field.
    size = len(_BLOB_MAGIC) + 2 + sum(3 + len(region) + len(copy) for region, copy in copies)
    if size > MAX_WRAPPED_DEK:
        raise EncryptionError(
            f"the data key wrapped in {len(copies)} regions takes {size} bytes, more than "
            f"the {MAX_WRAPPED_DEK} an envelope holds; use fewer regions"
        )
    out = bytearray(_BLOB_MAGIC)
    out += bytes([_BLOB_VERSION, len(copies)])
    for region, copy in copies:
        name = region.encode("ascii")
        out += bytes([len(name)]) + name + len(copy).to_bytes(2, "big") + copy
    return bytes(out)


def _unpack(blob: bytes) -> list[tuple[str, bytes]]:
    """The copies of :func:`_pack`; DecryptionError for anything else."""
    head = len(_BLOB_MAGIC) + 2
    if len(blob) < head or blob[: len(_BLOB_MAGIC)] != _BLOB_MAGIC:
        raise DecryptionError(DECRYPT_FAILED)
    if blob[len(_BLOB_MAGIC)] != _BLOB_VERSION:
        raise DecryptionError(DECRYPT_FAILED)
    count = blob[len(_BLOB_MAGIC) + 1]
    copies: list[tuple[str, bytes]] = []
    at = head
    for _ in range(count):
        if at >= len(blob):
            raise DecryptionError(DECRYPT_FAILED)
        name_end = at + 1 + blob[at]
        copy_start = name_end + 2
        if copy_start > len(blob):
            raise DecryptionError(DECRYPT_FAILED)
        try:
            region = blob[at + 1 : name_end].decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionError(DECRYPT_FAILED) from None
        copy_end = copy_start + int.from_bytes(blob[name_end:copy_start], "big")
        if not is_region(region) or copy_end > len(blob) or copy_end == copy_start:
            raise DecryptionError(DECRYPT_FAILED)
        if any(region == seen for seen, _ in copies):
            raise DecryptionError(DECRYPT_FAILED)
        copies.append((region, blob[copy_start:copy_end]))
        at = copy_end
    if at != len(blob) or not copies:
        raise DecryptionError(DECRYPT_FAILED)
    return copies
