"""Memory facts from /proc (Linux), for the exporter's memory check and the benchmarks' peak RSS, and the
benchmarks' measurements in a fresh process (so that each peak RSS is the measurement's own)."""

from __future__ import annotations

import json
import subprocess
import sys


def proc_kib(path: str, key: str) -> int | None:
    """The `key:` line of a /proc file in bytes (its value is in kB), or None when unavailable."""
    try:
        with open(path, encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory available without swapping (MemAvailable), or None when /proc does not say: callers then
    skip their memory checks rather than decide on a made-up number."""
    return proc_kib("/proc/meminfo", "MemAvailable")


def peak_rss() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not inherit the parent's at fork)."""
    v = proc_kib("/proc/self/status", "VmHWM")
    if v is None:
        import resource

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v


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
