"""An image prepared by a function at build time, as Modal apps download models."""

import lode as modal

app = modal.App("prepared")


def download(name: str, size: int = 1):
    import os

    os.makedirs("/models", exist_ok=True)
    with open(f"/models/{name}.bin", "w") as f:
        f.write(os.environ["MODEL_TOKEN"][:3] + "-" + "x" * size)
    print("downloaded", name, "in", "container" if not modal.is_local() else "host")
    # A print of the secret reaches the build's log masked, as in function logs.
    print("with token", os.environ["MODEL_TOKEN"])


def broken():
    raise RuntimeError("the download failed on purpose")


image = modal.Image.debian_slim().run_function(
    download, secrets=[modal.Secret.from_name("hub")], args=("tiny",), kwargs={"size": 4}
)


@app.function(image=image)
def read() -> str:
    return open("/models/tiny.bin").read()


@app.local_entrypoint()
def main():
    print("model:", read.remote())
