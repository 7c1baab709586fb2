"""The ``encx-async`` command line, run for real: as a subprocess, on real KMS providers.

Each command runs as ``python -m encx_async`` (and once as the installed
``encx-async`` script) against the session's moto server (``--kms aws
--endpoint-url ...``) or a ``LocalKMSService`` key file (``--kms local``), with
its KEK versions in a SQLite file of the test's own. The in-process tests at the
end cover what needs no process: parsing, exit codes, progress drawing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from encx_async import (
    ConfigurationError,
    DatabaseUnavailableError,
    DecryptionError,
    KeyStoreCorruptError,
    KeyVersionNotFoundError,
    KMSAccessDeniedError,
    KMSKeyNotFoundError,
    KMSUnavailableError,
)
from encx_async._cli import main
from encx_async._cli._args import parse_context
from encx_async._cli._errors import CLIError, ExitCode, describe_failure
from encx_async._cli._io import atomic_output, naming, replace_file
from encx_async._envelope import parse
from encx_async._ordered import check_concurrency
from encx_async._progress import Progress, format_bytes

ROOT = Path(__file__).resolve().parent.parent
ALIAS = "alias/cli-test"
TIMEOUT = 60.0
#: what the plaintexts are made of, so any leak into stderr is easy to spot
MARKER = b"PLAINTEXT-MARKER-"
LEAK_MARKERS = ("Traceback", "ResourceWarning", "Unclosed", "Task was destroyed", "never awaited")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: bytes
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def text(self) -> str:
        return self.stdout.decode()

    def error_lines(self) -> list[str]:
        """stderr of a failed command: exactly an error line and a hint line."""
        lines = self.stderr.splitlines()
        assert len(lines) == 2, self.stderr
        assert lines[0].startswith("encx-async: error: "), self.stderr
        assert lines[1].startswith("hint: "), self.stderr
        return lines


def base_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a command: no ENCX_ or AWS_ settings but moto's fake credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENCX_", "AWS_"))}
    empty = tmp_path / "aws-config"
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(empty / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(empty / "credentials"),
        XDG_DATA_HOME=str(tmp_path / "xdg-data"),
    )
    return env


class CLI:
    """Runs ``encx-async`` with a fixed set of KMS flags in front of the arguments."""

    def __init__(self, kind: str, flags: Sequence[str], env: Mapping[str, str], cwd: Path):
        self.kind = kind
        self.flags = list(flags)
        self.env = dict(env)
        self.cwd = cwd

    def command(self, *args: str, script: bool = False, flags: bool = True) -> list[str]:
        if script:
            program = shutil.which("encx-async", path=str(Path(sys.executable).parent))
            assert program is not None, "the encx-async script is not installed: pip install -e ."
            head = [program]
        else:
            head = [sys.executable, "-W", "default::ResourceWarning", "-m", "encx_async"]
        return [*head, *(self.flags if flags else []), *args]

    def __call__(
        self,
        *args: str,
        input: bytes | None = None,
        script: bool = False,
        flags: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        completed = subprocess.run(  # noqa: S603 (our own interpreter or script, fixed arguments)
            self.command(*args, script=script, flags=flags),
            input=input if input is not None else b"",
            capture_output=True,
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            timeout=TIMEOUT,
            check=False,
        )
        stderr = completed.stderr.decode("utf-8", "replace")
        for marker in LEAK_MARKERS:
            assert marker not in stderr, stderr
        return Result(completed.returncode, completed.stdout, stderr)

    def ok(self, *args: str, input: bytes | None = None, script: bool = False) -> Result:
        result = self(*args, input=input, script=script)
        assert result.code == 0, result.stderr
        return result


def local_flags(tmp_path: Path) -> list[str]:
    return [
        "--kms",
        "local",
        "--local-keys",
        str(tmp_path / "local-keys.json"),
        "--database",
        f"sqlite:///{tmp_path / 'keys.db'}",
        "--kek-alias",
        ALIAS,
    ]


@pytest.fixture(params=["local", "aws"])
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> CLI:
    """The command line on each provider in turn, with a database of this test's own."""
    if request.param == "aws":
        endpoint: str = request.getfixturevalue("moto_endpoint")
        flags = [
            "--kms",
            "aws",
            "--endpoint-url",
            endpoint,
            "--region",
            "us-east-1",
            "--database",
            f"sqlite:///{tmp_path / 'keys.db'}",
            "--kek-alias",
            ALIAS,
        ]
    else:
        flags = local_flags(tmp_path)
    return CLI(request.param, flags, base_env(tmp_path), tmp_path)


@pytest.fixture
def local_cli(tmp_path: Path) -> CLI:
    return CLI("local", local_flags(tmp_path), base_env(tmp_path), tmp_path)


