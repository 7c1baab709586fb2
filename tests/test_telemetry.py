"""OpenTelemetry: spans and a latency histogram per KMS call, cache counters read from stats().

With the SDK installed (the dev extra), the global tracer and meter providers
are set once for this module, to in-memory exporters; OpenTelemetry allows
setting them only once per process, so they stay set afterwards, exporting to
nowhere. Without opentelemetry, a fresh interpreter that cannot import it checks
that everything still works and does nothing.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from encx_async import Crypto, DecryptionError, DEKCache
from encx_async._telemetry import ENABLED, CryptoMetrics
from encx_async.providers.local import LocalKMSService

from .conftest import TEST_ALIAS

ROOT = Path(__file__).resolve().parent.parent


class Otel:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def kms_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name.startswith("KMS ")]


@pytest.fixture(scope="module")
def otel_globals() -> Iterator[Otel]:
    otel = Otel()
    trace.set_tracer_provider(otel.tracer_provider)
    metrics.set_meter_provider(otel.meter_provider)
    if trace.get_tracer_provider() is not otel.tracer_provider:  # pragma: no cover
        pytest.skip("another test already set the global OpenTelemetry providers")
    yield otel
    otel.spans.clear()
    otel.tracer_provider.shutdown()  # later spans go nowhere


@pytest.fixture
def otel(otel_globals: Otel) -> Otel:
    otel_globals.spans.clear()
    otel_globals.reader.collect()  # drop what earlier tests recorded from the reader's view
    return otel_globals


@pytest.fixture
async def crypto() -> AsyncIterator[Crypto]:
    async with LocalKMSService() as kms:
        await kms.create_key("telemetry", alias=TEST_ALIAS)
        crypto = await Crypto.create(
            kms=kms, kek_alias=TEST_ALIAS, dek_cache=DEKCache(), database="sqlite:///:memory:"
        )
        async with crypto:
            yield crypto


def test_opentelemetry_is_seen_as_installed() -> None:
    assert ENABLED


async def test_each_kms_call_is_one_client_span_and_cache_hits_are_none(
    otel: Otel, crypto: Crypto
) -> None:
    otel.spans.clear()  # the start-up calls
    before = crypto.stats().total_kms_calls
    blobs = [await crypto.encrypt(b"m%d" % i, context={"tenant": "a"}) for i in range(50)]
    for blob in blobs:
        await crypto.decrypt(blob, context={"tenant": "a"})
    made = crypto.stats().total_kms_calls - before
    spans = otel.kms_spans()
    # 100 operations, one DEK: one wrap (the decrypt side was seeded by the encrypt).
    assert made == 1
    assert len(spans) == made
    (span,) = spans
    assert span.name == "KMS encrypt_dek"
    assert span.kind is SpanKind.CLIENT
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "encx.kms.operation": "encrypt_dek",
        "encx.kek_alias": TEST_ALIAS,
    }


async def test_a_kms_span_is_a_child_of_the_request_even_from_the_cache_task(
    otel: Otel, crypto: Crypto
) -> None:
    tracer = trace.get_tracer("tests")
    otel.spans.clear()
    with tracer.start_as_current_span("POST /users") as request:
        await crypto.encrypt(b"x", context={"tenant": "child"})
    (span,) = otel.kms_spans()
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert span.context is not None
    assert span.context.trace_id == request.get_span_context().trace_id


async def test_a_failed_kms_call_is_an_error_span_and_a_latency_sample(
    otel: Otel, crypto: Crypto
) -> None:
    blob = await crypto.encrypt(b"secret", context={"tenant": "a"})
    otel.spans.clear()
    with pytest.raises(DecryptionError):
        await crypto.decrypt(blob, context={"tenant": "b"})  # another context: KMS refuses
    (span,) = otel.kms_spans()
    assert span.name == "KMS decrypt_dek"
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "DecryptionError"
    # Nothing secret in the span: not the plaintext, not the context values.
    text = repr(span.to_json())
    assert "secret" not in text.replace("DecryptionError", "")

    points = histogram_points(otel.reader, "encx.kms.duration")
    failed = [p for p in points if p["attributes"].get("error.type") == "DecryptionError"]
    assert failed
    assert failed[0]["count"] >= 1
    assert failed[0]["attributes"]["encx.kms.operation"] == "decrypt_dek"
    ok = [p for p in points if p["attributes"].get("encx.kms.operation") == "encrypt_dek"]
    assert ok
    assert all(p["sum"] > 0 for p in ok)


def histogram_points(reader: InMemoryMetricReader, name: str) -> list[dict[str, Any]]:
    data = reader.get_metrics_data()
    found: list[dict[str, Any]] = []
    if data is None:
        return found
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        found.append(
                            {
                                "attributes": dict(point.attributes or {}),
                                "count": getattr(point, "count", None),
                                "sum": getattr(point, "sum", None),
                                "value": getattr(point, "value", None),
                            }
                        )
    return found


def values(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    return {
        tuple(sorted(p["attributes"].items())): p["value"] for p in histogram_points(reader, name)
    }


async def test_crypto_metrics_report_what_stats_says(crypto: Crypto) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        watch = CryptoMetrics(meter_provider=provider)
        watch.add(crypto, {"service": "users"})
        assert len(watch) == 1
        blobs = [await crypto.encrypt(b"v", context={"tenant": "m"}) for _ in range(10)]
        for blob in blobs:
            await crypto.decrypt(blob, context={"tenant": "m"})
        stats = crypto.stats()
        assert stats.cache is not None
        common = (("encx.kek_alias", TEST_ALIAS), ("service", "users"))

        calls = values(reader, "encx.kms.calls")
        for operation, count in stats.kms_calls.items():
            assert calls[tuple(sorted((*common, ("encx.kms.operation", operation))))] == count
        hits = values(reader, "encx.dek_cache.hits")
        misses = values(reader, "encx.dek_cache.misses")
        entries = values(reader, "encx.dek_cache.entries")
        for side in ("decrypt", "encrypt"):
            key = tuple(sorted((("encx.dek_cache.side", side), *common)))
            assert hits[key] == getattr(stats.cache, side).hits
            assert misses[key] == getattr(stats.cache, side).misses
            assert entries[key] == getattr(stats.cache, side).entries
        assert hits[tuple(sorted((("encx.dek_cache.side", "encrypt"), *common)))] == 9

        watch.discard(crypto)
        assert len(watch) == 0
        assert values(reader, "encx.kms.calls") == {}
    finally:
        provider.shutdown()


async def test_crypto_metrics_forget_a_crypto_that_is_gone() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        watch = CryptoMetrics(meter_provider=provider)
        async with LocalKMSService() as kms:
            await kms.create_key("telemetry", alias=TEST_ALIAS)
            crypto = await Crypto.create(
                kms=kms, kek_alias=TEST_ALIAS, database="sqlite:///:memory:"
            )
            async with crypto:
                watch.add(crypto)
                assert values(reader, "encx.kms.calls")
                # Without a cache there are no cache counters, only KMS calls.
                assert values(reader, "encx.dek_cache.hits") == {}
            del crypto
        gc.collect()
        assert len(watch) == 0
        assert values(reader, "encx.kms.calls") == {}
    finally:
        provider.shutdown()


_WITHOUT_OTEL = textwrap.dedent(
    """
    import asyncio, sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError("opentelemetry is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())

    from encx_async import Crypto, DEKCache
    from encx_async import _telemetry
    from encx_async.providers.local import LocalKMSService

    async def main():
        assert _telemetry.ENABLED is False
        async with LocalKMSService() as kms:
            await kms.create_key("no otel", alias="alias/no-otel")
            crypto = await Crypto.create(
                kms=kms, kek_alias="alias/no-otel", dek_cache=DEKCache(),
                database="sqlite:///:memory:",
            )
            async with crypto:
                watch = _telemetry.CryptoMetrics()
                watch.add(crypto)
                blob = await crypto.encrypt(b"plain", context={"t": "1"})
                assert await crypto.decrypt(blob, context={"t": "1"}) == b"plain"
                assert (await crypto.check()).ok
                watch.discard(crypto)
        assert not any(m.startswith("opentelemetry") for m in sys.modules)
        print("no-op ok")

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_without_opentelemetry_everything_works_and_nothing_is_imported() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    completed = subprocess.run(  # noqa: S603 (our own interpreter, a fixed script)
        [sys.executable, "-c", _WITHOUT_OTEL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "no-op ok"
