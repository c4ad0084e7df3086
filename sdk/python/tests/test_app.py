import os
import tempfile
import unittest
from unittest import mock

import lode
from lode import _app


class ScheduleAndRetriesTest(unittest.TestCase):
    def test_period_totals_seconds(self):
        self.assertEqual(lode.Period(seconds=5).to_manifest(), "every 5s")
        self.assertEqual(lode.Period(minutes=1, seconds=30).to_manifest(), "every 90s")
        self.assertEqual(lode.Period(hours=1, days=1).to_manifest(), "every 90000s")
        self.assertEqual(lode.Period(minutes=0.5).to_manifest(), "every 30s")

    def test_period_refuses_zero_fractions_and_negatives(self):
        for kwargs in ({}, {"seconds": 0.5}, {"seconds": 1.5}, {"minutes": -1}):
            with self.subTest(kwargs=kwargs), self.assertRaisesRegex(ValueError, "Period"):
                lode.Period(**kwargs)

    def test_cron_keeps_the_expression_and_checks_five_fields(self):
        self.assertEqual(lode.Cron("*/5 * * * *").to_manifest(), "*/5 * * * *")
        self.assertEqual(lode.Cron("0 9 * * MON-FRI").to_manifest(), "0 9 * * MON-FRI")
        for bad in ("* * * *", "* * * * * *", "", "a;b * * * *"):
            with self.subTest(bad=bad), self.assertRaisesRegex(ValueError, "five space-separated fields"):
                lode.Cron(bad)

    def test_retries_bounds(self):
        r = lode.Retries(max_retries=3, backoff_coefficient=1.5, initial_delay=0)
        self.assertEqual(r.to_manifest(), {"max_retries": 3, "initial_delay": 0.0, "backoff_coefficient": 1.5})
        with self.assertRaisesRegex(ValueError, "max_retries"):
            lode.Retries(max_retries=11)
        with self.assertRaisesRegex(ValueError, "max_retries"):
            lode.Retries(max_retries=-1)
        with self.assertRaisesRegex(ValueError, "initial_delay"):
            lode.Retries(max_retries=1, initial_delay=61)
        with self.assertRaisesRegex(ValueError, "backoff_coefficient"):
            lode.Retries(max_retries=1, backoff_coefficient=0.5)
        with self.assertRaisesRegex(ValueError, "backoff_coefficient"):
            lode.Retries(max_retries=1, backoff_coefficient=11)


class AppTest(unittest.TestCase):
    def test_app_names_must_be_dns_labels(self):
        for good in ("demo", "a", "my-app-2", "a" * 63):
            lode.App(good)
        for bad in ("Demo", "-x", "x-", "", "a" * 64, "my_app", "a.b"):
            with self.subTest(bad=bad), self.assertRaisesRegex(ValueError, "DNS label"):
                lode.App(bad)

    def test_decorators_bare_and_called(self):
        app = lode.App("demo")

        @app.function
        def one(x):
            return x + 1

        @app.function(name="two-renamed", cpu=0.5)
        def two(x):
            return x * 2

        @app.local_entrypoint
        def main():
            return "main"

        @app.local_entrypoint()
        def other():
            return "other"

        self.assertIsInstance(one, lode.Function)
        self.assertEqual(list(app.registered_functions), ["one", "two-renamed"])
        self.assertEqual(list(app.registered_entrypoints), ["main", "other"])
        self.assertEqual(main(), "main")
        self.assertEqual(one.local(1), 2)
        self.assertEqual(one(1), 2)
        self.assertEqual(two(4), 8)
        self.assertEqual(one.__name__, "one")

    def test_duplicate_and_invalid_function_names(self):
        app = lode.App("demo")

        @app.function
        def f():
            pass

        with self.assertRaisesRegex(ValueError, "already has a function named 'f'"):
            app.function(name="f")(lambda: None)
        with self.assertRaisesRegex(ValueError, "pass name="):
            app.function(lambda: None)
        with self.assertRaisesRegex(ValueError, "pass name="):
            app.function(name="9lives")(lambda: None)

    def test_option_validation(self):
        app = lode.App("demo")
        cases = [
            ({"cpu": 0}, ValueError, "cpu"),
            ({"memory": 1.5}, ValueError, "memory"),
            ({"timeout": 90000}, ValueError, "timeout"),
            ({"min_containers": 3, "max_containers": 2}, ValueError, "min_containers"),
            ({"network": "all"}, ValueError, "network"),
            ({"serialization": "xml"}, ValueError, "serialization"),
            ({"secrets": ["api"]}, TypeError, "Secret.from_name"),
            ({"volumes": {"data": lode.Volume.from_name("d")}}, ValueError, "absolute"),
            ({"schedule": "every 5s"}, TypeError, "Period"),
            ({"image": "debian"}, TypeError, "Image"),
            ({"enable_memory_snapshot": "yes"}, TypeError, "enable_memory_snapshot"),
        ]
        for kwargs, exc, text in cases:
            with self.subTest(kwargs=kwargs), self.assertRaisesRegex(exc, text):
                app.function(name="f", **kwargs)(lambda: None)
        with self.assertRaisesRegex(TypeError, "unknown options"):
            app.web_endpoint(cpus=1)
        with self.assertRaisesRegex(ValueError, "start with '/'"):
            app.web_endpoint(path="echo")

    def test_memory_snapshot_reaches_the_manifest_of_functions_and_classes(self):
        app = lode.App("demo")

        @app.function(enable_memory_snapshot=True)
        def snapped():
            pass

        @app.function()
        def plain():
            pass

        @app.cls(enable_memory_snapshot=True)
        class Model:
            @lode.method()
            def predict(self):
                pass

        functions = app.registered_functions
        self.assertIs(functions["snapped"]._manifest("m")["memory_snapshot"], True)
        self.assertNotIn("memory_snapshot", functions["plain"]._manifest("m"))
        self.assertIs(functions["Model"]._manifest("m")["memory_snapshot"], True)

    def test_from_name_handles_have_no_local_code(self):
        handle = lode.Function.from_name("demo", "square")
        with self.assertRaisesRegex(TypeError, "from_name.*remote"):
            handle.local(1)
        with self.assertRaisesRegex(TypeError, "from_name"):
            handle(1)

    def test_inline_secret_name_is_derived_from_canonical_json(self):
        a = lode.Secret.from_dict({"B": "2", "A": "1"})
        b = lode.Secret.from_dict({"A": "1", "B": "2"})
        c = lode.Secret.from_dict({"A": "1", "B": "3"})
        self.assertEqual(a.name, b.name)
        self.assertNotEqual(a.name, c.name)
        self.assertRegex(a.name, r"^inline-[0-9a-f]{16}$")
        import hashlib

        self.assertEqual(a.name, "inline-" + hashlib.sha256(b'{"A":"1","B":"2"}').hexdigest()[:16])

    def test_is_local(self):
        with mock.patch.dict(os.environ, {"LODE_SOCKET": "/tmp/x.sock"}):
            self.assertFalse(lode.is_local())
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertTrue(lode.is_local())


