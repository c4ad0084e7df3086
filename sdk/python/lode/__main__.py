"""`python3 -m lode collect FILE` describes an app for the deployer;
`python3 -m lode run FILE[::NAME] [ARGS...]` runs its local entrypoint, or calls one function
(or `Class.method`) remotely; ARGS are `--name value` options made from the signature, as
`modal run` takes them, or plain strings passed positionally.

Both load FILE in host mode: `with image.imports():` blocks are skipped, so packages that
exist only in the image need not be installed here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import inspect
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn

from ._app import App, collect

# Exit status for usage errors and files that cannot be loaded, as argparse uses.
USAGE = 2


def _fail(message: str) -> NoReturn:
    print(f"lode: error: {message}", file=sys.stderr)
    sys.exit(USAGE)


def _module_name(stem: str) -> str:
    """The module name a file is imported under: its stem, made a Python identifier
    (`my-app` -> `my_app`, `01_intro` -> `_01_intro`), as Modal runs any file name."""
    name = re.sub(r"\W", "_", stem)
    if not name or name[0].isdigit():
        name = "_" + name
    return name


def load(file: str) -> tuple[ModuleType, str]:
    """Imports FILE in host mode under its stem; returns the module and its absolute path."""
    path = os.path.abspath(file)
    if not os.path.isfile(path):
        _fail(f"{file} is not a file; pass the path of the Python file that defines the app")
    name = _module_name(os.path.splitext(os.path.basename(path))[0])
    if name in sys.modules or name == "lode":
        _fail(f"{path}: the module name {name!r} is already taken by an imported module; rename the file")

    os.environ["LODE_COLLECT"] = "1"
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        _fail(f"{path} cannot be imported as a Python module; check the file name ends in .py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # any failure of the user's file, even SystemExit
        traceback.print_exc()
        _fail(f"importing {path} failed with {type(e).__name__}: {e}; fix the error above")
    return module, path


def find_app(module: ModuleType, path: str) -> App:
    apps: list[App] = []
    for value in vars(module).values():
        if isinstance(value, App) and all(value is not a for a in apps):
            apps.append(value)
    if not apps:
        _fail(f'{path} defines no lode.App at module level; add `app = lode.App("my-app")`')
    if len(apps) > 1:
        names = ", ".join(repr(a.name) for a in apps)
        _fail(f"{path} defines {len(apps)} lode.App objects ({names}); keep one app per file")
    return apps[0]


def _sources(path: str, manifest: dict[str, Any]) -> list[str]:
    """What `lode dev` watches: the app's file, the modules it imported from its own
    directory tree (not installed packages), and the local files its images copy in."""
    root = os.path.dirname(path)
    found = {path}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        file = os.path.abspath(file)
        if file.startswith(root + os.sep) and "site-packages" not in file and "dist-packages" not in file:
            found.add(file)
    sdk = os.path.dirname(os.path.abspath(__file__))
    found = {f for f in found if not f.startswith(sdk + os.sep)}
    for function in manifest.get("functions", []):
        for step in (function.get("python", {}).get("image") or {}).get("steps", []):
            for body in step.values():
                if isinstance(body, dict) and isinstance(body.get("local"), str):
                    found.add(os.path.abspath(body["local"]))
    return sorted(found)


def cmd_collect(args: argparse.Namespace) -> int:
    # The user's prints go to stderr so stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        module, path = load(args.file)
        app = find_app(module, path)
        try:
            manifest = collect(app, module.__name__, path)
        except (TypeError, ValueError) as e:
            _fail(f"{path}: {e}")
        manifest["sources"] = _sources(path, manifest)
    json.dump(manifest, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _pick(app: App, path: str, wanted: str | None) -> tuple[str, Callable[..., Any], Callable[..., Any]]:
    """What `run` runs, and the code whose signature its arguments follow: the named local
    entrypoint, function or `Class.method`; else the one local entrypoint; else the one
    function, called remotely."""
    entrypoints = app.registered_entrypoints
    functions = app.registered_functions
    if wanted is not None:
        if wanted in entrypoints:
            return wanted, entrypoints[wanted], entrypoints[wanted]
        cls_name, _, method = wanted.partition(".")
        function = functions.get(cls_name)
        if function is not None and function._cls is not None:
            if not method:
                _fail(f"{cls_name} is a class; name one of its methods: {cls_name}.{function._cls._methods[0]}")
            try:
                bound = getattr(function._cls(), method)
            except (AttributeError, TypeError) as e:
                _fail(str(e))
            return wanted, bound.remote, getattr(function._cls._user_cls, method)
        if function is not None and not method:
            return wanted, function.remote, function._fn
        known = ", ".join([*entrypoints, *functions]) or "none"
        _fail(f"{path} has no local entrypoint or function {wanted!r} (it has: {known})")
    if len(entrypoints) == 1:
        name, fn = next(iter(entrypoints.items()))
        return name, fn, fn
    if len(entrypoints) > 1:
        _fail(f"{path} has several local entrypoints ({', '.join(entrypoints)}); pick one with {path}::NAME")
    plain = {n: f for n, f in functions.items() if f._cls is None}
    if len(plain) == 1 and len(functions) == 1:
        name, function = next(iter(plain.items()))
        return name, function.remote, function._fn
    known = ", ".join(functions) or "none"
    _fail(
        f"{path} has no local entrypoint; mark one with @app.local_entrypoint(), "
        f"or pick a function to call with {path}::NAME (it has: {known})"
    )


def _arguments(fn: Callable[..., Any], name: str, argv: list[str]) -> tuple[list[Any], dict[str, Any]]:
    """The call's arguments: `--flag value` options made from fn's signature (as `modal run`
    takes them) when the first one is an option, else the strings as positional arguments."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return list(argv), {}
    if not argv or not argv[0].startswith("--"):
        try:
            bindable = signature.replace(parameters=[p for n, p in signature.parameters.items() if n != "self"])
            bindable.bind(*argv)
        except TypeError as e:
            _fail(f"{name} cannot take the arguments {argv}: {e}")
        return list(argv), {}
    parser = argparse.ArgumentParser(prog=f"lode run ...::{name}", add_help=False, allow_abbrev=False)
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name == "self":
            continue
        annotation = param.annotation
        if isinstance(annotation, str):
            annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, str)
        flag = "--" + param.name.replace("_", "-")
        required = param.default is param.empty
        if annotation is bool:
            parser.add_argument(flag, dest=param.name, action=argparse.BooleanOptionalAction, required=required)
        else:
            kind = annotation if annotation in (int, float, str) else str
            parser.add_argument(flag, dest=param.name, type=kind, required=required)
    try:
        parsed, extra = parser.parse_known_args(argv)
    except SystemExit:
        _fail(f"the arguments {argv} do not fit {name}{signature}")
    if extra:
        _fail(f"{name}{signature} takes no {' '.join(extra)}")
    return [], {k: v for k, v in vars(parsed).items() if v is not None}


