"""The FastAPI example service under load, with and without the DEK cache.

Run ``python -m benchmarks.load`` (``--help`` for the options). It starts moto
in this process, then for each run starts ``examples.fastapi_service`` under
uvicorn in a **separate process**, creates ``--users`` users, and has
``--clients`` concurrent clients send ``--requests`` requests (80% reads by
id, 10% lookups by e-mail, 10% new users), timing each one. It reads the
service's ``/stats`` before and after, so the KMS calls counted are the
service's own, then stops it with SIGTERM and checks that it shut down cleanly.

Why a separate process: in one process the 200 clients and the service would
take turns on one event loop and one GIL, and the latency measured would be
mostly the clients' own queueing. Apart, the service has an interpreter of its
own. The machine is still shared: on two cores the service, the clients and
moto (a thread of this process) compete, so the latencies are those of a
loaded machine; compare the two runs with each other, not with production.

A moto KMS call costs about 4 ms of CPU, so the run without the cache sends
fewer requests (``--uncached-requests``, 2,000 by default) and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

from ._common import Figure, Output, Progress, parse_options, run_script, table
from ._moto import MotoServer

ROOT = Path(__file__).resolve().parent.parent
ALIAS = "alias/encx-load"
TENANTS = 10
STARTUP_TIMEOUT = 60.0
# Signs, in the service's stderr, of a resource it did not close or a crash.
LEAK_MARKERS = ("Unclosed", "Traceback", "ResourceWarning", "Task was destroyed")


@dataclass(frozen=True, slots=True)
class Run:
    label: str
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    kms_calls: dict[str, int]
    #: every KMS call the service made, start-up and seeding included
    service_kms_calls: int
    hit_ratio: float | None
    clean_shutdown: bool
    shutdown_problem: str | None

    @property
    def total_kms_calls(self) -> int:
        return sum(self.kms_calls.values())

    @property
    def kms_calls_per_request(self) -> float:
        return self.total_kms_calls / self.requests if self.requests else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        # Nearest rank: the smallest sample with at least p% of them at or below it.
        # (round() would undershoot half the time: banker's rounding of 2.5 is 2.)
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        return ordered[index]

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.seconds,
            "requests_per_s": self.requests / self.seconds if self.seconds else 0.0,
            "p50_ms": self.percentile(50),
            "p99_ms": self.percentile(99),
            "max_ms": max(self.latencies_ms, default=0.0),
            "kms_calls": self.kms_calls,
            "kms_calls_total": self.total_kms_calls,
            "kms_calls_per_request": self.kms_calls_per_request,
            "service_kms_calls_total": self.service_kms_calls,
            "hit_ratio": self.hit_ratio,
            "clean_shutdown": self.clean_shutdown,
            "shutdown_problem": self.shutdown_problem,
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def service(
    endpoint: str, workdir: Path, *, cache: bool, out: Output
) -> AsyncIterator[tuple[str, list[str | None]]]:
    """The FastAPI example under uvicorn in a child process; yields its URL and a
    one-item list that receives, at exit, what went wrong with its shutdown (or None)."""
    port = _free_port()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "ENCX_KEK_ALIAS": ALIAS,
        "ENCX_DATABASE_URL": f"sqlite:///{workdir / 'keys.db'}",
        "ENCX_PEPPER": base64.b64encode(os.urandom(32)).decode(),
        "ENCX_CREATE_MISSING": "1",
        "ENCX_DEK_CACHE": "1" if cache else "0",
        "USERS_DATABASE": str(workdir / f"users-{'cached' if cache else 'uncached'}.db"),
        "PYTHONWARNINGS": "default",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "examples.fastapi_service:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--ws",
        "none",
        "--timeout-graceful-shutdown",
        "10",
    ]
    stderr_path = workdir / f"service-{port}.log"
    problem: list[str | None] = [None]
    with stderr_path.open("w+") as stderr:
        process = _spawn(command, env, stderr)
        try:
            url = f"http://127.0.0.1:{port}"
            await _wait_ready(url, process)
            yield url, problem
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                code = -9
            stderr.seek(0)
            log = stderr.read()
            found = [marker for marker in LEAK_MARKERS if marker in log]
            # uvicorn re-raises the SIGTERM it handled once it has shut down.
            if code not in (0, -signal.SIGTERM) or found:
                problem[0] = f"exit status {code}" + (f"; stderr has {found}" if found else "")
                out.say(f"service stderr:\n{log[-2000:]}")


def _spawn(command: list[str], env: dict[str, str], stderr: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 (our interpreter, fixed arguments)
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr
    )


async def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited with status {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the service did not become ready in {STARTUP_TIMEOUT:g} s")


async def _stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/stats") as response:
        document: dict[str, Any] = await response.json()
        return document


async def load_run(
    label: str,
    endpoint: str,
    workdir: Path,
    *,
    cache: bool,
    requests: int,
    args: argparse.Namespace,
    out: Output,
) -> Run:
    rng = random.Random(7)
    async with service(endpoint, workdir, cache=cache, out=out) as (url, problem):
        connector = aiohttp.TCPConnector(limit=args.clients)
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
            users: list[tuple[str, str, str]] = []  # tenant, id, email
            for i in range(args.users):
                tenant = f"tenant{i % TENANTS}"
                email = f"user{i}@example.com"
                body = {"name": f"User {i}", "email": email}
                async with session.post("/users", json=body, headers={"X-Tenant": tenant}) as r:
                    r.raise_for_status()
                    users.append((tenant, (await r.json())["id"], email))
            before = await _stats(session, url)
            latencies: list[float] = []
            errors = 0
            issued = 0

            async def client(progress: Progress) -> None:
                nonlocal errors, issued
                while issued < requests:
                    n = issued
                    issued += 1
                    tenant, user_id, email = users[rng.randrange(len(users))]
                    headers = {"X-Tenant": tenant}
                    roll = rng.random()
                    started = time.perf_counter()
                    try:
                        if roll < 0.8:
                            request = session.get(f"/users/{user_id}", headers=headers)
                        elif roll < 0.9:
                            request = session.get(
                                "/users", params={"email": email}, headers=headers
                            )
                        else:
                            body = {"name": f"New {n}", "email": f"new{n}@example.com"}
                            request = session.post("/users", json=body, headers=headers)
                        async with request as response:
                            await response.read()
                            if response.status >= 400:
                                errors += 1
                    except (aiohttp.ClientError, TimeoutError):
                        errors += 1
                    latencies.append((time.perf_counter() - started) * 1000)
                    progress.advance()

            with Progress(f"{label}: requests", requests, enabled=args.progress) as progress:
                started = time.perf_counter()
                await asyncio.gather(*(client(progress) for _ in range(args.clients)))
                seconds = time.perf_counter() - started
            after = await _stats(session, url)
    kms = {
        op: count - before["kms_calls"].get(op, 0)
        for op, count in after["kms_calls"].items()
        if count - before["kms_calls"].get(op, 0)
    }
    cache_stats = after["dek_cache"]
    return Run(
        label=label,
        requests=requests,
        errors=errors,
        seconds=seconds,
        latencies_ms=latencies,
        kms_calls=kms,
        service_kms_calls=after["total_kms_calls"],
        hit_ratio=None if cache_stats is None else cache_stats["hit_ratio"],
        clean_shutdown=problem[0] is None,
        shutdown_problem=problem[0],
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Load the FastAPI example service with and without the DEK cache.",
    )
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients (200)")
    parser.add_argument("--requests", type=int, default=20_000, help="requests, cached (20000)")
    parser.add_argument(
        "--uncached-requests",
        type=int,
        default=2_000,
        help="requests without the cache (2000: each costs a ~4 ms moto KMS call)",
    )
    parser.add_argument("--users", type=int, default=200, help="users created first (200)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, s (60)")
    return parse_options(
        parser, argv, counts=("clients", "requests", "uncached_requests", "users"), progress=True
    )


async def run(args: argparse.Namespace, out: Output) -> dict[str, Any]:
    out.section(f"FastAPI example under load: {args.clients} concurrent clients")
    out.say(
        "service: uvicorn in a child process; clients and moto: this process; "
        f"{os.cpu_count()} CPU cores shared by all three"
    )
    if args.uncached_requests < args.requests:
        out.say(
            f"the uncached run sends {args.uncached_requests:,} requests, not {args.requests:,} "
            "(each makes a moto KMS call)"
        )
    with tempfile.TemporaryDirectory(prefix="encx-load-") as tmp, MotoServer() as moto:
        workdir = Path(tmp)
        uncached = await load_run(
            "uncached", moto.endpoint_url, workdir, cache=False,
            requests=args.uncached_requests, args=args, out=out,
        )  # fmt: skip
        cached = await load_run(
            "DEKCache()", moto.endpoint_url, workdir, cache=True,
            requests=args.requests, args=args, out=out,
        )  # fmt: skip
    runs = (uncached, cached)
    rows = [
        [
            r.label,
            f"{r.requests:,}",
            f"{r.errors:,}",
            f"{r.requests / r.seconds:,.0f}",
            f"{r.percentile(50):.1f}",
            f"{r.percentile(99):.1f}",
            f"{r.total_kms_calls:,}",
            f"{100 * r.kms_calls_per_request:.2f}%",
            "-" if r.hit_ratio is None else f"{r.hit_ratio:.4f}",
            "yes" if r.clean_shutdown else "NO",
        ]
        for r in runs
    ]
    out.say()
    out.say(
        table(
            [
                "run",
                "requests",
                "errors",
                "req/s",
                "p50 ms",
                "p99 ms",
                "KMS calls",
                "KMS/req",
                "hit ratio",
                "clean stop",
            ],
            rows,
        )
    )
    out.say("latencies are seen by the clients: the service's answer time on a shared machine")
    for r in runs:
        out.say(
            f"{r.label}: {r.service_kms_calls:,} KMS calls in the service's whole life "
            f"(start-up, {args.users} users created, the timed requests)"
        )
    p99_ratio = uncached.percentile(99) / cached.percentile(99) if cached.percentile(99) else 0.0
    rate_ratio = (cached.requests / cached.seconds) / (uncached.requests / uncached.seconds)
    figures = [
        Figure("errors with the cache", float(cached.errors), unit=""),
        Figure("errors without the cache", float(uncached.errors), unit=""),
        Figure(
            "KMS calls per request, cached",
            100 * cached.kms_calls_per_request,
            unit="%",
        ),
        Figure(
            "clean shutdowns (both runs)",
            float(uncached.clean_shutdown + cached.clean_shutdown),
            unit="",
        ),
        Figure("p99 latency, uncached / cached", p99_ratio),
        Figure("throughput, cached / uncached", rate_ratio),
    ]
    out.section("Figures")
    out.figures(figures)
    return {
        "clients": args.clients,
        "cpu_count": os.cpu_count(),
        "runs": {"uncached": uncached.as_json(), "cached": cached.as_json()},
        "figures": [figure.as_json() for figure in figures],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(run, parse_args(argv), prog="python -m benchmarks.load")


if __name__ == "__main__":
    sys.exit(main())
