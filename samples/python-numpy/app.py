"""numpy in a Lode function: the image installs it; the host never imports it.

    lode deploy samples/python-numpy/app.py
    lode call numpy-demo/stats '[1, 2, 3, 4]'
"""

import lode

image = lode.Image.debian_slim().pip_install("numpy")
app = lode.App("numpy-demo", image=image)

with image.imports():
    import numpy as np


@app.function(memory=512, timeout=60)
def stats(values: list) -> dict:
    array = np.array(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "numpy": np.__version__,
    }


@app.function()
def matmul(n: int) -> float:
    a = np.arange(n * n, dtype=float).reshape(n, n)
    return float((a @ a.T).trace())


@app.local_entrypoint()
def main():
    print(stats.remote([1, 2, 3, 4]))
    print(matmul.remote(64))
