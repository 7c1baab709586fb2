"""Ordered, bounded-concurrency processing of a stream of ciphertexts."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

__all__ = ["ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def ordered_map(
    items: Iterable[T] | AsyncIterable[T],
    work: Callable[[T], Awaitable[R]],
    *,
    concurrency: int,
    progress: Callable[[int], object] | None = None,
) -> AsyncIterator[R]:
    """``work(item)`` for every item, at most ``concurrency`` at once, results in input order.

    The first failure is raised where its result would have been yielded; the
    work still under way is then cancelled. ``progress(n)`` is called with the
    number of results yielded so far.
    """
    pending: deque[asyncio.Future[R]] = deque()
    done = 0
    try:
        async for item in _aiter(items):
            pending.append(asyncio.ensure_future(work(item)))
            if len(pending) >= concurrency:
                yield await pending.popleft()
                done += 1
                if progress is not None:
                    progress(done)
        while pending:
            yield await pending.popleft()
            done += 1
            if progress is not None:
                progress(done)
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
