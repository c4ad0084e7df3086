"""Talking to Lode: the HTTP API from outside, the agent's socket from inside a container,
argument encoding, and turning remote errors back into exceptions."""

from __future__ import annotations

import base64
import contextvars
import http.client
import itertools
import json
import os
import pickle
import select
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from . import _config, _values, exception

# How long a full queue (429) is retried before giving up.
QUEUE_FULL_LIMIT_S = 600.0
# The longest the server holds GET /v1/calls/{id}?wait=.
MAX_WAIT_S = 60


class RemoteError(exception.Error):
    """A remote failure with no matching local exception type, or an error from the API."""

    def __init__(self, kind: str, message: str, remote_traceback: str | None = None):
        super().__init__(f"{kind}: {message}" if kind else message)
        self.kind = kind
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> Any:
        # The default would replay only args[0]; keep all three across pickling.
        return (type(self), (self.kind, self.message, self.remote_traceback))


RemoteError.__module__ = "lode"


def _attach_traceback(exc: BaseException, tb: str) -> None:
    note = "Remote traceback:\n" + tb.rstrip("\n")
    try:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
    except AttributeError:
        pass
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: kept for tools that read it; the message carries the traceback too.
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def exception_from_error(error: Any) -> BaseException:
    """The local exception for a remote error object: its own type when its module is
    already loaded here and the type can be built from the message, else RemoteError."""
    if not isinstance(error, dict):
        return RemoteError("bad_response", f"the server sent an error that is not an object: {error!r}")
    kind = str(error.get("kind") or "error")
    message = str(error.get("message") or "")
    module = error.get("module")
    tb = error.get("traceback") or None
    # Before 3.11 notes are not printed, so the message itself carries the remote traceback.
    suffix = f"\n\nRemote traceback:\n{tb.rstrip()}" if tb and sys.version_info < (3, 11) else ""
    text = message + suffix

    exc: BaseException | None = None
    # Only modules already loaded here: the name comes from the remote side, and importing
    # whatever it names would run that module's code on this machine.
    loaded = sys.modules.get(module) if isinstance(module, str) and module else None
    if loaded is not None:
        try:
            cls = getattr(loaded, kind, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                exc = cls(text)
        except Exception:
            exc = None
    if exc is None:
        exc = _remote_class(kind)(kind, message, tb)
        exc.args = (exc.args[0] + suffix,)
    if tb:
        _attach_traceback(exc, tb)
    return exc


_KIND_CLASSES: dict[str, type[RemoteError]] = {}


def _remote_class(kind: str) -> type[RemoteError]:
    """RemoteError, mixed with the lode.exception class the kind names (NotFoundError...)."""
    named = exception.KINDS.get(kind)
    if named is None:
        return RemoteError
    cls = _KIND_CLASSES.get(kind)
    if cls is None:
        cls = _KIND_CLASSES[kind] = type(named.__name__, (RemoteError, named), {"__module__": "lode.exception"})
    return cls


# Arguments and results.


def encode_args(args: tuple, kwargs: dict, serialization: str, fn_name: str) -> dict[str, Any]:
    """The request body for a call: JSON args/kwargs, or one pickled (args, kwargs)."""
    if serialization == "pickle":
        try:
            data = pickle.dumps((tuple(args), dict(kwargs)))
        except Exception as e:
            raise TypeError(f"cannot pickle the arguments of {fn_name}(): {e}") from e
        return {"pickled": base64.b64encode(data).decode("ascii")}
    body = {"args": list(args), "kwargs": dict(kwargs)}
    try:
        json.dumps(body, allow_nan=False)
        # Tuples are JSON lists; tagged, they come back as tuples.
        if any(isinstance(v, tuple) for v in (*args, *kwargs.values())):
            raise TypeError
        return body
    except (TypeError, ValueError):
        pass
    try:
        # bytes and tuples, tagged (no pickle involved).
        body = {"args": _values.encode(list(args), False), "kwargs": _values.encode(dict(kwargs), False)}
        json.dumps(body, allow_nan=False)
        return body
    except (TypeError, ValueError):
        for what, value in [
            *((f"argument {i}", a) for i, a in enumerate(args)),
            *((f"keyword argument {k!r}", v) for k, v in kwargs.items()),
        ]:
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"{what} of {fn_name}() cannot be sent as JSON ({e}); pass JSON values "
                    '(dict, list, str, int, float, bool, None) or declare the function with serialization="pickle"'
                ) from None
        raise
    return body


