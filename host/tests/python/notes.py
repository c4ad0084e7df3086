"""A volume shared by hosts: `write` commits, `read` reloads first, `peek` does not.
Deployed by host/tests/cluster.rs across two hosts. Each host keeps a container of each
volume function warm, so a call runs on the host it was sent to (a host with none would send
it to one that has). `nap` has none: calls to it go to a host where it is warm."""

import lode

app = lode.App("notes")
notes = lode.Volume.from_name("notes-vol", create_if_missing=True)


@app.function(volumes={"/notes": notes}, min_containers=1)
def write(name: str, text: str) -> str:
    with open(f"/notes/{name}", "w") as f:
        f.write(text)
    notes.commit()
    return text


@app.function(volumes={"/notes": notes}, min_containers=1)
def read(name: str) -> str | None:
    notes.reload()
    return peek.local(name)


@app.function(volumes={"/notes": notes}, min_containers=1)
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
