"""Streaming encryption: bounded memory over a large stream, throughput against raw Cobblestone.

Run ``python -m benchmarks.stream`` (``--help`` for the options). In one
process, on the in-process moto KMS:

* **Memory.** A 1 GiB stream goes through ``encrypt_stream`` and straight into
  ``decrypt_stream`` (the plaintext is made 1 MiB at a time and dropped once
  checked), so nothing but the pipeline's own buffers can grow. The peak
  resident set size is reset just before (Linux's ``/proc/self/clear_refs``)
  and read after; the growth over the resident size before the run is what the
  target bounds. The event loop's worst lag during the run is printed too.
* **Throughput.** ``encrypt_stream`` and ``decrypt_stream`` over the same
  1 MiB chunks, against ``cryptography``'s Cobblestone-256 encryptor and
  decryptor called directly over those chunks, taking turns (best of several
  repeats, so a burst of load elsewhere slows both alike). Each encrypted
  stream pays its KMS call for a fresh DEK inside the timed run; decryption
  goes through a Crypto with a DEK cache, the way a service runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.cobblestone import Cobblestone256Decryptor, Cobblestone256Encryptor

from encx_async import Crypto, DEKCache

from ._common import (
    BENCH_ALIAS,
    CONTEXT,
    Figure,
    Output,
    Progress,
    aws_kms,
    best_rates,
    ensure_key,
    max_lag,
    open_crypto,
    parse_options,
    run_script,
    table,
)

MIB = 1024 * 1024
_STATUS = Path("/proc/self/status")


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` figure in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) if match else None


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux 4.0+); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def _plaintext(total: int, chunk: bytes, progress: Progress) -> AsyncIterator[bytes]:
    for _ in range(total // len(chunk)):
        progress.advance(len(chunk) // MIB)
        yield chunk


async def memory_run(crypto: Crypto, mib: int, *, show_progress: bool) -> dict[str, Any]:
    """Pipe ``mib`` MiB through encrypt_stream into decrypt_stream; peak RSS growth."""
    chunk = os.urandom(MIB)
    before = status_kib("VmRSS")
    measurable = before is not None and reset_peak_rss()

    async def pipe() -> int:
        # The plaintext repeats one chunk, so each piece that comes back can be
        # checked in place, against the chunk twice over, without keeping it.
        doubled = chunk + chunk
        seen = 0
        with Progress("1 GiB pipe (MiB)", mib, enabled=show_progress) as progress:
            sealed = crypto.encrypt_stream(_plaintext(mib * MIB, chunk, progress), context=CONTEXT)
            async for out in crypto.decrypt_stream(sealed, context=CONTEXT):
                for at in range(0, len(out), MIB):
                    piece = out[at : at + MIB] if len(out) > MIB else out
                    start = seen % MIB
                    if piece != doubled[start : start + len(piece)]:
                        raise AssertionError("the stream came back different")
                    seen += len(piece)
        return seen

    lag_ms, elapsed_ms, seen = await max_lag(pipe)
    if seen != mib * MIB:
        raise AssertionError(f"the stream came back short: {seen} of {mib * MIB} bytes")
    peak = status_kib("VmHWM")
    growth = (peak - before) / 1024 if measurable and peak is not None and before else None
    return {
        "mib": mib,
        "rss_before_mib": (before or 0) / 1024,
        "rss_peak_mib": (peak or 0) / 1024,
        "rss_growth_mib": growth,
        "max_lag_ms": lag_ms,
        "mib_per_s": mib / (elapsed_ms / 1000),
    }


async def throughput(
    crypto: Crypto, cached: Crypto, mib: int, stored_mib: int, repeats: int
) -> dict[str, float]:
    """MiB/s of encx-async's streams and of raw Cobblestone-256, over the same 1 MiB chunks.

    Encrypting reads ``mib`` MiB made from eight distinct chunks (so nothing
    large is held) and drops the output. Decrypting reads ``stored_mib`` MiB of
    ciphertext kept in memory, through ``cached`` (a Crypto with a DEK cache, as
    a service runs one), so the stream's DEK is unwrapped once, not per run.
    """
    pool = [os.urandom(MIB) for _ in range(8)]
    key = Cobblestone256Encryptor.generate_key()
    aad = b"benchmark"

    def plaintext(size: int) -> Iterator[bytes]:
        return (pool[i % len(pool)] for i in range(size))

    encryptor = Cobblestone256Encryptor(key, aad)
    raw_sealed = [encryptor.update(c) for c in plaintext(stored_mib)] + [encryptor.finalize()]
    whole = b"".join([out async for out in cached.encrypt_stream(plaintext(stored_mib))])
    # decrypt_stream gets the same 1 MiB pieces the raw decryptor gets.
    sealed = [whole[i : i + MIB] for i in range(0, len(whole), MIB)]
    del whole

    async def raw_encrypt(n: int) -> None:
        for _ in range(n):
            cipher = Cobblestone256Encryptor(key, aad)
            for chunk in plaintext(mib):
                cipher.update(chunk)
            cipher.finalize()

    async def raw_decrypt(n: int) -> None:
        for _ in range(n):
            cipher = Cobblestone256Decryptor(key, aad)
            for chunk in raw_sealed:
                cipher.update(chunk)
            cipher.finalize()

    async def encx_encrypt(n: int) -> None:
        for _ in range(n):
            async for _out in crypto.encrypt_stream(plaintext(mib)):
                pass

    async def encx_decrypt(n: int) -> None:
        for _ in range(n):
            async for _out in cached.decrypt_stream(sealed):
                pass

    encrypts = await best_rates(
        {"raw encrypt": raw_encrypt, "encrypt_stream": encx_encrypt}, n=1, repeats=repeats
    )
    decrypts = await best_rates(
        {"raw decrypt": raw_decrypt, "decrypt_stream": encx_decrypt}, n=1, repeats=repeats
    )
    return {name: rate * mib for name, rate in encrypts.items()} | {
        name: rate * stored_mib for name, rate in decrypts.items()
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stream",
        description="Peak memory over a large stream, and streaming throughput vs raw Cobblestone.",
    )
    parser.add_argument(
        "--stream-mib", type=int, default=1024, help="size of the memory run (default 1024 MiB)"
    )
    parser.add_argument(
        "--throughput-mib",
        type=int,
        default=1024,
        help="size of each timed encrypt_stream run (default 1024 MiB, nothing kept)",
    )
    parser.add_argument(
        "--stored-mib",
        type=int,
        default=256,
        help="ciphertext kept in memory for the timed decrypt runs (default 256 MiB)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats, best kept (7)")
    parser.add_argument("--endpoint-url", help="a KMS endpoint instead of the in-process moto")
    parser.add_argument("--region", help="the KMS region (with --endpoint-url or --real-aws)")
    parser.add_argument(
        "--real-aws", action="store_true", help="use the real AWS KMS and credentials"
    )
    return parse_options(
        parser,
        argv,
        counts=("stream_mib", "throughput_mib", "stored_mib", "repeats"),
        progress=True,
    )


async def run(args: argparse.Namespace, out: Output) -> dict[str, Any]:
    started = time.perf_counter()
    async with aws_kms(
        endpoint_url=args.endpoint_url, region=args.region, real_aws=args.real_aws
    ) as target:
        await ensure_key(target.kms, BENCH_ALIAS)
        async with (
            await open_crypto(target.kms, BENCH_ALIAS, None) as crypto,
            await open_crypto(target.kms, BENCH_ALIAS, DEKCache()) as cached,
        ):
            # Warm up first, so imports and the first KMS call are not in the window.
            async for _ in crypto.decrypt_stream(crypto.encrypt_stream([b"warm"])):
                pass
            memory = await memory_run(crypto, args.stream_mib, show_progress=args.progress)
            rates = await throughput(
                crypto, cached, args.throughput_mib, args.stored_mib, args.repeats
            )

    out.say("encx-async streaming benchmark")
    out.section(f"Memory: {args.stream_mib:,} MiB through encrypt_stream into decrypt_stream")
    growth = memory["rss_growth_mib"]
    out.say(
        table(
            ["RSS before MiB", "peak MiB", "growth MiB", "MiB/s (both ways)", "max lag ms"],
            [
                [
                    f"{memory['rss_before_mib']:.1f}",
                    f"{memory['rss_peak_mib']:.1f}",
                    "n/a" if growth is None else f"{growth:.1f}",
                    f"{memory['mib_per_s']:,.0f}",
                    f"{memory['max_lag_ms']:.2f}",
                ]
            ],
        )
    )
    out.section(f"Throughput in 1 MiB chunks, one stream per run (best of {args.repeats})")
    out.say(
        f"encrypt: {args.throughput_mib:,} MiB, a fresh DEK (one KMS call) per stream; "
        f"decrypt: {args.stored_mib:,} MiB, DEK from the cache"
    )
    pairs = (("raw encrypt", "encrypt_stream"), ("raw decrypt", "decrypt_stream"))
    rows = []
    for raw, ours in pairs:
        rows.append([f"raw Cobblestone-256 {raw.split()[1]}", f"{rates[raw]:,.0f}", "1.000x"])
        rows.append(
            [f"encx-async {ours}", f"{rates[ours]:,.0f}", f"{rates[ours] / rates[raw]:.3f}x"]
        )
    out.say(table(["path", "MiB/s", "vs raw"], rows))

    out.say(
        "(the lag includes the two KMS calls of the stream: moto answers them in a thread of\n"
        " this process, holding the interpreter lock while it does)"
    )
    figures = []
    if growth is None:
        out.say("\n(peak RSS cannot be measured on this system: no memory figure)")
    else:
        figures.append(
            Figure(
                f"RSS growth, {args.stream_mib:,} MiB stream",
                growth,
                unit=" MiB",
            )
        )
    figures += [
        Figure(
            "encrypt_stream / raw Cobblestone",
            rates["encrypt_stream"] / rates["raw encrypt"],
        ),
        Figure(
            "decrypt_stream / raw Cobblestone",
            rates["decrypt_stream"] / rates["raw decrypt"],
        ),
        Figure("event-loop lag during the memory run", memory["max_lag_ms"], unit=" ms"),
    ]
    out.section("Ratios")
    out.figures(figures)
    elapsed = time.perf_counter() - started
    out.say(f"\n(took {elapsed:.1f} s)")
    return {
        "benchmark": "stream",
        "memory": memory,
        "mib_per_s": rates,
        "figures": [figure.as_json() for figure in figures],
        "seconds": elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(run, parse_args(argv), prog="python -m benchmarks.stream")


if __name__ == "__main__":
    sys.exit(main())
