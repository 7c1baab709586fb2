"""One member of a two-process fleet, driven by ``tests/test_fleet.py``.

Run from the repository root as ``python -m tests.fleet_worker ...``. The
worker opens its own :class:`~encx_async.Crypto` on a shared key-version
database and a moto KMS, waits for an agreed start moment (so that two workers
race for version 1 for real), then alternates: encrypt ``--records`` records,
rotate the KEK, encrypt again, ... ``--rotations`` times. It writes what it
encrypted to ``--out`` (written under a temporary name, then renamed, so a
reader never sees half a file), waits for its peer's file, decrypts every blob
in it, and prints one JSON summary line on stdout.

Any failure makes the exit code non-zero; the summary line then has
``"ok": false`` and an ``"error"``, and the traceback goes to stderr. AWS
credentials (fake ones, for moto) come from the environment the parent gives.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encx_async import Crypto, DEKCache
from encx_async._envelope import parse
from encx_async.providers.aws import Config, KMSService

REGION = "us-east-1"
VERSION_CHECK_INTERVAL = 0.2
POLL = 0.05


class FleetError(Exception):
    """Something a worker checks went wrong."""


@dataclass
class Summary:
    worker: str
    ok: bool = False
    error: str | None = None
    #: how long the worker waited at the start barrier (negative: it was late)
    waited: float = 0.0
    started_at: float = 0.0
    #: the versions this worker's rotate_kek() calls created, in order
    created_versions: list[int] = field(default_factory=list)
    #: the KEK version of each blob this worker wrote, in order
    blob_versions: list[int] = field(default_factory=list)
    #: blobs encrypted right after a rotation under a version older than it returned
    stale_after_rotate: int = 0
    blobs_written: int = 0
    own_blobs_decrypted: int = 0
    peer_blobs: int = 0
    peer_blobs_decrypted: int = 0
    peer_versions: list[int] = field(default_factory=list)
    known_versions: list[int] = field(default_factory=list)
    kms_calls: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fleet_worker", description=__doc__)
    parser.add_argument("--endpoint", required=True, help="the moto server URL")
    parser.add_argument("--database", required=True, help="sqlite:///... or postgresql://...")
    parser.add_argument("--alias", required=True, help="the KEK alias, alias/...")
    parser.add_argument("--rotations", type=int, required=True, help="rotate_kek() calls")
    parser.add_argument(
        "--records",
        type=int,
        required=True,
        help="records encrypted before and after each rotation",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="where to write this worker's blobs"
    )
    parser.add_argument("--peer", type=Path, required=True, help="the file the peer writes")
    parser.add_argument(
        "--start-at", type=float, default=0.0, help="UNIX time to start at (both workers share it)"
    )
    parser.add_argument("--create-key-if-missing", action="store_true")
    parser.add_argument("--name", default=f"worker-{os.getpid()}")
    parser.add_argument(
        "--peer-timeout", type=float, default=60.0, help="seconds to wait for the peer's file"
    )
    args = parser.parse_args(argv)
    if args.rotations < 0 or args.records < 1:
        parser.error("--rotations must be >= 0 and --records >= 1")
    return args


# -- the blob files ----------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    blob: bytes
    plaintext: bytes
    context: dict[str, str]
    aad: bytes

    def to_json(self) -> str:
        return json.dumps(
            {
                "blob": _b64(self.blob),
                "plaintext": _b64(self.plaintext),
                "context": self.context,
                "aad": _b64(self.aad),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, line: str) -> Record:
        data = json.loads(line)
        return cls(
            blob=base64.b64decode(data["blob"], validate=True),
            plaintext=base64.b64decode(data["plaintext"], validate=True),
            context={str(k): str(v) for k, v in data["context"].items()},
            aad=base64.b64decode(data["aad"], validate=True),
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_records(path: Path, worker: str, records: list[Record]) -> None:
    """One JSON record per line, then an end line with the count; renamed into place."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(record.to_json() + "\n")
        out.write(json.dumps({"end": True, "worker": worker, "count": len(records)}) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def read_records(path: Path) -> list[Record] | None:
    """The peer's records, or None while its file is not there yet."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    if not lines:
        raise FleetError(f"the peer's file {path.name} is empty")
    end = json.loads(lines[-1])
    if not isinstance(end, dict) or end.get("end") is not True:
        raise FleetError(f"the peer's file {path.name} has no end line")
    records = [Record.from_json(line) for line in lines[:-1]]
    if end.get("count") != len(records):
        raise FleetError(
            f"the peer's file {path.name} says {end.get('count')} records but holds {len(records)}"
        )
    return records


async def wait_for_peer(path: Path, patience: float) -> list[Record]:
    try:
        async with asyncio.timeout(patience):
            while True:
                records = read_records(path)
                if records is not None:
                    return records
                await asyncio.sleep(POLL)
    except TimeoutError:
        raise FleetError(
            f"the peer's file {path.name} did not appear in {patience:.0f} s"
        ) from None


# -- the work ------------------------------------------------------------------------


async def encrypt_some(
    crypto: Crypto, name: str, first: int, count: int, summary: Summary
) -> list[Record]:
    records = []
    for index in range(first, first + count):
        plaintext = f"{name} record {index} ".encode() + os.urandom(24)
        context = {"tenant": f"tenant-{index % 2}", "writer": name}
        aad = f"{name}/{index}".encode()
        blob = await crypto.encrypt(plaintext, context=context, aad=aad)
        records.append(Record(blob, plaintext, context, aad))
        summary.blob_versions.append(parse(blob).kek_version)
    return records


def version_of(blob: bytes) -> int | None:
    """The KEK version a blob names, or None if it is not an envelope at all."""
    try:
        return parse(blob).kek_version
    except Exception:
        return None


async def decrypt_all(crypto: Crypto, records: list[Record], whose: str) -> tuple[int, list[str]]:
    """How many of ``records`` decrypt to their plaintext, and what went wrong with the rest."""
    good, problems = 0, []
    for index, record in enumerate(records):
        try:
            plaintext = await crypto.decrypt(record.blob, context=record.context, aad=record.aad)
        except Exception as exc:  # collected: every failure is reported, not just the first
            version = version_of(record.blob)
            problems.append(f"{whose} blob {index} (KEK version {version}): {exc!r}")
            continue
        if plaintext != record.plaintext:
            problems.append(f"{whose} blob {index} decrypted to the wrong plaintext")
        else:
            good += 1
    return good, problems


async def work(crypto: Crypto, args: argparse.Namespace, summary: Summary) -> None:
    records = await encrypt_some(crypto, args.name, 0, args.records, summary)
    for _ in range(args.rotations):
        created = await crypto.rotate_kek()
        summary.created_versions.append(created.version)
        batch = await encrypt_some(crypto, args.name, len(records), args.records, summary)
        if parse(batch[0].blob).kek_version < created.version:
            summary.stale_after_rotate += 1
        records.extend(batch)
    write_records(args.out, args.name, records)
    summary.blobs_written = len(records)

    summary.own_blobs_decrypted, problems = await decrypt_all(crypto, records, "own")
    peer = await wait_for_peer(args.peer, args.peer_timeout)
    summary.peer_blobs = len(peer)
    summary.peer_versions = sorted({v for r in peer if (v := version_of(r.blob))})
    summary.peer_blobs_decrypted, peer_problems = await decrypt_all(crypto, peer, "peer")
    problems += peer_problems
    if problems:
        shown = "; ".join(problems[:5])
        raise FleetError(f"{len(problems)} blob(s) did not decrypt: {shown}")


async def run(args: argparse.Namespace, summary: Summary) -> None:
    config = Config(region=REGION, endpoint_url=args.endpoint)
    # Opened before the barrier: the race that matters is the one in Crypto.create.
    kms = await KMSService.create(config)
    try:
        if args.start_at:
            summary.waited = args.start_at - time.time()
            if summary.waited > 0:
                await asyncio.sleep(summary.waited)
        summary.started_at = time.time()
        began = time.monotonic()
        crypto = await Crypto.create(
            kms=kms,
            kek_alias=args.alias,
            database=args.database,
            create_key_if_missing=args.create_key_if_missing,
            version_check_interval=VERSION_CHECK_INTERVAL,
            dek_cache=DEKCache(),
        )
        async with crypto:
            try:
                await work(crypto, args, summary)
            finally:
                summary.known_versions = [v.version for v in crypto.kek_versions()]
                summary.kms_calls = dict(crypto.stats().kms_calls)
                summary.seconds = round(time.monotonic() - began, 3)
    finally:
        await kms.aclose()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = Summary(worker=args.name)
    try:
        asyncio.run(run(args, summary))
    except Exception as exc:
        summary.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    else:
        summary.ok = True
    result: dict[str, Any] = dict(summary.__dict__)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
