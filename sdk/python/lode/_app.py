"""Apps, functions and the objects their decorators take: what a user's file declares."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import _aio, _client, exception
from ._image import Image

APP_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}$")
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?-]+$")
WEB_METHOD = re.compile(r"^[A-Z]{1,16}$")

# The keyword arguments of App.function, which web_endpoint accepts too.
FUNCTION_OPTIONS = (
    "image",
    "cpu",
    "memory",
    "timeout",
    "min_containers",
    "max_containers",
    "scaledown_window",
    "retries",
    "concurrency",
    "gpu",
    "secrets",
    "volumes",
    "schedule",
    "network",
    "serialization",
    "name",
    "enable_memory_snapshot",
)

# map/starmap: threads issuing calls, and inputs taken from the iterable ahead of the output.
MAP_WORKERS = 32
MAP_IN_FLIGHT = 64


def is_local() -> bool:
    """True unless this code runs inside a Lode container (a function's, or a run_function
    build step's)."""
    return not (os.environ.get("LODE_SOCKET") or os.environ.get("LODE_BUILD_FUNCTION"))


class Retries:
    """How often a failed call is retried, waiting initial_delay * backoff_coefficient**n between tries."""

    def __init__(self, max_retries: int, backoff_coefficient: float = 2.0, initial_delay: float = 1.0):
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 10:
            raise ValueError(f"Retries(max_retries={max_retries!r}): use an integer from 0 to 10")
        if not _number(initial_delay) or not 0 <= initial_delay <= 60:
            raise ValueError(f"Retries(initial_delay={initial_delay!r}): use seconds from 0 to 60")
        if not _number(backoff_coefficient) or not 1 <= backoff_coefficient <= 10:
            raise ValueError(f"Retries(backoff_coefficient={backoff_coefficient!r}): use a number from 1 to 10")
        self.max_retries = max_retries
        self.backoff_coefficient = float(backoff_coefficient)
        self.initial_delay = float(initial_delay)

    def __repr__(self) -> str:
        return (
            f"Retries(max_retries={self.max_retries}, backoff_coefficient={self.backoff_coefficient}, "
            f"initial_delay={self.initial_delay})"
        )

    def to_manifest(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "initial_delay": self.initial_delay,
            "backoff_coefficient": self.backoff_coefficient,
        }


class Period:
    """Run on a fixed interval: Period(minutes=5) is "every 300s"."""

    def __init__(self, seconds: float = 0, minutes: float = 0, hours: float = 0, days: float = 0):
        parts = {"seconds": seconds, "minutes": minutes, "hours": hours, "days": days}
        for key, value in parts.items():
            if not _number(value) or value < 0:
                raise ValueError(f"Period({key}={value!r}): use a non-negative number")
        total = seconds + 60 * minutes + 3600 * hours + 86400 * days
        if total < 1 or total != math.floor(total):
            raise ValueError(f"Period(...) totals {total} seconds; it must be a whole number of seconds, at least 1")
        self.seconds = int(total)

    def __repr__(self) -> str:
        return f"Period(seconds={self.seconds})"

    def to_manifest(self) -> str:
        return f"every {self.seconds}s"


class Cron:
    """Run on a cron schedule: five fields, minute hour day-of-month month day-of-week."""

    def __init__(self, spec: str):
        fields = [f for f in spec.split(" ") if f] if isinstance(spec, str) else []
        if len(fields) != 5 or not all(CRON_FIELD.fullmatch(f) for f in fields):
            raise ValueError(
                f"Cron({spec!r}) is not a cron expression: give five space-separated fields "
                '(minute hour day month weekday), e.g. "*/5 * * * *"'
            )
        self.spec = spec

    def __repr__(self) -> str:
        return f"Cron({self.spec!r})"

    def to_manifest(self) -> str:
        return self.spec


class Secret:
    """Environment variables for a function: a secret stored on the server, or an inline dict."""

    def __init__(self, name: str, values: dict[str, str] | None = None):
        # Private: use Secret.from_name or Secret.from_dict.
        self.name = name
        self._values = values

    def __repr__(self) -> str:
        return f"Secret({self.name!r})"

    @classmethod
    def from_name(cls, name: str) -> Secret:
        """A secret created on the server (by name)."""
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise ValueError(f"Secret.from_name({name!r}): names are letters, digits, '_' and '-', at most 63")
        return cls(name)

    @classmethod
    def from_dict(cls, values: dict[str, str]) -> Secret:
        """An inline secret, sent with the deploy; its name is derived from its content."""
        if not isinstance(values, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in values.items()
        ):
            raise TypeError("Secret.from_dict() takes a dict of non-empty str names to str values")
        canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
        name = "inline-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        return cls(name, dict(values))

    @property
    def inline_values(self) -> dict[str, str] | None:
        return None if self._values is None else dict(self._values)


# Where each volume is mounted in this process's functions, so commit() knows what to sync.
_volume_mounts: dict[str, set[str]] = collections.defaultdict(set)


class Volume:
    """A persistent directory shared between containers, mounted with volumes={"/path": vol}."""

    def __init__(self, name: str, create_if_missing: bool = False, read_only: bool = False):
        # Private: use Volume.from_name.
        self.name = name
        self.create_if_missing = bool(create_if_missing)
        self._read_only = bool(read_only)

    def __repr__(self) -> str:
        extra = ", read_only=True" if self._read_only else ""
        return f"Volume({self.name!r}{extra})"

    @classmethod
    def from_name(
        cls, name: str, create_if_missing: bool = False, read_only: bool = False, *, version: int | None = None,
        environment_name: str | None = None,
    ) -> Volume:
        # Modal's volume versions change no result here: Lode's volumes have one format.
        if version not in (None, 1, 2):
            raise ValueError(f"Volume.from_name(version={version!r}): use 1 or 2, or leave it out")
        if environment_name is not None:
            raise ValueError("environment_name: Lode has one environment per server; leave it out")
        if not isinstance(name, str) or not VOLUME_NAME.fullmatch(name):
            raise ValueError(f"Volume.from_name({name!r}): names are letters, digits, '.', '_' and '-', at most 63")
        return cls(name, create_if_missing, read_only)

    def read_only(self) -> Volume:
        """The same volume, mounted read-only."""
        return Volume(self.name, self.create_if_missing, True)

    @property
    def is_read_only(self) -> bool:
        return self._read_only

    def _mount(self, path: str) -> dict[str, Any]:
        """The volume mounted at `path`, as manifests, sandboxes and class options name it."""
        return {"name": self.name, "path": path, "read_only": self._read_only,
                "create_if_missing": self.create_if_missing}

    def commit(self) -> None:
        """Makes writes durable (fsyncs every file under the mount and the directories) and,
        where several hosts share Lode's state, publishes what this host's copy changed as the
        volume's next version, bringing in other hosts' commits too (last commit wins, per
        file)."""
        if is_local():
            raise RuntimeError(
                f"Volume {self.name!r}: commit() works only inside a Lode container, where the volume is mounted"
            )
        if self._read_only:
            raise RuntimeError(f"Volume {self.name!r} is mounted read-only here; there is nothing to commit")
        mounts = sorted(p for p in _volume_mounts.get(self.name, ()) if os.path.isdir(p))
        if not mounts:
            raise RuntimeError(
                f"Volume {self.name!r} is not mounted in this container; "
                "add volumes={'/path': vol} to the function that commits it"
            )
        for mount in mounts:
            _fsync_tree(mount)
        self._sync("commit")

    def reload(self) -> None:
        """Brings in what other hosts committed since this host's copy last synced; files
        this copy changed and did not commit are kept. On one host every container mounts
        the same copy, so there is nothing to bring in."""
        if is_local():
            raise RuntimeError(
                f"Volume {self.name!r}: reload() works only inside a Lode container, where the volume is mounted"
            )
        self._sync("reload")

    def _sync(self, action: str) -> None:
        from lode import _client

        if _client._agent_transport is None:
            raise RuntimeError(
                f"Volume {self.name!r}: {action}() works from a function while it runs, not at import time"
            )
        _client._agent_transport.volume(self.name, action)


def _fsync_tree(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = os.path.join(dirpath, name)
            # Only regular files: opening a FIFO would block, and links point elsewhere.
            if stat.S_ISREG(os.lstat(path).st_mode):
                _fsync_path(path)
        _fsync_path(dirpath)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FunctionCall:
    """A spawned call; get() waits for its result."""

    def __init__(self, call_id: str, serialization: str = "json"):
        self.object_id = call_id
        # Only a call spawned from a pickle function's handle may unpickle its result.
        self._serialization = serialization

    def __repr__(self) -> str:
        return f"FunctionCall({self.object_id!r})"

    @classmethod
    def from_id(cls, call_id: str) -> FunctionCall:
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(f"FunctionCall.from_id({call_id!r}): pass the call id string that spawn() gave")
        return cls(call_id)

    @_aio.blocking
    def cancel(self, terminate_containers: bool = False) -> None:
        """Cancels the call: get() raises from now on, and an input still queued never runs.
        An input a container runs already runs to its end (its result is dropped)."""
        if terminate_containers:
            raise ValueError(
                "cancel(terminate_containers=True): Lode does not stop running containers for a "
                "cancel; leave it out (the call's result is dropped either way)"
            )
        transport = _client.transport()
        if isinstance(transport, _client.AgentTransport):
            raise exception.UnimplementedError("FunctionCall.cancel() works from the client, not inside a function")
        transport.request("POST", f"/v1/calls/{urllib.parse.quote(self.object_id, safe='')}/cancel")

    @staticmethod
    def gather(*calls: FunctionCall) -> list[Any]:
        """The results of several spawned calls, in order; the first failure raises."""
        return [call.get() for call in calls]

    @_aio.blocking
    def get(self, timeout: float | None = None) -> Any:
        """The call's result (or its exception); TimeoutError if it is not done within timeout seconds."""
        transport = _client.transport()
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            if deadline is None:
                wait = _client.MAX_WAIT_S
            else:
                wait = min(_client.MAX_WAIT_S, max(0, math.ceil(deadline - time.monotonic())))
            body = transport.poll(self.object_id, wait)
            status = body.get("status")
            if status == "succeeded":
                return _client.decode_result(body, self._serialization, f"call {self.object_id}")
            if status == "failed":
                raise _client.exception_from_error(body.get("error") or {"kind": "failed", "message": "no error given"})
            if status == "cancelled":
                error = body.get("error")
                message = error.get("message") if isinstance(error, dict) else None
                raise _client.RemoteError("cancelled", message or f"call {self.object_id} was cancelled")
            if status not in ("pending", "running"):
                raise _client.RemoteError(
                    "bad_response",
                    f"call {self.object_id} has unknown status {status!r}; the SDK and server versions may differ",
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"call {self.object_id} is still {status} after {timeout}s; call get() again to keep waiting"
                )


class Function:
    """A function declared with @app.function or @app.web_endpoint, or a handle from from_name."""

    def __init__(
        self,
        fn: Callable[..., Any] | None,
        name: str,
        app: App | None = None,
        app_name: str | None = None,
        serialization: str = "json",
        spec: dict[str, Any] | None = None,
    ):
        self._fn = fn
        self.name = name
        self.app = app
        self._app_name = app_name
        self.serialization = serialization
        self._spec = spec or {}
        # The Cls, when this function is a class's pool.
        self._cls: Any = None
        # How a web function answers ("call", "asgi", "wsgi", "server"); None for others.
        self._web_serve: str | None = None
        self._web_port: int | None = None
        self._web_startup_timeout = 5.0
        self._web_endpoint: str | None = None
        self._web_docs = False
        if fn is not None:
            functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        app = self._app_name or (self.app.name if self.app else os.environ.get("LODE_APP", "?"))
        return f"Function({app}.{self.name})"

    @classmethod
    def from_name(cls, app_name: str | None, function_name: str, *, serialization: str = "json") -> Function:
        """A handle to a deployed function; app_name None means this container's own app.

        serialization="pickle" is for a pickle function you trust: its results are unpickled
        here, which runs whatever code they carry."""
        if not isinstance(function_name, str) or not function_name:
            raise ValueError(f"Function.from_name: function_name {function_name!r} must be a non-empty str")
        if app_name is not None and (not isinstance(app_name, str) or not app_name):
            raise ValueError(f"Function.from_name: app_name {app_name!r} must be a non-empty str or None")
        if serialization not in ("json", "pickle"):
            raise ValueError(f'Function.from_name: serialization={serialization!r}; use "json" or "pickle"')
        return cls(None, function_name, app_name=app_name, serialization=serialization)

    def _target_app(self) -> str:
        # Inside a container LODE_APP is the deployed name, which `lode deploy --name` may change.
        if self._app_name is not None:
            return self._app_name
        deployed = os.environ.get("LODE_APP")
        if deployed:
            return deployed
        if self.app is not None:
            return self.app.name
        raise ValueError(
            f"Function.from_name(None, {self.name!r}) needs an app name outside a container; pass the app's name"
        )

    def get_web_url(self) -> str | None:
        """The public URL of a web function (None for others), by path, which works from
        anywhere the server is reachable; ASGI and WSGI apps and web servers are also served
        at the root of http://<app>--<function>.lode.localhost:PORT/."""
        web = self._spec.get("web")
        path = None if web is None else web["path"]
        if web is None and self._fn is None:
            # From Function.from_name: the deployed app says.
            app = self._target_app()
            summary = _client.api_transport().request("GET", f"/v1/apps/{urllib.parse.quote(app, safe='')}")
            found = [f for f in summary.get("functions", []) if f.get("name") == self.name]
            if not found:
                raise exception.NotFoundError(f"app {app!r} has no function {self.name!r}")
            path = found[0].get("web")
        if path is None:
            return None
        if os.environ.get("LODE_SOCKET"):
            base = os.environ.get("LODE_PUBLIC_URL", "")
        else:
            base = _client.transport().request("GET", "/v1/info")["http"]
        return f"{base}/{self._target_app()}{path}"

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the Python function here, in this process."""
        if self._fn is None:
            raise TypeError(f"{self!r} comes from Function.from_name and has no local code; use .remote()")
        if self._cls is not None:
            raise TypeError(f"{self!r} is a class; call a method of an instance, e.g. {self.name}().method.local()")
        return self._fn(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.local(*args, **kwargs)

    def _payload(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return _client.encode_args(args, kwargs, self.serialization, self.name)

    @_aio.blocking
    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the function on Lode and returns its result (or raises its exception)."""
        if self._fn is not None and (inspect.isgeneratorfunction(self._fn) or inspect.isasyncgenfunction(self._fn)):
            raise TypeError(f"{self!r} is a generator function; call it with .remote_gen()")
        payload = self._payload(args, kwargs)
        body = _client.transport().call(self._target_app(), self.name, payload)
        return _client.decode_result(body, self.serialization, repr(self))

    @_aio.blocking(iterator=True)
    def remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Runs a generator function on Lode and yields its values as it yields them."""
        if self._fn is not None and not (inspect.isgeneratorfunction(self._fn) or inspect.isasyncgenfunction(self._fn)):
            raise TypeError(f"{self!r} is not a generator function; call it with .remote()")
        payload = self._payload(args, kwargs)
        for body in _client.transport().call_gen(self._target_app(), self.name, payload):
            yield _client.decode_result(body, self.serialization, repr(self))

    @_aio.blocking
    def spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        """Starts the function on Lode without waiting; FunctionCall.get() gives the result."""
        payload = self._payload(args, kwargs)
        return FunctionCall(_client.transport().spawn(self._target_app(), self.name, payload), self.serialization)

    @_aio.blocking(iterator=True)
    def map(
        self,
        iterable: Iterable[Any],
        *more_iterables: Iterable[Any],
        order_outputs: bool = True,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """Calls the function on each item (zipped with more_iterables), many at once."""
        # Like the builtin map: stops at the shortest iterable.
        return self._map(zip(iterable, *more_iterables, strict=False), order_outputs, return_exceptions)

    @_aio.blocking(iterator=True)
    def starmap(
        self, iterable: Iterable[Iterable[Any]], order_outputs: bool = True, return_exceptions: bool = False
    ) -> Iterator[Any]:
        """Like map, with each item unpacked as the positional arguments."""
        return self._map(iterable, order_outputs, return_exceptions)

    def _map(self, arg_tuples: Iterable[Iterable[Any]], ordered: bool, return_exceptions: bool) -> Iterator[Any]:
        transport = _client.transport()
        app = self._target_app()
        # Inside a container, the workers' calls belong to the input this thread serves.
        serving = _client.current_input()

        def one(args: Iterable[Any]) -> Any:
            _client.set_current_input(serving)
            payload = self._payload(tuple(args), {})
            return _client.decode_result(transport.call(app, self.name, payload), self.serialization, repr(self))

        def outcome(future: concurrent.futures.Future) -> Any:
            error = future.exception()
            if error is None:
                return future.result()
            if return_exceptions and isinstance(error, Exception):
                return error
            raise error

        inputs = iter(arg_tuples)
        pool = concurrent.futures.ThreadPoolExecutor(MAP_WORKERS, thread_name_prefix=f"lode-map-{self.name}")
        try:
            if ordered:
                queue: collections.deque = collections.deque()
                for args in inputs:
                    queue.append(pool.submit(one, args))
                    if len(queue) >= MAP_IN_FLIGHT:
                        yield outcome(queue.popleft())
                while queue:
                    yield outcome(queue.popleft())
            else:
                running: set = set()
                exhausted = False
                while True:
                    while not exhausted and len(running) < MAP_IN_FLIGHT:
                        try:
                            running.add(pool.submit(one, next(inputs)))
                        except StopIteration:
                            exhausted = True
                    if not running:
                        break
                    done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        yield outcome(future)
        finally:
            # Also reached when the caller stops iterating early: drop what has not started.
            pool.shutdown(wait=False, cancel_futures=True)

    def _manifest(self, module: str) -> dict[str, Any]:
        spec = self._spec
        resources = {k: v for k, v in spec["resources"].items() if v is not None}
        image = spec["image"] or (self.app.image if self.app else None) or Image.debian_slim()
        entry: dict[str, Any] = {
            "name": self.name,
            "runtime": "python",
            "python": {
                "module": module,
                "qualname": getattr(self._fn, "__qualname__", self.name),
                "image": image.to_spec(),
                "serialization": self.serialization,
            },
            "resources": resources,
        }
        if spec.get("cls"):
            entry["python"]["cls"] = {"methods": list(spec["cls"]["methods"])}
            if spec["cls"].get("web"):
                entry["python"]["cls"]["web"] = [dict(w) for w in spec["cls"]["web"]]
        if spec.get("web"):
            entry["web"] = {k: v for k, v in spec["web"].items() if v is not None}
        if spec.get("schedule") is not None:
            entry["schedule"] = spec["schedule"].to_manifest()
        if spec["secrets"]:
            entry["secrets"] = [s.name for s in spec["secrets"]]
        if spec["volumes"]:
            entry["volumes"] = [v._mount(path) for path, v in spec["volumes"].items()]
        if spec.get("retries") is not None:
            entry["retries"] = spec["retries"].to_manifest()
        if spec.get("network") is not None:
            entry["network"] = {"mode": spec["network"]}
        if spec.get("memory_snapshot"):
            entry["memory_snapshot"] = True
        return entry


class App:
    """A named group of functions deployed together; `image` is their default image."""

    def __init__(self, name: str, image: Image | None = None, *, allow_callers: Iterable[str] = ()):
        if not isinstance(name, str) or not APP_NAME.fullmatch(name):
            raise ValueError(
                f"App({name!r}): app names are DNS labels: lowercase letters, digits and '-', "
                "1 to 63 characters, not starting or ending with '-' (e.g. \"my-app\")"
            )
        if image is not None and not isinstance(image, Image):
            raise TypeError(f"App(image=...) takes a lode.Image, not {type(image).__name__}")
        if isinstance(allow_callers, str):
            raise TypeError(f"App(allow_callers={allow_callers!r}) takes a list of app names, not one string")
        callers = list(allow_callers)
        for caller in callers:
            if not isinstance(caller, str) or not APP_NAME.fullmatch(caller):
                raise ValueError(f"App(allow_callers=...): {caller!r} is not an app name")
        self.name = name
        self.image = image
        # Other apps whose code may call this app's functions (pickle ones excepted).
        self.allow_callers = callers
        self._functions: dict[str, Function] = {}
        self._entrypoints: dict[str, Callable[..., Any]] = {}

    def __repr__(self) -> str:
        return f"App({self.name!r})"

    @classmethod
    def lookup(cls, name: str, *, create_if_missing: bool = False) -> App:
        """The app `name` on the server, to start sandboxes in or call. An app exists once it
        is deployed; with `create_if_missing=True` a name not deployed yet is fine too (its
        sandboxes are listed under it). Otherwise an unknown name raises RemoteError."""
        app = cls(name)
        if not create_if_missing:
            _client.api_transport().request("GET", f"/v1/apps/{urllib.parse.quote(name, safe='')}")
        return app

    @property
    def registered_functions(self) -> dict[str, Function]:
        return dict(self._functions)

    @property
    def registered_entrypoints(self) -> dict[str, Callable[..., Any]]:
        return dict(self._entrypoints)

    def function(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        image: Image | None = None,
        cpu: float | None = None,
        memory: int | None = None,
        timeout: float | None = None,
        min_containers: int | None = None,
        max_containers: int | None = None,
        scaledown_window: float | None = None,
        retries: Retries | int | None = None,
        concurrency: int | None = None,
        gpu: str | None = None,
        secrets: Iterable[Secret] = (),
        volumes: dict[str, Volume] | None = None,
        schedule: Period | Cron | None = None,
        network: str | None = None,
        serialization: str = "json",
        name: str | None = None,
        enable_memory_snapshot: bool = False,
    ) -> Any:
        """Declares a function that runs in a container: @app.function or @app.function(...).
        With enable_memory_snapshot, the first container is saved once the module has
        loaded, and later cold starts restore it instead of importing again."""
        options = dict(
            image=image,
            cpu=cpu,
            memory=memory,
            timeout=timeout,
            min_containers=min_containers,
            max_containers=max_containers,
            scaledown_window=scaledown_window,
            retries=retries,
            concurrency=concurrency,
            gpu=gpu,
            secrets=secrets,
            volumes=volumes,
            schedule=schedule,
            network=network,
            serialization=serialization,
            name=name,
            enable_memory_snapshot=enable_memory_snapshot,
        )
        return self._decorate(fn, options, None)

    def web_endpoint(
        self, fn: Callable[..., Any] | None = None, /, *, method: str = "POST", path: str | None = None, **options: Any
    ) -> Any:
        """Declares a function served over HTTP at `path` (default "/<name>"); it gets the JSON body."""
        if not isinstance(method, str) or not WEB_METHOD.fullmatch(method.upper()):
            raise ValueError(f'web_endpoint(method={method!r}): use an HTTP method such as "GET" or "POST"')
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise ValueError(f"web_endpoint(path={path!r}): the path must start with '/', e.g. \"/echo\"")
        unknown = sorted(set(options) - set(FUNCTION_OPTIONS))
        if unknown:
            raise TypeError(
                f"web_endpoint() got unknown options {unknown}; it accepts method, path and {list(FUNCTION_OPTIONS)}"
            )
        return self._decorate(fn, options, {"path": path, "method": method.upper()})

    def _decorate(self, fn: Callable[..., Any] | None, options: dict[str, Any], web: dict[str, Any] | None) -> Any:
        def register(f: Callable[..., Any]) -> Function:
            if isinstance(f, Function) or not callable(f):
                raise TypeError(f"@app.function decorates a plain Python function, not {f!r}")
            return self._register(self._make_function(f, options, web))

        return register if fn is None else register(fn)

    def _register(self, function: Function) -> Function:
        if function.name in self._functions:
            raise ValueError(
                f"App {self.name!r} already has a function named {function.name!r}; pass name=... to rename one"
            )
        self._functions[function.name] = function
        return function

    def cls(self, user_cls: type | None = None, /, **options: Any) -> Any:
        """Declares a class whose methods run in one pool of containers: @app.cls(...) takes
        the options of @app.function; mark methods with @lode.method(), set-up with
        @lode.enter() and tear-down with @lode.exit()."""
        from . import _cls

        unknown = sorted(set(options) - set(FUNCTION_OPTIONS))
        if unknown:
            raise TypeError(f"app.cls() got unknown options {unknown}; it accepts {list(FUNCTION_OPTIONS)}")
        if "schedule" in options:
            raise TypeError("app.cls(schedule=...): schedule a function instead; a class has no single entry")

        def register(c: type) -> Any:
            return _cls.declare(self, c, options)

        return register if user_cls is None else register(user_cls)

    def _make_function(self, fn: Callable[..., Any], o: dict[str, Any], web: dict[str, Any] | None) -> Function:
        name = o.get("name") or getattr(fn, "__name__", None)
        where = f"function {name!r}"
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise ValueError(
                f"{where}: names are a letter or '_' then letters, digits, '_' or '-', at most 63; pass name=..."
            )
        image = o.get("image")
        if image is not None and not isinstance(image, Image):
            raise TypeError(f"{where}: image= takes a lode.Image, not {type(image).__name__}")
        serialization = o.get("serialization", "json")
        if serialization not in ("json", "pickle"):
            raise ValueError(f'{where}: serialization={serialization!r}; use "json" or "pickle"')
        network = o.get("network")
        if network not in (None, "none", "outbound"):
            raise ValueError(f'{where}: network={network!r}; use "none" or "outbound"')
        schedule = o.get("schedule")
        if schedule is not None and not isinstance(schedule, (Period, Cron)):
            raise TypeError(f'{where}: schedule= takes lode.Period(...) or lode.Cron("..."), not {schedule!r}')
        snapshot = o.get("enable_memory_snapshot", False)
        if not isinstance(snapshot, bool):
            raise TypeError(f"{where}: enable_memory_snapshot={snapshot!r}; use True or False")
        retries = o.get("retries")
        if isinstance(retries, int) and not isinstance(retries, bool):
            retries = Retries(max_retries=retries)
        elif retries is not None and not isinstance(retries, Retries):
            raise TypeError(f"{where}: retries= takes lode.Retries(...) or an int, not {retries!r}")

        secrets: list[Secret] = []
        if isinstance(o.get("secrets"), (Secret, str)):
            raise TypeError(f'{where}: secrets= takes a list, e.g. secrets=[lode.Secret.from_name("api")]')
        for secret in o.get("secrets") or ():
            if not isinstance(secret, Secret):
                raise TypeError(
                    f"{where}: secrets= takes lode.Secret objects, not {secret!r}; "
                    "use lode.Secret.from_name(...) or lode.Secret.from_dict(...)"
                )
            if all(s.name != secret.name for s in secrets):
                secrets.append(secret)

        volumes: dict[str, Volume] = {}
        if not isinstance(o.get("volumes") or {}, dict):
            raise TypeError(f'{where}: volumes= takes a dict of mount path to volume, e.g. {{"/data": vol}}')
        for path, volume in (o.get("volumes") or {}).items():
            if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/") or path == "/":
                raise ValueError(f'{where}: volume mount path {path!r} must be an absolute path below /, e.g. "/data"')
            if not isinstance(volume, Volume):
                raise TypeError(f"{where}: volumes[{path!r}] must be lode.Volume.from_name(...), not {volume!r}")
            volumes[path] = volume

        from . import _web

        mark = _web.web_mark(fn)
        if mark is not None:
            if web is not None:
                raise TypeError(f"{where}: use @app.web_endpoint or a @lode web decorator, not both")
            label = mark.get("label")
            web = {"path": "/" + (label or name), "method": None}
            if mark["serve"] != "call":
                web["serve"] = mark["serve"]
                web = {k: v for k, v in web.items() if v is not None}
            if mark["serve"] == "server":
                web["port"] = mark["port"]
        elif web is not None:
            web = {"path": web["path"] or "/" + name, "method": web["method"]}
        if o.get("concurrency") is None and _web.concurrency_mark(fn) is not None:
            o = {**o, "concurrency": _web.concurrency_mark(fn)}
        # A batch gathers inputs that arrive at once: a container takes that many.
        batch = _web.batch_mark(fn)
        if o.get("concurrency") is None and batch and batch[0] > 1:
            o = {**o, "concurrency": batch[0]}

        resources = {
            "cpu": _positive(where, "cpu", o.get("cpu"), float),
            "memory": _positive(where, "memory", o.get("memory"), int),
            "timeout": _positive(where, "timeout", o.get("timeout"), float, upper=86400),
            "concurrency": _positive(where, "concurrency", o.get("concurrency"), int),
            "min_containers": _positive(where, "min_containers", o.get("min_containers"), int, zero=True),
            "max_containers": _positive(where, "max_containers", o.get("max_containers"), int),
            "scaledown_window": _positive(where, "scaledown_window", o.get("scaledown_window"), float, zero=True),
            "gpu": o.get("gpu"),
        }
        gpu = resources["gpu"]
        if gpu is not None and (not isinstance(gpu, str) or not gpu):
            raise TypeError(f'{where}: gpu={gpu!r}; use a string such as "any", "H100" or "H100:2"')
        lo, hi = resources["min_containers"], resources["max_containers"]
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"{where}: min_containers ({lo}) is above max_containers ({hi}); lower or raise one")

        for path, volume in volumes.items():
            if not volume.is_read_only:
                _volume_mounts[volume.name].add(path)
        spec = {
            "image": image,
            "resources": resources,
            "web": web,
            "schedule": schedule,
            "secrets": secrets,
            "volumes": volumes,
            "retries": retries,
            "network": network,
            "memory_snapshot": snapshot,
        }
        function = Function(fn, name, app=self, serialization=serialization, spec=spec)
        if mark is not None:
            function._web_serve = mark["serve"]
            function._web_port = mark.get("port")
            function._web_startup_timeout = mark.get("startup_timeout", 5.0)
            # A fastapi_endpoint: the method its route takes (its app is made around it).
            function._web_endpoint = mark.get("endpoint")
            function._web_docs = bool(mark.get("docs"))
        elif web is not None:
            function._web_serve = "call"
        return function

    def deploy(self, *, name: str | None = None, environment_name: str | None = None, tag: str = "") -> App:
        """Deploys the script that calls it (`python app.py` with `app.deploy()` in it), as
        `lode deploy app.py [--name NAME]` does, with the `lode` CLI."""
        if environment_name is not None:
            raise ValueError("app.deploy(environment_name=...): Lode has one environment per server; leave it out")
        args = ["deploy", self._script("deploy")]
        if name is not None:
            args += ["--name", name]
        if subprocess.run([self._cli("deploy"), *args]).returncode != 0:
            raise RuntimeError(f"deploying {args[1]} failed (see above)")
        return self

    def _script(self, what: str) -> str:
        script = getattr(sys.modules.get("__main__"), "__file__", None)
        if not script or not os.path.isfile(script):
            raise RuntimeError(f"app.{what}() deploys the script that runs it; start it as `python app.py`")
        return os.path.abspath(script)

    @staticmethod
    def _cli(what: str) -> str:
        cli = os.environ.get("LODE_BIN") or shutil.which("lode")
        if cli is None:
            raise RuntimeError(f"app.{what}() needs the `lode` CLI on PATH (or LODE_BIN)")
        return cli

    @contextlib.contextmanager
    def run(self, *, show_progress: Any = None, detach: bool = False, interactive: bool = False) -> Iterator[App]:
        """`with app.run():` in a script started with `python app.py`: deploys the script as
        an ephemeral app (with the `lode` CLI), points this process's calls at it, and
        removes it when the block ends. Under `lode run` the app is deployed already."""
        if detach or interactive:
            raise ValueError("app.run(detach=..., interactive=...): Lode has no counterpart; leave them out")
        if os.environ.get("LODE_APP") or os.environ.get("LODE_SOCKET"):
            yield self
            return
        script = self._script("run")
        deployed = subprocess.run([self._cli("run"), "deploy", "--ephemeral", script], stdout=subprocess.PIPE, text=True)
        name = deployed.stdout.strip().splitlines()[-1] if deployed.stdout.strip() else ""
        if deployed.returncode != 0 or not APP_NAME.fullmatch(name):
            raise RuntimeError(f"deploying {script} for app.run() failed (see above)")
        os.environ["LODE_APP"] = name
        try:
            yield self
        finally:
            del os.environ["LODE_APP"]
            try:
                _client.transport().request("DELETE", f"/v1/apps/{name}")
            except Exception as e:  # the block's own error matters more
                print(f"lode: removing the ephemeral app {name} failed: {e}; `lode rm {name}`", file=sys.stderr)

    def local_entrypoint(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
        """Marks the function `python3 -m lode run` calls on this machine."""

        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            entry = name or getattr(f, "__name__", None)
            if not isinstance(entry, str) or not entry:
                raise ValueError(f"local_entrypoint: cannot name {f!r}; pass name=...")
            if entry in self._entrypoints:
                raise ValueError(f"App {self.name!r} already has a local entrypoint named {entry!r}; pass name=...")
            self._entrypoints[entry] = f
            return f

        return register if fn is None else register(fn)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(where: str, key: str, value: Any, kind: type, zero: bool = False, upper: float | None = None) -> Any:
    if value is None:
        return None
    ok = _number(value) and (value >= 0 if zero else value > 0) and (upper is None or value <= upper)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        bound = "at least 0" if zero else "above 0"
        limit = f" and at most {upper:g}" if upper is not None else ""
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"{where}: {key}={value!r}; use {noun} {bound}{limit}")
    return kind(value)


def collect(app: App, module: str, file: str) -> dict[str, Any]:
    """The description of an app that `python3 -m lode collect` prints for the deployer."""
    inline: dict[str, dict[str, str]] = {}
    for function in app._functions.values():
        for secret in function._spec["secrets"]:
            if secret.inline_values is not None:
                inline[secret.name] = secret.inline_values
    return {
        "app": app.name,
        "module": module,
        "file": file,
        "entrypoints": list(app._entrypoints),
        "inline_secrets": inline,
        "allow_callers": app.allow_callers,
        "functions": [f._manifest(module) for f in app._functions.values()],
    }
