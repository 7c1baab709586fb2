"""Blind indexes and Argon2id hashes: vectors, verification, and hostile stored hashes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from encx_async import ConfigurationError, InvalidHashError, InvalidValueError
from encx_async._hashing import (
    ARGON2_PURPOSE,
    BLIND_INDEX_DOMAIN_PURPOSE,
    BLIND_INDEX_PURPOSE,
    OWASP_MINIMUMS,
    Argon2Params,
    BasicHasher,
    Domain,
    SecureHasher,
    argon2_limiter,
    derive_key,
    domain_purpose,
)
from encx_async._values import encode_value

PEPPER = bytes(range(1, 33))
OTHER_PEPPER = bytes(range(101, 133))
# Fast enough for many tests; the defaults get their own tests below.
FAST = Argon2Params(memory_kib=64, iterations=1, lanes=1, allow_weak=True)
VALUE = "jane.doe@example.com"


@pytest.fixture
def basic() -> BasicHasher:
    return BasicHasher(PEPPER, 1)


@pytest.fixture
def secure() -> SecureHasher:
    return SecureHasher(PEPPER, 1, FAST)


# -- key derivation -----------------------------------------------------------------


def test_derived_keys_are_hkdf_sha256_of_the_pepper_per_purpose() -> None:
    for purpose in (BLIND_INDEX_PURPOSE, ARGON2_PURPOSE):
        expected = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"encx-async v1 " + purpose
        ).derive(PEPPER)
        assert derive_key(PEPPER, purpose) == expected
    assert derive_key(PEPPER, BLIND_INDEX_PURPOSE) != derive_key(PEPPER, ARGON2_PURPOSE)
    assert PEPPER not in (derive_key(PEPPER, BLIND_INDEX_PURPOSE), derive_key(PEPPER, b"x"))


@pytest.mark.parametrize(
    ("pepper", "version", "words"),
    [
        (b"short", 1, "32 bytes"),
        (bytes(32), 1, "all zero"),
        ("a" * 32, 1, "bytes"),
        (PEPPER, 0, "1 to"),
        (PEPPER, 2**31, "1 to"),
        (PEPPER, True, "int"),
        (PEPPER, "1", "int"),
    ],
)
def test_bad_peppers_and_versions_are_refused(pepper: object, version: object, words: str) -> None:
    for make in (BasicHasher, SecureHasher):
        with pytest.raises(ConfigurationError, match=words):
            make(pepper, version)  # type: ignore[arg-type]


# -- blind index ----------------------------------------------------------------------

DOMAIN = "users.email"
OTHER_DOMAIN = "users.nickname"


def by_hand(pepper: bytes, info: bytes, value: object, prefix: str) -> str:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(pepper)
    mac = hmac.new(key, encode_value(value), hashlib.sha256).digest()
    return prefix + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def legacy(hasher: BasicHasher, value: object) -> str:
    with pytest.warns(DeprecationWarning, match="share one key"):
        return hasher.legacy_hash(value)


def test_blind_index_vector_matches_an_independent_computation(basic: BasicHasher) -> None:
    info = b"encx-async v1 blind index domain" + b"\x00\x00\x00\x0b" + b"users.email"
    expected = by_hand(PEPPER, info, VALUE, "hb2:1:")
    assert basic.hash(VALUE, domain=DOMAIN) == expected
    two_parts = b"encx-async v1 blind index domain\x00\x00\x00\x04User\x00\x00\x00\x05email"
    assert basic.hash(VALUE, domain=("User", "email")) == by_hand(
        PEPPER, two_parts, VALUE, "hb2:1:"
    )
    # Pinned, so a change to the encoding or the derivation cannot pass unnoticed.
    assert expected == "hb2:1:0d9OlaawiQ6BN3rF0ea5zVOA_tsKfw1FfAnV9KTnFkY"


def test_legacy_blind_index_vector_is_unchanged(basic: BasicHasher) -> None:
    expected = by_hand(PEPPER, b"encx-async v1 blind index", VALUE, "hb1:1:")
    assert legacy(basic, VALUE) == expected == "hb1:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E"


def test_domain_keys_are_hkdf_of_the_pepper_with_the_domain_in_info(basic: BasicHasher) -> None:
    for domain in (DOMAIN, ("User", "email"), ("é", "x" * 1024)):
        purpose = domain_purpose(domain)
        key = derive_key(PEPPER, purpose)
        mac = hmac.new(key, encode_value(VALUE), hashlib.sha256).digest()
        assert basic.hash(VALUE, domain=domain).endswith(
            base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        )
    assert domain_purpose("ab") == BLIND_INDEX_DOMAIN_PURPOSE + b"\x00\x00\x00\x02ab"


def test_blind_index_is_deterministic_and_shaped(basic: BasicHasher) -> None:
    digest = basic.hash(VALUE, domain=DOMAIN)
    assert (
        digest
        == basic.hash(VALUE, domain=DOMAIN)
        == BasicHasher(PEPPER, 1).hash(VALUE, domain=DOMAIN)
    )
    assert re.fullmatch(r"hb2:1:[A-Za-z0-9_-]{43}", digest)
    assert BasicHasher(PEPPER, 7).hash(VALUE, domain=DOMAIN).startswith("hb2:7:")


def test_blind_index_separates_values_types_and_peppers(basic: BasicHasher) -> None:
    values = (VALUE, VALUE.upper(), 1, True, "1", b"1", [1], None, 1.0)
    assert len({basic.hash(v, domain=DOMAIN) for v in values}) == 9
    assert basic.hash(VALUE, domain=DOMAIN) != BasicHasher(OTHER_PEPPER, 1).hash(
        VALUE, domain=DOMAIN
    )


def test_equal_values_in_two_domains_give_unrelated_digests(basic: BasicHasher) -> None:
    domains: list[Domain] = [
        DOMAIN,
        OTHER_DOMAIN,
        "Users.email",  # compared exactly
        ("users", "email"),
        ("users.", "email"),
        ("users", ".email"),
        ("ab", "c"),
        ("a", "bc"),
        ("abc",),
        ("a", "b", "c"),
    ]
    digests = [basic.hash(VALUE, domain=d) for d in domains]
    macs = {d.split(":")[2] for d in digests}
    assert len(macs) == len(domains)
    assert legacy(basic, VALUE).split(":")[2] not in macs
    # A str is the one-part tuple of itself; a tuple's parts are not joined.
    assert basic.hash(VALUE, domain=("abc",)) == basic.hash(VALUE, domain="abc")
    assert basic.hash(VALUE, domain=("users", "email")) != basic.hash(VALUE, domain="usersemail")


def test_blind_index_verify(basic: BasicHasher) -> None:
    digest = basic.hash(VALUE, domain=DOMAIN)
    assert basic.verify(VALUE, digest, domain=DOMAIN) is True
    assert basic.verify(VALUE + " ", digest, domain=DOMAIN) is False
    assert basic.verify(VALUE, digest, domain=OTHER_DOMAIN) is False
    assert BasicHasher(OTHER_PEPPER, 1).verify(VALUE, digest, domain=DOMAIN) is False


def test_hb1_digests_still_verify_whatever_the_domain(basic: BasicHasher) -> None:
    old = "hb1:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E"  # made before domains existed
    for domain in (DOMAIN, OTHER_DOMAIN, ("any", "thing")):
        assert basic.verify(VALUE, old, domain=domain) is True
        assert basic.verify(VALUE + "x", old, domain=domain) is False
    assert BasicHasher(OTHER_PEPPER, 1).verify(VALUE, old, domain=DOMAIN) is False
    with pytest.raises(ConfigurationError, match="domain"):
        basic.verify(VALUE, old, domain="")  # checked all the same


def test_a_domain_is_required() -> None:
    hasher: Any = BasicHasher(PEPPER, 1)
    with pytest.raises(TypeError, match="domain"):
        hasher.hash(VALUE)
    with pytest.raises(TypeError, match="domain"):
        hasher.verify(VALUE, "hb1:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E")


@pytest.mark.parametrize(
    "domain",
    [
        "",
        (),
        ("",),
        ("users", ""),
        ("users", 1),
        ["users", "email"],
        None,
        1,
        b"users.email",
        "\ud800",  # a lone surrogate has no UTF-8
        "x" * 1025,
        ("x",) * 9,
        ({"users"},),
    ],
)
def test_bad_domains_are_refused(basic: BasicHasher, domain: object) -> None:
    digest = basic.hash(VALUE, domain=DOMAIN)
    for attempt in (
        lambda: basic.hash(VALUE, domain=domain),  # type: ignore[arg-type]
        lambda: basic.verify(VALUE, digest, domain=domain),  # type: ignore[arg-type]
        lambda: domain_purpose(domain),
    ):
        with pytest.raises(ConfigurationError, match="domain") as caught:
            attempt()
        assert VALUE not in str(caught.value)
    assert len(basic._macs) == 1  # nothing was cached for it


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "hb1:1:",
        "hb2:1:",
        "hb3:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",
        "HB2:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",
        "hb2:01:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",
        "hb2:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E=",
        "hb2:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0",  # a character short
        "hb2:1:TtEROpPQCSJ/aygG9/gCeqTsiYaJ0Ly5ReBmUSPip0E",  # standard, not url-safe, base64
        "hb2:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0F",  # spare bits set
        "hb2:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E0",  # a character long
        "hb2:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E\n",
        "hb2:1:users.email:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",
        "hb2::TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",
        "hb2:12345678901:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",
        "hb2:\u0661:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",  # an Arabic-Indic one
        " hb2:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",
        "hb1:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0F",
        "hb1:01:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E",
    ],
)
def test_malformed_digests_are_refused_without_echoing_them(
    basic: BasicHasher, digest: str
) -> None:
    attempts: list[Callable[[], bool]] = [
        lambda: basic.verify(VALUE, digest, domain=DOMAIN),
        lambda: basic.needs_reindex(digest),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidHashError, match="not an encx-async blind index") as caught:
            attempt()
        message = str(caught.value)
        assert VALUE not in message
        assert "TtEROp" not in message
        assert "users.email" not in message


@pytest.mark.parametrize("digest", [None, b"hb2:1:xx", 12])
def test_blind_index_verify_refuses_non_str(basic: BasicHasher, digest: object) -> None:
    with pytest.raises(InvalidHashError, match="str"):
        basic.verify(VALUE, digest, domain=DOMAIN)  # type: ignore[arg-type]
    with pytest.raises(InvalidHashError, match="str"):
        basic.needs_reindex(digest)  # type: ignore[arg-type]


def test_blind_index_of_another_pepper_version_is_refused_naming_both(basic: BasicHasher) -> None:
    for digest in (
        BasicHasher(OTHER_PEPPER, 2).hash(VALUE, domain=DOMAIN),
        legacy(BasicHasher(OTHER_PEPPER, 2), VALUE),
    ):
        with pytest.raises(InvalidHashError, match=r"names pepper version 2.*has pepper version 1"):
            basic.verify(VALUE, digest, domain=DOMAIN)


def test_needs_reindex() -> None:
    old_pepper, new_pepper = BasicHasher(OTHER_PEPPER, 1), BasicHasher(PEPPER, 2)
    current = new_pepper.hash(VALUE, domain=DOMAIN)
    assert new_pepper.needs_reindex(current) is False
    assert new_pepper.needs_reindex(legacy(new_pepper, VALUE)) is True  # hb1, this pepper
    assert new_pepper.needs_reindex(legacy(old_pepper, VALUE)) is True
    assert new_pepper.needs_reindex(old_pepper.hash(VALUE, domain=DOMAIN)) is True  # older pepper
    # Nothing before this pepper made these: recomputing them here would go backwards.
    for never_ours in (current.replace("hb2:2:", "hb2:3:"), current.replace("hb2:2:", "hb2:0:")):
        with pytest.raises(InvalidHashError, match="pepper version"):
            new_pepper.needs_reindex(never_ours)


def test_legacy_hash_warns_each_call(basic: BasicHasher) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        basic.legacy_hash(VALUE)
        basic.legacy_hash(VALUE)
    assert [w.category for w in caught] == [DeprecationWarning, DeprecationWarning]
    assert caught[0].filename == __file__  # it points at the caller


def test_unsupported_values_are_refused_by_both_hashers(basic: BasicHasher) -> None:
    with pytest.raises(InvalidValueError, match="set"):
        basic.hash({VALUE}, domain=DOMAIN)
    with pytest.raises(InvalidValueError, match="set"):
        basic.verify({VALUE}, basic.hash(VALUE, domain=DOMAIN), domain=DOMAIN)


def test_a_domain_key_is_derived_once_not_per_call(
    basic: BasicHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    derived: list[bytes] = []
    real = HKDFExpand.derive

    def counting(self: HKDFExpand, key_material: bytes) -> bytes:
        derived.append(key_material)
        return real(self, key_material)

    monkeypatch.setattr(HKDFExpand, "derive", counting)
    for i in range(100):
        basic.hash(f"{VALUE}{i}", domain=DOMAIN)
        basic.verify(VALUE, basic.hash(VALUE, domain=("User", "email")), domain=("User", "email"))
    assert len(derived) == 2


def test_the_domain_cache_is_bounded_and_stays_right_under_threads() -> None:
    hasher = BasicHasher(PEPPER, 1)
    domains = [f"tenant-{i}.email" for i in range(1500)]  # more than the cache keeps
    expected = {d: hasher.hash(VALUE, domain=d) for d in domains}
    assert len(hasher._macs) == 1024
    fresh = BasicHasher(PEPPER, 1)

    def work(offset: int) -> list[bool]:
        return [
            fresh.hash(VALUE, domain=d) == expected[d] for d in domains[offset:] + domains[:offset]
        ]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, (0, 400, 800, 1200)))
    assert all(all(r) for r in results)
    assert len(fresh._macs) <= 1024


# -- Argon2id -------------------------------------------------------------------------

PHC = re.compile(
    r"\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+),keyid=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


async def test_secure_round_trip(secure: SecureHasher) -> None:
    phc = await secure.hash(VALUE)
    match = PHC.fullmatch(phc)
    assert match is not None
    assert match.groups()[:4] == ("64", "1", "1", "1")
    assert await secure.verify(VALUE, phc) is True
    assert await secure.verify(VALUE + "x", phc) is False
    assert await secure.verify([VALUE], phc) is False
    assert await SecureHasher(OTHER_PEPPER, 1, FAST).verify(VALUE, phc) is False


async def test_secure_hashes_are_salted(secure: SecureHasher) -> None:
    first, second = await secure.hash(VALUE), await secure.hash(VALUE)
    assert first != second
    assert await secure.verify(VALUE, first)
    assert await secure.verify(VALUE, second)


async def test_secure_hash_is_standard_argon2id_with_the_derived_secret(
    secure: SecureHasher,
) -> None:
    phc = await secure.hash(VALUE)
    standard = phc.replace(",keyid=1", "")
    secret = derive_key(PEPPER, b"argon2 secret")
    Argon2id.verify_phc_encoded(encode_value(VALUE), standard, secret=secret)  # no error


async def test_default_parameters_round_trip() -> None:
    hasher = SecureHasher(PEPPER, 3)
    assert hasher.params == Argon2Params(memory_kib=19456, iterations=2, lanes=1)
    phc = await hasher.hash(VALUE)
    assert phc.startswith("$argon2id$v=19$m=19456,t=2,p=1,keyid=3$")
    assert await hasher.verify(VALUE, phc)
    assert not hasher.needs_rehash(phc)


async def test_secure_hash_does_not_block_the_event_loop() -> None:
    hasher = SecureHasher(PEPPER, 1)  # default parameters: tens of ms per hash
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(hasher.hash(f"{VALUE}{i}") for i in range(5)))
    done = True
    await task
    assert len(set(results)) == 5
    # Had the hashes run on the loop, the ticker would have run between them only.
    assert ticks > 100


async def test_argon2_runs_one_call_per_cpu_by_default() -> None:
    limiter = argon2_limiter()
    assert limiter is argon2_limiter()  # one per event loop, shared by every hasher
    assert 1 <= limiter.total_tokens <= (os.cpu_count() or 1)
    hasher = SecureHasher(PEPPER, 1, FAST)
    await asyncio.gather(*(hasher.hash(VALUE) for _ in range(8)))
    assert limiter.borrowed_tokens == 0


async def test_a_given_limiter_bounds_the_calls() -> None:
    limiter = anyio.CapacityLimiter(1)
    hasher = SecureHasher(PEPPER, 1, FAST, limiter=limiter)
    results = await asyncio.gather(*(hasher.hash(VALUE) for _ in range(4)))
    assert all([await hasher.verify(VALUE, phc) for phc in results])
    assert limiter.borrowed_tokens == 0


async def test_secure_verify_of_another_pepper_version_is_refused(secure: SecureHasher) -> None:
    phc = await SecureHasher(PEPPER, 2, FAST).hash(VALUE)
    with pytest.raises(InvalidHashError, match=r"names pepper version 2.*has pepper version 1"):
        await secure.verify(VALUE, phc)


async def test_needs_rehash(secure: SecureHasher) -> None:
    phc = await secure.hash(VALUE)
    assert not secure.needs_rehash(phc)
    for params in (
        Argon2Params(memory_kib=128, iterations=1, lanes=1, allow_weak=True),
        Argon2Params(memory_kib=64, iterations=2, lanes=1, allow_weak=True),
        Argon2Params(memory_kib=64, iterations=1, lanes=2, allow_weak=True),
        Argon2Params(memory_kib=64, iterations=1, lanes=1, salt_bytes=32, allow_weak=True),
        Argon2Params(memory_kib=64, iterations=1, lanes=1, hash_bytes=16, allow_weak=True),
        Argon2Params(),
    ):
        assert SecureHasher(PEPPER, 1, params).needs_rehash(phc), params
    assert SecureHasher(PEPPER, 2, FAST).needs_rehash(phc)
    with pytest.raises(InvalidHashError):
        secure.needs_rehash("$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA")


SALT = "c2FsdHNhbHRzYWx0c2FsdA"  # 16 bytes
HASH = "aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"  # 32 bytes


def phc(params: str = "m=64,t=1,p=1,keyid=1", salt: str = SALT, digest: str = HASH) -> str:
    return f"$argon2id$v=19${params}${salt}${digest}"


@pytest.mark.parametrize(
    ("stored", "words"),
    [
        (phc("m=4194304,t=1,p=1,keyid=1"), "4,194,304 KiB of memory"),
        (phc("m=64,t=1000000,p=1,keyid=1"), "1,000,000 iterations"),
        (phc("m=4096,t=1,p=255,keyid=1"), "255 lanes"),
        (phc("m=64,t=1,p=9,keyid=1"), "8 KiB of memory per lane"),
        (phc("m=" + "9" * 30 + ",t=1,p=1,keyid=1"), "not an encx-async Argon2id hash"),
        (phc("m=064,t=1,p=1,keyid=1"), "not an encx-async"),
        (phc("m=64,t=01,p=1,keyid=1"), "not an encx-async"),
        (phc("m=64,t=1,p=1,keyid=01"), "not an encx-async"),
        (phc("m=0,t=1,p=1,keyid=1"), "not an encx-async"),
        (phc("m=64,t=1,p=1"), "not an encx-async"),
        (phc("t=1,m=64,p=1,keyid=1"), "not an encx-async"),
        (phc("m=64,t=1,p=1,keyid=1,data=AAAA"), "not an encx-async"),
        (phc().replace("argon2id", "argon2i"), "not an encx-async"),
        (phc().replace("argon2id", "argon2d"), "not an encx-async"),
        (phc().replace("v=19", "v=16"), "not an encx-async"),
        (phc().replace("$v=19", ""), "not an encx-async"),
        (phc(salt=""), "not an encx-async"),
        (phc(digest=""), "not an encx-async"),
        (phc(salt=SALT + "=="), "not an encx-async"),
        (phc(salt=SALT.replace("c", "-")), "not an encx-async"),
        (phc(salt="A" * 4000), "not an encx-async"),
        (phc(digest="A" * 4000), "not an encx-async"),
        (phc(salt="c2FsdHNhbHRzYWx0c2FsdB"), "canonical base64"),  # spare bits set
        (phc(salt="c2FsdHNhbHRzYWx0c2FsdAB"), "canonical base64"),  # 4n+1 characters
        (phc(digest="aGFzaGhhc2g"), "8 bytes"),
        (phc() + "$", "not an encx-async"),
        (phc() + "\n", "not an encx-async"),
        (" " + phc(), "not an encx-async"),
        ("", "not an encx-async"),
        ("hb1:1:TtEROpPQCSJ_aygG9_gCeqTsiYaJ0Ly5ReBmUSPip0E", "not an encx-async"),
    ],
)
async def test_hostile_stored_hashes_are_refused_before_any_work(
    secure: SecureHasher, stored: str, words: str
) -> None:
    with pytest.raises(InvalidHashError, match=re.escape(words)):
        await secure.verify(VALUE, stored)


@pytest.mark.parametrize("stored", [None, b"$argon2id$", 5])
async def test_secure_verify_refuses_non_str(secure: SecureHasher, stored: object) -> None:
    with pytest.raises(InvalidHashError, match="str"):
        await secure.verify(VALUE, stored)  # type: ignore[arg-type]


async def test_short_salts_are_refused_by_a_strict_hasher() -> None:
    stored = phc("m=19456,t=2,p=1,keyid=1", salt="c2FsdHNhbHQ")  # 8 bytes
    with pytest.raises(InvalidHashError, match="8-byte salt"):
        await SecureHasher(PEPPER, 1).verify(VALUE, stored)


async def test_weak_stored_hashes_are_refused_by_a_strict_hasher() -> None:
    weak = await SecureHasher(PEPPER, 1, FAST).hash(VALUE)
    with pytest.raises(InvalidHashError, match="below OWASP's minimum"):
        await SecureHasher(PEPPER, 1).verify(VALUE, weak)


@pytest.fixture
def argon2_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Argon2id verification started; each answers "no match" without the work."""
    calls: list[str] = []

    def counting(key_material: bytes, phc: str, secret: bytes | None = None) -> None:
        calls.append(phc)
        raise InvalidKey

    monkeypatch.setattr(
        "encx_async._hashing.Argon2id.verify_phc_encoded", staticmethod(counting), raising=True
    )
    return calls


