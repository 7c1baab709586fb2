"""Work that must finish once started, whatever happens to the task that started it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

__all__ = ["to_the_end", "uninterrupted"]

_T = TypeVar("_T")


async def to_the_end(work: Coroutine[Any, Any, _T]) -> _T:
    """Run ``work`` to its end and return its outcome, even if the caller is
    cancelled meanwhile (asyncio), however often.

    For a caller already on its way out with an exception, such as a
    CancelledError it caught: it re-raises that afterwards, so no
    cancellation is lost.
    """
    task = asyncio.ensure_future(work)
    await _wait_out(task)
    return task.result()


async def uninterrupted(work: Awaitable[_T]) -> _T:
    """Run ``work`` to its end; then, if the caller was cancelled meanwhile, go on
    with that cancellation, else return the outcome.

    For a step that must not be left running in the background when its caller
    is cancelled (a statement in a worker thread), at the price of waiting for it.
    """
    task = asyncio.ensure_future(work)
    cancelled = await _wait_out(task)
    if cancelled is None:
        return task.result()
    if not task.cancelled():
        task.exception()  # retrieved: the cancellation is what the caller gets
    raise cancelled


async def _wait_out(task: asyncio.Future[Any]) -> asyncio.CancelledError | None:
    """Wait until ``task`` is done, however often cancelled; the last cancellation."""
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = exc
    return cancelled
