"""`modal.dict`, as Modal code imports it."""

from ._objects import Dict

__all__ = ["Dict"]
