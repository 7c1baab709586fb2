"""Ordered, bounded-concurrency work over many items (rewraps, model batches, the CLI)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from typing import TypeVar

from ._exceptions import ConfigurationError

__all__ = ["check_concurrency", "ordered_list", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def check_concurrency(concurrency: object) -> int:
    """``concurrency`` if it is an int of at least 1; else ConfigurationError."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError("concurrency must be an int of at least 1")
    return concurrency


async def ordered_map(
    items: Iterable[T] | AsyncIterable[T],
    work: Callable[[T], Awaitable[R]],
    *,
    concurrency: int,
    progress: Callable[[int], object] | None = None,
) -> AsyncGenerator[R, None]:
    """``work(item)`` for every item, at most ``concurrency`` at once, results in input order.

    The first failure is raised where its result would have been yielded; the
    work still under way is then cancelled. ``progress(n)`` is called with the
    number of results yielded so far.
    """
    check_concurrency(concurrency)
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


async def ordered_list(
    items: Iterable[T] | AsyncIterable[T], work: Callable[[T], Awaitable[R]], *, concurrency: int
) -> list[R]:
    """:func:`ordered_map`, collected into a list."""
    mapped = ordered_map(items, work, concurrency=concurrency)
    async with contextlib.aclosing(mapped):
        return [result async for result in mapped]
