import asyncio
import threading
import time
import unittest

from lode._web_agent import WebApps


class _Function:
    """What the web apps need of a web function."""

    _web_serve = "asgi"
    _web_endpoint = None
    _web_docs = False

    def __init__(self, name, app):
        self.name = name
        self._fn = lambda: app


def _app(after_response):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": b"hi"})
        if after_response:
            await asyncio.sleep(1)

    return app


class WebAppsTest(unittest.TestCase):
    """How a web input's response and its end reach the host."""

    def setUp(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sent = []
        self.web = WebApps(self.sent.append, lambda: self.loop)

    def tearDown(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def serve(self, function, wait_for):
        msg = {"type": "input", "id": "in-1", "http": {"type": "http", "method": "GET", "path": "/",
               "query_string": "", "headers": [], "root_path": ""}, "body_done": True}
        self.web.begin(msg, function, lambda *a: None)
        return self.wait_for(wait_for)

    def test_the_response_goes_at_once_and_the_input_ends_when_the_app_returns(self):
        sent = self.serve(_Function("quick", _app(False)), lambda s: any(m.get("type") == "output" for m in s))
        self.assertEqual([m["type"] for m in sent], ["http_start", "output"], sent)
        self.assertTrue(sent[0]["done"])
        self.assertEqual(sent[0]["headers"], [("x-a", "1")])

    def test_work_after_the_response_delays_the_end_but_not_the_response(self):
        started = self.serve(_Function("slow", _app(True)), lambda s: any(m.get("id") == "in-1" for m in s))
        # The response is out while the app still works; its end comes once it returns.
        self.assertEqual([m["type"] for m in started], ["http_start"], started)
        sent = self.wait_for(lambda s: any(m.get("type") == "output" for m in s))
        self.assertEqual([m["type"] for m in sent], ["http_start", "output"], sent)

    def wait_for(self, done):
        deadline = time.monotonic() + 5
        while not done(self.sent) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [m for m in self.sent if m.get("id") == "in-1"]


if __name__ == "__main__":
    unittest.main()
