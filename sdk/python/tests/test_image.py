import os
import tempfile
import textwrap
import unittest
import unittest.mock

import lode
from tests.support import run_python


class ImageSpecTest(unittest.TestCase):
    def test_chain_serializes_to_the_server_schema(self):
        image = (
            lode.Image.debian_slim(python_version="3.13")
            .pip_install("numpy==2.1.3", ["six", "idna"])
            .apt_install("git")
            .run_commands("echo a", "echo b")
            .env({"K": "V"})
            .workdir("/srv")
            .add_local_dir("/tmp/some-dir", "/srv/dir")
            .add_local_file("/tmp/some-file.txt", "/srv/file.txt")
        )
        self.assertEqual(
            image.to_spec(),
            {
                "base": {"debian_slim": {"python_version": "3.13"}},
                "steps": [
                    {"pip_install": {"packages": ["numpy==2.1.3", "six", "idna"]}},
                    {"apt_install": {"packages": ["git"]}},
                    {"run_commands": {"commands": ["echo a", "echo b"]}},
                    {"env": {"vars": {"K": "V"}}},
                    {"workdir": {"path": "/srv"}},
                    {"add_local_dir": {"local": "/tmp/some-dir", "remote": "/srv/dir"}},
                    {"add_local_file": {"local": "/tmp/some-file.txt", "remote": "/srv/file.txt"}},
                ],
            },
        )

    def test_default_base_omits_python_version(self):
        self.assertEqual(lode.Image.debian_slim().to_spec(), {"base": {"debian_slim": {}}, "steps": []})

    def test_methods_return_new_images_and_leave_the_original_alone(self):
        base = lode.Image.debian_slim()
        numpy = base.pip_install("numpy")
        pandas = base.pip_install("pandas")
        self.assertEqual(base.to_spec()["steps"], [])
        self.assertEqual(numpy.to_spec()["steps"], [{"pip_install": {"packages": ["numpy"]}}])
        self.assertEqual(pandas.to_spec()["steps"], [{"pip_install": {"packages": ["pandas"]}}])
        # Editing a returned spec must not reach back into the image.
        spec = numpy.to_spec()
        spec["steps"][0]["pip_install"]["packages"].append("evil")
        self.assertEqual(numpy.to_spec()["steps"], [{"pip_install": {"packages": ["numpy"]}}])
        env = {"A": "1"}
        with_env = base.env(env)
        env["B"] = "2"
        self.assertEqual(with_env.to_spec()["steps"], [{"env": {"vars": {"A": "1"}}}])

    def test_relative_local_paths_resolve_next_to_the_calling_file(self):
        spec = lode.Image.debian_slim().add_local_file("data/x.txt", "/x.txt").to_spec()
        here = os.path.dirname(os.path.abspath(__file__))
        self.assertEqual(spec["steps"][0]["add_local_file"]["local"], os.path.join(here, "data", "x.txt"))

    def test_invalid_arguments_are_refused_with_a_reason(self):
        with self.assertRaisesRegex(ValueError, "absolute path"):
            lode.Image.debian_slim().workdir("relative")
        with self.assertRaisesRegex(ValueError, "option"):
            lode.Image.debian_slim().pip_install("--index-url=http://x")
        with self.assertRaisesRegex(ValueError, "variable name"):
            lode.Image.debian_slim().env({"1A": "x"})
        with self.assertRaisesRegex(TypeError, "str"):
            lode.Image.debian_slim().env({"A": 1})
        with self.assertRaisesRegex(ValueError, "3.11"):
            lode.Image.debian_slim(python_version="python3")


