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
