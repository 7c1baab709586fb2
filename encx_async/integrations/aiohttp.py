"""aiohttp: a ``cleanup_ctx`` that serves one Crypto under an app key.

::

    from encx_async.integrations import aiohttp as encx

    app = web.Application()
    encx.setup(app, kms=make_kms, crypto=make_crypto)

    async def handler(request: web.Request) -> web.Response:
        crypto = encx.get_crypto(request)
        ...

The Crypto is opened in the application's start-up and closed in its cleanup,
after the server has stopped taking requests. It lives in the application
mapping under :data:`CRYPTO_KEY` (or a key of yours), and is found from
sub-applications too. Nothing is kept in this module.

Needs ``pip install "encx-async[aiohttp]"``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Final

from encx_async._crypto import Crypto
from encx_async._exceptions import ConfigurationError
from encx_async._telemetry import CryptoMetrics

from . import CryptoFactory, KMSFactory, _missing_extra, serve_crypto

try:
    from aiohttp import web
except ModuleNotFoundError as exc:
    raise _missing_extra(__name__, exc, "aiohttp") from None

__all__ = ["CRYPTO_KEY", "crypto_ctx", "get_crypto", "setup"]

#: The application key the Crypto is stored under by default.
CRYPTO_KEY: Final = web.AppKey("encx_async.crypto", Crypto)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def crypto_ctx(
    *,
    kms: KMSFactory,
    crypto: CryptoFactory,
    key: web.AppKey[Crypto] = CRYPTO_KEY,
    metrics: CryptoMetrics | None = None,
) -> CleanupContext:
    """A ``cleanup_ctx`` entry opening ``kms()`` and ``await crypto(service)``.

    Append it before the contexts that use the Crypto: aiohttp cleans up in
    reverse order, so those are closed while the Crypto is still open.
    """

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with serve_crypto(kms, crypto, metrics=metrics) as served:
            app[key] = served
            yield

    return context


def setup(
    app: web.Application,
    *,
    kms: KMSFactory,
    crypto: CryptoFactory,
    key: web.AppKey[Crypto] = CRYPTO_KEY,
    metrics: CryptoMetrics | None = None,
) -> None:
    """Append :func:`crypto_ctx` to ``app.cleanup_ctx``."""
    app.cleanup_ctx.append(crypto_ctx(kms=kms, crypto=crypto, key=key, metrics=metrics))


def get_crypto(request: web.Request, key: web.AppKey[Crypto] = CRYPTO_KEY) -> Crypto:
    """The Crypto of the request's application (or of a parent application)."""
    try:
        return request.config_dict[key]
    except KeyError:
        raise ConfigurationError(
            "no Crypto in this application: call encx_async.integrations.aiohttp.setup(app, ...) "
            "before the application starts"
        ) from None
