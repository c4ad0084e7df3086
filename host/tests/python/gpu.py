"""Asks for a GPU this host does not have: the deploy is refused, naming it."""

import lode

app = lode.App("gpu-app")


@app.function(gpu="H100")
def train():
    return 1
