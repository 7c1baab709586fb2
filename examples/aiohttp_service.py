"""The user store as an aiohttp service: the same endpoints as the FastAPI one.

Run it with ``python -m examples.aiohttp_service`` (settings from the
environment, see :mod:`examples.users`). aiohttp is told to cancel a handler
whose client disconnects (``handler_cancellation=True``), so a request that
nobody waits for stops where it is, even in the middle of a KMS call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import pydantic
from aiohttp import web

from encx_async.integrations import KMSFactory
from encx_async.integrations import aiohttp as encx

from .users import NewUser, Settings, UserStore, check_tenant, stats_document

__all__ = ["STORE_KEY", "create_app", "main"]

STORE_KEY: Final = web.AppKey("users", UserStore)


def _tenant(request: web.Request) -> str:
    try:
        return check_tenant(request.headers.get("X-Tenant"))
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


async def add_user(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    try:
        new = NewUser.model_validate_json(await request.read())
    except pydantic.ValidationError as exc:
        raise web.HTTPUnprocessableEntity(
            text=exc.json(include_input=False), content_type="application/json"
        ) from None
    user = await request.app[STORE_KEY].add(encx.get_crypto(request), tenant, new)
    return web.json_response(user.model_dump(), status=201)


async def get_user(request: web.Request) -> web.Response:
    store, crypto = request.app[STORE_KEY], encx.get_crypto(request)
    user = await store.get(crypto, _tenant(request), request.match_info["user_id"])
    if user is None:
        raise web.HTTPNotFound(text="no such user")
    return web.json_response(user.model_dump())


async def find_users(request: web.Request) -> web.Response:
    email = request.query.get("email")
    if not email:
        raise web.HTTPBadRequest(text="give ?email=")
    store, crypto = request.app[STORE_KEY], encx.get_crypto(request)
    users = await store.find_by_email(crypto, _tenant(request), email)
    return web.json_response([user.model_dump() for user in users])


async def healthz(request: web.Request) -> web.Response:
    report = await encx.get_crypto(request).check()
    return web.json_response(report.as_dict(), status=200 if report.ok else 503)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(stats_document(encx.get_crypto(request).stats()))


def create_app(
    settings: Settings | None = None, *, kms: KMSFactory | None = None
) -> web.Application:
    """The service; ``kms`` replaces the KMS service factory (tests wrap it)."""
    settings = settings if settings is not None else Settings.from_env()
    app = web.Application()
    # First in, last out: the Crypto outlives the user database at shutdown.
    encx.setup(app, kms=kms or settings.kms_service, crypto=settings.open_crypto)

    async def users_database(app: web.Application) -> AsyncIterator[None]:
        async with await UserStore.open(settings.users_database) as store:
            app[STORE_KEY] = store
            yield

    app.cleanup_ctx.append(users_database)
    app.router.add_post("/users", add_user)
    app.router.add_get("/users/{user_id}", get_user)
    app.router.add_get("/users", find_users)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    return app


def main() -> None:
    settings = Settings.from_env()
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,
        shutdown_timeout=10,
    )


if __name__ == "__main__":
    main()
