"""Values as JSON, with what JSON cannot hold tagged: bytes, tuples, and (for handles that
ask for pickle) other Python objects. Used for call arguments and results and for Dict and
Queue values, so `bytes` and tuples survive a round trip with no pickle involved."""

from __future__ import annotations

import base64
import json
import pickle
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
