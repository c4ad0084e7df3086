"""lode.Dict and lode.Queue against a recording transport: what goes on the wire, and back."""

import dataclasses
import queue
import sys
import unittest
from unittest import mock

import lode
from lode import _client, _objects


class Recorder:
    def __init__(self, answers):
        self.answers = list(answers)
        self.sent = []

    def object(self, kind, name, request):
        self.sent.append((kind, name, request))
        return self.answers.pop(0)


class ObjectsTest(unittest.TestCase):
    def run_with(self, answers, fn):
        recorder = Recorder(answers)
        with mock.patch.object(_client, "transport", return_value=recorder):
            return fn(), recorder.sent

    def test_values_round_trip_with_bytes_tuples_and_dict_order(self):
        value = {"z": 1, "a": (1, b"\x00"), "$lode": "mine"}
        text = _objects._dump(value, False)
        self.assertEqual(_objects._load(text, False), value)
        self.assertLess(text.index('"z"'), text.index('"a"'))
        with self.assertRaisesRegex(TypeError, 'serialization="pickle"'):
            _objects._dump({1, 2}, False)
        self.assertEqual(_objects._load(_objects._dump({1, 2}, True), True), {1, 2})
        with self.assertRaisesRegex(lode.RemoteError, "sent pickled"):
            _objects._load(_objects._dump({1, 2}, True), False)

    def test_the_first_request_creates_and_later_ones_do_not(self):
        d = lode.Dict.from_name("cfg", create_if_missing=True)
        _, sent = self.run_with(
            [{"created": True}, {"found": True, "value_json": "[1,2]"}],
            lambda: (d.put(("k", 1), 5), d["x"]),
        )
        self.assertEqual(
            sent[0], ("dict", "cfg", {"op": "put", "key": ["k", 1], "value_json": "5", "skip_if_exists": False, "create_if_missing": True})
        )
        self.assertEqual(sent[1], ("dict", "cfg", {"op": "get", "key": "x"}))

    def test_int_keys_past_64_bits_are_refused_rather_than_rounded(self):
        d = lode.Dict.from_name("cfg")
        for key in (2**64, -(2**63) - 1, ("a", 10**30)):
            with self.assertRaisesRegex(TypeError, "does not fit in 64 bits"):
                d.put(key, 1)
        _, sent = self.run_with([{"created": False}], lambda: d.put(2**64 - 1, 1))
        self.assertEqual(sent[0][2]["key"], 2**64 - 1)

    def test_missing_keys_and_empty_queues_raise_as_python_does(self):
        d = lode.Dict.from_name("cfg")
        q = lode.Queue.from_name("jobs")
        with self.assertRaises(KeyError):
            self.run_with([{"found": False}], lambda: d.pop("nope"))
        got, _ = self.run_with([{"found": False}], lambda: d.pop("nope", "dflt"))
        self.assertEqual(got, "dflt")
        # As Modal's: a get that does not block answers None at once, get_many an empty
        # list; a blocking one whose wait runs out raises queue.Empty.
        got, _ = self.run_with([{"values_json": []}], lambda: q.get(block=False))
        self.assertIsNone(got)
        got, _ = self.run_with([{"values_json": []}], lambda: q.get_many(3, block=False))
        self.assertEqual(got, [])
        with self.assertRaises(queue.Empty):
            self.run_with([{"values_json": []}], lambda: q.get(timeout=0))
        with self.assertRaises(queue.Empty):
            self.run_with([{"values_json": []}], lambda: q.get_many(3, timeout=0))
        with self.assertRaises(TypeError):
            d.get({"a": 1})

    def test_a_long_blocking_get_asks_in_steps(self):
        q = lode.Queue.from_name("jobs")
        with mock.patch.object(_objects, "_WAIT_STEP_S", 0.01):
            got, sent = self.run_with([{"values_json": []}, {"values_json": ['"x"']}], lambda: q.get())
        self.assertEqual(got, "x")
        self.assertEqual(len(sent), 2)
        self.assertEqual(sent[0][2]["timeout"], 0.01)


class ExceptionValueTest(unittest.TestCase):
    """An exception returned as a value (not raised) crosses as JSON and comes back as itself."""

    def test_builtin_and_loaded_exceptions_round_trip_and_others_become_remote_errors(self):
        from lode import _values

        back = _values.load(_values.dump(MemoryError("CUDA out of memory"), False), False)
        self.assertIsInstance(back, MemoryError)
        self.assertEqual(back.args, ("CUDA out of memory",))
        nested = _values.load(_values.dump({"errors": [KeyError("k"), (1, b"x")]}, False), False)
        self.assertIsInstance(nested["errors"][0], KeyError)
        self.assertEqual(nested["errors"][1], (1, b"x"))
        # A class of a module loaded here comes back as itself; an argument JSON cannot hold
        # travels as its text.
        back = _values.load(_values.dump(_LocalError(object), False), False)
        self.assertIsInstance(back, _LocalError)
        self.assertTrue(back.args[0].startswith("<class 'object'>"))
        # A module this process never imported is not imported for it.
        text = _values.dump(_LocalError("x"), False).replace(__name__, "never_imported_module_xyz")
        back = _values.load(text, False)
        self.assertIsInstance(back, lode.exception.Error)
        self.assertNotIn("never_imported_module_xyz", sys.modules)
        self.assertIn("_LocalError", str(back))


class DataclassValueTest(unittest.TestCase):
    """A dataclass (Modal code queues them) crosses as JSON, by class name, no pickle."""

    def test_a_dataclass_comes_back_as_itself_or_as_a_record_of_its_fields(self):
        from lode import _values

        ref = _Reference(id="sb-1", url="http://h:1", expires_at=5, tags=("a", b"b"))
        text = _values.dump([ref], False)
        self.assertNotIn("pickle", text)
        back = _values.load(text, False)[0]
        self.assertIsInstance(back, _Reference)
        self.assertEqual(back, ref)
        # Written by the app's module under another name (a script's __main__, say): the
        # class of the same name and fields here is used.
        with mock.patch.dict(sys.modules, {"__main__": sys.modules[__name__]}):
            moved = _values.load(text.replace(__name__, "sandbox_pool_container"), False)[0]
        self.assertIsInstance(moved, _Reference)
        # A class this process lacks (or whose fields differ): nothing is imported or run,
        # and the fields read the same.
        with mock.patch.dict(sys.modules, {"__main__": unittest}):
            record = _values.load(text.replace(__name__, "never_imported_module_xyz"), False)[0]
        self.assertNotIn("never_imported_module_xyz", sys.modules)
        self.assertNotIsInstance(record, _Reference)
        self.assertEqual((record.id, record.url, record.tags), ("sb-1", "http://h:1", ("a", b"b")))
        # No code of the class runs on the way in.
        self.assertEqual(_Reference.made, 1)


@dataclasses.dataclass(frozen=True)
class _Reference:
    id: str
    url: str
    expires_at: int
    tags: tuple = ()
    made = 0

    def __post_init__(self):
        type(self).made += 1


class _LocalError(Exception):
    pass
