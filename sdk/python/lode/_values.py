"""Values as JSON, with what JSON cannot hold tagged: bytes, tuples, exceptions returned as
values and dataclass instances (both rebuilt by class name, never by import), and (for
handles that ask for pickle) other Python objects. Used for call arguments and results and for Dict and
Queue values, so `bytes` and tuples survive a round trip with no pickle involved."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import pickle
import sys
import types
from typing import Any

TAG = "$lode"
_TAG = TAG


def encode(value: Any, pickled: bool) -> Any:
    """A value as JSON, with what JSON cannot hold tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [encode(v, pickled) for v in value]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode(v, pickled) for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        encoded = {k: encode(v, pickled) for k, v in value.items()}
        return {_TAG: "dict", "value": encoded} if _TAG in value else encoded
    if isinstance(value, BaseException) and not pickled:
        return _encode_exception(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not pickled:
        cls = type(value)
        fields = {f.name: encode(getattr(value, f.name), pickled) for f in dataclasses.fields(value)}
        return {_TAG: "dataclass", "module": cls.__module__, "type": cls.__qualname__, "fields": fields}
    if pickled:
        return {_TAG: "pickle", "b64": base64.b64encode(pickle.dumps(value)).decode("ascii")}
    raise TypeError(
        f"a {type(value).__name__} cannot be sent as JSON; use JSON values, bytes or tuples, "
        'or serialization="pickle"'
    )


def dump(value: Any, pickled: bool) -> str:
    """A value as the JSON text the server stores byte for byte (a dict keeps its order)."""
    return json.dumps(encode(value, pickled), allow_nan=False, separators=(",", ":"))


def load(text: str, pickled: bool) -> Any:
    return decode(json.loads(text), pickled)


def decode(value: Any, pickled: bool) -> Any:
    if isinstance(value, list):
        return [decode(v, pickled) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v, pickled) for k, v in value.items()}
    if tag == "tuple":
        return tuple(decode(v, pickled) for v in value["items"])
    if tag == "bytes":
        return base64.b64decode(value["b64"])
    if tag == "dict":
        return {k: decode(v, pickled) for k, v in value["value"].items()}
    if tag == "exception":
        return _decode_exception(value, pickled)
    if tag == "dataclass":
        return _decode_dataclass(value, pickled)
    if tag == "pickle":
        if not pickled:
            from ._client import RemoteError

            raise RemoteError(
                "pickled_value",
                'this value was sent pickled; read it with a handle made with serialization="pickle" '
                "if you trust the code that wrote it",
            )
        return pickle.loads(base64.b64decode(value["b64"]))
    from ._client import RemoteError

    raise RemoteError("bad_value", f"a value has an unknown tag {tag!r}")


class Record(types.SimpleNamespace):
    """A dataclass value whose class this process does not have: its fields as attributes,
    read as the dataclass's would be (`ref.url`)."""


def _decode_dataclass(value: dict[str, Any], pickled: bool) -> Any:
    """The instance, of its own class where a module this process has imported already holds
    a dataclass of that name with the same fields. The writer's module may be the app's file
    under another name (`__main__` in a script, the module's own name in its containers), so
    those are looked in too. Its fields are set as they were; no code of the class runs.
    Otherwise a Record with the same attributes."""
    fields = {k: decode(v, pickled) for k, v in dict(value.get("fields") or {}).items()}
    name = str(value.get("type", ""))
    for module in (str(value.get("module", "")), "__main__", os.environ.get("LODE_MODULE", "")):
        cls: Any = sys.modules.get(module)
        for part in name.split("."):
            cls = getattr(cls, part, None)
        if (
            isinstance(cls, type)
            and dataclasses.is_dataclass(cls)
            and {f.name for f in dataclasses.fields(cls)} == set(fields)
        ):
            instance = object.__new__(cls)
            for key, field in fields.items():
                object.__setattr__(instance, key, field)
            return instance
    return Record(**fields)


def _encode_exception(error: BaseException) -> dict[str, Any]:
    args = []
    for arg in error.args:
        try:
            args.append(encode(arg, False))
        except TypeError:
            args.append(str(arg))
    cls = type(error)
    return {_TAG: "exception", "module": cls.__module__, "type": cls.__qualname__, "args": args, "message": str(error)}


def _decode_exception(value: dict[str, Any], pickled: bool) -> BaseException:
    """The exception as its own class where that class is a builtin or in a module this
    process has imported already (nothing is imported for it: the name comes from the other
    side), else a RemoteError naming the type, as a raised error would be."""
    import builtins
    import sys

    module, name = str(value.get("module", "")), str(value.get("type", "Exception"))
    args = [decode(a, pickled) for a in value.get("args", [])]
    owner = builtins if module == "builtins" else sys.modules.get(module)
    cls: Any = owner
    for part in name.split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            return cls(*args)
        except Exception:
            pass
    from ._client import RemoteError

    return RemoteError(name, str(value.get("message", "")))
