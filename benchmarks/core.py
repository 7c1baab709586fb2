"""The per-message cost of encx-async against bare AES-GCM, and event-loop lag.

Run ``python -m benchmarks.core`` (``--help`` for the options). It times, in one
process and interleaved:

* bare ``cryptography`` AES-256-GCM (the floor);
* the low-level ``encrypt_data`` / ``decrypt_data`` (awaited, one task, warm key);
* the high-level ``encrypt`` / ``decrypt`` with a warm DEK cache;

then measures how long the event loop stalls while a large payload is encrypted
and decrypted, with a ticker task that sleeps 1 ms at a time and records how
late it wakes up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from encx_async import DEFAULT_THREAD_THRESHOLD, Crypto, DEKCache, KeyManagementService

from ._common import (
    BENCH_ALIAS,
    CONTEXT,
    Figure,
    Loop,
    Output,
    aws_kms,
    best_rates,
    ensure_key,
    fmt_rate,
    max_lag,
    open_crypto,
    parse_options,
    raw_aesgcm_loops,
    run_script,
    table,
)

IDLE = "idle loop (baseline)"
HIGH_ENCRYPT = "encrypt (high level)"
HIGH_DECRYPT = "decrypt (high level)"
LOW_ENCRYPT = "encrypt_data (low level)"
LOW_DECRYPT = "decrypt_data (low level)"


@contextlib.asynccontextmanager
async def open_kms(kind: str) -> AsyncIterator[KeyManagementService]:
    if kind == "local":
        from encx_async.providers.local import LocalKMSService

        async with LocalKMSService() as local:
            yield local
    else:
        async with aws_kms(endpoint_url=None, region=None) as target:
            yield target.kms


def encx_loops(crypto: Crypto, size: int) -> dict[str, Loop]:
    """The low- and high-level API over ``size`` bytes, each call awaited in turn."""
    data = os.urandom(size)
    dek = crypto.generate_dek()
    blobs: dict[str, bytes] = {}

    async def prepare() -> None:
        blobs["low"] = await crypto.encrypt_data(data, dek)
        blobs["high"] = await crypto.encrypt(data, context=CONTEXT)

    async def low_encrypt(n: int) -> None:
        for _ in range(n):
            await crypto.encrypt_data(data, dek)

    async def low_decrypt(n: int) -> None:
        if not blobs:
            await prepare()
        blob = blobs["low"]
        for _ in range(n):
            await crypto.decrypt_data(blob, dek)

    async def high_encrypt(n: int) -> None:
        for _ in range(n):
            await crypto.encrypt(data, context=CONTEXT)

    async def high_decrypt(n: int) -> None:
        if not blobs:
            await prepare()
        blob = blobs["high"]
        for _ in range(n):
            await crypto.decrypt(blob, context=CONTEXT)

    return {
        "encrypt_data": low_encrypt,
        "decrypt_data": low_decrypt,
        "encrypt": high_encrypt,
        "decrypt": high_decrypt,
    }


async def lag_figures(crypto: Crypto, mib: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median over ``repeats`` of the worst lag during each large-payload operation."""
    payload = os.urandom(mib * 1024 * 1024)
    dek = crypto.generate_dek()
    # Warm the worker threads and the key schedules so start-up is not measured.
    small = payload[: 1024 * 1024]
    await crypto.decrypt(await crypto.encrypt(small, context=CONTEXT), context=CONTEXT)
    await crypto.decrypt_data(await crypto.encrypt_data(small, dek), dek)
    results: dict[str, bytes] = {}

    async def high_encrypt() -> bytes:
        return await crypto.encrypt(payload, context=CONTEXT)

    async def high_decrypt() -> bytes:
        return await crypto.decrypt(results[HIGH_ENCRYPT], context=CONTEXT)

    async def low_encrypt() -> bytes:
        return await crypto.encrypt_data(payload, dek)

    async def low_decrypt() -> bytes:
        return await crypto.decrypt_data(results[LOW_ENCRYPT], dek)

    async def idle() -> bytes:
        await asyncio.sleep(0.05)
        return b""

    cases = {
        IDLE: idle,
        HIGH_ENCRYPT: high_encrypt,
        HIGH_DECRYPT: high_decrypt,
        LOW_ENCRYPT: low_encrypt,
        LOW_DECRYPT: low_decrypt,
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, work in cases.items():
            results.pop(name, None)  # free the previous output here, outside the timed window
            lag, duration, results[name] = await max_lag(work)
            samples[name].append((lag, duration))
    if results[HIGH_DECRYPT] != payload or results[LOW_DECRYPT] != payload:
        raise AssertionError("a large payload did not decrypt to what was encrypted")
    return {
        name: {
            "max_lag_ms": statistics.median(lag for lag, _ in runs),
            "worst_run_ms": max(lag for lag, _ in runs),
            "duration_ms": statistics.median(ms for _, ms in runs),
        }
        for name, runs in samples.items()
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.core",
        description="Time encx-async against bare AES-GCM and measure event-loop lag.",
    )
    parser.add_argument("--size", type=int, default=1024, help="message bytes (default 1024)")
    parser.add_argument(
        "--iterations", type=int, default=20_000, help="calls per timed repeat (default 20000)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats, best kept (7)")
    parser.add_argument(
        "--lag-payload-mib",
        type=int,
        default=64,
        help="payload for the event-loop lag test, MiB (default 64)",
    )
    parser.add_argument(
        "--lag-repeats", type=int, default=3, help="lag runs per case, median kept (3)"
    )
    parser.add_argument(
        "--kms",
        choices=("local", "moto"),
        default="local",
        help="KMS for the high-level API: LocalKMSService or in-process moto (default local)",
    )
    args = parse_options(
        parser, argv, counts=("iterations", "repeats", "lag_payload_mib", "lag_repeats")
    )
    if args.size < 0:
        parser.error("--size must not be negative")
    return args


async def run(args: argparse.Namespace, out: Output) -> dict[str, Any]:
    started = time.perf_counter()
    async with open_kms(args.kms) as kms:
        await ensure_key(kms, BENCH_ALIAS)
        async with await open_crypto(kms, BENCH_ALIAS, DEKCache()) as crypto:
            if args.size >= DEFAULT_THREAD_THRESHOLD:
                out.say(
                    f"note: {args.size:,} bytes is at or above the thread threshold "
                    f"({DEFAULT_THREAD_THRESHOLD:,}), so every call hops to a worker thread"
                )
            raw = raw_aesgcm_loops(args.size)
            loops = {
                "raw encrypt": raw["encrypt"],
                "raw decrypt": raw["decrypt"],
                "framed encrypt": raw["framed encrypt"],
                "framed decrypt": raw["framed decrypt"],
                **encx_loops(crypto, args.size),
            }
            rates = await best_rates(loops, n=args.iterations, repeats=args.repeats)
            lag = await lag_figures(crypto, args.lag_payload_mib, args.lag_repeats)

    out.say("encx-async core benchmark")
    out.say(
        f"{args.size:,}-byte messages, one task, each call awaited; best of {args.repeats} "
        f"x {args.iterations:,} calls; KMS {args.kms}; high level with context "
        f"{dict(CONTEXT)} and a warm DEKCache"
    )
    out.section("Throughput against bare AES-GCM")
    rows = [
        [label, fmt_rate(rates[name]), f"{rates[name] / rates[base]:.3f}x"]
        for label, name, base in (
            ("raw AESGCM encrypt (bare call + urandom nonce)", "raw encrypt", "raw encrypt"),
            ("raw AESGCM encrypt, nonce || ciphertext", "framed encrypt", "raw encrypt"),
            ("encrypt_data (low level)", "encrypt_data", "raw encrypt"),
            ("encrypt (high level, cached)", "encrypt", "raw encrypt"),
            ("raw AESGCM decrypt (bare call)", "raw decrypt", "raw decrypt"),
            ("raw AESGCM decrypt, nonce split off", "framed decrypt", "raw decrypt"),
            ("decrypt_data (low level)", "decrypt_data", "raw decrypt"),
            ("decrypt (high level, cached)", "decrypt", "raw decrypt"),
        )
    ]
    out.say(table(["operation", "ops/s", "vs bare AESGCM"], rows))

    out.section(f"Event-loop lag, {args.lag_payload_mib} MiB payload")
    lag_rows = [
        [
            name,
            f"{figures['max_lag_ms']:.2f}",
            f"{figures['worst_run_ms']:.2f}",
            f"{figures['duration_ms']:.1f}",
        ]
        for name, figures in lag.items()
    ]
    out.say(table(["operation", "max lag ms", "worst run ms", "call ms"], lag_rows))
    out.say(
        f"(median of {args.lag_repeats} runs of a 1 ms ticker's worst lateness; outputs are freed "
        "outside the timed window;\n encrypt_data/decrypt_data are one AES-GCM call in a worker "
        "thread, which holds the GIL\n throughout: their lag is expected and has no target)"
    )

    def ratio(ours: str, base: str) -> float:
        return rates[ours] / rates[base]

    high_lag = max(lag[HIGH_ENCRYPT]["max_lag_ms"], lag[HIGH_DECRYPT]["max_lag_ms"])
    low_lag = max(lag[LOW_ENCRYPT]["max_lag_ms"], lag[LOW_DECRYPT]["max_lag_ms"])
    # The low-level API's output is nonce || ciphertext || tag, so its baseline is
    # raw AES-GCM producing (or reading) those same bytes; the bare calls, which
    # keep the nonce apart, are shown for information.
    figures = [
        Figure(
            "encrypt_data / raw AESGCM, nonce || ct",
            ratio("encrypt_data", "framed encrypt"),
        ),
        Figure(
            "decrypt_data / raw AESGCM, nonce || ct",
            ratio("decrypt_data", "framed decrypt"),
        ),
        Figure("encrypt_data / bare AESGCM encrypt call", ratio("encrypt_data", "raw encrypt")),
        Figure("decrypt_data / bare AESGCM decrypt call", ratio("decrypt_data", "raw decrypt")),
        Figure("encrypt (cached) / raw AESGCM encrypt", ratio("encrypt", "raw encrypt")),
        Figure("decrypt (cached) / raw AESGCM decrypt", ratio("decrypt", "raw decrypt")),
        Figure(
            f"event-loop lag, high level, {args.lag_payload_mib} MiB",
            high_lag,
            unit=" ms",
        ),
        Figure(
            f"event-loop lag, encrypt_data/decrypt_data, {args.lag_payload_mib} MiB",
            low_lag,
            unit=" ms",
        ),
    ]
    out.section("Ratios")
    out.figures(figures)
    elapsed = time.perf_counter() - started
    out.say(f"\n(took {elapsed:.1f} s)")
    return {
        "benchmark": "core",
        "size": args.size,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "kms": args.kms,
        "ops_per_s": rates,
        "lag_payload_mib": args.lag_payload_mib,
        "lag": lag,
        "figures": [figure.as_json() for figure in figures],
        "seconds": elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(run, parse_args(argv), prog="python -m benchmarks.core")


if __name__ == "__main__":
    sys.exit(main())
