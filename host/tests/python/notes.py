"""A volume shared by hosts: `write` commits, `read` reloads first, `peek` does not.
Deployed by host/tests/cluster.rs across two hosts."""

import lode

app = lode.App("notes")
notes = lode.Volume.from_name("notes-vol", create_if_missing=True)


@app.function(volumes={"/notes": notes})
def write(name: str, text: str) -> str:
    with open(f"/notes/{name}", "w") as f:
        f.write(text)
    notes.commit()
    return text


@app.function(volumes={"/notes": notes})
def read(name: str) -> str | None:
    notes.reload()
    return peek.local(name)


@app.function(volumes={"/notes": notes})
def peek(name: str) -> str | None:
    try:
        with open(f"/notes/{name}") as f:
            return f.read()
    except FileNotFoundError:
        return None


@app.function()
def nap(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "rested"
