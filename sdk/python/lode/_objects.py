"""`lode.Dict` and `lode.Queue`: named, durable objects on the server, as Modal's, usable from
the client and from inside functions.

    d = lode.Dict.from_name("cache", create_if_missing=True)
    d["model"] = {"version": 3}
    q = lode.Queue.from_name("jobs", create_if_missing=True)
    q.put_many([1, 2, 3]); q.get(timeout=5)

Keys are str, int, float, bool, None or tuples of them. Values are anything JSON holds, plus
bytes and tuples; a handle made with serialization="pickle" also stores other Python objects
(pickled) and unpickles what it reads: only use it on objects that code you trust writes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import pickle
import queue as _queue
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from . import _aio, _client
from ._values import decode as _decode  # noqa: F401 - used by the tests
from ._values import dump as _dump
from ._values import load as _load

# The longest one request waits in a blocking get; longer waits take several.
_WAIT_STEP_S = 60.0


def _key(key: Any) -> Any:
    if isinstance(key, int) and not isinstance(key, bool) and not -(2**63) <= key < 2**64:
        # The server keeps keys as JSON numbers of 64 bits: a larger one would lose digits
        # and land on another key.
        raise TypeError(f"the int key {key} does not fit in 64 bits; use str({key}) as the key")
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, tuple):
        return [_key(k) for k in key]
    raise TypeError(f"a key is a str, int, float, bool, None or a tuple of them, not {type(key).__name__}")


def _unkey(key: Any) -> Any:
    return tuple(_unkey(k) for k in key) if isinstance(key, list) else key


class _Object:
    _kind = ""

    def __init__(self, name: str, create_if_missing: bool, serialization: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{type(self).__name__}.from_name({name!r}): give the object's name")
        if serialization not in ("json", "pickle"):
            raise ValueError(f'serialization={serialization!r}; use "json" or "pickle"')
        self.name = name
        self._create = bool(create_if_missing)
        self._pickled = serialization == "pickle"

    def __repr__(self) -> str:
        return f"{type(self).__name__}.from_name({self.name!r})"

    @classmethod
    def from_name(
        cls, name: str, *, create_if_missing: bool = False, serialization: str = "json", environment_name: Any = None
    ) -> Any:
        """A handle to the named object; with create_if_missing=True its first use makes it."""
        if environment_name is not None:
            raise ValueError("environment_name: Lode has one environment per server; leave it out")
        return cls(name, create_if_missing, serialization)

    @classmethod
    @contextlib.contextmanager
    def ephemeral(cls, **kwargs: Any) -> Iterator[Any]:
        """An object that exists for the `with` block only."""
        name = f"ephemeral-{uuid.uuid4().hex[:16]}"
        obj = cls(name, True, kwargs.pop("serialization", "json"))
        if kwargs:
            raise TypeError(f"{cls.__name__}.ephemeral() got unexpected options {sorted(kwargs)}")
        try:
            yield obj
        finally:
            cls.delete(name)

    @classmethod
    def delete(cls, name: str) -> None:
        """Deletes the named object and everything in it (from the client or a function)."""
        transport = _client.transport()
        if isinstance(transport, _client.AgentTransport):
            transport.object(cls._kind, name, {"op": "delete"})
            return
        transport.request("DELETE", f"/v1/{cls._kind}s/{name}")

    def _op(self, op: str, **fields: Any) -> dict[str, Any]:
        request = {"op": op, **fields}
        if self._create:
            request["create_if_missing"] = True
        answer = _client.transport().object(self._kind, self.name, request)
        # Made (or found) once: later requests need not ask again.
        self._create = False
        return answer


class Dict(_Object):
    """A durable key-value map by name, shared by every function and client of the server."""

    _kind = "dict"

    @_aio.blocking
    def get(self, key: Any, default: Any = None) -> Any:
        answer = self._op("get", key=_key(key))
        return _load(answer["value_json"], self._pickled) if answer.get("found") else default

    @_aio.blocking
    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        """Stores the value; returns False when skip_if_exists found the key already there."""
        value_json = _dump(value, self._pickled)
        answer = self._op("put", key=_key(key), value_json=value_json, skip_if_exists=skip_if_exists)
        return bool(answer.get("created")) or not skip_if_exists

    @_aio.blocking
    def contains(self, key: Any) -> bool:
        return bool(self._op("contains", key=_key(key)).get("found"))

    @_aio.blocking
    def len(self) -> int:
        return int(self._op("len")["len"])

    @_aio.blocking
    def pop(self, key: Any, *default: Any) -> Any:
        """Removes the key and returns its value; KeyError if missing (unless a default is given)."""
        answer = self._op("pop", key=_key(key))
        if answer.get("found"):
            return _load(answer["value_json"], self._pickled)
        if default:
            return default[0]
        raise KeyError(key)

    @_aio.blocking
    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        items = list(other.items() if hasattr(other, "items") else other) + list(kwargs.items())
        self._op("update", items=[[_key(k), _dump(v, self._pickled)] for k, v in items])

    @_aio.blocking
    def clear(self) -> None:
        self._op("clear")

    def _items(self) -> list[tuple[Any, Any]]:
        answer = self._op("items")
        if answer.get("len", 0) > len(answer["items"]):
            raise _client.RemoteError(
                "too_large",
                f"Dict {self.name!r} holds {answer['len']} entries, more than the {len(answer['items'])} one listing "
                "returns; read the keys you need with get()",
            )
        return [(_unkey(k), _load(v, self._pickled)) for k, v in answer["items"]]

    @_aio.blocking(iterator=True)
    def items(self) -> Iterator[tuple[Any, Any]]:
        """The entries (at most 10,000), in key order."""
        return iter(self._items())

    @_aio.blocking(iterator=True)
    def keys(self) -> Iterator[Any]:
        return iter([k for k, _ in self._items()])

    @_aio.blocking(iterator=True)
    def values(self) -> Iterator[Any]:
        return iter([v for _, v in self._items()])

    def __getitem__(self, key: Any) -> Any:
        answer = self._op("get", key=_key(key))
        if not answer.get("found"):
            raise KeyError(key)
        return _load(answer["value_json"], self._pickled)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.put(key, value)

    def __delitem__(self, key: Any) -> None:
        self.pop(key)

    def __contains__(self, key: Any) -> bool:
        return self.contains(key)

    def __len__(self) -> int:
        return self.len()

    def __iter__(self) -> Iterator[Any]:
        return self.keys()


class Queue(_Object):
    """A durable FIFO queue by name, with optional partitions (separate FIFOs in one queue)."""

    _kind = "queue"

    @_aio.blocking
    def put(self, v: Any, block: bool = True, timeout: float | None = None, *, partition: str | None = None) -> None:
        self.put_many([v], block, timeout, partition=partition)

    @_aio.blocking
    def put_many(
        self, vs: Iterable[Any], block: bool = True, timeout: float | None = None, *, partition: str | None = None
    ) -> None:
        values = [_dump(v, self._pickled) for v in vs]
        if values:
            self._op("put", values_json=values, partition=partition)

    @_aio.blocking
    def get(self, block: bool = True, timeout: float | None = None, *, partition: str | None = None) -> Any:
        """The oldest item. Waits for one (forever, or up to `timeout` seconds) and raises
        queue.Empty when none comes; with block=False, None at once when it is empty."""
        values = self._get(1, block, timeout, partition)
        if not values:
            if not block:
                return None
            raise _queue.Empty(f"Queue {self.name!r} has no item" + (f" after {timeout}s" if timeout else ""))
        return values[0]

    @_aio.blocking
    def get_many(
        self, n_values: int, block: bool = True, timeout: float | None = None, *, partition: str | None = None
    ) -> list[Any]:
        """Up to n_values of the oldest items; waits as get() does for the first (queue.Empty
        when the wait runs out), then returns what there is; with block=False, an empty list
        at once when it is empty."""
        if not isinstance(n_values, int) or n_values < 1:
            raise ValueError(f"get_many(n_values={n_values!r}): ask for at least 1")
        values = self._get(n_values, block, timeout, partition)
        if not values and block:
            raise _queue.Empty(f"Queue {self.name!r} has no item after {timeout}s")
        return values

    def _get(self, n: int, block: bool, timeout: float | None, partition: str | None) -> list[Any]:
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            if not block:
                wait = 0.0
            elif deadline is None:
                wait = _WAIT_STEP_S
            else:
                wait = min(_WAIT_STEP_S, max(0.0, deadline - time.monotonic()))
            answer = self._op("get", n=n, partition=partition, timeout=wait)
            values = [_load(v, self._pickled) for v in answer["values_json"]]
            if values or not block or (deadline is not None and time.monotonic() >= deadline):
                return values

    @_aio.blocking
    def len(self, *, partition: str | None = None, total: bool = False) -> int:
        return int(self._op("len", partition=partition, total=total)["len"])

    @_aio.blocking
    def clear(self, *, partition: str | None = None, all: bool = False) -> None:  # noqa: A002 - Modal's name
        self._op("clear", partition=partition, all=all)

    @_aio.blocking(iterator=True)
    def iterate(self, *, partition: str | None = None, item_poll_timeout: float = 0.0) -> Iterator[Any]:
        """The items, oldest first, without taking them; with item_poll_timeout, waits that
        long (polling) for more before it ends."""

        def items() -> Iterator[Any]:
            seen = 0
            while True:
                answer = self._op("peek", n=100, skip=seen, partition=partition)
                values = [_load(v, self._pickled) for v in answer["values_json"]]
                if not values:
                    deadline = time.monotonic() + item_poll_timeout
                    while not values and time.monotonic() < deadline:
                        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                        answer = self._op("peek", n=100, skip=seen, partition=partition)
                        values = [_load(v, self._pickled) for v in answer["values_json"]]
                    if not values:
                        return
                seen += len(values)
                yield from values

        return items()

    def __len__(self) -> int:
        return self.len()
