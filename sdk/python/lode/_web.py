"""Web serving decorators, as Modal spells them, stacked under @app.function():

    @app.function(image=image)
    @lode.asgi_app()
    def web():
        return fastapi_app

`asgi_app` and `wsgi_app` serve the app the function returns (HTTP, streaming both ways, and
WebSockets for ASGI); `web_server(port)` proxies to the server the function starts;
`fastapi_endpoint` (and its older name `web_endpoint`) serves the function itself: the JSON
body is its argument, query parameters its keyword arguments (converted by their
annotations), its result the JSON answer. `concurrent` lets one container serve several
inputs at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_WEB = "_lode_web"
_CONCURRENT = "_lode_concurrent"


def _mark(kind: str, options: dict[str, Any], **web: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    unsupported = sorted(k for k, v in options.items() if v not in (None, False, [], ()))
    if unsupported:
        raise ValueError(
            f"{kind}({', '.join(unsupported)}=...): Lode has no counterpart; leave it out "
            "(requests reach every web function by path and by <app>--<function>.lode.localhost)"
        )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise TypeError(f"@lode.{kind}() decorates a function, not {fn!r}")
        from ._app import Function

        if isinstance(fn, Function):
            raise TypeError(f"put @lode.{kind}() below @app.function(), not above it")
        setattr(fn, _WEB, {k: v for k, v in web.items() if v is not None})
        return fn

    return decorate


def asgi_app(
    *, label: str | None = None, custom_domains: Any = None, requires_proxy_auth: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Serves the ASGI app (FastAPI, Starlette, ...) the function returns, once per container."""
    return _mark("asgi_app", {"custom_domains": custom_domains, "requires_proxy_auth": requires_proxy_auth},
                 serve="asgi", label=label)


def wsgi_app(
    *, label: str | None = None, custom_domains: Any = None, requires_proxy_auth: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Serves the WSGI app (Flask, Django, ...) the function returns, once per container."""
    return _mark("wsgi_app", {"custom_domains": custom_domains, "requires_proxy_auth": requires_proxy_auth},
                 serve="wsgi", label=label)


def web_server(
    port: int, *, startup_timeout: float = 5.0, label: str | None = None, custom_domains: Any = None,
    requires_proxy_auth: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Proxies requests to the HTTP server the function starts (in the background) on
    `port`, inside the container; Lode waits up to startup_timeout seconds for it to listen."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"web_server(port={port!r}): give the TCP port the server listens on")
    if not isinstance(startup_timeout, (int, float)) or startup_timeout <= 0:
        raise ValueError(f"web_server(startup_timeout={startup_timeout!r}): give seconds above 0")
    return _mark("web_server", {"custom_domains": custom_domains, "requires_proxy_auth": requires_proxy_auth},
                 serve="server", port=port, startup_timeout=float(startup_timeout), label=label)


def fastapi_endpoint(
    *, method: str = "GET", label: str | None = None, docs: bool = False, custom_domains: Any = None,
    requires_proxy_auth: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Serves the function itself at its URL's root, as Modal does: where the image has
    FastAPI, as a FastAPI route (pydantic bodies, query parameters by annotation, responses
    such as StreamingResponse, /docs with docs=True); without it, the JSON body is its
    argument, query parameters its keyword arguments (converted by their annotations) and
    its result the JSON answer."""
    if not isinstance(method, str) or not method.isalpha():
        raise ValueError(f'fastapi_endpoint(method={method!r}): use an HTTP method such as "GET" or "POST"')
    return _mark("fastapi_endpoint",
                 {"custom_domains": custom_domains, "requires_proxy_auth": requires_proxy_auth},
                 serve="asgi", endpoint=method.upper(), docs=bool(docs) or None, label=label)


def web_endpoint(**kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Modal's older name for fastapi_endpoint."""
    return fastapi_endpoint(**kwargs)


def concurrent(*, max_inputs: int, target_inputs: int | None = None) -> Callable[[Any], Any]:
    """Lets one container serve up to max_inputs inputs at once (threads, or the event loop
    for `async def` functions and ASGI apps)."""
    if isinstance(max_inputs, bool) or not isinstance(max_inputs, int) or max_inputs < 1:
        raise ValueError(f"concurrent(max_inputs={max_inputs!r}): give an integer of at least 1")

    def decorate(target: Any) -> Any:
        setattr(target, _CONCURRENT, max_inputs)
        return target

    return decorate


def web_mark(fn: Any) -> dict[str, Any] | None:
    return getattr(fn, _WEB, None)


def concurrency_mark(fn: Any) -> int | None:
    return getattr(fn, _CONCURRENT, None)


def batched(*, max_batch_size: int, wait_ms: int) -> Callable[[Any], Any]:
    """Dynamic batching, as Modal's: the function (or method) takes lists, one per parameter,
    and returns a list of results in the same order; a container gathers up to
    max_batch_size inputs, waiting at most wait_ms after the first, and calls it once. Callers
    still call it with one input each."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= 1000:
        raise ValueError(f"batched(max_batch_size={max_batch_size!r}): give an integer from 1 to 1000")
    if isinstance(wait_ms, bool) or not isinstance(wait_ms, int) or not 0 <= wait_ms <= 60_000:
        raise ValueError(f"batched(wait_ms={wait_ms!r}): give milliseconds from 0 to 60000")

    def decorate(fn: Any) -> Any:
        if not callable(fn):
            raise TypeError(f"@lode.batched() decorates a function or method, not {fn!r}")
        fn._lode_batched = (max_batch_size, wait_ms)
        # On a class, a batched method is a method callers may run.
        fn._lode_hook = "method"
        return fn

    return decorate


def batch_mark(fn: Any) -> tuple[int, int] | None:
    return getattr(fn, "_lode_batched", None)
