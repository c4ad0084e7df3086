"""Dicts and Queues from the client and from inside functions, for the integration tests."""

import queue

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
async def async_worker(n):
    jobs = lode.Queue.from_name("obj-jobs")
    taken = await jobs.get_many.aio(n, timeout=5)
    return sum(taken)


@app.local_entrypoint()
def main():
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
