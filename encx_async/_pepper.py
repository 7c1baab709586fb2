"""The pepper: the secret key behind encx-async's keyed hashes.

A pepper keys the HMAC blind indexes and is Argon2id's secret input. It is
exactly :data:`PEPPER_SIZE` (32) random bytes, never all zero, and has a
version (``1 <= version <= MAX_PEPPER_VERSION``) that is recorded with every
hash, so a pepper can be rotated: hashes made under version 1 stay checkable
while new ones use version 2.

A :class:`Pepper` never shows its bytes: not in its ``repr`` or ``str``, not in
the message of any error raised while loading one (messages state the rule that
was broken and, at most, a length). Where it comes from:

* :meth:`Pepper.from_env`: an environment variable, ``[<version>:]<base64>``;
* :meth:`Pepper.from_file`: a file of 32 raw bytes or their base64, mode 600;
* :meth:`Pepper.from_secret_string`: the JSON document that
  :meth:`Pepper.to_secret_string` writes, for a secret store
  (:class:`~encx_async.providers.aws.SecretsManagerPepperSource` keeps one in
  AWS Secrets Manager);
* :meth:`Pepper.generate`: 32 fresh bytes from :func:`os.urandom`.

To make one for an environment variable::

    python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import stat
from collections.abc import Mapping
from typing import Any, Final, NoReturn, final

from encx_async._exceptions import ConfigurationError

__all__ = [
    "DEFAULT_ENV_VAR",
    "MAX_PEPPER_VERSION",
    "PEPPER_SIZE",
    "SECRET_STRING_FORMAT",
    "Pepper",
]

#: The size of every pepper, in bytes.
PEPPER_SIZE: Final = 32
#: The largest pepper version (the largest signed 32-bit integer, so any database column holds it).
MAX_PEPPER_VERSION: Final = 2**31 - 1
#: The value of the ``"encx_pepper"`` member of :meth:`Pepper.to_secret_string`'s JSON.
SECRET_STRING_FORMAT: Final = 1

#: The environment variable :meth:`Pepper.from_env` reads by default.
DEFAULT_ENV_VAR: Final = "ENCX_PEPPER"

# A pepper file is 32 raw bytes or a line of base64 (44 characters); anything
# much longer is the wrong file, and is not read whole.
_MAX_FILE_SIZE: Final = 1024
_MAX_SECRET_STRING: Final = 1024
_SECRET_KEYS: Final = frozenset({"encx_pepper", "version", "secret"})
_STANDARD_B64: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_URLSAFE_B64: Final = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_VERSION_PREFIX: Final = re.compile(r"([0-9]{1,10}):")
_GENERATE_HINT: Final = (
    'python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"'
)


def _check_version(version: object, what: str = "the pepper version") -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigurationError(f"{what} must be an int, not {type(version).__name__}")
    if not 1 <= version <= MAX_PEPPER_VERSION:
        raise ConfigurationError(f"{what} must be 1 to {MAX_PEPPER_VERSION}, got {version}")
    return version


def _check_secret(secret: object) -> bytes:
    if not isinstance(secret, bytes | bytearray | memoryview):
        hint = (
            "; to read base64 text use Pepper.from_env() or Pepper.from_secret_string()"
            if isinstance(secret, str)
            else ""
        )
        raise ConfigurationError(
            f"a pepper must be bytes, bytearray or memoryview, not {type(secret).__name__}{hint}"
        )
    data = bytes(secret)
    if len(data) != PEPPER_SIZE:
        raise ConfigurationError(
            f"a pepper must be exactly {PEPPER_SIZE} bytes, got {len(data)} bytes"
        )
    if not any(data):
        raise ConfigurationError(
            f"a pepper must not be all zero bytes; use {PEPPER_SIZE} random bytes"
        )
    return data


def _decode_base64(text: str, where: str) -> bytes:
    """Base64 of a pepper, standard or URL-safe alphabet, padding optional.

    Errors name ``where`` and the rule, never ``text``. Nothing raised here
    carries ``text`` in ``__context__`` either (no decoder error is chained).
    """
    if _STANDARD_B64.fullmatch(text) is not None:
        altchars = None
    elif _URLSAFE_B64.fullmatch(text) is not None:
        altchars = b"-_"
    else:
        raise ConfigurationError(
            f"{where} is not base64: it must use one base64 alphabet (standard A-Z a-z 0-9 + / "
            "or URL-safe A-Z a-z 0-9 - _), with optional '=' padding and no spaces inside"
        )
    unpadded = text.rstrip("=")
    padded = unpadded + "=" * (-len(unpadded) % 4)
    if len(padded) != len(text) and len(text) != len(unpadded):
        _invalid_base64(where, "its '=' padding is wrong")
    decoded: bytes | None
    try:
        decoded = base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        decoded = None
    if decoded is None:
        _invalid_base64(where, f"its length ({len(unpadded)} characters) is impossible")
    canonical = base64.b64encode(decoded, altchars=altchars).decode("ascii")
    if canonical.rstrip("=") != unpadded:
        _invalid_base64(where, "its last character has bits set past the end of the data")
    if len(decoded) != PEPPER_SIZE:
        raise ConfigurationError(
            f"{where} decodes to {len(decoded)} bytes; a pepper must be exactly "
            f"{PEPPER_SIZE} bytes (44 base64 characters with padding)"
        )
    return decoded


def _invalid_base64(where: str, reason: str) -> NoReturn:
    raise ConfigurationError(f"{where} is not valid base64: {reason}")


@final
class Pepper:
    """A versioned 32-byte pepper, immutable, that never shows its bytes.

    ``Pepper(secret, version=1)`` checks that ``secret`` is bytes-like,
    exactly 32 bytes and not all zero, and that ``version`` is an int from 1
    to :data:`MAX_PEPPER_VERSION`; anything else raises
    :class:`~encx_async.ConfigurationError` (a wrong *type* too, as the pepper
    argument of :class:`~encx_async.Crypto` does). The bytes are copied.

    Two peppers are equal when their versions and bytes are (the bytes are
    compared in constant time). A pepper is not hashable: a hash derived from
    the secret would be one more thing computed from it, and one derived from
    the version alone would put every version-1 pepper in the same bucket while
    ``==`` tells them apart. Key a mapping by :attr:`version` instead.

    It has no ``__bytes__``, cannot be pickled, and ``copy.copy`` returns the
    same object; the raw key is only ever read through :attr:`secret`. Python
    cannot wipe memory, so the bytes live until the object is collected.
    """

    __slots__ = ("_secret", "_version")

    _secret: bytes
    _version: int

    def __init__(self, secret: bytes | bytearray | memoryview, *, version: int = 1) -> None:
        data = _check_secret(secret)
        number = _check_version(version)
        object.__setattr__(self, "_secret", data)
        object.__setattr__(self, "_version", number)

    # -- constructors -----------------------------------------------------

    @classmethod
    def generate(cls, version: int = 1) -> Pepper:
        """A new pepper of 32 bytes from :func:`os.urandom`."""
        number = _check_version(version)
        while True:
            data = os.urandom(PEPPER_SIZE)
            if any(data):  # all zero: probability 2**-256, but the rule is the rule
                return cls(data, version=number)

    @classmethod
    def from_env(
        cls,
        name: str = DEFAULT_ENV_VAR,
        *,
        version: int | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Pepper:
        """The pepper in the environment variable ``name`` (``ENCX_PEPPER``).

        The value is ``<base64>`` or ``<version>:<base64>``: the base64 of the
        32 bytes, in the standard or the URL-safe alphabet, with or without
        ``=`` padding, optionally after a decimal version and a colon
        (``2:q83v...``); whitespace around it is ignored. The version is the
        prefix, else ``version``, else 1; when both are given they must agree.

        ``environ`` replaces :data:`os.environ` (for tests, or a parsed
        ``.env`` file). A missing or empty variable raises
        :class:`~encx_async.ConfigurationError` naming it; a malformed value
        raises one that says what is wrong without quoting it.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError("the environment variable name must be a non-empty str")
        if version is not None:
            _check_version(version)
        env: Mapping[str, str] = os.environ if environ is None else environ
        raw = env.get(name)
        if raw is None:
            raise ConfigurationError(
                f"the environment variable {name} is not set; set it to the base64 of "
                f"{PEPPER_SIZE} random bytes, for example the output of {_GENERATE_HINT}"
            )
        if not isinstance(raw, str):
            raise ConfigurationError(
                f"the environment variable {name} must be a str, not {type(raw).__name__}"
            )
        value = raw.strip()
        if not value:
            raise ConfigurationError(
                f"the environment variable {name} is empty; set it to the base64 of "
                f"{PEPPER_SIZE} random bytes"
            )
        where = f"the environment variable {name}"
        number = 1 if version is None else version
        if ":" in value:
            prefix = _VERSION_PREFIX.match(value)
            if prefix is None:
                raise ConfigurationError(
                    f"{where} has a ':' but does not start with a version: the format is "
                    "<base64> or <version>:<base64>, with a decimal version of 1 or more"
                )
            number = _check_version(int(prefix.group(1)), f"the version prefix of {where}")
            if version is not None and number != version:
                raise ConfigurationError(
                    f"{where} names pepper version {number}, but version={version} was passed"
                )
            value = value[prefix.end() :]
        return cls(_decode_base64(value, where), version=number)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, version: int = 1) -> Pepper:
        """The pepper in the file at ``path``.

        The file holds exactly 32 raw bytes (a file of exactly 32 bytes is
        always read as raw bytes), or the base64 of 32 bytes as text (standard
        or URL-safe alphabet, padding optional, whitespace around it ignored).

        On POSIX a file that its group or others may read or write
        (``mode & 0o077``) is refused: ``chmod 600`` it. Symbolic links are
        followed (Kubernetes mounts secrets that way) and the mode checked is
        the target's. A missing, unreadable or oversized file raises
        :class:`~encx_async.ConfigurationError` too.

        The file is read synchronously, with plain blocking I/O: call this at
        start-up (or through :func:`asyncio.to_thread`), not on a hot path
        inside the event loop. It reads at most a kilobyte.
        """
        number = _check_version(version)
        try:
            file_path = os.fspath(path)
        except TypeError:
            raise ConfigurationError(
                f"the pepper file path must be a str or os.PathLike, not {type(path).__name__}"
            ) from None
        if not isinstance(file_path, str):
            raise ConfigurationError("the pepper file path must be a str, not bytes")
        where = f"the pepper file {file_path}"
        problem: str | None = None
        data = b""
        try:
            with open(file_path, "rb") as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    problem = f"{where} is not a regular file"
                elif os.name == "posix" and info.st_mode & 0o077:
                    problem = (
                        f"{where} can be read or written by its group or others "
                        f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 600 on it "
                        "(on Kubernetes, set defaultMode: 0400 on the secret volume)"
                    )
                else:
                    data = handle.read(_MAX_FILE_SIZE + 1)
        except FileNotFoundError:
            problem = f"{where} does not exist"
        except PermissionError:
            problem = f"{where} cannot be opened: permission denied"
        except IsADirectoryError:
            problem = f"{where} is a directory"
        except OSError as exc:
            problem = f"{where} cannot be read: {type(exc).__name__} (errno {exc.errno})"
        if problem is not None:
            raise ConfigurationError(problem)
        if len(data) > _MAX_FILE_SIZE:
            raise ConfigurationError(
                f"{where} is larger than {_MAX_FILE_SIZE} bytes; a pepper file holds "
                f"{PEPPER_SIZE} raw bytes or their base64"
            )
        if len(data) == PEPPER_SIZE:
            return cls(data, version=number)
        text: str | None
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            text = None
        if text is None:
            raise ConfigurationError(
                f"{where} holds {len(data)} bytes that are not text; a pepper file holds "
                f"exactly {PEPPER_SIZE} raw bytes or their base64"
            )
        text = text.strip()
        if not text:
            raise ConfigurationError(
                f"{where} is empty; it must hold {PEPPER_SIZE} raw bytes or their base64"
            )
        return cls(_decode_base64(text, where), version=number)

    # -- the secret-string form ---------------------------------------------

    def to_secret_string(self) -> str:
        """This pepper as JSON for a secret store.

        ``{"encx_pepper": 1, "version": <int>, "secret": "<base64>"}``, where
        ``encx_pepper`` is the format (:data:`SECRET_STRING_FORMAT`) and
        ``secret`` is the standard, padded base64 of the 32 bytes. The result
        contains the secret: store it, never log it.
        """
        document = {
            "encx_pepper": SECRET_STRING_FORMAT,
            "version": self._version,
            "secret": base64.b64encode(self._secret).decode("ascii"),
        }
        return json.dumps(document)

    @classmethod
    def from_secret_string(cls, value: str) -> Pepper:
        """The pepper that :meth:`to_secret_string` wrote, checked strictly.

        It must be a JSON object with exactly the members ``encx_pepper``
        (the int 1), ``version`` (an int from 1) and ``secret`` (standard
        base64, with padding, of 32 bytes not all zero), each once. Anything
        else raises :class:`~encx_async.ConfigurationError`, whose message says
        what is wrong but never quotes the value.
        """
        what = "the secret string is not an encx pepper"
        if not isinstance(value, str):
            raise ConfigurationError(f"{what}: it must be a str, not {type(value).__name__}")
        if len(value) > _MAX_SECRET_STRING:
            raise ConfigurationError(f"{what}: it is {len(value)} characters long")
        document = _parse_json_object(value)
        if document is None:
            raise ConfigurationError(
                f"{what}: it is not a JSON object with unique member names "
                '(expected {"encx_pepper": 1, "version": <int>, "secret": "<base64>"})'
            )
        if set(document) != _SECRET_KEYS:
            raise ConfigurationError(
                f"{what}: a JSON object with exactly the members encx_pepper, version and "
                f"secret is expected, this one has {len(document)} member(s)"
                + ("" if "encx_pepper" in document else " and no encx_pepper")
            )
        marker = document["encx_pepper"]
        if isinstance(marker, bool) or not isinstance(marker, int):
            raise ConfigurationError(f"{what}: encx_pepper must be the int {SECRET_STRING_FORMAT}")
        if marker != SECRET_STRING_FORMAT:
            raise ConfigurationError(
                f"{what} of a format this version knows: encx_pepper is {marker}, "
                f"only {SECRET_STRING_FORMAT} is supported"
            )
        number = _check_version(document["version"], "the version in the pepper secret string")
        secret = document["secret"]
        if not isinstance(secret, str):
            raise ConfigurationError(f"{what}: its secret must be a base64 str")
        if _STANDARD_B64.fullmatch(secret) is None or len(secret) % 4:
            raise ConfigurationError(f"{what}: its secret must be standard base64 with '=' padding")
        return cls(_decode_base64(secret, "the secret of the pepper secret string"), version=number)

    # -- the value ------------------------------------------------------------

    @property
    def secret(self) -> bytes:
        """The raw 32-byte key. Handle with care: never log or print it."""
        return self._secret

    @property
    def version(self) -> int:
        """The version recorded with every hash made under this pepper."""
        return self._version

    def __repr__(self) -> str:
        return f"<Pepper version={self._version} ({PEPPER_SIZE} bytes, redacted)>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pepper):
            return NotImplemented
        same_secret = hmac.compare_digest(self._secret, other._secret)
        return same_secret and self._version == other._version

    __hash__ = None  # type: ignore[assignment]  # see the class docstring

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"Pepper is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"Pepper is immutable; cannot delete {name!r}")

    def __copy__(self) -> Pepper:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Pepper:
        return self

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(
            "a Pepper cannot be pickled, so it does not end up in a cache or a queue by "
            "accident; pass pepper.secret and pepper.version explicitly if you must"
        )


def _parse_json_object(value: str) -> dict[str, Any] | None:
    """``value`` as a JSON object with unique member names and no NaN; else ``None``.

    No decoder error escapes (a ``JSONDecodeError`` keeps the whole document).
    """
    duplicate = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicate
        result = dict(items)
        if len(result) != len(items):
            duplicate = True
        return result

    def no_constants(name: str) -> NoReturn:
        raise ValueError("not JSON")

    parsed: object
    try:
        parsed = json.loads(value, object_pairs_hook=pairs, parse_constant=no_constants)
    except (ValueError, RecursionError):
        parsed = None
    if duplicate or not isinstance(parsed, dict):
        return None
    return parsed
