"""A `wasi:http` handler written in Python and packaged by componentize-py (CPython inside
the component, about 18 MB). Lode deploys it as it is: no Lode SDK, no wrapper.

    componentize-py -d samples/python-http/wit -w wasi:http/proxy@0.2.12 \
        componentize -p samples/python-http app -o python-http.wasm
    lode deploy python-http.wasm --name pyhttp
    curl http://127.0.0.1:8080/pyhttp/

`lode.toml` here deploys the built component with `instance_reuse = 100` (build it to
`python-http.wasm` in this directory first): `lode deploy samples/python-http`.

`wit/` holds the WASI 0.2 interfaces (from the wasmtime-wasi-http crate Lode builds with);
`./lode.sh test` installs componentize-py and `host/tests/components.rs` builds this.
"""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam


# Module state lives as long as the instance: a fresh one per request by default, so this
# counts 1 every time; with `instance_reuse = N` one instance serves N requests and it counts
# up (what a reused instance keeps between requests).
served = 0


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        global served
        served += 1
        path = request.path_with_query() or "/"
        if path == "/fail":
            raise RuntimeError("asked to fail")
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        stream = body.write()
        stream.blocking_write_and_flush(
            f"hello from python at {path} (request {served} of this instance)\n".encode()
        )
        stream.__exit__(None, None, None)
        OutgoingBody.finish(body, None)
