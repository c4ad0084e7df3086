"""`modal.queue`, as Modal code imports it."""

from ._objects import Queue

__all__ = ["Queue"]
