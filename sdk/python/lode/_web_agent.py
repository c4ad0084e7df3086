"""The agent's side of web inputs: an ASGI or WSGI app a function returns, or the web server
it starts, served over the agent's socket.

The host parses HTTP and sends each request as an input holding its ASGI scope (`http` or
`websocket`), then its body in base64 parts (`http_body`), or WebSocket messages
(`ws_receive`); the agent answers with `http_start` and `http_body` parts, or `ws_accept`,
`ws_send` and `ws_close`, then the input's `output`. ASGI apps run on the agent's event loop;
WSGI apps and the proxy to a web server run on its threads."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import http.client
import io
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from lode import _client

# The largest body part sent in one message (before base64).
BODY_PART = 48 << 10
# The largest WebSocket message sent to a client, as the host takes from one.
MAX_WS_MESSAGE = 16 << 20
_END = object()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Exchange:
    """One web input's inbox: the client's events, in ASGI's shapes, as they arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        if loop is not None:
            self.async_queue: asyncio.Queue = asyncio.Queue()
        else:
            self.sync_queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, event: dict[str, Any]) -> None:
        if self.loop is None:
            self.sync_queue.put(event)
        elif _on_loop(self.loop):
            self.async_queue.put_nowait(event)
        else:
            self.loop.call_soon_threadsafe(self.async_queue.put_nowait, event)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread runs `loop` (where the agent reads the host's messages)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def client_event(msg: dict[str, Any]) -> dict[str, Any] | None:
    """A host message about a web input as the ASGI event it means."""
    kind = msg.get("type")
    if kind == "http_body":
        body = base64.b64decode(msg.get("body") or "")
        return {"type": "http.request", "body": body, "more_body": bool(msg.get("more_body"))}
    if kind == "http_disconnect":
        return {"type": "http.disconnect"}
    if kind == "ws_receive":
        if msg.get("bytes") is not None:
            return {"type": "websocket.receive", "bytes": base64.b64decode(msg["bytes"])}
        return {"type": "websocket.receive", "text": msg.get("text") or ""}
    if kind == "ws_disconnect":
        return {"type": "websocket.disconnect", "code": int(msg.get("code") or 1005)}
    return None


class WebMethod:
    """A class's web method as the web apps see a web function. Its `_fn` is the method bound
    to the container's instance of the class (default parameters), made (enter hooks run) on
    first use, off the event loop."""

    _cls = None

    def __init__(self, name: str, mark: dict[str, Any], resolve: Callable[[], Any]):
        self.name = name
        self._web_serve = mark["serve"]
        self._web_port = mark.get("port")
        self._web_startup_timeout = mark.get("startup_timeout", 5.0)
        self._web_endpoint = mark.get("endpoint")
        self._web_docs = bool(mark.get("docs"))
        self._resolve = resolve

    @property
    def _fn(self) -> Any:
        return self._resolve()


class WebApps:
    """The web apps of one container, made once each, and the inputs they serve."""

    def __init__(self, send: Callable[[dict[str, Any]], None], loop: Callable[[], asyncio.AbstractEventLoop]):
        self._send = send
        self._loop = loop
        self._apps: dict[str, Any] = {}
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._exchanges: dict[str, Exchange] = {}
        self._lifespans: list[tuple[asyncio.Queue, Any]] = []
        self._tasks: set[asyncio.Task] = set()
        # Each ASGI app's lifespan state, by the app's id.
        self._states: dict[int, dict[str, Any]] = {}

    # Dispatch (the reader thread).

    def begin(self, msg: dict[str, Any], function: Any, submit: Callable[..., Any]) -> None:
        """Starts a web input: its inbox now, so body parts that follow find it."""
        input_id = msg["id"]
        serve = function._web_serve
        websocket = "websocket" in msg
        loop = self._loop() if serve == "asgi" else None
        exchange = Exchange(loop)
        self._exchanges[input_id] = exchange
        scope = msg.get("websocket") if websocket else msg.get("http")
        if websocket:
            exchange.put({"type": "websocket.connect"})
        elif msg.get("body_done"):
            exchange.put({"type": "http.request", "body": b"", "more_body": False})
        if serve == "asgi":
            work = self._asgi(input_id, function, scope, exchange, websocket)
            if _on_loop(loop):
                # The loop keeps tasks weakly: held here until they end.
                task = loop.create_task(work)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                asyncio.run_coroutine_threadsafe(work, loop)
        else:
            submit(self._threaded, input_id, function, scope, exchange)

    def event(self, msg: dict[str, Any]) -> bool:
        """Hands a host message to its input; False if no web input has that id."""
        exchange = self._exchanges.get(str(msg.get("id")))
        event = client_event(msg)
        if exchange is None or event is None:
            return False
        exchange.put(event)
        return True

    # Helpers for every kind.

    def _finish(self, input_id: str, error: BaseException | None) -> None:
        """Ends a web input once its app returned (after a whole response, too: background
        work after it still belongs to the input)."""
        self._exchanges.pop(input_id, None)
        if error is None:
            self._send({"type": "output", "id": input_id, "result": None})
            return
        from lode._agent import error_object

        # Also in the app's logs, under the request: the client gets only the kind.
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        self._send({"type": "output", "id": input_id, "error": error_object(error)})

    def _start(self, input_id: str, status: int, headers: list[tuple[str, str]]) -> None:
        self._send({"type": "http_start", "id": input_id, "status": int(status), "headers": headers})

    def _whole(self, input_id: str, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A response whose body is all there, in one message."""
        self._send(
            {"type": "http_start", "id": input_id, "status": int(status), "headers": headers,
             "body": _b64(body), "done": True}
        )

    def _body(self, input_id: str, data: bytes, more_body: bool) -> None:
        view = memoryview(data)
        while len(view) > BODY_PART:
            self._send({"type": "http_body", "id": input_id, "body": _b64(bytes(view[:BODY_PART])), "more_body": True})
            view = view[BODY_PART:]
        if len(view) or not more_body:
            self._send({"type": "http_body", "id": input_id, "body": _b64(bytes(view)), "more_body": more_body})

    def _app(self, function: Any, make: Callable[[], Any]) -> Any:
        """A WSGI app or a started web server, made once per container (under a lock)."""
        with self._lock:
            if function.name not in self._made:
                self._made[function.name] = make()
            return self._made[function.name]

    # ASGI.

    async def _asgi(self, input_id: str, function: Any, scope: dict, exchange: Exchange, websocket: bool) -> None:
        _client.set_current_input_context(input_id)
        error: BaseException | None = None
        try:
            app = await self._asgi_app(function)
            full = asgi_scope(scope, websocket)
            full["state"] = dict(self._states.get(id(app), {}))
            if websocket:
                await self._asgi_websocket(input_id, app, full, exchange)
            else:
                await self._asgi_http(input_id, app, full, exchange)
        except BaseException as e:  # the app's failure is this input's result
            error = e
        self._finish(input_id, error)

    async def _asgi_app(self, function: Any) -> Any:
        """The function's ASGI app, made and started once per container: requests that come
        while it starts wait for it."""
        made = self._apps.get(function.name)
        if made is None:
            made = self._apps[function.name] = asyncio.ensure_future(self._make_asgi_app(function))
        try:
            return await asyncio.shield(made)
        except BaseException:
            # A failed start is tried again by the next request.
            if self._apps.get(function.name) is made and made.done():
                del self._apps[function.name]
            raise

    async def _make_asgi_app(self, function: Any) -> Any:
        # Off the loop: a class's web method is bound to an instance whose enter hooks may
        # block, or be coroutines that need the loop.
        fn = await asyncio.get_running_loop().run_in_executor(None, lambda: function._fn)
        if function._web_endpoint is not None:
            app = endpoint_app(fn, function._web_endpoint, function._web_docs)
        else:
            app = fn()
        if asyncio.iscoroutine(app):
            app = await app
        if not callable(app):
            raise TypeError(f"@asgi_app {function.name}() returned {app!r}, not an ASGI app")
        state: dict[str, Any] = {}
        await self._lifespan_startup(app, state)
        self._states[id(app)] = state
        return app

    async def _lifespan_startup(self, app: Any, state: dict[str, Any]) -> None:
        """Runs the app's startup (FastAPI's lifespan and on_event handlers); an app that
        does not speak lifespan is served as it is."""
        inbox: asyncio.Queue = asyncio.Queue()
        inbox.put_nowait({"type": "lifespan.startup"})
        started: asyncio.Future = asyncio.get_running_loop().create_future()

        async def receive() -> dict:
            return await inbox.get()

        async def send(message: dict) -> None:
            if message["type"] in ("lifespan.startup.complete", "lifespan.startup.failed") and not started.done():
                started.set_result(message)

        # What the lifespan puts in its state, every request's scope starts with (a copy).
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
        task = asyncio.ensure_future(app(scope, receive, send))
        done, _ = await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
        if started in done:
            message = started.result()
            if message["type"] == "lifespan.startup.failed":
                raise RuntimeError(f"the ASGI app's startup failed: {message.get('message', '')}")
            self._lifespans.append((inbox, task))
        elif task.exception() is not None and not isinstance(task.exception(), Exception):
            raise task.exception()

    async def _asgi_http(self, input_id: str, app: Any, scope: dict, exchange: Exchange) -> bool:
        """Serves one request; True when the whole response went in one message."""
        state: dict[str, Any] = {"start": None, "sent": False, "done": False, "whole": False}
        inbox = exchange.async_queue

        async def receive() -> dict:
            return await inbox.get()

        async def send(message: dict) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                headers = [(_text(k), _text(v)) for k, v in message.get("headers", [])]
                # Held until the body: most responses are one body part, and go as one message.
                state["start"] = (message["status"], headers)
            elif kind == "http.response.body":
                if state["start"] is None:
                    raise RuntimeError("the ASGI app sent a body before http.response.start")
                if state["done"]:
                    return
                more = bool(message.get("more_body", False))
                body = bytes(message.get("body", b""))
                if not state["sent"]:
                    state["sent"] = True
                    if not more and len(body) <= BODY_PART:
                        self._whole(input_id, *state["start"], body)
                        state["done"] = state["whole"] = True
                        return
                    self._start(input_id, *state["start"])
                self._body(input_id, body, more)
                state["done"] = not more

        await app(scope, receive, send)
        if state["start"] is None:
            raise RuntimeError("the ASGI app returned without sending a response")
        if not state["sent"]:
            self._whole(input_id, *state["start"], b"")
            return True
        if not state["done"]:
            self._body(input_id, b"", False)
        return state["whole"]

    async def _asgi_websocket(self, input_id: str, app: Any, scope: dict, exchange: Exchange) -> None:
        inbox = exchange.async_queue
        state = {"closed": False}

        async def receive() -> dict:
            return await inbox.get()

        async def send(message: dict) -> None:
            kind = message["type"]
            if kind == "websocket.accept":
                headers = [(_text(k), _text(v)) for k, v in message.get("headers", [])]
                self._send({"type": "ws_accept", "id": input_id, "subprotocol": message.get("subprotocol"),
                            "headers": headers})
            elif kind == "websocket.send":
                size = len(message.get("bytes") or b"") + len(message.get("text") or "")
                if size > MAX_WS_MESSAGE:
                    raise ValueError(f"a WebSocket message of {size} bytes is over Lode's {MAX_WS_MESSAGE >> 20} MiB")
                if message.get("bytes") is not None:
                    self._send({"type": "ws_send", "id": input_id, "bytes": _b64(message["bytes"])})
                else:
                    self._send({"type": "ws_send", "id": input_id, "text": message.get("text") or ""})
            elif kind == "websocket.close":
                state["closed"] = True
                self._send({"type": "ws_close", "id": input_id, "code": int(message.get("code", 1000)),
                            "reason": message.get("reason") or ""})

        await app(scope, receive, send)
        if not state["closed"]:
            self._send({"type": "ws_close", "id": input_id, "code": 1000, "reason": ""})

    # WSGI and web servers (threads).

    def _threaded(self, input_id: str, function: Any, scope: dict, exchange: Exchange) -> None:
        _client.set_current_input(input_id)
        error: BaseException | None = None
        try:
            if function._web_serve == "wsgi":
                app = self._app(function, function._fn)
                self._wsgi(input_id, app, scope, exchange)
            else:
                port = function._web_port
                self._app(function, lambda: self._start_server(function))
                self._proxy(input_id, port, scope, exchange)
        except BaseException as e:
            error = e
        finally:
            _client.set_current_input(None)
        self._finish(input_id, error)

    def _wsgi(self, input_id: str, app: Any, scope: dict, exchange: Exchange) -> bool:
        """Serves one request; True when the whole response went in one message."""
        environ = wsgi_environ(scope, BodyReader(exchange.sync_queue))
        started: list[Any] = []
        sent = {"head": False}

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info is not None and sent["head"]:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return write

        def head() -> None:
            if not sent["head"]:
                if not started:
                    raise RuntimeError("the WSGI app sent a body before calling start_response")
                status, headers = started
                self._start(input_id, int(str(status).split(" ", 1)[0]), [(str(k), str(v)) for k, v in headers])
                sent["head"] = True

        def write(data: bytes) -> None:
            head()
            self._body(input_id, bytes(data), True)

        result = app(environ, start_response)
        try:
            # A list of parts (the common case) is all there: one message.
            if isinstance(result, (list, tuple)) and started and not sent["head"]:
                body = b"".join(bytes(part) for part in result)
                if len(body) <= BODY_PART:
                    status, headers = started
                    self._whole(input_id, int(str(status).split(" ", 1)[0]),
                                [(str(k), str(v)) for k, v in headers], body)
                    return True
            for chunk in result:
                if chunk:
                    write(chunk)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        head()
        self._body(input_id, b"", False)
        return False

    def _start_server(self, function: Any) -> bool:
        """Calls the @web_server function (it starts the server) and waits for the port."""
        function._fn()
        port, limit = function._web_port, function._web_startup_timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"@web_server({port}): nothing listened on port {port} within {limit}s after "
                        f"{function.name}() returned; start the server in the background on that port"
                    ) from None
                time.sleep(0.02)

    def _proxy(self, input_id: str, port: int, scope: dict, exchange: Exchange) -> None:
        body = BodyReader(exchange.sync_queue).read()
        target = scope.get("raw_path") or "/"
        if scope.get("query_string"):
            target += "?" + scope["query_string"]
        conn = http.client.HTTPConnection("127.0.0.1", port)
        try:
            headers = {}
            for name, value in scope.get("headers", []):
                if name.lower() not in ("content-length",):
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
            headers["Content-Length"] = str(len(body))
            conn.request(scope.get("method", "GET"), target, body=body, headers=headers)
            response = conn.getresponse()
            hop = {"connection", "keep-alive", "transfer-encoding", "upgrade"}
            self._start(input_id, response.status, [(k, v) for k, v in response.getheaders() if k.lower() not in hop])
            while True:
                chunk = response.read1(BODY_PART)
                if not chunk:
                    break
                self._body(input_id, chunk, True)
            self._body(input_id, b"", False)
        finally:
            conn.close()

    def shutdown(self) -> None:
        """Runs the ASGI apps' lifespan shutdown, briefly."""
        for inbox, task in self._lifespans:
            loop = task.get_loop()
            loop.call_soon_threadsafe(inbox.put_nowait, {"type": "lifespan.shutdown"})

            async def wait(task: Any = task) -> None:
                await asyncio.wait([task], timeout=5)

            try:
                asyncio.run_coroutine_threadsafe(wait(), loop).result(6)
            except Exception:
                pass


def endpoint_app(fn: Callable[..., Any], method: str, docs: bool) -> Any:
    """The ASGI app around a `fastapi_endpoint` function: a FastAPI app with one route where
    the image has FastAPI, as on Modal; else Lode's own JSON adapter."""
    try:
        from fastapi import FastAPI
    except ImportError:
        return json_endpoint(fn, method)
    api = FastAPI(
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    api.add_api_route("/", fn, methods=[method])
    return api


def json_endpoint(fn: Callable[..., Any], method: str) -> Any:
    """An ASGI app that calls `fn` with the JSON body as its argument and query parameters as
    keyword arguments (converted by their annotations), and answers its result as JSON."""
    import inspect
    import json
    import urllib.parse

    from lode._agent import _with_query_types

    call = _with_query_types(fn)

    async def app(scope: dict, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return

        async def answer(status: int, value: Any) -> None:
            body = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})

        if scope["method"] != method:
            await answer(405, {"error": {"kind": "method_not_allowed", "message": f"this endpoint takes {method}"}})
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        query = dict(urllib.parse.parse_qsl(scope["query_string"].decode("latin-1")))
        args = []
        if body:
            try:
                args = [json.loads(body)]
            except ValueError:
                args = [body.decode("utf-8", "replace")]
        if inspect.iscoroutinefunction(fn):
            result = await call(*args, **query)
        else:
            # Off the loop, as FastAPI runs sync routes, with this input's context (its logs).
            context = contextvars.copy_context()
            work = functools.partial(context.run, call, *args, **query)
            result = await asyncio.get_running_loop().run_in_executor(None, work)
        await answer(200, result)

    return app


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)


