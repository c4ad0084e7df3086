"""`modal.secret`, as Modal code imports it."""

from ._app import Secret

__all__ = ["Secret"]
