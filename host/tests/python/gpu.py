"""Python functions with GPUs, on a host whose driver files are the test's own
(`lode serve --gpu-root`): what a container sees, and devices held until it stops."""

import os
import stat
import subprocess
import time

import lode

app = lode.App("gpu-app")


def nodes() -> list:
    return sorted(n for n in os.listdir("/dev") if n.startswith("nvidia"))


@app.function(gpu="H100", scaledown_window=0.5)
def inspect() -> dict:
    opened = {}
    for node in nodes():
        # The allow-list lets the container open its nodes; with no driver behind them the
        # kernel then answers "no such device" (a refused node would answer EPERM).
        try:
            os.close(os.open(f"/dev/{node}", os.O_RDWR))
            opened[node] = "opened"
        except OSError as e:
            opened[node] = e.strerror
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
    with open("/usr/lib/x86_64-linux-gnu/libcuda.so.1") as f:
        lib = f.read().strip()
    try:
        open("/usr/lib/x86_64-linux-gnu/libcuda.so.1", "w")
        lib_writable = True
    except OSError:
        lib_writable = False
    # The other GPU's node cannot be made here (and the allow-list would refuse it anyway).
    try:
        os.mknod("/tmp/nvidia1", stat.S_IFCHR | 0o666, os.makedev(195, 1))
        other = "made"
    except OSError as e:
        other = e.strerror
    return {
        "nodes": nodes(),
        "open": opened,
        "other": other,
        "visible": [os.environ.get("NVIDIA_VISIBLE_DEVICES"), os.environ.get("CUDA_VISIBLE_DEVICES")],
        "smi": smi.stdout.strip(),
        "lib": lib,
        "lib_writable": lib_writable,
        "done": time.time(),
    }


@app.function(gpu="H100:2", scaledown_window=0.5)
def hold(seconds: float) -> dict:
    time.sleep(seconds)
    return {"nodes": nodes(), "done": time.time()}


@app.function()
def plain() -> list:
    return nodes()
