"""`modal.container_process`, as Modal code imports it."""

from ._sandbox import ContainerProcess

__all__ = ["ContainerProcess"]
