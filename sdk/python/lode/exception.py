"""The exceptions Lode raises, under the names Modal code catches (`modal.exception.*`).

Every Lode error derives from `Error`. An API error arrives as `RemoteError` mixed with the
class its kind names, so `except lode.exception.NotFoundError` and `except lode.RemoteError`
both catch a missing app."""

from __future__ import annotations

import builtins


class Error(Exception):
    """The base of Lode's own errors."""


class AlreadyExistsError(Error):
    """A named object exists already."""


class AuthError(Error):
    """The API token is missing or wrong."""


class InvalidError(Error):
    """An argument or a request is not valid."""


class ConflictError(InvalidError):
    """The request conflicts with the object's state."""


class NotFoundError(Error):
    """A named app, function, object or file does not exist."""


class ResourceExhaustedError(Error):
    """A queue or a limit is full; try again later."""


class ExecutionError(Error):
    """Something went wrong running the code (not the code's own exception)."""


class InternalFailure(Error):
    """Lode failed internally."""


class UnimplementedError(Error):
    """Lode does not support this yet."""


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - Modal's name
    """A wait ran out. Also a builtin TimeoutError, so either spelling catches it."""


class FunctionTimeoutError(TimeoutError):
    """A function input ran past its timeout."""


class SandboxTimeoutError(TimeoutError):
    """A sandbox ran past its lifetime."""


class ExecTimeoutError(TimeoutError):
    """A sandbox command ran past its timeout."""


class SandboxTerminatedError(Error):
    """The sandbox ended while the call used it."""


class ConnectionError(Error, builtins.ConnectionError):  # noqa: A001 - Modal's name
    """The Lode API cannot be reached."""


class DeserializationError(Error):
    """A result or argument could not be decoded."""


class SerializationError(Error):
    """A result or argument could not be encoded."""


class RequestSizeError(Error):
    """A request is too large."""


class ClientClosed(Error):
    """The client was closed."""


class InputCancellation(BaseException):
    """Raised in a function whose input was cancelled."""


class DeprecationError(UserWarning):
    """A deprecated API."""


class ImageBuildError(Error):
    """An image failed to build."""


# The API's error kinds and the classes they raise as (mixed with RemoteError).
KINDS: dict[str, type[Error]] = {
    "not_found": NotFoundError,
    "unauthorized": AuthError,
    "forbidden": AuthError,
    "invalid_request": InvalidError,
    "invalid_manifest": InvalidError,
    "conflict": ConflictError,
    "already_exists": AlreadyExistsError,
    "queue_full": ResourceExhaustedError,
    "too_large": RequestSizeError,
    "file_too_large": RequestSizeError,
    "invalid_name": InvalidError,
    "unavailable": ExecutionError,
    "sandbox_ended": SandboxTerminatedError,
    "file_call_timeout": TimeoutError,
    "unsupported": UnimplementedError,
    "internal": InternalFailure,
    "build_failed": ImageBuildError,
    "cancelled": ExecutionError,
}
