"""Runs the real `loraforge` command in a subprocess (imported by tests as `from cli_runner import run_cli`;
a module of its own because several test folders have a `conftest.py`, and `from conftest import`
would pick whichever was imported last)."""
import os
import subprocess
import sys
from pathlib import Path

SHORT_RUN_STEPS = 24  # the shared short run of tests/conftest.py
SMOLLM2_RUN_STEPS = 4  # the shared short run of the real default model (tests/conftest.py)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """Run `python -m loraforge ARGS` and return the CompletedProcess (stdout/stderr as text)."""
    return subprocess.run([sys.executable, "-m", "loraforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
