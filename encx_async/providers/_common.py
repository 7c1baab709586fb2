"""What the bundled KMS providers share: argument checks, messages, the lifecycle.

Private: the names here may change in any release.

Argument checks follow one rule: an argument of the wrong *type* (a ``str``
where bytes belong, a number where a key reference belongs) raises a plain
``TypeError``, as the :class:`~encx_async.Crypto` facade does; an argument of
the right type with a wrong *value* (empty, too long, a malformed alias name)
raises :class:`~encx_async.ConfigurationError`.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Final, Self

from anyio.abc import AsyncResource

from encx_async._exceptions import ClosedError, ConfigurationError

__all__ = [
    "DECRYPT_FAILED",
    "MAX_KEY_REF",
    "MAX_PENDING_DAYS",
    "MAX_PLAINTEXT",
    "MAX_ROTATION_PERIOD_DAYS",
    "MIN_PENDING_DAYS",
    "MIN_ROTATION_PERIOD_DAYS",
    "ProviderResource",
    "as_bytes",
    "check_alias_name",
    "check_description",
    "check_key_ref",
    "check_pending_days",
    "check_plaintext",
    "check_rotation_period",
    "is_alias_name",
    "is_alias_ref",
    "not_found_message",
]

#: AWS KMS limits, which the local provider keeps too so code moves between them.
MAX_PLAINTEXT: Final = 4096
MAX_KEY_REF: Final = 2048
MIN_ROTATION_PERIOD_DAYS: Final = 90
MAX_ROTATION_PERIOD_DAYS: Final = 2560
#: the waiting period before KMS deletes a key (ScheduleKeyDeletion)
MIN_PENDING_DAYS: Final = 7
MAX_PENDING_DAYS: Final = 30

#: The reason of every failed unwrap; even so it never says which part did not match.
DECRYPT_FAILED: Final = "the KMS did not unwrap the data key (wrong key or context, or modified)"

# A key id is a uuid, or "mrk-" and 32 hex digits for a multi-region key
# (moto writes the latter as "mrk-" and a uuid).
_KEY_ID_RE: Final = re.compile(
    r"^(?:mrk-[0-9a-f]{32}|(?:mrk-)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$",
    re.IGNORECASE,
)
_ALIAS_NAME_RE: Final = re.compile(r"^alias/[A-Za-z0-9/_-]{1,250}$")


class ProviderResource(AsyncResource):
    """The lifecycle of a provider: opened on first use or on ``async with``,
    closed by an idempotent ``aclose()``, :class:`~encx_async.ClosedError` after.

    ``AsyncResource`` supplies ``__aexit__`` (which calls ``aclose()``); this
    class only makes ``__aenter__`` open the provider first.
    """

    _closed: bool = False

    async def __aenter__(self) -> Self:
        await self._ensure_open()
        return self

    @abstractmethod
    async def _ensure_open(self) -> None:
        """Open the provider if it is not open yet; ClosedError once closed."""

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise ClosedError(f"{type(self).__name__} is closed")


def as_bytes(value: object, what: str) -> bytes:
    """``value`` as bytes; TypeError unless it is bytes-like."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"the {what} must be bytes-like, not {type(value).__name__}")
    return bytes(value)


def check_plaintext(value: object) -> bytes:
    """A data key to wrap: bytes-like (TypeError), 1 to 4096 bytes (ConfigurationError)."""
    data = as_bytes(value, "data key")
    if not 1 <= len(data) <= MAX_PLAINTEXT:
        raise ConfigurationError(
            f"the data key must be 1 to {MAX_PLAINTEXT} bytes long, got {len(data)}"
        )
    return data


def check_key_ref(key_ref: object) -> str:
    """A key id, key ARN, alias name or alias ARN, checked for shape only."""
    if not isinstance(key_ref, str):
        raise TypeError(
            f"a KMS key id, key ARN or alias must be a str, not {type(key_ref).__name__}"
        )
    if not key_ref.strip():
        raise ConfigurationError("a KMS key id, key ARN or alias must not be empty")
    if len(key_ref) > MAX_KEY_REF:
        raise ConfigurationError(f"a KMS key reference is at most {MAX_KEY_REF} characters")
    return key_ref


