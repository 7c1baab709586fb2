"""Optional OpenTelemetry spans and metrics; every call here is a no-op without it.

Two parts, with different costs:

* KMS calls, which take milliseconds, get a span and a latency sample each
  (:func:`kms_call`, wrapped around ``Crypto._call_kms``). They go through
  OpenTelemetry's global API, as the instrumentation of any library does: the
  application installs a tracer and a meter provider, and until it does the API
  drops everything.
* The counters the hot path already keeps (KMS calls, DEK cache hits and
  misses) are not touched per message: :class:`CryptoMetrics` registers
  observable instruments that read :meth:`Crypto.stats` when the meter
  collects, so an encrypt costs the same with metrics on as off.

Attributes name the operation, the KEK alias and the cache side; never a key,
a plaintext or a context value.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

try:
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry import trace as _otel_trace
except ImportError:  # the "otel" extra is not installed
    _otel_metrics = None  # type: ignore[assignment]
    _otel_trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

    from ._crypto import Crypto

__all__ = ["ENABLED", "INSTRUMENTATION_NAME", "CryptoMetrics", "kms_call"]

#: Whether ``opentelemetry-api`` is importable (``pip install "encx-async[otel]"``).
ENABLED: Final = _otel_trace is not None
#: The instrumentation scope of every span and instrument.
INSTRUMENTATION_NAME: Final = "encx_async"

T = TypeVar("T")

# Proxies: they follow whatever provider the application sets, whenever it
# sets it, and hold no state of their own.
if _otel_trace is not None and _otel_metrics is not None:
    _TRACER: Any = _otel_trace.get_tracer(INSTRUMENTATION_NAME)
    _KMS_DURATION: Any = _otel_metrics.get_meter(INSTRUMENTATION_NAME).create_histogram(
        "encx.kms.duration",
        unit="s",
        description="Duration of KMS calls made by encx-async",
    )
    _CLIENT: Any = _otel_trace.SpanKind.CLIENT
else:
    _TRACER = _KMS_DURATION = _CLIENT = None


async def kms_call(operation: str, kek_alias: str, call: Awaitable[T]) -> T:
    """Await ``call`` inside a ``KMS <operation>`` span, recording its duration."""
    if _TRACER is None:
        return await call
    attributes: dict[str, str] = {"encx.kms.operation": operation, "encx.kek_alias": kek_alias}
    started = time.perf_counter()
    with _TRACER.start_as_current_span(
        f"KMS {operation}", kind=_CLIENT, attributes=attributes
    ) as span:
        try:
            result = await call
        except BaseException as exc:
            attributes["error.type"] = type(exc).__name__
            span.set_attribute("error.type", attributes["error.type"])
            raise
        finally:
            _KMS_DURATION.record(time.perf_counter() - started, attributes)
    return result


class CryptoMetrics:
    """Observable OpenTelemetry counters fed by the :meth:`Crypto.stats` of the
    instances :meth:`add`-ed to it, read only when the meter collects.

    Instruments: ``encx.kms.calls`` (by ``encx.kms.operation``),
    ``encx.dek_cache.hits``, ``encx.dek_cache.misses`` and
    ``encx.dek_cache.entries`` (by ``encx.dek_cache.side``, ``encrypt`` or
    ``decrypt``), all with ``encx.kek_alias`` and the attributes given to
    :meth:`add`.

    Create **one per meter provider** (one per process with the global
    provider) and add every Crypto to it: OpenTelemetry keeps the first
    instrument registered under a name and ignores the callbacks of later ones.
    Without ``opentelemetry-api`` it accepts the same calls and does nothing.
    It holds its Crypto instances weakly; :meth:`discard` stops reporting one.
    """

    def __init__(self, *, meter_provider: MeterProvider | None = None) -> None:
        self._sources: dict[int, tuple[weakref.ref[Crypto], dict[str, str]]] = {}
        if _otel_metrics is None:
            return
        meter = (
            meter_provider.get_meter(INSTRUMENTATION_NAME)
            if meter_provider is not None
            else _otel_metrics.get_meter(INSTRUMENTATION_NAME)
        )
        meter.create_observable_counter(
            "encx.kms.calls",
            callbacks=[self._observe_kms_calls],
            unit="{call}",
            description="KMS calls made by encx-async, by operation",
        )
        meter.create_observable_counter(
            "encx.dek_cache.hits",
            callbacks=[self._observe_hits],
            unit="{lookup}",
            description="DEK cache lookups answered without a KMS call",
        )
        meter.create_observable_counter(
            "encx.dek_cache.misses",
            callbacks=[self._observe_misses],
            unit="{lookup}",
            description="DEK cache lookups that loaded a key (one KMS call per distinct miss)",
        )
        meter.create_observable_up_down_counter(
            "encx.dek_cache.entries",
            callbacks=[self._observe_entries],
            unit="{entry}",
            description="Data keys held by the DEK cache",
        )

    def add(self, crypto: Crypto, attributes: Mapping[str, str] | None = None) -> None:
        """Report ``crypto``'s counters from now on, with extra ``attributes``."""
        base = {"encx.kek_alias": crypto.kek_alias, **(attributes or {})}
        self._sources[id(crypto)] = (weakref.ref(crypto), base)

    def discard(self, crypto: Crypto) -> None:
        """Stop reporting ``crypto`` (nothing happens if it was not added)."""
        entry = self._sources.get(id(crypto))
        if entry is not None and entry[0]() is crypto:
            del self._sources[id(crypto)]

    def __len__(self) -> int:
        return sum(1 for ref, _ in self._sources.values() if ref() is not None)

    def _live(self) -> Iterable[tuple[Crypto, dict[str, str]]]:
        for key, (ref, attributes) in list(self._sources.items()):
            crypto = ref()
            if crypto is None:
                self._sources.pop(key, None)
            else:
                yield crypto, attributes

    def _observe_kms_calls(self, options: CallbackOptions) -> Iterable[Observation]:
        assert _otel_metrics is not None
        for crypto, attributes in self._live():
            for operation, count in crypto.stats().kms_calls.items():
                yield _otel_metrics.Observation(
                    count, {**attributes, "encx.kms.operation": operation}
                )

    def _observe_cache(self, field: str) -> Iterable[Observation]:
        assert _otel_metrics is not None
        for crypto, attributes in self._live():
            cache = crypto.stats().cache
            if cache is None:
                continue
            for side in ("encrypt", "decrypt"):
                value = getattr(getattr(cache, side), field)
                yield _otel_metrics.Observation(value, {**attributes, "encx.dek_cache.side": side})

    def _observe_hits(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_cache("hits")

    def _observe_misses(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_cache("misses")

    def _observe_entries(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe_cache("entries")
