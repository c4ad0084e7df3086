"""`modal.cls`, as Modal code imports it."""

from ._cls import Cls

__all__ = ["Cls"]
