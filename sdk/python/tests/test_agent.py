"""The in-container agent, driven end to end by a fake host on a Unix socket."""

import base64
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import textwrap
import unittest

from tests.support import sdk_env

MODULE = textwrap.dedent(
    """
    import os, sys, threading
    import lode

    app = lode.App("demo")
    image = lode.Image.debian_slim()
    with image.imports():
        import json as imported_in_container

    print("module loaded")
    barrier = threading.Barrier(2, timeout=float(os.environ.get("TEST_BARRIER_TIMEOUT", "5")))

    @app.function
    def square(x):
        return x * x

    @app.function
    def fail(message):
        raise ValueError(message)

    @app.function
    def chatty(n):
        print("out line", n)
        print("err line", n, file=sys.stderr)
        sys.stdout.write("no newline")
        return n

    @app.function
    def meet(n):
        barrier.wait()
        return n

    @app.function
    def unjsonable():
        return {1, 2}

    @app.function
    def caller(x):
        return square.remote(x) + 1

    @app.function
    def mapper(n):
        return sum(square.map(range(n)))

    @app.function
    def spawner():
        call = lode.Function.from_name("other", "job").spawn(1)
        return call.object_id + ":" + str(call.get(timeout=5))

    @app.function
    def fan_out(n):
        return list(square.map(range(n))) + list(square.starmap([(10,)]))

    @app.function(serialization="pickle")
    def pickled(s):
        return s | {3}

    @app.function
    def exits():
        sys.exit(3)

    @app.function
    def uses_image_import():
        return imported_in_container.dumps([1])
    """
)

TIMEOUT = 10


