"""Keyed hashes of field values: HMAC blind indexes and Argon2id hashes.

Both hash :func:`~encx_async._values.encode_value` of the value, under a key
derived from the pepper with HKDF-SHA256 (one derived key per purpose, so the
raw pepper is never itself an HMAC key or an Argon2 secret). Each string names
the pepper version it was made with, so a rotated pepper's hashes stay
checkable by a hasher built with the old one::

    blind index  hb2:<pepper version>:<base64url, unpadded, of HMAC-SHA256>
                 hb2:1:E1CrnfD-DU8Bk7lTTF1kSkhx07WRuyepZEzOJRV6lmc
    (legacy)     hb1:<pepper version>:<the same>
    Argon2id     $argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>,keyid=<pepper version>$<salt>$<hash>
                 $argon2id$v=19$m=19456,t=2,p=1,keyid=1$atYOke4gFKGRmj7wrqU8hA$WMA4...

(salt and hash in standard base64, unpadded, as PHC strings have them).

An hb2 blind index is keyed per *domain*: a str, or a tuple of strs (a model's
field has the domain ``(model name, field name)``), whose HMAC key is HKDF of
the pepper with info ``b"encx-async v1 blind index domain"`` followed by each
part as a 4-byte big-endian length and its UTF-8. Equal values in two domains
give unrelated digests, so a column anyone can write (a nickname) cannot be
joined against a sensitive one (an SSN) to confirm guesses. The ``(legacy)``
hb1 index had one key for every field (info ``b"encx-async v1 blind index"``);
hb1 strings still verify, :meth:`BasicHasher.needs_reindex` points them out,
and only :meth:`BasicHasher.legacy_hash` still makes them.

The Argon2id string is a PHC string with a ``keyid`` parameter, written in
decimal (the PHC format defines keyid as base64; decimal is readable in a
database). ``keyid`` is removed before the string goes to ``cryptography``,
which verifies the standard ``$argon2id$v=19$m=...,t=...,p=...$salt$hash``.

A blind index is deterministic (equal values, equal digests: it can be
searched on) and fast; use it for lookups. An Argon2id hash is salted and slow;
use it for secrets that are only ever checked, like passwords or recovery codes.

Stored hashes are parsed strictly before anything is computed, and Argon2
parameters outside :class:`Argon2Params`' bounds (by default four times the
configured cost) are refused, so a tampered row cannot make a verify allocate
gigabytes or run for seconds. Messages name versions and parameters, never a
value, a pepper or a hash.

Argon2id runs in a worker thread (``anyio.to_thread.run_sync``; ``cryptography``
releases the GIL while it works), so the event loop keeps running. At most one
Argon2id call per CPU runs at once (per event loop, shared by every
SecureHasher), the rest wait their turn: Argon2 is CPU-bound, so more threads
would not hash faster, they would hold 19 MiB each (anyio's default limiter
allows 40 threads: 760 MiB) and crowd the event loop's thread off the CPU.
Measured on two cores with 50 calls at once: the loop's worst stall was
80-750 ms with 40 threads, about 8 ms with 2, for the same throughput. Pass a
``limiter`` to choose another bound.
"""

from __future__ import annotations

import binascii
import hmac
import os
import re
import struct
import threading
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import anyio.to_thread
from anyio import CapacityLimiter
from anyio.lowlevel import RunVar
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from ._exceptions import ConfigurationError, InvalidHashError
from ._pepper import Pepper
from ._values import encode_value

__all__ = [
    "ARGON2_PURPOSE",
    "BLIND_INDEX_DOMAIN_PURPOSE",
    "BLIND_INDEX_PREFIX",
    "BLIND_INDEX_PURPOSE",
    "BOUND_FACTOR",
    "LEGACY_BLIND_INDEX_PREFIX",
    "OWASP_MINIMUMS",
    "Argon2Params",
    "BasicHasher",
    "Domain",
    "SecureHasher",
    "argon2_limiter",
    "derive_key",
    "domain_purpose",
]

