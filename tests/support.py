"""Test helpers: a fault-injecting wrapper around a real KMS provider, a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from anyio.abc import AsyncResource

from encx_async import KeyManagementService


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class GatedKMS(AsyncResource):
    """Delegates to a real KMS; can hold calls at a gate or fail the next ones."""

    def __init__(self, inner: KeyManagementService) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: list[BaseException] = []
        self.started = 0
        self.entered = asyncio.Event()

    async def _enter(self) -> None:
        self.started += 1
        self.entered.set()
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)

    async def get_key_id(self, alias: str) -> str:
        return await self.inner.get_key_id(alias)

    async def create_key(self, description: str, *, alias: str | None = None) -> str:
        return await self.inner.create_key(description, alias=alias)

    async def encrypt_dek(
        self, key_id: str, plaintext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        await self._enter()
        return await self.inner.encrypt_dek(key_id, plaintext_dek, context=context)

    async def decrypt_dek(
        self, key_id: str, ciphertext_dek: bytes, *, context: Mapping[str, str] | None = None
    ) -> bytes:
        await self._enter()
        return await self.inner.decrypt_dek(key_id, ciphertext_dek, context=context)

    async def aclose(self) -> None:
        await self.inner.aclose()
