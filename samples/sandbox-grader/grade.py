"""Grades untrusted Python submissions: each runs in a sandbox of its own, all in parallel, on
the same test cases, and a table shows how each did. A submission that loops, crashes, or
tries the network or the host gets its grade and harms nothing.

    python3 grade.py [--image TAG_OR_DIGEST] [--app NAME] [SUBMISSION.py ...]

Without --image, the sandboxes run `lode.Image.debian_slim()`, built on the server.
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


def grade(app: lode.App, image: lode.Image, path: pathlib.Path) -> tuple[str, str, int, float]:
    started = time.monotonic()
    sb = lode.Sandbox.create(app=app, image=image, timeout=120, memory=256, block_network=True)
    try:
        sb.set_tags({"submission": path.stem})
        with sb.open("/tmp/solution.py", "w") as f:
            f.write(path.read_text())
        passed, verdict = 0, "pass"
        for given, expected in CASES:
            p = sb.exec("python3", "/tmp/solution.py", timeout=5)
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
        return path.stem, verdict, passed, time.monotonic() - started
    finally:
        sb.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="an image the server holds (default: debian_slim, built)")
    parser.add_argument("--app", default="grader")
    parser.add_argument("submissions", nargs="*", type=pathlib.Path)
    args = parser.parse_args()
    image = lode.Image.from_id(args.image) if args.image else lode.Image.debian_slim()
    app = lode.App.lookup(args.app, create_if_missing=True)
    paths = args.submissions or sorted((HERE / "submissions").glob("*.py"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(paths)) as pool:
        rows = list(pool.map(lambda p: grade(app, image, p), paths))
    print(f"{'SUBMISSION':<14} {'CASES':>5}  {'TIME':>6}  RESULT")
    for name, verdict, passed, took in rows:
        print(f"{name:<14} {passed:>2}/{len(CASES)}  {took:>5.1f}s  {verdict}")


if __name__ == "__main__":
    main()
