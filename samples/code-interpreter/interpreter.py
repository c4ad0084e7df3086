"""A code interpreter in a sandbox, as Modal's code-interpreter example builds one: a driver
runs inside the sandbox, reads code from its stdin, runs it with globals that persist between
inputs, and answers each with what it printed. The same driver runs in both tiers: a Linux
container (`Image.debian_slim()`) and CPython compiled to WASI (`Image.wasm_python()`).

    python3 interpreter.py [--tier container|wasm|both] [--image TAG] [--wasm-image TAG]
"""

from __future__ import annotations

import argparse
import json

import lode

# Runs inside the sandbox: one JSON line in ({"code": ...}), one JSON line out.
DRIVER = r"""
import contextlib, io, json, sys, traceback
env = {}
for line in sys.stdin:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(json.loads(line)["code"], env)
        answer = {"stdout": out.getvalue()}
    except Exception:
        answer = {"stdout": out.getvalue(), "error": traceback.format_exc().splitlines()[-1]}
    print(json.dumps(answer), flush=True)
"""

PYTHON = {"container": "python3", "wasm": "python"}

SESSION = [
    "x = 6",
    "y = x * 7\nprint(y)",
    "import statistics\nprint(statistics.mean([x, y]))",
    "print(undefined_name)",
    "print('still here, x =', x)",
]


def run(tier: str, image: lode.Image) -> list[dict]:
    app = lode.App.lookup("code-interpreter", create_if_missing=True)
    sb = lode.Sandbox.create(app=app, image=image, timeout=120, block_network=True)
    try:
        driver = sb.exec(PYTHON[tier], "-c", DRIVER)
        lines = iter(driver.stdout)
        answers = []
        for code in SESSION:
            driver.stdin.write(json.dumps({"code": code}) + "\n")
            driver.stdin.drain()
            answers.append(json.loads(next(lines)))
        driver.stdin.write_eof()
        driver.stdin.drain()
        driver.wait()
        return answers
    finally:
        sb.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=["container", "wasm", "both"], default="both")
    parser.add_argument("--image", help="container tier: an image the server holds (default: debian_slim)")
    parser.add_argument("--wasm-image", help="Wasm tier: an image the server holds (default: wasm_python)")
    args = parser.parse_args()
    images = {
        "container": lode.Image.from_id(args.image) if args.image else lode.Image.debian_slim(),
        "wasm": lode.Image.from_id(args.wasm_image) if args.wasm_image else lode.Image.wasm_python(),
    }
    for tier in ["container", "wasm"] if args.tier == "both" else [args.tier]:
        print(f"== {tier}")
        for code, answer in zip(SESSION, run(tier, images[tier])):
            shown = answer["stdout"].strip() or "-"
            if "error" in answer:
                shown += f" ! {answer['error']}"
            print(f"{code.splitlines()[-1]:<32} -> {shown}")


if __name__ == "__main__":
    main()
