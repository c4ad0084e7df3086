"""@app.cls, its hooks and parameters, and the `.aio` twins, checked without a server."""

import asyncio
import unittest
from unittest import mock

import lode
from lode import _app, _client


def declare_model(app):
    @app.cls(memory=256)
    class Model:
        size: int = lode.parameter(default=2)
        name: str = lode.parameter()

        @lode.enter(snap=True)
        def load(self):
            self.entered = getattr(self, "entered", 0) + 1

        @lode.method()
        def predict(self, x):
            return x * self.size, self.entered

        @lode.exit()
        def unload(self):
            pass

    return Model


class ClassTest(unittest.TestCase):
    def test_the_manifest_is_one_function_with_its_methods(self):
        app = lode.App("demo")
        declare_model(app)
        manifest = _app.collect(app, "m", "/f.py")
        (function,) = manifest["functions"]
        self.assertEqual(function["name"], "Model")
        self.assertEqual(function["python"]["cls"], {"methods": ["predict"]})
        self.assertEqual(function["python"]["qualname"], "declare_model.<locals>.Model")
        self.assertEqual(function["resources"], {"memory": 256})

    def test_local_calls_make_one_instance_and_enter_it_once(self):
        model = declare_model(lode.App("demo"))(name="x", size=3)
        self.assertEqual(model.predict.local(2), (6, 1))
        self.assertEqual(model.predict.local(5), (15, 1))

    def test_parameters_are_checked_here(self):
        Model = declare_model(lode.App("demo"))
        with self.assertRaisesRegex(TypeError, "needs the parameter 'name'"):
            Model()
        with self.assertRaisesRegex(TypeError, r"unknown parameters \['colour'\]"):
            Model(name="x", colour=1)
        with self.assertRaisesRegex(TypeError, "keyword only"):
            Model("x")
        with self.assertRaisesRegex(AttributeError, r"no method 'nope' marked @lode.method\(\) \(it has: predict\)"):
            Model(name="x").nope
        # Options keep the class's parameters and methods.
        self.assertEqual(Model.with_options(cpu=2)(name="x")._params, {"name": "x", "size": 2})

    def test_a_remote_method_call_names_the_class_method_and_parameters(self):
        Model = declare_model(lode.App("demo"))
        transport = mock.Mock()
        transport.call.return_value = {"result": 42}
        with mock.patch.object(_client, "transport", return_value=transport):
            self.assertEqual(Model(name="x").predict.remote(4), 42)
        transport.call.assert_called_once_with(
            "demo", "Model", {"args": [4], "kwargs": {}, "method": "predict", "params": {"size": 2, "name": "x"}}
        )

    def test_from_name_sends_what_it_is_given(self):
        transport = mock.Mock()
        transport.call.return_value = {"result": 1}
        with mock.patch.object(_client, "transport", return_value=transport):
            lode.Cls.from_name("other", "Model")(size=1).anything.remote()
        transport.call.assert_called_once_with(
            "other", "Model", {"args": [], "kwargs": {}, "method": "anything", "params": {"size": 1}}
        )

    def test_declarations_lode_cannot_serve_are_refused_by_name(self):
        app = lode.App("demo")
        with self.assertRaisesRegex(ValueError, "no method marked @lode.method"):

            @app.cls()
            class Empty:
                pass

        with self.assertRaisesRegex(TypeError, "__init__ takes arguments; declare them as fields"):

            @app.cls()
            class Init:
                def __init__(self, size):
                    pass

                @lode.method()
                def f(self):
                    pass

        with self.assertRaisesRegex(TypeError, "parameter 'xs' is"):

            @app.cls()
            class Lists:
                xs: list = lode.parameter(default="x")

                @lode.method()
                def f(self):
                    pass

        with self.assertRaisesRegex(TypeError, "schedule"):
            app.cls(schedule=lode.Period(seconds=5))


