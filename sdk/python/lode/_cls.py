"""Classes as functions: `@app.cls` with `@lode.enter()`, `@lode.method()`, `@lode.exit()`
and `lode.parameter()`, as Modal spells them.

A class is one function pool: its methods share its containers. A container keeps one
instance per set of parameter values; `enter` hooks run once on each instance, before its
first input, and `exit` hooks when the container stops."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
from collections.abc import Callable
from typing import Any

from . import _web
from ._app import FUNCTION_NAME, App, Function

# The types a parameter may have: they travel as JSON next to the call's arguments.
PARAMETER_TYPES = (str, int, bool, float)

_HOOK = "_lode_hook"
# Set on an enter hook marked snap=True.
_SNAP = "_lode_snap"


class _Unset:
    def __repr__(self) -> str:
        return "<no default>"


_NO_DEFAULT = _Unset()


class _Parameter:
    """What lode.parameter() leaves in a class body until @app.cls reads it."""

    def __init__(self, default: Any, init: bool):
        self.default = default
        self.init = init


def parameter(*, default: Any = _NO_DEFAULT, init: bool = True) -> Any:
    """A field of an @app.cls class set per instance: `name: str = lode.parameter(default="x")`.
    `Model(name="y")` picks the value; each distinct set of values gets its own instance (and
    its own `enter`) in the container."""
    if default is not _NO_DEFAULT and not isinstance(default, PARAMETER_TYPES):
        raise TypeError(
            f"lode.parameter(default={default!r}): parameters are str, int, float or bool, "
            "since they travel with each call"
        )
    return _Parameter(default, init)


def _hook(kind: str, snap: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise TypeError(f"@lode.{kind}() decorates a method, not {fn!r}")
        setattr(fn, _HOOK, kind)
        if snap:
            setattr(fn, _SNAP, True)
        return fn

    return mark


def enter(*, snap: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Runs once per instance in a container, before its first input (load a model here).
    With `enable_memory_snapshot`, `snap=True` hooks of the instance without parameters run
    before the container is saved, so restored containers start with their work done; the
    others run after each restore. Without snapshots, every hook runs at the first input."""
    return _hook("enter", snap)


def exit() -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # noqa: A001 - Modal's name
    """Runs when the container stops (scaled down, redeployed), after its last input."""
    return _hook("exit")


