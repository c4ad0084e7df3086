"""A web endpoint with one container, for what happens to requests that wait for it."""

import time

import lode

app = lode.App("webqueue")


@app.function(max_containers=1)
@lode.fastapi_endpoint(method="GET")
def slow(tag: str = "x", sleep: float = 0) -> dict:
    print(f"ran {tag}", flush=True)
    time.sleep(sleep)
    return {"tag": tag}


@app.function(scaledown_window=0.2)
@lode.asgi_app()
def after():
    """Answers at once, then keeps working, as a Starlette background task does."""
    import asyncio

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"answered"})
        await asyncio.sleep(2)
        print("background done", flush=True)

    return asgi
