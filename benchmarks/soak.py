"""A soak run: many tasks, a long mix of operations, KEK rotations, and a KMS outage.

Run ``python -m benchmarks.soak`` (``--help`` for the options). For each
key-version database (a SQLite file, and PostgreSQL when one answers at
``--postgres-url``), one Crypto with a DEK cache and a pepper serves
``--operations`` operations drawn from a fixed mix (see :data:`MIX`), run by
``--tasks`` concurrent tasks, while another task rotates the KEK every
``--rotate-every`` operations (or seconds, with an ``s`` suffix).

The KMS is moto in this process, reached through the fault proxy of the test
suite (:mod:`tests.faultproxy`). When ``--outage-at`` of the operations are
done, the proxy stops serving for ``--outage-seconds``: it holds every request
unanswered (``stall``, the default, until ``--kms-timeout`` ends it), answers
503 (``error``) or resets the connection (``reset``). Operations a cached key
can serve go on; those that need the KMS (a rewrap, a new tenant's first
record, a key past its limits, a rotation) fail with ``KMSUnavailableError``,
and are counted as the outage's errors. A record whose write failed is not
counted as written. While the KMS stalls, each task that draws an operation
needing it waits for the deadline, so the tasks free to be served from the
cache dwindle: how much the cache serves during the outage depends on
``--kms-timeout`` as much as on the cache.

Every record written is kept with its context, aad and expected plaintext
(a SHA-256 for the large ones); reads during the run check theirs, and at the
end every record is decrypted and compared. The report gives figures: counts
by operation and by error, latencies, records written and verified,
throughput, resident memory, event-loop lag and KMS calls. Moto's thread and
the fault proxy share this process and its event loop with the 200 tasks, so
a KMS call here waits for the loop far longer than a real one would, and the
lag includes the garbage collector walking the records kept. The exit status
is 1 only when a record was lost or an error happened that the outage does not
explain, which is a matter of correctness, not of speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from encx_async import Crypto, DEKCache, KMSUnavailableError, SealedRecord
from encx_async._keystore import redact_url
from encx_async.providers.aws import Config, KMSService
from tests.faultproxy import FaultProxy

from ._common import (
    Figure,
    Output,
    Progress,
    ensure_key,
    max_lag,
    parse_options,
    run_script,
    table,
)
from ._moto import MotoServer
from .stream import reset_peak_rss, status_kib

PROG = "python -m benchmarks.soak"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: The share of each kind of operation, in percent.
MIX: Mapping[str, float] = {
    "encrypt": 25.0,  # a small record under a tenant's context, its id as aad, and its index
    "decrypt": 35.0,  # a small record written earlier, checked against its plaintext
    "seal_record": 10.0,  # three fields under one DEK
    "open_record": 10.0,  # a sealed record written earlier, checked field by field
    "hash lookup": 19.2,  # hash_basic of a record's e-mail, found in the index
    "rewrap": 0.5,  # a record written before the last rotation, moved to the current KEK
    "new tenant": 0.2,  # a record under a context never seen before: the cache cannot help
    "large encrypt": 0.1,  # --large-kib of payload, encrypted in a worker thread
}
#: What an operation turns into while there is nothing for it to read yet.
FALLBACK = {
    "decrypt": "encrypt",
    "hash lookup": "encrypt",
    "open_record": "seal_record",
    "rewrap": "decrypt",
}
#: The operations a cached key can serve; during the outage, their successes
#: are what the cache served.
KEYED = ("encrypt", "decrypt", "seal_record", "open_record", "large encrypt")
TENANTS = 16
EMAIL_DOMAIN = "users.email"
#: Seconds, after the outage's end and a KMS call's deadline, within which a
#: KMSUnavailableError is still put down to the outage: room for event-loop lag.
GRACE = 2.0
VERIFY_ATTEMPTS = 3
POLL = 0.02
MIB = 1024 * 1024

Database = Literal["sqlite", "postgres"]
OutageMode = Literal["stall", "error", "reset"]


class Mismatch(Exception):
    """A record came back different from what was written."""


@dataclass(slots=True)
class Envelope:
    """A record kept for checking: an ``encrypt`` envelope and what it must decrypt to."""

    context: dict[str, str]
    aad: bytes
    #: the plaintext, or for a large record its SHA-256
    expected: bytes
    blob: bytes
    large: bool = False

    async def check(self, crypto: Crypto) -> None:
        plaintext = await crypto.decrypt(self.blob, context=self.context, aad=self.aad)
        got = hashlib.sha256(plaintext).digest() if self.large else plaintext
        if got != self.expected:
            raise Mismatch("an envelope decrypted to something else")

    def size(self) -> int:
        return len(self.blob) + len(self.expected) + len(self.aad)


@dataclass(slots=True)
class Sealed:
    """A record kept for checking: a ``seal_record`` result and its fields."""

    context: dict[str, str]
    aad: bytes
    expected: dict[str, bytes]
    record: SealedRecord

    async def check(self, crypto: Crypto) -> None:
        fields = await crypto.open_record(self.record, context=self.context, aad=self.aad)
        if fields != self.expected:
            raise Mismatch("a sealed record opened to something else")

    def size(self) -> int:
        kept = sum(len(v) for v in self.expected.values())
        return len(self.record.header) + sum(len(v) for v in self.record.fields.values()) + kept


Record = Envelope | Sealed


@dataclass(slots=True)
class Outage:
    """When the KMS was down, and how long after that its failures may still show."""

    grace: float
    started: float | None = None
    ended: float | None = None

    def covers(self, moment: float) -> bool:
        """Whether ``moment`` falls within the outage itself."""
        if self.started is None or moment < self.started:
            return False
        return self.ended is None or moment <= self.ended

    def touches(self, started: float, ended: float) -> bool:
        """Whether an operation that ran from ``started`` to ``ended`` may have met the outage."""
        if self.started is None or ended < self.started:
            return False
        return self.ended is None or started <= self.ended + self.grace

    def explains(self, moment: float) -> bool:
        """Whether a KMS failure seen at ``moment`` can be the outage's."""
        return self.touches(moment, moment)


