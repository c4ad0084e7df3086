"""A Lode app in one file: a function, a web endpoint, a schedule and a local entrypoint.

    lode deploy samples/python-hello/app.py
    lode call hello-py/square 4
    curl -X POST http://127.0.0.1:8080/hello-py/echo -d '{"a": 1}'
    lode run samples/python-hello/app.py
"""

import lode

# fan (samples/wasm-fanout) may call these functions from its Wasm code; other apps may not.
app = lode.App("hello-py", allow_callers=["fan"])


@app.function(max_containers=4, scaledown_window=30)
def square(x: int) -> int:
    return x * x


@app.function()
def shout(text: str) -> str:
    print(f"shouting {text!r}")
    return text.upper() + "!"


@app.web_endpoint(method="POST")
def echo(body: dict) -> dict:
    return {"you_sent": body}


@app.function(schedule=lode.Period(seconds=5))
def tick():
    print("tick")


@app.local_entrypoint()
def main(n: str = "10"):
    print("square(4) =", square.remote(4))
    print("squares:", list(square.map(range(int(n)))))
    call = square.spawn(7)
    print("spawned square(7) =", call.get(timeout=30))
    print(shout.remote("hello"))