def asgi_scope(scope: dict, websocket: bool) -> dict:
    """The host's scope with the bytes ASGI wants."""
    full = {
        "type": "websocket" if websocket else "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": scope.get("http_version", "1.1"),
        "scheme": scope.get("scheme", "http"),
        "path": scope.get("path", "/"),
        "raw_path": str(scope.get("raw_path", "/")).encode("latin-1", "replace"),
        "query_string": str(scope.get("query_string", "")).encode("latin-1", "replace"),
        "root_path": scope.get("root_path", ""),
        "headers": [(k.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for k, v in scope["headers"]],
        "server": tuple(scope["server"]) if scope.get("server") else None,
        "client": None,
        "state": {},
    }
    if websocket:
        full["subprotocols"] = scope.get("subprotocols", [])
    else:
        full["method"] = scope.get("method", "GET")
    return full


def wsgi_environ(scope: dict, body: BodyReader) -> dict:
    server = scope.get("server") or ["localhost", 80]
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.get("method", "GET"),
        "SCRIPT_NAME": scope.get("root_path", ""),
        "PATH_INFO": scope.get("path", "/"),
        "QUERY_STRING": scope.get("query_string", ""),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": body,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        # The body ends where its parts end (Lode strips Transfer-Encoding).
        "wsgi.input_terminated": True,
    }
    for name, value in scope.get("headers", []):
        if "_" in name:
            # X_User would read as X-User: dropped, as nginx and gunicorn do.
            continue
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
            continue
        key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


class BodyReader(io.RawIOBase):
    """`wsgi.input`: the request body as it arrives, read in the WSGI app's thread."""

    def __init__(self, events: queue.SimpleQueue):
        super().__init__()
        self._events = events
        self._buffer = bytearray()
        self._ended = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        if self._ended:
            return False
        event = self._events.get()
        if event["type"] != "http.request":
            self._ended = True
            raise ConnectionError("the client went away before sending the whole body")
        self._buffer += event["body"]
        self._ended = not event["more_body"]
        return True

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and self._fill():
            pass
        if size < 0:
            size = len(self._buffer)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self, size: int = -1) -> bytes:
        while b"\n" not in self._buffer and (size < 0 or len(self._buffer) < size) and self._fill():
            pass
        cut = self._buffer.find(b"\n") + 1 or len(self._buffer)
        if size >= 0:
            cut = min(cut, size)
        data = bytes(self._buffer[:cut])
        del self._buffer[:cut]
        return data