#: hb1's one key for every blind index
BLIND_INDEX_PURPOSE: Final = b"blind index"
#: hb2's key of a domain: this, then the domain's parts (see :func:`domain_purpose`)
BLIND_INDEX_DOMAIN_PURPOSE: Final = b"blind index domain"
ARGON2_PURPOSE: Final = b"argon2 secret"
BLIND_INDEX_PREFIX: Final = "hb2"
LEGACY_BLIND_INDEX_PREFIX: Final = "hb1"
#: OWASP's Argon2id configurations (Password Storage Cheat Sheet), as (memory
#: KiB, iterations) with one lane: equally strong, trading memory for time.
#: Parameters at or above one of them meet the recommendation.
OWASP_MINIMUMS: Final[tuple[tuple[int, int], ...]] = (
    (47104, 1),
    (19456, 2),
    (12288, 3),
    (9216, 4),
    (7168, 5),
)
#: By default a stored Argon2id hash may ask for at most this many times the
#: configured memory, passes, lanes, and memory x passes.
BOUND_FACTOR: Final = 4
#: A blind index's domain: a str, or a tuple of strs (``"users.email"``,
#: ``("User", "email")``); a str is the same domain as the tuple of just it.
Domain: TypeAlias = str | tuple[str, ...]

_HKDF_INFO: Final = b"encx-async v1 "
_MAC_B64_LEN: Final = 43  # 32 bytes in unpadded base64
_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
# The last of 43 characters carries 2 spare bits, which must be zero.
_BLIND_INDEX = re.compile(
    r"(hb[12]):(0|[1-9][0-9]{0,9}):[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]", re.ASCII
)
_BLIND_INDEX_KIND: Final = ("a blind index", "hb2:<version>:<43 base64url>, or hb1:...")
_MAX_DOMAIN_PARTS: Final = 8
_MAX_DOMAIN_PART: Final = 1024  # bytes of UTF-8
# Derived keys a BasicHasher keeps: far more domains than a schema has fields,
# and a bound on the memory of an application that makes domains per tenant.
_DOMAIN_CACHE: Final = 1024
_U32 = struct.Struct(">I")
_LEGACY_WARNING: Final = (
    "hb1 blind indexes share one key across every field and model, so equal values "
    "in two columns match; use them only to find rows not yet re-indexed to hb2 "
    "(see docs/hashing.md)"
)
# Numbers are decimal without leading zeros and at most 10 digits, so no stored
# hash makes int() work hard; salt and hash are 8 to 64 bytes of unpadded base64.
_NUMBER = r"[1-9][0-9]{0,9}"
_PHC = re.compile(
    rf"\$argon2id\$v=19\$m=({_NUMBER}),t=({_NUMBER}),p=({_NUMBER}),keyid=(0|{_NUMBER})"
    r"\$([A-Za-z0-9+/]{11,86})\$([A-Za-z0-9+/]{11,86})",
    re.ASCII,
)
_PHC_KIND: Final = (
    "an Argon2id hash",
    "$argon2id$v=19$m=<KiB>,t=<n>,p=<n>,keyid=<version>$<salt>$<hash>",
)
_MIN_SALT, _MIN_WEAK_SALT, _MAX_SALT = 16, 8, 64
_MIN_HASH, _MAX_HASH = 16, 64
_MAX_LANES = 2**24 - 1  # Argon2's own limit
_MAX_U32 = 2**32 - 1  # Argon2's limit on memory and passes


# OpenSSL's Argon2id (as cryptography 50 ships it) can deadlock when two
# multi-lane computations run at once in different threads: both wait forever,
# holding their memory. Single-lane calls are unaffected, so only calls with
# more than one lane (a setting, or a stored hash that asks for it) take turns,
# process-wide, whatever the event loop.
_MULTI_LANE = threading.Lock()


def _lanes_guard(lanes: int) -> AbstractContextManager[object]:
    return _MULTI_LANE if lanes > 1 else nullcontext()