class ImportsBlockTest(unittest.TestCase):
    SOURCE = textwrap.dedent(
        """
        import lode
        image = lode.Image.debian_slim()
        before = 1
        with image.imports():
            import lode_module_that_does_not_exist
            ran = True
        after = 2
        print("done", before, after, "ran" in globals())
        """
    )

    def run_source(self, **env):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "prog.py")
            with open(path, "w") as f:
                f.write(self.SOURCE)
            return run_python([path], **env)

    def test_block_is_skipped_in_host_mode(self):
        proc = self.run_source(LODE_COLLECT="1")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.strip(), "done 1 2 False")

    def test_block_runs_outside_host_mode(self):
        proc = self.run_source()
        self.assertEqual(proc.returncode, 1)
        self.assertIn("ModuleNotFoundError: No module named 'lode_module_that_does_not_exist'", proc.stderr)

    def test_block_body_runs_when_imports_succeed(self):
        image = lode.Image.debian_slim()
        with image.imports():
            import json as imported_json
        self.assertEqual(imported_json.dumps([1]), "[1]")

    def test_tracing_is_restored_after_a_skipped_block(self):
        source = textwrap.dedent(
            """
            import sys, lode
            def tracer(*a): return None
            sys.settrace(tracer)
            with lode.Image.debian_slim().imports():
                raise SystemExit("body ran")
            print(sys.gettrace() is tracer)
            """
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "prog.py")
            with open(path, "w") as f:
                f.write(source)
            proc = run_python([path], LODE_COLLECT="1")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.strip(), "True")


if __name__ == "__main__":
    unittest.main()


