"""Lode: declare functions in Python and run them on a self-hosted Lode server.

    import lode
    app = lode.App("demo")

    @app.function
    def square(x: int) -> int:
        return x * x
"""

from ._app import App, Cron, Function, FunctionCall, Period, Retries, Secret, Volume, is_local
from ._client import RemoteError
from ._image import Image
from ._sandbox import ContainerProcess, Sandbox

__version__ = "0.1.0"

__all__ = [
    "App",
    "ContainerProcess",
    "Cron",
    "Function",
    "FunctionCall",
    "Image",
    "Period",
    "RemoteError",
    "Retries",
    "Sandbox",
    "Secret",
    "Volume",
    "is_local",
]
