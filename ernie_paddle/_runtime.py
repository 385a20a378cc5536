"""Process settings that must be in place before `import paddle` (imported first by every Paddle module).

* `MKL_DEBUG_CPU_TYPE=5` on AMD CPUs: Paddle's bundled MKL otherwise takes a slow generic path (sgemm about
  40 vs 100 GFLOP/s per core measured on an AMD EPYC; see docs). Harmless elsewhere, so only set on AMD.
* Threads: Paddle sets `OMP_NUM_THREADS=1` at import when it is unset. `ERNIE_PADDLE_THREADS=N` chooses N.
A value the user already exported always wins.
"""

from __future__ import annotations

import os


def _is_amd() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False


if "paddle" not in __import__("sys").modules:
    if _is_amd():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    threads = os.environ.get("ERNIE_PADDLE_THREADS")
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)

# Paddle warns at import that ccache (for compiling custom C++ ops, which we never do) is missing.
__import__("warnings").filterwarnings("ignore", message="No ccache found")
