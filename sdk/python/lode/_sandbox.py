"""Sandboxes: run untrusted code in a long-lived container, one command after another, with
files that persist between them. The names and signatures follow `modal.Sandbox`, so code
written for it runs with the import changed; an argument Lode cannot honour is refused by
name, never ignored.

    sb = lode.Sandbox.create(app=app, image=lode.Image.from_id("python:latest"), timeout=600)
    p = sb.exec("python", "-c", "print(6 * 7)")
    print(p.stdout.read(), p.wait())
    sb.terminate()
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any

from . import _client
from ._app import Secret, Volume
from ._image import Image

# Modal arguments Lode has no counterpart for yet: refused by name.
_UNSUPPORTED = (
    "gpu",
    "network_file_systems",
    "mounts",
    "h2_ports",
    "region",
    "cloud",
    "pty_info",
    "proxy",
    "name",
    "readiness_probe",
    "experimental_options",
)


def _refuse(method: str, kwargs: dict[str, Any]) -> None:
    for key, value in kwargs.items():
        if key in _UNSUPPORTED and value is None:
            continue  # Modal's default, spelled out (`gpu=None`): it asks for nothing.
        if key in _UNSUPPORTED:
            raise TypeError(f"{method}({key}=...) is not supported by Lode sandboxes yet")
        raise TypeError(f"{method}() got an unexpected keyword argument {key!r}")


def _http() -> _client.HttpTransport:
    # Inside a function container, its api.sock: the sandboxes its app made, nothing more.
    return _client.api_transport()


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _raw(method: str, path: str, data: bytes | None = None, file_call: bool = False) -> bytes:
    """A request whose body (sent, or answered) is bytes rather than JSON."""
    transport = _http()
    conn = transport._connection()
    headers = {"Authorization": f"Bearer {transport._token}"} if transport._token else {}
    if data is not None:
        headers["Content-Type"] = "application/octet-stream"
    try:
        conn.request(method, transport._prefix + path, body=data, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except OSError as e:
        raise ConnectionError(f"cannot reach the Lode API at {transport.api_url} ({e})") from e
    finally:
        conn.close()
    if 200 <= resp.status < 300:
        return body
    _raise_error(method, path, resp.status, body, file_call)
    raise AssertionError("unreachable")


def _raise_error(method: str, path: str, status: int, body: bytes, file_call: bool = False) -> None:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
        if file_call and status == 404 and error.get("kind") == "not_found":
            raise FileNotFoundError(error.get("message"))
        raise _client.exception_from_error(error)
    raise _client.RemoteError("http_error", f"{method} {path} failed with HTTP {status}")


class StreamReader:
    """A process's stdout or stderr: `read()` waits for the end, iteration yields lines as
    they come (text by default, bytes with `text=False`)."""

    def __init__(self, text: bool):
        self._text = text
        self._chunks: list[bytes] = []
        self._done = False
        self._cond = threading.Condition()

    def _feed(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(data)
            self._cond.notify_all()

    def _close(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _decode(self, data: bytes) -> Any:
        return data.decode("utf-8", "replace") if self._text else data

    def read(self) -> Any:
        """Everything the process writes here, once it ends."""
        with self._cond:
            self._cond.wait_for(lambda: self._done)
            data, self._chunks = b"".join(self._chunks), []
        return self._decode(data)

    def __iter__(self) -> Iterator[Any]:
        pending = b""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._chunks or self._done)
                chunk, self._chunks = b"".join(self._chunks), []
                done = self._done
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield self._decode(line + b"\n")
            if done and not self._chunks:
                if pending:
                    yield self._decode(pending)
                return


class StreamWriter:
    """A process's stdin: `write()` buffers, `drain()` sends, `write_eof()` ends it."""

    def __init__(self, sandbox_id: str, process: _ContainerProcessState):
        self._sandbox_id = sandbox_id
        self._process = process
        self._buffer = bytearray()
        self._eof = False
        self._eof_sent = False

    def write(self, data: bytes | bytearray | memoryview | str) -> None:
        if self._eof:
            raise ValueError("stdin was closed with write_eof()")
        self._buffer += data.encode("utf-8") if isinstance(data, str) else bytes(data)

    def write_eof(self) -> None:
        self._eof = True

    def drain(self) -> None:
        if self._eof_sent:
            return
        process_id = self._process.wait_started()
        path = f"/v1/sandboxes/{_quote(self._sandbox_id)}/processes/{_quote(process_id)}/stdin"
        if self._eof:
            path += "?eof=true"
        data, self._buffer = bytes(self._buffer), bytearray()
        if data or self._eof:
            _raw("POST", path, data)
            self._eof_sent = self._eof


