"""A class served by Lode, as on Modal: its "model" loads once per container in an
@lode.enter() hook, and every method call reuses it.

    lode deploy samples/python-cls/app.py
    lode call python-cls/Model.predict 7
    lode run samples/python-cls/app.py --x 7
"""

import asyncio
import os
import time

import lode

app = lode.App("python-cls")

# Made once per container process: which container answered.
CONTAINER = os.urandom(8).hex()


@app.cls(scaledown_window=2, memory=256)
class Model:
    """A stand-in for a real model: weights built once per instance, then used by each call."""

    scale: int = lode.parameter(default=1)

    @lode.enter()
    def load(self):
        started = time.monotonic()
        # The slow part of a real model (reading weights, moving them to a device).
        self.weights = [i * self.scale for i in range(100_000)]
        self.loads = getattr(self, "loads", 0) + 1
        print(f"loaded weights for scale={self.scale} in {(time.monotonic() - started) * 1000:.1f} ms")

    @lode.method()
    def predict(self, x: int) -> int:
        return self.weights[x % len(self.weights)]

    @lode.method()
    async def predict_many(self, xs: list) -> list:
        await asyncio.sleep(0)
        return [self.weights[x % len(self.weights)] for x in xs]

    @lode.method()
    def info(self) -> dict:
        return {
            "scale": self.scale,
            "loads": self.loads,
            "container": CONTAINER,
            "extra": os.environ.get("CLS_EXTRA"),
        }

    @lode.exit()
    def unload(self):
        print(f"unloading weights for scale={self.scale}")


@app.local_entrypoint()
async def main(x: int = 7):
    model = Model()
    print("predict:", model.predict.remote(x))
    print("scaled:", Model(scale=3).predict.remote(x))
    print("map:", list(model.predict.map(range(4))))
    print("many:", await model.predict_many.remote.aio([x, x + 1]))
    first, second = await asyncio.gather(model.info.remote.aio(), Model(scale=3).info.remote.aio())
    print("loads:", first["loads"], second["loads"], "one container:", first["container"] == second["container"])
    # Other options, as Modal's with_options: a pool of their own, with the class's image.
    roomy = Model.with_options(memory=512, timeout=60).with_concurrency(max_inputs=2)
    third = roomy().info.remote()
    print("with_options: its own container:", third["container"] != first["container"])
