"""A KMS provider that hands every call to another one, for wrappers to build on.

The benchmarks delay the calls of a real provider with it, and the tests hold
them at a gate or count them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from anyio.abc import AsyncResource

from encx_async import KeyManagementService

__all__ = ["DelegatingKMS"]


class DelegatingKMS(AsyncResource):
    """A :class:`~encx_async.KeyManagementService` that delegates to ``inner``.

    :meth:`before` runs ahead of each wrap and unwrap; subclasses override it
    to delay, hold, fail or record the call. ``close_inner`` says whether
    closing this one closes ``inner`` (False when it belongs to someone else).
    """

    def __init__(self, inner: KeyManagementService, *, close_inner: bool = True) -> None:
        self.inner = inner
        self._close_inner = close_inner

    async def before(self, operation: Literal["encrypt_dek", "decrypt_dek"], data: bytes) -> None:
        """Called before the call is passed on; ``data`` is the key to wrap or unwrap."""

    async def get_key_id(self, alias: str) -> str:
        return await self.inner.get_key_id(alias)

    async def create_key(self, description: str, *, alias: str | None = None) -> str:
        return await self.inner.create_key(description, alias=alias)

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        await self.before("encrypt_dek", plaintext_dek)
        return await self.inner.encrypt_dek(key_id, plaintext_dek, context=context)

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        await self.before("decrypt_dek", ciphertext_dek)
        return await self.inner.decrypt_dek(key_id, ciphertext_dek, context=context)

    async def aclose(self) -> None:
        if self._close_inner:
            await self.inner.aclose()
