"""The readiness probe behind :meth:`Crypto.check <encx_async.Crypto.check>`.

It asks the KMS about the current KEK (``DescribeKey`` where the provider has
it) and reports what it found instead of raising, because the caller is a
readiness endpoint that wants to answer 503 with a reason, not a traceback.
Nothing is decrypted and no data key is unwrapped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ._exceptions import (
    ConfigurationError,
    EncxError,
    KMSAccessDeniedError,
    KMSError,
    KMSKeyNotFoundError,
    KMSUnavailableError,
)
from .kms import KeyManagementService

__all__ = ["DEFAULT_CHECK_TIMEOUT", "HealthReport", "run_check"]

logger = logging.getLogger("encx_async.health")

#: Seconds :meth:`Crypto.check` waits for the KMS by default: below the usual
#: readiness-probe timeout (Kubernetes allows 1 s by default, load balancers 5 s).
DEFAULT_CHECK_TIMEOUT = 2.0

Method = Literal["describe_key", "encrypt_dek"]
CallKMS = Callable[[str, Awaitable[Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthReport:
    """What :meth:`Crypto.check <encx_async.Crypto.check>` found.

    It names the KEK by alias, version and key id and never holds key material,
    so it may be returned as a readiness endpoint's body (``as_dict()``); keep
    such an endpoint on an internal network all the same, since key ids and the
    account in an ARN are nobody else's business.
    """

    #: the KMS answered and the key can encrypt and decrypt: ready
    ok: bool
    #: the KMS answered at all (a refusal counts: the network path works)
    reachable: bool
    kek_alias: str
    #: the KEK version new data is encrypted under
    kek_version: int
    #: the KMS key of that version, as recorded in the key-version store
    key_id: str
    #: the KMS key state (``"Enabled"``, ``"Disabled"``, ``"PendingDeletion"``...),
    #: or None when the KMS did not say
    key_state: str | None
    #: how the key was checked: ``"describe_key"``, or ``"encrypt_dek"`` (wrapping
    #: a throwaway random key) for providers without ``describe_key``
    method: Method
    #: round-trip time of the check, in milliseconds
    latency_ms: float
    #: why the check failed (an error class and its message), None when ok
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


async def run_check(
    kms: KeyManagementService,
    call_kms: CallKMS,
    *,
    kek_alias: str,
    kek_version: int,
    key_id: str,
    timeout: float,  # noqa: ASYNC109 (see Crypto.check)
) -> HealthReport:
    """Probe ``key_id`` through ``call_kms`` (the Crypto's counted KMS path)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigurationError("timeout must be a positive number of seconds")
    describe: Callable[[str], Awaitable[Mapping[str, object]]] | None = getattr(
        kms, "describe_key", None
    )
    method: Method = "describe_key" if describe is not None else "encrypt_dek"
    started = time.perf_counter()
    reachable = False
    state: str | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(timeout):
            if describe is not None:
                metadata = await call_kms("describe_key", describe(key_id))
                reachable = True
                state = str(metadata.get("key_state") or "Unknown")
                if state == "Enabled" and not metadata.get("enabled", True):
                    state = "Disabled"
            else:
                # No DescribeKey: wrap 32 random bytes that are no one's key. A
                # disabled or deleted key refuses Encrypt, so this tells usability.
                await call_kms("encrypt_dek", kms.encrypt_dek(key_id, os.urandom(32)))
                reachable = True
                state = None
    except TimeoutError:
        error = f"KMSUnavailableError: no answer from the KMS within {timeout:g} s"
    except KMSUnavailableError as exc:
        error = _describe(exc)
    except (KMSAccessDeniedError, KMSKeyNotFoundError) as exc:
        reachable = True
        state = "NotFound" if isinstance(exc, KMSKeyNotFoundError) else None
        error = _describe(exc)
    except KMSError as exc:
        # The KMS answered with a refusal of its own (say, DisabledException).
        reachable = exc.code is not None
        error = _describe(exc)
    except EncxError as exc:  # a closed provider, a bad reference...
        error = _describe(exc)
    except Exception as exc:  # a probe reports; its caller answers 503
        # A provider of someone else's that lets an OSError or a library error
        # through: its message is not ours to vouch for, so only its class is kept.
        error = f"{type(exc).__name__} from {type(kms).__name__}.{method}"
    latency_ms = (time.perf_counter() - started) * 1000
    ok = error is None and (state is None or state == "Enabled")
    if error is None and not ok:
        error = f"KMS key {key_id} is {state}, not Enabled"
    report = HealthReport(
        ok=ok,
        reachable=reachable,
        kek_alias=kek_alias,
        kek_version=kek_version,
        key_id=key_id,
        key_state=state,
        method=method,
        latency_ms=latency_ms,
        error=error,
    )
    if not ok:
        logger.warning(
            "KMS check failed for KEK %s version %d (key %s): %s",
            kek_alias,
            kek_version,
            key_id,
            error,
        )
    return report


def _describe(exc: BaseException) -> str:
    # encx-async messages name aliases, key ids and regions, never secrets.
    return f"{type(exc).__name__}: {exc}"