@dataclass
class Soak:
    """One soak run's state: the records kept, and every count."""

    crypto: Crypto
    rng: random.Random
    plan: list[str]
    large_size: int
    outage: Outage
    records: dict[int, Record] = field(default_factory=dict)
    small: list[int] = field(default_factory=list)
    sealed: list[int] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    #: small records written before the last rotation: rewrap picks among them
    old_upto: int = 0
    issued: int = 0
    completed: int = 0
    finished: bool = False
    ok: Counter[str] = field(default_factory=Counter)
    failed_expected: Counter[str] = field(default_factory=Counter)
    failed_unexpected: Counter[str] = field(default_factory=Counter)
    errors_expected: Counter[str] = field(default_factory=Counter)
    errors_unexpected: Counter[str] = field(default_factory=Counter)
    outage_ok: Counter[str] = field(default_factory=Counter)
    outage_failed: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    #: how long each operation took, by kind, failures included, unless the outage touched it
    seconds: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    checked_during_run: int = 0
    rewrapped: int = 0
    rotations: int = 0

    def resolve(self, kind: str) -> str:
        """The kind to run: ``kind``, or what it falls back to while it has nothing to read."""
        while kind in FALLBACK and not self._can(kind):
            kind = FALLBACK[kind]
        return kind

    def _can(self, kind: str) -> bool:
        if kind == "open_record":
            return bool(self.sealed)
        if kind == "rewrap":
            return self.old_upto > 0
        return bool(self.small)

    def finish(self, kind: str, started: float, ended: float, error: Exception | None) -> None:
        """Count one operation (or rotation) that ran from ``started`` to ``ended``."""
        if not self.outage.touches(started, ended):
            self.seconds[kind].append(ended - started)
        during = self.outage.covers(ended)
        if error is None:
            self.ok[kind] += 1
            if during:
                self.outage_ok[kind] += 1
            return
        if during:
            self.outage_failed[kind] += 1
        name = type(error).__name__
        if isinstance(error, KMSUnavailableError) and self.outage.explains(ended):
            self.failed_expected[kind] += 1
            self.errors_expected[name] += 1
            return
        self.failed_unexpected[kind] += 1
        self.errors_unexpected[name] += 1
        if len(self.samples) < 5:
            when = ""
            if self.outage.started is not None:
                when = f" ({ended - self.outage.started:+.1f} s from the outage's start)"
            self.samples.append(f"{kind}{when}: {name}: {error}")

    def held_bytes(self) -> int:
        return sum(record.size() for record in self.records.values())


# -- operations ------------------------------------------------------------------

