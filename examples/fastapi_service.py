"""The user store as a FastAPI service.

Run it with ``python -m examples.fastapi_service`` (settings from the
environment, see :mod:`examples.users`), or ``uvicorn --factory
examples.fastapi_service:create_app``. Endpoints:

* ``POST /users`` ``{"name", "email", "phone"}``: 201 and the user with its id;
* ``GET /users/{id}``: the user, or 404;
* ``GET /users?email=...``: the users with that address (blind-index lookup);
* ``GET /healthz``: ``crypto.check()``, 200 when the KMS key is usable, else 503;
* ``GET /stats``: ``crypto.stats()``: KMS calls and DEK cache counters.

The ``X-Tenant`` header names the tenant, which is the KMS encryption context
of that tenant's records: it is passed to every call explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from encx_async.integrations import KMSFactory
from encx_async.integrations.fastapi import CryptoDep, encx_lifespan

from .users import NewUser, Settings, User, UserStore, check_tenant, stats_document

__all__ = ["CancelOnDisconnect", "create_app", "main"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


@dataclass
class Counters:
    """Per-app counters, shown by /stats."""

    cancelled_requests: int = 0


class CancelOnDisconnect:
    """Cancel a request's handler when its client disconnects.

    uvicorn lets a handler run to the end after its client has gone, and drops
    the response; under load, clients that time out would keep KMS calls and
    database queries running for nobody. This middleware reads the client's
    messages itself and cancels the handler on ``http.disconnect``.
    """

    def __init__(self, app: ASGIApp, counters: Counters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        responded = gone = False

        async def send_and_note(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                responded = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, inbox.get, send_and_note))

        async def listen() -> None:
            nonlocal gone
            while True:
                message = await receive()
                inbox.put_nowait(message)
                if message["type"] == "http.disconnect":
                    if not responded:
                        gone = True
                        handler.cancel()
                    return

        listener = asyncio.create_task(listen())
        try:
            await handler
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if gone and task is not None and task.cancelling() == 0:
                self.counters.cancelled_requests += 1
                return  # nobody is waiting for an answer
            raise
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def _tenant(x_tenant: Annotated[str | None, Header()] = None) -> str:
    try:
        return check_tenant(x_tenant)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


def _store(request: Request) -> UserStore:
    store: UserStore = request.state.users
    return store


Tenant = Annotated[str, Depends(_tenant)]
Store = Annotated[UserStore, Depends(_store)]


def create_app(settings: Settings | None = None, *, kms: KMSFactory | None = None) -> FastAPI:
    """The service; ``kms`` replaces the KMS service factory (tests wrap it)."""
    settings = settings if settings is not None else Settings.from_env()
    counters = Counters()

    @contextlib.asynccontextmanager
    async def users_database(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Runs inside encx_lifespan: closed first at shutdown, while the Crypto is still open.
        async with await UserStore.open(settings.users_database) as store:
            yield {"users": store}

    app = FastAPI(
        title="encx-async users (FastAPI)",
        lifespan=encx_lifespan(
            kms=kms or settings.kms_service,
            crypto=settings.open_crypto,
            lifespan=users_database,
        ),
    )
    app.add_middleware(CancelOnDisconnect, counters=counters)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer repeats the rejected input: an e-mail address or a
        # phone number, into the response and whatever logs responses.
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx")} for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.post("/users", status_code=201)
    async def add_user(new: NewUser, crypto: CryptoDep, tenant: Tenant, store: Store) -> User:
        return await store.add(crypto, tenant, new)

    @app.get("/users/{user_id}")
    async def get_user(user_id: str, crypto: CryptoDep, tenant: Tenant, store: Store) -> User:
        user = await store.get(crypto, tenant, user_id)
        if user is None:
            raise HTTPException(status_code=404, detail="no such user")
        return user

    @app.get("/users")
    async def find_users(email: str, crypto: CryptoDep, tenant: Tenant, store: Store) -> list[User]:
        return await store.find_by_email(crypto, tenant, email)

    @app.get("/healthz")
    async def healthz(crypto: CryptoDep) -> JSONResponse:
        report = await crypto.check()
        return JSONResponse(report.as_dict(), status_code=200 if report.ok else 503)

    @app.get("/stats")
    async def stats(crypto: CryptoDep) -> dict[str, Any]:
        return stats_document(crypto.stats(), cancelled_requests=counters.cancelled_requests)

    return app


def main() -> None:
    import uvicorn

    settings = Settings.from_env()
    uvicorn.run(
        lambda: create_app(settings),
        factory=True,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
