"""What both benchmark scripts share: timing, output, targets and KMS set-up."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encx_async import Crypto, DEKCache, EncxError, KeyManagementService, KMSKeyNotFoundError
from encx_async._progress import Progress, progress_default
from encx_async._table import table as text_table

from ._delegating import DelegatingKMS
from ._moto import MotoServer, use_fake_credentials

__all__ = [
    "BENCH_ALIAS",
    "BENCH_DATABASE",
    "CONTEXT",
    "TICK",
    "AwsTarget",
    "DelayedKMS",
    "Figure",
    "Loop",
    "Output",
    "Progress",
    "aws_kms",
    "best_rates",
    "ensure_key",
    "figure_lines",
    "fmt_rate",
    "lean_envelope_loop",
    "max_lag",
    "open_crypto",
    "parse_options",
    "progress_default",
    "raw_aesgcm_loops",
    "run_script",
    "table",
]

#: The KEK alias the benchmarks create on moto or LocalKMSService when it is missing.
BENCH_ALIAS = "alias/encx-bench"
#: Where each benchmark Crypto keeps its KEK versions: a store of its own, in
#: memory, gone with it. A benchmark never touches the user's default store
#: (``$ENCX_DATABASE_URL`` or the file in the user's data directory).
BENCH_DATABASE = "sqlite:///:memory:"
#: The encryption context every benchmark encrypts under.
CONTEXT: Mapping[str, str] = {"tenant": "bench"}
#: The sleep of the lag probe's ticker, in seconds.
TICK = 0.001

_T = TypeVar("_T")

#: ``await loop(n)`` performs ``n`` operations back to back.
Loop = Callable[[int], Awaitable[object]]


# -- timing ----------------------------------------------------------------------


async def best_rates(loops: Mapping[str, Loop], *, n: int, repeats: int) -> dict[str, float]:
    """Operations per second of each loop, the best of ``repeats`` runs of ``n`` operations.

    The loops take turns within each repeat, so a burst of load from elsewhere on
    the machine slows all of them alike instead of skewing one ratio. The best run
    is the one least disturbed by such bursts, hence the one reported.
    """
    for loop in loops.values():  # warm caches, the allocator and lazily built ciphers
        await loop(max(1, n // 10))
    best = dict.fromkeys(loops, 0.0)
    for _ in range(repeats):
        for name, loop in loops.items():
            gc.collect()
            start = time.perf_counter()
            await loop(n)
            elapsed = time.perf_counter() - start
            best[name] = max(best[name], n / elapsed if elapsed > 0 else float("inf"))
    return best


def lean_envelope_loop(header: bytes, context: Mapping[str, str], size: int) -> Loop:
    """Round trips through the leanest async envelope one could write in Python.

    This is the ceiling for ``Crypto.encrypt``/``decrypt`` with a cached DEK:
    one coroutine per call, a fresh ``os.urandom`` nonce, ``header`` (pass a
    real encx-async header, so the bytes moved are the same) in front, and the
    header and encoded context as associated data, worked out once as if every
    call had the same context. Decryption checks the header and splits the
    nonce off. It has no cache, no limits, no key versions and no input checks,
    so whatever separates us from it is the price of those.
    """
    aesgcm = AESGCM(AESGCM.generate_key(bit_length=256))
    data = os.urandom(size)
    associated = header + "\x00".join(f"{k}={v}" for k, v in sorted(context.items())).encode()
    body_at = len(header)

    async def seal(plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return b"".join((header, nonce, aesgcm.encrypt(nonce, plaintext, associated)))

    async def open_(blob: bytes) -> bytes:
        if not blob.startswith(header):
            raise ValueError("not our header")
        nonce = blob[body_at : body_at + 12]
        return aesgcm.decrypt(nonce, blob[body_at + 12 :], associated)

    async def round_trip(n: int) -> None:
        for _ in range(n):
            await open_(await seal(data))

    return round_trip


def raw_aesgcm_loops(size: int) -> dict[str, Loop]:
    """Bare ``cryptography`` AES-256-GCM over ``size`` bytes: the floor to compare with.

    The key is built once; each message gets a fresh ``os.urandom`` nonce, as
    encx-async does. ``"encrypt"``, ``"decrypt"`` and ``"round trip"`` are the
    bare calls (the decrypt reuses one nonce and ciphertext, kept apart);
    ``"framed encrypt"`` and ``"framed decrypt"`` also store the nonce in front of
    the ciphertext and split it off again, the format ``encrypt_data`` returns,
    so the difference between the two is the cost of a self-contained ciphertext.
    """
    aesgcm = AESGCM(AESGCM.generate_key(bit_length=256))
    data = os.urandom(size)
    nonce0 = os.urandom(12)
    sealed0 = aesgcm.encrypt(nonce0, data, None)
    framed0 = nonce0 + sealed0

    async def encrypt(n: int) -> None:
        for _ in range(n):
            nonce = os.urandom(12)
            aesgcm.encrypt(nonce, data, None)

    async def decrypt(n: int) -> None:
        for _ in range(n):
            aesgcm.decrypt(nonce0, sealed0, None)

    async def round_trip(n: int) -> None:
        for _ in range(n):
            nonce = os.urandom(12)
            aesgcm.decrypt(nonce, aesgcm.encrypt(nonce, data, None), None)

    async def framed_encrypt(n: int) -> None:
        for _ in range(n):
            nonce = os.urandom(12)
            _ = nonce + aesgcm.encrypt(nonce, data, None)

    async def framed_decrypt(n: int) -> None:
        for _ in range(n):
            aesgcm.decrypt(framed0[:12], framed0[12:], None)

    return {
        "encrypt": encrypt,
        "decrypt": decrypt,
        "round trip": round_trip,
        "framed encrypt": framed_encrypt,
        "framed decrypt": framed_decrypt,
    }


async def max_lag(work: Callable[[], Awaitable[_T]]) -> tuple[float, float, _T]:
    """The worst lateness of a 1 ms ticker while ``work`` runs, the work's time (ms), its result.

    The ticker asks for 1 ms of sleep over and over; anything beyond that is time
    the event loop could not run it, because the thread holding the GIL or the
    loop itself was busy. The result is handed back rather than dropped, so that
    freeing a large buffer (the caller's business, whenever it is done with it)
    does not count against the call being measured.
    """
    worst = 0.0
    running = True

    async def ticker() -> None:
        nonlocal worst
        while running:
            start = time.perf_counter()
            await asyncio.sleep(TICK)
            worst = max(worst, time.perf_counter() - start - TICK)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(5 * TICK)  # let the ticker settle into its rhythm
    start = time.perf_counter()
    try:
        result = await work()
    finally:
        elapsed = time.perf_counter() - start
        running = False
        await task
    return worst * 1000, elapsed * 1000, result


# -- output ----------------------------------------------------------------------


def fmt_rate(value: float) -> str:
    """A records-per-second figure with thousands separators."""
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the figures right-aligned."""
    return text_table(headers, rows, numbers_right=True, rule=True)


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure of a report: a ratio against a baseline of the same run,
    a latency or a count. The report gives figures, not verdicts: a 2-core machine
    busy with other work moves every ratio, so whatever must hold is checked by
    the tests that run the benchmarks, on what does not depend on speed."""

    name: str
    value: float
    unit: str = "x"

    def line(self, width: int = 44) -> str:
        return f"{self.name:<{width}} {self.value:>12,.2f}{self.unit}"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "unit": self.unit}


def figure_lines(figures: Sequence[Figure]) -> str:
    width = max((len(f.name) for f in figures), default=0)
    return "\n".join(figure.line(width) for figure in figures)


class Output:
    """Where the human-readable report goes: stdout, or stderr when stdout carries JSON."""

    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        self._stream: TextIO = sys.stderr if json_mode else sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self._stream, flush=True)

    def section(self, title: str) -> None:
        self.say()
        self.say(title)
        self.say("=" * len(title))

    def figures(self, figures: Sequence[Figure]) -> None:
        self.say(figure_lines(figures))

    def result(self, document: Mapping[str, Any]) -> None:
        """In JSON mode, the whole result as one JSON document on stdout."""
        if self.json_mode:
            json.dump(document, sys.stdout, indent=2)
            sys.stdout.write("\n")
            sys.stdout.flush()


# -- KMS -------------------------------------------------------------------------


class DelayedKMS(DelegatingKMS):
    """A KMS wrapper that waits ``latency`` seconds before each wrap and unwrap.

    moto answers in about a millisecond; a real KMS is 5 to 50 ms away. The wait
    is an ``asyncio.sleep``, so concurrent callers overlap like real requests.
    The wrapped service stays open when this one is closed: it is not ours.
    """

    def __init__(self, inner: KeyManagementService, latency: float) -> None:
        super().__init__(inner, close_inner=False)
        self._latency = latency

    async def before(self, operation: str, data: bytes) -> None:
        await asyncio.sleep(self._latency)


@dataclass(frozen=True, slots=True)
class AwsTarget:
    """An open AWS KMS service and where it points."""

    kms: KeyManagementService
    #: the endpoint in use; None means the real AWS KMS of ``region``
    endpoint_url: str | None
    region: str | None
    #: True when this process started the moto server it talks to
    local_moto: bool


@contextlib.asynccontextmanager
async def aws_kms(
    *,
    endpoint_url: str | None,
    region: str | None,
    real_aws: bool = False,
    max_pool_connections: int | None = None,
) -> AsyncIterator[AwsTarget]:
    """The AWS provider, on an in-process moto server unless told otherwise.

    Without ``endpoint_url`` and without ``real_aws`` a moto server is started
    here and stopped on exit; with ``endpoint_url`` that endpoint is used; with
    ``real_aws`` botocore finds the real KMS and credentials the usual way.
    """
    from encx_async.providers.aws import Config, KMSService

    async with contextlib.AsyncExitStack() as stack:
        local_moto = endpoint_url is None and not real_aws
        if not real_aws:
            use_fake_credentials()
        if local_moto:
            endpoint_url = stack.enter_context(MotoServer()).endpoint_url
            region = region or os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
        config = Config(
            region=region, endpoint_url=endpoint_url, max_pool_connections=max_pool_connections
        )
        kms = await stack.enter_async_context(await KMSService.create(config))
        yield AwsTarget(kms, endpoint_url, kms.region, local_moto)


async def open_crypto(kms: KeyManagementService, alias: str, cache: DEKCache | None) -> Crypto:
    """A Crypto for ``alias`` with its own throwaway KEK version store (BENCH_DATABASE)."""
    return await Crypto.create(kms=kms, kek_alias=alias, dek_cache=cache, database=BENCH_DATABASE)


async def ensure_key(kms: KeyManagementService, alias: str) -> str:
    """The id of the key behind ``alias``, creating both if the alias is unknown."""
    try:
        return await kms.get_key_id(alias)
    except KMSKeyNotFoundError:
        return await kms.create_key("encx-async benchmark KEK", alias=alias)


# -- entry point -----------------------------------------------------------------


def parse_options(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    counts: Sequence[str],
    progress: bool = False,
) -> argparse.Namespace:
    """Parse ``argv`` with the options every benchmark shares added to ``parser``.

    Those are ``--json`` and, for a benchmark that draws progress, ``--progress``
    (by default when stderr is a terminal). Each option named in ``counts``
    (by its attribute name) must be at least 1.
    """
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    if progress:
        parser.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="draw progress on stderr (default: when stderr is a terminal)",
        )
    args = parser.parse_args(argv)
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if progress and args.progress is None:
        args.progress = progress_default()
    return args


Script = Callable[[argparse.Namespace, Output], Coroutine[Any, Any, Mapping[str, Any]]]


def run_script(script: Script, args: argparse.Namespace, *, prog: str) -> int:
    """Run a benchmark coroutine; print its JSON result if asked; exit status 0 or 1.

    An encx-async error (no region, no credentials, an unknown key) ends the run
    with its message, which says what to fix, rather than a traceback.
    """
    out = Output(json_mode=args.json)
    try:
        result = asyncio.run(script(args, out))
    except EncxError as exc:
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    out.result(result)
    return 0