Operation = Callable[[Soak, int, list[dict[str, str]]], Awaitable[None]]


def tenant_contexts() -> list[dict[str, str]]:
    return [{"tenant": f"tenant-{i}"} for i in range(TENANTS)]


def _email(record_id: int) -> str:
    return f"user{record_id}@example.com"


async def _write_small(soak: Soak, record_id: int, context: dict[str, str]) -> None:
    crypto = soak.crypto
    aad = b"record:%d" % record_id
    plaintext = soak.rng.randbytes(soak.rng.randrange(16, 512))
    blob = await crypto.encrypt(plaintext, context=context, aad=aad)
    digest = crypto.hash_basic(_email(record_id), domain=EMAIL_DOMAIN)
    soak.records[record_id] = Envelope(context, aad, plaintext, blob)
    soak.small.append(record_id)
    soak.index[digest] = record_id


async def op_encrypt(soak: Soak, n: int, contexts: list[dict[str, str]]) -> None:
    await _write_small(soak, n, contexts[soak.rng.randrange(len(contexts))])


async def op_new_tenant(soak: Soak, n: int, contexts: list[dict[str, str]]) -> None:
    await _write_small(soak, n, {"tenant": f"new-{n}"})


async def op_large(soak: Soak, n: int, contexts: list[dict[str, str]]) -> None:
    context = contexts[soak.rng.randrange(len(contexts))]
    aad = b"record:%d" % n
    plaintext = os.urandom(soak.large_size)
    blob = await soak.crypto.encrypt(plaintext, context=context, aad=aad)
    digest = hashlib.sha256(plaintext).digest()
    soak.records[n] = Envelope(context, aad, digest, blob, large=True)


async def op_decrypt(soak: Soak, n: int, contexts: list[dict[str, str]]) -> None:
    await soak.records[soak.small[soak.rng.randrange(len(soak.small))]].check(soak.crypto)
    soak.checked_during_run += 1


async def op_seal(soak: Soak, n: int, contexts: list[dict[str, str]]) -> None:
    rng = soak.rng
    context = contexts[rng.randrange(len(contexts))]
    aad = b"sealed:%d" % n
    fields = {
        "name": f"User {n}".encode(),
        "email": _email(n).encode(),
        "notes": rng.randbytes(rng.randrange(0, 256)),
    }
    sealed = await soak.crypto.seal_record(fields, context=context, aad=aad)
    soak.records[n] = Sealed(context, aad, fields, sealed)
    soak.sealed.append(n)


async def op_open(soak: Soak, n: int, contexts: list[dict[str, str]]) -> None:
    await soak.records[soak.sealed[soak.rng.randrange(len(soak.sealed))]].check(soak.crypto)
    soak.checked_during_run += 1


async def op_lookup(soak: Soak, n: int, contexts: list[dict[str, str]]) -> None:
    record_id = soak.small[soak.rng.randrange(len(soak.small))]
    digest = soak.crypto.hash_basic(_email(record_id), domain=EMAIL_DOMAIN)
    if soak.index.get(digest) != record_id:
        raise Mismatch("a blind-index lookup found another record")


async def op_rewrap(soak: Soak, n: int, contexts: list[dict[str, str]]) -> None:
    record = soak.records[soak.small[soak.rng.randrange(soak.old_upto)]]
    assert isinstance(record, Envelope)
    before = record.blob
    moved = await soak.crypto.rewrap(before, context=record.context)
    # Only a rewrap that succeeded replaces the blob; the old one stays readable.
    if moved != before:
        record.blob = moved
        soak.rewrapped += 1


OPERATIONS: Mapping[str, Operation] = {
    "encrypt": op_encrypt,
    "decrypt": op_decrypt,
    "seal_record": op_seal,
    "open_record": op_open,
    "hash lookup": op_lookup,
    "rewrap": op_rewrap,
    "new tenant": op_new_tenant,
    "large encrypt": op_large,
}


# -- the tasks -------------------------------------------------------------------


