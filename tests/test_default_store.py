"""The key-version database a Crypto gets when nobody chose one.

Each provider picks a store of its own, so two KMSs never share versions: an
in-memory LocalKMSService a store in memory, a file-backed one a file beside
its keys, an AWS KMSService a file per account, region and endpoint.
``database=`` and ``$ENCX_DATABASE_URL`` still come first.
"""

from __future__ import annotations

import shlex
import sqlite3
import subprocess
import sys
from functools import partial
from pathlib import Path

import anyio.to_thread
import pytest

from encx_async import Crypto, KMSKeyNotFoundError
from encx_async.providers.aws import Config, KMSService
from encx_async.providers.local import LocalKMSService
from tests.conftest import TEST_REGION
from tests.test_cli import base_env

ALIAS = "alias/default-store"
CTX = {"table": "t"}


def sqlite_path(url: str) -> Path:
    assert url.startswith("sqlite:///"), url
    return Path(url[len("sqlite:///") :])


async def test_in_memory_local_kms_twice_in_one_process(tmp_path: Path) -> None:
    for _ in range(2):
        async with (
            LocalKMSService() as kms,
            await Crypto.create(kms=kms, kek_alias=ALIAS, create_key_if_missing=True) as crypto,
        ):
            assert crypto.database_url == "sqlite:///:memory:"
            blob = await crypto.encrypt(b"x", context=CTX)
            assert await crypto.decrypt(blob, context=CTX) == b"x"
    assert not (tmp_path / "xdg-data").exists()


async def test_two_key_files_get_two_stores(tmp_path: Path) -> None:
    urls = []
    for name in ("a.json", "b.json"):
        async with (
            LocalKMSService(tmp_path / name) as kms,
            await Crypto.create(kms=kms, kek_alias=ALIAS, create_key_if_missing=True) as crypto,
        ):
            if name == "a.json":
                await crypto.rotate_kek()
            urls.append(crypto.database_url)
    assert [sqlite_path(url) for url in urls] == [
        tmp_path / "a.json.versions.db",
        tmp_path / "b.json.versions.db",
    ]
    # Reopened, each key file finds its own versions again.
    async with (
        LocalKMSService(tmp_path / "a.json") as kms,
        await Crypto.create(kms=kms, kek_alias=ALIAS) as crypto,
    ):
        assert crypto.kek_version == 2


async def test_explicit_database_and_environment_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = f"sqlite:///{tmp_path / 'explicit.db'}"
    from_env = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("ENCX_DATABASE_URL", from_env)
    async with LocalKMSService(tmp_path / "k.json") as kms:
        async with await Crypto.create(
            kms=kms, kek_alias=ALIAS, create_key_if_missing=True
        ) as crypto:
            assert crypto.database_url == from_env
        async with await Crypto.create(kms=kms, kek_alias=ALIAS, database=explicit) as crypto:
            assert crypto.database_url == explicit
    assert (tmp_path / "env.db").is_file()
    assert (tmp_path / "explicit.db").is_file()
    assert not (tmp_path / "k.json.versions.db").exists()


async def test_a_failed_first_call_leaves_no_database(tmp_path: Path) -> None:
    explicit = tmp_path / "sub" / "keys.db"
    async with LocalKMSService(tmp_path / "k.json") as kms:
        for database in (None, f"sqlite:///{explicit}"):
            with pytest.raises(KMSKeyNotFoundError) as caught:
                await Crypto.create(kms=kms, kek_alias=ALIAS, database=database)
            assert caught.value.database is None  # the alias is missing, not a stale version
    assert not (tmp_path / "k.json.versions.db").exists()
    assert not explicit.exists()


async def test_versions_of_another_kms_name_the_database(tmp_path: Path) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    async with (
        LocalKMSService() as first,
        await Crypto.create(
            kms=first, kek_alias=ALIAS, database=shared, create_key_if_missing=True
        ),
    ):
        pass
    async with LocalKMSService() as second:
        with pytest.raises(KMSKeyNotFoundError) as caught:
            await Crypto.create(kms=second, kek_alias=ALIAS, database=shared)
    assert caught.value.database == shared
    assert shared in str(caught.value)
    assert "database=" in str(caught.value)
    assert "ENCX_DATABASE_URL" in str(caught.value)


def _accounts(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT key_id FROM encx_kek_versions")]


@pytest.mark.slow
async def test_cli_local_and_aws_never_share_versions(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = base_env(tmp_path)
    keys = tmp_path / "dev.json"
    command = [sys.executable, "-m", "encx_async", "keys", "create", "--kms", "local"]
    run = partial(
        subprocess.run,
        [*command, "--local-keys", str(keys), "--kek-alias", ALIAS],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    done = await anyio.to_thread.run_sync(run)
    assert done.returncode == 0, done.stderr
    assert _accounts(tmp_path / "dev.json.versions.db")[0].count("-") == 4  # a local uuid

    # conftest gives this process the same XDG_DATA_HOME as the command had
    assert env["XDG_DATA_HOME"] == str(tmp_path / "xdg-data")
    config = Config(region=TEST_REGION, endpoint_url=moto_endpoint)
    async with (
        KMSService(config) as aws,
        await Crypto.create(kms=aws, kek_alias=ALIAS, create_key_if_missing=True) as crypto,
    ):
        path = sqlite_path(crypto.database_url)
        port = moto_endpoint.rsplit(":", 1)[1]
        assert path.parent.name == f"aws-123456789012-{TEST_REGION}-127.0.0.1_{port}"
        assert path.parent.parent == tmp_path / "xdg-data" / "encx-async"
        blob = await crypto.encrypt(b"x", context=CTX)
        assert await crypto.decrypt(blob, context=CTX) == b"x"
    assert all(key.startswith("arn:aws:kms:") for key in _accounts(path))

    # Once the alias exists, the same store is found through its ARN (no STS).
    async with (
        KMSService(config) as aws,
        await Crypto.create(kms=aws, kek_alias=ALIAS) as crypto,
    ):
        assert sqlite_path(crypto.database_url) == path


def test_hinted_command_is_one_that_works(tmp_path: Path) -> None:
    """A new key file: list-versions says there is nothing yet, and its hint runs."""
    env = {**base_env(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def run(words: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 (our own interpreter, fixed arguments)
            [sys.executable, "-m", "encx_async", *words],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    flags = ["--kms", "local", "--local-keys", "new keys.json", "--kek-alias", ALIAS]
    listed = run(["keys", "list-versions", *flags])
    assert listed.returncode == 0, listed.stderr
    assert "no KEK versions" in listed.stdout
    assert "new keys.json.versions.db" in listed.stdout
    hint = listed.stdout.splitlines()[-1].removeprefix("create it with: ")
    described = run(["keys", "describe", *flags])
    assert described.returncode == 3
    assert described.stderr.splitlines()[1] == f"hint: create it with: {hint}"
    assert not (tmp_path / "new keys.json.versions.db").exists()

    words = shlex.split(hint)
    assert words[:3] == ["encx-async", "keys", "create"]
    created = run(words[1:])
    assert created.returncode == 0, created.stderr
    listed = run(["keys", "list-versions", *flags])
    assert listed.returncode == 0, listed.stderr
    assert "1 version(s)" in listed.stdout
