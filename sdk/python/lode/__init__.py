"""Lode: declare functions in Python and run them on a self-hosted Lode server.

    import lode
    app = lode.App("demo")

    @app.function
    def square(x: int) -> int:
        return x * x

The names follow Modal's, so Modal code runs with `import lode as modal`; what Lode cannot
honour is refused by name, with what to do instead.
"""

from . import exception
from ._app import App, Cron, Function, FunctionCall, Period, Retries, Secret, Volume, is_local
from ._client import RemoteError
from ._cls import Cls, enter, exit, method, parameter
from ._image import Image
from ._objects import Dict, Queue
from ._sandbox import ContainerProcess, Sandbox
from ._web import asgi_app, concurrent, fastapi_endpoint, web_endpoint, web_server, wsgi_app
from .exception import Error

__version__ = "0.1.0"

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
    "concurrent",
    "enter",
    "exception",
    "exit",
    "fastapi_endpoint",
    "is_local",
    "method",
    "parameter",
    "web_endpoint",
    "web_server",
    "wsgi_app",
]