@pytest.mark.parametrize(
    ("params", "words"),
    [
        # In the old fixed bounds: 128x the work (seconds) and 256 MiB of a normal verify.
        ("m=262144,t=16,p=1", "262,144 KiB of memory; the bound is 77,824"),
        ("m=77825,t=2,p=1", "77,825 KiB of memory"),
        ("m=19456,t=9,p=1", "9 iterations; the bound is 8"),
        ("m=19456,t=2,p=5", "5 lanes; the bound is 4"),
        # Memory and passes each within their bound, together 16x the work.
        ("m=77824,t=8,p=1", "622,592 KiB x iterations; the bound is 155,648"),
        ("m=40000,t=4,p=1", "160,000 KiB x iterations"),
    ],
)
async def test_stored_hashes_beyond_the_default_bounds_cost_no_argon2_work(
    params: str, words: str, argon2_calls: list[str]
) -> None:
    hasher = SecureHasher(PEPPER, 1)
    with pytest.raises(InvalidHashError, match=re.escape(words)) as caught:
        await hasher.verify(VALUE, phc(f"{params},keyid=1"))
    assert argon2_calls == []
    assert HASH not in str(caught.value)
    assert hasher.needs_rehash(phc(f"{params},keyid=1"))


@pytest.mark.parametrize(
    "params",
    [
        "m=19456,t=2,p=1",  # the defaults
        "m=47104,t=1,p=1",  # OWASP's other configurations
        "m=12288,t=3,p=1",
        "m=9216,t=4,p=1",
        "m=7168,t=5,p=1",
        "m=77824,t=2,p=1",  # at the bounds
        "m=19456,t=8,p=1",
        "m=38912,t=4,p=4",
    ],
)
async def test_stored_hashes_within_the_default_bounds_reach_argon2(
    params: str, argon2_calls: list[str]
) -> None:
    assert await SecureHasher(PEPPER, 1).verify(VALUE, phc(f"{params},keyid=1")) is False
    assert argon2_calls == [phc(params)]


