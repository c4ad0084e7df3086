"""`modal.image`, as Modal code imports it."""

from ._image import Image

__all__ = ["Image"]
