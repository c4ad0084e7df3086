"""Web apps on Lode, as on Modal: a FastAPI app (a streaming route and a WebSocket), a WSGI
app, a plain HTTP server started in the container, and a class whose web methods share what
its enter hook made.

    lode deploy samples/python-web/app.py
    curl http://127.0.0.1:8080/python-web/web/
    curl -N http://127.0.0.1:8080/python-web/web/stream?n=5
    curl http://python-web--web.lode.localhost:8080/      # the same app, at the root
"""

import lode

image = (
    lode.Image.debian_slim()
    .uv_pip_install("fastapi==0.115.12")
    .run_commands("mkdir -p /srv/files && echo 'hello from a file' > /srv/files/hello.txt")
)
app = lode.App("python-web", image=image)


@app.function()
@lode.concurrent(max_inputs=100)
@lode.asgi_app()
def web():
    import asyncio

    from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
    from fastapi.responses import StreamingResponse

    api = FastAPI()

    @api.get("/")
    def hello():
        return {"hello": "world"}

    @api.post("/echo")
    async def echo(request: Request):
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size, "root_path": request.scope["root_path"]}

    @api.get("/stream")
    async def stream(n: int = 3):
        async def lines():
            for i in range(n):
                yield f"chunk {i}\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(lines(), media_type="text/plain")

    @api.websocket("/ws")
    async def shout(websocket: WebSocket):
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(text.upper())
        except WebSocketDisconnect:
            pass

    return api


@app.function()
@lode.wsgi_app()
def legacy():
    def wsgi(environ, start_response):
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{environ['SCRIPT_NAME']} {environ['PATH_INFO']} {environ['QUERY_STRING']} {len(body)}".encode()]

    return wsgi


@app.function()
@lode.web_server(8000, startup_timeout=10)
def files():
    import subprocess

    subprocess.Popen(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", "/srv/files"])


@app.function()
@lode.fastapi_endpoint(method="GET")
def add(a: int, b: int = 1) -> dict:
    return {"sum": a + b}


@app.cls()
class Greeter:
    """Web methods of one instance, made once per container: its enter hook runs before the
    first request, whichever method that reaches."""

    entered = 0

    @lode.enter()
    def start(self):
        self.greeting = "hello"
        type(self).entered += 1

    @lode.fastapi_endpoint(method="GET")
    def greet(self, name: str = "world") -> dict:
        return {"greeting": f"{self.greeting} {name}", "entered": type(self).entered}

    @lode.asgi_app()
    def api(self):
        from fastapi import FastAPI

        api = FastAPI()

        @api.get("/")
        def root() -> dict:
            return {"greeting": self.greeting, "entered": type(self).entered}

        return api


@app.local_entrypoint()
def main():
    print("web:", web.get_web_url())
    print("add:", add.get_web_url())
