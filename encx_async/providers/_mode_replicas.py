"""The ``"replicas"`` mode of a multi-region KMS service: one wrapped key, under a multi-region key.

Private: the names here may change in any release; the mode is documented in
:mod:`encx_async.providers._multi_region`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from encx_async._exceptions import ConfigurationError, KMSError, KMSRegionMismatchError
from encx_async.providers._regions import (
    Call,
    Mode,
    MultiRegionMode,
    Region,
    arn_region,
    is_multi_region_key,
    restated,
    rotation,
    with_region,
)
from encx_async.providers._replication import (
    CreatesMultiRegionKeys,
    ReplicatesByRegion,
    ReplicatesIntoServices,
)

__all__ = ["Replicas"]


class Replicas(Mode):
    """Wraps go to the primary region first, unwraps to the nearest; a multi-region
    key has one stored id, its ARN in the primary region."""

    name: ClassVar[MultiRegionMode] = "replicas"

    def _plan(self, key_ref: str, order: Sequence[Region]) -> tuple[Region, ...]:
        """The regions a call about ``key_ref`` may use, in the order to try them.

        A multi-region key and an alias name may use every region (aliases
        are regional: give the alias to the replica in each region); any other
        key lives in one region: the one its ARN names, the primary for a bare
        id, the alias ARN's for an alias ARN.
        """
        if is_multi_region_key(key_ref) or key_ref.startswith("alias/"):
            return tuple(order)
        region = arn_region(key_ref)
        if region is None:
            return (self.regions.primary,)
        home = self.regions.by_name.get(region)
        if home is None:
            raise KMSRegionMismatchError(
                f"{key_ref!r} is in region {region or '(none)'}, but this "
                f"MultiRegionKMSService uses {', '.join(self.regions.by_name)}; only multi-region "
                "keys (mrk-...) move between regions"
            )
        return (home,)

    def _canonical(self, key_ref: str) -> str:
        """A multi-region key's ARN in the primary region, so one key has one stored id."""
        if key_ref.startswith("arn:") and is_multi_region_key(key_ref):
            return with_region(key_ref, self.regions.primary.name)
        return key_ref

    async def get_key_id(self, key_ref: str) -> str:
        found = await self.regions.failover(
            "get_key_id",
            self._plan(key_ref, self.regions.all),
            lambda region: region.service.get_key_id(key_ref),
        )
        if not is_multi_region_key(found):
            raise ConfigurationError(
                f"{key_ref!r} is key {found}, which is not a multi-region key: it lives in "
                "one region, so mode='replicas' could not fail over. Use a multi-region "
                "key (mrk-...; create_key makes one in this mode), or mode='every-region' "
                "for an ordinary key in every region"
            )
        return self._canonical(found)

    async def create_key(self, description: str, alias: str | None) -> str:
        primary_region = self.regions.primary
        primary = primary_region.service
        if not isinstance(primary, CreatesMultiRegionKeys):
            raise ConfigurationError(
                f"the service of region {primary_region.name} cannot create multi-region keys"
            )
        key_id = await self.regions.failover(
            "create_key",
            (primary_region,),
            lambda _: primary.create_key(description, alias=alias, multi_region=True),
        )
        done = [primary_region.name]
        for region in self.regions.wrap_order[1:]:
            try:
                await self.regions.failover(
                    "create_key", (region,), _replicator(primary, key_id, alias)
                )
            except KMSError as exc:
                raise restated(
                    exc,
                    f"multi-region key {key_id} was made in {', '.join(done)} but not replicated "
                    f"to {region.name}: {exc}; replicate it there, or schedule its deletion",
                ) from exc
            done.append(region.name)
        return self._canonical(key_id)

    async def encrypt_dek(
        self, key_ref: str, plaintext: bytes, context: Mapping[str, str]
    ) -> bytes:
        return await self.regions.failover(
            "encrypt_dek",
            self._plan(key_ref, self.regions.wrap_order),
            lambda region: region.service.encrypt_dek(key_ref, plaintext, context=context),
        )

    async def decrypt_dek(self, key_ref: str, blob: bytes, context: Mapping[str, str]) -> bytes:
        return await self.regions.failover(
            "decrypt_dek",
            self._plan(key_ref, self.regions.all),
            lambda region: region.service.decrypt_dek(key_ref, blob, context=context),
        )

    async def update_alias(self, alias: str, key_ref: str) -> None:
        await self.regions.each(
            "update_alias",
            self._plan(key_ref, self.regions.all),
            lambda region: rotation(region).update_alias(alias, key_ref),
        )

    def homes(self, key_ref: str, operation: str) -> tuple[list[Region], Callable[[Region], str]]:
        """The key's one home, which for a multi-region key (or an alias) is the primary."""
        if is_multi_region_key(key_ref) or key_ref.startswith("alias/"):
            return [self.regions.primary], lambda _: key_ref
        return [self._plan(key_ref, self.regions.all)[0]], lambda _: key_ref

    def everywhere(
        self, key_ref: str, operation: str
    ) -> tuple[list[Region], Callable[[Region], str]]:
        """The primary and every replica (KMS deletes the primary after its replicas)."""
        return list(self._plan(key_ref, self.regions.all)), lambda _: key_ref

    async def re_encrypt_dek(
        self,
        blob: bytes,
        source: str,
        destination: str,
        context: Mapping[str, str],
        destination_context: Mapping[str, str],
    ) -> bytes:
        """In the nearest region that has both keys and answers."""
        usable = self._plan(destination, self.regions.all)
        order = [r for r in self._plan(source, self.regions.all) if r in usable]
        if not order:
            raise KMSRegionMismatchError(
                f"{source!r} and {destination!r} share no region, so the KMS "
                "cannot move a data key between them"
            )
        return await self.regions.failover(
            "re_encrypt_dek",
            order,
            lambda region: rotation(region).re_encrypt_dek(
                blob,
                source_key_id=source,
                destination_key_id=destination,
                context=context,
                destination_context=destination_context,
            ),
        )


def _replicator(primary: CreatesMultiRegionKeys, key_id: str, alias: str | None) -> Call[None]:
    """Replicate ``key_id`` from the primary into a region, and give it ``alias`` there."""

    async def replicate(region: Region) -> None:
        service = region.service
        if isinstance(primary, ReplicatesIntoServices) and primary.replicates_into(service):
            await primary.replicate_key(key_id, service, alias=alias)
            return
        if not isinstance(primary, ReplicatesByRegion) or not isinstance(
            service, CreatesMultiRegionKeys
        ):
            raise ConfigurationError(f"the services cannot replicate keys into {region.name}")
        replica = await primary.replicate_key(key_id, region.name)
        if alias is None:
            return
        try:
            await service.create_alias(alias, replica)
        except KMSError as exc:
            # Already there and naming the replica (a retried create) is what we want.
            if exc.code != "AlreadyExistsException" or await service.get_key_id(alias) != replica:
                raise

    return replicate
