"""The in-process moto server the benchmarks use; it lives in :mod:`encx_async._moto`."""

from __future__ import annotations

from encx_async._moto import MotoServer, use_fake_credentials

__all__ = ["MotoServer", "use_fake_credentials"]
