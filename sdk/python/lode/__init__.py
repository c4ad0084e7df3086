"""Lode: declare functions in Python and run them on a self-hosted Lode server.

    import lode
    app = lode.App("demo")

    @app.function
    def square(x: int) -> int:
        return x * x

The names follow Modal's, so Modal code runs with `import lode as modal`; what Lode cannot
honour is refused by name, with what to do instead.
"""

import contextlib as _contextlib

from . import exception, functions, io_streams
from ._app import App, Cron, Function, FunctionCall, Period, Retries, Secret, Volume, is_local
from ._client import RemoteError
from ._cls import Cls, enter, exit, method, parameter
from ._image import Image
from ._objects import Dict, Queue
from ._sandbox import ContainerProcess, Sandbox
from ._web import asgi_app, batched, concurrent, fastapi_endpoint, web_endpoint, web_server, wsgi_app
from .exception import Error

# The module paths Modal code names (`modal.queue.Queue`, `modal.container_process...`).
from . import cls, container_process, image, queue, sandbox, secret, volume  # noqa: E402
from . import dict as dict  # noqa: E402, A004

__version__ = "0.1.0"


def enable_output(show_progress: bool = True) -> _contextlib.AbstractContextManager:
    """Modal's switch for build and log output; Lode shows it always, so this does nothing."""
    return _contextlib.nullcontext()


def current_input_id() -> str | None:
    """The id of the input this code serves inside a container, else None."""
    from ._client import current_input

    return current_input()


def current_function_call_id() -> str | None:
    """Modal's id of the call being served; Lode names inputs only (see current_input_id)."""
    return current_input_id()

__all__ = [
    "App",
    "Cls",
    "ContainerProcess",
    "Cron",
    "Dict",
    "Error",
    "Function",
    "FunctionCall",
    "Image",
    "Period",
    "Queue",
    "RemoteError",
    "Retries",
    "Sandbox",
    "Secret",
    "Volume",
    "asgi_app",
    "batched",
    "concurrent",
    "current_function_call_id",
    "current_input_id",
    "enable_output",
    "enter",
    "exception",
    "exit",
    "fastapi_endpoint",
    "functions",
    "io_streams",
    "is_local",
    "method",
    "parameter",
    "web_endpoint",
    "web_server",
    "wsgi_app",
]
