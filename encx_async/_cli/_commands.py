"""The commands that work on a KEK: keys, encrypt, decrypt, rewrap.

Each takes the parsed arguments and the resolved settings and returns a
:class:`~encx_async._cli._output.Report`; failures are exceptions, turned into
one error line and an exit code by the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from encx_async._crypto import Crypto, Rotation
from encx_async._keystore import KEKVersion
from encx_async._ordered import ordered_map
from encx_async._progress import Progress, format_bytes
from encx_async._stream import read_file_header
from encx_async._table import table

from ._args import Settings, parse_context
from ._errors import CLIError, ExitCode, describe_failure
from ._io import (
    STDIO,
    atomic_output,
    check_output,
    file_size,
    naming,
    read_file_chunks,
    read_stdin,
    replace_file,
    stdin_lines,
    stdin_size,
    stdout_is_terminal,
    write_chunks,
    write_stdout,
)
from ._kms import NoKeyError, Target, describe_key, open_crypto, open_kms
from ._output import Report, emit_warning

__all__ = [
    "decrypt",
    "encrypt",
    "keys_create",
    "keys_describe",
    "keys_list_versions",
    "keys_rotate",
    "rewrap",
]

T = TypeVar("T")

#: rewrapped base64 lines are written to stdout in batches of about this many bytes
_LINES_BATCH = 64 * 1024


@contextlib.asynccontextmanager
async def _crypto(
    settings: Settings, *, create: bool = False
) -> AsyncIterator[tuple[Target, Crypto]]:
    """The KMS and a Crypto for the settings' alias; both closed on exit.

    On ``--kms moto`` the KMS is new and empty each time, so the key is created
    whatever the command: the point there is to try the commands out.
    """
    alias = settings.alias()
    async with open_kms(settings) as target:
        create = create or target.kind == "moto"
        async with await open_crypto(target, alias, settings, create=create) as crypto:
            yield dataclasses.replace(target, database=crypto.database_url), crypto


def _version_json(version: KEKVersion, current: int) -> dict[str, Any]:
    return {
        "version": version.version,
        "key_id": version.key_id,
        "state": version.state,
        "current": version.version == current,
        "created_at": version.created_at.isoformat(),
        "updated_at": version.updated_at.isoformat(),
    }


# -- keys ----------------------------------------------------------------------------


async def keys_create(args: argparse.Namespace, settings: Settings) -> Report:
    async with _crypto(settings, create=True) as (target, crypto):
        created = crypto.stats().kms_calls.get("create_key", 0) > 0
        data = {
            "alias": crypto.kek_alias,
            "created": created,
            "kek_version": crypto.kek_version,
            "key_id": crypto.key_id,
            **target.as_json(),
        }
    if created:
        text = (
            f"created KMS key {data['key_id']} with alias {data['alias']}: "
            f"KEK version {data['kek_version']}"
        )
    else:
        text = (
            f"{data['alias']} exists already: KEK version {data['kek_version']} "
            f"is KMS key {data['key_id']}"
        )
    return Report(data, text)


async def keys_describe(args: argparse.Namespace, settings: Settings) -> Report:
    async with _crypto(settings) as (target, crypto):
        key = await describe_key(target, crypto.key_id)
        versions = crypto.kek_versions()
        data = {
            "alias": crypto.kek_alias,
            "kek_version": crypto.kek_version,
            "versions": len(versions),
            "key_id": key.get("key_id"),
            "arn": key.get("arn"),
            "enabled": key.get("enabled"),
            "key_state": key.get("key_state"),
            **target.as_json(),
        }
    where = f"{data['kms']}" + (f", region {data['region']}" if data["region"] else "")
    if data["endpoint_url"]:
        where += f", endpoint {data['endpoint_url']}"
    text = "\n".join(
        (
            f"alias:       {data['alias']}",
            f"KEK version: {data['kek_version']} (current) of {data['versions']}",
            f"KMS key:     {data['arn']}",
            f"key state:   {data['key_state']}" + ("" if data["enabled"] else " (not enabled)"),
            f"KMS:         {where}",
            f"database:    {data['database']}",
        )
    )
    return Report(data, text)


def _rotation(args: argparse.Namespace) -> Rotation:
    """--rotation, or --strategy (its deprecated former name); new-key by default."""
    rotation: Rotation | None = args.rotation
    strategy: Rotation | None = args.strategy
    if strategy is None:
        return rotation or "new-key"
    emit_warning("--strategy is deprecated: use --rotation, which takes the same values")
    if rotation is not None and rotation != strategy:
        raise CLIError(
            f"--rotation {rotation} and --strategy {strategy} (its former name) disagree",
            hint="pass --rotation only",
        )
    return strategy


async def keys_rotate(args: argparse.Namespace, settings: Settings) -> Report:
    rotation = _rotation(args)
    async with _crypto(settings) as (target, crypto):
        previous = crypto.kek_version
        rotated = await crypto.rotate_kek(rotation=rotation)
        data = {
            "alias": crypto.kek_alias,
            "rotation": rotation,
            # The former name of "rotation", for scripts that read it; deprecated.
            "strategy": rotation,
            "previous_version": previous,
            "kek_version": rotated.version,
            "key_id": rotated.key_id,
            **target.as_json(),
        }
    text = (
        f"rotated {data['alias']} ({rotation}): KEK version {previous} -> "
        f"{rotated.version}, KMS key {rotated.key_id}\n"
        "new data is encrypted under the new version; older data still decrypts "
        "('encx-async rewrap' moves it)"
    )
    return Report(data, text)


async def keys_list_versions(args: argparse.Namespace, settings: Settings) -> Report:
    try:
        async with _crypto(settings) as (target, crypto):
            current = crypto.kek_version
            versions = crypto.kek_versions()
            data = {
                "alias": crypto.kek_alias,
                "kek_version": current,
                "versions": [_version_json(v, current) for v in versions],
                **target.as_json(),
            }
    except NoKeyError as exc:
        # An empty list is an answer, not a failure; the next step goes with it.
        data = {"alias": exc.alias, "kek_version": None, "versions": [], "database": exc.database}
        return Report(data, f"no KEK versions of {exc.alias} in {exc.database}\n{exc.hint}")
    rows = [
        [
            f"{v.version}{' *' if v.version == current else ''}",
            v.state,
            v.key_id,
            v.created_at.isoformat(timespec="seconds"),
        ]
        for v in versions
    ]
    text = table(["VERSION", "STATE", "KMS KEY", "CREATED"], rows)
    return Report(data, f"{text}\n(* = current; {len(versions)} version(s) of {data['alias']})")


# -- encrypt and decrypt -------------------------------------------------------------


async def _check_data_args(args: argparse.Namespace, settings: Settings, operation: str) -> None:
    if args.output == STDIO:
        if settings.json:
            raise CLIError(
                f"--json needs -o PATH: stdout carries the {operation}ed data",
                hint="write the data to a file with -o PATH, or drop --json",
            )
        if operation == "encrypt" and stdout_is_terminal():
            raise CLIError(
                "refusing to write binary ciphertext to a terminal",
                hint="pass -o PATH or redirect stdout to a file or a pipe",
            )
    else:
        await anyio.to_thread.run_sync(
            partial(check_output, args.output, force=args.force, source=args.input)
        )
    if args.input != STDIO and not await anyio.Path(args.input).is_file():
        # Before any KMS call: the most common mistake costs nothing.
        raise FileNotFoundError(2, "no such file", args.input)


async def _run_ticking(progress: Progress, job: Awaitable[T]) -> T:
    """Await ``job``, redrawing ``progress`` (elapsed time) until it is done."""

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.1)
            progress.advance(0)

    ticker = asyncio.create_task(tick())
    try:
        return await job
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


async def _transform(args: argparse.Namespace, settings: Settings, operation: str) -> Report:
    """encrypt or decrypt, between any mix of files and stdio."""
    await _check_data_args(args, settings, operation)
    context = parse_context(args.context)
    aad = None if args.aad is None else args.aad.encode("utf-8")
    src, dst = args.input, args.output
    size = stdin_size() if src == STDIO else await file_size(src)
    label = f"{operation} {'stdin' if src == STDIO else src}"
    async with _crypto(settings) as (target, crypto):
        if src != STDIO and dst != STDIO:
            # The library does the whole file in one worker thread, atomically;
            # all that can be shown meanwhile is the time it takes.
            what = f"{label} ({format_bytes(size or 0)})"
            with Progress(what, None, enabled=settings.progress, unit="seconds") as progress:
                method = crypto.encrypt_file if operation == "encrypt" else crypto.decrypt_file
                # encrypt_file counts the plaintext read, decrypt_file the ciphertext.
                with naming(dst):
                    read = await _run_ticking(progress, method(src, dst, context=context, aad=aad))
            written = await file_size(dst)
        else:
            with Progress(label, size, enabled=settings.progress, unit="bytes") as progress:
                source = (
                    read_stdin(progress.advance)
                    if src == STDIO
                    else read_file_chunks(src, progress.advance)
                )
                start = crypto.encrypt_stream if operation == "encrypt" else crypto.decrypt_stream
                async with aclosing(start(source, context=context, aad=aad)) as chunks:
                    if dst == STDIO:
                        written = await write_chunks(chunks, None)
                    else:
                        async with atomic_output(dst) as out:
                            written = await write_chunks(chunks, out)
                read = progress.done
        stats = crypto.stats()
        data: dict[str, Any] = {
            "operation": operation,
            "input": src,
            "output": dst,
            "bytes_read": read,
            "bytes_written": written,
            "alias": crypto.kek_alias,
            "kms_calls": dict(stats.kms_calls),
            **target.as_json(),
        }
        if operation == "encrypt":
            data["kek_version"] = crypto.kek_version
    if dst == STDIO:
        return Report(data, None)
    done = "encrypted" if operation == "encrypt" else "decrypted and authenticated"
    source_name = "stdin" if src == STDIO else src
    return Report(
        data,
        f"{done} {source_name} ({format_bytes(read)}) into {dst} ({format_bytes(written)})",
    )


async def encrypt(args: argparse.Namespace, settings: Settings) -> Report:
    return await _transform(args, settings, "encrypt")


async def decrypt(args: argparse.Namespace, settings: Settings) -> Report:
    _refuse_moto_for_old_data(settings, "decrypt")
    return await _transform(args, settings, "decrypt")


def _refuse_moto_for_old_data(settings: Settings, command: str) -> None:
    """--kms moto cannot read what another command wrote: say so before trying."""
    if settings.kms == "moto":
        raise CLIError(
            f"--kms moto cannot {command} data from another command: it starts an empty "
            "KMS inside each command and forgets its keys when the command ends",
            hint="use --kms local --local-keys FILE for keys that outlive a command, or "
            "'encx-async demo' for a round trip inside one command",
        )


# -- rewrap --------------------------------------------------------------------------


async def rewrap(args: argparse.Namespace, settings: Settings) -> Report:
    _refuse_moto_for_old_data(settings, "rewrap")
    files: list[str] = args.files
    context = parse_context(args.context)
    if not files or files == [STDIO]:
        if settings.json:
            raise CLIError(
                "--json needs files: with base64 lines, stdout carries the rewrapped lines",
                hint="give the ciphertext files as arguments, or drop --json",
            )
        return await _rewrap_lines(settings, context, args.concurrency)
    if STDIO in files:
        raise CLIError(
            "'-' (stdin) cannot be mixed with files",
            hint="rewrap files and base64 lines in separate runs",
        )
    for path in files:
        if not await anyio.Path(path).is_file():
            raise FileNotFoundError(2, "no such file", path)
    return await _rewrap_files(settings, files, context, args.concurrency)


async def _rewrap_one(crypto: Crypto, path: str, context: Mapping[str, str] | None) -> bool:
    """Rewrap the file ``path`` in place: replaced atomically, its mode kept.

    A symlink's target is what gets rewritten (the link stays a link), and a
    file already on the current KEK version is not written at all.
    """
    target = await anyio.to_thread.run_sync(Path(path).resolve)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.rewrap")
    try:
        with naming(str(target)):
            envelope = await anyio.to_thread.run_sync(read_file_header, target)
            if envelope.kek_version == crypto.kek_version:
                return False
            changed = await crypto.rewrap_file(target, temp, context=context)
            if changed:
                await anyio.to_thread.run_sync(partial(replace_file, temp, target, mode_of=target))
        return changed
    except Exception as exc:
        if isinstance(exc, CLIError):
            raise
        # Say which file failed; the code and hint stay those of the cause.
        failure = describe_failure(exc, command="rewrap")
        message = failure.message
        if isinstance(exc, OSError) and exc.filename == str(target) and exc.strerror:
            message = exc.strerror  # the path is said once, as the user gave it
        raise CLIError(f"{path}: {message}", hint=failure.hint, code=failure.code) from exc
    finally:
        # What a failure left (or a copy, had the file moved to the current
        # version between the header check and the rewrap).
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)


async def _rewrap_files(
    settings: Settings, files: list[str], context: Mapping[str, str] | None, concurrency: int
) -> Report:
    results: list[dict[str, Any]] = []
    async with _crypto(settings) as (target, crypto):
        with Progress("rewrap", len(files), enabled=settings.progress) as progress:

            async def one(path: str) -> bool:
                return await _rewrap_one(crypto, path, context)

            changes = ordered_map(files, one, concurrency=concurrency)
            async with aclosing(changes):
                async for changed in changes:
                    results.append({"path": files[len(results)], "rewrapped": changed})
                    progress.advance()
        data = {
            "alias": crypto.kek_alias,
            "kek_version": crypto.kek_version,
            "files": results,
            "rewrapped": sum(1 for r in results if r["rewrapped"]),
            "unchanged": sum(1 for r in results if not r["rewrapped"]),
            "kms_calls": dict(crypto.stats().kms_calls),
            **target.as_json(),
        }
    text = (
        f"rewrapped {data['rewrapped']} file(s) to KEK version {data['kek_version']} of "
        f"{data['alias']}; {data['unchanged']} already on it"
    )
    return Report(data, text)


async def _numbered_lines() -> AsyncGenerator[tuple[int, bytes], None]:
    """``(line number, line)`` for each non-blank line of stdin."""
    number = 0
    async for line in stdin_lines():
        number += 1
        stripped = line.strip()
        if stripped:
            yield number, stripped


async def _rewrap_lines(
    settings: Settings, context: Mapping[str, str] | None, concurrency: int
) -> Report:
    """Base64 ciphertexts, one per line on stdin, to base64 lines on stdout, in order."""
    numbers: deque[int] = deque()  # line numbers of the blobs not yet yielded back

    async def blobs() -> AsyncGenerator[bytes, None]:
        async with aclosing(_numbered_lines()) as lines:
            async for number, line in lines:
                try:
                    blob = base64.b64decode(line, validate=True)
                except (binascii.Error, ValueError):
                    raise CLIError(
                        f"line {number} of stdin is not base64",
                        hint="give one base64 ciphertext per line",
                        code=ExitCode.DATA,
                    ) from None
                numbers.append(number)
                yield blob

    pending: list[bytes] = []
    pending_size = 0
    async with _crypto(settings) as (_target, crypto):
        with Progress("rewrap", None, enabled=settings.progress) as progress:
            results = crypto.rewrap_many(blobs(), context=context, concurrency=concurrency)
            try:
                async with aclosing(results):
                    async for blob in results:
                        numbers.popleft()
                        line = base64.b64encode(blob) + b"\n"
                        pending.append(line)
                        pending_size += len(line)
                        progress.advance()
                        if pending_size >= _LINES_BATCH:
                            await write_stdout(b"".join(pending))
                            pending.clear()
                            pending_size = 0
            except Exception as exc:
                if isinstance(exc, CLIError) or not numbers:
                    raise
                # ordered_map raises where the failed line's result would come.
                failure = describe_failure(exc, command="rewrap")
                raise CLIError(
                    f"line {numbers[0]} of stdin: {failure.message}",
                    hint=failure.hint,
                    code=failure.code,
                ) from exc
            finally:
                # What was rewrapped before a failure still reaches stdout.
                if pending:
                    await write_stdout(b"".join(pending))
    return Report({}, None)
