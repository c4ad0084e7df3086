"""`.aio`: the awaitable twin of a blocking SDK method, as Modal spells it (`f.remote.aio(x)`).

The blocking method does the work; its twin runs it on a thread pool of the SDK's own, so an
event loop never blocks and many awaited calls run at once (asyncio's default pool is only a
few threads wide)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

# Calls in flight from async code at once, across the process.
AIO_THREADS = 64

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_END = object()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(AIO_THREADS, thread_name_prefix="lode-aio")
    return _pool


async def run_blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Awaits `fn(*args, **kwargs)` run on the SDK's thread pool."""
    loop = asyncio.get_running_loop()
    # The caller's context goes along: inside a container it names the input being served.
    context = contextvars.copy_context()
    return await loop.run_in_executor(_executor(), functools.partial(context.run, fn, *args, **kwargs))


async def iterate_blocking(start: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """An async iterator over the items of a blocking iterator, each fetched off the loop."""
    iterator = await run_blocking(lambda: iter(start()))
    try:
        while True:
            item = await run_blocking(next, iterator, _END)
            if item is _END:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await run_blocking(close)


class blocking:
    """Decorates a blocking method so that `obj.method.aio(...)` awaits it; with
    `iterator=True` the method returns an iterator and `.aio` gives an async iterator."""

    def __init__(self, fn: Callable[..., Any] | None = None, *, iterator: bool = False):
        self._fn = fn
        self._iterator = iterator
        if fn is not None:
            functools.update_wrapper(self, fn)

    def __call__(self, fn: Callable[..., Any]) -> blocking:
        # Used as @blocking(iterator=True).
        return blocking(fn, iterator=self._iterator)

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        assert self._fn is not None
        return Bound(self._fn.__get__(obj, owner), self._iterator)


class Bound:
    """A blocking method bound to its object, with `.aio`."""

    __slots__ = ("_call", "_iterator")

    def __init__(self, call: Callable[..., Any], iterator: bool):
        self._call = call
        self._iterator = iterator

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self._call!r} (blocking; .aio awaits it)>"

    def aio(self, *args: Any, **kwargs: Any) -> Any:
        """The same call, awaitable (or an async iterator, for methods that return iterators)."""
        if self._iterator:
            return iterate_blocking(lambda: self._call(*args, **kwargs))
        return run_blocking(self._call, *args, **kwargs)
