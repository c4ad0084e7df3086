"""`python3 -m lode collect FILE` describes an app for the deployer;
`python3 -m lode run FILE [--entrypoint NAME] [-- ARGS...]` runs its local entrypoint.

Both load FILE in host mode: `with image.imports():` blocks are skipped, so packages that
exist only in the image need not be installed here."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import sys
import traceback
from types import ModuleType
from typing import NoReturn

from ._app import App, collect

# Exit status for usage errors and files that cannot be loaded, as argparse uses.
USAGE = 2


def _fail(message: str) -> NoReturn:
    print(f"lode: error: {message}", file=sys.stderr)
    sys.exit(USAGE)


def load(file: str) -> tuple[ModuleType, str]:
    """Imports FILE in host mode under its stem; returns the module and its absolute path."""
    path = os.path.abspath(file)
    if not os.path.isfile(path):
        _fail(f"{file} is not a file; pass the path of the Python file that defines the app")
    name = os.path.splitext(os.path.basename(path))[0]
    if not name.isidentifier():
        _fail(f"{path}: {name!r} is not a valid module name; rename the file (letters, digits, '_')")
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


def cmd_collect(args: argparse.Namespace) -> int:
    # The user's prints go to stderr so stdout carries only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        module, path = load(args.file)
        app = find_app(module, path)
        try:
            manifest = collect(app, module.__name__, path)
        except (TypeError, ValueError) as e:
            _fail(f"{path}: {e}")
    json.dump(manifest, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    module, path = load(args.file)
    app = find_app(module, path)
    entrypoints = app.registered_entrypoints
    if args.entrypoint is not None:
        if args.entrypoint not in entrypoints:
            known = ", ".join(entrypoints) or "none"
            _fail(f"{path} has no local entrypoint {args.entrypoint!r} (it has: {known})")
        fn = entrypoints[args.entrypoint]
    elif len(entrypoints) == 1:
        (fn,) = entrypoints.values()
    elif not entrypoints:
        _fail(f"{path} has no local entrypoint; mark one with @app.local_entrypoint()")
    else:
        _fail(f"{path} has several local entrypoints ({', '.join(entrypoints)}); choose one with --entrypoint NAME")

    try:
        inspect.signature(fn).bind(*args.args)
    except TypeError as e:
        _fail(f"the entrypoint {fn.__name__} cannot take the arguments {args.args}: {e}")
    except ValueError:
        pass  # no signature to check (a builtin); let the call decide
    try:
        fn(*args.args)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m lode", description="Lode's Python SDK tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("collect", help="print the app in FILE as JSON, for the deployer")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=cmd_collect)
    p = commands.add_parser("run", help="run the local entrypoint of the app in FILE")
    p.add_argument("file", metavar="FILE")
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
