"""`python3 -m lode collect` and `python3 -m lode run`, run as the deployer runs them."""

import hashlib
import json
import os
import tempfile
import textwrap
import unittest

from tests.support import run_python

APP = textwrap.dedent(
    """
    import lode

    app = lode.App("demo")
    image = lode.Image.debian_slim(python_version="3.11").pip_install("numpy")
    with image.imports():
        import numpy_is_not_installed_here as np

    print("import-time print must not reach stdout")
    vol = lode.Volume.from_name("d", create_if_missing=True)

    @app.function(image=image, cpu=1, memory=512, timeout=60, min_containers=0, max_containers=10,
                  scaledown_window=60, retries=lode.Retries(max_retries=2), concurrency=1, gpu="H100",
                  secrets=[lode.Secret.from_name("api"), lode.Secret.from_dict({"K": "V"})],
                  volumes={"/data": vol, "/ro": lode.Volume.from_name("d", read_only=True)},
                  schedule=lode.Period(seconds=5), network="none")
    def square(x: int) -> int:
        return x * x

    @app.function(schedule=lode.Cron("*/5 * * * *"), serialization="pickle", name="tick-tock")
    def tick():
        pass

    @app.web_endpoint(method="post", memory=256)
    def echo(body: dict) -> dict:
        return body

    @app.web_endpoint(method="GET", path="/custom")
    def custom(body):
        return body

    @app.local_entrypoint()
    def main(a="none", b="none"):
        print("entrypoint got", a, b)

    @app.local_entrypoint
    def failing():
        raise RuntimeError("entrypoint failed")
    """
)


class CliTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def write(self, name, source):
        path = os.path.join(self.tmp.name, name)
        with open(path, "w") as f:
            f.write(source)
        return path

    def collect(self, path):
        return run_python(["-m", "lode", "collect", path], cwd=self.tmp.name)

    def test_collect_describes_the_app(self):
        path = self.write("myapp.py", APP)
        proc = self.collect(path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("import-time print", proc.stderr)
        out = json.loads(proc.stdout)
        inline = "inline-" + hashlib.sha256(b'{"K":"V"}').hexdigest()[:16]
        image = {
            "base": {"debian_slim": {"python_version": "3.11"}},
            "steps": [{"pip_install": {"packages": ["numpy"]}}],
        }
        default_image = {"base": {"debian_slim": {}}, "steps": []}
        self.assertEqual(out["app"], "demo")
        self.assertEqual(out["module"], "myapp")
        self.assertEqual(out["file"], path)
        self.assertEqual(out["entrypoints"], ["main", "failing"])
        self.assertEqual(out["inline_secrets"], {inline: {"K": "V"}})
        functions = {f["name"]: f for f in out["functions"]}
        self.assertEqual(list(functions), ["square", "tick-tock", "echo", "custom"])
        self.assertEqual(
            functions["square"],
            {
                "name": "square",
                "runtime": "python",
                "python": {"module": "myapp", "qualname": "square", "image": image, "serialization": "json"},
                "resources": {
                    "cpu": 1.0,
                    "memory": 512,
                    "timeout": 60.0,
                    "concurrency": 1,
                    "min_containers": 0,
                    "max_containers": 10,
                    "scaledown_window": 60.0,
                    "gpu": "H100",
                },
                "schedule": "every 5s",
                "secrets": ["api", inline],
                "volumes": [
                    {"name": "d", "path": "/data", "read_only": False, "create_if_missing": True},
                    {"name": "d", "path": "/ro", "read_only": True, "create_if_missing": False},
                ],
                "retries": {"max_retries": 2, "initial_delay": 1.0, "backoff_coefficient": 2.0},
                "network": {"mode": "none"},
            },
        )
        self.assertEqual(
            functions["tick-tock"],
            {
                "name": "tick-tock",
                "runtime": "python",
                "python": {"module": "myapp", "qualname": "tick", "image": default_image, "serialization": "pickle"},
                "resources": {},
                "schedule": "*/5 * * * *",
            },
        )
        self.assertEqual(functions["echo"]["web"], {"path": "/echo", "method": "POST"})
        self.assertEqual(functions["echo"]["resources"], {"memory": 256})
        self.assertEqual(functions["custom"]["web"], {"path": "/custom", "method": "GET"})
        for absent in ("schedule", "retries", "secrets", "volumes", "network"):
            self.assertNotIn(absent, functions["echo"])
        self.assertNotIn("web", functions["square"])

    def test_app_image_is_the_default_for_its_functions(self):
        path = self.write(
            "withimage.py",
            textwrap.dedent(
                """
            import lode
            app = lode.App("demo", image=lode.Image.debian_slim().apt_install("git"))
            @app.function
            def f():
                pass
            """
            ),
        )
        proc = self.collect(path)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        image = json.loads(proc.stdout)["functions"][0]["python"]["image"]
        self.assertEqual(image["steps"], [{"apt_install": {"packages": ["git"]}}])

    def test_collect_without_an_app_fails(self):
        path = self.write("noapp.py", "import lode\nx = 1\n")
        proc = self.collect(path)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stdout, "")
        self.assertIn("defines no lode.App", proc.stderr)

    def test_collect_with_two_apps_fails(self):
        path = self.write("twoapps.py", "import lode\na = lode.App('one')\nb = lode.App('two')\n")
        proc = self.collect(path)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("'one', 'two'", proc.stderr)

    def test_collect_of_a_file_that_raises_shows_the_traceback(self):
        path = self.write("broken.py", "import lode\napp = lode.App('demo')\nraise ValueError('boom at import')\n")
        proc = self.collect(path)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stdout, "")
        self.assertIn("Traceback (most recent call last)", proc.stderr)
        self.assertIn("importing", proc.stderr)
        self.assertIn("ValueError: boom at import", proc.stderr)

    def test_collect_of_a_missing_file_or_bad_command_fails_with_2(self):
        proc = self.collect(os.path.join(self.tmp.name, "missing.py"))
        self.assertEqual(proc.returncode, 2)
        self.assertIn("is not a file", proc.stderr)
        proc = run_python(["-m", "lode", "frobnicate"])
        self.assertEqual(proc.returncode, 2)

    def test_run_calls_the_named_entrypoint_with_arguments(self):
        path = self.write("runapp.py", APP)
        proc = run_python(["-m", "lode", "run", path, "--entrypoint", "main", "--", "x", "--y"])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("entrypoint got x --y", proc.stdout)

    def test_run_reports_an_exception_with_exit_1(self):
        path = self.write("runfail.py", APP)
        proc = run_python(["-m", "lode", "run", path, "--entrypoint", "failing"])
        self.assertEqual(proc.returncode, 1)
        self.assertIn("RuntimeError: entrypoint failed", proc.stderr)

    def test_run_needs_a_choice_among_several_entrypoints(self):
        path = self.write("runambiguous.py", APP)
        proc = run_python(["-m", "lode", "run", path])
        self.assertEqual(proc.returncode, 2)
        self.assertIn("main, failing", proc.stderr)
        proc = run_python(["-m", "lode", "run", path, "--entrypoint", "nope"])
        self.assertEqual(proc.returncode, 2)
        self.assertIn("no local entrypoint or function 'nope'", proc.stderr)

    def test_run_with_the_only_entrypoint_and_no_arguments(self):
        path = self.write(
            "single.py",
            textwrap.dedent(
                """
            import lode
            app = lode.App("demo")
            with lode.Image.debian_slim().imports():
                import not_here
            @app.local_entrypoint
            def only():
                print("only ran", lode.is_local())
            """
            ),
        )
        proc = run_python(["-m", "lode", "run", path])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.strip(), "only ran True")
        proc = run_python(["-m", "lode", "run", path, "--", "extra"])
        self.assertEqual(proc.returncode, 2)
        self.assertIn("cannot take the arguments", proc.stderr)


