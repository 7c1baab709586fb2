"""Opening the KMS provider and the Crypto that the settings describe."""

from __future__ import annotations

import contextlib
import shlex
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread

from encx_async._crypto import Crypto
from encx_async._exceptions import KMSKeyNotFoundError
from encx_async._keystore import default_database_url, redact_url
from encx_async._keystore._default import resolve_database
from encx_async.kms import KeyManagementService

from ._args import Settings
from ._errors import CLIError, ExitCode

__all__ = [
    "MOTO_HINT",
    "NoKeyError",
    "Target",
    "create_command",
    "describe_key",
    "open_crypto",
    "open_kms",
    "start_moto",
]

MOTO_HINT = (
    'pip install "encx-async[moto]" (moto with its server extra), or try '
    "'encx-async demo --kms local', which needs nothing else"
)


@dataclass(frozen=True, slots=True)
class Target:
    """An open KMS provider, and what to tell the user about it."""

    kms: KeyManagementService
    kind: str
    region: str | None
    endpoint_url: str | None
    #: the key-version database to use: a URL, or None for the library's default
    database: str | None

    def as_json(self) -> dict[str, Any]:
        database = self.database or default_database_url()
        return {
            "kms": self.kind,
            "region": self.region,
            "endpoint_url": self.endpoint_url,
            "database": redact_url(database),
        }


@contextlib.asynccontextmanager
async def start_moto() -> AsyncIterator[str]:
    """moto's server in this process, on 127.0.0.1; yields its URL."""
    from encx_async._moto import MotoServer

    server = MotoServer()
    try:
        # The server thread takes a moment to bind and answer: not on the loop.
        endpoint: str = await anyio.to_thread.run_sync(server.start)
    except ImportError as exc:
        raise CLIError(
            f"the moto KMS needs moto, which is not installed (no module {exc.name!r})",
            hint=MOTO_HINT,
        ) from exc
    try:
        yield endpoint
    finally:
        await anyio.to_thread.run_sync(server.stop)


@contextlib.asynccontextmanager
async def temporary_database() -> AsyncIterator[str]:
    """A SQLite key-version database in a directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="encx-async-") as directory:
        yield "sqlite:///" + str(Path(directory) / "keys.db")


@contextlib.asynccontextmanager
async def open_kms(settings: Settings) -> AsyncIterator[Target]:
    """The provider ``settings`` names, open; closed (and moto stopped) on exit."""
    async with contextlib.AsyncExitStack() as stack:
        database = settings.database
        if settings.kms == "local":
            from encx_async.providers.local import LocalKMSService

            if not settings.local_keys:
                raise CLIError(
                    "--kms local needs a key file",
                    hint="pass --local-keys PATH or set ENCX_LOCAL_KEYS "
                    "(an in-memory local KMS would forget its keys when the command ends)",
                )
            local = await stack.enter_async_context(LocalKMSService(settings.local_keys))
            yield Target(local, "local", local.region, None, database)
            return
        from encx_async.providers.aws import Config, KMSService

        endpoint = settings.endpoint_url
        if settings.kms == "aws" and not settings.region and not _configured_region(settings):
            raise CLIError(
                "no AWS region is configured for the KMS",
                hint="pass --region REGION, or set AWS_REGION (or a region in the profile "
                "named by --profile or AWS_PROFILE)",
            )
        if settings.kms == "moto":
            endpoint = await stack.enter_async_context(start_moto())
            if database is None:
                database = await stack.enter_async_context(temporary_database())
        config = Config(region=settings.region, endpoint_url=endpoint, profile=settings.profile)
        aws = await stack.enter_async_context(KMSService(config))
        yield Target(aws, settings.kms, aws.region or settings.region, endpoint, database)


def _configured_region(settings: Settings) -> str | None:
    """The region botocore finds for the profile, as KMSService will look it up."""
    from aiobotocore.session import AioSession
    from botocore.exceptions import ProfileNotFound

    try:
        region: str | None = AioSession(profile=settings.profile).get_config_variable("region")
    except ProfileNotFound:
        return "unknown"  # the KMS service reports the missing profile itself
    return region


class NoKeyError(CLIError):
    """The alias is in neither the KMS nor the key-version database: nothing to use yet."""

    def __init__(self, message: str, *, hint: str, alias: str, database: str) -> None:
        super().__init__(message, hint=hint, code=ExitCode.SERVICE)
        self.alias = alias
        self.database = database


def create_command(settings: Settings, alias: str) -> str:
    """The ``keys create`` command line for the KMS and database of ``settings``."""
    words = ["encx-async", "keys", "create", "--kms", settings.kms]
    for flag, value in (
        ("--local-keys", settings.local_keys if settings.kms == "local" else None),
        ("--region", settings.region if settings.kms != "local" else None),
        ("--endpoint-url", settings.endpoint_url if settings.kms == "aws" else None),
        ("--profile", settings.profile if settings.kms != "local" else None),
        ("--database", settings.database),
    ):
        if value:
            words += [flag, value]
    words += ["--kek-alias", alias]
    return shlex.join(words)


async def open_crypto(
    target: Target, alias: str, settings: Settings, *, create: bool = False
) -> Crypto:
    """A Crypto for ``alias`` on ``target`` (the caller closes it).

    A missing key, or versions naming keys this KMS lacks, end as errors that
    name the command line's flags and a command that works when typed.
    """
    try:
        return await Crypto.create(
            kms=target.kms,
            kek_alias=alias,
            database=target.database,
            create_key_if_missing=create,
        )
    except KMSKeyNotFoundError as exc:
        if exc.database is not None:
            raise CLIError(
                f"the key-version database {exc.database} records {alias} under a KMS key "
                "this KMS does not have: it was written with another KMS, account, region "
                "or --local-keys file, or the key was deleted",
                hint="pass the --database that belongs to this KMS, or leave --database and "
                "ENCX_DATABASE_URL unset to use this KMS's own",
                code=ExitCode.SERVICE,
            ) from exc
        database = redact_url(str(await resolve_database(target.database, target.kms, alias)))
        raise NoKeyError(
            f"{alias} has no KEK versions in {database}, and the KMS has no such key",
            hint=f"create it with: {create_command(settings, alias)}",
            alias=alias,
            database=database,
        ) from exc


async def describe_key(target: Target, key_id: str) -> dict[str, object]:
    """``describe_key`` of the bundled providers (not part of the KMS protocol)."""
    describe = getattr(target.kms, "describe_key", None)
    if describe is None:  # pragma: no cover - both bundled providers have it
        return {"key_id": key_id}
    result: dict[str, object] = await describe(key_id)
    return result
