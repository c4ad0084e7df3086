"""The in-container agent, run as `python3 -m lode._agent`.

It connects to the host's Unix socket (LODE_SOCKET), imports the user's module, and then
serves inputs on a thread pool, speaking newline-delimited JSON:

    agent -> host   ready, fatal, output, log, call, snapshot_ready
    host -> agent   input, call_result, shutdown

With LODE_SNAPSHOT=take (a function with enable_memory_snapshot), the agent loads the module,
says snapshot_ready and hangs up; the host saves the container with CRIU, then writes
resume.json beside its socket. The agent waits for that file, and so does every container
restored from the snapshot later, each with its own: it carries what must differ per
container (the token), and the agent reseeds its random generators before it connects again.

A class declared with @app.cls is one function here: an input names its method and the
instance's parameters; the agent keeps one instance per parameter set, made (and its enter
hooks run) at its first input, and runs the exit hooks of every instance at shutdown.
`async def` functions and methods run on one event loop thread of the agent's.

Output printed while serving an input is sent as log messages tagged with that input's id.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import importlib
import inspect
import io
import json
import os
import pickle
import random
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from lode import _client, _values
from lode._app import App, Function
from lode._web_agent import WebApps

# Partial lines longer than this are sent without waiting for the newline.
LOG_CHUNK = 8192
CONNECT_ATTEMPTS = 50

_REAL_STDERR = sys.__stderr__


def _diag(message: str) -> None:
    """Agent trouble goes to the container's own stderr, never into an input's logs."""
    try:
        _REAL_STDERR.write(f"lode agent: {message}\n")
        _REAL_STDERR.flush()
    except (OSError, ValueError, AttributeError):
        pass


class Connection:
    """One socket to the host; sends whole lines under a lock so threads never interleave."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        self.send_line(encode(msg))

    def send_line(self, line: bytes) -> None:
        with self._lock:
            self.sock.sendall(line)

    def close(self) -> None:
        with self._lock:
            self.sock.close()


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"


current_input = _client.current_input


class CapturedStream(io.TextIOBase):
    """Replaces sys.stdout/sys.stderr: text is sent as log messages, tagged with the input the
    writing thread serves. Line-buffered per thread, so concurrent inputs never mix lines."""

    def __init__(self, stream: str, emit: Callable[[str | None, str, str], None]):
        super().__init__()
        self._stream = stream
        self._emit = emit
        self._lock = threading.Lock()
        self._buffers: dict[int, tuple[str | None, str]] = {}

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "replace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        key = threading.get_ident()
        input_id = current_input()
        out: list[tuple[str | None, str]] = []
        with self._lock:
            owner, text = self._buffers.pop(key, (input_id, ""))
            if owner != input_id:
                out.append((owner, text))
                text = ""
            text += s
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) >= LOG_CHUNK:
                cut = len(text)
            if cut:
                out.append((input_id, text[:cut]))
                text = text[cut:]
            if text:
                self._buffers[key] = (input_id, text)
        for owner, data in out:
            if data:
                self._emit(owner, self._stream, data)
        return len(s)

    def flush(self) -> None:
        self._flush([threading.get_ident()])

    def flush_all(self) -> None:
        with self._lock:
            keys = list(self._buffers)
        self._flush(keys)

    def _flush(self, keys: list[int]) -> None:
        with self._lock:
            out = [self._buffers.pop(k) for k in keys if k in self._buffers]
        for owner, data in out:
            if data:
                self._emit(owner, self._stream, data)


