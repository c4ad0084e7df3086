"""`modal.io_streams`, as Modal code imports it: a sandbox process's streams."""

from ._sandbox import StreamReader, StreamWriter

__all__ = ["StreamReader", "StreamWriter"]