def decode_result(body: dict[str, Any], serialization: str, what: str) -> Any:
    """The value in a result-bearing object. `result_pickled` is unpickled only for a handle
    declared with serialization="pickle": unpickling runs code, so a JSON handle refuses it
    whoever sent it."""
    if "result_pickled" in body:
        if serialization != "pickle":
            raise RemoteError(
                "pickled_result",
                f"{what} answered with a pickled result, which a JSON handle never unpickles; "
                'if you trust that function, use a handle with serialization="pickle"',
            )
        return pickle.loads(base64.b64decode(body["result_pickled"]))
    return _values.decode(body.get("result"), False)


# Transports: both offer call, spawn and poll with the same shapes.


class HttpTransport:
    """The Lode HTTP API, with one keep-alive connection per thread."""

    def __init__(self, api_url: str, token: str | None):
        parts = urllib.parse.urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _config.ConfigError(
                f"the Lode API URL {api_url!r} is not an http(s) URL; fix LODE_API or api_url in the config"
            )
        self.api_url = api_url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port)
        return http.client.HTTPConnection(self._host, self._port)

    def _send(self, method: str, path: str, data: bytes | None, timeout: float | None) -> tuple[int, Any, bytes]:
        headers = {"Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            holder = getattr(self._local, "holder", None)
            if holder is not None and _went_stale(holder.conn):
                holder = None
            reused = holder is not None
            if holder is None:
                holder = self._local.holder = _ConnectionHolder(self._connection())
            conn = holder.conn
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, self._prefix + path, body=data, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.headers, resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                self._local.holder = None
                # The server closed a kept-alive connection as we used it. Only a GET is sent
                # again: a call may already have started, and running it twice is worse.
                if reused and attempt == 0 and method == "GET":
                    continue
                raise exception.ConnectionError(
                    f"the Lode API at {self.api_url} closed the connection during {method} {path} ({e}); "
                    "retry the call if it is safe to run again"
                ) from e
            except OSError as e:
                conn.close()
                self._local.holder = None
                raise exception.ConnectionError(
                    f"cannot reach the Lode API at {self.api_url} ({e}); is `lode serve` running there?"
                ) from e
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """Sends one request, waiting out 429s, and returns the decoded JSON of a 2xx answer."""
        data = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        give_up = time.monotonic() + QUEUE_FULL_LIMIT_S
        while True:
            status, headers, raw = self._send(method, path, data, timeout)
            if status != 429:
                break
            delay = _retry_after(headers.get("Retry-After"))
            if time.monotonic() + delay > give_up:
                raise RemoteError(
                    "queue_full",
                    f"{method} {path} was refused with 429 (queue full) for {QUEUE_FULL_LIMIT_S:.0f}s; "
                    "try again later or raise the function's max_containers",
                )
            time.sleep(delay)
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if 200 <= status < 300 and not raw:
            return {}  # 204 No Content, a deletion say
        if 200 <= status < 300:
            if not isinstance(payload, dict):
                raise RemoteError("bad_response", f"{method} {path} answered {status} without a JSON object")
            return payload
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            raise exception_from_error(payload["error"])
        snippet = raw[:200].decode("utf-8", "replace")
        raise RemoteError("http_error", f"{method} {path} failed with HTTP {status}: {snippet}")

    @staticmethod
    def _fn_path(app: str, function: str, op: str) -> str:
        q = urllib.parse.quote
        return f"/v1/apps/{q(app, safe='')}/functions/{q(function, safe='')}/{op}"

    def call(self, app: str, function: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", self._fn_path(app, function, "call"), payload)

    def spawn(self, app: str, function: str, payload: dict[str, Any]) -> str:
        body = self.request("POST", self._fn_path(app, function, "spawn"), payload)
        return _call_id(body)

    def poll(self, call_id: str, wait: int) -> dict[str, Any]:
        path = f"/v1/calls/{urllib.parse.quote(call_id, safe='')}?wait={wait}"
        return self.request("GET", path, timeout=wait + 30)

    def call_gen(self, app: str, function: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A generator call's values as the server streams them (one JSON line each)."""
        conn = self._connection()
        headers = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        path = self._prefix + self._fn_path(app, function, "call_gen")
        try:
            conn.request("POST", path, body=json.dumps(payload, allow_nan=False).encode("utf-8"), headers=headers)
            resp = conn.getresponse()
            if resp.status != 200:
                raw = resp.read()
                try:
                    error = json.loads(raw).get("error")
                except ValueError:
                    error = None
                if isinstance(error, dict):
                    raise exception_from_error(error)
                raise RemoteError("http_error", f"POST {path} failed with HTTP {resp.status}")
            for raw in resp:
                line = json.loads(raw)
                if "error" in line:
                    raise exception_from_error(line["error"])
                if line.get("done"):
                    return
                yield line
            raise exception.ConnectionError(f"the stream of {app}/{function} ended before the generator finished")
        except OSError as e:
            raise exception.ConnectionError(f"cannot reach the Lode API at {self.api_url} ({e})") from e
        finally:
            conn.close()

    def object(self, kind: str, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """One Dict or Queue operation (`kind` is "dict" or "queue")."""
        path = f"/v1/{kind}s/{urllib.parse.quote(name, safe='')}"
        return self.request("POST", path, request, timeout=float(request.get("timeout") or 0) + 30)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (a function container's api.sock)."""

    def __init__(self, path: str):
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ContainerApiTransport(HttpTransport):
    """The host's API as a function container reaches it, on its api.sock: sandboxes (those
    its app made), image builds and app lookups, each held to what the function was given.
    The socket is the credential, so no token is sent."""

    def __init__(self, path: str):
        super().__init__("http://lode-host", None)
        self.api_url = f"the container's API socket ({path})"
        self._path = path

    def _connection(self) -> http.client.HTTPConnection:
        return _UnixConnection(self._path)


class _ConnectionHolder:
    """Owns one thread's connection and closes it when the thread (and so its
    threading.local) goes away, e.g. when a map() pool shuts down."""

    __slots__ = ("conn",)

    def __init__(self, conn: http.client.HTTPConnection):
        self.conn = conn

    def __del__(self) -> None:
        self.conn.close()


def _went_stale(conn: http.client.HTTPConnection) -> bool:
    """True when an idle kept-alive connection was closed by the server (its socket reads
    as ready: EOF), so the next request opens a fresh one instead of failing."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        if hasattr(select, "poll"):  # select() fails on descriptors above 1023
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        readable = True
    if readable:
        conn.close()
        return True
    return False


def _retry_after(value: str | None) -> float:
    try:
        return max(float(value), 0.0) if value is not None else 1.0
    except ValueError:
        return 1.0


def _call_id(body: dict[str, Any]) -> str:
    call_id = body.get("call_id")
    if not isinstance(call_id, str):
        raise RemoteError("bad_response", f"spawn answered without a call_id: {body!r}")
    return call_id


class _Stream:
    """A generator call's answers, one per value, then the one that ends it."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        import queue

        self.items: Any = queue.SimpleQueue()


class _Pending:
    __slots__ = ("event", "message")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.message: dict[str, Any] | None = None


_serving = threading.local()
# The input an `async def` function serves: its coroutine runs on the agent's loop thread,
# and the calls it awaits run on other threads, so a thread-local cannot carry it.
_serving_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("lode_input", default=None)


def current_input() -> str | None:
    """The id of the input this thread (or coroutine) serves in a function container, if any."""
    return getattr(_serving, "input_id", None) or _serving_task.get()


def set_current_input_context(input_id: str | None) -> None:
    """Marks the running coroutine's context as serving `input_id`."""
    _serving_task.set(input_id)


def set_current_input(input_id: str | None) -> None:
    """Marks this thread as serving `input_id` (None: no input); `map` passes it to its workers."""
    _serving.input_id = input_id


class AgentTransport:
    """Calls from inside a container, sent over the agent's socket and answered by the host."""

    def __init__(
        self, send: Callable[[dict[str, Any]], None], token: str, pump: Callable[[], bool] | None = None
    ):
        self._send = send
        self._token = token
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._closed = False
        # Reads and handles the host's next messages when called on the thread that reads
        # them (the agent's event loop); False elsewhere. A blocking call made there (a sync
        # `f.remote()` in an `async def`) waits by reading, or its answer would never come.
        self._pump = pump or (lambda: False)

    def _wait(self, ready: Callable[[], bool], block: Callable[[], None]) -> None:
        while not ready():
            if not self._pump():
                block()
                return

    def _send_call(self, op: str, fields: dict[str, Any], slot: Any) -> None:
        """Registers `slot` for the answers to a new call and sends the call."""
        call_id = f"c-{next(self._ids)}"
        with self._lock:
            if self._closed:
                raise exception.ConnectionError("the connection to the Lode host is closed; the container is stopping")
            self._pending[call_id] = slot
        message = {"type": "call", "call_id": call_id, "token": self._token, "op": op, **fields}
        # The input the calling thread serves: the call joins that input's call tree, so the
        # host bounds its depth and fan-out.
        input_id = current_input()
        if input_id is not None:
            message["input"] = input_id
        try:
            self._send(message)
        except BaseException as e:
            with self._lock:
                self._pending.pop(call_id, None)
            if isinstance(e, OSError):
                raise exception.ConnectionError(f"cannot send the {op} to the Lode host ({e}); the container is stopping") from e
            raise

    def _request(self, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        slot = _Pending()
        self._send_call(op, fields, slot)
        self._wait(slot.event.is_set, slot.event.wait)
        msg = slot.message or {}
        if "error" in msg:
            raise exception_from_error(msg["error"])
        return msg

    def resolve(self, msg: dict[str, Any]) -> bool:
        """Hands a call_result to the thread waiting for it; False if nobody waits."""
        call_id = str(msg.get("call_id"))
        with self._lock:
            slot = self._pending.get(call_id)
            if slot is not None and not (isinstance(slot, _Stream) and msg.get("more")):
                del self._pending[call_id]
        if slot is None:
            return False
        if isinstance(slot, _Stream):
            slot.items.put(msg)
            return True
        slot.message = msg
        slot.event.set()
        return True

    def close(self) -> None:
        """Fails every waiting call, so no thread blocks forever once the host is gone."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        closed = {"error": {"kind": "connection_closed", "message": "the Lode host closed the connection"}}
        for slot in pending.values():
            if isinstance(slot, _Stream):
                slot.items.put(closed)
                continue
            slot.message = closed
            slot.event.set()

    def call(self, app: str, function: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._request("call", {"app": app, "function": function, **payload})

    def spawn(self, app: str, function: str, payload: dict[str, Any]) -> str:
        msg = self._request("spawn", {"app": app, "function": function, **payload})
        result = msg.get("result")
        return _call_id(result if isinstance(result, dict) else {})

    def call_gen(self, app: str, function: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """A generator call's values, each as the host passes it on."""
        slot = _Stream()
        self._send_call("call_gen", {"app": app, "function": function, **payload}, slot)
        while True:
            self._wait(lambda: not slot.items.empty(), lambda: None)
            msg = slot.items.get()
            if "error" in msg:
                raise exception_from_error(msg["error"])
            if not msg.get("more"):
                return
            yield msg

    def object(self, kind: str, name: str, request: dict[str, Any]) -> dict[str, Any]:
        result = self._request(kind, {"name": name, "request": request}).get("result")
        if not isinstance(result, dict):
            raise RemoteError("bad_response", f"a {kind} request answered {result!r}, not an object")
        return result

    def volume(self, name: str, action: str) -> dict[str, Any]:
        """Commits or reloads a volume this container mounts, through its host."""
        result = self._request("volume", {"name": name, "request": {"action": action}}).get("result")
        return result if isinstance(result, dict) else {}

    def poll(self, call_id: str, wait: int) -> dict[str, Any]:
        result = self._request("get", {"id": call_id, "wait": wait}).get("result")
        if not isinstance(result, dict):
            raise RemoteError("bad_response", f"get for call {call_id} answered {result!r}, not a call status")
        return result


_agent_transport: AgentTransport | None = None
_http: dict[tuple[str, str | None], HttpTransport] = {}
_http_lock = threading.Lock()


def set_agent_transport(transport: AgentTransport | None) -> None:
    """Set by the in-container agent: from then on calls go through its socket."""
    global _agent_transport
    _agent_transport = transport


def forget_http_clients() -> None:
    """Drops the cached API clients, closing their connections (after a config change)."""
    with _http_lock:
        _http.clear()


def _cached_http(key: tuple[str, str | None], make: Callable[[], HttpTransport]) -> HttpTransport:
    with _http_lock:
        client = _http.get(key)
        if client is None:
            client = _http[key] = make()
        return client


def _client_api() -> HttpTransport:
    """The HTTP API found by _config, from outside Lode's containers."""
    key = _config.find_api()
    return _cached_http(key, lambda: HttpTransport(*key))


def api_transport() -> HttpTransport:
    """The HTTP API for what calls do not carry (sandboxes, image builds, app lookups): the
    container's api.sock inside a function container, else the API found by _config."""
    path = os.environ.get("LODE_API_SOCKET")
    if path and os.environ.get("LODE_SOCKET"):
        return _cached_http(("unix:" + path, None), lambda: ContainerApiTransport(path))
    if os.environ.get("LODE_SOCKET"):
        raise RuntimeError(
            "this container has no API socket: sandboxes and image builds are made from a function's "
            "container (or from outside Lode), not from a build step or a sandbox"
        )
    return _client_api()


def transport() -> HttpTransport | AgentTransport:
    """The agent's socket inside a container, else the HTTP API found by _config."""
    if _agent_transport is not None:
        return _agent_transport
    if os.environ.get("LODE_SOCKET"):
        raise RuntimeError(
            "LODE_SOCKET is set but the Lode agent is not serving calls in this process: inside a "
            "container, make remote calls from a function while it runs, not at import time or from a subprocess"
        )
    return _client_api()