async def worker(soak: Soak, progress: Progress) -> None:
    contexts = tenant_contexts()
    while soak.issued < len(soak.plan):
        n = soak.issued
        soak.issued += 1
        kind = soak.resolve(soak.plan[n])
        started = time.monotonic()
        error: Exception | None = None
        try:
            await OPERATIONS[kind](soak, n, contexts)
        except Exception as exc:  # counted: one failed operation must not end the run
            error = exc
        soak.finish(kind, started, time.monotonic(), error)
        soak.completed += 1
        progress.advance()
        # A cached operation never suspends; a service's requests do, between
        # them at least. Without this, 200 tasks would starve the KMS client's
        # I/O, the rotation and the outage of the event loop.
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True)
class Every:
    """How often the KEK rotates: every ``count`` operations, or seconds."""

    count: float
    unit: Literal["operations", "seconds"]

    def __str__(self) -> str:
        if self.unit == "seconds":
            return f"{self.count:g} s"
        return f"{self.count:,.0f} operations"


def parse_every(text: str) -> Every:
    try:
        if text.endswith("s"):
            every = Every(float(text[:-1]), "seconds")
        else:
            every = Every(int(text), "operations")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a number of operations (10000) nor of seconds (5s)"
        ) from None
    if not every.count > 0:
        raise argparse.ArgumentTypeError("the rotation interval must be positive")
    return every


async def rotator(soak: Soak, every: Every) -> None:
    """Rotate the KEK whenever due, until the operations are done; retry a failed one."""
    clock = time.monotonic
    due = every.count if every.unit == "operations" else clock() + every.count
    while not soak.finished:
        now = soak.completed if every.unit == "operations" else clock()
        if now < due:
            await asyncio.sleep(POLL)
            continue
        error: Exception | None = None
        started = clock()
        try:
            await soak.crypto.rotate_kek()
        except Exception as exc:  # counted, then tried again
            error = exc
        soak.finish("rotate_kek", started, clock(), error)
        if error is not None:
            await asyncio.sleep(10 * POLL)
            continue
        soak.rotations += 1
        soak.old_upto = len(soak.small)
        due = due + every.count if every.unit == "operations" else clock() + every.count


@dataclass(slots=True)
class OutageFigures:
    seconds: float = 0.0
    kms_calls: int = 0
    proxy_requests: int = 0
    operations: int = 0


async def take_kms_down(
    soak: Soak, proxy: FaultProxy, *, at: int, seconds: float, mode: OutageMode
) -> OutageFigures:
    """Take the KMS down once ``at`` operations are done, for ``seconds``."""
    figures = OutageFigures()
    while soak.completed < at:
        if soak.finished:
            return figures
        await asyncio.sleep(POLL / 4)
    calls, requests, done = soak.crypto.stats().total_kms_calls, proxy.requests, soak.completed
    soak.outage.started = time.monotonic()
    if mode == "stall":
        proxy.stall()
    elif mode == "error":
        proxy.error(503, "ServiceUnavailableException", "injected outage")
    else:
        proxy.reset()
    try:
        await asyncio.sleep(seconds)
    finally:
        proxy.pass_through()
        soak.outage.ended = time.monotonic()
    figures.seconds = soak.outage.ended - soak.outage.started
    figures.kms_calls = soak.crypto.stats().total_kms_calls - calls
    figures.proxy_requests = proxy.requests - requests
    figures.operations = soak.completed - done
    return figures


async def verify_all(soak: Soak, tasks: int, *, show_progress: bool) -> dict[str, Any]:
    """Decrypt every record kept and compare; a KMS failure is retried, anything else is loss."""
    ids = iter(list(soak.records))
    verified = 0
    retries = 0
    lost: Counter[str] = Counter()

    async def check(progress: Progress) -> None:
        nonlocal verified, retries
        for record_id in ids:
            record = soak.records[record_id]
            for attempt in range(VERIFY_ATTEMPTS):
                try:
                    await record.check(soak.crypto)
                except KMSUnavailableError as exc:
                    if attempt == VERIFY_ATTEMPTS - 1:
                        lost[type(exc).__name__] += 1
                        break
                    retries += 1
                    await asyncio.sleep(0.5 * 2**attempt)
                except Exception as exc:  # a record that cannot be read back is lost
                    lost[type(exc).__name__] += 1
                    break
                else:
                    verified += 1
                    break
            progress.advance()

    started = time.perf_counter()
    with Progress("verifying records", len(soak.records), enabled=show_progress) as progress:
        await asyncio.gather(*(check(progress) for _ in range(tasks)))
    return {
        "verified": verified,
        "lost": sum(lost.values()),
        "lost_by_error": dict(lost),
        "kms_retries": retries,
        "seconds": time.perf_counter() - started,
    }


