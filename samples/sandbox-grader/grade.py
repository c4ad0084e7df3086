"""Grades untrusted Python submissions: each runs in a sandbox of its own, in each tier, all
in parallel, on the same test cases, and a table shows how each did. A submission that loops,
crashes, or tries the network or the host gets its grade and harms nothing.

    python3 grade.py [--tier container|wasm|both] [--image TAG] [--wasm-image TAG]
                     [--app NAME] [SUBMISSION.py ...]

The container tier runs `lode.Image.debian_slim()` (or --image), CPython on Linux; the Wasm
tier runs `lode.Image.wasm_python()` (or --wasm-image), CPython compiled to WASI, with no
syscalls to attack. Both are built on the server the first time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import time

import lode

HERE = pathlib.Path(__file__).parent
# The task: read two integers, print their sum.
CASES = [("3 4\n", "7"), ("-5 5\n", "0"), ("1000000 2345678\n", "3345678")]


# Each tier's interpreter, by the name its image gives it.
PYTHON = {"container": "python3", "wasm": "python"}


def grade(app: lode.App, tier: str, image: lode.Image, path: pathlib.Path) -> tuple[str, str, str, int, float]:
    started = time.monotonic()
    sb = lode.Sandbox.create(app=app, image=image, timeout=120, memory=256, block_network=True)
    try:
        sb.set_tags({"submission": path.stem, "tier": tier})
        with sb.open("/tmp/solution.py", "w") as f:
            f.write(path.read_text())
        passed, verdict = 0, "pass"
        for given, expected in CASES:
            p = sb.exec(PYTHON[tier], "/tmp/solution.py", timeout=5)
            p.stdin.write(given)
            p.stdin.write_eof()
            p.stdin.drain()
            out = p.stdout.read().strip()
            code = p.wait()
            if code == 137:
                verdict = "killed (time limit)"
                break
            if code != 0:
                last = p.stderr.read().strip().splitlines()
                verdict = f"error: {last[-1] if last else code}"
                break
            if out != expected:
                verdict = f"wrong: {out[:30]!r}"
                break
            passed += 1
        return path.stem, tier, verdict, passed, time.monotonic() - started
    finally:
        sb.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=["container", "wasm", "both"], default="both")
    parser.add_argument("--image", help="container tier: an image the server holds (default: debian_slim)")
    parser.add_argument("--wasm-image", help="Wasm tier: an image the server holds (default: wasm_python)")
    parser.add_argument("--app", default="grader")
    parser.add_argument("submissions", nargs="*", type=pathlib.Path)
    args = parser.parse_args()
    images = {
        "container": lode.Image.from_id(args.image) if args.image else lode.Image.debian_slim(),
        "wasm": lode.Image.from_id(args.wasm_image) if args.wasm_image else lode.Image.wasm_python(),
    }
    tiers = ["container", "wasm"] if args.tier == "both" else [args.tier]
    app = lode.App.lookup(args.app, create_if_missing=True)
    paths = args.submissions or sorted((HERE / "submissions").glob("*.py"))
    jobs = [(tier, path) for path in paths for tier in tiers]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        rows = list(pool.map(lambda job: grade(app, job[0], images[job[0]], job[1]), jobs))
    print(f"{'SUBMISSION':<14} {'TIER':<9} {'CASES':>5}  {'TIME':>6}  RESULT")
    for name, tier, verdict, passed, took in rows:
        print(f"{name:<14} {tier:<9} {passed:>2}/{len(CASES)}  {took:>5.1f}s  {verdict}")


if __name__ == "__main__":
    main()
