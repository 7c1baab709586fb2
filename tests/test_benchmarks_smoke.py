"""The benchmark scripts run end to end on tiny inputs and report what they promise.

Each script runs once, as ``python -m benchmarks.<name> --json``, in a fresh
interpreter: stdout must be one JSON document and stderr the human-readable
report. The reports give figures, not verdicts; what must hold whatever the
machine's load (KMS calls saved, no errors, clean shutdowns) is asserted here,
on the JSON, and speed never is.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0
_AWS_ENV_TO_DROP = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS", "AWS_REGION")

# Slow: each benchmark runs in a fresh interpreter.
pytestmark = pytest.mark.slow


def run_benchmark(name: str, *args: str) -> tuple[dict[str, Any], str]:
    """Run a benchmark module with ``--json``; return the parsed stdout and the stderr text."""
    env = {k: v for k, v in os.environ.items() if k not in _AWS_ENV_TO_DROP}
    # The benchmarks start their own moto server; keep them away from real AWS.
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.pop("AWS_SESSION_TOKEN", None)
    completed = subprocess.run(  # noqa: S603 (our own interpreter and module, fixed arguments)
        [sys.executable, "-m", f"benchmarks.{name}", "--json", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    document: dict[str, Any] = json.loads(completed.stdout)
    return document, completed.stderr


def figure_names(document: dict[str, Any]) -> set[str]:
    return {figure["name"] for figure in document["figures"]}


def test_cache_benchmark_reports_runs_ratios_and_kms_calls() -> None:
    document, report = run_benchmark(
        "cache",
        "--records",
        "200",
        "--uncached-records",
        "50",
        "--skip-esdk",
        "--no-progress",
        "--round-trips",
        "300",
        "--repeats",
        "2",
    )
    for header in (
        "Uncached vs DEKCache() defaults",
        "encrypt records/s",
        "KMS calls: encrypt_dek",
        "cache hit ratio: decrypt",
        "KMS cost per 1M records",
        "Round trip (encrypt + decrypt)",
        "round trips/s",
        "Ratios",
    ):
        assert header in report
    assert "first 50 records only" in report
    assert "cached round trip / raw AESGCM" in report
    assert "cached round trip / leanest async envelope" in report
    assert "PASS" not in report
    assert "FAIL" not in report

    runs = document["runs"]
    uncached, cached = runs["uncached"], runs["cached"]
    assert uncached["records"] == 50
    assert cached["records"] == 200
    # Without a cache every record costs one wrap and one unwrap.
    assert uncached["kms_calls"]["encrypt_phase"]["encrypt_dek"] == 50
    assert uncached["kms_calls"]["decrypt_phase"]["decrypt_dek"] == 50
    assert cached["kms_calls_total"] < uncached["kms_calls_total"]
    assert cached["data_key_calls"] < uncached["data_key_calls"]
    assert cached["kms_calls_per_record"] < uncached["kms_calls_per_record"]
    assert 0.0 < cached["hit_ratio"]["decrypt_phase"] <= 1.0
    assert uncached["hit_ratio"]["encrypt_phase"] is None
    assert uncached["kms_cost_usd_per_million_records"] == pytest.approx(6.0)
    assert document["round_trip_per_s"]["raw_aesgcm"] > 0
    assert document["round_trip_per_s"]["lean_envelope"] > 0
    assert document["round_trip_per_s"]["encx_cached"] > 0
    assert document["round_trip_per_s"]["esdk_caching"] is None
    assert "cached round trip / raw AESGCM" in figure_names(document)


def test_core_benchmark_reports_ratios_and_lag() -> None:
    document, report = run_benchmark(
        "core",
        "--iterations",
        "500",
        "--repeats",
        "2",
        "--lag-payload-mib",
        "4",
        "--lag-repeats",
        "1",
    )
    for header in (
        "Throughput against bare AES-GCM",
        "vs bare AESGCM",
        "Event-loop lag, 4 MiB payload",
        "max lag ms",
        "Ratios",
    ):
        assert header in report
    assert "encrypt_data / raw AESGCM, nonce || ct" in report
    assert "event-loop lag, high level, 4 MiB" in report

    assert {"encrypt_data", "decrypt_data", "encrypt", "decrypt"} <= set(document["ops_per_s"])
    assert all(rate > 0 for rate in document["ops_per_s"].values())
    assert document["lag"]["encrypt (high level)"]["max_lag_ms"] >= 0
    assert {"encrypt_data / raw AESGCM, nonce || ct", "decrypt_data / raw AESGCM, nonce || ct"} <= (
        figure_names(document)
    )


def test_hashing_benchmark_reports_ratios_and_lag() -> None:
    document, report = run_benchmark(
        "hashing",
        "--iterations",
        "500",
        "--repeats",
        "2",
        "--secure-calls",
        "4",
        "--secure-repeats",
        "1",
    )
    for header in (
        "Blind index against raw HMAC-SHA256 of the same encoded bytes",
        "vs hmac.digest",
        "Argon2id (default parameters), 4 concurrent hash_secure",
        "max lag ms",
        "Ratios",
    ):
        assert header in report
    assert "hash_basic / raw hmac.digest, same bytes" in report
    assert "event-loop lag, 4 concurrent hash_secure" in report

    assert set(document["ops_per_s"]) == {
        "hash_basic",
        "raw hmac.digest",
        "raw hmac.new",
        "raw pre-keyed HMAC copy",
    }
    assert all(rate > 0 for rate in document["ops_per_s"].values())
    assert document["secure"]["calls"] == 4
    assert document["secure"]["max_lag_ms"] >= 0
    assert document["secure"]["hashes_per_s"] > 0
    assert document["argon2_threads"] >= 1
    assert {
        "hash_basic / raw hmac.digest, same bytes",
        "event-loop lag, 4 concurrent hash_secure",
        "hash_secure throughput",
    } <= figure_names(document)


def test_cache_benchmark_compares_with_the_encryption_sdk() -> None:
    document, report = run_benchmark(
        "cache",
        "--records",
        "100",
        "--uncached-records",
        "10",
        "--esdk-records",
        "10",
        "--no-progress",
        "--round-trips",
        "200",
        "--repeats",
        "1",
    )
    assert document["esdk_error"] is None, document["esdk_error"]
    rates = document["round_trip_per_s"]["esdk_caching"]
    assert rates
    assert all(rate > 0 for rate in rates.values())
    assert "AWS Encryption SDK caching CMM" in report
    assert "cached round trip / ESDK caching round trip" in figure_names(document)


def test_stream_benchmark_reports_memory_and_throughput() -> None:
    document, report = run_benchmark(
        "stream",
        "--stream-mib",
        "8",
        "--throughput-mib",
        "4",
        "--stored-mib",
        "4",
        "--repeats",
        "1",
        "--no-progress",
    )
    for header in ("Memory: 8 MiB", "RSS before MiB", "Throughput in 1 MiB chunks", "Ratios"):
        assert header in report
    assert {"encrypt_stream / raw Cobblestone", "decrypt_stream / raw Cobblestone"} <= (
        figure_names(document)
    )
    assert document["memory"]["mib"] == 8
    assert set(document["mib_per_s"]) == {
        "raw encrypt",
        "encrypt_stream",
        "raw decrypt",
        "decrypt_stream",
    }


@pytest.mark.slow
def test_load_benchmark_reports_both_runs_latency_and_kms_share() -> None:
    document, report = run_benchmark(
        "load",
        "--requests",
        "200",
        "--uncached-requests",
        "60",
        "--clients",
        "20",
        "--users",
        "20",
        "--no-progress",
    )
    assert "the uncached run sends 60 requests, not 200" in report
    for header in ("p50 ms", "p99 ms", "KMS/req", "clean stop", "Figures"):
        assert header in report
    assert "p99 latency, uncached / cached" in report
    uncached, cached = document["runs"]["uncached"], document["runs"]["cached"]
    assert uncached["requests"] == 60
    assert cached["requests"] == 200
    # Without the cache every request costs one KMS call; with it, almost none.
    assert uncached["kms_calls_total"] == 60
    assert cached["kms_calls_total"] < uncached["kms_calls_total"]
    assert cached["p99_ms"] >= cached["p50_ms"] > 0
    assert uncached["errors"] == cached["errors"] == 0
    assert cached["kms_calls_per_request"] <= 0.01
    assert uncached["clean_shutdown"]
    assert cached["clean_shutdown"]
    assert {"KMS calls per request, cached", "p99 latency, uncached / cached"} <= (
        figure_names(document)
    )


def test_load_benchmark_percentiles_are_nearest_rank() -> None:
    from benchmarks.load import Run

    def run(latencies: list[float]) -> Run:
        return Run("r", len(latencies), 0, 1.0, latencies, {}, 0, None, True, None)

    assert run([5.0, 1.0, 4.0, 2.0, 3.0]).percentile(50) == 3.0
    hundred_fifty = run([float(i) for i in range(1, 151)])
    assert hundred_fifty.percentile(99) == 149.0  # rank ceil(148.5)
    assert hundred_fifty.percentile(100) == 150.0
    assert run([]).percentile(99) == 0.0


# 2,000 operations, the KMS down for 2 s after the first 1,000.
TINY_SOAK = ("--operations", "2000", "--tasks", "20", "--outage-seconds", "2", "--no-progress")


def _check_soak_run(run: dict[str, Any], *, operations: int) -> None:
    records = run["records"]
    assert records["written"] > 0
    assert records["lost"] == 0
    assert records["verified"] == records["written"]
    assert records["checked_during_run"] > 0
    assert run["unexpected_errors"] == 0, run["unexpected_samples"]
    assert run["errors"]["unexpected"] == {}
    done = sum(
        c["ok"] + c["failed_in_outage"] + c["failed_otherwise"] for c in run["by_kind"].values()
    )
    rotations = run["by_kind"].get("rotate_kek", {"ok": 0, "failed_in_outage": 0})
    assert done - rotations["ok"] - rotations["failed_in_outage"] == operations
    # The KMS went down: what needed it failed, counted, and typed; cached keys kept serving.
    outage = run["outage"]
    assert outage["seconds"] > 0
    assert outage["kms_errors"] > 0
    assert set(run["errors"]["outage"]) == {"KMSUnavailableError"}
    assert outage["served_from_cache"] > 0
    assert run["kms_calls"]["total"] > 0
    assert run["max_lag_ms"] >= 0


@pytest.mark.slow
def test_soak_benchmark_keeps_every_record_through_an_outage() -> None:
    document, report = run_benchmark(
        "soak", *TINY_SOAK, "--rotate-every", "300", "--database", "sqlite"
    )
    for header in ("sqlite: 2,000 operations", "failed: outage", "from the outage", "Figures"):
        assert header in report
    assert "served by cached keys" in report
    assert "PASS" not in report
    assert "FAIL" not in report
    assert set(document["runs"]) == {"sqlite"}
    assert document["settings"]["outage_mode"] == "stall"
    _check_soak_run(document["runs"]["sqlite"], operations=2000)
    assert {"sqlite: records lost", "sqlite: served by cached keys, outage"} <= figure_names(
        document
    )


@pytest.mark.slow
async def test_soak_benchmark_on_postgres_forgets_its_key_versions(postgres_url: str) -> None:
    import asyncpg

    document, _ = await asyncio.to_thread(
        run_benchmark,
        "soak",
        *TINY_SOAK,
        "--outage-mode",
        "error",
        "--database",
        "postgres",
        "--postgres-url",
        postgres_url,
    )
    assert set(document["runs"]) == {"postgres"}
    run = document["runs"]["postgres"]
    _check_soak_run(run, operations=2000)
    connection = await asyncpg.connect(postgres_url, timeout=5)
    try:
        left = await connection.fetchval(
            "SELECT count(*) FROM encx_kek_versions WHERE alias = $1", run["kek_alias"]
        )
    finally:
        await connection.close()
    assert left == 0