# -- one database ----------------------------------------------------------------


async def postgres_problem(url: str) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used, or None when it answers."""
    try:
        import asyncpg
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[dev]')"
    try:
        connection = await asyncpg.connect(url, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError, ValueError) as exc:
        return f"cannot connect to {redact_url(url)}: {type(exc).__name__}"
    await connection.close()
    return None


async def forget_alias(url: str, alias: str) -> None:
    """Delete the soak alias's KEK versions from PostgreSQL: the database is not ours."""
    import asyncpg

    connection = await asyncpg.connect(url, timeout=5)
    try:
        await connection.execute("DELETE FROM encx_kek_versions WHERE alias = $1", alias)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def key_database(database: Database, postgres_url: str) -> AsyncIterator[str]:
    """The URL of the key-version database of one run: PostgreSQL, or a new SQLite file."""
    if database == "postgres":
        yield postgres_url
        return
    with tempfile.TemporaryDirectory(prefix="encx-soak-") as tmp:
        yield f"sqlite:///{Path(tmp) / 'keys.db'}"


@dataclass(frozen=True, slots=True)
class Timing:
    """When the operations ran, on the monotonic clock."""

    started: float
    seconds: float

    def overlap(self, outage: Outage) -> float:
        """Seconds of the operations during which the KMS was down."""
        if outage.started is None or outage.ended is None:
            return 0.0
        end = min(outage.ended, self.started + self.seconds)
        return max(0.0, end - max(outage.started, self.started))


async def soak_run(
    database: Database, kms: KMSService, proxy: FaultProxy, args: argparse.Namespace
) -> dict[str, Any]:
    alias = f"alias/encx-soak-{uuid.uuid4().hex[:12]}"
    await ensure_key(kms, alias)
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(key_database(database, args.postgres_url))
        crypto = await Crypto.create(
            kms=kms, kek_alias=alias, dek_cache=DEKCache(), pepper=os.urandom(32), database=url
        )
        if database == "postgres":
            stack.push_async_callback(forget_alias, url, alias)
        await stack.enter_async_context(crypto)
        rng = random.Random(args.seed)
        plan = rng.choices(list(MIX), weights=list(MIX.values()), k=args.operations)
        soak = Soak(crypto, rng, plan, args.large_kib * 1024, Outage(args.kms_timeout + GRACE))
        # Warm up, so imports and the first KMS calls are not in the figures.
        warm = {"tenant": "warm"}
        await crypto.decrypt(await crypto.encrypt(b"warm", context=warm), context=warm)
        gc.collect()
        rss_start = status_kib("VmRSS")
        peak_measurable = rss_start is not None and reset_peak_rss()
        calls_before = Counter(crypto.stats().kms_calls)

        async def operations() -> tuple[Timing, OutageFigures]:
            down = asyncio.create_task(
                take_kms_down(
                    soak,
                    proxy,
                    at=int(args.operations * args.outage_at),
                    seconds=args.outage_seconds,
                    mode=args.outage_mode,
                )
            )
            rotating = asyncio.create_task(rotator(soak, args.rotate_every))
            label = f"{database}: operations"
            with Progress(label, args.operations, enabled=args.progress) as progress:
                started = time.monotonic()
                try:
                    await asyncio.gather(*(worker(soak, progress) for _ in range(args.tasks)))
                    timing = Timing(started, time.monotonic() - started)
                finally:
                    soak.finished = True
                    # The outage runs its course: the verification needs the KMS back.
                    figures = await down
                    await rotating
            return timing, figures

        lag_ms, _, (timing, outage_figures) = await max_lag(operations)
        calls_in_operations = Counter(crypto.stats().kms_calls) - calls_before
        verify = await verify_all(soak, args.tasks, show_progress=args.progress)
        rss_end = status_kib("VmRSS")
        peak = status_kib("VmHWM") if peak_measurable else None
        calls = Counter(crypto.stats().kms_calls) - calls_before
        cache = crypto.stats().cache
        held_mib = soak.held_bytes() / MIB

    def mib(kib: int | None) -> float | None:
        return None if kib is None else kib / 1024

    overlap = timing.overlap(soak.outage)
    outside = soak.completed - outage_figures.operations
    by_kind = {
        kind: {
            "ok": soak.ok[kind],
            "failed_in_outage": soak.failed_expected[kind],
            "failed_otherwise": soak.failed_unexpected[kind],
            "ok_during_outage": soak.outage_ok[kind],
            "failed_during_outage": soak.outage_failed[kind],
            **latencies_ms(soak.seconds[kind]),
        }
        for kind in [*MIX, "rotate_kek"]
        if soak.ok[kind] or soak.failed_expected[kind] or soak.failed_unexpected[kind]
    }
    return {
        "database": database,
        "kek_alias": alias,
        "operations": soak.completed,
        "seconds": timing.seconds,
        "by_kind": by_kind,
        "errors": {
            "outage": dict(soak.errors_expected),
            "unexpected": dict(soak.errors_unexpected),
        },
        "outage_errors": sum(soak.errors_expected.values()),
        "unexpected_errors": sum(soak.errors_unexpected.values()),
        "unexpected_samples": soak.samples,
        "rotations": soak.rotations,
        "records": {
            "written": len(soak.records),
            "verified": verify["verified"],
            "lost": verify["lost"],
            "lost_by_error": verify["lost_by_error"],
            "checked_during_run": soak.checked_during_run,
            "rewrapped": soak.rewrapped,
            "verify_seconds": verify["seconds"],
            "verify_kms_retries": verify["kms_retries"],
            "held_mib": held_mib,
        },
        "throughput": {
            "overall_ops_per_s": soak.completed / timing.seconds,
            "outside_outage_ops_per_s": outside / (timing.seconds - overlap)
            if timing.seconds > overlap
            else None,
            "during_outage_ops_per_s": outage_figures.operations / overlap if overlap else None,
        },
        "rss_mib": {
            "start": mib(rss_start),
            "end": mib(rss_end),
            "growth": None if rss_start is None or rss_end is None else mib(rss_end - rss_start),
            "peak": mib(peak),
        },
        "max_lag_ms": lag_ms,
        "kms_calls": {
            "operations": dict(calls_in_operations),
            "with_verification": dict(calls),
            "total": sum(calls.values()),
        },
        "cache_hit_ratio": None if cache is None else cache.hit_ratio,
        "outage": {
            "mode": args.outage_mode,
            "seconds": outage_figures.seconds,
            "overlap_seconds": overlap,
            "operations": outage_figures.operations,
            "served_from_cache": sum(soak.outage_ok[kind] for kind in KEYED),
            "hash_lookups": soak.outage_ok["hash lookup"],
            "failed": sum(soak.outage_failed.values()),
            "kms_errors": sum(soak.errors_expected.values()),
            "kms_calls": outage_figures.kms_calls,
            "proxy_requests": outage_figures.proxy_requests,
        },
    }