# One limiter per event loop (a limiter belongs to the loop that first waits on it).
_argon2_limiter: RunVar[CapacityLimiter] = RunVar("encx_async.argon2_limiter")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def argon2_limiter() -> CapacityLimiter:
    """The current event loop's Argon2id limiter: one call at a time per CPU."""
    try:
        return _argon2_limiter.get()
    except LookupError:
        limiter = CapacityLimiter(_cpu_count())
        _argon2_limiter.set(limiter)
        return limiter


def _check_pepper(pepper: object, version: object) -> tuple[bytes, int]:
    # Pepper holds the one set of rules (size, zeros, version range).
    checked = Pepper(pepper, version=version)  # type: ignore[arg-type]
    return checked.secret, checked.version


def derive_key(pepper: bytes, purpose: bytes) -> bytes:
    """32 bytes for ``purpose``: HKDF-SHA256 of the pepper, info ``b"encx-async v1 " + purpose``.

    No salt: the pepper is already uniformly random, and HKDF's info alone
    separates the purposes (:data:`BLIND_INDEX_PURPOSE`, :data:`ARGON2_PURPOSE`,
    :func:`domain_purpose`).
    """
    if not isinstance(purpose, bytes) or not purpose:
        raise ConfigurationError("a key derivation purpose must be non-empty bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO + purpose)
    return hkdf.derive(bytes(pepper))


def domain_purpose(domain: object) -> bytes:
    """The key derivation purpose of a blind-index domain.

    :data:`BLIND_INDEX_DOMAIN_PURPOSE`, then each part of the domain as a
    4-byte big-endian length and its UTF-8: no two domains share one (the
    lengths say where each part ends), and ``"x"`` is the same as ``("x",)``.
    Raises ConfigurationError for anything but 1 to 8 non-empty strs of at
    most 1024 bytes each.
    """
    parts = (domain,) if isinstance(domain, str) else domain
    if (
        not isinstance(parts, tuple)
        or not 1 <= len(parts) <= _MAX_DOMAIN_PARTS
        or not all(isinstance(part, str) and part for part in parts)
    ):
        raise ConfigurationError(
            "a blind-index domain is a non-empty str, or a tuple of 1 to "
            f"{_MAX_DOMAIN_PARTS} of them (such as 'users.email')"
        )
    out = [BLIND_INDEX_DOMAIN_PURPOSE]
    for part in parts:
        try:
            data = part.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigurationError("a blind-index domain must be valid Unicode") from None
        if len(data) > _MAX_DOMAIN_PART:
            raise ConfigurationError(
                f"a blind-index domain part is at most {_MAX_DOMAIN_PART} bytes of UTF-8"
            )
        out += [_U32.pack(len(data)), data]
    return b"".join(out)


def _version_mismatch(kind: str, named: int, ours: int) -> InvalidHashError:
    return InvalidHashError(
        f"the {kind} names pepper version {named}; this hasher has pepper version {ours}"
    )


def _match(pattern: re.Pattern[str], stored: object, kind: tuple[str, str]) -> re.Match[str]:
    """``stored`` matched whole by ``pattern``; ``kind``: its name with an article, its shape.

    The messages name the kind of string, never any of it.
    """
    name, shape = kind
    if not isinstance(stored, str):
        raise InvalidHashError(f"{name} is a str, not {type(stored).__name__}")
    match = pattern.fullmatch(stored)
    if match is None:
        raise InvalidHashError(f"not an encx-async {name.split(' ', 1)[1]} ({shape})")
    return match


def _parse_blind_index(digest: object) -> tuple[bool, int]:
    """Whether ``digest`` is an hb1 (legacy) blind index, and its pepper version."""
    match = _match(_BLIND_INDEX, digest, _BLIND_INDEX_KIND)
    return match[1] == LEGACY_BLIND_INDEX_PREFIX, int(match[2])


class BasicHasher:
    """Deterministic blind indexes: HMAC-SHA256 of the encoded value, keyed per domain.

    Equal values give equal digests in one domain under one pepper, so a
    database column of them can be searched on equality; the pepper keeps them
    from being recomputed, or brute-forced, by anyone who does not hold it, and
    the domain keeps two columns from matching each other.
    """

    __slots__ = ("_legacy", "_legacy_prefix", "_lock", "_macs", "_prefix", "_prk", "pepper_version")

    def __init__(self, pepper: bytes, pepper_version: int) -> None:
        raw, self.pepper_version = _check_pepper(pepper, pepper_version)
        # HKDF's extract step, once: a domain's key is then one expand of it,
        # the same bytes as derive_key(pepper, domain_purpose(domain)).
        self._prk = HKDF.extract(hashes.SHA256(), None, raw)
        # Keyed once per domain; each hash copies the keyed state, the fastest
        # HMAC this Python offers (about 3x hmac.digest(), which re-keys).
        self._macs: dict[object, crypto_hmac.HMAC] = {}
        self._lock = threading.Lock()
        self._legacy = self._keyed(BLIND_INDEX_PURPOSE)
        self._prefix = f"{BLIND_INDEX_PREFIX}:{self.pepper_version}:".encode()
        self._legacy_prefix = f"{LEGACY_BLIND_INDEX_PREFIX}:{self.pepper_version}:".encode()

    def __repr__(self) -> str:
        return f"BasicHasher(pepper_version={self.pepper_version})"

    def _keyed(self, purpose: bytes) -> crypto_hmac.HMAC:
        key = HKDFExpand(hashes.SHA256(), 32, _HKDF_INFO + purpose).derive(self._prk)
        return crypto_hmac.HMAC(key, hashes.SHA256())

    def _add_domain(self, domain: object) -> crypto_hmac.HMAC:
        keyed = self._keyed(domain_purpose(domain))  # ConfigurationError if not a domain
        with self._lock:
            if len(self._macs) >= _DOMAIN_CACHE:
                del self._macs[next(iter(self._macs))]  # the oldest
            self._macs[domain] = keyed
        return keyed

    def hash(self, value: object, *, domain: Domain) -> str:
        """The blind index of ``value`` in ``domain``: ``hb2:<pepper version>:<base64url MAC>``.

        ``domain`` names the column (``"users.email"``): equal values in two
        domains give unrelated digests. Raises ConfigurationError for a domain
        that is not 1 to 8 non-empty strs.
        """
        try:
            keyed: crypto_hmac.HMAC | None = self._macs[domain]
        except (KeyError, TypeError):  # a domain not seen yet, or no domain at all
            keyed = None
        if keyed is None:  # out here, so no error raised for it holds a KeyError of the domain
            keyed = self._add_domain(domain)
        mac = keyed.copy()
        mac.update(encode_value(value))
        # b2a_base64 and a translate beat base64.urlsafe_b64encode by half.
        b64 = binascii.b2a_base64(mac.finalize(), newline=False)[:_MAC_B64_LEN]
        return (self._prefix + b64.translate(_URLSAFE)).decode("ascii")

    def _legacy_hash(self, value: object) -> str:
        mac = self._legacy.copy()
        mac.update(encode_value(value))
        b64 = binascii.b2a_base64(mac.finalize(), newline=False)[:_MAC_B64_LEN]
        return (self._legacy_prefix + b64.translate(_URLSAFE)).decode("ascii")

    def legacy_hash(self, value: object) -> str:
        """The hb1 blind index of ``value``: one key for every field, so avoid it.

        Only for finding rows whose digest is still hb1 while they are
        re-indexed (see :meth:`needs_reindex`). Warns DeprecationWarning.
        """
        warnings.warn(_LEGACY_WARNING, DeprecationWarning, stacklevel=2)
        return self._legacy_hash(value)

    def verify(self, value: object, digest: str, *, domain: Domain) -> bool:
        """Whether ``digest`` is the blind index of ``value`` in ``domain``, in constant time.

        An hb1 ``digest`` is checked against :meth:`legacy_hash`, whatever the
        domain. Raises InvalidHashError when ``digest`` is not a blind index,
        or names a pepper version other than this hasher's.
        """
        legacy, named = _parse_blind_index(digest)
        if named != self.pepper_version:
            raise _version_mismatch("blind index", named, self.pepper_version)
        if legacy:
            domain_purpose(domain)  # checked all the same: a bad call fails on every row
            expected = self._legacy_hash(value)
        else:
            expected = self.hash(value, domain=domain)
        return hmac.compare_digest(expected, digest)

    def needs_reindex(self, digest: str) -> bool:
        """Whether a stored ``digest`` should be replaced by a fresh :meth:`hash`.

        True for an hb1 digest (one key for every field) and for one made under
        an older pepper version; False for an hb2 digest of this hasher's
        version. Raises InvalidHashError when ``digest`` is not a blind index,
        or names a version above this hasher's (or 0): no pepper before this
        one made it, and recomputing it here would go backwards.
        """
        legacy, named = _parse_blind_index(digest)
        if not 1 <= named <= self.pepper_version:
            raise _version_mismatch("blind index", named, self.pepper_version)
        return legacy or named < self.pepper_version


def _weak(memory_kib: int, iterations: int) -> bool:
    return not any(memory_kib >= m and iterations >= t for m, t in OWASP_MINIMUMS)


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """Argon2id parameters for new hashes, and the bounds a stored hash must keep to.

    The defaults are OWASP's recommended configuration that needs the least
    memory (19 MiB, 2 passes, 1 lane; about 30 ms on a current server core):
    stronger settings cost every concurrent call that much more memory, which a
    service verifying many requests at once pays in full. Raise ``memory_kib``
    first if you can afford it.

    A stored hash is verified only when its memory, passes, lanes and memory x
    passes are at most ``max_memory_kib``, ``max_iterations``, ``max_lanes``
    and ``max_cost`` and, unless ``allow_weak``, at or above OWASP's minimum:
    anything else is refused with InvalidHashError before any work is done.
    Each bound left at None is :data:`BOUND_FACTOR` (4) times the configured
    value (``max_cost``: 4 x ``memory_kib`` x ``iterations``), so the costliest
    stored hash a verify accepts costs four times a normal one; set the bounds
    explicitly to keep accepting hashes of costlier settings you have left.
    ``allow_weak=True`` permits parameters below the minimum (fast tests);
    never in production.
    """

    memory_kib: int = 19456
    iterations: int = 2
    lanes: int = 1
    salt_bytes: int = 16
    hash_bytes: int = 32
    max_memory_kib: int | None = None
    max_iterations: int | None = None
    max_lanes: int | None = None
    allow_weak: bool = False
    max_cost: int | None = None
    #: the bounds in force: (memory KiB, passes, lanes, memory x passes)
    _bounds: tuple[int, int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("memory_kib", "iterations", "lanes", "salt_bytes", "hash_bytes"):
            _check_positive(name, getattr(self, name))
        for name in ("max_memory_kib", "max_iterations", "max_lanes", "max_cost"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if not isinstance(self.allow_weak, bool):
            raise ConfigurationError("Argon2Params.allow_weak must be a bool")
        if self.memory_kib < 8 * self.lanes:
            raise ConfigurationError("Argon2 needs at least 8 KiB of memory per lane")
        min_salt = _MIN_WEAK_SALT if self.allow_weak else _MIN_SALT
        if not min_salt <= self.salt_bytes <= _MAX_SALT:
            raise ConfigurationError(f"Argon2Params.salt_bytes must be {min_salt} to {_MAX_SALT}")
        if not _MIN_HASH <= self.hash_bytes <= _MAX_HASH:
            raise ConfigurationError(f"Argon2Params.hash_bytes must be {_MIN_HASH} to {_MAX_HASH}")
        if not self.allow_weak and (self.lanes < 1 or _weak(self.memory_kib, self.iterations)):
            raise ConfigurationError(
                f"Argon2id m={self.memory_kib} KiB, t={self.iterations} is below OWASP's "
                "minimum (m=19456 KiB with t=2, or an equivalent); pass allow_weak=True "
                "only for tests"
            )
        cost = self.memory_kib * self.iterations
        bounds = (
            _bound(self.max_memory_kib, self.memory_kib, _MAX_U32),
            _bound(self.max_iterations, self.iterations, _MAX_U32),
            _bound(self.max_lanes, self.lanes, _MAX_LANES),
            _bound(self.max_cost, cost, _MAX_U32 * _MAX_U32),
        )
        limits = (_MAX_U32, _MAX_U32, _MAX_LANES, _MAX_U32 * _MAX_U32)
        if any(bound > limit for bound, limit in zip(bounds, limits, strict=True)):
            raise ConfigurationError("Argon2Params bounds are beyond what Argon2 allows")
        for value, bound, what in (
            (self.memory_kib, bounds[0], "memory_kib"),
            (self.iterations, bounds[1], "iterations"),
            (self.lanes, bounds[2], "lanes"),
            (cost, bounds[3], "cost"),
        ):
            if value > bound:
                shown = " memory_kib x iterations" if what == "cost" else f".{what}"
                raise ConfigurationError(
                    f"Argon2Params{shown} is {value}, above its own bound max_{what}={bound}"
                )
        object.__setattr__(self, "_bounds", bounds)


def _check_positive(name: str, number: object) -> None:
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigurationError(f"Argon2Params.{name} must be a positive int")


def _bound(given: int | None, configured: int, limit: int) -> int:
    """The bound given, else BOUND_FACTOR times the configured value (within Argon2's limit)."""
    return min(BOUND_FACTOR * configured, limit) if given is None else given


@dataclass(frozen=True, slots=True)
class _Stored:
    memory_kib: int
    iterations: int
    lanes: int
    pepper_version: int
    salt_bytes: int
    hash_bytes: int
    #: the string without keyid, as cryptography reads it
    phc: str


def _b64_size(text: str) -> int | None:
    """The byte count of canonical unpadded standard base64, else None."""
    if len(text) % 4 == 1:
        return None
    try:
        raw = binascii.a2b_base64(text + "=" * (-len(text) % 4), strict_mode=True)
    except binascii.Error:
        return None
    if binascii.b2a_base64(raw, newline=False).rstrip(b"=") != text.encode():
        return None  # spare bits set: another string decodes to the same bytes
    return len(raw)


def _parse_phc(phc: object) -> _Stored:
    match = _match(_PHC, phc, _PHC_KIND)
    m, t, p, keyid = (int(group) for group in match.group(1, 2, 3, 4))
    salt, digest = match[5], match[6]
    salt_bytes, hash_bytes = _b64_size(salt), _b64_size(digest)
    if salt_bytes is None or hash_bytes is None:
        raise InvalidHashError("an Argon2id hash whose salt or hash is not canonical base64")
    return _Stored(
        m, t, p, keyid, salt_bytes, hash_bytes, f"$argon2id$v=19$m={m},t={t},p={p}${salt}${digest}"
    )


class SecureHasher:
    """Salted, slow Argon2id hashes, with the pepper's derived key as Argon2's secret.

    ``params`` sets the cost of new hashes and, through its ``max_`` fields,
    the most a stored hash may ask of :meth:`verify`. ``hash`` and ``verify``
    run Argon2id in a worker thread; ``limiter`` (an
    :class:`anyio.CapacityLimiter`) bounds how many run at once, and so the
    memory they hold; by default :func:`argon2_limiter`, one per CPU.
    """

    __slots__ = ("_limiter", "_secret", "params", "pepper_version")

    def __init__(
        self,
        pepper: bytes,
        pepper_version: int,
        params: Argon2Params | None = None,
        *,
        limiter: CapacityLimiter | None = None,
    ) -> None:
        raw, self.pepper_version = _check_pepper(pepper, pepper_version)
        if params is None:
            params = Argon2Params()
        if not isinstance(params, Argon2Params):
            raise ConfigurationError("params must be an encx_async Argon2Params")
        self.params = params
        self._secret = derive_key(raw, ARGON2_PURPOSE)
        self._limiter = limiter

    def __repr__(self) -> str:
        return f"SecureHasher(pepper_version={self.pepper_version}, params={self.params!r})"

    def _derive(self, data: bytes) -> str:
        with _lanes_guard(self.params.lanes):
            return self._derive_unguarded(data)

    def _derive_unguarded(self, data: bytes) -> str:
        params = self.params
        kdf = Argon2id(
            salt=os.urandom(params.salt_bytes),
            length=params.hash_bytes,
            iterations=params.iterations,
            lanes=params.lanes,
            memory_cost=params.memory_kib,
            secret=self._secret,
        )
        # "$argon2id$v=19$m=..,t=..,p=..$salt$hash": keyid goes after the parameters.
        _, _, version, costs, salt, digest = kdf.derive_phc_encoded(data).split("$")
        return f"$argon2id${version}${costs},keyid={self.pepper_version}${salt}${digest}"

    async def hash(self, value: object) -> str:
        """A new Argon2id hash of ``value``, with a fresh random salt."""
        data = encode_value(value)
        limiter = argon2_limiter() if self._limiter is None else self._limiter
        return await anyio.to_thread.run_sync(self._derive, data, limiter=limiter)

    def _check_bounds(self, stored: _Stored) -> None:
        params = self.params
        if stored.pepper_version != self.pepper_version:
            raise _version_mismatch("Argon2id hash", stored.pepper_version, self.pepper_version)
        if stored.memory_kib < 8 * stored.lanes:
            raise InvalidHashError("the stored Argon2id hash has under 8 KiB of memory per lane")
        max_memory, max_passes, max_lanes, max_cost = params._bounds
        for value, bound, what in (
            (stored.lanes, max_lanes, "lanes"),
            (stored.memory_kib, max_memory, "KiB of memory"),
            (stored.iterations, max_passes, "iterations"),
            (stored.memory_kib * stored.iterations, max_cost, "KiB x iterations"),
        ):
            if value > bound:
                raise InvalidHashError(
                    f"the stored Argon2id hash asks for {value:,} {what}; the bound is {bound:,}"
                )
        min_salt = _MIN_WEAK_SALT if params.allow_weak else _MIN_SALT
        if not min_salt <= stored.salt_bytes <= _MAX_SALT:
            raise InvalidHashError(
                f"the stored Argon2id hash has a {stored.salt_bytes}-byte salt; "
                f"{min_salt} to {_MAX_SALT} are accepted"
            )
        if not _MIN_HASH <= stored.hash_bytes <= _MAX_HASH:
            raise InvalidHashError(
                f"the stored Argon2id hash is {stored.hash_bytes} bytes; "
                f"{_MIN_HASH} to {_MAX_HASH} are accepted"
            )
        if not params.allow_weak and _weak(stored.memory_kib, stored.iterations):
            # Nothing here makes such a hash without allow_weak: it was tampered with.
            raise InvalidHashError(
                f"the stored Argon2id hash (m={stored.memory_kib}, t={stored.iterations}) "
                "is below OWASP's minimum"
            )

    def _matches(self, data: bytes, phc: str, lanes: int) -> bool:
        try:
            with _lanes_guard(lanes):
                Argon2id.verify_phc_encoded(data, phc, secret=self._secret)
        except InvalidKey:
            return False
        return True

    async def verify(self, value: object, phc: str) -> bool:
        """Whether ``phc`` is an Argon2id hash of ``value``.

        Raises InvalidHashError when ``phc`` is malformed, names another pepper
        version, or has parameters outside the bounds of :attr:`params` (by
        default four times its own cost): before any Argon2 work is done.
        """
        stored = _parse_phc(phc)
        self._check_bounds(stored)
        data = encode_value(value)
        limiter = argon2_limiter() if self._limiter is None else self._limiter
        return await anyio.to_thread.run_sync(
            self._matches, data, stored.phc, stored.lanes, limiter=limiter
        )

    def needs_rehash(self, phc: str) -> bool:
        """Whether ``phc`` was made with other parameters or another pepper version.

        True means: after a successful :meth:`verify`, store ``await hash(value)``
        in its place. Raises InvalidHashError when ``phc`` is malformed.
        """
        stored = _parse_phc(phc)
        params = self.params
        return (
            stored.pepper_version != self.pepper_version
            or stored.memory_kib != params.memory_kib
            or stored.iterations != params.iterations
            or stored.lanes != params.lanes
            or stored.salt_bytes != params.salt_bytes
            or stored.hash_bytes != params.hash_bytes
        )
