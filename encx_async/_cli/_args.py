"""The argument parser, and the settings it resolves with the environment.

Every KMS option can be given before or after the command name, and falls
back to an environment variable; a flag always beats the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, cast

from encx_async._crypto import ROTATIONS
from encx_async._exceptions import ConfigurationError
from encx_async._ordered import check_concurrency
from encx_async._progress import progress_default

from ._errors import CLIError, ExitCode

__all__ = ["ENV", "KMS_KINDS", "KMSKind", "Settings", "build_parser", "parse", "parse_context"]

KMSKind = Literal["aws", "local", "moto"]
KMS_KINDS: tuple[KMSKind, ...] = ("aws", "local", "moto")

#: the environment variable behind each option
ENV: Mapping[str, str] = {
    "kms": "ENCX_KMS",
    "endpoint_url": "ENCX_ENDPOINT_URL",
    "kek_alias": "ENCX_KEK_ALIAS",
    "database": "ENCX_DATABASE_URL",
    "local_keys": "ENCX_LOCAL_KEYS",
}

_EPILOG = """\
exit codes:
  0    success
  1    decryption or authentication failed (wrong key, context or aad; tampered,
       truncated or not an encx-async ciphertext)
  2    usage or configuration error (bad flags, bad settings, missing package)
  3    KMS or key-version database unavailable, access denied, or key not found;
       or the key-version database holds corrupt rows
  4    input or output error (a file cannot be read or written)
  70   unexpected internal error (rerun with --debug)
  130  interrupted

'encx-async COMMAND --help' describes each command; docs/cli.md has the details.
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors become a CLIError: one line and a hint, never the usage dump."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message, hint=f"run '{self.prog} --help'", code=ExitCode.USAGE)


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the keys are and how to report: flags, then environment, then defaults."""

    kms: KMSKind
    region: str | None
    endpoint_url: str | None
    profile: str | None
    kek_alias: str | None
    database: str | None
    local_keys: str | None
    json: bool
    progress: bool
    debug: bool

    def alias(self) -> str:
        if not self.kek_alias:
            raise CLIError(
                "no KEK alias given",
                hint="pass --kek-alias alias/NAME or set ENCX_KEK_ALIAS",
            )
        return self.kek_alias


def _add_kms_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("KMS and key options")
    suppress = argparse.SUPPRESS
    group.add_argument(
        "--kms",
        choices=KMS_KINDS,
        default=suppress,
        help="aws (AWS KMS), local (LocalKMSService with --local-keys, for development) or "
        "moto (an in-process moto server, gone when the command ends); "
        "env ENCX_KMS, default aws",
    )
    group.add_argument(
        "--region",
        default=suppress,
        help="AWS region; default from botocore (AWS_REGION, AWS_DEFAULT_REGION, the profile)",
    )
    group.add_argument(
        "--endpoint-url",
        default=suppress,
        metavar="URL",
        help="KMS endpoint (VPC endpoint, LocalStack, moto); env ENCX_ENDPOINT_URL, "
        "else botocore's AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL",
    )
    group.add_argument(
        "--profile",
        default=suppress,
        help="AWS named profile; default from botocore (AWS_PROFILE)",
    )
    group.add_argument(
        "--kek-alias",
        "--alias",
        dest="kek_alias",
        default=suppress,
        metavar="ALIAS",
        help="the KEK, as alias/NAME; env ENCX_KEK_ALIAS",
    )
    group.add_argument(
        "--database",
        default=suppress,
        metavar="URL",
        help="where KEK versions are recorded (sqlite:///path/keys.db, postgresql://...); "
        "env ENCX_DATABASE_URL, default a SQLite file in the user's data directory "
        "(with --kms moto: a temporary one, whatever ENCX_DATABASE_URL says)",
    )
    group.add_argument(
        "--local-keys",
        default=suppress,
        metavar="PATH",
        help="the key file of --kms local (created if missing; development keys only); "
        "env ENCX_LOCAL_KEYS",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output options")
    suppress = argparse.SUPPRESS
    group.add_argument(
        "--json",
        action="store_true",
        default=suppress,
        help="print the result as one JSON document on stdout",
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=suppress,
        help="draw progress on stderr (default: only when stderr is a terminal)",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=suppress,
        help="show tracebacks and the library's debug log (never key material)",
    )


def _add_data_options(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument(
        "-i", "--input", default="-", metavar="PATH", help=f"the {what} to read ('-' = stdin)"
    )
    parser.add_argument(
        "-o", "--output", default="-", metavar="PATH", help="where to write ('-' = stdout)"
    )
    parser.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    _add_binding_options(parser)


def _add_binding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a KMS encryption context pair (repeatable); not secret, needed again to decrypt",
    )
    parser.add_argument(
        "--aad",
        default=None,
        metavar="TEXT",
        help="associated data (UTF-8) the ciphertext is bound to, such as a record id; "
        "not stored, needed again to decrypt",
    )


def _concurrency(text: str) -> int:
    """``--concurrency``, checked by the library's own rule."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    try:
        return check_concurrency(number)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