class FakeHost:
    """Listens like the Lode host, starts the agent and speaks its protocol."""

    def __init__(self, tmp: str, source: str = MODULE, concurrency: int = 1, **env: str):
        with open(os.path.join(tmp, "agentapp.py"), "w") as f:
            f.write(source)
        path = os.path.join(tmp, "host.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.server.settimeout(TIMEOUT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lode._agent"],
            env=sdk_env(
                tmp,
                LODE_SOCKET=path,
                LODE_APP_DIR=tmp,
                LODE_MODULE="agentapp",
                LODE_CONCURRENCY=str(concurrency),
                LODE_CONTAINER_TOKEN="tok-123",
                LODE_APP="demo",
                **env,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.conn, _ = self.server.accept()
        self.conn.settimeout(TIMEOUT)
        self.reader = self.conn.makefile("rb")
        self.seen = []

    def send(self, msg: dict) -> None:
        self.conn.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict:
        line = self.reader.readline()
        if not line:
            raise EOFError("the agent closed the connection")
        msg = json.loads(line)
        self.seen.append(msg)
        return msg

    def recv_type(self, kind: str) -> dict:
        while True:
            msg = self.recv()
            if msg["type"] == kind:
                return msg

    def output(self, input_id: str) -> dict:
        while True:
            msg = self.recv()
            if msg["type"] == "output" and msg["id"] == input_id:
                return msg

    def call(self, input_id: str, function: str, *args, **kwargs) -> dict:
        self.send({"type": "input", "id": input_id, "function": function, "args": list(args), "kwargs": kwargs})
        return self.output(input_id)

    def close(self) -> int:
        """Closes the connection and returns the agent's exit status; safe to call twice."""
        self.reader.close()
        self.conn.close()
        self.server.close()
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()


class AgentTest(unittest.TestCase):
    def start(self, **kwargs) -> FakeHost:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        host = FakeHost(tmp.name, **kwargs)
        self.addCleanup(host.close)
        return host

    def start_ready(self, **kwargs) -> FakeHost:
        host = self.start(**kwargs)
        ready = host.recv_type("ready")
        self.assertIn("square", ready["functions"])
        return host

    def test_ready_lists_functions_after_import_time_logs(self):
        host = self.start()
        first = host.recv()
        self.assertEqual(first, {"type": "log", "id": None, "stream": "stdout", "data": "module loaded\n"})
        ready = host.recv()
        self.assertEqual(ready["type"], "ready")
        self.assertEqual(
            ready["functions"],
            [
                "square",
                "fail",
                "chatty",
                "meet",
                "unjsonable",
                "caller",
                "mapper",
                "spawner",
                "fan_out",
                "pickled",
                "exits",
                "uses_image_import",
            ],
        )

    def test_result(self):
        host = self.start_ready()
        self.assertEqual(host.call("in-1", "square", 7), {"type": "output", "id": "in-1", "result": 49})
        self.assertEqual(host.call("in-2", "square", x=3)["result"], 9)

    def test_exception_is_reported_with_its_traceback(self):
        host = self.start_ready()
        error = host.call("in-1", "fail", "bad input")["error"]
        self.assertEqual(error["kind"], "ValueError")
        self.assertEqual(error["module"], "builtins")
        self.assertEqual(error["message"], "bad input")
        self.assertTrue(error["traceback"].startswith("Traceback (most recent call last):"), error["traceback"])
        self.assertIn("in fail", error["traceback"])
        self.assertIn("ValueError: bad input", error["traceback"])
        self.assertNotIn("_agent.py", error["traceback"])

    def test_prints_are_sent_as_logs_tagged_with_the_input(self):
        host = self.start_ready()
        host.send({"type": "input", "id": "in-7", "function": "chatty", "args": [5], "kwargs": {}})
        host.output("in-7")
        logs = [(m["id"], m["stream"], m["data"]) for m in host.seen if m["type"] == "log" and m["id"] == "in-7"]
        self.assertEqual(
            sorted(logs),
            sorted(
                [
                    ("in-7", "stdout", "out line 5\n"),
                    ("in-7", "stderr", "err line 5\n"),
                    ("in-7", "stdout", "no newline"),
                ]
            ),
        )
        # Every log of the input arrives before its output.
        self.assertEqual(host.seen[-1]["type"], "output")

    def test_concurrency_runs_inputs_at_once(self):
        host = self.start_ready(concurrency=2)
        host.send({"type": "input", "id": "a", "function": "meet", "args": [1], "kwargs": {}})
        host.send({"type": "input", "id": "b", "function": "meet", "args": [2], "kwargs": {}})
        outputs = {}
        while len(outputs) < 2:
            msg = host.recv_type("output")
            outputs[msg["id"]] = msg
        self.assertEqual(outputs["a"].get("result"), 1, outputs["a"])
        self.assertEqual(outputs["b"].get("result"), 2, outputs["b"])

    def test_concurrency_one_serves_inputs_in_turn(self):
        # The counterpart of the test above: one thread cannot meet itself at the barrier.
        host = self.start_ready(concurrency=1, TEST_BARRIER_TIMEOUT="0.3")
        host.send({"type": "input", "id": "a", "function": "meet", "args": [1], "kwargs": {}})
        host.send({"type": "input", "id": "b", "function": "meet", "args": [2], "kwargs": {}})
        self.assertEqual(host.output("a")["error"]["kind"], "BrokenBarrierError")
        self.assertEqual(host.output("b")["error"]["kind"], "BrokenBarrierError")

    def test_call_from_inside_goes_through_the_host(self):
        host = self.start_ready(concurrency=2)
        host.send({"type": "input", "id": "in-1", "function": "caller", "args": [7], "kwargs": {}})
        call = host.recv_type("call")
        self.assertEqual(call["token"], "tok-123")
        self.assertEqual(call["op"], "call")
        self.assertEqual(call["app"], "demo")
        self.assertEqual(call["function"], "square")
        self.assertEqual(call["args"], [7])
        self.assertEqual(call["kwargs"], {})
        self.assertRegex(call["call_id"], r"^c-\d+$")
        # The call names the input it was made for, so the host counts it in that input's
        # call tree.
        self.assertEqual(call["input"], "in-1")
        host.send({"type": "call_result", "call_id": call["call_id"], "result": 49})
        self.assertEqual(host.output("in-1").get("result"), 50)

        # An error answer becomes an exception in the function, mapped like any remote error.
        host.send({"type": "input", "id": "in-2", "function": "caller", "args": [1], "kwargs": {}})
        call = host.recv_type("call")
        host.send(
            {
                "type": "call_result",
                "call_id": call["call_id"],
                "error": {"kind": "not_found", "message": "app demo has no function square"},
            }
        )
        error = host.output("in-2")["error"]
        # An API error kind raises as the lode.exception class it names.
        self.assertEqual((error["kind"], error["module"]), ("NotFoundError", "lode.exception"))
        self.assertIn("not_found: app demo has no function square", error["message"])

        host.send({"type": "input", "id": "in-3", "function": "caller", "args": [1], "kwargs": {}})
        call = host.recv_type("call")
        host.send(
            {
                "type": "call_result",
                "call_id": call["call_id"],
                "error": {"kind": "KeyError", "module": "builtins", "message": "k", "traceback": "remote tb"},
            }
        )
        self.assertEqual(host.output("in-3")["error"]["kind"], "KeyError")

    def test_calls_from_map_workers_name_the_input_they_serve(self):
        # map's calls run on worker threads; they still count in the input's call tree.
        host = self.start_ready()
        host.send({"type": "input", "id": "in-m", "function": "mapper", "args": [3], "kwargs": {}})
        for _ in range(3):
            call = host.recv_type("call")
            self.assertEqual((call["op"], call["function"], call["input"]), ("call", "square", "in-m"))
            host.send({"type": "call_result", "call_id": call["call_id"], "result": call["args"][0] ** 2})
        self.assertEqual(host.output("in-m").get("result"), 5)

    def test_spawn_and_get_from_inside(self):
        host = self.start_ready()
        host.send({"type": "input", "id": "in-1", "function": "spawner", "args": [], "kwargs": {}})
        spawn = host.recv_type("call")
        self.assertEqual((spawn["op"], spawn["app"], spawn["function"], spawn["args"]), ("spawn", "other", "job", [1]))
        self.assertEqual(spawn["token"], "tok-123")
        host.send({"type": "call_result", "call_id": spawn["call_id"], "result": {"call_id": "ca-9"}})
        get = host.recv_type("call")
        self.assertEqual((get["op"], get["id"]), ("get", "ca-9"))
        self.assertIsInstance(get["wait"], int)
        self.assertLessEqual(get["wait"], 5)
        self.assertNotEqual(get["call_id"], spawn["call_id"])
        host.send(
            {
                "type": "call_result",
                "call_id": get["call_id"],
                "result": {"call_id": "ca-9", "status": "succeeded", "result": 5},
            }
        )
        self.assertEqual(host.output("in-1").get("result"), "ca-9:5")

    def test_map_from_inside_sends_one_call_per_input(self):
        host = self.start_ready()
        host.send({"type": "input", "id": "in-1", "function": "fan_out", "args": [5], "kwargs": {}})
        seen_args = []
        for _ in range(6):
            call = host.recv_type("call")
            self.assertEqual((call["op"], call["function"], call["token"]), ("call", "square", "tok-123"))
            seen_args.append(call["args"][0])
            host.send({"type": "call_result", "call_id": call["call_id"], "result": call["args"][0] ** 2})
        self.assertEqual(sorted(seen_args), [0, 1, 2, 3, 4, 10])
        self.assertEqual(host.output("in-1").get("result"), [0, 1, 4, 9, 16, 100])

    def test_unjsonable_result_is_a_type_error(self):
        host = self.start_ready()
        error = host.call("in-1", "unjsonable")["error"]
        self.assertEqual(error["kind"], "TypeError")
        self.assertIn("not JSON-serializable", error["message"])
        self.assertIn('serialization="pickle"', error["message"])

    def test_pickled_input_and_result(self):
        host = self.start_ready()
        data = base64.b64encode(pickle.dumps((({1, 2},), {}))).decode()
        host.send({"type": "input", "id": "in-1", "function": "pickled", "pickled": data})
        out = host.output("in-1")
        self.assertNotIn("result", out)
        self.assertEqual(pickle.loads(base64.b64decode(out["result_pickled"])), {1, 2, 3})

    def test_system_exit_and_unknown_functions_do_not_kill_the_agent(self):
        host = self.start_ready()
        error = host.call("in-1", "exits")["error"]
        self.assertEqual((error["kind"], error["module"], error["message"]), ("SystemExit", "builtins", "3"))
        error = host.call("in-2", "nope")["error"]
        self.assertEqual(error["kind"], "LookupError")
        self.assertIn("'nope'", error["message"])
        self.assertEqual(host.call("in-3", "square", 2)["result"], 4)

    def test_imports_blocks_run_inside_the_container(self):
        host = self.start_ready()
        self.assertEqual(host.call("in-1", "uses_image_import")["result"], "[1]")

    def test_closing_the_connection_ends_the_agent(self):
        host = self.start_ready()
        self.assertEqual(host.close(), 0)

    def test_import_failure_is_fatal(self):
        host = self.start(source="import lode\napp = lode.App('demo')\nraise ImportError('no numpy here')\n")
        fatal = host.recv_type("fatal")
        self.assertEqual(fatal["error"]["kind"], "ImportError")
        self.assertEqual(fatal["error"]["message"], "no numpy here")
        self.assertIn("agentapp.py", fatal["error"]["traceback"])
        self.assertEqual(host.proc.wait(TIMEOUT), 1)


if __name__ == "__main__":
    unittest.main()


CLASS_MODULE = textwrap.dedent(
    """
    import asyncio, os
    import lode

    app = lode.App("demo")

    @app.function
    def square(x):
        return x * x

    @app.function
    def echo_bytes(data):
        return data + b"!", ("a", 1)

    @app.function
    async def slow_square(x):
        await asyncio.sleep(0.01)
        return x * x

    @app.function
    def numbers(n):
        yield from range(n)

    @app.cls()
    class Model:
        size: int = lode.parameter(default=2)
        tag: str = lode.parameter(default="a")

        @lode.enter()
        def load(self):
            self.loads = getattr(type(self), "loads", 0) + 1
            type(self).loads = self.loads
            print("loading", self.size, self.tag)

        @lode.method()
        def predict(self, x):
            return {"value": x * self.size, "tag": self.tag, "loads": self.loads}

        @lode.method()
        async def apredict(self, x):
            await asyncio.sleep(0)
            return x - self.size

        def helper(self):
            return "not callable remotely"

        @lode.exit()
        def unload(self):
            print("unloading", self.size, self.tag)
    """
)


class AgentClassTest(unittest.TestCase):
    def start(self) -> FakeHost:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        host = FakeHost(tmp.name, source=CLASS_MODULE)
        self.addCleanup(host.close)
        ready = host.recv_type("ready")
        self.assertEqual(ready["functions"], ["square", "echo_bytes", "slow_square", "numbers", "Model"])
        return host

    def method(self, host: FakeHost, input_id: str, method, *args, params=None) -> dict:
        msg = {"type": "input", "id": input_id, "function": "Model", "args": list(args), "kwargs": {}}
        if method is not None:
            msg["method"] = method
        if params is not None:
            msg["params"] = params
        host.send(msg)
        return host.output(input_id)

    def test_one_instance_per_parameter_set_entered_once(self):
        host = self.start()
        self.assertEqual(self.method(host, "in-1", "predict", 3)["result"], {"value": 6, "tag": "a", "loads": 1})
        self.assertEqual(self.method(host, "in-2", "predict", 4)["result"], {"value": 8, "tag": "a", "loads": 1})
        # Other values: a second instance, entered once too; defaults fill what is not given.
        out = self.method(host, "in-3", "predict", 3, params={"size": 5})
        self.assertEqual(out["result"], {"value": 15, "tag": "a", "loads": 2})
        out = self.method(host, "in-4", "predict", 1, params={"tag": "a", "size": 5})
        self.assertEqual(out["result"]["loads"], 2)
        self.assertEqual(self.method(host, "in-5", "apredict", 10)["result"], 8)

    def test_bad_methods_and_parameters_fail_the_input_by_name(self):
        host = self.start()
        error = self.method(host, "in-1", "helper")["error"]
        self.assertEqual(error["kind"], "AttributeError")
        self.assertIn("no method 'helper' marked @lode.method() (it has: predict, apredict)", error["message"])
        error = self.method(host, "in-2", None, 1)["error"]
        self.assertIn("Model is a class; call one of its methods", error["message"])
        error = self.method(host, "in-3", "predict", 1, params={"colour": "red"})["error"]
        self.assertIn("unknown parameters ['colour']", error["message"])
        error = self.method(host, "in-4", "predict", 1, params={"size": [1]})["error"]
        self.assertIn("parameters are str, int, float or bool", error["message"])
        host.send({"type": "input", "id": "in-5", "function": "square", "method": "x", "args": [2], "kwargs": {}})
        self.assertIn("is a function, not a class", host.output("in-5")["error"]["message"])

    def test_bytes_and_tuples_travel_tagged_without_pickle(self):
        from lode import _client

        host = self.start()
        payload = _client.encode_args((b"hi",), {}, "json", "echo_bytes")
        host.send({"type": "input", "id": "in-1", "function": "echo_bytes", **payload})
        out = host.output("in-1")
        self.assertEqual(_client.decode_result(out, "json", "echo_bytes"), (b"hi!", ("a", 1)))

    def test_async_functions_run_and_generators_are_refused(self):
        host = self.start()
        self.assertEqual(host.call("in-1", "slow_square", 9)["result"], 81)
        error = host.call("in-2", "numbers", 3)["error"]
        self.assertIn("numbers is a generator function", error["message"])

    def test_shutdown_runs_exit_hooks_and_exits_0(self):
        host = self.start()
        self.method(host, "in-1", "predict", 1)
        self.method(host, "in-2", "predict", 1, params={"size": 7})
        host.send({"type": "shutdown"})
        logs = []
        while True:
            try:
                msg = host.recv()
            except EOFError:
                break
            if msg["type"] == "log":
                logs.append(msg["data"])
        self.assertEqual(host.close(), 0)
        text = "".join(logs)
        self.assertIn("unloading 2 a", text)
        self.assertIn("unloading 7 a", text)


BATCH_MODULE = textwrap.dedent(
    """
    import lode

    app = lode.App("demo")
    calls = []

    @app.function()
    @lode.batched(max_batch_size=3, wait_ms=2000)
    def double(xs):
        calls.append(len(xs))
        return [x * 2 for x in xs]

    @app.function()
    def batch_sizes():
        return calls

    @app.cls()
    class Upper:
        @lode.batched(max_batch_size=2, wait_ms=2000)
        async def shout(self, words):
            return [w.upper() for w in words]
    """
)


class AgentBatchTest(unittest.TestCase):
    def test_inputs_that_arrive_together_run_as_one_call(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        host = FakeHost(tmp.name, source=BATCH_MODULE, concurrency=4)
        self.addCleanup(host.close)
        host.recv_type("ready")
        for i in range(3):
            host.send({"type": "input", "id": f"in-{i}", "function": "double", "args": [i], "kwargs": {}})
        results = {}
        while len(results) < 3:
            msg = host.recv_type("output")
            results[msg["id"]] = msg["result"]
        self.assertEqual(results, {"in-0": 0, "in-1": 2, "in-2": 4})
        self.assertEqual(host.call("in-9", "batch_sizes")["result"], [3])
        for i, word in enumerate(["ab", "cd"]):
            host.send({"type": "input", "id": f"m-{i}", "function": "Upper", "method": "shout",
                       "args": [word], "kwargs": {}})
        outputs = {host.recv_type("output")["result"] for _ in range(2)}
        self.assertEqual(outputs, {"AB", "CD"})


class AgentLoopTest(unittest.TestCase):
    """The agent's event loop runs under one task that lasts the container's life."""

    def test_libraries_that_look_for_the_loops_root_task_find_one_that_lasts(self):
        import asyncio
        import asyncio.base_events
        import threading

        from lode import _agent

        loop = asyncio.new_event_loop()
        threading.Thread(target=_agent._run_loop, args=(loop,), daemon=True).start()

        async def roots():
            # As anyio's find_root_task looks: a task that run_until_complete waits on. Without
            # one it takes each request's task for the root, and stops the worker thread it
            # started for a sync endpoint when that request ends.
            until_complete = asyncio.base_events._run_until_complete_cb
            return [
                task
                for task in asyncio.all_tasks()
                if not task.done() and any(cb is until_complete for cb, _ in task._callbacks)
            ]

        first = asyncio.run_coroutine_threadsafe(roots(), loop).result(5)
        later = asyncio.run_coroutine_threadsafe(roots(), loop).result(5)
        self.assertEqual(len(first), 1)
        self.assertIs(first[0], later[0])
