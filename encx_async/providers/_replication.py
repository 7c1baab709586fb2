"""What a provider must be able to do for a multi-region key to be made over it.

Private: the names here may change in any release. Each is a protocol, so the
multi-region service asks a provider what it can do instead of asking what it
is; a provider declares one by implementing it (and may subclass it to say so).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["CreatesMultiRegionKeys", "ReplicatesByRegion", "ReplicatesIntoServices"]


@runtime_checkable
class CreatesMultiRegionKeys(Protocol):
    """Creates the primary of a multi-region key, and aliases (regional) for keys."""

    async def create_key(
        self, description: str, *, alias: str | None = None, multi_region: bool = False
    ) -> str: ...

    async def create_alias(self, alias: str, key_id: str) -> None: ...


@runtime_checkable
class ReplicatesByRegion(Protocol):
    """Replicates a multi-region key into a region given by name (KMS ``ReplicateKey``)."""

    async def replicate_key(self, key_id: str, replica_region: str) -> str: ...


@runtime_checkable
class ReplicatesIntoServices(Protocol):
    """Replicates a multi-region key into the provider object of another region.

    For providers that are not reached by region name (the in-process local
    provider): :meth:`replicates_into` says which providers ``replicate_key``
    can copy into, and ``replicate_key`` also gives the replica its alias.
    """

    def replicates_into(self, service: object) -> bool: ...

    async def replicate_key(
        self, key_id: str, replica: Any, *, alias: str | None = None
    ) -> str: ...