def check_alias_name(alias: object) -> str:
    """An alias name (``alias/...``, not an ARN) that a caller may create or move."""
    if not isinstance(alias, str):
        raise TypeError(f"an alias name must be a str, not {type(alias).__name__}")
    if not is_alias_name(alias):
        raise ConfigurationError(
            f"alias {alias!r} is not a valid alias name: it must start with 'alias/', "
            "contain only letters, digits, '/', '_' and '-', and not start with 'alias/aws/'"
        )
    return alias


def check_description(description: object) -> str:
    if not isinstance(description, str):
        raise TypeError(f"the key description must be a str, not {type(description).__name__}")
    return description


def check_rotation_period(period_days: object) -> int | None:
    """``None``, or a whole number of days that KMS accepts for scheduled rotation."""
    if period_days is None:
        return None
    if isinstance(period_days, bool) or not isinstance(period_days, int):
        raise TypeError(f"period_days must be an int or None, not {type(period_days).__name__}")
    if not MIN_ROTATION_PERIOD_DAYS <= period_days <= MAX_ROTATION_PERIOD_DAYS:
        raise ConfigurationError(
            f"period_days must be {MIN_ROTATION_PERIOD_DAYS} to {MAX_ROTATION_PERIOD_DAYS}, "
            f"got {period_days}"
        )
    return period_days


def check_pending_days(pending_days: object) -> int:
    """A waiting period that KMS accepts before deleting a key: 7 to 30 days."""
    if isinstance(pending_days, bool) or not isinstance(pending_days, int):
        raise TypeError(f"pending_days must be an int, not {type(pending_days).__name__}")
    if not MIN_PENDING_DAYS <= pending_days <= MAX_PENDING_DAYS:
        raise ConfigurationError(
            f"pending_days must be {MIN_PENDING_DAYS} to {MAX_PENDING_DAYS}, got {pending_days}"
        )
    return pending_days


def is_alias_name(alias: str) -> bool:
    """Whether ``alias`` is a name a caller may give an alias (not one of ``alias/aws/``)."""
    return _ALIAS_NAME_RE.fullmatch(alias) is not None and not alias.startswith("alias/aws/")


def is_alias_ref(key_ref: str) -> bool:
    """Whether ``key_ref`` names an alias (by name or ARN) rather than a key."""
    return key_ref.startswith("alias/") or (key_ref.startswith("arn:") and ":alias/" in key_ref)


def _looks_like_key_ref(value: str) -> bool:
    """Whether a KMS would read ``value`` as something other than a bare alias name."""
    return value.startswith(("alias/", "arn:")) or _KEY_ID_RE.fullmatch(value) is not None


def not_found_message(key_refs: str | tuple[str, ...], region: str | None, *, scope: str) -> str:
    """Say that a key or alias is missing, and hint at a missing ``alias/`` prefix.

    ``key_refs`` is what the caller named; with several (UpdateAlias, ReEncrypt)
    at least one of them is missing. ``scope`` completes "check that the key
    or alias exists in ...".
    """
    refs = (key_refs,) if isinstance(key_refs, str) else key_refs
    where = f"region {region}" if region else "this region"
    names = " or ".join(repr(ref) for ref in refs)
    bare = [ref for ref in refs if not _looks_like_key_ref(ref)]
    if not bare:
        return (
            f"KMS key {names} was not found in {where}; check that the key or alias "
            f"exists in {scope} (alias names start with 'alias/')"
        )
    subject = "it" if len(refs) == 1 else repr(bare[0])
    return (
        f"KMS key {names} was not found in {where}: {subject} is not a key id, key ARN or "
        f"alias name; alias names start with 'alias/' (did you mean 'alias/{bare[0]}'?)"
    )
