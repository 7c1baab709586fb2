"""The entry point: parse, run one command, report, exit."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._args import build_parser, parse
from ._bench import bench
from ._commands import (
    decrypt,
    encrypt,
    keys_create,
    keys_describe,
    keys_list_versions,
    keys_rotate,
    rewrap,
)
from ._demo import demo
from ._errors import CLIError, ExitCode, describe_failure
from ._output import Report, emit, emit_failure

__all__ = ["main"]

Handler = Callable[..., Awaitable[Report]]

_HANDLERS: dict[str, Any] = {
    "demo": demo,
    "keys create": keys_create,
    "keys describe": keys_describe,
    "keys rotate": keys_rotate,
    "keys list-versions": keys_list_versions,
    "encrypt": encrypt,
    "decrypt": decrypt,
    "rewrap": rewrap,
    "bench": bench,
}


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _silence_stdout() -> None:
    """After a broken pipe, keep the interpreter's final flush from failing again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``encx-async`` with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_HANDLERS)
    try:
        namespace, settings, extra = parse(parser, arguments)
    except CLIError as exc:
        emit_failure(describe_failure(exc, command=""))
        return int(exc.code)
    except SystemExit as exc:  # --help and --version end here, with status 0
        return exc.code if isinstance(exc.code, int) else 0
    command: str = namespace.command_path
    if settings.debug:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
        # The library's own loggers only: they never log key material.
        logging.getLogger("encx_async").setLevel(logging.DEBUG)
    try:
        if command == "bench":
            return bench(extra)
        report: Report = asyncio.run(namespace.handler(namespace, settings))
        emit(report, json_mode=settings.json)
    except BaseException as raised:
        cause = _leaf(raised)
        if isinstance(cause, SystemExit):
            return cause.code if isinstance(cause.code, int) else int(cause.code is not None)
        if not isinstance(cause, Exception | KeyboardInterrupt):
            raise
        failure = describe_failure(cause, command=command)
        if isinstance(cause, BrokenPipeError):
            _silence_stdout()
        if settings.debug and not isinstance(cause, KeyboardInterrupt):
            traceback.print_exception(raised, file=sys.stderr)
        emit_failure(failure)
        return int(failure.code)
    return int(ExitCode.OK)
