"""What the DEK cache buys: KMS calls, throughput and cost, with and without it.

Run ``python -m benchmarks.cache`` (``--help`` for the options). By default it
starts moto in this process, encrypts then decrypts ``--records`` records without
a cache and with ``DEKCache()`` defaults, then compares the cached round trip with
bare AES-GCM, with the leanest async envelope one could write, and with the AWS
Encryption SDK's caching materials manager. It reports figures, not verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from encx_async import Crypto, CryptoStats, DEKCache, KeyManagementService
from encx_async._envelope import parse

from ._common import (
    BENCH_ALIAS,
    CONTEXT,
    AwsTarget,
    DelayedKMS,
    Figure,
    Output,
    Progress,
    aws_kms,
    best_rates,
    ensure_key,
    fmt_rate,
    lean_envelope_loop,
    open_crypto,
    parse_options,
    raw_aesgcm_loops,
    run_script,
    table,
)

UNCACHED_CAP = 2000
#: AWS KMS list price for symmetric cryptographic requests
USD_PER_REQUEST = 0.03 / 10_000
#: the KMS operations whose count grows with the data; the others happen at start-up
DATA_KEY_OPS = ("encrypt_dek", "decrypt_dek")


# -- the cached / uncached comparison --------------------------------------------


@dataclass(frozen=True, slots=True)
class Phase:
    """One pass over the records in one direction."""

    seconds: float
    stats: CryptoStats

    def rate(self, records: int) -> float:
        return records / max(self.seconds, 1e-9)

    def data_key_calls(self) -> int:
        return sum(self.stats.kms_calls.get(op, 0) for op in DATA_KEY_OPS)

    def hit_ratio(self) -> float | None:
        return None if self.stats.cache is None else self.stats.cache.hit_ratio


@dataclass(frozen=True, slots=True)
class Run:
    label: str
    records: int
    encrypt: Phase
    decrypt: Phase

    def calls(self, operation: str) -> int:
        return self.encrypt.stats.kms_calls.get(operation, 0) + self.decrypt.stats.kms_calls.get(
            operation, 0
        )

    def calls_per_record(self) -> float:
        """KMS calls that grow with the data; the start-up calls (alias lookups) are left out."""
        return (self.encrypt.data_key_calls() + self.decrypt.data_key_calls()) / self.records

    def cost_per_million(self) -> float:
        return self.calls_per_record() * 1_000_000 * USD_PER_REQUEST

    def as_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "encrypt_records_per_s": self.encrypt.rate(self.records),
            "decrypt_records_per_s": self.decrypt.rate(self.records),
            "kms_calls": {
                "encrypt_phase": dict(self.encrypt.stats.kms_calls),
                "decrypt_phase": dict(self.decrypt.stats.kms_calls),
            },
            "kms_calls_total": self.encrypt.stats.total_kms_calls
            + self.decrypt.stats.total_kms_calls,
            "data_key_calls": self.encrypt.data_key_calls() + self.decrypt.data_key_calls(),
            "kms_calls_per_record": self.calls_per_record(),
            "hit_ratio": {
                "encrypt_phase": self.encrypt.hit_ratio(),
                "decrypt_phase": self.decrypt.hit_ratio(),
            },
            "kms_cost_usd_per_million_records": self.cost_per_million(),
        }


async def run_pool(
    count: int, concurrency: int, work: Callable[[int], Awaitable[None]], progress: Progress
) -> float:
    """Call ``work(i)`` for every i below ``count`` from ``concurrency`` tasks; the seconds taken.

    A fixed set of workers pulls record numbers from a shared counter: that keeps
    at most ``concurrency`` records in flight, like a semaphore over one task per
    record, without paying for thousands of tasks.
    """
    position = 0

    async def worker() -> None:
        nonlocal position
        while position < count:
            index = position
            position += 1
            await work(index)
            progress.advance()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, count)):
            group.create_task(worker())
    return time.perf_counter() - start


async def run_records(
    kms: KeyManagementService,
    alias: str,
    plaintexts: Sequence[bytes],
    ids: Sequence[bytes],
    *,
    cached: bool,
    concurrency: int,
    show_progress: bool,
) -> Run:
    """Encrypt every record, then decrypt every one with a fresh Crypto (and cache)."""
    label = "cached" if cached else "uncached"
    count = len(plaintexts)
    blobs = [b""] * count

    def make_cache() -> DEKCache | None:
        return DEKCache() if cached else None

    async with await open_crypto(kms, alias, make_cache()) as sealer:

        async def encrypt(i: int) -> None:
            blobs[i] = await sealer.encrypt(plaintexts[i], context=CONTEXT, aad=ids[i])

        with Progress(f"{label}: encrypt", count, enabled=show_progress) as progress:
            seconds = await run_pool(count, concurrency, encrypt, progress)
        encrypted = Phase(seconds, sealer.stats())

    # A new Crypto with an empty cache: the decrypt side must earn its hits, not
    # inherit the keys the encrypt side remembered.
    async with await open_crypto(kms, alias, make_cache()) as opener:

        async def decrypt(i: int) -> None:
            plaintext = await opener.decrypt(blobs[i], context=CONTEXT, aad=ids[i])
            if plaintext != plaintexts[i]:
                raise AssertionError(f"record {i} did not decrypt to what was encrypted")

        with Progress(f"{label}: decrypt", count, enabled=show_progress) as progress:
            seconds = await run_pool(count, concurrency, decrypt, progress)
        decrypted = Phase(seconds, opener.stats())
    return Run(label, count, encrypted, decrypted)


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def runs_table(runs: Sequence[Run]) -> str:
    def row(name: str, cell: Callable[[Run], str]) -> list[str]:
        return [name, *(cell(run) for run in runs)]

    def calls_cell(operation: str) -> Callable[[Run], str]:
        return lambda run: f"{run.calls(operation):,}"

    seen = {
        op for run in runs for phase in (run.encrypt, run.decrypt) for op in phase.stats.kms_calls
    }
    operations = [*DATA_KEY_OPS, *sorted(seen - set(DATA_KEY_OPS))]

    rows = [
        row("records", lambda r: f"{r.records:,}"),
        row("encrypt records/s", lambda r: fmt_rate(r.encrypt.rate(r.records))),
        row("decrypt records/s", lambda r: fmt_rate(r.decrypt.rate(r.records))),
        *(
            row(f"KMS calls: {op}{'' if op in DATA_KEY_OPS else ' (start-up)'}", calls_cell(op))
            for op in operations
        ),
        row("KMS calls per record", lambda r: f"{r.calls_per_record():.4f}"),
        row("cache hit ratio: encrypt", lambda r: _ratio_cell(r.encrypt.hit_ratio())),
        row("cache hit ratio: decrypt", lambda r: _ratio_cell(r.decrypt.hit_ratio())),
        row("KMS cost per 1M records", lambda r: f"${r.cost_per_million():,.4f}"),
    ]
    return table(["", *(run.label for run in runs)], rows)


# -- round trips -----------------------------------------------------------------


async def encx_round_trip_loop(crypto: Crypto, size: int) -> Callable[[int], Awaitable[None]]:
    data = os.urandom(size)
    # One message first, so the DEK is cached before anything is timed.
    await crypto.decrypt(await crypto.encrypt(data, context=CONTEXT), context=CONTEXT)

    async def round_trip(n: int) -> None:
        for _ in range(n):
            blob = await crypto.encrypt(data, context=CONTEXT)
            await crypto.decrypt(blob, context=CONTEXT)

    return round_trip


@dataclass(frozen=True, slots=True)
class EsdkResult:
    #: round trips per second, by algorithm suite label
    rates: Mapping[str, float]
    kms_calls: int
    error: str | None = None


ESDK_DEFAULT = "default suite (ECDSA-signed)"
ESDK_UNSIGNED = "unsigned committing suite"


@contextmanager
def _endpoint_env(endpoint_url: str | None) -> Iterator[None]:
    """Point botocore clients made inside at ``endpoint_url`` (AWS_ENDPOINT_URL_KMS)."""
    name = "AWS_ENDPOINT_URL_KMS"
    saved = os.environ.get(name)
    if endpoint_url is not None:
        os.environ[name] = endpoint_url
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def esdk_round_trips(target: AwsTarget, key_arn: str, size: int, count: int) -> EsdkResult:
    """Sequential round trips through the AWS Encryption SDK's caching CMM.

    The SDK is synchronous: this blocks the calling thread. Its KMS client is
    made by botocore from the same endpoint as the encx-async runs.
    """
    import aws_encryption_sdk
    import botocore.session
    from aws_encryption_sdk import Algorithm, CommitmentPolicy

    session = botocore.session.Session()
    if target.region is not None:
        session.set_config_variable("region", target.region)
    calls = 0

    def count_call(**_: object) -> None:
        nonlocal calls
        calls += 1

    session.register("before-call.kms", count_call)
    with _endpoint_env(target.endpoint_url):
        provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
            key_ids=[key_arn], botocore_session=session
        )
    endpoints = {client.meta.endpoint_url for client in provider._regional_clients.values()}
    if target.endpoint_url is not None and endpoints != {target.endpoint_url}:
        raise RuntimeError(f"the SDK's KMS client went to {endpoints}, not {target.endpoint_url}")
    cmm = aws_encryption_sdk.CachingCryptoMaterialsManager(
        master_key_provider=provider,
        cache=aws_encryption_sdk.LocalCryptoMaterialsCache(capacity=100),
        max_age=300.0,
        max_messages_encrypted=10_000,
    )
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    data = os.urandom(size)
    suites: dict[str, dict[str, Any]] = {
        ESDK_DEFAULT: {},
        ESDK_UNSIGNED: {"algorithm": Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY},
    }
    rates: dict[str, float] = {}
    for label, options in suites.items():

        def round_trip(options: dict[str, Any] = options) -> None:
            blob, _ = client.encrypt(
                source=data, materials_manager=cmm, encryption_context=dict(CONTEXT), **options
            )
            plaintext, _ = client.decrypt(source=blob, materials_manager=cmm)
            if plaintext != data:
                raise AssertionError("the SDK round trip changed the data")

        for _ in range(min(20, count)):  # fill the cache first
            round_trip()
        start = time.perf_counter()
        for _ in range(count):
            round_trip()
        rates[label] = count / (time.perf_counter() - start)
    return EsdkResult(rates, calls)


# -- the script ------------------------------------------------------------------


def _is_loopback(endpoint_url: str | None) -> bool:
    """True without an endpoint (moto starts here) or for one on this machine."""
    if endpoint_url is None:
        return True
    host = urllib.parse.urlsplit(endpoint_url).hostname or ""
    return host in {"localhost", "127.0.0.1", "::1"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cache",
        description="Measure what the DEK cache saves in KMS calls, time and cost.",
    )
    parser.add_argument("--records", type=int, default=20_000, help="records (default 20000)")
    parser.add_argument("--size", type=int, default=1024, help="bytes per record (default 1024)")
    parser.add_argument(
        "--uncached-records",
        type=int,
        default=None,
        help=f"records for the uncached run (default min(--records, {UNCACHED_CAP}))",
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="records in flight at once (default 64)"
    )
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="a KMS endpoint (moto, LocalStack); default: start moto in this process",
    )
    parser.add_argument(
        "--real-aws",
        action="store_true",
        help="use the real AWS KMS found by botocore (needs --kek-alias; KMS requests cost money)",
    )
    parser.add_argument("--region", default=None, help="AWS region (default from the environment)")
    parser.add_argument(
        "--kek-alias",
        default=None,
        help=f"the KEK to use (default {BENCH_ALIAS}, created if missing on a local endpoint)",
    )
    parser.add_argument(
        "--kms-latency-ms",
        type=float,
        default=0.0,
        help="extra latency added to every wrap and unwrap, as a real KMS has (default 0)",
    )
    parser.add_argument(
        "--round-trips",
        type=int,
        default=10_000,
        help="round trips per timed repeat for the sequential comparison (default 10000)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, best kept (5)")
    parser.add_argument(
        "--esdk-records", type=int, default=1000, help="AWS Encryption SDK round trips (1000)"
    )
    parser.add_argument("--skip-esdk", action="store_true", help="skip the AWS Encryption SDK")
    args = parse_options(
        parser,
        argv,
        counts=("records", "concurrency", "round_trips", "repeats", "esdk_records"),
        progress=True,
    )
    if args.size < 0:
        parser.error("--size must not be negative")
    if args.kms_latency_ms < 0:
        parser.error("--kms-latency-ms must not be negative")
    if args.uncached_records is None:
        args.uncached_records = min(args.records, UNCACHED_CAP)
    elif not 1 <= args.uncached_records <= args.records:
        parser.error("--uncached-records must be between 1 and --records")
    if args.real_aws and args.endpoint_url:
        parser.error("--real-aws and --endpoint-url exclude each other")
    if not args.kek_alias and (args.real_aws or not _is_loopback(args.endpoint_url)):
        parser.error(
            "--kek-alias is needed with --real-aws or a non-local --endpoint-url: "
            "this benchmark creates keys only on a local endpoint (moto, LocalStack)"
        )
    return args


async def run(args: argparse.Namespace, out: Output) -> dict[str, Any]:
    started = time.perf_counter()
    plaintexts = [os.urandom(args.size) for _ in range(args.records)]
    ids = [b"record-%d" % i for i in range(args.records)]
    alias = args.kek_alias or BENCH_ALIAS
    async with aws_kms(
        endpoint_url=args.endpoint_url,
        region=args.region,
        real_aws=args.real_aws,
        max_pool_connections=args.concurrency,
    ) as target:
        key_arn = await (
            target.kms.get_key_id(alias) if args.kek_alias else ensure_key(target.kms, alias)
        )
        where = "moto, in this process" if target.local_moto else "given endpoint"
        if target.endpoint_url is None:
            where = "real AWS KMS"
        out.say("encx-async DEK cache benchmark")
        out.say(
            f"KMS: {where} ({target.endpoint_url or 'botocore default'}), "
            f"region {target.region}, KEK {alias}"
        )
        out.say(
            f"records: {args.records:,} x {args.size:,} bytes, context {dict(CONTEXT)}, "
            f"aad = record id, concurrency {args.concurrency}, "
            f"simulated KMS latency {args.kms_latency_ms:g} ms"
        )
        if args.uncached_records < args.records:
            out.say(
                f"the uncached run covers the first {args.uncached_records:,} records only "
                "(--uncached-records); its cost per 1M records is per record all the same"
            )
        kms: KeyManagementService = target.kms
        if args.kms_latency_ms:
            kms = DelayedKMS(target.kms, args.kms_latency_ms / 1000)

        runs = [
            await run_records(
                kms,
                alias,
                plaintexts[: args.uncached_records],
                ids,
                cached=False,
                concurrency=args.concurrency,
                show_progress=args.progress,
            ),
            await run_records(
                kms,
                alias,
                plaintexts,
                ids,
                cached=True,
                concurrency=args.concurrency,
                show_progress=args.progress,
            ),
        ]
        uncached, cached = runs
        out.section("Uncached vs DEKCache() defaults (decrypt uses a fresh Crypto and cache)")
        out.say(runs_table(runs))

        # The main figure is about the cached path, so its timed loop uses a DEK
        # that lasts the whole run; the defaults row shows what one KMS wrap
        # per 10,000 messages adds on top (an in-process moto wrap is CPU spent
        # in this very process, a real KMS wrap is a wait).
        async with (
            await open_crypto(kms, alias, DEKCache(max_messages_per_dek=2**32)) as crypto,
            await open_crypto(kms, alias, DEKCache()) as defaults,
        ):
            header = parse(await crypto.encrypt(b"", context=CONTEXT)).header
            loops = {
                "raw": raw_aesgcm_loops(args.size)["round trip"],
                "lean": lean_envelope_loop(header, CONTEXT, args.size),
                "encx": await encx_round_trip_loop(crypto, args.size),
                "defaults": await encx_round_trip_loop(defaults, args.size),
            }
            rates = await best_rates(loops, n=args.round_trips, repeats=args.repeats)

        esdk: EsdkResult | None = None
        if not args.skip_esdk:
            try:
                esdk = esdk_round_trips(target, key_arn, args.size, args.esdk_records)
            except Exception as exc:
                esdk = EsdkResult({}, 0, f"{type(exc).__name__}: {exc}")

    paths = [
        ("raw AESGCM (cryptography), key built once", rates["raw"]),
        ("leanest async envelope (header, context as AAD)", rates["lean"]),
        ("encx-async, one cached DEK", rates["encx"]),
        ("encx-async, DEKCache() defaults", rates["defaults"]),
    ]
    if esdk is not None:
        paths += [(f"AWS Encryption SDK caching CMM, {k}", v) for k, v in esdk.rates.items()]
    out.section(f"Round trip (encrypt + decrypt), {args.size:,} bytes, sequential, one task")
    rows = [
        [name, fmt_rate(rate), f"{rate / rates['raw']:.3f}x", f"{rate / rates['lean']:.3f}x"]
        for name, rate in paths
    ]
    out.say(table(["path", "round trips/s", "vs raw AESGCM", "vs lean envelope"], rows))
    out.say(
        "(the lean envelope is the ceiling for any Python envelope: one coroutine per call, a\n"
        " random nonce, a header and the context as associated data, and nothing else)"
    )
    if esdk is not None and esdk.error:
        out.say(f"AWS Encryption SDK comparison skipped: {esdk.error}")
    elif esdk is not None:
        out.say(
            f"(the SDK ran {args.esdk_records:,} round trips per suite and made "
            f"{esdk.kms_calls} KMS calls; it gets no simulated latency)"
        )

    figures = [
        Figure(
            "KMS calls per record, uncached / cached",
            uncached.calls_per_record() / max(cached.calls_per_record(), 1e-12),
        ),
        Figure("cached round trip / raw AESGCM", rates["encx"] / rates["raw"]),
        Figure("cached round trip / leanest async envelope", rates["encx"] / rates["lean"]),
    ]
    if esdk is not None and ESDK_DEFAULT in esdk.rates:
        figures.append(
            Figure(
                "cached round trip / ESDK caching round trip",
                rates["encx"] / esdk.rates[ESDK_DEFAULT],
            )
        )
    if esdk is not None and ESDK_UNSIGNED in esdk.rates:
        figures.append(
            Figure(
                "cached round trip / ESDK caching, unsigned suite",
                rates["encx"] / esdk.rates[ESDK_UNSIGNED],
            )
        )
    out.section("Ratios")
    out.figures(figures)
    elapsed = time.perf_counter() - started
    out.say(f"\n(took {elapsed:.1f} s)")
    return {
        "benchmark": "cache",
        "records": args.records,
        "uncached_records": args.uncached_records,
        "size": args.size,
        "concurrency": args.concurrency,
        "kms_latency_ms": args.kms_latency_ms,
        "endpoint_url": target.endpoint_url,
        "runs": {run.label: run.as_json() for run in runs},
        "round_trip_per_s": {
            "raw_aesgcm": rates["raw"],
            "lean_envelope": rates["lean"],
            "encx_cached": rates["encx"],
            "encx_cache_defaults": rates["defaults"],
            "esdk_caching": None if esdk is None else dict(esdk.rates),
        },
        "esdk_error": None if esdk is None else esdk.error,
        "figures": [figure.as_json() for figure in figures],
        "seconds": elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(run, parse_args(argv), prog="python -m benchmarks.cache")


if __name__ == "__main__":
    sys.exit(main())