class _ContainerProcessState:
    def __init__(self) -> None:
        self.process_id: str | None = None
        self.returncode: int | None = None
        self.killed_by: str | None = None
        self.error: str | None = None
        self.started = threading.Event()
        self.ended = threading.Event()

    def wait_started(self) -> str:
        self.started.wait()
        if self.process_id is None:
            raise _client.RemoteError("exec_failed", self.error or "the process did not start")
        return self.process_id


class ContainerProcess:
    """A command running in a sandbox (Modal's `ContainerProcess`)."""

    def __init__(self, sandbox_id: str, request: dict[str, Any], text: bool):
        self._state = _ContainerProcessState()
        self.stdout = StreamReader(text)
        self.stderr = StreamReader(text)
        self.stdin = StreamWriter(sandbox_id, self._state)
        transport = _http()
        self._conn = transport._connection()
        headers = {"Content-Type": "application/json"}
        if transport._token:
            headers["Authorization"] = f"Bearer {transport._token}"
        path = f"/v1/sandboxes/{_quote(sandbox_id)}/exec"
        self._conn.request("POST", transport._prefix + path, body=json.dumps(request), headers=headers)
        resp = self._conn.getresponse()
        if not 200 <= resp.status < 300:
            body = resp.read()
            self._conn.close()
            _raise_error("POST", path, resp.status, body)
        self._thread = threading.Thread(target=self._pump, args=(resp,), daemon=True)
        self._thread.start()
        self._state.wait_started()

    def _pump(self, resp: http.client.HTTPResponse) -> None:
        state = self._state
        try:
            for raw in resp:
                line = json.loads(raw)
                event = line.get("event")
                if event == "started":
                    state.process_id = line["process_id"]
                    state.started.set()
                elif event == "stdout":
                    self.stdout._feed(base64.b64decode(line["data"]))
                elif event == "stderr":
                    self.stderr._feed(base64.b64decode(line["data"]))
                elif event == "exit":
                    state.returncode = int(line["code"])
                    state.killed_by = line.get("killed_by")
                elif event == "error":
                    state.error = line.get("message")
        except (OSError, ValueError, http.client.HTTPException) as e:
            state.error = f"the process's stream broke: {e}"
        finally:
            self._conn.close()
            if state.returncode is None and state.error is None:
                state.error = "the server ended the process's stream without an exit status"
            self.stdout._close()
            self.stderr._close()
            state.started.set()
            state.ended.set()

    @property
    def returncode(self) -> int | None:
        return self._state.returncode

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return self._state.returncode if self._state.ended.is_set() else None

    def wait(self) -> int:
        """Waits for the process to end; returns its exit code (128 + signal when killed)."""
        self._state.ended.wait()
        if self._state.returncode is None:
            raise _client.RemoteError("exec_failed", self._state.error or "the process ended without a status")
        return self._state.returncode


