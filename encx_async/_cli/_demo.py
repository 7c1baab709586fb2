"""``encx-async demo``: the library's main promise, shown on an in-process KMS.

It creates a key and an alias, encrypts and decrypts sample records without and
with the DEK cache, and counts the KMS calls each way; then shows that a
record bound to one id does not open under another, and rotates and rewraps.
Nothing here outlives the command: the KMS is in this process and the KEK
versions go to a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from encx_async._cache import DEKCache
from encx_async._crypto import Crypto, CryptoStats
from encx_async._exceptions import DecryptionError
from encx_async._ordered import ordered_map
from encx_async._progress import Progress
from encx_async.kms import KeyManagementService

from ._args import Settings
from ._errors import CLIError, ExitCode
from ._kms import start_moto, temporary_database
from ._output import Report

__all__ = ["DEMO_ALIAS", "demo"]

DEMO_ALIAS = "alias/encx-demo"
_CONTEXT: Mapping[str, str] = {"tenant": "demo"}
_CONCURRENCY = 16
#: AWS KMS list price for symmetric requests, in US dollars
_USD_PER_REQUEST = 0.03 / 10_000
_DATA_KEY_OPS = ("encrypt_dek", "decrypt_dek")
_PLANS = ("free", "team", "enterprise")


def _records(count: int) -> list[bytes]:
    return [
        json.dumps(
            {"id": i, "email": f"user{i}@example.com", "plan": _PLANS[i % len(_PLANS)]}
        ).encode()
        for i in range(count)
    ]


def _record_id(index: int) -> bytes:
    return b"user:%d" % index


def _data_key_calls(*stats: CryptoStats) -> dict[str, int]:
    return {op: sum(s.kms_calls.get(op, 0) for s in stats) for op in _DATA_KEY_OPS}


@contextlib.asynccontextmanager
async def _demo_kms(kind: str) -> AsyncIterator[tuple[KeyManagementService, dict[str, Any]]]:
    if kind == "local":
        from encx_async.providers.local import LocalKMSService

        async with LocalKMSService() as local:
            yield local, {"kms": "local", "region": local.region, "endpoint_url": None}
        return
    from encx_async.providers.aws import Config, KMSService

    async with start_moto() as endpoint, KMSService(Config(endpoint_url=endpoint)) as aws:
        yield aws, {"kms": "moto", "region": aws.region, "endpoint_url": endpoint}


async def _each(
    label: str,
    count: int,
    work: Callable[[int], Awaitable[bytes]],
    *,
    progress: bool,
) -> list[bytes]:
    """``work(i)`` for every record, a few at a time, results in order."""
    results: list[bytes] = []
    with Progress(label, count, enabled=progress) as bar:
        mapped = ordered_map(range(count), work, concurrency=_CONCURRENCY)
        async with aclosing(mapped) as done:
            async for result in done:
                results.append(result)
                bar.advance()
    return results


async def _round_trip(
    kms: KeyManagementService,
    database: str,
    records: Sequence[bytes],
    *,
    cached: bool,
    progress: bool,
) -> tuple[list[bytes], dict[str, int], float | None, float]:
    """Encrypt every record with one Crypto, decrypt them with another (as another process)."""
    label = "with the cache" if cached else "without a cache"
    started = time.perf_counter()
    async with Crypto(
        kms=kms, kek_alias=DEMO_ALIAS, database=database, dek_cache=DEKCache() if cached else None
    ) as sealer:

        async def seal(i: int) -> bytes:
            return await sealer.encrypt(records[i], context=_CONTEXT, aad=_record_id(i))

        blobs = await _each(f"encrypt, {label}", len(records), seal, progress=progress)
        sealed = sealer.stats()
    async with Crypto(
        kms=kms, kek_alias=DEMO_ALIAS, database=database, dek_cache=DEKCache() if cached else None
    ) as opener:

        async def open_(i: int) -> bytes:
            return await opener.decrypt(blobs[i], context=_CONTEXT, aad=_record_id(i))

        opened = await _each(f"decrypt, {label}", len(records), open_, progress=progress)
        if opened != list(records):  # pragma: no cover - the library's own tests cover this
            raise CLIError(
                "a record did not decrypt to what was encrypted",
                hint="this is a bug: please report it",
                code=ExitCode.INTERNAL,
            )
        stats = opener.stats()
    hit_ratio = None
    if stats.cache is not None and sealed.cache is not None:
        sides = (
            sealed.cache.encrypt,
            sealed.cache.decrypt,
            stats.cache.encrypt,
            stats.cache.decrypt,
        )
        hits = sum(side.hits + side.coalesced for side in sides)
        lookups = hits + sum(side.misses for side in sides)
        hit_ratio = hits / lookups if lookups else 0.0
    return blobs, _data_key_calls(sealed, stats), hit_ratio, time.perf_counter() - started


async def _refuses(crypto: Crypto, blob: bytes, aad: bytes) -> bool:
    try:
        await crypto.decrypt(blob, context=_CONTEXT, aad=aad)
    except DecryptionError:
        return True
    return False


async def demo(args: argparse.Namespace, settings: Settings) -> Report:
    kind = getattr(args, "kms", None) or "moto"
    if kind not in ("moto", "local"):
        raise CLIError(
            f"the demo runs on an in-process KMS, not --kms {kind}",
            hint="use --kms moto (the default) or --kms local",
        )
    count: int = args.records
    if not 1 <= count <= 100_000:
        raise CLIError(
            "--records must be between 1 and 100000", hint="run 'encx-async demo --help'"
        )
    records = _records(count)
    started = time.perf_counter()
    lines: list[str] = []
    async with temporary_database() as database, _demo_kms(kind) as (kms, where):
        place = (
            f"moto's KMS in this process at {where['endpoint_url']}, region {where['region']}"
            if kind == "moto"
            else "LocalKMSService in this process (memory only)"
        )
        lines.append(f"encx-async demo on {place}; KEK versions in a temporary SQLite file")
        async with Crypto(
            kms=kms, kek_alias=DEMO_ALIAS, database=database, create_key_if_missing=True
        ) as crypto:
            key_id = crypto.key_id
        lines.append(
            f"1. Created a KMS key with the alias {DEMO_ALIAS}: KEK version 1 is {key_id}."
        )
        sample = records[min(1, count - 1)].decode()
        lines.append(
            f"   {count} sample records like {sample} are encrypted under context "
            f"{dict(_CONTEXT)}, each bound (aad) to its record id."
        )

        _, uncached, _, uncached_s = await _round_trip(
            kms, database, records, cached=False, progress=settings.progress
        )
        blobs, cached, hit_ratio, cached_s = await _round_trip(
            kms, database, records, cached=True, progress=settings.progress
        )
        before, after = sum(uncached.values()), sum(cached.values())
        saved = before - after
        lines.append(
            f"2. Without a DEK cache: {count} encrypts and {count} decrypts made {before} KMS "
            f"calls ({uncached['encrypt_dek']} Encrypt, {uncached['decrypt_dek']} Decrypt) "
            f"in {uncached_s:.2f} s."
        )
        lines.append(
            f"3. With DEKCache(): the same work made {after} KMS calls "
            f"({cached['encrypt_dek']} Encrypt, {cached['decrypt_dek']} Decrypt; the decrypts "
            f"ran in a second Crypto, as another process would) in {cached_s:.2f} s, "
            f"cache hit ratio {(hit_ratio or 0.0):.1%}."
        )
        per_million = (before - after) / count * 1_000_000 * _USD_PER_REQUEST
        lines.append(
            f"   KMS calls saved: {saved} of {before} ({saved / before:.1%}), about "
            f"${per_million:,.2f} per million records at $0.03 per 10,000 requests."
        )

        async with Crypto(kms=kms, kek_alias=DEMO_ALIAS, database=database) as crypto:
            wrong_record = await _refuses(crypto, blobs[0], _record_id(count))
            flipped = bytearray(blobs[0])
            flipped[-1] ^= 0x01
            tampered = await _refuses(crypto, bytes(flipped), _record_id(0))
            lines.append(
                "4. Record 0 under another record's id: "
                f"{'refused (DecryptionError)' if wrong_record else 'ACCEPTED'}; "
                f"with one bit flipped: {'refused' if tampered else 'ACCEPTED'}."
            )
            rotated = await crypto.rotate_kek()
            rewrapped: list[bytes] = []
            moving = crypto.rewrap_many(blobs, context=_CONTEXT)
            async with aclosing(moving) as moved:
                async for blob in moved:
                    rewrapped.append(blob)
            ok = await crypto.decrypt(rewrapped[-1], context=_CONTEXT, aad=_record_id(count - 1))
            re_encrypts = crypto.stats().kms_calls.get("re_encrypt_dek", 0)
            lines.append(
                f"5. Rotated the KEK to version {rotated.version} ({rotated.key_id}) and rewrapped "
                f"the {count} cached-DEK records with {re_encrypts} ReEncrypt call(s): they "
                "shared one DEK, and still decrypt"
                + (" (checked)." if ok == records[-1] else " (MISMATCH).")
            )
    elapsed = time.perf_counter() - started
    lines.append(f"(took {elapsed:.1f} s; everything above is gone now)")
    data = {
        **where,
        "alias": DEMO_ALIAS,
        "key_id": key_id,
        "records": count,
        "context": dict(_CONTEXT),
        "uncached": {"kms_calls": uncached, "total_kms_calls": before, "seconds": uncached_s},
        "cached": {
            "kms_calls": cached,
            "total_kms_calls": after,
            "hit_ratio": hit_ratio,
            "seconds": cached_s,
        },
        "saved_kms_calls": saved,
        "saved_share": saved / before,
        "usd_saved_per_million_records": per_million,
        "wrong_record_refused": wrong_record,
        "tampering_refused": tampered,
        "rotation": {
            "kek_version": rotated.version,
            "rewrapped": len(rewrapped),
            "re_encrypt_calls": re_encrypts,
            "still_decrypts": ok == records[-1],
        },
        "seconds": elapsed,
    }
    return Report(data, "\n".join(lines))
