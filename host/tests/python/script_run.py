"""A script that runs itself with `with app.run():`, as Modal scripts do (`python script_run.py`)."""

import os

import lode

app = lode.App("script-run")


@app.function()
def double(x):
    return 2 * x


if __name__ == "__main__":
    with app.run():
        print("double:", double.remote(21))
        print("ephemeral:", os.environ["LODE_APP"].startswith("script-run-run-"))
    print("after:", "LODE_APP" in os.environ)
