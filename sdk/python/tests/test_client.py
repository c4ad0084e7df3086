"""The HTTP client, against a fake Lode API on 127.0.0.1."""

import base64
import json
import os
import pickle
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import lode
from lode import _client, _config

TOKEN = "secret-token"
REMOTE_TB = 'Traceback (most recent call last):\n  File "app.py", line 3, in fail\nValueError: bad value\n'


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 resets connections when map() opens 32 at once.
    request_queue_size = 128


class FakeApi:
    """Answers like the Lode API and records what it saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []  # (method, path, body)
        self.clients = set()
        self.busy_hits = 0
        self.polls = {}
        self.in_flight = 0
        self.max_in_flight = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.handle_request(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.handle_request(json.loads(self.rfile.read(length)))

            def handle_request(self, body):
                with api.lock:
                    api.requests.append((self.command, self.path, body))
                    api.clients.add(self.client_address)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self.reply(401, {"error": {"kind": "unauthorized", "message": "bad token"}})
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if parts[:2] == ["v1", "calls"]:
                    return self.poll(parts[2], int(urllib.parse.parse_qs(url.query)["wait"][0]))
                if parts[:3] == ["v1", "apps", "demo"] and parts[3] == "functions":
                    return api.route(self, parts[4], parts[5], body)
                self.reply(404, {"error": {"kind": "not_found", "message": f"no route {self.path}"}})

            def poll(self, call_id, wait):
                with api.lock:
                    api.polls.setdefault(call_id, []).append(wait)
                    count = len(api.polls[call_id])
                if call_id == "ca-1":
                    status = (
                        {"call_id": call_id, "status": "pending"}
                        if count == 1
                        else {"call_id": call_id, "status": "succeeded", "result": 42}
                    )
                elif call_id == "ca-failed":
                    status = {
                        "call_id": call_id,
                        "status": "failed",
                        "error": {"kind": "ValueError", "module": "builtins", "message": "late failure"},
                    }
                else:
                    status = {"call_id": call_id, "status": "running"}
                self.reply(200, status)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def route(self, h, fn, op, body):
        if op == "spawn":
            return h.reply(200, {"call_id": "ca-1"})
        args = body.get("args", [])
        if fn == "square":
            return h.reply(200, {"result": args[0] ** 2})
        if fn == "add":
            return h.reply(200, {"result": sum(args)})
        if fn == "fail":
            return h.reply(
                500,
                {"error": {"kind": "ValueError", "module": "builtins", "message": "bad value", "traceback": REMOTE_TB}},
            )
        if fn == "fancy":
            return h.reply(
                500,
                {
                    "error": {
                        "kind": "FancyError",
                        "module": "module_only_in_the_container",
                        "message": "fancy failure",
                        "traceback": "remote tb",
                    }
                },
            )
        if fn == "fail_odd":
            if args[0] % 2:
                error = {"kind": "ValueError", "module": "builtins", "message": f"odd {args[0]}"}
                return h.reply(500, {"error": error})
            return h.reply(200, {"result": args[0]})
        if fn == "busy":
            with self.lock:
                self.busy_hits += 1
                first = self.busy_hits == 1
            if first:
                return h.reply(429, {"error": {"kind": "queue_full", "message": "full"}}, [("Retry-After", "0")])
            return h.reply(200, {"result": "done"})
        if fn == "sleep":
            with self.lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            time.sleep(args[0])
            with self.lock:
                self.in_flight -= 1
            return h.reply(200, {"result": args[0]})
        if fn == "pset":
            call_args, kwargs = pickle.loads(base64.b64decode(body["pickled"]))
            result = call_args[0] | {99} | set(kwargs.values())
            return h.reply(200, {"result_pickled": base64.b64encode(pickle.dumps(result)).decode()})
        if fn == "evil":
            # A JSON function whose container answers with a pickle that would run code here.
            class Boom:
                def __reduce__(self):
                    return (os.system, ("touch /tmp/lode-sdk-pickle-ran",))

            return h.reply(200, {"result_pickled": base64.b64encode(pickle.dumps(Boom())).decode()})
        if fn == "hangup":
            h.reply(200, {"result": "bye"})
            h.close_connection = True  # closes the kept-alive connection without saying so
            return None
        if fn == "proxyerror":
            return h.reply(502, b"<html>bad gateway</html>")
        h.reply(404, {"error": {"kind": "not_found", "message": f"app demo has no function {fn}"}})


app = lode.App("demo")


@app.function
def square(x):
    return x * x


@app.function
def add(a, b):
    return a + b


@app.function
def fail():
    pass


@app.function
def fancy():
    pass


@app.function
def fail_odd(x):
    pass


@app.function
def busy():
    pass


@app.function
def sleep(seconds):
    pass


@app.function(serialization="pickle")
def pset(s, **kw):
    pass


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.api = FakeApi()
        self.addCleanup(self.api.close)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LODE_")}
        env.update(LODE_API=self.api.url, LODE_TOKEN=TOKEN)
        patcher = mock.patch.dict(os.environ, env, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.addCleanup(_client.forget_http_clients)

    def test_remote_returns_the_result_over_one_kept_alive_connection(self):
        self.assertEqual(square.remote(7), 49)
        self.assertEqual(square.remote(3), 9)
        self.assertEqual(lode.Function.from_name("demo", "square").remote(4), 16)
        self.assertEqual(
            self.api.requests[0], ("POST", "/v1/apps/demo/functions/square/call", {"args": [7], "kwargs": {}})
        )
        self.assertEqual(len(self.api.clients), 1, "sequential calls from one thread should reuse a connection")

    def test_a_connection_the_server_closed_is_replaced_before_a_call(self):
        hangup = lode.Function.from_name("demo", "hangup")
        self.assertEqual(hangup.remote(), "bye")
        time.sleep(0.1)  # let the server's close arrive
        self.assertEqual(hangup.remote(), "bye")
        self.assertEqual(len(self.api.clients), 2)

    def test_remote_exception_is_reraised_with_the_remote_traceback(self):
        with self.assertRaises(ValueError) as ctx:
            fail.remote()
        self.assertIs(type(ctx.exception), ValueError)
        self.assertEqual(ctx.exception.remote_traceback, REMOTE_TB)
        if sys.version_info >= (3, 11):
            self.assertEqual(str(ctx.exception), "bad value")
            self.assertEqual(ctx.exception.__notes__, ["Remote traceback:\n" + REMOTE_TB.rstrip()])
        else:
            self.assertIn("Remote traceback", str(ctx.exception))

    def test_unknown_exception_type_becomes_remote_error(self):
        with self.assertRaises(lode.RemoteError) as ctx:
            fancy.remote()
        e = ctx.exception
        self.assertEqual((e.kind, e.message, e.remote_traceback), ("FancyError", "fancy failure", "remote tb"))
        self.assertIn("FancyError: fancy failure", str(e))

    def test_an_unloaded_module_is_never_imported_for_an_error(self):
        # The module name comes from the remote side: naming one must not run its code here.
        name = "wave"
        sys.modules.pop(name, None)
        exc = _client.exception_from_error({"kind": "Error", "module": name, "message": "m"})
        self.assertIsInstance(exc, lode.RemoteError)
        self.assertNotIn(name, sys.modules)

    def test_api_errors_become_remote_error(self):
        with self.assertRaises(lode.RemoteError) as ctx:
            lode.Function.from_name("demo", "nope").remote()
        self.assertEqual(ctx.exception.kind, "not_found")
        self.assertIn("has no function nope", ctx.exception.message)
        with self.assertRaises(lode.RemoteError) as ctx:
            lode.Function.from_name("demo", "proxyerror").remote()
        self.assertEqual(ctx.exception.kind, "http_error")
        self.assertIn("502", str(ctx.exception))
        os.environ["LODE_TOKEN"] = "wrong"
        with self.assertRaises(lode.RemoteError) as ctx:
            square.remote(1)
        self.assertEqual(ctx.exception.kind, "unauthorized")

    def test_queue_full_is_retried_after_retry_after(self):
        self.assertEqual(busy.remote(), "done")
        self.assertEqual(self.api.busy_hits, 2)

    def test_spawn_then_get_waits_on_the_server(self):
        call = square.spawn(6)
        self.assertIsInstance(call, lode.FunctionCall)
        self.assertEqual(call.object_id, "ca-1")
        self.assertEqual(self.api.requests[0][:2], ("POST", "/v1/apps/demo/functions/square/spawn"))
        self.assertEqual(call.get(), 42)
        self.assertEqual(self.api.polls["ca-1"], [60, 60])

    def test_get_with_a_timeout(self):
        call = lode.FunctionCall.from_id("ca-running")
        started = time.monotonic()
        with self.assertRaisesRegex(TimeoutError, "ca-running"):
            call.get(timeout=0)
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(self.api.polls["ca-running"], [0])
        with self.assertRaisesRegex(ValueError, "late failure"):
            lode.FunctionCall.from_id("ca-failed").get(timeout=5)
        self.assertEqual(self.api.polls["ca-failed"], [5])

    def test_map_ordered_and_unordered(self):
        self.assertEqual(list(sleep.map([0.3, 0.0, 0.1])), [0.3, 0.0, 0.1])
        self.assertEqual(list(sleep.map([0.3, 0.0], order_outputs=False)), [0.0, 0.3])

    def test_map_errors_raise_or_are_returned(self):
        with self.assertRaisesRegex(ValueError, "odd 1"):
            list(fail_odd.map(range(4)))
        results = list(fail_odd.map(range(4), return_exceptions=True))
        self.assertEqual([results[0], results[2]], [0, 2])
        self.assertIsInstance(results[1], ValueError)
        self.assertEqual(str(results[3]), "odd 3")
        unordered = list(fail_odd.map(range(4), order_outputs=False, return_exceptions=True))
        self.assertEqual(sorted(r for r in unordered if isinstance(r, int)), [0, 2])
        self.assertEqual(sum(isinstance(r, ValueError) for r in unordered), 2)

    def test_starmap_and_map_over_several_iterables(self):
        self.assertEqual(list(add.starmap([(1, 2), (3, 4)])), [3, 7])
        self.assertEqual(list(add.map([1, 3], [2, 4])), [3, 7])

    def test_map_keeps_a_bounded_number_of_inputs_in_flight(self):
        taken = 0

        def inputs():
            nonlocal taken
            for _ in range(200):
                taken += 1
                yield 0.005

        outputs = sleep.map(inputs())
        next(outputs)
        self.assertLessEqual(taken, 65, "map must not read the whole iterable ahead of its outputs")
        self.assertEqual(len(list(outputs)), 199)
        self.assertLessEqual(self.api.max_in_flight, 32)
        self.assertGreater(self.api.max_in_flight, 1)

    def test_pickle_round_trip(self):
        self.assertEqual(pset.remote({1, 2}, extra=7), {1, 2, 7, 99})
        body = self.api.requests[-1][2]
        self.assertEqual(list(body), ["pickled"])

    def test_a_json_handle_never_unpickles_what_comes_back(self):
        marker = "/tmp/lode-sdk-pickle-ran"
        if os.path.exists(marker):
            os.remove(marker)
        evil = lode.Function.from_name("demo", "evil")
        with self.assertRaisesRegex(lode.RemoteError, r"pickled result, which a JSON handle never unpickles"):
            evil.remote()
        with self.assertRaisesRegex(lode.RemoteError, r"never unpickles"):
            list(evil.map([1]))
        self.assertFalse(os.path.exists(marker), "the pickle ran on the client")
        # A handle that says pickle is trusted to: the same answer is unpickled.
        trusted = lode.Function.from_name("demo", "pset", serialization="pickle")
        self.assertEqual(trusted.remote({1}), {1, 99})

    def test_json_encoding_error_names_the_argument(self):
        with self.assertRaisesRegex(TypeError, r"argument 1 of square\(\).*serialization=\"pickle\""):
            square.remote(1, {1, 2})
        with self.assertRaisesRegex(TypeError, r"keyword argument 'x' of square\(\)"):
            square.remote(x=float("nan"))
        self.assertEqual(self.api.requests, [], "nothing should be sent")

    def test_unreachable_api(self):
        self.api.close()
        with self.assertRaisesRegex(ConnectionError, "cannot reach the Lode API"):
            lode.Function.from_name("demo", "square").remote(1)


class ConfigTest(unittest.TestCase):
    def env(self, **values):
        base = {k: v for k, v in os.environ.items() if not k.startswith("LODE_")}
        base["HOME"] = self.home
        base.update(values)
        return mock.patch.dict(os.environ, base, clear=True)

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.home = tmp.name

    def test_environment_wins(self):
        with self.env(LODE_API="http://h:1/", LODE_TOKEN="t"):
            self.assertEqual(_config.find_api(), ("http://h:1", "t"))

    def test_token_without_api_is_an_error(self):
        with self.env(LODE_TOKEN="t"), self.assertRaisesRegex(_config.ConfigError, "LODE_API is not"):
            _config.find_api()

    def test_api_without_token_borrows_the_config_token_only_for_the_same_api(self):
        with self.env(LODE_API="http://h:1"):
            self.assertEqual(_config.find_api(), ("http://h:1", None))
        path = os.path.join(self.home, "c.json")
        with open(path, "w") as f:
            json.dump({"api_url": "http://h:1/", "token": "file-token"}, f)
        with self.env(LODE_API="http://h:1", LODE_CONFIG=path):
            self.assertEqual(_config.find_api(), ("http://h:1", "file-token"))
        with self.env(LODE_API="http://other:1", LODE_CONFIG=path):
            self.assertEqual(_config.find_api(), ("http://other:1", None))

    def test_config_files(self):
        path = os.path.join(self.home, "c.json")
        with open(path, "w") as f:
            json.dump({"api_url": "http://x:7070", "token": "tok"}, f)
        with self.env(LODE_CONFIG=path):
            self.assertEqual(_config.find_api(), ("http://x:7070", "tok"))
        default = os.path.join(self.home, ".config", "lode", "client.json")
        os.makedirs(os.path.dirname(default))
        with open(default, "w") as f:
            json.dump({"api_url": "http://y:7070", "token": "tok2"}, f)
        with self.env():
            self.assertEqual(_config.find_api(), ("http://y:7070", "tok2"))
        with open(default, "w") as f:
            json.dump({"api_url": "http://y:7070"}, f)
        with self.env(), self.assertRaisesRegex(_config.ConfigError, "lacks a string api_url or token"):
            _config.find_api()

    def test_nothing_found_names_every_option(self):
        with self.env(), self.assertRaises(_config.ConfigError) as ctx:
            _config.find_api()
        for option in ("LODE_API", "LODE_TOKEN", "LODE_CONFIG", "client.json"):
            self.assertIn(option, str(ctx.exception))
        with self.env(LODE_CONFIG="/nonexistent/c.json"), self.assertRaisesRegex(_config.ConfigError, "/nonexistent"):
            _config.find_api()


if __name__ == "__main__":
    unittest.main()
