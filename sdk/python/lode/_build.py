"""Image builds from the SDK: an image spec sent to the server (`POST /v1/images/build`),
its progress streamed, its digest kept for the rest of the process."""

from __future__ import annotations

import json
import threading
from typing import Any

from . import _client

_built: dict[str, str] = {}
_lock = threading.Lock()


def build(spec: dict[str, Any]) -> str:
    """The digest of the image `spec` describes, built on the server (or found in its build
    cache). Local files (`add_local_*`) need `lode image build`, which uploads them."""
    for step in spec.get("steps", []):
        if any(kind.startswith("add_local") for kind in step):
            raise ValueError(
                "this image adds local files: build it with `lode image build` (which uploads "
                "them) and pass Image.from_id(<the digest it prints>)"
            )
    key = json.dumps(spec, sort_keys=True)
    with _lock:
        if key in _built:
            return _built[key]
    transport = _client.api_transport()
    conn = transport._connection()
    headers = {"Content-Type": "application/json"}
    if transport._token:
        headers["Authorization"] = f"Bearer {transport._token}"
    conn.request("POST", transport._prefix + "/v1/images/build", body=json.dumps({"spec": spec}), headers=headers)
    resp = conn.getresponse()
    try:
        if resp.status != 200:
            body = resp.read()
            try:
                error = json.loads(body).get("error")
            except ValueError:
                error = None
            if isinstance(error, dict):
                raise _client.exception_from_error(error)
            raise _client.RemoteError("build_failed", f"the image build was refused with HTTP {resp.status}")
        for raw in resp:
            line = json.loads(raw)
            if line.get("event") == "done" and "digest" in line:
                with _lock:
                    _built[key] = line["digest"]
                return line["digest"]
            if line.get("event") == "error" and "message" in line:
                raise _client.RemoteError("build_failed", line["message"])
    finally:
        conn.close()
    raise _client.RemoteError("build_failed", "the server ended the image build without a result")