def error_object(exc: BaseException, skip_frames: int = 0) -> dict[str, Any]:
    """The wire form of an exception; skip_frames drops the agent's own frames."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__} whose str() failed>"
    try:
        formatted = "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        formatted = ""
    return {"kind": type(exc).__name__, "module": type(exc).__module__, "message": message, "traceback": formatted}


class _Waiting:
    """One input in a batch: its arguments, and where its result lands."""

    __slots__ = ("args", "kwargs", "done", "result", "error")

    def __init__(self, args: list, kwargs: dict):
        self.args = args
        self.kwargs = kwargs
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class Batcher:
    """Gathers the inputs of a `@batched` function that arrive together: the first waits up
    to `wait_ms` (less if the batch fills) and then calls the function once, with a list per
    parameter; each input gets its item of the returned list."""

    def __init__(self, fn: Any, max_size: int, wait_ms: int, settle: Callable[[Any], Any]):
        self._fn = fn
        self._max = max_size
        self._wait = wait_ms / 1000
        self._settle = settle
        self._lock = threading.Condition()
        self._pending: list[_Waiting] = []
        self._leading = False

    def submit(self, args: list, kwargs: dict) -> Any:
        me = _Waiting(list(args), dict(kwargs))
        with self._lock:
            self._pending.append(me)
            self._lock.notify_all()
            while not me.done.is_set():
                if self._leading or me not in self._pending:
                    # Another input leads the batch forming, or mine is running.
                    self._lock.wait()
                    continue
                # This input leads the next batch: wait for it to fill, or for the time.
                self._leading = True
                deadline = time.monotonic() + self._wait
                while len(self._pending) < self._max and time.monotonic() < deadline:
                    self._lock.wait(deadline - time.monotonic())
                batch, self._pending = self._pending[: self._max], self._pending[self._max :]
                self._leading = False
                # Inputs left over lead the next batch.
                self._lock.notify_all()
                self._lock.release()
                try:
                    self._run(batch)
                finally:
                    self._lock.acquire()
                    self._lock.notify_all()
        if me.error is not None:
            raise me.error
        return me.result

    def _run(self, batch: list[_Waiting]) -> None:
        try:
            width = len(batch[0].args)
            if any(len(w.args) != width or w.kwargs.keys() != batch[0].kwargs.keys() for w in batch):
                raise TypeError("the inputs of a batched function must pass the same arguments, by the same names")
            columns = [[w.args[i] for w in batch] for i in range(width)]
            named = {name: [w.kwargs[name] for w in batch] for name in batch[0].kwargs}
            results = self._fn(*columns, **named)
            if inspect.isawaitable(results):
                results = self._settle(results)
            results = list(results)
            if len(results) != len(batch):
                raise ValueError(
                    f"a batched function got {len(batch)} inputs and returned {len(results)} results; "
                    "return one per input, in order"
                )
            for waiting, result in zip(batch, results):
                waiting.result = result
        except BaseException as e:
            for waiting in batch:
                waiting.error = e
        for waiting in batch:
            waiting.done.set()


class Agent:
    def __init__(self, conn: Connection, concurrency: int):
        self.conn = conn
        self.functions: dict[str, Function] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="lode-input")
        self.stdout = CapturedStream("stdout", self._log)
        self.stderr = CapturedStream("stderr", self._log)
        self.transport: _client.AgentTransport | None = None
        # Class instances by (class name, parameters), each with the lock its creation holds.
        self._instances: dict[tuple[str, str], Any] = {}
        self._instance_locks: dict[tuple[str, str], threading.Lock] = {}
        self._instances_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.web = WebApps(self.conn.send, self._event_loop)
        self._batchers: dict[tuple[str, str, str], Batcher] = {}
        self._web_methods: dict[tuple[str, str], Any] = {}
        # The socket's reader: the loop's thread once reading starts.
        self._reader_thread: int | None = None
        self._pending = bytearray()
        self._ended = threading.Event()

    def _log(self, input_id: str | None, stream: str, data: str) -> None:
        # Lone surrogates cannot be sent as UTF-8; replace them rather than lose the line.
        data = data.encode("utf-8", "replace").decode("utf-8")
        try:
            self.conn.send({"type": "log", "id": input_id, "stream": stream, "data": data})
        except OSError:
            pass  # the host is gone; the reader will notice and exit

    def flush_logs(self) -> None:
        self.stdout.flush_all()
        self.stderr.flush_all()

    def load(self, module_name: str) -> None:
        module = importlib.import_module(module_name)
        apps = [v for v in vars(module).values() if isinstance(v, App)]
        if not apps:
            raise LookupError(f'module {module_name!r} defines no lode.App; add `app = lode.App("...")` to it')
        for app in apps:
            self.functions.update(app.registered_functions)

    def serve(self, msg: dict[str, Any]) -> None:
        input_id = msg["id"]
        _client.set_current_input(input_id)
        try:
            line = self._run(msg)
        except Exception as e:  # a bug here must still answer the input, or its caller waits forever
            error = {
                "kind": "RuntimeError",
                "module": "lode",
                "traceback": "",
                "message": f"the Lode agent failed to serve this input: {type(e).__name__}: {e}",
            }
            line = encode({"type": "output", "id": input_id, "error": error})
        finally:
            self.stdout.flush()
            self.stderr.flush()
            _client.set_current_input(None)
        try:
            self.conn.send_line(line)
        except OSError:
            pass

    def _run(self, msg: dict[str, Any]) -> bytes:
        input_id = msg["id"]
        name = msg.get("function")
        function = self.functions.get(name) if isinstance(name, str) else None
        if function is None:
            known = ", ".join(sorted(self.functions)) or "none"
            error = {
                "kind": "LookupError",
                "module": "lode",
                "traceback": "",
                "message": f"this container has no function {name!r} (it has: {known}); redeploy the app",
            }
            return encode({"type": "output", "id": input_id, "error": error})
        pickled = "pickled" in msg
        try:
            target = self._target(function, msg)
            if pickled:
                args, kwargs = pickle.loads(base64.b64decode(msg["pickled"]))
            else:
                args = _values.decode(msg.get("args") or [], False)
                kwargs = _values.decode(msg.get("kwargs") or {}, False)
            batch = getattr(target, "_lode_batched", None)
            if batch is not None:
                result = self._batcher(function, msg, target, batch).submit(args, kwargs)
            else:
                result = target(*args, **kwargs)
            if inspect.isawaitable(result):
                result = self._await(result, input_id)
            generator = inspect.isgenerator(result) or inspect.isasyncgen(result)
            if msg.get("stream"):
                if not generator:
                    raise TypeError(f"{function.name} is not a generator function; call it with .remote()")
                self._stream(function, input_id, result, pickled)
                result = None
            elif generator:
                raise TypeError(f"{function.name} is a generator function; call it with .remote_gen()")
        except BaseException as e:  # SystemExit and KeyboardInterrupt are results too
            return encode({"type": "output", "id": input_id, "error": error_object(e, skip_frames=1)})

        if pickled or function.serialization == "pickle":
            try:
                data = base64.b64encode(pickle.dumps(result)).decode("ascii")
                return encode({"type": "output", "id": input_id, "result_pickled": data})
            except Exception as e:
                message = f"the result of {function.name}() cannot be pickled ({e}); return a picklable value"
        else:
            try:
                return _encode_value({"type": "output", "id": input_id}, result)
            except (TypeError, ValueError) as e:
                message = (
                    f"the result of {function.name}() is not JSON-serializable ({e}); return JSON values "
                    'or declare the function with serialization="pickle"'
                )
        error = {"kind": "TypeError", "module": "lode", "message": message, "traceback": ""}
        return encode({"type": "output", "id": input_id, "error": error})

    def begin_web(self, msg: dict[str, Any]) -> None:
        """A web request for an ASGI or WSGI app or a web server."""
        name = msg.get("function")
        function = self.functions.get(name) if isinstance(name, str) else None
        method = msg.get("method")
        if function is not None and function._cls is not None and isinstance(method, str):
            function = self._web_method(function, method)
            name = f"{name}.{method}"
        if function is None or function._web_serve not in ("asgi", "wsgi", "server"):
            error = {
                "kind": "LookupError",
                "module": "lode",
                "traceback": "",
                "message": f"this container has no web app or web server {name!r}; redeploy the app",
            }
            self.conn.send({"type": "output", "id": msg["id"], "error": error})
            return
        self.web.begin(msg, function, self.pool.submit)

    def _web_method(self, function: Function, method: str) -> Any:
        """A class's web method as the web apps serve it, or None if it has no such method."""
        from lode._web_agent import WebMethod

        cls = function._cls
        mark = cls._web_methods.get(method)
        if mark is None:
            return None
        with self._instances_lock:
            made = self._web_methods.get((function.name, method))
            if made is None:
                made = self._web_methods[(function.name, method)] = WebMethod(
                    f"{function.name}.{method}", mark,
                    lambda: getattr(self._instance(cls, cls._bind({})), method),
                )
            return made

    def _batcher(self, function: Function, msg: dict[str, Any], target: Any, batch: tuple[int, int]) -> Batcher:
        """The batcher of a batched function, or of a batched method of one instance."""
        key = (function.name, str(msg.get("method")), json.dumps(msg.get("params") or {}, sort_keys=True))
        with self._instances_lock:
            batcher = self._batchers.get(key)
            if batcher is None:
                batcher = self._batchers[key] = Batcher(target, *batch, lambda r: self._await(r, None))
            return batcher

    def _stream(self, function: Function, input_id: str, generator: Any, pickled: bool) -> None:
        """Sends each value a generator yields as it yields it."""

        def send(value: Any) -> None:
            if pickled or function.serialization == "pickle":
                data = base64.b64encode(pickle.dumps(value)).decode("ascii")
                self.conn.send({"type": "yield", "id": input_id, "result_pickled": data})
                return
            try:
                line = _encode_value({"type": "yield", "id": input_id}, value)
            except (TypeError, ValueError) as e:
                raise TypeError(
                    f"a value {function.name}() yielded is not JSON-serializable ({e}); yield JSON values "
                    'or declare the function with serialization="pickle"'
                ) from None
            self.conn.send_line(line)

        if inspect.isasyncgen(generator):

            async def drain() -> None:
                async for value in generator:
                    send(value)

            self._await(drain(), input_id)
        else:
            for value in generator:
                send(value)

    def _target(self, function: Function, msg: dict[str, Any]) -> Callable[..., Any]:
        """What an input runs: the function, or the named method of the instance for the
        input's parameters."""
        cls = function._cls
        method = msg.get("method")
        if cls is None:
            if method is not None:
                raise TypeError(f"{function.name} is a function, not a class; call it without a method")
            if function._web_serve == "call":
                return _with_query_types(function._fn)
            return function._fn
        if not isinstance(method, str):
            raise TypeError(
                f"{function.name} is a class; call one of its methods ({', '.join(cls._methods)}), "
                f"e.g. {function.name}().{cls._methods[0]}.remote()"
            )
        if method not in cls._methods:
            raise AttributeError(
                f"{function.name} has no method {method!r} marked @lode.method() (it has: {', '.join(cls._methods)})"
            )
        params = msg.get("params") or {}
        if not isinstance(params, dict):
            raise TypeError(f"the parameters of {function.name} must be an object, not {params!r}")
        return getattr(self._instance(cls, cls._bind(params)), method)

    def _instance(self, cls: Any, values: dict[str, Any]) -> Any:
        from lode._cls import params_key

        key = (cls.__name__, params_key(values))
        with self._instances_lock:
            if key in self._instances:
                return self._instances[key][1]
            lock = self._instance_locks.setdefault(key, threading.Lock())
        # Made once, outside the shared lock: another parameter set need not wait for this
        # one's enter hooks. A failed enter is reported to its input and tried again later.
        with lock:
            with self._instances_lock:
                if key in self._instances:
                    return self._instances[key][1]
            input_id = _client.current_input()
            instance = cls._new_instance(values, lambda r: self._await(r, input_id))
            with self._instances_lock:
                self._instances[key] = (cls, instance)
            return self._instances[key][1]

    def prepare_instances(self) -> list[tuple[str, str]]:
        """Before a snapshot: the instance without parameters of each class that has
        `enter(snap=True)` hooks, made with only those run. One whose hook raises is left to
        its first input, which reports the error."""
        from lode._cls import params_key

        prepared = []
        for function in self.functions.values():
            cls = function._cls
            if cls is None or not cls._snap_hooks():
                continue
            try:
                values = cls._bind({})
            except TypeError:
                continue  # parameters without defaults: made per call, after the restore
            key = (cls.__name__, params_key(values))
            try:
                instance = cls._new_instance(values, lambda r: self._await(r, None), snap=True)
            except Exception as e:
                _diag(f"{cls.__name__}: an enter(snap=True) hook raised ({type(e).__name__}: {e}); it runs at the first input instead")
                continue
            self._instances[key] = (cls, instance)
            prepared.append(key)
        return prepared

    def finish_instances(self, prepared: list[tuple[str, str]]) -> None:
        """After the snapshot or a restore: the other enter hooks of the prepared instances.
        One that raises drops its instance, so the first input makes it again and reports."""
        for key in prepared:
            cls, instance = self._instances[key]
            try:
                cls._finish_enter(instance, lambda r: self._await(r, None))
            except Exception as e:
                _diag(f"{cls.__name__}: an enter hook raised after the restore ({type(e).__name__}: {e})")
                del self._instances[key]

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The agent's event loop, on a thread of its own, started at first use."""
        with self._instances_lock:
            if self._loop is None:
                self._loop = _new_event_loop()
                threading.Thread(target=_run_loop, args=(self._loop,), name="lode-asyncio", daemon=True).start()
            return self._loop

    def _await(self, awaitable: Any, input_id: str | None) -> Any:
        """Runs a coroutine on the agent's event loop and waits for it in this thread."""
        loop = self._event_loop()

        async def serving() -> Any:
            _client.set_current_input_context(input_id)
            return await awaitable

        return asyncio.run_coroutine_threadsafe(serving(), loop).result()

    def _stop(self) -> None:
        self.pool.shutdown(wait=True)
        self.shutdown()
        _exit(self, 0)

    def shutdown(self) -> None:
        """Runs every instance's exit hooks and the web apps' lifespan shutdown (their
        failures are logged, never raised)."""
        self.web.shutdown()
        with self._instances_lock:
            instances = list(self._instances.values())
            self._instances.clear()
        for cls, instance in instances:
            try:
                cls._run_exit_hooks(instance, lambda r: self._await(r, None))
            except BaseException:
                traceback.print_exc()

    def dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "input":
            if not isinstance(msg.get("id"), str):
                _diag(f"ignoring an input without a string id: {str(msg)[:200]}")
                return
            if "http" in msg or "websocket" in msg:
                self.begin_web(msg)
            else:
                self.pool.submit(self.serve, msg)
        elif kind in ("http_body", "http_disconnect", "ws_receive", "ws_disconnect"):
            if not self.web.event(msg):
                _diag(f"ignoring a {kind} for no web input: {msg.get('id')!r}")
        elif kind == "shutdown":
            # Off the loop's thread: exit hooks may be coroutines that need it.
            threading.Thread(target=self._stop, name="lode-shutdown").start()
        elif kind == "call_result":
            if self.transport is None or not self.transport.resolve(msg):
                _diag(f"ignoring a call_result nobody waits for: {msg.get('call_id')!r}")
        else:
            _diag(f"ignoring a message of unknown type {kind!r}")

    def handle_line(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            _diag(f"ignoring a line that is not JSON: {raw[:200]!r}")
            return
        if isinstance(msg, dict):
            self.dispatch(msg)
        else:
            _diag(f"ignoring a message that is not an object: {raw[:200]!r}")

    def read_forever(self) -> None:
        """Reads the host's messages on the event loop's thread until the host hangs up, so
        a web request goes to its ASGI app with no hop between threads; sync inputs go to
        the thread pool from there."""
        loop = self._event_loop()
        loop.call_soon_threadsafe(self._start_reading, loop)
        self._ended.wait()

    def _start_reading(self, loop: asyncio.AbstractEventLoop) -> None:
        self._reader_thread = threading.get_ident()
        loop.add_reader(self.conn.sock.fileno(), self._read_some)

    def pump(self) -> bool:
        """Reads and handles what the host sent, when called on the reading thread (see
        AgentTransport); False on any other thread."""
        if threading.get_ident() != self._reader_thread or self._ended.is_set():
            return False
        self._read_some()
        return True

    def _read_some(self) -> None:
        """One read from the socket, and every whole message in what has come."""
        try:
            data = self.conn.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as e:
            _diag(f"reading from the host failed: {e}")
            data = b""
        if not data:
            if self._loop is not None:
                self._loop.remove_reader(self.conn.sock.fileno())
            self._ended.set()
            if self.transport is not None:
                self.transport.close()
            return
        pending = self._pending
        scanned = len(pending)
        pending.extend(data)
        start = 0
        while True:
            # Only the new bytes can hold the next newline: a long message is scanned once.
            end = pending.find(b"\n", max(start, scanned))
            if end < 0:
                break
            line = bytes(pending[start:end])
            start = end + 1
            if line:
                try:
                    self.handle_line(line)
                except Exception as e:  # one bad message must not replay the others
                    _diag(f"handling a message failed: {type(e).__name__}: {e}")
        del pending[:start]


def _encode_value(message: dict[str, Any], value: Any) -> bytes:
    """`message` with `value` as its result, encoded once: as it is when JSON holds it,
    else (and for a tuple) with bytes and tuples tagged."""
    if not isinstance(value, tuple):
        try:
            return encode({**message, "result": value})
        except (TypeError, ValueError):
            pass
    return encode({**message, "result": _values.encode(value, False)})


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Runs `loop` for the container's life under one task that never ends. Libraries that
    look for the loop's root task find it: anyio (which Starlette runs sync endpoints
    through) otherwise takes each request's task for the root, scans every task to find it,
    and stops the worker thread it started when that request ends."""

    async def hold() -> None:
        await loop.create_future()

    loop.run_until_complete(hold())


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when the image has it (FastAPI's standard install brings it), else
    asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _with_query_types(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A web endpoint gets query parameters as strings; those its annotations call int,
    float or bool are converted, as FastAPI does."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    truthy = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

    def convert(name: str, value: Any) -> Any:
        param = parameters.get(name)
        annotation = param.annotation if param is not None else None
        if isinstance(annotation, str):
            annotation = {"int": int, "float": float, "bool": bool}.get(annotation)
        if not isinstance(value, str) or annotation not in (int, float, bool):
            return value
        try:
            return truthy[value.lower()] if annotation is bool else annotation(value)
        except (KeyError, ValueError):
            raise ValueError(f"query parameter {name}={value!r} is not a valid {annotation.__name__}") from None

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **{k: convert(k, v) for k, v in kwargs.items()})

    return call


def connect(path: str) -> socket.socket:
    for attempt in range(CONNECT_ATTEMPTS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def _snapshot(agent: Agent, path: str) -> None:
    """Runs the `enter(snap=True)` hooks of each class's instance without parameters, hangs
    up to be saved, waits for resume.json (once saved, or once restored), takes this
    container's own settings from it, connects again, and runs the other enter hooks."""
    prepared = agent.prepare_instances()
    agent.flush_logs()
    agent.conn.send({"type": "snapshot_ready"})
    agent.conn.close()
    resume = os.path.join(os.path.dirname(path), "resume.json")
    while not os.path.exists(resume):
        time.sleep(0.0005)
    with open(resume, encoding="utf-8") as f:
        state = json.load(f)
    os.environ["LODE_CONTAINER_TOKEN"] = state["token"]
    # Restored copies share the snapshot's generator states; each gets fresh ones.
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        ssl.RAND_add(os.urandom(32), 32.0)
    agent.conn = Connection(connect(path))
    agent.web = WebApps(agent.conn.send, agent._event_loop)
    agent.finish_instances(prepared)