if __name__ == "__main__":
    unittest.main()


RUN_APP = textwrap.dedent(
    """
    import asyncio
    import lode

    app = lode.App("runs")

    @app.local_entrypoint()
    async def main(count: int = 1, word: str = "hi", loud: bool = False):
        await asyncio.sleep(0)
        print("async entrypoint", count * (word.upper() if loud else word))

    @app.local_entrypoint()
    def plain(n):
        print("plain got", repr(n))
    """
)


class RunTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.path = os.path.join(self.tmp.name, "runs.py")
        with open(self.path, "w") as f:
            f.write(RUN_APP)

    def run_lode(self, target, *args):
        return run_python(["-m", "lode", "run", target, "--", *args])

    def test_an_async_entrypoint_runs_to_its_end_with_options_from_its_signature(self):
        proc = self.run_lode(self.path + "::main", "--count", "2", "--word", "ab", "--loud")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("async entrypoint ABAB", proc.stdout)
        proc = self.run_lode(self.path + "::main")
        self.assertIn("async entrypoint hi", proc.stdout)

    def test_plain_words_go_positionally_and_bad_options_are_named(self):
        proc = self.run_lode(self.path + "::plain", "x")
        self.assertIn("plain got 'x'", proc.stdout)
        proc = self.run_lode(self.path + "::main", "--count", "many")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("do not fit main", proc.stderr)
        proc = self.run_lode(self.path + "::main", "--colour", "red")
        self.assertEqual(proc.returncode, 2)
        self.assertIn("takes no --colour red", proc.stderr)
        proc = self.run_lode(self.path + "::nope")
        self.assertIn("no local entrypoint or function 'nope' (it has: main, plain)", proc.stderr)