def cmd_run(args: argparse.Namespace) -> int:
    file, _, wanted = args.file.partition("::")
    module, path = load(file)
    app = find_app(module, path)
    name, fn, declared = _pick(app, path, wanted or args.entrypoint)
    positional, keywords = _arguments(declared, name, list(args.args))
    try:
        result = fn(*positional, **keywords)
        # An async entrypoint runs to its end: never skipped.
        if inspect.isawaitable(result):
            result = asyncio.run(_awaited(result))
    except Exception:
        traceback.print_exc()
        return 1
    if name not in app.registered_entrypoints and result is not None:
        print(result)
    return 0


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lode", description="Lode's Python SDK tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("collect", help="print the app in FILE as JSON, for the deployer")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=cmd_collect)
    p = commands.add_parser("run", help="run the local entrypoint (or FILE::NAME) of the app in FILE")
    p.add_argument("file", metavar="FILE[::NAME]")
    p.add_argument("--entrypoint", metavar="NAME", help="which local entrypoint, when there are several")
    p.add_argument("args", nargs="*", metavar="ARGS", help="passed to the entrypoint as strings (after --)")
    p.set_defaults(handler=cmd_run)
    argv = sys.argv[1:] if argv is None else list(argv)
    # Split at the first "--" ourselves: argparse drops or refuses it after a subcommand.
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if extra:
        if args.command != "run":
            parser.error(f"{args.command} takes no arguments after --")
        args.args = [*args.args, *extra]
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