async def test_explicit_bounds_replace_the_derived_ones(argon2_calls: list[str]) -> None:
    costly = phc("m=262144,t=16,p=16,keyid=1")
    wide = Argon2Params(
        max_memory_kib=262144, max_iterations=16, max_lanes=16, max_cost=262144 * 16
    )
    assert await SecureHasher(PEPPER, 1, wide).verify(VALUE, costly) is False
    assert len(argon2_calls) == 1
    # Each bound on its own: the others stay derived from the configured cost.
    with pytest.raises(InvalidHashError, match="KiB x iterations"):
        await SecureHasher(PEPPER, 1, Argon2Params(max_memory_kib=262144)).verify(
            VALUE, phc("m=262144,t=2,p=1,keyid=1")
        )
    # Derived bounds follow the configured cost: 4 x 65536 KiB, 4 x 3 passes.
    stronger = SecureHasher(PEPPER, 1, Argon2Params(memory_kib=65536, iterations=3))
    assert await stronger.verify(VALUE, phc("m=262144,t=3,p=1,keyid=1")) is False
    assert len(argon2_calls) == 2


async def test_hashes_of_the_defaults_verify_after_a_move_to_other_owasp_settings() -> None:
    stored = await SecureHasher(PEPPER, 1).hash(VALUE)
    for memory_kib, iterations in OWASP_MINIMUMS:
        hasher = SecureHasher(PEPPER, 1, Argon2Params(memory_kib=memory_kib, iterations=iterations))
        assert await hasher.verify(VALUE, stored), (memory_kib, iterations)
        assert hasher.needs_rehash(stored) is ((memory_kib, iterations) != (19456, 2))