# -- the report ------------------------------------------------------------------


def latencies_ms(seconds: list[float]) -> dict[str, float]:
    """The median, 99th percentile (nearest rank) and worst of ``seconds``, in ms."""
    ordered = sorted(seconds)
    if not ordered:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

    def rank(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return {"p50_ms": rank(0.5), "p99_ms": rank(0.99), "max_ms": 1000 * ordered[-1]}


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def report(out: Output, run: dict[str, Any]) -> None:
    database = run["database"]
    out.section(f"{database}: {run['operations']:,} operations in {run['seconds']:.1f} s")
    rows = [
        [
            kind,
            f"{c['ok']:,}",
            f"{c['failed_in_outage']:,}",
            f"{c['failed_otherwise']:,}",
            f"{c['ok_during_outage']:,}",
            f"{c['failed_during_outage']:,}",
            f"{c['p50_ms']:,.1f}",
            f"{c['p99_ms']:,.1f}",
            f"{c['max_ms']:,.0f}",
        ]
        for kind, c in run["by_kind"].items()
    ]
    headers = [
        "operation",
        "ok",
        "failed: outage",
        "failed: other",
        "outage ok",
        "outage failed",
        "p50 ms",
        "p99 ms",
        "max ms",
    ]
    out.say(table(headers, rows))
    out.say(
        "(rotate_kek runs beside the operations; 'outage' columns: ended while it lasted; "
        "latencies: operations\n the outage cannot have touched, failures included)"
    )
    errors = run["errors"]
    names = sorted(set(errors["outage"]) | set(errors["unexpected"]))
    if names:
        out.say()
        out.say(
            table(
                ["error", "from the outage", "unexpected"],
                [
                    [
                        name,
                        f"{errors['outage'].get(name, 0):,}",
                        f"{errors['unexpected'].get(name, 0):,}",
                    ]
                    for name in names
                ],
            )
        )
    for sample in run["unexpected_samples"]:
        out.say(f"unexpected: {sample}")
    records, rates, rss, kms, down = (
        run["records"],
        run["throughput"],
        run["rss_mib"],
        run["kms_calls"],
        run["outage"],
    )
    out.say()
    out.say(
        f"records: {records['written']:,} written, {records['verified']:,} verified at the end "
        f"({records['verify_seconds']:.1f} s), {records['lost']:,} lost; "
        f"{records['checked_during_run']:,} reads checked during the run; "
        f"{records['rewrapped']:,} rewrapped; {run['rotations']} rotations"
    )
    out.say(
        f"throughput: {_fmt(rates['overall_ops_per_s'])} ops/s overall, "
        f"{_fmt(rates['outside_outage_ops_per_s'])} outside the outage, "
        f"{_fmt(rates['during_outage_ops_per_s'])} during it"
    )
    out.say(
        f"RSS: {_fmt(rss['start'], ',.1f')} MiB at the start, {_fmt(rss['end'], ',.1f')} at "
        f"the end (growth {_fmt(rss['growth'], ',.1f')}, peak {_fmt(rss['peak'], ',.1f')}); "
        f"the records kept hold {records['held_mib']:,.1f} MiB of bytes"
    )
    out.say(f"event-loop lag: {run['max_lag_ms']:,.1f} ms at worst during the operations")
    calls = ", ".join(f"{op} {n:,}" for op, n in sorted(kms["with_verification"].items()))
    out.say(
        f"KMS calls: {kms['total']:,} ({calls}); cache hit ratio "
        f"{_fmt(run['cache_hit_ratio'], '.4f')}"
    )
    out.say(
        f"outage ({down['mode']}, {down['seconds']:.1f} s): {down['operations']:,} operations "
        f"ended, {down['served_from_cache']:,} served by cached keys and "
        f"{down['hash_lookups']:,} hash lookups; {down['failed']:,} failed; "
        f"{down['kms_calls']:,} KMS calls tried, {down['proxy_requests']:,} requests reached "
        f"the dead KMS; {down['kms_errors']:,} KMS errors put down to it in all"
    )


def figures_of(run: dict[str, Any]) -> list[Figure]:
    db = run["database"]
    rates, down = run["throughput"], run["outage"]
    figures = [
        Figure(f"{db}: records written", float(run["records"]["written"]), unit=""),
        Figure(f"{db}: records lost", float(run["records"]["lost"]), unit=""),
        Figure(f"{db}: unexpected errors", float(run["unexpected_errors"]), unit=""),
        Figure(f"{db}: throughput, overall", rates["overall_ops_per_s"], unit=" ops/s"),
    ]
    if rates["outside_outage_ops_per_s"] is not None:
        figures.append(
            Figure(
                f"{db}: throughput, outside the outage",
                rates["outside_outage_ops_per_s"],
                unit=" ops/s",
            )
        )
    figures += [
        Figure(f"{db}: served by cached keys, outage", float(down["served_from_cache"]), unit=""),
        Figure(f"{db}: KMS errors from the outage", float(down["kms_errors"]), unit=""),
        Figure(f"{db}: event-loop lag, worst", run["max_lag_ms"], unit=" ms"),
    ]
    if run["rss_mib"]["growth"] is not None:
        figures.append(Figure(f"{db}: RSS growth", run["rss_mib"]["growth"], unit=" MiB"))
    return figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A long mixed run with KEK rotations and a KMS outage, every record checked.",
    )
    parser.add_argument("--operations", type=int, default=100_000, help="operations (100000)")
    parser.add_argument("--tasks", type=int, default=200, help="concurrent tasks (200)")
    parser.add_argument(
        "--rotate-every",
        type=parse_every,
        default=parse_every("30000"),
        help="rotate the KEK every N operations, or every N seconds with an s suffix (30000)",
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres", "both"),
        help="the key-version databases to run on "
        "(default: both when PostgreSQL answers at --postgres-url, else sqlite)",
    )
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="the PostgreSQL server (default: a local one with trust authentication, "
        "database test); the run's KEK versions are deleted from it afterwards",
    )
    parser.add_argument(
        "--outage-at",
        type=float,
        default=0.5,
        help="the share of the operations done when the KMS goes down (0.5)",
    )
    parser.add_argument(
        "--outage-seconds", type=float, default=3.0, help="how long the KMS stays down (3)"
    )
    parser.add_argument(
        "--outage-mode",
        choices=("stall", "error", "reset"),
        default="stall",
        help="what the KMS does meanwhile: never answer, answer 503, or reset (stall)",
    )
    parser.add_argument(
        "--kms-timeout",
        type=float,
        default=5.0,
        help="the deadline of one KMS request, retries included, in seconds (5)",
    )
    parser.add_argument(
        "--large-kib", type=int, default=256, help="size of a large payload, KiB (256)"
    )
    parser.add_argument("--seed", type=int, default=15, help="seed of the operation mix (15)")
    args = parse_options(parser, argv, counts=("operations", "tasks", "large_kib"), progress=True)
    if not 0.0 < args.outage_at < 1.0:
        parser.error("--outage-at must be between 0 and 1")
    if args.outage_seconds < 0 or not args.kms_timeout > 0:
        parser.error("--outage-seconds must be at least 0 and --kms-timeout positive")
    return args