class VolumeTest(unittest.TestCase):
    def test_read_only_view_both_ways(self):
        vol = lode.Volume.from_name("d", create_if_missing=True)
        self.assertFalse(vol.is_read_only)
        self.assertTrue(vol.read_only().is_read_only)
        self.assertTrue(lode.Volume.from_name("d", read_only=True).is_read_only)
        self.assertFalse(vol.is_read_only, "read_only() must not change the original")

    def test_commit_outside_a_container_is_refused(self):
        with (
            mock.patch.dict(os.environ, {}, clear=True),
            self.assertRaisesRegex(RuntimeError, "only inside a Lode container"),
        ):
            lode.Volume.from_name("d").commit()

    def test_commit_inside_a_container_fsyncs_files_and_directories(self):
        with tempfile.TemporaryDirectory() as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            for rel in ("a.txt", "sub/b.txt"):
                with open(os.path.join(tmp, rel), "w") as f:
                    f.write("x")
            os.mkfifo(os.path.join(tmp, "pipe"))  # must be skipped, opening it would block
            vol = lode.Volume.from_name("commit-test-vol")
            app = lode.App("demo")
            app.function(name="f", volumes={tmp: vol})(lambda: None)
            synced = []
            real_open = os.open

            def recording_open(path, flags, *args):
                synced.append(os.path.relpath(path, tmp))
                return real_open(path, flags, *args)

            # The host syncs the volume after the fsyncs (across hosts, where they share it).
            sent = []
            host = mock.Mock()
            host.volume.side_effect = lambda name, action: sent.append((name, action)) or {}
            with (
                mock.patch.dict(os.environ, {"LODE_SOCKET": "/tmp/x.sock"}),
                mock.patch.object(_app.os, "open", recording_open),
                mock.patch("lode._client._agent_transport", host),
            ):
                vol.commit()
                vol.reload()
            self.assertEqual(sorted(synced), sorted([".", "a.txt", "sub", os.path.join("sub", "b.txt")]))
            self.assertEqual(sent, [(vol.name, "commit"), (vol.name, "reload")])

            with mock.patch.dict(os.environ, {"LODE_SOCKET": "/tmp/x.sock"}):
                with self.assertRaisesRegex(RuntimeError, "read-only"):
                    vol.read_only().commit()
                with self.assertRaisesRegex(RuntimeError, "not mounted"):
                    lode.Volume.from_name("never-mounted").commit()
                # Outside a running function there is no host to sync through.
                with self.assertRaisesRegex(RuntimeError, "while it runs"):
                    vol.reload()


if __name__ == "__main__":
    unittest.main()
