"""Dicts and Queues from the client and from inside functions, and generators streamed to
the client, for the integration tests."""

import queue
import time

import lode

app = lode.App("objects")
results = lode.Queue.from_name("obj-results", create_if_missing=True)


@app.function()
def worker(key):
    # Inside a container: the same objects, through the agent's socket.
    settings = lode.Dict.from_name("obj-settings")
    results.put({"key": key, "factor": settings[key] * 10}, partition="done")
    return settings.len()


@app.function()
def scratch(n):
    """An ephemeral Dict inside a function: there for the block, gone after it."""
    with lode.Dict.ephemeral() as d:
        for i in range(n):
            d[i] = i * i
        return sum(d[i] for i in range(n))


@app.function()
async def async_worker(n):
    jobs = lode.Queue.from_name("obj-jobs")
    taken = await jobs.get_many.aio(n, timeout=5)
    return sum(taken)


@app.function()
def countdown(n):
    for i in range(n, 0, -1):
        yield {"left": i}


@app.function()
def relay(n):
    # A generator called from inside a function: its values come back as it yields them.
    return [v["left"] for v in countdown.remote_gen(n)]


@app.function()
async def ticks(n):
    for i in range(n):
        yield i * 10


@app.function(retries=lode.Retries(max_retries=2, initial_delay=0.0))
def flaky():
    # An exception the code raises is retried as Retries says (here, twice).
    attempts = lode.Dict.from_name("obj-flaky", create_if_missing=True)
    n = attempts.get("n", 0) + 1
    attempts["n"] = n
    if n < 3:
        raise ConnectionError(f"attempt {n} failed")
    return n


@app.function(max_containers=1)
def slow_mark(tag, seconds):
    time.sleep(seconds)
    lode.Dict.from_name("obj-marks", create_if_missing=True)[tag] = True
    return tag


@app.local_entrypoint()
def main():
    print("flaky:", flaky.remote())
    print("scratch:", scratch.remote(4))
    # One container at a time: the second call waits in the queue, where a cancel drops it.
    first = slow_mark.spawn("first", 1.0)
    second = slow_mark.spawn("second", 0)
    second.cancel()
    try:
        second.get()
    except lode.RemoteError as e:
        print("cancelled:", e.kind)
    print("gather:", lode.functions.gather(first, slow_mark.spawn("third", 0)))
    print("second ran:", "second" in lode.Dict.from_name("obj-marks"))
    print("countdown:", [v["left"] for v in countdown.remote_gen(3)])
    print("ticks:", list(ticks.remote_gen(3)))
    print("relayed:", relay.remote(2))
    try:
        countdown.remote(3)
    except TypeError as e:
        print("remote on a generator:", e)
    try:
        lode.Function.from_name("objects", "countdown").remote(2)
    except TypeError as e:
        print("by name:", "call it with .remote_gen()" in str(e))
    settings = lode.Dict.from_name("obj-settings", create_if_missing=True)
    settings["a"] = 2
    settings.update({"b": 3}, c=4)
    settings[("tuple", 1)] = b"\x00bytes"
    print("put skipped:", settings.put("a", 99, skip_if_exists=True) is False)
    print("worker saw:", worker.remote("b"))
    print("result:", results.get(timeout=10, partition="done"))
    print("tuple key:", settings[("tuple", 1)])
    try:
        settings["missing"]
    except KeyError as e:
        print("missing key:", e)
    try:
        lode.Dict.from_name("obj-never-made").get("x")
    except lode.exception.NotFoundError as e:
        print("not found:", "create_if_missing=True" in str(e))
    jobs = lode.Queue.from_name("obj-jobs", create_if_missing=True)
    jobs.put_many([1, 2, 3])
    print("async worker:", async_worker.remote(3))
    try:
        jobs.get(timeout=0.2)
    except queue.Empty:
        print("empty after timeout")
    print("len:", len(settings), jobs.len(total=True))