async def test_hash_error_messages_never_hold_the_value_or_the_hash(secure: SecureHasher) -> None:
    stored = await secure.hash(VALUE)
    salt_and_hash = stored.split("$", 4)[4]
    tampered = [
        stored.replace("m=64", "m=999999999"),
        stored.replace("keyid=1", "keyid=5"),
        stored + "$x",
        stored.replace("argon2id", "argon2i"),
    ]
    for bad in tampered:
        with pytest.raises(InvalidHashError) as caught:
            await secure.verify(VALUE, bad)
        message = str(caught.value)
        assert VALUE not in message
        assert salt_and_hash.split("$")[0] not in message
        assert salt_and_hash.split("$")[1] not in message


# -- parameters -----------------------------------------------------------------------


def test_default_parameters_meet_owasp() -> None:
    params = Argon2Params()
    assert (params.memory_kib, params.iterations, params.lanes) == (19456, 2, 1)
    assert (params.salt_bytes, params.hash_bytes) == (16, 32)
    assert (params.max_memory_kib, params.max_iterations, params.max_lanes) == (None, None, None)
    assert params.max_cost is None
    # Four times the configured memory, passes, lanes and memory x passes.
    assert params._bounds == (4 * 19456, 4 * 2, 4 * 1, 4 * 19456 * 2)
    Argon2Params(memory_kib=47104, iterations=1)  # OWASP's other configurations
    Argon2Params(memory_kib=7168, iterations=5)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"memory_kib": 19455}, "below OWASP"),
        ({"iterations": 1}, "below OWASP"),
        ({"memory_kib": 7168, "iterations": 4}, "below OWASP"),
        ({"memory_kib": 0, "allow_weak": True}, "positive"),
        ({"iterations": -1}, "positive"),
        ({"lanes": True}, "positive"),
        ({"memory_kib": 1.5e6}, "positive"),
        ({"memory_kib": 16, "lanes": 4, "allow_weak": True}, "8 KiB"),
        ({"salt_bytes": 8}, "salt_bytes"),
        ({"salt_bytes": 65}, "salt_bytes"),
        ({"hash_bytes": 8}, "hash_bytes"),
        ({"memory_kib": 300000, "max_memory_kib": 262144}, "max_memory_kib"),
        ({"iterations": 17, "max_iterations": 16}, "max_iterations"),
        ({"lanes": 17, "max_lanes": 16}, "max_lanes"),
        ({"memory_kib": 47104, "iterations": 2, "max_cost": 47104}, "max_cost"),
        ({"max_cost": 0}, "positive"),
        ({"max_lanes": True}, "positive"),
        ({"max_iterations": 2.0}, "positive"),
        ({"max_lanes": 2**24}, "beyond what Argon2 allows"),
        ({"allow_weak": 1}, "bool"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        Argon2Params(**kwargs)  # type: ignore[arg-type]


def test_weak_parameters_need_allow_weak() -> None:
    assert Argon2Params(memory_kib=8, iterations=1, salt_bytes=8, allow_weak=True).allow_weak
    with pytest.raises(ConfigurationError, match="allow_weak"):
        Argon2Params(memory_kib=8, iterations=1)


def test_params_must_be_argon2_params() -> None:
    with pytest.raises(ConfigurationError, match="Argon2Params"):
        SecureHasher(PEPPER, 1, {"memory_kib": 64})  # type: ignore[arg-type]


def test_reprs_show_versions_and_numbers_only() -> None:
    basic = BasicHasher(PEPPER, 4)
    basic.hash(VALUE, domain=DOMAIN)
    for hasher in (basic, SecureHasher(PEPPER, 4, FAST)):
        text = repr(hasher)
        assert "pepper_version=4" in text
        assert DOMAIN not in text
        for secret in (
            PEPPER,
            derive_key(PEPPER, BLIND_INDEX_PURPOSE),
            derive_key(PEPPER, domain_purpose(DOMAIN)),
            basic._prk,
        ):
            for shown in (secret.hex(), repr(secret), base64.b64encode(secret).decode()):
                assert shown not in text
        assert not hasattr(hasher, "__dict__")
    assert repr(FAST) == (
        "Argon2Params(memory_kib=64, iterations=1, lanes=1, salt_bytes=16, hash_bytes=32, "
        "max_memory_kib=None, max_iterations=None, max_lanes=None, allow_weak=True, "
        "max_cost=None)"
    )


# -- verification takes no shortcut --------------------------------------------
# A verify that compared strings with == would leak, through timing, how much of
# a guess is right; these check both verifies go through constant-time code.


def test_verify_basic_compares_through_compare_digest(
    basic: BasicHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr("encx_async._hashing.hmac.compare_digest", spy)
    digest = basic.hash("alice@example.com", domain=DOMAIN)
    assert basic.verify("alice@example.com", digest, domain=DOMAIN)
    assert not basic.verify("mallory@example.com", digest, domain=DOMAIN)
    old = legacy(basic, "alice@example.com")
    assert basic.verify("alice@example.com", old, domain=DOMAIN)
    assert len(seen) == 3
    assert [b for _, b in seen] == [digest, digest, old]


async def test_verify_secure_leaves_the_comparison_to_argon2(
    secure: SecureHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = Argon2id.verify_phc_encoded

    def spy(key_material: bytes, phc: str, secret: bytes | None = None) -> None:
        calls.append(phc)
        real(key_material, phc, secret=secret)

    monkeypatch.setattr(
        "encx_async._hashing.Argon2id.verify_phc_encoded", staticmethod(spy), raising=True
    )
    phc = await secure.hash("correct horse")
    assert await secure.verify("correct horse", phc)
    assert not await secure.verify("wrong horse", phc)
    assert len(calls) == 2
    assert all("keyid" not in c for c in calls)  # our addition is stripped first


async def test_concurrent_multi_lane_hashes_finish() -> None:
    # Two multi-lane Argon2id calls at once can deadlock inside OpenSSL; they take turns.
    params = Argon2Params(memory_kib=1024, iterations=1, lanes=2, allow_weak=True)
    hasher = SecureHasher(PEPPER, 1, params, limiter=anyio.CapacityLimiter(4))
    with anyio.fail_after(60):
        hashes = await asyncio.gather(*(hasher.hash(f"v{i}") for i in range(4)))
        assert all(await asyncio.gather(*(hasher.verify(f"v{i}", h) for i, h in enumerate(hashes))))


def test_memory_bounds_fit_argon2() -> None:
    with pytest.raises(ConfigurationError):
        Argon2Params(memory_kib=2**32 + 5, max_memory_kib=2**33)
