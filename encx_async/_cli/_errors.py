"""Exit codes, and what the command line says about each kind of failure.

Every failure ends as one ``encx-async: error: ...`` line on stderr, one
``hint: ...`` line, and an exit code from :class:`ExitCode`. The messages are
the library's, which name aliases, key ids, regions and sizes, never key
material or plaintext.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from encx_async._exceptions import (
    ConfigurationError,
    DatabaseUnavailableError,
    DecryptionError,
    EncryptionError,
    InvalidHashError,
    InvalidValueError,
    KeyStoreCorruptError,
    KeyStoreError,
    KeyVersionError,
    KMSAccessDeniedError,
    KMSCredentialsError,
    KMSError,
    KMSKeyNotFoundError,
    KMSRegionMismatchError,
    KMSUnavailableError,
)

__all__ = ["CLIError", "ExitCode", "Failure", "describe_failure"]


class ExitCode(enum.IntEnum):
    """The exit status of ``encx-async``; docs/cli.md has the same table."""

    OK = 0
    #: the input failed to decrypt or authenticate, or is not an encx-async ciphertext
    DATA = 1
    #: bad flags or arguments, an invalid setting, a missing optional package
    USAGE = 2
    #: the KMS or the key-version database is unreachable, refuses access, or lacks the key;
    #: or the database holds rows encx-async never writes
    SERVICE = 3
    #: the input cannot be read or the output cannot be written
    IO = 4
    #: an unexpected error: a bug worth reporting (rerun with --debug)
    INTERNAL = 70
    #: interrupted (Ctrl-C)
    INTERRUPTED = 130


class CLIError(Exception):
    """A failure the command line detects itself, with its exit code and hint."""

    def __init__(self, message: str, *, hint: str, code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.hint = hint
        self.code = code


@dataclass(frozen=True, slots=True)
class Failure:
    code: ExitCode
    message: str
    hint: str


_DECRYPT_HINT = (
    "check that --kek-alias, --context and --aad are the ones it was encrypted with, "
    "and that the input is complete and unmodified"
)
_SERVICE_HINTS: tuple[tuple[type[Exception], str], ...] = (
    (
        KMSKeyNotFoundError,
        "check --kek-alias and --kms, with --region and --endpoint-url or --local-keys; "
        "'encx-async keys create --help' shows how to create a key",
    ),
    (
        KMSCredentialsError,
        "no AWS credentials were found: pass --profile NAME (or set AWS_PROFILE), set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance or task role "
        "applies; to try the commands without AWS, use --kms local --local-keys FILE",
    ),
    (
        KMSAccessDeniedError,
        "check the AWS credentials (--profile, AWS_PROFILE, AWS_ACCESS_KEY_ID) and that "
        "the key policy or IAM policy allows this KMS action",
    ),
    (
        KMSRegionMismatchError,
        "use --region to match the key's region, or name the key by alias",
    ),
    (
        KMSUnavailableError,
        "check the network path to the KMS (--endpoint-url, --region); retrying later may work",
    ),
    (KMSError, "see the KMS error code in the message; 'keys describe' shows the key's state"),
    (
        DatabaseUnavailableError,
        "check --database (or ENCX_DATABASE_URL): sqlite:///path/keys.db or "
        "postgresql://user@host/db",
    ),
    (
        # Every command reads the versions first, keys list-versions too: the
        # rows can only be looked at in the database itself.
        KeyStoreCorruptError,
        "open the key-version database (the one the message names, or --database) with "
        "sqlite3 or psql, and repair the rows of encx_kek_versions (exactly one active "
        "version, the newest; the others deprecated or retired) or restore a backup",
    ),
    (KeyStoreError, "check --database (or ENCX_DATABASE_URL) and the database it names"),
)


def describe_failure(exc: BaseException, *, command: str) -> Failure:
    """The exit code, message and hint for an exception that ended a command."""
    help_hint = f"run 'encx-async {command} --help'" if command else "run 'encx-async --help'"
    if isinstance(exc, CLIError):
        return Failure(exc.code, _one_line(str(exc)), exc.hint)
    if isinstance(exc, KeyboardInterrupt):
        return Failure(
            ExitCode.INTERRUPTED,
            "interrupted",
            "no partial output file was left behind; stdout may hold a partial result",
        )
    if isinstance(exc, KeyVersionError):
        return Failure(
            ExitCode.DATA,
            _one_line(str(exc)),
            "'encx-async keys list-versions' shows the versions this database knows",
        )
    if isinstance(exc, DecryptionError):
        # An operator's own tool: which check failed helps, and stays on their screen.
        return Failure(ExitCode.DATA, _one_line(f"{exc} ({exc.reason})"), _DECRYPT_HINT)
    if isinstance(exc, EncryptionError):
        return Failure(ExitCode.DATA, _one_line(str(exc)), help_hint)
    for kind, hint in _SERVICE_HINTS:
        if isinstance(exc, kind):
            return Failure(ExitCode.SERVICE, _one_line(str(exc)), hint)
    if isinstance(exc, ConfigurationError | InvalidValueError | InvalidHashError):
        return Failure(ExitCode.USAGE, _one_line(str(exc)), help_hint)
    if isinstance(exc, BrokenPipeError):
        return Failure(
            ExitCode.IO,
            "the output pipe was closed before everything was written",
            "the reader of stdout stopped early",
        )
    if isinstance(exc, OSError):
        return Failure(ExitCode.IO, _os_error(exc), "check the paths given and their permissions")
    return _internal(exc)


def _internal(exc: BaseException) -> Failure:
    return Failure(
        ExitCode.INTERNAL,
        f"unexpected {type(exc).__name__}",
        "rerun with --debug for the traceback, and report it if it looks like a bug",
    )


def _os_error(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    if exc.filename is not None:
        return f"{exc.filename}: {reason}"
    return reason


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "failed"