class InstallSourcesTest(unittest.TestCase):
    """The Modal install calls that read files here: requirements, pyproject, local modules."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        patcher = unittest.mock.patch.dict(os.environ, {"LODE_COLLECT": "1"})
        patcher.start()
        self.addCleanup(patcher.stop)

    def write(self, name, text):
        path = os.path.join(self.tmp.name, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def steps(self, image):
        return image.to_spec()["steps"]

    def test_uv_pip_install_is_its_own_step(self):
        self.assertEqual(
            self.steps(lode.Image.debian_slim().uv_pip_install("numpy", force_build=True)),
            [{"uv_pip_install": {"packages": ["numpy"]}}],
        )

    def test_requirements_are_read_here_with_includes_and_comments(self):
        self.write("base.txt", "six==1.16.0  # pinned\n")
        path = self.write(
            "requirements.txt",
            """\
            # tools
            -r base.txt
            idna>=3 ; python_version >= "3.8"

            numpy\\
            ==2.1.3
            """,
        )
        self.assertEqual(
            self.steps(lode.Image.debian_slim().pip_install_from_requirements(path)),
            [{"pip_install": {"packages": ["six==1.16.0", 'idna>=3 ; python_version >= "3.8"', "numpy==2.1.3"]}}],
        )
        bad = self.write("bad.txt", "--index-url https://example.invalid/simple\nsix\n")
        with self.assertRaisesRegex(ValueError, r"bad.txt:1: .*is a pip option.*run_commands"):
            lode.Image.debian_slim().pip_install_from_requirements(bad)
        with self.assertRaisesRegex(FileNotFoundError, "cannot read"):
            lode.Image.debian_slim().pip_install_from_requirements(os.path.join(self.tmp.name, "none.txt"))

    def test_pyproject_dependencies_and_optional_groups(self):
        path = self.write(
            "pyproject.toml",
            """\
            [project]
            name = "demo"
            dependencies = ["six", "idna>=3"]
            [project.optional-dependencies]
            fast = ["numpy"]
            """,
        )
        image = lode.Image.debian_slim().pip_install_from_pyproject(path, optional_dependencies=["fast"])
        self.assertEqual(self.steps(image), [{"pip_install": {"packages": ["six", "idna>=3", "numpy"]}}])
        with self.assertRaisesRegex(ValueError, r"no optional dependency group 'gpu' \(it has: fast\)"):
            lode.Image.debian_slim().pip_install_from_pyproject(path, optional_dependencies=["gpu"])

    def test_local_python_source_goes_to_root(self):
        package = self.write("mylib/__init__.py", "X = 1\n")
        single = self.write("helpers.py", "Y = 2\n")
        with unittest.mock.patch("sys.path", [self.tmp.name, *__import__("sys").path]):
            image = lode.Image.debian_slim().add_local_python_source("mylib", "helpers")
        self.assertEqual(
            self.steps(image),
            [
                {"add_local_dir": {"local": os.path.dirname(package), "remote": "/root/mylib"}},
                {"add_local_file": {"local": single, "remote": "/root/helpers.py"}},
            ],
        )
        with self.assertRaisesRegex(ModuleNotFoundError, "no module 'no_such_module_here'"):
            lode.Image.debian_slim().add_local_python_source("no_such_module_here")

    def test_from_registry_is_a_base_that_takes_steps_and_a_named_secret(self):
        image = (
            lode.Image.from_registry("ghcr.io/org/app:1", secret=lode.Secret.from_name("regcred"))
            .pip_install("six")
            .env({"A": "1"})
        )
        self.assertEqual(
            image.to_spec(),
            {
                "base": {"registry": {"reference": "ghcr.io/org/app:1", "secret": "regcred"}},
                "steps": [{"pip_install": {"packages": ["six"]}}, {"env": {"vars": {"A": "1"}}}],
            },
        )
        self.assertEqual(
            lode.Image.from_registry("python:3.12-slim").to_spec(),
            {"base": {"registry": {"reference": "python:3.12-slim"}}, "steps": []},
        )
        # Adding a step leaves the image it was added to as it was.
        base = lode.Image.from_registry("python:3.12-slim")
        base.pip_install("six")
        self.assertEqual(base.to_spec()["steps"], [])
        with self.assertRaisesRegex(ValueError, "reference such as"):
            lode.Image.from_registry("python 3")
        with self.assertRaisesRegex(ValueError, "pip_install\\(\\) needs Linux"):
            lode.Image.wasm().pip_install("six")

    def test_run_function_carries_the_module_and_keys_on_the_function(self):
        image = lode.Image.debian_slim().run_function(
            _prepare, secrets=[lode.Secret.from_name("hub")], args=("m",), kwargs={"n": 2}, timeout=60
        )
        step = image.to_spec()["steps"][0]["run_function"]
        self.assertEqual(step["function"], "_prepare")
        # Imported as tests.test_image here; the build step imports the file by its own name.
        self.assertEqual(step["module"], "test_image")
        self.assertTrue(step["function_source"].startswith("def _prepare("))
        self.assertIn("def _prepare(", step["module_source"])
        self.assertIn("class ImageSpecTest(unittest.TestCase)", step["module_source"])
        self.assertEqual(step["arguments"], {"args": ["m"], "kwargs": {"n": 2}})
        self.assertEqual((step["secrets"], step["timeout"]), (["hub"], 60))

        def nested():
            pass

        with self.assertRaisesRegex(ValueError, "top level"):
            lode.Image.debian_slim().run_function(nested)
        with self.assertRaisesRegex(TypeError, "JSON values"):
            lode.Image.debian_slim().run_function(_prepare, args=(object(),))
        with self.assertRaisesRegex(ValueError, r"run_function\(gpu=\.\.\.\).*GPUs"):
            lode.Image.debian_slim().run_function(_prepare, gpu="A100")
        with self.assertRaisesRegex(ValueError, r"run_function\(volumes=\.\.\.\)"):
            lode.Image.debian_slim().run_function(_prepare, volumes={"/v": object()})
        with self.assertRaisesRegex(TypeError, "Secret.from_name"):
            lode.Image.debian_slim().run_function(_prepare, secrets=[lode.Secret.from_dict({"A": "b"})])

    def test_modal_options_lode_cannot_honour_are_refused_by_name(self):
        with self.assertRaisesRegex(ValueError, r"pip_install\(index_url=\.\.\.\): .*run_commands"):
            lode.Image.debian_slim().pip_install("six", index_url="https://example.invalid")
        with self.assertRaisesRegex(ValueError, "add_python='3.12'.*python3"):
            lode.Image.from_registry("debian:bookworm-slim", add_python="3.12")
        with self.assertRaisesRegex(ValueError, "setup_dockerfile_commands.*run_commands"):
            lode.Image.from_registry("python:3.12-slim", setup_dockerfile_commands=["RUN true"])
        with self.assertRaisesRegex(ValueError, "named secret.*lode secret create"):
            lode.Image.from_registry("python:3.12-slim", secret=lode.Secret.from_dict({"REGISTRY_USERNAME": "u"}))
        with self.assertRaisesRegex(ValueError, "ignore"):
            lode.Image.debian_slim().add_local_dir(self.tmp.name, "/x", ignore=["*.pyc"])


def _prepare(name, n=1):
    return name * n