class AioTest(unittest.TestCase):
    def test_aio_twins_await_the_blocking_calls(self):
        app = lode.App("demo")

        @app.function
        def square(x):
            return x * x

        transport = mock.Mock()
        transport.call.side_effect = lambda app, fn, payload: {"result": payload["args"][0] ** 2}
        transport.spawn.return_value = "call-1"
        transport.poll.return_value = {"status": "succeeded", "result": 81}

        async def main():
            one = await square.remote.aio(3)
            many = [x async for x in square.map.aio([1, 2, 3])]
            both = await asyncio.gather(square.remote.aio(4), square.remote.aio(5))
            call = await square.spawn.aio(9)
            return one, many, both, await call.get.aio()

        with mock.patch.object(_client, "transport", return_value=transport):
            self.assertEqual(asyncio.run(main()), (9, [1, 4, 9], [16, 25], 81))

    def test_api_error_kinds_raise_as_lode_exception_classes(self):
        error = _client.exception_from_error({"kind": "not_found", "message": "no app x"})
        self.assertIsInstance(error, lode.exception.NotFoundError)
        self.assertIsInstance(error, lode.RemoteError)
        self.assertIsInstance(error, lode.Error)
        self.assertIsInstance(lode.exception.TimeoutError("t"), TimeoutError)


class WithOptionsTest(unittest.TestCase):
    """Cls.with_options: the options travel with each call made through the handle."""

    def test_options_merge_travel_with_calls_and_refusals_are_named(self):
        handle = lode.Cls.from_name("app", "Model")
        roomy = handle.with_options(cpu=2, retries=3, secrets=[lode.Secret.from_name("s")]).with_options(
            memory=512, volumes={"/d": lode.Volume.from_name("v")}
        )
        payload = roomy(scale=2).predict._payload((1,), {})
        self.assertEqual(payload["params"], {"scale": 2})
        self.assertEqual(payload["method"], "predict")
        options = payload["options"]
        self.assertEqual(options["resources"], {"cpu": 2.0, "memory": 512})
        self.assertEqual(options["secrets"], ["s"])
        self.assertEqual(options["retries"]["max_retries"], 3)
        self.assertEqual(options["volumes"][0]["path"], "/d")
        # The handle it came from is unchanged, and sends no options.
        self.assertNotIn("options", handle().predict._payload((1,), {}))
        self.assertEqual(handle.with_concurrency(max_inputs=4)()._cls._options, {"resources": {"concurrency": 4}})
        with self.assertRaisesRegex(TypeError, "does not take env; put variables in a secret"):
            handle.with_options(env={"A": "1"})
        with self.assertRaisesRegex(TypeError, "does not take region"):
            handle.with_options(region="us-east")
        with self.assertRaisesRegex(ValueError, "memory=-1"):
            handle.with_options(memory=-1)
        with self.assertRaisesRegex(TypeError, "inline secret"):
            handle.with_options(secrets=[lode.Secret.from_dict({"A": "b"})])
        with self.assertRaisesRegex(NotImplementedError, "@lode.batched"):
            handle.with_batching(max_batch_size=4, wait_ms=10)


class WebMethodsTest(unittest.TestCase):
    """A class's methods served on the web: each a route of the class's pool."""

    def test_web_methods_become_routes_and_bad_ones_are_named(self):
        app = lode.App("webcls")

        @app.cls()
        class Site:
            size: int = lode.parameter(default=1)

            @lode.fastapi_endpoint(method="POST", label="greet")
            def hello(self, name: str) -> str:
                return name

            @lode.asgi_app()
            def api(self):
                return None

        spec = Site._function._spec["cls"]
        self.assertEqual(spec["methods"], [])
        self.assertEqual(
            spec["web"],
            [{"method": "hello", "route": {"path": "/greet", "serve": "asgi"}},
             {"method": "api", "route": {"path": "/Site-api", "serve": "asgi"}}],
        )
        with self.assertRaisesRegex(TypeError, "give size a default"):
            @app.cls()
            class Needs:
                size: int = lode.parameter()

                @lode.asgi_app()
                def api(self):
                    return None
        with self.assertRaisesRegex(TypeError, "takes only self"):
            @app.cls()
            class Takes:
                @lode.asgi_app()
                def api(self, extra):
                    return None
        with self.assertRaisesRegex(ValueError, "no method marked"):
            @app.cls()
            class Empty:
                pass
