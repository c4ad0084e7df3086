"""`modal.sandbox`, as Modal code imports it."""

from ._sandbox import Sandbox, Tunnel

__all__ = ["Sandbox", "Tunnel"]
