"""Test helpers: a fault-injecting wrapper around a real KMS provider, a fake clock."""

from __future__ import annotations

import asyncio

from benchmarks._delegating import DelegatingKMS
from encx_async import KeyManagementService


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class GatedKMS(DelegatingKMS):
    """Delegates to a real KMS; can hold calls at a gate or fail the next ones."""

    def __init__(self, inner: KeyManagementService) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: list[BaseException] = []
        self.started = 0
        self.entered = asyncio.Event()

    async def before(self, operation: str, data: bytes) -> None:
        await self._enter()

    async def _enter(self) -> None:
        self.started += 1
        self.entered.set()
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
