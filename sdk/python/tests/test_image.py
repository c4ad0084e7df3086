import os
import tempfile
import textwrap
import unittest

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
