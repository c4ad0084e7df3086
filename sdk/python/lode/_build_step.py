"""A `run_function` image build step, run by `python3 -m lode._build_step` in a build container:
imports the app's module as a function's container would, and calls the function once."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys


def main() -> int:
    module_name = os.environ["LODE_BUILD_MODULE"]
    function_name = os.environ["LODE_BUILD_FUNCTION"]
    arguments = json.loads(os.environ.get("LODE_BUILD_ARGUMENTS") or "null") or {}
    module = importlib.import_module(module_name)
    target = getattr(module, function_name, None)
    # A function the app also declares (@app.function) runs as its plain self here.
    fn = getattr(target, "_fn", target)
    if not callable(fn):
        print(f"run_function: {module_name}.{function_name} is not a function in the module", file=sys.stderr)
        return 1
    print(f"run_function: calling {module_name}.{function_name}", file=sys.stderr)
    result = fn(*arguments.get("args", []), **arguments.get("kwargs", {}))
    if inspect.iscoroutine(result):
        asyncio.run(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