def _exit(agent: Agent | None, code: int) -> None:
    if agent is not None:
        try:
            agent.flush_logs()
        except Exception:
            pass
    os._exit(code)


def main() -> None:
    # The user's module must run normally here, imports() blocks included.
    os.environ.pop("LODE_COLLECT", None)
    path = os.environ.get("LODE_SOCKET")
    module = os.environ.get("LODE_MODULE")
    if not path or not module:
        _diag("LODE_SOCKET and LODE_MODULE must be set; this program is started by the Lode host")
        os._exit(2)
    try:
        concurrency = int(os.environ.get("LODE_CONCURRENCY") or "1")
        if concurrency < 1:
            raise ValueError
    except ValueError:
        _diag(f"LODE_CONCURRENCY={os.environ.get('LODE_CONCURRENCY')!r} is not an integer >= 1")
        os._exit(2)
    try:
        sock = connect(path)
    except OSError as e:
        _diag(f"cannot connect to the host at {path}: {e}")
        os._exit(2)

    agent = Agent(Connection(sock), concurrency)
    # As PID 1 the default SIGTERM action is ignored; stop at once instead (no flush: the
    # handler may interrupt a thread holding the send lock).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
    sys.stdout, sys.stderr = agent.stdout, agent.stderr
    app_dir = os.environ.get("LODE_APP_DIR")
    if app_dir and app_dir not in sys.path:
        sys.path.insert(0, app_dir)

    try:
        agent.load(module)
    except BaseException as e:  # report any import failure, even SystemExit
        agent.flush_logs()
        try:
            agent.conn.send({"type": "fatal", "error": error_object(e)})
        except OSError:
            pass
        _exit(agent, 1)

    if os.environ.get("LODE_SNAPSHOT") == "take":
        try:
            _snapshot(agent, path)
        except OSError as e:
            _diag(f"cannot reach the host after the snapshot: {e}")
            _exit(agent, 1)

    agent.transport = _client.AgentTransport(
        agent.conn.send, os.environ.get("LODE_CONTAINER_TOKEN", ""), pump=agent.pump
    )
    _client.set_agent_transport(agent.transport)
    agent.flush_logs()
    try:
        agent.conn.send({"type": "ready", "functions": list(agent.functions)})
    except OSError as e:
        _diag(f"cannot reach the host: {e}")
        _exit(agent, 1)
    agent.read_forever()
    agent.transport.close()
    _exit(agent, 0)


if __name__ == "__main__":
    main()
