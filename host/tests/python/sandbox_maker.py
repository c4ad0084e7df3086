"""Sandboxes made from inside functions, as Modal code makes a sandbox pool: a function's
container reaches the sandboxes its app made and no others, gives them no more than its
function was given, and reaches their tunnels at the URLs a client uses."""

import os
import subprocess
import time
import urllib.request

import lode

app = lode.App("sandbox-maker")
vol = lode.Volume.from_name("maker-vol", create_if_missing=True)


def fetch(url: str, tries: int = 200) -> str:
    for _ in range(tries):
        try:
            return urllib.request.urlopen(url, timeout=2).read().decode()
        except OSError:
            time.sleep(0.05)
    return "unreachable"


def refused(make) -> str:
    try:
        make()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "allowed"


@app.function(secrets=[lode.Secret.from_name("maker-secret")], volumes={"/data": vol.read_only()})
def make() -> dict:
    pool = lode.App.lookup("maker-pool", create_if_missing=True)
    secret = lode.Secret.from_name("maker-secret")
    sb = lode.Sandbox.create(
        "python3", "-m", "http.server", "8080", "--directory", "/etc",
        app=pool, secrets=[secret], volumes={"/ro": vol.read_only()}, encrypted_ports=[8080], timeout=120,
    )
    url = sb.tunnels()[8080].url
    image = lode.Image.debian_slim()
    return {
        "id": sb.object_id,
        "url": url,
        "tunnel": "debian_version" in fetch(url),
        "secret": sb.exec("sh", "-c", "echo $MAKER_TOKEN").stdout.read().strip() == os.environ["MAKER_TOKEN"],
        "listed": [s.object_id for s in lode.Sandbox.list()] == [sb.object_id],
        "other_secret": refused(lambda: lode.Sandbox.create(app=pool, secrets=[lode.Secret.from_name("other-secret")])),
        "network": refused(lambda: lode.Sandbox.create(app=pool, block_network=False)),
        "writable": refused(lambda: lode.Sandbox.create(app=pool, volumes={"/rw": vol})),
        "build": refused(lambda: lode.Sandbox.create(app=pool, image=image.pip_install("six"))),
        "lookup": refused(lambda: lode.App.lookup("no-such-app")),
        # Untrusted code in the sandbox gets no way to the host's API: not the socket, not its name.
        "sandbox_api": sb.exec("sh", "-c", "ls /lode/run 2>&1; echo \"[$LODE_API_SOCKET]\"").stdout.read().split(),
    }


@app.function()
def visit(sandbox_id: str, url: str) -> dict:
    """Another function of the app (its own container): reaches the sandbox and its tunnel."""
    sb = lode.Sandbox.from_id(sandbox_id)
    seen = "debian_version" in fetch(url)
    sb.terminate()
    return {"seen": seen, "ended": sb.poll() is not None, "after": fetch(url, tries=1)}


@app.function()
def trespass(sandbox_id: str) -> str:
    return refused(lambda: lode.Sandbox.from_id(sandbox_id).exec("cat", "/etc/hostname"))


@app.local_entrypoint()
def main(foreign: str = ""):
    made = make.remote()
    for key in sorted(made):
        print(key, made[key])
    print("client tunnel", "debian_version" in fetch(made["url"]))
    print("trespass", trespass.remote(foreign))
    visited = visit.remote(made["id"], made["url"])
    for key in sorted(visited):
        print("visit", key, visited[key])