def plaintext(size: int) -> bytes:
    """``size`` bytes, mostly random, with the marker repeated through them."""
    chunk = MARKER + os.urandom(4096 - len(MARKER))
    return (chunk * (size // len(chunk) + 1))[:size]


def key_materials(path: Path) -> list[str]:
    """Every key of a LocalKMSService key file, in base64 and in hex."""
    document = json.loads(path.read_text())
    found = []
    for key in document["keys"].values():
        for material in key["materials"]:
            found += [material, base64.b64decode(material).hex()]
    return found


def assert_no_secrets(result: Result, cli: CLI) -> None:
    """Neither the plaintext nor (for the local KMS) any key is in the command's stderr."""
    assert MARKER.decode() not in result.stderr
    keys = cli.cwd / "local-keys.json"
    if cli.kind == "local" and keys.exists():
        for secret in key_materials(keys):
            assert secret not in result.stderr
            assert secret.encode() not in result.stdout


# -- keys ------------------------------------------------------------------------------


@pytest.mark.slow
def test_keys_create_describe_rotate_list_versions(cli: CLI) -> None:
    created = cli.ok("keys", "create", "--json").json()
    assert created["created"] is True
    assert created["alias"] == ALIAS
    assert created["kek_version"] == 1
    assert created["kms"] == cli.kind

    again = cli.ok("keys", "create")
    assert f"{ALIAS} exists already" in again.text

    described = cli.ok("keys", "describe", "--json").json()
    assert described["kek_version"] == 1
    assert described["enabled"] is True
    assert described["key_state"] == "Enabled"
    assert described["key_id"] in created["key_id"]

    rotated = cli.ok("keys", "rotate", "--json").json()
    assert (rotated["previous_version"], rotated["kek_version"]) == (1, 2)
    assert rotated["key_id"] != created["key_id"]
    assert rotated["rotation"] == rotated["strategy"] == "new-key"

    listed = cli.ok("keys", "list-versions", "--json").json()
    versions = listed["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    assert [v["state"] for v in versions] == ["deprecated", "active"]
    assert [v["current"] for v in versions] == [False, True]
    assert versions[0]["key_id"] == created["key_id"]

    table = cli.ok("keys", "list-versions").text
    assert "2 *" in table
    assert "deprecated" in table


@pytest.mark.slow
def test_keys_on_an_alias_never_created_exit_3(cli: CLI) -> None:
    result = cli("keys", "describe")
    assert result.code == ExitCode.SERVICE
    error, hint = result.error_lines()
    assert ALIAS in error
    assert "keys create" in hint


@pytest.mark.slow
def test_rotate_takes_the_deprecated_strategy_flag_with_a_warning(local_cli: CLI) -> None:
    local_cli.ok("keys", "create")
    result = local_cli("keys", "rotate", "--strategy", "kms-managed", "--json")
    assert result.code == 0, result.stderr
    assert result.stderr == (
        "encx-async: warning: --strategy is deprecated: use --rotation, which takes the same "
        "values\n"
    )
    rotated = result.json()  # stdout is the JSON document alone
    assert rotated["rotation"] == rotated["strategy"] == "kms-managed"
    assert rotated["kek_version"] == 2
    again = local_cli.ok("keys", "rotate", "--rotation", "kms-managed", "--json")
    assert again.stderr == ""
    assert again.json()["key_id"] == rotated["key_id"]  # kms-managed keeps the KMS key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("UPDATE encx_kek_versions SET state = 'deprecated'", "has no active KEK version"),
        ("UPDATE encx_kek_versions SET created_at = 'yesterday'", "is corrupt: bad timestamp"),
    ],
)
def test_a_corrupt_key_store_exits_3_with_how_to_repair_it(
    local_cli: CLI, tmp_path: Path, corruption: str, message: str
) -> None:
    local_cli.ok("keys", "create")
    # What a manual edit could leave, within the table's CHECK constraints.
    with contextlib.closing(sqlite3.connect(tmp_path / "keys.db")) as db, db:
        db.execute(corruption)
    for command in (["keys", "list-versions"], ["encrypt", "-o", "out.enc"]):
        result = local_cli(*command, input=b"data")
        assert result.code == ExitCode.SERVICE, (command, result.stderr)
        error, hint = result.error_lines()
        assert message in error
        assert str(tmp_path / "keys.db") in error
        assert "encx_kek_versions" in hint
        assert "restore a backup" in hint
        assert "unexpected" not in error
        assert "--debug" not in hint
    assert not (tmp_path / "out.enc").exists()


# -- encrypt and decrypt -------------------------------------------------------------


@pytest.mark.slow
def test_file_and_stdio_round_trips_with_context(cli: CLI, tmp_path: Path) -> None:
    cli.ok("keys", "create")
    data = plaintext(3 * 1024 * 1024 + 17)
    (tmp_path / "plain").write_bytes(data)
    context = ["--context", "tenant=acme", "--context", "table=users"]

    encrypted = cli.ok(
        "encrypt", "-i", "plain", "-o", "plain.enc", *context, "--aad", "row:7", "--json"
    ).json()
    assert encrypted["bytes_read"] == len(data)
    assert encrypted["bytes_written"] == (tmp_path / "plain.enc").stat().st_size
    assert encrypted["kek_version"] == 1
    assert encrypted["kms_calls"]["encrypt_dek"] == 1
    sealed = (tmp_path / "plain.enc").read_bytes()
    assert MARKER not in sealed

    decrypted = cli.ok("decrypt", "-i", "plain.enc", "-o", "plain.out", *context, "--aad", "row:7")
    assert "decrypted and authenticated" in decrypted.text
    assert (tmp_path / "plain.out").read_bytes() == data

    # stdin to stdout both ways, several MiB through the pipes.
    piped = cli.ok("encrypt", *context, input=data).stdout
    assert MARKER not in piped
    assert cli.ok("decrypt", *context, input=piped).stdout == data
    # The two forms are one format: a file made from stdin opens as a file, and back.
    (tmp_path / "piped.enc").write_bytes(piped)
    cli.ok("decrypt", "-i", "piped.enc", "-o", "piped.out", *context)
    assert (tmp_path / "piped.out").read_bytes() == data
    assert cli.ok("decrypt", *context, "--aad", "row:7", input=sealed).stdout == data
    cli.ok("decrypt", "-o", "stdin.out", *context, "--aad", "row:7", input=sealed)
    assert (tmp_path / "stdin.out").read_bytes() == data


@pytest.mark.slow
def test_wrong_context_exit_1_with_one_error_line(cli: CLI, tmp_path: Path) -> None:
    cli.ok("keys", "create")
    (tmp_path / "plain").write_bytes(plaintext(200_000))
    cli.ok("encrypt", "-i", "plain", "-o", "plain.enc", "--context", "tenant=acme")

    result = cli("decrypt", "-i", "plain.enc", "-o", "out", "--context", "tenant=other")
    assert result.code == ExitCode.DATA
    _, hint = result.error_lines()
    assert "--context" in hint
    assert not (tmp_path / "out").exists()
    assert_no_secrets(result, cli)

    # The same failure with --debug shows where it came from, still without secrets.
    debug = subprocess.run(  # noqa: S603
        cli.command("decrypt", "-i", "plain.enc", "--context", "tenant=other", "--debug"),
        capture_output=True,
        cwd=tmp_path,
        env=cli.env,
        timeout=TIMEOUT,
        check=False,
    )
    assert debug.returncode == ExitCode.DATA
    stderr = debug.stderr.decode()
    assert "Traceback" in stderr
    assert "DecryptionError" in stderr
    assert_no_secrets(Result(debug.returncode, debug.stdout, stderr), cli)


@pytest.mark.slow
def test_tampered_or_truncated_file_exit_1_and_no_output(local_cli: CLI, tmp_path: Path) -> None:
    cli = local_cli
    cli.ok("keys", "create")
    data = plaintext(1024 * 1024)
    (tmp_path / "plain").write_bytes(data)
    cli.ok("encrypt", "-i", "plain", "-o", "plain.enc")
    sealed = (tmp_path / "plain.enc").read_bytes()
    tampered = bytearray(sealed)
    tampered[len(sealed) // 2] ^= 0x01
    (tmp_path / "tampered.enc").write_bytes(tampered)
    (tmp_path / "truncated.enc").write_bytes(sealed[:-100])
    (tmp_path / "existing").write_bytes(b"left alone")
    before = sorted(p.name for p in tmp_path.iterdir())

    for name in ("tampered.enc", "truncated.enc"):
        result = cli("decrypt", "-i", name, "-o", "out")
        assert result.code == ExitCode.DATA, result.stderr
        result.error_lines()
        assert_no_secrets(result, cli)
        replaced = cli("decrypt", "-i", name, "-o", "existing", "--force")
        assert replaced.code == ExitCode.DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temp file
    assert (tmp_path / "existing").read_bytes() == b"left alone"

    # To stdout, what was written before the failure is genuine, and the exit code says 1.
    streamed = cli("decrypt", input=bytes(tampered))
    assert streamed.code == ExitCode.DATA
    assert len(streamed.stdout) < len(data)
    assert data.startswith(streamed.stdout)


@pytest.mark.slow
def test_encrypt_refuses_to_replace_a_file_without_force(local_cli: CLI, tmp_path: Path) -> None:
    local_cli.ok("keys", "create")
    (tmp_path / "plain").write_bytes(b"x")
    (tmp_path / "out").write_bytes(b"precious")
    result = local_cli("encrypt", "-i", "plain", "-o", "out")
    assert result.code == ExitCode.USAGE
    assert "--force" in result.error_lines()[1]
    assert (tmp_path / "out").read_bytes() == b"precious"
    same = local_cli("encrypt", "-i", "plain", "-o", "plain", "--force")
    assert same.code == ExitCode.USAGE
    missing = local_cli("encrypt", "-i", "nope", "-o", "nope.enc")
    assert missing.code == ExitCode.IO
    assert "nope" in missing.error_lines()[0]


# -- rewrap ----------------------------------------------------------------------------


@pytest.mark.slow
def test_rewrap_after_rotate_moves_files_and_base64_lines(cli: CLI, tmp_path: Path) -> None:
    cli.ok("keys", "create")
    context = ["--context", "tenant=acme"]
    data = plaintext(300_000)
    (tmp_path / "plain").write_bytes(data)
    cli.ok("encrypt", "-i", "plain", "-o", "a.enc", *context)
    (tmp_path / "a.enc").chmod(0o640)
    records = [b"record %d" % i for i in range(3)]
    lines = [base64.b64encode(cli.ok("encrypt", *context, input=r).stdout) for r in records]
    cli.ok("keys", "rotate")

    moved = cli.ok("rewrap", "a.enc", *context, "--json").json()
    assert moved["kek_version"] == 2
    assert moved["files"] == [{"path": "a.enc", "rewrapped": True}]
    assert parse((tmp_path / "a.enc").read_bytes()).kek_version == 2
    assert stat.S_IMODE((tmp_path / "a.enc").stat().st_mode) == 0o640
    assert cli.ok("rewrap", "a.enc", *context, "--json").json()["unchanged"] == 1
    cli.ok("decrypt", "-i", "a.enc", "-o", "a.out", *context)
    assert (tmp_path / "a.out").read_bytes() == data

    # A blank line is skipped; every other line comes back, in order, on version 2.
    stdin = lines[0] + b"\n\n" + lines[1] + b"\n" + lines[2] + b"\n"
    out = cli.ok("rewrap", *context, input=stdin).stdout.splitlines()
    assert len(out) == len(records)
    blobs = [base64.b64decode(line, validate=True) for line in out]
    assert [parse(blob).kek_version for blob in blobs] == [2, 2, 2]
    assert cli.ok("decrypt", *context, input=blobs[1]).stdout == records[1]

    versions = cli.ok("keys", "list-versions", "--json").json()
    assert versions["kek_version"] == 2
    assert [v["version"] for v in versions["versions"]] == [1, 2]

    wrong = cli("rewrap", "--context", "tenant=other", input=stdin)
    assert wrong.code == ExitCode.DATA
    assert "line 1 of stdin" in wrong.error_lines()[0]
    garbage = cli("rewrap", input=lines[0] + b"\nnot base64!\n")
    assert garbage.code == ExitCode.DATA
    assert "line 2 of stdin is not base64" in garbage.error_lines()[0]


@pytest.mark.slow
def test_rewrap_through_a_symlink_rewrites_the_target_and_keeps_the_link(
    local_cli: CLI, tmp_path: Path
) -> None:
    cli = local_cli
    cli.ok("keys", "create")
    data = plaintext(200_000)
    (tmp_path / "plain").write_bytes(data)
    store = tmp_path / "store"
    store.mkdir()
    cli.ok("encrypt", "-i", "plain", "-o", "store/real.enc")
    link = tmp_path / "link.enc"
    link.symlink_to(store / "real.enc")
    cli.ok("keys", "rotate")

    moved = cli.ok("rewrap", "link.enc", "--json").json()
    assert moved["files"] == [{"path": "link.enc", "rewrapped": True}]
    assert link.is_symlink()
    assert link.readlink() == store / "real.enc"
    assert parse((store / "real.enc").read_bytes()).kek_version == 2
    assert sorted(p.name for p in store.iterdir()) == ["real.enc"]  # no temp file left
    cli.ok("decrypt", "-i", "link.enc", "-o", "out")
    assert (tmp_path / "out").read_bytes() == data
    # Through the link or not, it is on the current version now.
    again = cli.ok("rewrap", "store/real.enc", "link.enc", "--json").json()
    assert (again["rewrapped"], again["unchanged"]) == (0, 2)


@pytest.mark.slow
def test_rewrap_of_a_current_file_writes_nothing(local_cli: CLI, tmp_path: Path) -> None:
    cli = local_cli
    cli.ok("keys", "create")
    (tmp_path / "plain").write_bytes(plaintext(2 * 1024 * 1024))
    store = tmp_path / "store"
    store.mkdir()
    cli.ok("encrypt", "-i", "plain", "-o", "store/a.enc")
    file_before = (store / "a.enc").stat()
    # A temporary copy made and deleted beside the file would change the
    # directory's modification time, even though the file itself is untouched.
    dir_before = store.stat().st_mtime_ns
    time.sleep(0.01)  # past the file system's timestamp granularity

    result = cli.ok("rewrap", "store/a.enc", "--json").json()
    assert result["files"] == [{"path": "store/a.enc", "rewrapped": False}]
    assert result["unchanged"] == 1
    file_after = (store / "a.enc").stat()
    assert (file_after.st_ino, file_after.st_mtime_ns) == (
        file_before.st_ino,
        file_before.st_mtime_ns,
    )
    assert store.stat().st_mtime_ns == dir_before
    assert sorted(p.name for p in store.iterdir()) == ["a.enc"]


@pytest.mark.slow
def test_moto_ignores_encx_database_url_but_not_the_flag(tmp_path: Path) -> None:
    real = tmp_path / "real.db"
    env = {**base_env(tmp_path), "ENCX_DATABASE_URL": f"sqlite:///{real}"}
    cli = CLI("moto", ["--kms", "moto", "--kek-alias", ALIAS], env, tmp_path)

    created = cli.ok("keys", "create", "--json").json()
    assert created["kek_version"] == 1
    assert str(real) not in created["database"]
    assert not real.exists()  # the user's database never saw moto's key
    assert not (tmp_path / "xdg-data").exists()  # nor did the default one

    flagged = tmp_path / "flagged.db"
    chosen = cli.ok("keys", "create", "--database", f"sqlite:///{flagged}", "--json").json()
    assert str(flagged) in chosen["database"]
    with contextlib.closing(sqlite3.connect(flagged)) as db:
        rows = db.execute("SELECT version FROM encx_kek_versions").fetchall()
    assert rows == [(1,)]
    assert not real.exists()


@pytest.mark.slow
def test_output_in_a_missing_directory_names_the_given_path(local_cli: CLI, tmp_path: Path) -> None:
    local_cli.ok("keys", "create")
    (tmp_path / "plain").write_bytes(b"x" * 1000)
    (tmp_path / "folder").mkdir()
    cases = [
        (["encrypt", "-i", "plain", "-o", "missing/dir/x.enc"], "missing/dir/x.enc"),
        (["encrypt", "-o", "missing/x.enc"], "missing/x.enc"),  # from stdin
        (["encrypt", "-i", "plain", "-o", "plain/x.enc"], "plain/x.enc"),  # parent is a file
        (["encrypt", "-i", "plain", "-o", "folder", "--force"], "folder"),
        (["decrypt", "-i", "plain", "-o", "missing/x"], "missing/x"),
    ]
    for args, named in cases:
        result = local_cli(*args, input=b"y" * 1000)
        assert result.code == ExitCode.IO, (args, result.stderr)
        error, _ = result.error_lines()
        assert error.startswith(f"encx-async: error: {named}"), error
        assert ".part" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert list((tmp_path / "folder").iterdir()) == []


@pytest.mark.slow
def test_interrupting_a_file_to_file_encrypt_exits_130_and_leaves_no_output(
    local_cli: CLI, tmp_path: Path
) -> None:
    local_cli.ok("keys", "create")
    with (tmp_path / "big").open("wb") as big:
        # Sparse: 4 GiB to encrypt (seconds of work even on a fast machine), none on disk.
        big.truncate(4 * 1024**3)
    process = subprocess.Popen(  # noqa: S603
        local_cli.command("encrypt", "-i", "big", "-o", "out"),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=local_cli.env,
    )
    assert process.stderr is not None
    try:
        deadline = time.monotonic() + TIMEOUT
        # Wait until the library is writing its temporary file: mid-work.
        while not any(p.name.startswith(".out.") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.02)
        time.sleep(0.3)
        assert process.poll() is None, "finished before it could be interrupted"
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = process.wait(timeout=10)
        waited = time.monotonic() - started
        stderr = process.stderr.read().decode()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert code == ExitCode.INTERRUPTED, stderr
    assert waited < 5, f"took {waited:.1f} s to stop"
    assert stderr.startswith("encx-async: error: interrupted\nhint: ")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


# -- demo, bench -----------------------------------------------------------------------


@pytest.mark.slow
def test_demo_runs_on_moto_from_the_installed_script(tmp_path: Path) -> None:
    cli = CLI("moto", [], base_env(tmp_path), tmp_path)
    result = cli.ok("demo", "--records", "20", script=True)
    assert "KMS calls saved: 38 of 40" in result.text
    assert "refused (DecryptionError)" in result.text


@pytest.mark.slow
def test_demo_json_counts_the_calls_saved(tmp_path: Path) -> None:
    cli = CLI("local", [], base_env(tmp_path), tmp_path)
    document = cli.ok("demo", "--kms", "local", "--records", "30", "--json").json()
    assert document["kms"] == "local"
    assert document["uncached"]["kms_calls"] == {"encrypt_dek": 30, "decrypt_dek": 30}
    assert document["cached"]["kms_calls"] == {"encrypt_dek": 1, "decrypt_dek": 1}
    assert document["saved_kms_calls"] == 58
    assert document["wrong_record_refused"] is True
    assert document["tampering_refused"] is True
    assert document["rotation"]["re_encrypt_calls"] == 1
    assert document["rotation"]["still_decrypts"] is True


@pytest.mark.slow
def test_bench_delegates_to_the_cache_benchmark(tmp_path: Path) -> None:
    cli = CLI("moto", [], base_env(tmp_path), ROOT)
    tiny = ["--records", "40", "--uncached-records", "20", "--round-trips", "20"]
    document = cli.ok("bench", *tiny, "--repeats", "1", "--skip-esdk", "--json").json()
    assert document["benchmark"] == "cache"
    assert document["records"] == 40
    assert set(document["runs"]) == {"uncached", "cached"}
    assert document["esdk_error"] is None
    assert document["round_trip_per_s"]["esdk_caching"] is None


# -- configuration, errors, interruption --------------------------------------------------


@pytest.mark.slow
def test_flags_beat_the_environment(tmp_path: Path) -> None:
    env = {
        "ENCX_KMS": "local",
        "ENCX_LOCAL_KEYS": str(tmp_path / "env-keys.json"),
        "ENCX_DATABASE_URL": f"sqlite:///{tmp_path / 'env.db'}",
        "ENCX_KEK_ALIAS": "alias/from-env",
    }
    cli = CLI("local", [], {**base_env(tmp_path), **env}, tmp_path)
    from_env = cli.ok("keys", "create", "--json").json()
    assert (from_env["kms"], from_env["alias"]) == ("local", "alias/from-env")
    assert (tmp_path / "env-keys.json").exists()
    # Flags after the command name, as well as before it, beat the variables.
    flagged = cli.ok("keys", "create", "--kek-alias", "alias/from-flag", "--json").json()
    assert flagged["alias"] == "alias/from-flag"
    other = cli(
        "--kms",
        "local",
        "--local-keys",
        str(tmp_path / "flag-keys.json"),
        "--database",
        f"sqlite:///{tmp_path / 'flag.db'}",
        "keys",
        "create",
        "--json",
        env={"ENCX_KMS": "aws"},
    )
    assert other.code == 0, other.stderr
    assert other.json()["kms"] == "local"
    assert (tmp_path / "flag-keys.json").exists()


@pytest.mark.slow
def test_bad_flags_and_settings_exit_2_without_usage_dump(local_cli: CLI) -> None:
    cases: list[tuple[list[str], Mapping[str, str]]] = [
        (["encrypt", "--bogus"], {}),
        (["keys"], {}),
        ([], {}),
        (["--kms", "azure", "keys", "describe"], {}),
        (["encrypt", "--context", "no-equals-sign"], {}),
        (["encrypt", "-o", "-", "--json"], {}),
    ]
    for args, env in cases:
        result = local_cli(*args, env=env)
        assert result.code == ExitCode.USAGE, (args, result.stderr)
        result.error_lines()
        assert "usage:" not in result.stderr
    bad_env = local_cli("keys", "describe", flags=False, env={"ENCX_KMS": "gcp"})
    assert bad_env.code == ExitCode.USAGE
    assert "ENCX_KMS" in bad_env.error_lines()[0]
    no_alias = CLI("local", [], local_cli.env, local_cli.cwd)("keys", "describe", "--kms", "local")
    assert no_alias.code == ExitCode.USAGE
    assert "ENCX_KEK_ALIAS" in no_alias.error_lines()[1]


@pytest.mark.slow
def test_unreachable_kms_exit_3(tmp_path: Path) -> None:
    flags = ["--kms", "aws", "--endpoint-url", "http://127.0.0.1:9", "--region", "us-east-1"]
    cli = CLI("aws", [*flags, "--kek-alias", ALIAS], base_env(tmp_path), tmp_path)
    result = cli("keys", "describe")
    assert result.code == ExitCode.SERVICE
    result.error_lines()


@pytest.mark.slow
def test_progress_is_drawn_on_request_only(local_cli: CLI, tmp_path: Path) -> None:
    local_cli.ok("keys", "create")
    data = plaintext(3 * 1024 * 1024)
    quiet = local_cli.ok("encrypt", "-o", "quiet.enc", input=data)
    assert quiet.stderr == ""  # stderr is not a terminal here
    drawn = local_cli.ok("encrypt", "-o", "drawn.enc", "--progress", input=data)
    assert "\rencrypt stdin: " in drawn.stderr
    assert "MiB" in drawn.stderr


@pytest.mark.slow
def test_interrupt_exits_130_and_leaves_no_output(local_cli: CLI, tmp_path: Path) -> None:
    local_cli.ok("keys", "create")
    process = subprocess.Popen(  # noqa: S603
        local_cli.command("encrypt", "-o", "out.enc"),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=local_cli.env,
    )
    assert process.stdin is not None
    assert process.stderr is not None
    try:
        process.stdin.write(plaintext(100_000))  # less than a chunk: it waits for more
        process.stdin.flush()
        deadline = time.monotonic() + TIMEOUT
        # Wait until the command has opened its output, so the signal finds it mid-work.
        while not any(p.name.startswith(".out.enc.") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=10)  # stdin is still open: the read is abandoned
        stderr = process.stderr.read().decode()
    finally:
        process.kill()
        process.wait()
        process.stdin.close()
        process.stderr.close()
    assert code == ExitCode.INTERRUPTED, stderr
    assert stderr.startswith("encx-async: error: interrupted\nhint: ")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


# -- in process: parsing, exit codes, progress ----------------------------------------------


def run_main(args: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for command in ("demo", "keys", "encrypt", "decrypt", "rewrap", "bench", "exit codes"):
        assert command in out
    code, out, _ = run_main(["--version"], capsys)
    assert (code, out.split()[0]) == (0, "encx-async")
    code, out, _ = run_main(["keys", "rotate", "--help"], capsys)
    assert code == 0
    assert "kms-managed" in out
    assert "--rotation" in out
    assert "--strategy" not in out  # deprecated: accepted, no longer offered


def test_usage_errors_are_one_line_and_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["decrypt", "--no-such-flag"], capsys)
    assert code == ExitCode.USAGE
    assert out == ""
    assert err == (
        "encx-async: error: unrecognized arguments: --no-such-flag\n"
        "hint: run 'encx-async decrypt --help'\n"
    )


def test_rewrap_refuses_a_concurrency_below_1_with_the_library_rule(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        check_concurrency(0)
    for value, reason in (("0", str(caught.value)), ("-3", str(caught.value)), ("x", "int")):
        code, out, err = run_main(["rewrap", "--concurrency", value, "a.enc"], capsys)
        assert code == ExitCode.USAGE
        assert out == ""
        error, hint = err.splitlines()
        assert error.startswith("encx-async: error: argument --concurrency: ")
        assert reason in error
        assert hint == "hint: run 'encx-async rewrap --help'"


def test_rotate_refuses_rotation_and_strategy_that_disagree(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    flags = ["--kms", "local", "--local-keys", str(tmp_path / "keys.json"), "--kek-alias", ALIAS]
    args = ["keys", "rotate", "--rotation", "kms-managed", "--strategy", "new-key"]
    code, out, err = run_main([*flags, *args], capsys)
    assert code == ExitCode.USAGE
    assert out == ""
    warning, error, hint = err.splitlines()
    assert warning.startswith("encx-async: warning: --strategy is deprecated")
    assert error == (
        "encx-async: error: --rotation kms-managed and --strategy new-key "
        "(its former name) disagree"
    )
    assert hint == "hint: pass --rotation only"
    assert not (tmp_path / "keys.json").exists()  # refused before the KMS was opened


def test_demo_without_moto_says_how_to_install_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "moto", None)
    monkeypatch.setitem(sys.modules, "moto.server", None)
    code, _, err = run_main(["demo"], capsys)
    assert code == ExitCode.USAGE
    assert 'pip install "encx-async[moto]"' in err
    assert "demo --kms local" in err  # what works without installing anything
    assert len(err.splitlines()) == 2


def test_no_region_names_the_region_flag(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "ENCX_KMS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    code, _, err = run_main(["--kek-alias", ALIAS, "keys", "describe"], capsys)
    assert code == ExitCode.USAGE
    assert err.splitlines()[0] == "encx-async: error: no AWS region is configured for the KMS"
    assert "pass --region REGION" in err
    assert "Config(" not in err  # library words, not the command line's


def test_missing_credentials_say_credentials(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, moto_endpoint: str
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_main(
        ["--endpoint-url", moto_endpoint, "--kek-alias", ALIAS, "keys", "describe"], capsys
    )
    assert code == ExitCode.SERVICE
    first, hint = err.splitlines()
    assert first.startswith("encx-async: error: no usable AWS credentials")
    assert hint.startswith("hint: no AWS credentials were found: pass --profile NAME")
    assert "--kms local --local-keys FILE" in hint


@pytest.mark.parametrize("command", [["decrypt", "-o", "out.txt"], ["rewrap", "a.enc"]])
def test_moto_refuses_data_from_another_command_up_front(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    code, _, err = run_main(["--kms", "moto", "--kek-alias", ALIAS, *command], capsys)
    assert code == ExitCode.USAGE
    first, hint = err.splitlines()
    assert "forgets its keys when the command ends" in first
    assert "--kms local --local-keys FILE" in hint


def test_bench_without_a_checkout_says_where_it_lives(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "benchmarks", None)
    monkeypatch.setitem(sys.modules, "benchmarks.cache", None)
    code, _, err = run_main(["bench", "--records", "1"], capsys)
    assert code == ExitCode.USAGE
    assert "source checkout" in err
    assert "hint: " in err


def test_parse_context() -> None:
    assert parse_context([]) is None
    assert parse_context(["a=b", "c=d=e", "empty="]) == {"a": "b", "c": "d=e", "empty": ""}
    for bad in (["novalue"], ["=v"], ["a=1", "a=2"]):
        with pytest.raises(CLIError) as caught:
            parse_context(bad)
        assert caught.value.code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DecryptionError("x"), ExitCode.DATA),
        (KeyVersionNotFoundError("x"), ExitCode.DATA),
        (ConfigurationError("x"), ExitCode.USAGE),
        (KMSKeyNotFoundError("x"), ExitCode.SERVICE),
        (KMSAccessDeniedError("x"), ExitCode.SERVICE),
        (KMSUnavailableError("x"), ExitCode.SERVICE),
        (DatabaseUnavailableError("x"), ExitCode.SERVICE),
        (KeyStoreCorruptError("x"), ExitCode.SERVICE),
        (FileNotFoundError(2, "No such file", "a.txt"), ExitCode.IO),
        (BrokenPipeError(32, "Broken pipe"), ExitCode.IO),
        (KeyboardInterrupt(), ExitCode.INTERRUPTED),
        (CLIError("x", hint="y", code=ExitCode.DATA), ExitCode.DATA),
        (RuntimeError("internal detail"), ExitCode.INTERNAL),
    ],
)
def test_each_failure_has_its_exit_code(error: BaseException, code: ExitCode) -> None:
    failure = describe_failure(error, command="encrypt")
    assert failure.code == code
    assert "\n" not in failure.message
    assert failure.hint


def test_unexpected_errors_do_not_echo_their_message() -> None:
    # An unexpected exception's text may hold anything, data included.
    failure = describe_failure(ValueError("secret-looking detail"), command="decrypt")
    assert "secret-looking" not in failure.message
    assert "--debug" in failure.hint


def test_rewrap_help_says_concurrency_covers_files(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["rewrap", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    concurrency = text[text.rindex("--concurrency N ") :].split("(default 16)")[0]
    assert "files or base64 lines" in concurrency


def test_errors_about_temporary_files_name_the_output(tmp_path: Path) -> None:
    out = str(tmp_path / "out.enc")
    for temp in (".out.enc.k2j3.part", ".out.enc.9f8e.rewrap", "..out.enc.9f8e.rewrap.x1.part"):
        with pytest.raises(PermissionError) as caught, naming(out):
            raise PermissionError(13, "Permission denied", str(tmp_path / temp))
        assert caught.value.filename == out
        assert caught.value.strerror == "Permission denied"
    # Other files keep their own names.
    for other in (str(tmp_path / "input"), str(tmp_path / ".other.part"), "/elsewhere/.out.enc.x"):
        with pytest.raises(FileNotFoundError) as missing, naming(out):
            raise FileNotFoundError(2, "No such file or directory", other)
        assert missing.value.filename == other


def test_atomic_output_and_replace_file_sync_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)

    async def write() -> None:
        async with atomic_output(str(tmp_path / "out")) as out:
            out.write(b"data")

    anyio.run(write)
    assert (tmp_path / "out").read_bytes() == b"data"
    assert synced == ["file", "dir"]  # the data, then the rename

    synced.clear()
    (tmp_path / "new").write_bytes(b"new")
    (tmp_path / "new").chmod(0o600)
    (tmp_path / "old").write_bytes(b"old")
    (tmp_path / "old").chmod(0o640)
    replace_file(tmp_path / "new", tmp_path / "old", mode_of=tmp_path / "old")
    assert (tmp_path / "old").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "old").stat().st_mode) == 0o640
    assert not (tmp_path / "new").exists()
    assert synced == ["dir"]


def test_progress_draws_counts_bytes_and_clears() -> None:
    stream = io.StringIO()
    with Progress("rewrap", 100, enabled=True, stream=stream) as progress:
        for _ in range(100):
            progress.advance()
    drawn = stream.getvalue()
    assert "\rrewrap: 0/100 (  0%)" in drawn
    assert "\rrewrap: 100/100 (100%)" in drawn
    assert drawn.endswith("\r")  # the line is wiped at the end

    stream = io.StringIO()
    with Progress("encrypt stdin", None, enabled=True, unit="bytes", stream=stream) as progress:
        progress.advance(3 * 1024 * 1024)
        time.sleep(0.11)
        progress.advance(1024)
    assert "3.0 MiB" in stream.getvalue()

    silent = io.StringIO()
    with Progress("x", 10, enabled=False, stream=silent) as progress:
        progress.advance(10)
    assert (silent.getvalue(), progress.done) == ("", 10)


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 5 * 1024**2, 3 * 1024**4)] == [
        "0 B",
        "1,023 B",
        "1.0 KiB",
        "5.0 MiB",
        "3,072.0 GiB",
    ]


@pytest.fixture(autouse=True)
def _no_stray_encx_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process tests see no ENCX_ settings of the developer's."""
    for name in list(os.environ):
        if name.startswith("ENCX_"):
            monkeypatch.delenv(name)
