"""A Crypto nobody closed never holds the process open, and says so; the SQLite
key store runs under any anyio backend."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import anyio
import pytest

from encx_async import ClosedError, ConfigurationError, Crypto, DEKCache, KMSKeyNotFoundError
from encx_async._keystore._sqlite import SQLiteKeyStore
from encx_async.providers.local import LocalKMSService

ROOT = Path(__file__).resolve().parent.parent

FORGETFUL = """
import asyncio

from encx_async import Crypto, DEKCache
from encx_async.providers.local import LocalKMSService


async def main() -> None:
    kms = LocalKMSService()
    await kms.__aenter__()
    await kms.create_key("forgotten", alias="alias/forgotten")
    # No `async with`, no aclose(): the mistake this test is about.
    crypto = await Crypto.create(
        kms=kms, kek_alias="alias/forgotten", database=DATABASE, dek_cache=DEKCache()
    )
    await crypto.decrypt(await crypto.encrypt(b"hello"))


asyncio.run(main())
print("main returned")
"""


@pytest.mark.slow
def test_a_forgotten_crypto_lets_the_process_exit_and_warns(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'keys.db'}"
    script = f"DATABASE = {database!r}\n" + textwrap.dedent(FORGETFUL)
    completed = subprocess.run(  # noqa: S603 (our own interpreter, a fixed script)
        [sys.executable, "-W", "default::ResourceWarning", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,  # a thread keeping the process alive fails the test, not the run
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "main returned"
    assert "ResourceWarning: unclosed <Crypto kek_alias='alias/forgotten'" in completed.stderr
    assert "aclose()" in completed.stderr


def test_a_crypto_that_failed_to_open_does_not_warn(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import asyncio

        from encx_async import Crypto, KMSKeyNotFoundError
        from encx_async.providers.local import LocalKMSService


        async def main() -> None:
            async with LocalKMSService() as kms:
                try:
                    await Crypto.create(kms=kms, kek_alias="alias/none", database=DATABASE)
                except KMSKeyNotFoundError:
                    print("refused")


        asyncio.run(main())
        """
    )
    database = f"sqlite:///{tmp_path / 'keys.db'}"
    completed = subprocess.run(  # noqa: S603 (our own interpreter, a fixed script)
        [
            sys.executable,
            "-W",
            "error::ResourceWarning",
            "-c",
            f"DATABASE = {database!r}\n{script}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "refused"
    assert "ResourceWarning" not in completed.stderr


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_sqlite_store_runs_under_any_anyio_backend(tmp_path: Path, backend: str) -> None:
    async def new_key(current: object) -> str:
        return "key-2" if current is not None else "key-1"

    async def scenario() -> list[tuple[int, str, str]]:
        store = SQLiteKeyStore.from_url(f"sqlite:///{tmp_path / 'keys.db'}")
        await store.open()
        try:
            await store.initial_version("alias/any", new_key)
            await store.next_version("alias/any", new_key)
            await store.set_state("alias/any", 1, "retired")
            return [(v.version, v.key_id, v.state) for v in await store.versions("alias/any")]
        finally:
            await store.aclose()

    assert anyio.run(scenario, backend=backend) == [
        (1, "key-1", "retired"),
        (2, "key-2", "active"),
    ]


async def test_a_cancelled_write_rolls_back_and_leaves_the_store_usable(tmp_path: Path) -> None:
    store = SQLiteKeyStore.from_url(f"sqlite:///{tmp_path / 'keys.db'}")
    await store.open()
    try:

        async def slow_key(current: object) -> str:
            await anyio.sleep(10)
            return "never"

        async def first_key(current: object) -> str:
            return "key-1"

        await store.initial_version("alias/c", first_key)
        with anyio.move_on_after(0.05):  # level cancellation, as trio has it
            await store.next_version("alias/c", slow_key)

        # The rollback ran although the scope stayed cancelled: a new write works.
        async def second_key(current: object) -> str:
            return "key-2"

        created = await store.next_version("alias/c", second_key)
        assert (created.version, created.key_id) == (2, "key-2")
    finally:
        await store.aclose()


async def test_async_with_crypto_opens_and_closes_it() -> None:
    async with LocalKMSService() as kms:
        await kms.create_key("lifecycle", alias="alias/lifecycle")
        with pytest.raises(ConfigurationError, match="kek_alias"):
            Crypto(kms=kms, kek_alias="")  # the settings are checked at once, before any I/O
        with pytest.raises(TypeError, match=r"database must be a URL.*not int"):
            Crypto(kms=kms, kek_alias="alias/lifecycle", database=42)
        crypto = Crypto(kms=kms, kek_alias="alias/lifecycle", dek_cache=DEKCache())
        assert "not open" in repr(crypto)
        with pytest.raises(ClosedError, match="not open"):
            await crypto.encrypt(b"too early")
        with pytest.raises(ClosedError, match="not open"):
            _ = crypto.kek_version
        with pytest.raises(ClosedError, match="not open"):
            _ = crypto.database_url
        async with crypto as opened:
            assert opened is crypto
            blob = await crypto.encrypt(b"inside", context={"t": "1"})
            assert await crypto.decrypt(blob, context={"t": "1"}) == b"inside"
            assert crypto.kek_version == 1
        with pytest.raises(ClosedError, match="closed"):
            await crypto.encrypt(b"after")
        with pytest.raises(ClosedError, match="closed"):
            async with crypto:  # once closed, closed for good
                pass
        # create() is the same thing for code without a context manager.
        created = await Crypto.create(kms=kms, kek_alias="alias/lifecycle")
        async with created:
            assert await created.decrypt(await created.encrypt(b"x")) == b"x"


def test_a_crypto_never_opened_does_not_warn() -> None:
    # A warning from __del__ cannot propagate, so record it instead of raising it.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crypto = Crypto(kms=LocalKMSService(), kek_alias="alias/never")
        del crypto
        gc.collect()
        opened = Crypto(kms=LocalKMSService(), kek_alias="alias/never")
        opened._closed = False  # what a successful open leaves: this one must warn
        del opened
        gc.collect()
    unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(unclosed) == 1, unclosed  # the opened one only


async def test_a_crypto_that_failed_to_open_frees_its_cache_for_the_next_try() -> None:
    cache = DEKCache()
    async with LocalKMSService() as kms:
        failed = Crypto(kms=kms, kek_alias="alias/later", dek_cache=cache)
        with pytest.raises(KMSKeyNotFoundError):
            async with failed:  # no such alias yet
                pass
        with pytest.raises(ClosedError, match="failed to open") as caught:
            await failed.encrypt(b"x")
        assert "make a new Crypto" in str(caught.value)
        with pytest.raises(ClosedError, match="failed to open"):
            _ = failed.kek_version
        await kms.create_key("later", alias="alias/later")
        async with Crypto(kms=kms, kek_alias="alias/later", dek_cache=cache) as retry:
            assert await retry.decrypt(await retry.encrypt(b"x")) == b"x"
            with pytest.raises(ConfigurationError, match="serves one Crypto"):
                Crypto(kms=kms, kek_alias="alias/later", dek_cache=cache)  # still one at a time
