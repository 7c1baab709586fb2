"""Web framework integrations: one KMS service and one Crypto per process.

:mod:`encx_async.integrations.fastapi` (a lifespan and a dependency) and
:mod:`encx_async.integrations.aiohttp` (a ``cleanup_ctx`` and an app key) both
rest on :func:`serve_crypto`, which is framework-neutral: it opens the KMS
service, builds the Crypto, and at shutdown closes the Crypto and then the
service, even if the shutdown itself is being cancelled. Nothing is kept in a
module: the Crypto lives in the framework's own state (lifespan state, the
application mapping) for as long as the application runs.

You say how to build both with two callables, so the settings stay yours::

    kms = lambda: aws.KMSService(aws.Config(region=os.environ["AWS_REGION"]))

    def crypto(kms: KeyManagementService) -> Crypto:
        return Crypto(kms=kms, kek_alias="alias/my-app", dek_cache=DEKCache())

The Crypto factory may return a Crypto not opened yet, as here (it is opened
for you), or an opened one (``async def`` returning ``await Crypto.create(...)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import anyio

from encx_async._crypto import Crypto
from encx_async._exceptions import ConfigurationError
from encx_async._telemetry import CryptoMetrics
from encx_async.kms import KeyManagementService

__all__ = ["CryptoFactory", "KMSFactory", "serve_crypto"]


def _missing_extra(module: str, exc: ModuleNotFoundError, extra: str) -> ModuleNotFoundError:
    """The error an integration raises when its framework is not installed: it
    names the extra to install, as a newcomer's next step."""
    return ModuleNotFoundError(
        f'{module} needs {exc.name}, which is not installed: pip install "encx-async[{extra}]"',
        name=exc.name,
    )


logger = logging.getLogger("encx_async.integrations")

KMSFactory = Callable[[], KeyManagementService]
"""Builds the (not yet opened) KMS service: ``lambda: aws.KMSService(aws.Config(...))``."""

CryptoFactory = Callable[[KeyManagementService], Crypto | Awaitable[Crypto]]
"""Builds the Crypto on the opened service: ``lambda kms: Crypto(kms=kms, ...)``, or an
``async def`` returning an opened one."""


@contextlib.asynccontextmanager
async def serve_crypto(
    kms: KMSFactory,
    crypto: CryptoFactory,
    *,
    metrics: CryptoMetrics | None = None,
    metric_attributes: Mapping[str, str] | None = None,
) -> AsyncIterator[Crypto]:
    """Open the KMS service and the Crypto; close both (Crypto first) on exit.

    With ``metrics``, the Crypto is added to that
    :class:`~encx_async.CryptoMetrics` while it is open.
    """
    if not callable(kms) or not callable(crypto):
        raise ConfigurationError(
            "kms and crypto must be callables: kms() returns a KMS service, "
            "crypto(service) returns a Crypto (or an awaitable of one)"
        )
    async with contextlib.AsyncExitStack() as stack:
        service = kms()
        if not isinstance(service, KeyManagementService):
            raise ConfigurationError("kms() must return an encx_async.KeyManagementService")
        # The service is entered before anything can fail, so it is closed on every path.
        await stack.enter_async_context(service)
        stack.push_async_callback(_shielded_close, service.aclose)
        built = crypto(service)
        made = await built if inspect.isawaitable(built) else built
        if not isinstance(made, Crypto):
            raise ConfigurationError("crypto(kms) must return an encx_async.Crypto")
        stack.push_async_callback(_shielded_close, made.aclose)
        await made.__aenter__()  # opens one not opened yet; refuses one already closed
        if metrics is not None:
            metrics.add(made, metric_attributes)
            stack.callback(metrics.discard, made)
        logger.info(
            "encx-async ready for %s: KEK %s version %d (key %s)",
            type(service).__name__,
            made.kek_alias,
            made.kek_version,
            made.key_id,
        )
        yield made
    logger.info("encx-async closed: Crypto and %s", type(service).__name__)


async def _shielded_close(close: Callable[[], Awaitable[None]]) -> None:
    # A shutdown that is itself cancelled must still release connections and wipe keys.
    # anyio's shield stops anyio cancel scopes only; a native task.cancel() (what
    # asyncio.wait_for, asyncio.timeout and the servers use) goes through it, so the
    # close runs in a task of its own that the cancellation cannot reach.
    with anyio.CancelScope(shield=True):
        closing = asyncio.ensure_future(close())
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            while not closing.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([closing])
            if not closing.cancelled() and closing.exception() is not None:
                logger.warning(
                    "encx-async: closing failed during a cancelled shutdown: %r",
                    closing.exception(),
                )
            raise
