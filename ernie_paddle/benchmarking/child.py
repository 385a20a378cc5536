"""The benchmarks' measurements in a fresh process, so that each peak RSS is the measurement's own."""

from __future__ import annotations

import json
import subprocess
import sys


class ChildFailed(RuntimeError):
    """A measuring child process exited with an error: its exit status and what it wrote to stderr."""

    def __init__(self, returncode: int, stderr: str):
        super().__init__(stderr.strip() or f"exit status {returncode}")
        self.returncode, self.stderr = returncode, stderr


def json_from_child(module: str, args: list[str], env: dict | None = None) -> dict:
    """Run `python -m module *args` in a fresh process and return the JSON object on the last line of its stdout;
    a child that fails raises ChildFailed."""
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise ChildFailed(r.returncode, r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])