Handler = Callable[..., Any]


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The whole command tree; ``handlers`` maps a command path to its function."""
    parser = _Parser(
        prog="encx-async",
        description="Envelope encryption with AWS KMS from the shell: manage the KEK, "
        "encrypt and decrypt files and pipes, rewrap old ciphertexts.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    from encx_async import __version__

    parser.add_argument("--version", action="version", version=f"encx-async {__version__}")
    _add_kms_options(parser)
    _add_output_options(parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")

    def command(
        group: argparse._SubParsersAction[_Parser],
        name: str,
        path: str,
        help_text: str,
        *,
        kms: bool = True,
        description: str | None = None,
    ) -> _Parser:
        sub = group.add_parser(
            name,
            help=help_text,
            description=description or help_text,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if kms:
            _add_kms_options(sub)
        _add_output_options(sub)
        sub.set_defaults(handler=handlers[path], command_path=path)
        return sub

    demo = command(
        commands,
        "demo",
        "demo",
        "encrypt and decrypt sample records on an in-process KMS, with and without the "
        "DEK cache, and show the KMS calls the cache saves",
        kms=False,
    )
    demo.add_argument(
        "--kms",
        choices=("moto", "local"),
        default=argparse.SUPPRESS,
        help="moto (default: an in-process AWS KMS stand-in) or local (LocalKMSService)",
    )
    demo.add_argument("--records", type=int, default=100, help="sample records (default 100)")

    keys = commands.add_parser(
        "keys", help="create, describe and rotate the KEK", allow_abbrev=False
    )
    keys_commands = keys.add_subparsers(title="commands", metavar="COMMAND", dest="keys_command")
    keys_commands.required = True
    command(
        keys_commands,
        "create",
        "keys create",
        "create a KMS key and its alias (if the alias does not exist yet) and record KEK version 1",
    )
    command(
        keys_commands,
        "describe",
        "keys describe",
        "the current KEK version and the state of its KMS key",
    )
    rotate = command(
        keys_commands,
        "rotate",
        "keys rotate",
        "add a KEK version: new data is encrypted under it, old data still decrypts",
    )
    rotate.add_argument(
        "--rotation",
        choices=ROTATIONS,
        default=None,
        help="new-key (a new KMS key, the alias moved to it; default) or kms-managed "
        "(new key material inside the same key)",
    )
    # The former name of --rotation, as the library's strategy= was: still
    # accepted, with a note on stderr (keys_rotate), and left out of --help.
    rotate.add_argument("--strategy", choices=ROTATIONS, default=None, help=argparse.SUPPRESS)
    command(keys_commands, "list-versions", "keys list-versions", "every KEK version, oldest first")

    encrypt = command(
        commands,
        "encrypt",
        "encrypt",
        "encrypt a file or stdin into an encx-async envelope",
    )
    _add_data_options(encrypt, what="plaintext")
    decrypt = command(
        commands,
        "decrypt",
        "decrypt",
        "decrypt an encx-async envelope from a file or stdin",
        description="Decrypt an encx-async envelope from a file or stdin.\n\n"
        "To a file (-o PATH) the output appears only once all of it is decrypted and\n"
        "authenticated. To stdout, bytes are written as they are decrypted: if the input\n"
        "turns out to be tampered with or truncated, part of the plaintext has already\n"
        "been written, and the exit code (1) is what says it is not authentic.",
    )
    _add_data_options(decrypt, what="ciphertext")
    rewrap = command(
        commands,
        "rewrap",
        "rewrap",
        "move ciphertexts to the current KEK version without decrypting them",
        description="Move ciphertexts to the current KEK version without decrypting them.\n\n"
        "Files are replaced in place (atomically; their bodies are copied byte for byte).\n"
        "Without files (or with '-'), stdin is read as one base64 ciphertext per line and\n"
        "stdout gets one base64 line per ciphertext, in the same order; blank lines are\n"
        "skipped.",
    )
    rewrap.add_argument("files", nargs="*", metavar="FILE", help="ciphertext files ('-' = stdin)")
    rewrap.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the encryption context the ciphertexts were made with (repeatable)",
    )
    rewrap.add_argument(
        "--concurrency",
        type=_concurrency,
        default=16,
        metavar="N",
        help="how many files or base64 lines are rewrapped at once, which bounds the "
        "KMS calls in flight (default 16)",
    )
    bench = commands.add_parser(
        "bench",
        help="the cached-vs-uncached DEK benchmark (a source checkout's benchmarks.cache; "
        "'encx-async bench --help' lists its options)",
        add_help=False,
        allow_abbrev=False,
    )
    bench.set_defaults(handler=handlers["bench"], command_path="bench")
    return parser


def parse(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> tuple[argparse.Namespace, Settings, list[str]]:
    """Parse ``argv``; the namespace, the resolved settings and the arguments left for bench."""
    env = os.environ if environ is None else environ
    namespace, extra = parser.parse_known_args(argv)
    path = getattr(namespace, "command_path", None)
    if path is None:
        if namespace.command == "keys":
            parser.error("'keys' needs a command: create, describe, rotate or list-versions")
        parser.error("a command is needed: demo, keys, encrypt, decrypt, rewrap or bench")
    if extra and path != "bench":
        raise CLIError(
            f"unrecognized arguments: {' '.join(extra)}",
            hint=f"run 'encx-async {path} --help'",
        )
    values = vars(namespace)

    def pick(name: str) -> str | None:
        value = values.get(name)
        if value is None and name in ENV:
            value = env.get(ENV[name]) or None
        return cast("str | None", value)

    kms = pick("kms") or "aws"
    if kms not in KMS_KINDS:
        raise CLIError(
            f"{ENV['kms']}={kms!r} is not one of {', '.join(KMS_KINDS)}",
            hint=f"set {ENV['kms']} to aws, local or moto, or pass --kms",
        )
    progress = values.get("progress")
    settings = Settings(
        kms=kms,
        region=pick("region"),
        endpoint_url=pick("endpoint_url"),
        profile=pick("profile"),
        kek_alias=pick("kek_alias"),
        # moto's keys vanish with the command: KEK versions recorded for them in
        # the user's ENCX_DATABASE_URL would be litter. Only a flag says otherwise.
        database=values.get("database") if kms == "moto" else pick("database"),
        local_keys=pick("local_keys"),
        json=bool(values.get("json", False)),
        progress=progress_default() if progress is None else bool(progress),
        debug=bool(values.get("debug", False)),
    )
    return namespace, settings, extra


def parse_context(pairs: Sequence[str]) -> dict[str, str] | None:
    """``--context k=v`` pairs as a dict; None when there are none."""
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(
                f"--context {pair!r} is not KEY=VALUE",
                hint="repeat --context for each pair: --context tenant=acme --context table=users",
            )
        if key in context:
            raise CLIError(
                f"--context names {key!r} twice",
                hint="give each context key once",
            )
        context[key] = value
    return context or None
