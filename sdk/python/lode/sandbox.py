"""`modal.sandbox`, as Modal code imports it."""

from ._sandbox import Sandbox

__all__ = ["Sandbox"]
