"""The cost of encx-async's keyed hashes, and event-loop lag under Argon2id.

Run ``python -m benchmarks.hashing`` (``--help`` for the options). It times, in
one process and interleaved:

* ``BasicHasher.hash`` in one domain (find the domain's keyed HMAC, encode the
  value, HMAC-SHA256, format the digest) against raw HMAC-SHA256 of the same
  encoded bytes under the same key, three ways: the stdlib
  one-shot ``hmac.digest`` (the target's baseline), ``hmac.new().digest()``, and
  ``cryptography``'s HMAC keyed once and copied per call (the technique
  BasicHasher uses, so the difference is the lookup, encoding and formatting);

then runs many ``SecureHasher.hash`` calls at once, at the default Argon2id
parameters, with a ticker task that sleeps 1 ms at a time and records how late
it wakes up: the worst lateness is the longest the event loop was kept from
running. It does so with SecureHasher's default limiter (one call per CPU)
and, for comparison, through 40 threads, anyio's default.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from anyio import CapacityLimiter
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from encx_async._hashing import (
    BasicHasher,
    SecureHasher,
    argon2_limiter,
    derive_key,
    domain_purpose,
)
from encx_async._values import encode_value

from ._common import (
    TICK,
    Figure,
    Loop,
    Output,
    best_rates,
    fmt_rate,
    max_lag,
    parse_options,
    run_script,
    table,
)

PEPPER = bytes(range(1, 33))  # a benchmark pepper: fixed, so runs are comparable
VALUE = "jane.doe@example.com"
DOMAIN = "users.email"
BASIC = "hash_basic"
RAW_DIGEST = "raw hmac.digest"
RAW_NEW = "raw hmac.new"
RAW_COPY = "raw pre-keyed HMAC copy"


def basic_loops() -> dict[str, Loop]:
    """BasicHasher.hash and three raw HMAC-SHA256 calls over its encoded bytes."""
    hasher = BasicHasher(PEPPER, 1)
    key = derive_key(PEPPER, domain_purpose(DOMAIN))
    message = encode_value(VALUE)
    keyed = crypto_hmac.HMAC(key, hashes.SHA256())

    async def basic(n: int) -> None:
        for _ in range(n):
            hasher.hash(VALUE, domain=DOMAIN)

    async def raw_digest(n: int) -> None:
        for _ in range(n):
            hmac.digest(key, message, "sha256")

    async def raw_new(n: int) -> None:
        for _ in range(n):
            hmac.new(key, message, "sha256").digest()

    async def raw_copy(n: int) -> None:
        for _ in range(n):
            mac = keyed.copy()
            mac.update(message)
            mac.finalize()

    return {BASIC: basic, RAW_DIGEST: raw_digest, RAW_NEW: raw_new, RAW_COPY: raw_copy}


async def idle_lag(seconds: float = 0.5) -> float:
    """The 1 ms ticker's worst lateness (ms) with nothing else running: the machine's noise."""
    worst = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        await asyncio.sleep(TICK)
        worst = max(worst, time.perf_counter() - start - TICK)
    return worst * 1000


async def secure_run(hasher: SecureHasher, calls: int) -> tuple[float, float]:
    """The worst lateness (ms) of a 1 ms ticker while ``calls`` hashes run at once, and their ms."""
    lag, elapsed, digests = await max_lag(
        lambda: asyncio.gather(*(hasher.hash(f"{VALUE}{i}") for i in range(calls)))
    )
    if len(set(digests)) != calls:
        raise AssertionError("two Argon2id hashes came out equal")
    return lag, elapsed


async def secure_figures(
    calls: int, repeats: int, limiter: CapacityLimiter | None = None
) -> dict[str, float]:
    """Median lag and throughput over ``repeats`` runs of ``calls`` concurrent hashes."""
    hasher = SecureHasher(PEPPER, 1, limiter=limiter)
    phc = await hasher.hash(VALUE)  # warm the worker threads
    if not await hasher.verify(VALUE, phc):
        raise AssertionError("an Argon2id hash did not verify")
    runs = [await secure_run(hasher, calls) for _ in range(repeats)]
    return {
        "calls": calls,
        "max_lag_ms": statistics.median(lag for lag, _ in runs),
        "worst_run_ms": max(lag for lag, _ in runs),
        "duration_ms": statistics.median(ms for _, ms in runs),
        "hashes_per_s": statistics.median(calls / (ms / 1000) for _, ms in runs),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hashing",
        description="Time the blind index against raw HMAC and measure lag under Argon2id.",
    )
    parser.add_argument(
        "--iterations", type=int, default=100_000, help="calls per timed repeat (default 100000)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats, best kept (7)")
    parser.add_argument(
        "--secure-calls",
        type=int,
        default=50,
        help="concurrent hash_secure calls per lag run (default 50)",
    )
    parser.add_argument(
        "--secure-repeats", type=int, default=3, help="lag runs, median kept (default 3)"
    )
    return parse_options(
        parser, argv, counts=("iterations", "repeats", "secure_calls", "secure_repeats")
    )


async def run(args: argparse.Namespace, out: Output) -> dict[str, Any]:
    started = time.perf_counter()
    rates = await best_rates(basic_loops(), n=args.iterations, repeats=args.repeats)
    idle = statistics.median([await idle_lag() for _ in range(args.secure_repeats)])
    secure = await secure_figures(args.secure_calls, args.secure_repeats)
    threads = int(argon2_limiter().total_tokens)
    # For comparison: the same calls through anyio's default limiter of 40 threads.
    crowded = await secure_figures(args.secure_calls, args.secure_repeats, CapacityLimiter(40))

    out.say("encx-async hashing benchmark")
    out.say(
        f"a {len(VALUE)}-character str ({len(encode_value(VALUE))} bytes encoded), one task; "
        f"best of {args.repeats} x {args.iterations:,} calls"
    )
    out.section("Blind index against raw HMAC-SHA256 of the same encoded bytes")
    rows = [
        [label, fmt_rate(rates[name]), f"{rates[name] / rates[RAW_DIGEST]:.3f}x"]
        for label, name in (
            ("raw hmac.digest(key, msg, 'sha256')", RAW_DIGEST),
            ("raw hmac.new(key, msg, 'sha256').digest()", RAW_NEW),
            ("raw cryptography HMAC, keyed once, copied", RAW_COPY),
            ("BasicHasher.hash (domain key + encode + HMAC + format)", BASIC),
        )
    ]
    out.say(table(["operation", "ops/s", "vs hmac.digest"], rows))

    out.section(f"Argon2id (default parameters), {args.secure_calls} concurrent hash_secure")
    out.say(
        table(
            ["limiter", "max lag ms", "worst run ms", "calls ms", "hashes/s"],
            [
                [
                    label,
                    f"{figures['max_lag_ms']:.2f}",
                    f"{figures['worst_run_ms']:.2f}",
                    f"{figures['duration_ms']:.1f}",
                    fmt_rate(figures["hashes_per_s"]),
                ]
                for label, figures in (
                    (f"SecureHasher default ({threads} at once)", secure),
                    ("anyio default limiter (40 at once)", crowded),
                )
            ],
        )
    )
    out.say(f"idle loop (baseline): max lag {idle:.2f} ms")
    out.say(
        f"(median of {args.secure_repeats} runs of a 1 ms ticker's worst lateness; Argon2id "
        "runs in worker threads,\n one per CPU by default: more threads crowd the event "
        "loop's thread off the CPU)"
    )

    figures = [
        Figure(
            "hash_basic / raw hmac.digest, same bytes",
            rates[BASIC] / rates[RAW_DIGEST],
        ),
        Figure("hash_basic / raw keyed HMAC copy, same bytes", rates[BASIC] / rates[RAW_COPY]),
        Figure(
            f"event-loop lag, {args.secure_calls} concurrent hash_secure",
            secure["max_lag_ms"],
            unit=" ms",
        ),
        Figure(
            f"event-loop lag, {args.secure_calls} concurrent, 40 threads",
            crowded["max_lag_ms"],
            unit=" ms",
        ),
        Figure("hash_secure throughput", secure["hashes_per_s"], unit=" /s"),
    ]
    out.section("Ratios")
    out.figures(figures)
    elapsed = time.perf_counter() - started
    out.say(f"\n(took {elapsed:.1f} s)")
    return {
        "benchmark": "hashing",
        "iterations": args.iterations,
        "repeats": args.repeats,
        "ops_per_s": rates,
        "idle_lag_ms": idle,
        "secure": secure,
        "secure_40_threads": crowded,
        "argon2_threads": threads,
        "figures": [figure.as_json() for figure in figures],
        "seconds": elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(run, parse_args(argv), prog="python -m benchmarks.hashing")


if __name__ == "__main__":
    sys.exit(main())