class _SandboxFile:
    """What `Sandbox.open` returns: read whole on open, written back on flush and close."""

    def __init__(self, sandbox: Sandbox, path: str, mode: str):
        if mode not in ("r", "rb", "w", "wb", "a", "ab"):
            raise ValueError(f"open({path!r}, {mode!r}): modes are r, rb, w, wb, a, ab")
        self._sandbox, self._path, self._mode = sandbox, path, mode
        self._binary = "b" in mode
        self._writing = mode[0] in "wa"
        self._append = mode[0] == "a"
        self.closed = False
        if self._writing:
            self._buffer = io.BytesIO()
        else:
            self._buffer = io.BytesIO(sandbox._read(path))

    def read(self, size: int = -1) -> Any:
        data = self._buffer.read(size)
        return data if self._binary else data.decode("utf-8")

    def readline(self) -> Any:
        data = self._buffer.readline()
        return data if self._binary else data.decode("utf-8")

    def write(self, data: Any) -> int:
        if not self._writing:
            raise io.UnsupportedOperation(f"{self._path} is open for reading")
        raw = data if self._binary else data.encode("utf-8")
        self._buffer.write(raw)
        return len(data)

    def flush(self) -> None:
        if self._writing and not self.closed:
            self._sandbox._write(self._path, self._buffer.getvalue(), self._append)
            if self._append:
                self._buffer = io.BytesIO()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self) -> _SandboxFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Tunnel:
    """A port of a sandbox opened to the outside (Modal's `Tunnel`): connect to `host:port`.
    Lode's tunnels are plain TCP, so `url` is http:// and there is no TLS socket."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.unencrypted_host = host
        self.unencrypted_port = port

    def __repr__(self) -> str:
        return f"Tunnel(host={self.host!r}, port={self.port})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tunnel) and (self.host, self.port) == (other.host, other.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def tcp_socket(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def tls_socket(self) -> tuple[str, int]:
        raise NotImplementedError("Lode's tunnels are plain TCP: use tcp_socket (or url, which is http://)")


class Sandbox:
    """A sandbox on the Lode server (Modal's `Sandbox`)."""

    def __init__(self, info: dict[str, Any]):
        self._info = info
        self.object_id: str = info["sandbox_id"]
        self._entrypoint: ContainerProcess | None = None

    def __repr__(self) -> str:
        return f"Sandbox({self.object_id!r})"

    @classmethod
    def create(
        cls,
        *entrypoint_args: str,
        app: Any = None,
        image: Image | None = None,
        timeout: float = 300,
        idle_timeout: float | None = None,
        cpu: float | None = None,
        memory: int | None = None,
        block_network: bool | None = None,
        cidr_allowlist: list[str] | None = None,
        workdir: str | None = None,
        env: dict[str, str] | None = None,
        secrets: Iterable[Any] = (),
        volumes: dict[str, Any] | None = None,
        encrypted_ports: Iterable[int] = (),
        unencrypted_ports: Iterable[int] = (),
        **kwargs: Any,
    ) -> Sandbox:
        """Starts a sandbox of `image` for `app`; with `entrypoint_args`, runs them in it as
        its main process (`wait`, `stdout` and `returncode` are then that process's).
        Network is off unless `block_network=False`; `cidr_allowlist` opens private ranges.
        `secrets` set their variables in every process; `volumes` mounts lode.Volumes by path.
        `encrypted_ports` and `unencrypted_ports` open ports inside it to the outside, read
        back with tunnels(); Lode's tunnels are plain TCP (no TLS) either way."""
        _refuse("Sandbox.create", kwargs)
        app_name = app if isinstance(app, str) else getattr(app, "name", None)
        if app_name is None:
            raise TypeError("Sandbox.create() needs app=: a lode.App (App.lookup(name, create_if_missing=True))")
        if image is None:
            # Modal's default: Debian with Python.
            image = Image.debian_slim()
        outbound = block_network is False
        if cidr_allowlist and not outbound:
            raise ValueError("Sandbox.create(cidr_allowlist=...) needs block_network=False")
        request: dict[str, Any] = {
            "app": app_name,
            "image": image._reference(),
            "timeout": timeout,
            "network": "outbound" if outbound else "none",
        }
        for key, value in (("idle_timeout", idle_timeout), ("cpu", cpu), ("memory", memory), ("workdir", workdir)):
            if value is not None:
                request[key] = value
        if cidr_allowlist:
            request["allow_net"] = list(cidr_allowlist)
        merged_env = {k: str(v) for k, v in (env or {}).items()}
        names = []
        for secret in secrets:
            if not isinstance(secret, Secret):
                raise TypeError(f"Sandbox.create(secrets=...) takes lode.Secret objects, got {secret!r}")
            if secret.inline_values is not None:
                # An inline secret's values are the caller's own: they travel as variables.
                merged_env.update(secret.inline_values)
            else:
                names.append(secret.name)
        if names:
            request["secrets"] = names
        if merged_env:
            request["env"] = [[k, v] for k, v in merged_env.items()]
        mounts = []
        for path, volume in (volumes or {}).items():
            if not isinstance(volume, Volume):
                raise TypeError(
                    f"Sandbox.create(volumes={{{path!r}: ...}}) takes lode.Volume objects "
                    "(Volume.from_name); host directories go through `lode sandbox create -v`"
                )
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"Sandbox.create(volumes=...): {path!r} is not an absolute path")
            mounts.append(volume._mount(path))
        if mounts:
            request["named_volumes"] = mounts
        ports = []
        for port in [*encrypted_ports, *unencrypted_ports]:
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"Sandbox.create(): {port!r} is not a TCP port")
            if port not in ports:
                ports.append(port)
        if ports:
            request["ports"] = ports
        sandbox = cls(_http().request("POST", "/v1/sandboxes", request))
        if entrypoint_args:
            sandbox._entrypoint = sandbox.exec(*entrypoint_args)
        return sandbox

    @classmethod
    def from_id(cls, sandbox_id: str) -> Sandbox:
        """The sandbox with this id, running or ended."""
        return cls(_http().request("GET", f"/v1/sandboxes/{_quote(sandbox_id)}"))

    @classmethod
    def list(cls, *, app_id: Any = None, tags: dict[str, str] | None = None) -> Iterator[Sandbox]:
        """Sandboxes of an app (its name, or the App), carrying every tag in `tags`, newest
        first."""
        query: list[tuple[str, str]] = []
        if app_id is not None:
            query.append(("app", app_id if isinstance(app_id, str) else app_id.name))
        for key, value in (tags or {}).items():
            query.append(("tag", f"{key}={value}"))
        path = "/v1/sandboxes" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        for info in _http().request("GET", path)["sandboxes"]:
            yield cls(info)

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sandboxes/{_quote(self.object_id)}{suffix}"

    def _refresh(self) -> dict[str, Any]:
        self._info = _http().request("GET", self._path())
        return self._info

    def tunnels(self, timeout: float = 50) -> dict[int, Tunnel]:
        """The sandbox's open ports, by the port inside it (they open with the sandbox, so
        there is nothing to wait for: `timeout` is accepted for Modal's signature)."""
        del timeout
        info = self._refresh()
        return {t["port"]: Tunnel(t["host"], t["host_port"]) for t in info.get("tunnels", [])}

    def set_tags(self, tags: dict[str, str]) -> None:
        """Replaces the sandbox's tags."""
        self._info = _http().request("PUT", self._path("/tags"), {str(k): str(v) for k, v in tags.items()})

    def get_tags(self) -> dict[str, str]:
        return dict(self._refresh().get("tags", {}))

    def exec(
        self,
        *args: str,
        timeout: float | None = None,
        workdir: str | None = None,
        env: dict[str, str] | None = None,
        text: bool = True,
        fuel: int | None = None,
        **kwargs: Any,
    ) -> ContainerProcess:
        """Starts a command in the sandbox; its stdout and stderr stream back as it runs.
        `fuel` bounds a command of a Wasm sandbox by the Wasm work it does."""
        _refuse("Sandbox.exec", kwargs)
        if not args or not all(isinstance(a, str) for a in args):
            raise TypeError("Sandbox.exec() takes the command and its arguments as strings")
        request: dict[str, Any] = {"argv": list(args), "stdin": True}
        if timeout is not None:
            request["timeout"] = timeout
        if workdir is not None:
            request["workdir"] = workdir
        if env:
            request["env"] = [[k, str(v)] for k, v in env.items()]
        if fuel is not None:
            request["fuel"] = int(fuel)
        return ContainerProcess(self.object_id, request, text)

    @property
    def stdout(self) -> StreamReader:
        return self._main().stdout

    @property
    def stderr(self) -> StreamReader:
        return self._main().stderr

    @property
    def stdin(self) -> StreamWriter:
        return self._main().stdin

    def _main(self) -> ContainerProcess:
        if self._entrypoint is None:
            raise ValueError("this sandbox has no entrypoint: pass the command to Sandbox.create(...)")
        return self._entrypoint

    def wait(self, raise_on_termination: bool = True) -> None:
        """Waits for the entrypoint to end (then ends the sandbox), or, without one, for the
        sandbox to end by its timeout or a terminate."""
        if self._entrypoint is not None:
            self._entrypoint.wait()
            self.terminate()
            return
        while self._refresh()["status"] == "running":
            time.sleep(0.2)

    def poll(self) -> int | None:
        """The entrypoint's exit code (0 for a sandbox without one that ended), or None."""
        if self._entrypoint is not None:
            return self._entrypoint.poll()
        return None if self._refresh()["status"] == "running" else 0

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def terminate(self) -> None:
        """Ends the sandbox now; everything in it stops and its files go."""
        self._info = _http().request("DELETE", self._path())

    def snapshot_filesystem(self, timeout: float = 55, tag: str | None = None) -> Image:
        """Saves the sandbox's files as a new image (its image with what it changed on top);
        a new sandbox can start from it. `tag` also names it on the server."""
        del timeout  # the server answers when the image is stored
        body = {} if tag is None else {"tag": tag}
        answer = _http().request("POST", self._path("/snapshot"), body)
        return Image.from_id(answer["image"])

    # Files.

    def _files(self, **params: str) -> str:
        return self._path("/files") + "?" + urllib.parse.urlencode(params)

    def _read(self, path: str) -> bytes:
        return _raw("GET", self._files(path=path), file_call=True)

    def _write(self, path: str, data: bytes, append: bool) -> None:
        params = {"path": path}
        if append:
            params["append"] = "true"
        _raw("PUT", self._files(**params), data, file_call=True)

    def open(self, path: str, mode: str = "r") -> _SandboxFile:
        """A file in the sandbox, as a file object (use it with `with`)."""
        return _SandboxFile(self, path, mode)

    def ls(self, path: str) -> list[str]:
        """The names in a directory of the sandbox."""
        listing = json.loads(_raw("GET", self._files(path=path, op="ls"), file_call=True))
        return [entry["name"] for entry in listing["entries"]]

    def mkdir(self, path: str, parents: bool = False) -> None:
        """Makes a directory (and its parents, with `parents=True`)."""
        if not parents:
            parent = path.rstrip("/").rsplit("/", 1)[0] or "/"
            stat = json.loads(_raw("GET", self._files(path=parent, op="stat"), file_call=True))
            if stat["kind"] != "dir":
                raise NotADirectoryError(f"{parent} is not a directory")
        _raw("POST", self._path("/files/mkdir") + "?" + urllib.parse.urlencode({"path": path}))

    def rm(self, path: str, recursive: bool = False) -> None:
        """Removes a file, or a directory (a non-empty one with `recursive=True`)."""
        if not recursive:
            stat = json.loads(_raw("GET", self._files(path=path, op="stat"), file_call=True))
            if stat["kind"] == "dir" and self.ls(path):
                raise OSError(f"{path} is a directory that is not empty: pass recursive=True")
        _raw("DELETE", self._files(path=path), file_call=True)
