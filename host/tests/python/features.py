"""An app for the integration tests: errors, retries, timeouts, a slow function for the
queue, scale-down, secrets, volumes and a period schedule."""

import os
import time

import lode

app = lode.App("feat", allow_callers=["limits"])
data = lode.Volume.from_name("feat-data", create_if_missing=True)


class Custom(Exception):
    """Importable on the client too (the app module is): it comes back as itself."""


@app.function()
def fail(x):
    raise ValueError(f"bad {x}")


@app.function()
def fail_custom():
    raise Custom("raised in the container")


@app.function()
def fail_ghost():
    # A class from a module the client cannot import comes back as lode.RemoteError.
    ghost = type("Ghost", (Exception,), {"__module__": "nowhere_to_be_found"})
    raise ghost("from a module only the container had")


@app.web_endpoint(method="POST")
def boom(body):
    raise RuntimeError("internal detail the public must not see")


@app.function()
def add(a, b):
    return a + b


@app.function(volumes={"/data": data}, retries=lode.Retries(max_retries=2, initial_delay=0.1))
def crash_once(tag):
    marker = f"/data/crashed-{tag}"
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("1")
        data.commit()
        os._exit(3)
    return f"recovered {tag}"


@app.function(volumes={"/data": data})
def crash_always():
    os._exit(4)


@app.function(timeout=1)
def sleepy(seconds):
    time.sleep(seconds)
    return "woke"


@app.function(max_containers=1, scaledown_window=1)
def slow(seconds):
    time.sleep(seconds)
    return seconds


@app.function(secrets=[lode.Secret.from_name("feat-api")])
def use_secret():
    token = os.environ["TOKEN"]
    print(f"the token is {token}")
    return len(token)


@app.function(secrets=[lode.Secret.from_dict({"MODE": "inline-mode"})])
def inline_secret():
    return os.environ["MODE"]


@app.function(min_containers=1)
def kept_warm():
    return "warm"


@app.function(volumes={"/data": data})
def save(key, value):
    with open(f"/data/{key}", "w") as f:
        f.write(value)
    data.commit()
    return value


@app.function(volumes={"/data": data.read_only()})
def load(key):
    try:
        with open(f"/data/{key}-overwrite", "w") as f:
            f.write("must not land")
        wrote = "written"
    except OSError:
        wrote = "refused"
    with open(f"/data/{key}") as f:
        return f"{f.read()} ({wrote})"


@app.function(serialization="pickle")
def union(a, b):
    # Sets are not JSON: this function takes and returns pickled Python objects.
    return a | b


@app.function(volumes={"/data": data}, schedule=lode.Period(seconds=2))
def beat():
    with open("/data/beats", "a") as f:
        f.write(f"{time.time()}\n")
    data.commit()


@app.function()
def caller(n):
    # A call from inside a container goes out over the agent's socket.
    return add.remote(n, 1) + lode.Function.from_name("feat", "add").remote(n, 2)


@app.local_entrypoint()
def main():
    try:
        fail.remote(3)
    except ValueError as e:
        notes = "".join(getattr(e, "__notes__", []))
        print(f"caught ValueError: {e}; remote traceback: {'raise ValueError' in notes}")
    try:
        fail_custom.remote()
    except Custom as e:
        print(f"caught Custom: {e}")
    try:
        fail_ghost.remote()
    except lode.RemoteError as e:
        print(f"caught RemoteError {e.kind}")
    results = list(fail.map([1, 2], return_exceptions=True))
    print("return_exceptions:", [type(r).__name__ for r in results])
    print("starmap:", list(add.starmap([(1, 2), (3, 4)])))
    print("unordered:", sorted(add.map([1, 2, 3], [10, 20, 30], order_outputs=False)))
    print("caller:", caller.remote(10))
    print("pickle:", sorted(union.remote({1, 2}, {2, 3})))


@app.function(concurrency=8)
def bounce():
    # Python to Wasm and back without end (limits/probe "bounce" calls here): the call-depth
    # bound of the Wasm app stops it, because a call made while serving an input carries
    # that input's place in the call tree.
    return lode.Function.from_name("limits", "probe").remote("bounce")


@app.function()
def wasm_square(x):
    # Python to Wasm, from inside a container, through the same router.
    return lode.Function.from_name("fan", "square").remote(x)
