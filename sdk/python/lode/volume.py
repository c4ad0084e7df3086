"""`modal.volume`, as Modal code imports it."""

from ._app import Volume

__all__ = ["Volume"]
