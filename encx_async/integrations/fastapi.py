"""FastAPI (and any Starlette app): a lifespan that serves one Crypto, a dependency.

::

    from encx_async.integrations.fastapi import CryptoDep, encx_lifespan

    app = FastAPI(lifespan=encx_lifespan(kms=make_kms, crypto=make_crypto))

    @app.get("/secret")
    async def secret(crypto: CryptoDep) -> dict[str, str]: ...

The Crypto goes into the lifespan *state* (``request.state``), which Starlette
copies into each request; nothing is stored on the app or in this module. Your
own lifespan, passed as ``lifespan=``, runs inside ours: the Crypto is open for
all of it, and its state is merged with ours.

Needs ``pip install "encx-async[fastapi]"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Final, TypeVar

from encx_async._crypto import Crypto
from encx_async._exceptions import ConfigurationError
from encx_async._telemetry import CryptoMetrics

from . import CryptoFactory, KMSFactory, _missing_extra, serve_crypto

try:
    from fastapi import Depends
    from starlette.requests import HTTPConnection
except ModuleNotFoundError as exc:
    raise _missing_extra(__name__, exc, "fastapi") from None

__all__ = ["STATE_KEY", "CryptoDep", "encx_lifespan", "get_crypto"]

#: The lifespan-state key under which the Crypto is found (``request.state.encx_crypto``).
STATE_KEY: Final = "encx_crypto"

AppT = TypeVar("AppT")
Lifespan = Callable[[AppT], AbstractAsyncContextManager[Mapping[str, Any] | None]]


def encx_lifespan(
    *,
    kms: KMSFactory,
    crypto: CryptoFactory,
    lifespan: Lifespan[AppT] | None = None,
    metrics: CryptoMetrics | None = None,
) -> Callable[[AppT], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan opening ``kms()`` and ``await crypto(service)`` at start-up, closing
    them at shutdown, around the optional ``lifespan`` of your own.

    :param kms: builds the KMS service, e.g. ``lambda: aws.KMSService(config)``;
        called at each start-up, so an app can be started more than once.
    :param crypto: builds the Crypto on the opened service.
    :param lifespan: your lifespan; it runs while the Crypto is open, and the
        state it yields (if any) is merged into the request state.
    :param metrics: a :class:`~encx_async.CryptoMetrics` to report the Crypto to.
    """

    @contextlib.asynccontextmanager
    async def run(app: AppT) -> AsyncIterator[dict[str, Any]]:
        async with serve_crypto(kms, crypto, metrics=metrics) as served:
            state: dict[str, Any] = {STATE_KEY: served}
            if lifespan is None:
                yield state
                return
            async with lifespan(app) as extra:
                yield {**(extra or {}), **state}

    return run


def get_crypto(connection: HTTPConnection) -> Crypto:
    """The dependency: the Crypto opened by :func:`encx_lifespan`."""
    served = connection.state._state.get(STATE_KEY)
    if not isinstance(served, Crypto):
        raise ConfigurationError(
            "no Crypto in the request state: create the app with "
            "FastAPI(lifespan=encx_lifespan(...)) and run it with lifespan events on"
        )
    return served


CryptoDep = Annotated[Crypto, Depends(get_crypto)]
"""``crypto: CryptoDep`` in a path operation's parameters hands it the shared Crypto."""