async def choose_databases(args: argparse.Namespace) -> tuple[list[Database], str | None]:
    """The databases to run on, and a note when PostgreSQL was left out for want of one."""
    if args.database == "sqlite":
        return ["sqlite"], None
    if args.database == "postgres":
        return ["postgres"], None
    if args.database == "both":
        return ["sqlite", "postgres"], None
    problem = await postgres_problem(args.postgres_url)
    if problem is None:
        return ["sqlite", "postgres"], None
    return ["sqlite"], f"SQLite only: PostgreSQL is left out ({problem}; see --postgres-url)"


async def run(args: argparse.Namespace, out: Output) -> dict[str, Any]:
    started = time.perf_counter()
    databases, note = await choose_databases(args)
    out.say("encx-async soak benchmark")
    out.say(
        f"{args.operations:,} operations by {args.tasks} tasks on {', '.join(databases)}; "
        f"KEK rotated every {args.rotate_every}; KMS down ({args.outage_mode}) for "
        f"{args.outage_seconds:g} s once {args.outage_at:.0%} are done; KMS deadline "
        f"{args.kms_timeout:g} s; moto in this process, {os.cpu_count()} CPU cores"
    )
    if note is not None:
        out.say(note)
    runs: dict[str, dict[str, Any]] = {}
    with MotoServer() as moto:
        async with FaultProxy(moto.endpoint_url) as proxy:
            for database in databases:
                # A client per run: botocore's retry quota, drained by one outage,
                # is the client's own.
                config = Config(endpoint_url=proxy.url, call_timeout=args.kms_timeout)
                async with await KMSService.create(config) as kms:
                    runs[database] = await soak_run(database, kms, proxy, args)
                report(out, runs[database])
    figures = [figure for result in runs.values() for figure in figures_of(result)]
    out.section("Figures")
    out.figures(figures)
    elapsed = time.perf_counter() - started
    out.say(f"\n(took {elapsed:.1f} s)")
    return {
        "benchmark": "soak",
        "settings": {
            "operations": args.operations,
            "tasks": args.tasks,
            "rotate_every": {"count": args.rotate_every.count, "unit": args.rotate_every.unit},
            "outage_at": args.outage_at,
            "outage_seconds": args.outage_seconds,
            "outage_mode": args.outage_mode,
            "kms_timeout": args.kms_timeout,
            "large_kib": args.large_kib,
            "seed": args.seed,
            "mix_percent": dict(MIX),
        },
        "note": note,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "figures": [figure.as_json() for figure in figures],
        "seconds": elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[dict[str, Any]] = []

    async def script(args: argparse.Namespace, out: Output) -> dict[str, Any]:
        results.append(await run(args, out))
        return results[-1]

    status = run_script(script, args, prog=PROG)
    if status or not results:
        return status or 1
    # Speed is never judged; a record lost or an error the outage does not explain is.
    wrong = [
        f"{name}: {r['records']['lost']} record(s) lost, "
        f"{r['unexpected_errors']} unexpected error(s)"
        for name, r in results[0]["runs"].items()
        if r["records"]["lost"] or r["unexpected_errors"]
    ]
    if wrong:
        print(f"{PROG}: exit status 1: {'; '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