def method(*, is_generator: bool | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Marks a method that callers may run: `Model().predict.remote(x)`."""
    if is_generator:
        raise ValueError("@lode.method(is_generator=True): generator methods are not supported yet")
    return _hook("method")


def _class_parts(user_cls: type) -> tuple[dict[str, _Parameter], list[str], list[str], list[str]]:
    """The parameters and the names of the methods, enter and exit hooks of a class, with
    the base classes' own included (the nearest definition wins)."""
    params: dict[str, _Parameter] = {}
    kinds: dict[str, str] = {}
    for klass in reversed(user_cls.__mro__[:-1]):
        for name, value in vars(klass).items():
            if isinstance(value, _Parameter):
                params[name] = value
            target = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            kind = getattr(target, _HOOK, None)
            if kind is not None:
                kinds[name] = kind
            elif name in kinds:
                del kinds[name]
    by_kind: dict[str, list[str]] = {"method": [], "enter": [], "exit": []}
    for name, kind in kinds.items():
        by_kind[kind].append(name)
    return params, by_kind["method"], by_kind["enter"], by_kind["exit"]


def _web_methods(user_cls: type) -> dict[str, dict[str, Any]]:
    """The class's methods served on the web, with their marks (the nearest definition wins)."""
    found: dict[str, dict[str, Any]] = {}
    for klass in reversed(user_cls.__mro__[:-1]):
        for name, value in vars(klass).items():
            mark = _web.web_mark(value)
            if mark is not None:
                found[name] = mark
            else:
                found.pop(name, None)
    return found


class Cls:
    """A class declared with @app.cls, or a handle from Cls.from_name. Calling it with
    parameter values gives an object whose methods run on Lode: `Model(size=2).predict.remote(x)`."""

    def __init__(
        self,
        user_cls: type | None,
        function: Function,
        methods: list[str] | None,
        params: dict[str, _Parameter] | None,
        enter_hooks: list[str] = (),  # type: ignore[assignment]
        exit_hooks: list[str] = (),  # type: ignore[assignment]
    ):
        self._user_cls = user_cls
        self._function = function
        # None for a handle from from_name: the server knows the methods.
        self._methods = methods
        self._params = params
        self._enter = list(enter_hooks)
        self._exit = list(exit_hooks)
        # with_options: sent with every call made through this handle.
        self._options: dict[str, Any] = {}
        # Methods served on the web, with their marks.
        self._web_methods: dict[str, dict[str, Any]] = {}
        self.__name__ = function.name
        self.__qualname__ = getattr(user_cls, "__qualname__", function.name)
        self.__doc__ = getattr(user_cls, "__doc__", None)

    def __repr__(self) -> str:
        return f"Cls({self._function!r})"

    @classmethod
    def from_name(cls, app_name: str, name: str, *, serialization: str = "json") -> Cls:
        """A handle to a class in a deployed app: `lode.Cls.from_name("app", "Model")`."""
        function = Function.from_name(app_name, name, serialization=serialization)
        return cls(None, function, None, None)

    def with_options(
        self,
        *,
        cpu: float | None = None,
        memory: int | None = None,
        gpu: str | None = None,
        timeout: float | None = None,
        retries: Any = None,
        max_containers: int | None = None,
        min_containers: int | None = None,
        buffer_containers: int | None = None,
        scaledown_window: float | None = None,
        secrets: Any = (),
        volumes: dict[str, Any] | None = None,
        **refused: Any,
    ) -> Cls:
        """The class with other options for the calls made through it, as Modal's: they run in
        a pool of their own, started on the first call like the class's own, with its image.
        Options given again replace the earlier ones; secrets and volumes add to the class's."""
        from ._app import Retries, Secret, Volume, _positive

        where = f"{self.__name__}.with_options()"
        if refused:
            names = ", ".join(sorted(refused))
            raise TypeError(
                f"{where} does not take {names}"
                + ("; put variables in a secret and pass secrets=[...]" if "env" in refused else "")
            )
        del buffer_containers  # Containers start on demand here; a buffer changes no result.
        if isinstance(retries, int) and not isinstance(retries, bool):
            retries = Retries(max_retries=retries)
        elif retries is not None and not isinstance(retries, Retries):
            raise TypeError(f"{where}: retries= takes lode.Retries(...) or an int, not {retries!r}")
        if gpu is not None and (not isinstance(gpu, str) or not gpu):
            raise TypeError(f'{where}: gpu={gpu!r}; use a string such as "any" or "H100"')
        options = dict(self._options)
        resources = dict(options.get("resources", {}))
        for key, value in (
            ("cpu", _positive(where, "cpu", cpu, float)),
            ("memory", _positive(where, "memory", memory, int)),
            ("timeout", _positive(where, "timeout", timeout, float, upper=86400)),
            ("max_containers", _positive(where, "max_containers", max_containers, int)),
            ("min_containers", _positive(where, "min_containers", min_containers, int, zero=True)),
            ("scaledown_window", _positive(where, "scaledown_window", scaledown_window, float, zero=True)),
            ("gpu", gpu),
        ):
            if value is not None:
                resources[key] = value
        if resources:
            options["resources"] = resources
        if retries is not None:
            options["retries"] = retries.to_manifest()
        for secret in secrets:
            if not isinstance(secret, Secret) or secret.inline_values is not None:
                raise TypeError(
                    f"{where}: secrets= takes Secret.from_name(...) secrets, got {secret!r}; an inline "
                    "secret is sent with a deploy, not with a call"
                )
            options.setdefault("secrets", [])
            if secret.name not in options["secrets"]:
                options["secrets"] = [*options["secrets"], secret.name]
        for path, volume in (volumes or {}).items():
            if not isinstance(volume, Volume) or not isinstance(path, str) or not path.startswith("/"):
                raise TypeError(f"{where}: volumes= takes {{'/path': lode.Volume.from_name(...)}}, got {path!r}: {volume!r}")
            options["volumes"] = [v for v in options.get("volumes", []) if v["path"] != path] + [volume._mount(path)]
        return self._with_options(options)

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> Cls:
        """The class serving `max_inputs` inputs at once per container for the calls made
        through it (`target_inputs` is a scaling hint and changes no result here)."""
        from ._app import _positive

        del target_inputs
        where = f"{self.__name__}.with_concurrency()"
        resources = {**self._options.get("resources", {}), "concurrency": _positive(where, "max_inputs", max_inputs, int)}
        return self._with_options({**self._options, "resources": resources})

    def with_batching(self, *, max_batch_size: int, wait_ms: int) -> Cls:
        """Not in Lode: batching is declared on the method with @lode.batched."""
        raise NotImplementedError(
            f"{self.__name__}.with_batching(): declare the batch on the method with "
            "@lode.batched(max_batch_size=..., wait_ms=...) and redeploy"
        )

    def _with_options(self, options: dict[str, Any]) -> Cls:
        other = Cls(self._user_cls, self._function, self._methods, self._params, self._enter, self._exit)
        other._options = options
        return other

    def __call__(self, *args: Any, **kwargs: Any) -> Obj:
        if args:
            raise TypeError(
                f"{self.__name__}() takes parameters by keyword only, e.g. {self.__name__}(name=...)"
            )
        return Obj(self, self._bind(kwargs))

    def _bind(self, given: dict[str, Any]) -> dict[str, Any]:
        """The parameter values of an instance: checked against the class when it is known
        here, else sent as given and checked in the container."""
        if self._params is None:
            return dict(given)
        unknown = sorted(set(given) - set(self._params))
        if unknown:
            known = ", ".join(self._params) or "none"
            raise TypeError(f"{self.__name__}() got unknown parameters {unknown} (it has: {known})")
        values: dict[str, Any] = {}
        for name, spec in self._params.items():
            if name in given:
                value = given[name]
                if not isinstance(value, PARAMETER_TYPES):
                    raise TypeError(
                        f"{self.__name__}({name}={value!r}): parameters are str, int, float or bool"
                    )
                values[name] = value
            elif spec.default is not _NO_DEFAULT:
                values[name] = spec.default
            else:
                raise TypeError(f"{self.__name__}() needs the parameter {name!r}, which has no default")
        return values

    def _new_instance(
        self,
        values: dict[str, Any],
        settle: Callable[[Any], Any] = None,  # type: ignore[assignment]
        snap: bool | None = None,
    ) -> Any:
        """An instance of the user's class with its parameters set and its enter hooks run;
        `settle` waits for what an `async def` hook returns. `snap=True` runs only the hooks
        marked `snap=True` (before a memory snapshot); [`_finish_enter`] runs the rest."""
        assert self._user_cls is not None
        instance = self._user_cls.__new__(self._user_cls)
        for name, value in values.items():
            setattr(instance, name, value)
        init = self._user_cls.__init__
        if init is not object.__init__:
            init(instance)
        self._run_enter(instance, settle, snap)
        return instance

    def _finish_enter(self, instance: Any, settle: Callable[[Any], Any] = None) -> None:  # type: ignore[assignment]
        """The enter hooks not marked `snap=True`, after a restore."""
        self._run_enter(instance, settle, False)

    def _snap_hooks(self) -> bool:
        return any(getattr(getattr(self._user_cls, hook), _SNAP, False) for hook in self._enter)

    def _run_enter(self, instance: Any, settle: Callable[[Any], Any] | None, snap: bool | None) -> None:
        settle = settle or _settle
        for hook in self._enter:
            if snap is not None and bool(getattr(getattr(type(instance), hook), _SNAP, False)) != snap:
                continue
            result = getattr(instance, hook)()
            if inspect.isawaitable(result):
                settle(result)

    def _run_exit_hooks(self, instance: Any, settle: Callable[[Any], Any] = None) -> None:  # type: ignore[assignment]
        settle = settle or _settle
        for hook in self._exit:
            result = getattr(instance, hook)()
            if inspect.isawaitable(result):
                settle(result)


def _settle(awaitable: Any) -> Any:
    """Waits for an awaitable outside any event loop (local calls)."""
    async def wait() -> Any:
        return await awaitable

    return asyncio.run(wait())


class Obj:
    """An instance handle: `Model(...)`. Its methods are Functions of the class's pool."""

    def __init__(self, cls: Cls, params: dict[str, Any]):
        self._cls = cls
        self._params = params
        self._local: Any = None
        self._local_lock = threading.Lock()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{self._cls.__name__}({args})"

    def __getattr__(self, name: str) -> Method:
        if name.startswith("__"):
            raise AttributeError(name)
        methods = self._cls._methods
        if methods is not None and name not in methods:
            known = ", ".join(methods) or "none"
            raise AttributeError(
                f"{self._cls.__name__} has no method {name!r} marked @lode.method() (it has: {known})"
            )
        return Method(self, name)

    def _local_instance(self) -> Any:
        if self._cls._user_cls is None:
            raise TypeError(f"{self!r} comes from Cls.from_name and has no local code; use .remote()")
        with self._local_lock:
            if self._local is None:
                self._local = self._cls._new_instance(self._params)
            return self._local


class Method(Function):
    """One method of an instance handle: remote, spawn, map, starmap and local, as a Function."""

    def __init__(self, obj: Obj, name: str):
        fn = obj._cls._function
        super().__init__(None, fn.name, app=fn.app, app_name=fn._app_name, serialization=fn.serialization)
        self._obj = obj
        self._method = name

    def __repr__(self) -> str:
        return f"{self._obj!r}.{self._method}"

    def _payload(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        payload = super()._payload(args, kwargs)
        payload["method"] = self._method
        if self._obj._params:
            payload["params"] = dict(self._obj._params)
        if self._obj._cls._options:
            payload["options"] = dict(self._obj._cls._options)
        return payload

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the method here, on an instance made here (its enter hooks run first, once)."""
        return getattr(self._obj._local_instance(), self._method)(*args, **kwargs)


def declare(app: App, user_cls: type, options: dict[str, Any]) -> Cls:
    """What @app.cls(...) does to a class: checks it and registers its pool as a function."""
    if not inspect.isclass(user_cls):
        raise TypeError(f"@app.cls decorates a class, not {user_cls!r}")
    name = options.get("name") or user_cls.__name__
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise ValueError(f"class {name!r}: names are a letter or '_' then letters, digits, '_' or '-'")
    params, methods, enter_hooks, exit_hooks = _class_parts(user_cls)
    where = f"class {name}"
    init = user_cls.__init__
    if init is not object.__init__:
        signature = inspect.signature(init)
        if len(signature.parameters) > 1:
            raise TypeError(
                f"{where}: __init__ takes arguments; declare them as fields with lode.parameter() "
                "(e.g. `size: int = lode.parameter(default=1)`), which callers pass as Model(size=2)"
            )
    for hook in [*enter_hooks, *exit_hooks]:
        fn = inspect.getattr_static(user_cls, hook)
        if isinstance(fn, (staticmethod, classmethod)) or len(inspect.signature(fn).parameters) != 1:
            raise TypeError(f"{where}: the hook {hook}() must be a plain method taking only self")
    web_methods = _web_methods(user_cls)
    if not methods and not web_methods:
        raise ValueError(
            f"{where} has no method marked @lode.method() or served on the web; mark the ones callers may run"
        )
    for method, mark in web_methods.items():
        if method in methods:
            raise TypeError(f"{where}: {method}() is marked @lode.method() and served on the web; pick one")
        takes = len(inspect.signature(inspect.getattr_static(user_cls, method)).parameters)
        if mark.get("endpoint") is None and takes != 1:
            raise TypeError(f"{where}: the web method {method}() makes the app or server, and takes only self")
    required = [p for p, spec in params.items() if spec.default is _NO_DEFAULT]
    if web_methods and required:
        raise TypeError(
            f"{where}: web methods are served by an instance made with the default parameters; give "
            f"{', '.join(required)} a default"
        )
    for param, spec in params.items():
        annotation = user_cls.__dict__.get("__annotations__", {}).get(param)
        if isinstance(annotation, str):
            annotation = {"str": str, "int": int, "float": float, "bool": bool}.get(annotation, annotation)
        if annotation not in (None, *PARAMETER_TYPES):
            raise TypeError(f"{where}: parameter {param!r} is {annotation!r}; use str, int, float or bool")
        # The class attribute becomes the default, so `self.size` reads well in local code too.
        if spec.default is _NO_DEFAULT:
            delattr(user_cls, param)
        else:
            setattr(user_cls, param, spec.default)
    # Batched methods gather inputs that arrive at once: a container takes the largest batch.
    batches = [_web.batch_mark(getattr(user_cls, m)) for m in methods]
    largest = max((b[0] for b in batches if b), default=0)
    if options.get("concurrency") is None and largest > 1:
        options = {**options, "concurrency": largest}
    function = app._make_function(user_cls, {**options, "name": name}, None)
    function._spec["cls"] = {"methods": methods, "web": [
        {"method": method, "route": {k: v for k, v in {
            "path": "/" + (mark.get("label") or f"{name}-{method}"),
            "serve": mark["serve"],
            "port": mark.get("port"),
        }.items() if v is not None}}
        for method, mark in web_methods.items()
    ]}
    cls = Cls(user_cls, function, methods, params, enter_hooks, exit_hooks)
    cls._web_methods = web_methods
    function._cls = cls
    app._register(function)
    return cls


def params_key(values: dict[str, Any]) -> str:
    """The key an instance is kept under in a container."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"))
