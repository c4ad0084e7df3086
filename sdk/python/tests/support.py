"""Helpers shared by the tests: where the SDK is and how to run Python with it."""

import os
import subprocess
import sys

SDK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sdk_env(*extra_paths: str, **env: str) -> dict:
    """The current environment with the SDK importable and no Lode settings leaking in."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LODE_")}
    base["PYTHONPATH"] = os.pathsep.join([SDK_DIR, *extra_paths])
    base.update(env)
    return base


def run_python(args, cwd=None, timeout=30, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=sdk_env(**env), capture_output=True, text=True, timeout=timeout
    )
