"""`modal.functions`, as Modal code imports it: the function and call handles."""

from ._app import Function, FunctionCall

gather = FunctionCall.gather

__all__ = ["Function", "FunctionCall", "gather"]
